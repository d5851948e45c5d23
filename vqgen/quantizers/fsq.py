"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE made simple").

Channel ``i`` of ``z`` is bounded to ``levels[i]`` integer values and rounded with a
straight-through gradient; the implicit codebook is the product grid of ``prod(levels)`` codes.
The bound follows the official google-research ``fsq`` code::

    half_l = (L - 1) * (1 - eps) / 2
    offset = 0.5 if L is even else 0.0
    shift  = tan(offset / half_l)
    bounded = tanh(z + shift) * half_l - offset

so that rounding gives ``L`` integers (``-L/2 .. L/2-1`` for even ``L``, ``-(L-1)/2 .. (L-1)/2``
for odd ``L``), which are divided by ``half_width = L // 2`` to lie in ``[-1, 1]``. The official
code uses ``tan`` for the shift: ``atanh(offset / half_l)`` would centre the bound exactly but is
undefined for ``L = 2`` (``offset / half_l = 1 / (1 - eps) > 1``); for ``L >= 3`` the two differ
by less than ``4e-4`` in ``shift``.

Indices are mixed-radix with the FIRST channel least significant:
``index = sum_i (round(bounded_i) + half_width_i) * basis_i`` with
``basis = cumprod([1] + levels[:-1])``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.quantizers.base import QuantizerOutput, straight_through, usage_metrics

_MAX_CODES = 2**31 - 1  # indices are int32


class FiniteScalarQuantizer(nn.Module):
    """FSQ: bounded per-channel rounding to ``levels``, straight-through, no loss.

    ``quantized`` is ``round(bound(z)) / (L // 2)`` per channel with the gradient of
    ``bound(z) / (L // 2)`` (the round is straight-through; the tanh bound is differentiated
    normally). ``loss`` is 0; ``metrics`` hold ``usage`` and ``perplexity`` over
    ``codebook_size = prod(levels)`` codes.

    Attributes:
      levels: number of values per channel, each >= 2 (e.g. ``(8, 5, 5, 5)`` for 1,000 codes).
      eps: the bound's margin that keeps ``tanh`` away from the rounding boundary.
      dtype: dtype of ``quantized`` (``None``: the dtype of ``z``; ``decode_indices``: float32).
      param_dtype: accepted for a uniform quantizer interface; this module has no parameters.
    """

    levels: Sequence[int] = (8, 5, 5, 5)
    eps: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def codebook_size(self) -> int:
        return math.prod(int(l) for l in self.levels)

    def _check_config(self) -> None:
        if len(self.levels) == 0:
            raise ValueError("FiniteScalarQuantizer.levels is empty; give one level count per channel, e.g. (8, 5, 5, 5).")
        bad = [int(l) for l in self.levels if int(l) < 2]
        if bad:
            raise ValueError(
                f"FiniteScalarQuantizer.levels={tuple(self.levels)} has level counts {bad} below 2; "
                "every channel needs at least 2 levels."
            )
        if self.codebook_size > _MAX_CODES:
            raise ValueError(
                f"FiniteScalarQuantizer.levels={tuple(self.levels)} gives {self.codebook_size} codes, more "
                f"than int32 indices hold ({_MAX_CODES}); use fewer or smaller levels."
            )

    def _constants(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        levels = np.asarray(self.levels, np.int64)  # [D]
        half_l = (levels - 1) * (1.0 - self.eps) / 2.0  # [D]
        offset = np.where(levels % 2 == 0, 0.5, 0.0)  # [D]
        shift = np.tan(offset / half_l)  # [D]
        half_width = levels // 2  # [D]
        return levels, half_l, offset, shift, half_width

    def basis(self) -> np.ndarray:
        """``[D]`` int mixed-radix place values ``cumprod([1] + levels[:-1])``."""
        return np.cumprod([1] + [int(l) for l in self.levels[:-1]]).astype(np.int64)

    def bound(self, z: jax.Array) -> jax.Array:
        """``tanh(z + shift) * half_l - offset`` per channel, float32."""
        _, half_l, offset, shift, _ = self._constants()
        return jnp.tanh(z.astype(jnp.float32) + shift.astype(np.float32)) * half_l.astype(np.float32) - offset.astype(
            np.float32
        )

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
        """Quantizes ``z`` of shape ``[..., len(levels)]``; ``train`` is accepted for a uniform interface."""
        del train
        self._check_config()
        if z.shape[-1] != len(self.levels):
            raise ValueError(
                f"FiniteScalarQuantizer got z with last dimension {z.shape[-1]}, expected len(levels)="
                f"{len(self.levels)} for levels={tuple(self.levels)}; project z to that many channels."
            )
        out_dtype = z.dtype if self.dtype is None else self.dtype
        _, _, _, _, half_width = self._constants()
        bounded = self.bound(z)  # [..., D] float32
        rounded = jnp.round(bounded)  # [..., D]
        quantized = (straight_through(bounded, rounded) / half_width.astype(np.float32)).astype(out_dtype)  # [..., D]
        digits = rounded.astype(jnp.int32) + half_width.astype(np.int32)  # [..., D] in [0, L)
        indices = jnp.sum(digits * self.basis().astype(np.int32), axis=-1).astype(jnp.int32)  # [...]
        metrics = usage_metrics(indices, self.codebook_size)
        return QuantizerOutput(quantized=quantized, indices=indices, loss=jnp.zeros((), jnp.float32), metrics=metrics)

    def decode_indices(self, indices: jax.Array) -> jax.Array:
        """``[...]`` int code ids -> ``[..., D]`` code vectors in ``[-1, 1]`` (inverse of the indices)."""
        self._check_config()
        levels, _, _, _, half_width = self._constants()
        idx = indices.astype(jnp.int32)[..., None]  # [..., 1]
        digits = (idx // self.basis().astype(np.int32)) % levels.astype(np.int32)  # [..., D]
        codes = (digits - half_width.astype(np.int32)).astype(jnp.float32) / half_width.astype(np.float32)  # [..., D]
        return codes.astype(jnp.float32 if self.dtype is None else self.dtype)
