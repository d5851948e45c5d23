"""vqgen.losses."""
