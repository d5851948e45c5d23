"""vqgen.convert."""
