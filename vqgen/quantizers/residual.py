"""Residual vector quantisation (RQ-VAE, Lee et al. 2022).

Level ``l`` quantizes what the previous levels left over: ``r_0 = z``,
``r_{l+1} = r_l - sg(c_l)``; the quantized vector is the sum of the chosen codes.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgen.quantizers.base import QuantizerOutput, straight_through, usage_metrics
from vqgen.quantizers.vq import Initializer, VectorQuantizer, default_codebook_init


class ResidualQuantizer(nn.Module):
    """A stack of :class:`VectorQuantizer` levels on successive residuals.

    ``quantized = z + sg(sum_l c_l - z)`` (straight-through overall); ``indices`` has shape
    ``z.shape[:-1] + (num_levels,)``; ``loss`` is the sum of the levels' VQ losses, each measured
    between the level's residual and its code. ``metrics``: summed ``codebook_loss`` and
    ``commitment_loss``; ``level_{l}_usage`` / ``level_{l}_perplexity`` per level; ``usage`` and
    ``perplexity`` over all levels together. With ``shared_codebook`` those count the K shared
    codes; otherwise each (level, code) pair is a separate code of the ``num_levels * K`` total.

    Each level is a ``VectorQuantizer`` named ``level_{l}`` (or one named ``shared``), so its
    parameters and its ``'quantizer_state'`` live under that name. A shared EMA / dead-code
    codebook gets one update per step from all levels' assignments together.

    Attributes:
      num_levels: number of residual levels.
      codebook_size: codes per level (K).
      shared_codebook: one codebook for all levels.
      beta, use_ema, ema_decay, ema_epsilon, dead_code_threshold: passed to every level.
      dtype, param_dtype, codebook_init: passed to every level.
    """

    num_levels: int
    codebook_size: int
    shared_codebook: bool = False
    beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    dead_code_threshold: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    codebook_init: Initializer = default_codebook_init

    def setup(self):
        if self.num_levels < 1:
            raise ValueError(f"num_levels={self.num_levels} must be at least 1.")
        make = lambda name: VectorQuantizer(
            codebook_size=self.codebook_size, beta=self.beta, use_ema=self.use_ema,
            ema_decay=self.ema_decay, ema_epsilon=self.ema_epsilon,
            dead_code_threshold=self.dead_code_threshold, dtype=self.dtype,
            param_dtype=self.param_dtype, codebook_init=self.codebook_init, name=name,
        )
        if self.shared_codebook:
            shared = make("shared")
            self.levels = [shared] * self.num_levels
        else:
            self.levels = [make(f"level_{l}") for l in range(self.num_levels)]

    def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
        """Quantizes ``z`` ``[..., D]`` with ``num_levels`` residual levels."""
        zf = z.astype(jnp.float32)  # [..., D]
        residual = zf
        total = jnp.zeros_like(zf)
        residuals, outs = [], []
        for level in self.levels:
            out = level(residual, train=train, update_state=not self.shared_codebook)
            residuals.append(residual)
            outs.append(out)
            code = jax.lax.stop_gradient(out.quantized)  # [..., D], value c_l
            total = total + code
            residual = residual - code
        indices = jnp.stack([o.indices for o in outs], axis=-1)  # [..., L]
        if self.shared_codebook and train:
            self.levels[0].update_codebook_state(jnp.stack(residuals, axis=0), jnp.stack([o.indices for o in outs], 0))

        K = self.codebook_size
        metrics = {
            "codebook_loss": sum(o.metrics["codebook_loss"] for o in outs),
            "commitment_loss": sum(o.metrics["commitment_loss"] for o in outs),
        }
        for l, o in enumerate(outs):
            metrics[f"level_{l}_usage"] = o.metrics["usage"]
            metrics[f"level_{l}_perplexity"] = o.metrics["perplexity"]
        if self.shared_codebook:
            metrics.update(usage_metrics(indices, K))
        else:
            offsets = jnp.arange(self.num_levels, dtype=jnp.int32) * K  # [L]
            metrics.update(usage_metrics(indices + offsets, self.num_levels * K))
        loss = sum(o.loss for o in outs)
        return QuantizerOutput(
            quantized=straight_through(zf, total).astype(z.dtype),
            indices=indices,
            loss=jnp.asarray(loss, jnp.float32),
            metrics={k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()},
        )

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """Sum of the levels' codes for ``indices`` ``[..., num_levels]`` -> ``[..., D]``."""
        if indices.shape[-1] != self.num_levels:
            raise ValueError(
                f"indices have {indices.shape[-1]} levels in the last axis but num_levels="
                f"{self.num_levels}; pass indices of shape [..., {self.num_levels}]."
            )
        total = None
        for l, level in enumerate(self.levels):
            code = level.decode_indices(indices[..., l]).astype(jnp.float32)  # [..., D]
            total = code if total is None else total + code
        return total.astype(self.dtype)
