"""vqgen.modules."""
