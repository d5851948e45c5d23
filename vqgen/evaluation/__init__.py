"""vqgen.evaluation."""
