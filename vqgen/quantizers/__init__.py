"""Quantizers: every one returns :class:`QuantizerOutput` and has ``decode_indices``."""
from vqgen.quantizers.base import QuantizerOutput, entropy, straight_through, usage_metrics
