"""vqgen.generators."""
