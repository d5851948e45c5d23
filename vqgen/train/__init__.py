"""vqgen.train."""
