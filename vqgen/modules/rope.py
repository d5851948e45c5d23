"""Rotary position embeddings (1D and LlamaGen's 2D), as cos/sin tables plus ``apply_rope``.

Conventions (those of LlamaGen ``autoregressive/models/gpt.py``, so its checkpoints convert
one-to-one):

- Rotation pairs are *interleaved*: channels ``(2i, 2i+1)`` of a head form pair ``i``.
- 2D: for a head of ``head_dim = n`` channels there are ``n // 4`` frequencies
  ``1 / base ** (2k / (n // 2))``, ``k = 0 .. n//4 - 1``. Pair ``k < n//4`` rotates by
  ``row * freq_k`` and pair ``n//4 + k`` by ``col * freq_k``; positions run over the grid in
  raster (row-major) order.
- A prefix of ``prefix_len`` positions (LlamaGen's ``cls_token_num`` class/condition tokens)
  comes first. LlamaGen fills the prefix rows of its table with zeros for *both* cos and sin,
  which zeroes the query and key of the prefix tokens (their values still pass through
  attention). ``prefix="zeros"`` (the default) reproduces that exactly; ``prefix="identity"``
  (cos 1, sin 0) leaves prefix tokens unrotated instead.

Tables are NumPy float32 arrays built at trace time (static shapes); slice them with
``jax.lax.dynamic_slice_in_dim`` for a cache position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _prefix_rows(prefix_len: int, half: int, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    if prefix == "zeros":
        return np.zeros((prefix_len, half), np.float32), np.zeros((prefix_len, half), np.float32)
    if prefix == "identity":
        return np.ones((prefix_len, half), np.float32), np.zeros((prefix_len, half), np.float32)
    raise ValueError(f"prefix={prefix!r} is not a RoPE prefix mode; use 'zeros' (LlamaGen) or 'identity'.")


def rope_1d_table(
    length: int, head_dim: int, base: float = 10000.0, prefix_len: int = 0, prefix: str = "zeros"
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables ``[prefix_len + length, head_dim // 2]`` for 1D positions ``0..length-1``."""
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings; choose an even head size.")
    half = head_dim // 2
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2)[:half].astype(np.float64) / head_dim))  # [hd/2]
    angles = np.outer(np.arange(length), freqs)  # [length, hd/2]
    pc, ps = _prefix_rows(prefix_len, half, prefix)
    cos = np.concatenate([pc, np.cos(angles).astype(np.float32)])
    sin = np.concatenate([ps, np.sin(angles).astype(np.float32)])
    return cos, sin


def rope_2d_table(
    grid: tuple[int, int], head_dim: int, base: float = 10000.0, prefix_len: int = 0, prefix: str = "zeros"
) -> tuple[np.ndarray, np.ndarray]:
    """LlamaGen 2D RoPE cos/sin tables ``[prefix_len + h * w, head_dim // 2]`` (raster order).

    ``grid = (h, w)``; LlamaGen only uses square grids, for which this equals its
    ``precompute_freqs_cis_2d(grid_size, head_dim, base, cls_token_num)`` (cos in ``[..., 0]``,
    sin in ``[..., 1]``).
    """
    h, w = (int(g) for g in grid)
    if head_dim % 4:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 4 for 2D rotary embeddings; change width/heads.")
    half = head_dim // 2
    quarter = half // 2
    freqs = 1.0 / (base ** (np.arange(0, half, 2)[:quarter].astype(np.float64) / half))  # [hd/4]
    rows = np.outer(np.arange(h), freqs)  # [h, hd/4]
    cols = np.outer(np.arange(w), freqs)  # [w, hd/4]
    angles = np.concatenate(
        [np.broadcast_to(rows[:, None, :], (h, w, quarter)), np.broadcast_to(cols[None, :, :], (h, w, quarter))],
        axis=-1,
    ).reshape(h * w, half)  # [h*w, hd/2]
    pc, ps = _prefix_rows(prefix_len, half, prefix)
    cos = np.concatenate([pc, np.cos(angles).astype(np.float32)])
    sin = np.concatenate([ps, np.sin(angles).astype(np.float32)])
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved channel pairs of ``x [B, S, H, hd]`` by ``cos/sin [S, hd/2]``.

    Computed in float32 and cast back to ``x.dtype``.
    """
    b, s, h, d = x.shape
    xp = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)  # [B, S, H, hd/2, 2]
    c = cos.astype(jnp.float32)[None, :, None, :]  # [1, S, 1, hd/2]
    sn = sin.astype(jnp.float32)[None, :, None, :]  # [1, S, 1, hd/2]
    x0, x1 = xp[..., 0], xp[..., 1]
    out = jnp.stack([x0 * c - x1 * sn, x1 * c + x0 * sn], axis=-1)  # [B, S, H, hd/2, 2]
    return out.reshape(b, s, h, d).astype(x.dtype)
