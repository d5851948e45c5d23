"""vqgen: visual tokenizers and the autoregressive family of generators, in JAX/Flax."""

__version__ = "0.1.0"
