"""vqgen.data."""
