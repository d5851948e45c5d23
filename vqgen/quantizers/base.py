"""What every quantizer shares: the output structure and float32 helpers."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class QuantizerOutput:
    """Result of a quantizer call.

    Attributes:
      quantized: same shape and dtype as the input ``z``; straight-through where discrete.
      indices: int32 code ids of shape ``z.shape[:-1]`` (``+ [num_levels]`` for residual VQ;
        a tuple of per-scale maps for multi-scale VQ).
      loss: float32 scalar, the weighted sum of this quantizer's losses.
      metrics: float32 scalars: each loss term, ``usage``, ``perplexity``, entropies.
    """

    quantized: jax.Array
    indices: Any
    loss: jax.Array
    metrics: dict[str, jax.Array]


def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value ``q``, gradient of the identity w.r.t. ``z``."""
    return z + jax.lax.stop_gradient(q - z)


def entropy(probs: jax.Array, axis: int = -1) -> jax.Array:
    """Shannon entropy in nats, float32, with ``0 log 0 = 0``."""
    probs = probs.astype(jnp.float32)
    return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=axis)


def code_histogram(indices: jax.Array, codebook_size: int) -> jax.Array:
    """Counts of each code id over every element of ``indices`` (global under jit)."""
    flat = indices.reshape(-1).astype(jnp.int32)
    return jnp.zeros((codebook_size,), jnp.float32).at[flat].add(1.0)


def usage_metrics(indices: jax.Array, codebook_size: int, prefix: str = "") -> dict[str, jax.Array]:
    """``usage`` (fraction of codes hit) and ``perplexity`` (exp entropy of the histogram)."""
    counts = code_histogram(indices, codebook_size)
    probs = counts / jnp.maximum(counts.sum(), 1.0)
    return {
        f"{prefix}usage": jnp.mean((counts > 0).astype(jnp.float32)),
        f"{prefix}perplexity": jnp.exp(entropy(probs)),
    }
