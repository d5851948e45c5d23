"""vqgen.tokenizers."""
