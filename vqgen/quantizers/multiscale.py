"""VAR's multi-scale residual quantizer (Tian et al. 2024, FoundationVision/VAR ``models/quant.py``).

For each scale ``s`` of the schedule, from small to large, the residual of ``z`` ``[B, H, W, D]``
is area-averaged down to ``s × s``, looked up in one shared codebook, the code map is bicubic
up-sampled back to ``H × W`` and refined by a 3×3 convolution Φ, and the result is added to
``f_hat`` and subtracted from the residual. The token maps of all scales are what VAR's
next-scale transformer predicts.

The resampling operators are written as small matrices so that they equal PyTorch's
``F.interpolate(mode='area')`` (adaptive average pooling) and
``F.interpolate(mode='bicubic', align_corners=False)`` (cubic convolution with a = -0.75 and
clamped borders), which VAR uses; ``jax.image.resize`` differs from both at borders.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.quantizers.base import QuantizerOutput, usage_metrics
from vqgen.quantizers.vq import Initializer, default_codebook_init, nearest_code

VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def area_matrix(out_size: int, in_size: int) -> np.ndarray:
    """``[out, in]`` averaging weights of adaptive average pooling (PyTorch ``mode='area'``)."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil
        m[i, start:end] = 1.0 / (end - start)
    return m


def bicubic_matrix(out_size: int, in_size: int, a: float = -0.75) -> np.ndarray:
    """``[out, in]`` weights of PyTorch's bicubic interpolation with ``align_corners=False``."""

    def near(x):  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    m = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        src = scale * (i + 0.5) - 0.5
        x0 = math.floor(src)
        t = src - x0
        weights = (far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t))
        for k, w in enumerate(weights):
            j = min(max(x0 - 1 + k, 0), in_size - 1)
            m[i, j] += w
    return m.astype(np.float32)


def resize_with(matrix: np.ndarray, x: jax.Array) -> jax.Array:
    """Applies a ``[out, in]`` resampling matrix to both spatial axes of ``x`` ``[B, in, in, D]``."""
    m = jnp.asarray(matrix)
    return jnp.einsum("ih,jw,bhwd->bijd", m, m, x, precision=jax.lax.Precision.HIGHEST)  # [B, out, out, D]


def phi_ticks(count: int) -> np.ndarray:
    """Positions in [0, 1] that VAR's partially shared Φs stand for."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


def phi_assignment(num_scales: int, phi_share: int) -> list[int]:
    """Which Φ each scale uses, as in VAR: 1 = one shared Φ, 0 = one per scale, k = k shared."""
    if phi_share == 1:
        return [0] * num_scales
    count = num_scales if phi_share == 0 else phi_share
    ticks = phi_ticks(count)
    out = []
    for si in range(num_scales):
        at = si / (num_scales - 1) if num_scales > 1 else 0.0
        out.append(int(np.argmin(np.abs(ticks - at))))
    return out


class Phi(nn.Module):
    """VAR's Φ: ``h * (1 - ratio) + conv3x3(h) * ratio`` on ``[B, H, W, D]``."""

    ratio: float = 0.5
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        ratio = abs(self.ratio)
        conv = nn.Conv(
            h.shape[-1], (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            name="conv",
        )
        mixed = conv(h.astype(self.dtype)).astype(jnp.float32)  # [B, H, W, D]
        return h * (1.0 - ratio) + mixed * ratio


class MultiScaleResidualQuantizer(nn.Module):
    """VAR multi-scale residual VQ on ``z`` ``[B, H, W, D]`` with ``H == W == scales[-1]``.

    For scale ``k`` with size ``s``: ``idx_k = nearest(area_down(f_rest, s))`` (cosine lookup
    when ``l2_normalize``, the codes themselves stay unnormalised as in VAR),
    ``h_k = Φ(bicubic_up(C[idx_k], H))`` (no resampling at the last scale),
    ``f_hat += h_k``, ``f_rest -= sg(h_k)``; ``f_rest`` starts at ``sg(z)``.
    ``loss = mean_k [mean((f_hat_k - sg(z))²) + beta * mean((sg(f_hat_k) - z)²)]`` where
    ``f_hat_k`` is the running sum after scale ``k`` (reported as ``codebook_loss`` and
    ``commitment_loss``); ``quantized = z + sg(f_hat - z)``; ``indices`` is a tuple of int32
    ``[B, s, s]`` maps; ``usage``/``perplexity`` count all scales' tokens together.

    Φ sharing (VAR's ``share_quant_resi``): ``phi_share=1`` one Φ for all scales, ``0`` one Φ per
    scale, ``k > 1`` ``k`` Φs, scale ``i`` using the one whose tick is nearest ``i / (S - 1)``.
    ``phi_ratio = 0`` turns Φ into the identity (no parameters).

    Attributes:
      codebook_size: number of codes K.
      scales: side lengths from small to large; the last is the feature map size.
      beta: commitment weight.
      phi_share: Φ sharing mode (see above), 4 as in VAR.
      phi_ratio: Φ's residual mixing ratio, 0.5 as in VAR.
      l2_normalize: cosine lookup (VAR's ``using_znorm``).
      dtype: compute dtype of the Φ convolutions and of ``decode_indices``' output.
      param_dtype: storage dtype of parameters.
      codebook_init: initializer of the ``[K, D]`` codebook.
    """

    codebook_size: int
    scales: Sequence[int] = VAR_SCALES
    beta: float = 0.25
    phi_share: int = 4
    phi_ratio: float = 0.5
    l2_normalize: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    codebook_init: Initializer = default_codebook_init

    def __call__(self, z: jax.Array, train: bool = False) -> QuantizerOutput:
        """Quantizes ``z`` ``[B, H, W, D]``; ``train`` is accepted for the common interface."""
        del train
        return self._run(z=z)

    def decode_indices(self, indices: Sequence[jax.Array], num_scales: int | None = None) -> jax.Array:
        """``f_hat`` ``[B, H, W, D]`` from a tuple of per-scale ``[B, s, s]`` index maps; with
        ``num_scales = k`` only the first ``k`` scales are summed (the coarse-to-fine partial
        reconstructions of VAR's figures)."""
        return self._run(indices=tuple(indices), num_scales=num_scales)

    def _check_fields(self) -> None:
        scales = tuple(self.scales)
        if not scales or any(int(s) < 1 for s in scales):
            raise ValueError(f"scales={scales} must be a non-empty sequence of positive sizes, e.g. {VAR_SCALES}.")
        if self.phi_share < 0:
            raise ValueError(f"phi_share={self.phi_share} must be 0 (one Φ per scale), 1 (shared) or k > 1.")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size={self.codebook_size} must be at least 1.")

    @nn.compact
    def _run(self, z=None, indices=None, num_scales=None):
        prefix = num_scales
        self._check_fields()
        scales = tuple(int(s) for s in self.scales)
        size = scales[-1]
        stored = None
        if "codebook" in self.variables.get("params", {}):
            stored = nn.meta.unbox(self.variables["params"]["codebook"]).shape[-1]
        if z is not None:
            if z.ndim != 4:
                raise ValueError(f"z must be a [B, H, W, D] feature map; got shape {z.shape}.")
            if z.shape[1] != size or z.shape[2] != size:
                raise ValueError(
                    f"scales={scales} end at {size} but the feature map (the token grid) is "
                    f"{z.shape[1]}x{z.shape[2]}; make the last scale {z.shape[1]} (tokenizer.quantizer.scales "
                    "in a config), e.g. scales ending with it for a square map."
                )
            dim = z.shape[-1]
            if stored is not None and stored != dim:
                raise ValueError(
                    f"z has last dimension {dim} but this MultiScaleResidualQuantizer was "
                    f"initialised for D={stored}; pass z of shape [B, H, W, {stored}]."
                )
        else:
            if stored is None:
                raise ValueError("decode_indices needs initialised variables; call init on a z first.")
            if len(indices) != len(scales):
                raise ValueError(
                    f"decode_indices got {len(indices)} index maps but scales={scales} has "
                    f"{len(scales)}; pass one [B, s, s] map per scale."
                )
            dim = stored
        K = self.codebook_size
        codebook = self.param(
            "codebook", nn.with_logical_partitioning(self.codebook_init, ("codebook", "embed")),
            (K, dim), self.param_dtype,
        ).astype(jnp.float32)  # [K, D]

        num_scales = len(scales)
        assignment = phi_assignment(num_scales, self.phi_share)
        if abs(self.phi_ratio) > 1e-6:
            phis = [
                Phi(self.phi_ratio, dtype=self.dtype, param_dtype=self.param_dtype, name=f"phi_{k}")
                for k in range(max(assignment) + 1)
            ]
        else:
            phis = [lambda h: h] * (max(assignment) + 1)

        def embed_to_full(idx_map, si):  # [B, s, s] -> [B, H, W, D]
            h = jnp.take(codebook, idx_map, axis=0)  # [B, s, s, D]
            if scales[si] != size:
                h = resize_with(bicubic_matrix(size, scales[si]), h)  # [B, H, W, D]
            return phis[assignment[si]](h)

        if z is None:
            f_hat = 0.0
            for si, idx_map in enumerate(indices):
                if prefix is not None and si >= prefix:
                    break
                expected = (scales[si], scales[si])
                if tuple(idx_map.shape[1:]) != expected:
                    raise ValueError(
                        f"index map {si} has shape {idx_map.shape}; scale {scales[si]} needs [B, {expected[0]}, {expected[1]}]."
                    )
                f_hat = f_hat + embed_to_full(idx_map.astype(jnp.int32), si)
            return f_hat.astype(self.dtype)

        zf = z.astype(jnp.float32)  # [B, H, W, D]
        z_sg = jax.lax.stop_gradient(zf)
        B = z.shape[0]
        f_hat = jnp.zeros_like(zf)
        f_rest = z_sg
        codebook_loss = commitment_loss = 0.0
        idx_maps = []
        for si, s in enumerate(scales):
            rest = f_rest if s == size else resize_with(area_matrix(s, size), f_rest)  # [B, s, s, D]
            idx, _ = nearest_code(rest.reshape(-1, dim), jax.lax.stop_gradient(codebook), cosine=self.l2_normalize)
            idx_map = idx.reshape(B, s, s)  # [B, s, s]
            h = embed_to_full(idx_map, si)  # [B, H, W, D]
            f_hat = f_hat + h
            f_rest = f_rest - jax.lax.stop_gradient(h)
            codebook_loss = codebook_loss + jnp.mean(jnp.square(f_hat - z_sg))
            commitment_loss = commitment_loss + jnp.mean(jnp.square(jax.lax.stop_gradient(f_hat) - zf))
            idx_maps.append(idx_map)
        codebook_loss = codebook_loss / num_scales
        commitment_loss = commitment_loss / num_scales
        metrics = {"codebook_loss": codebook_loss, "commitment_loss": commitment_loss}
        metrics.update(usage_metrics(jnp.concatenate([m.reshape(-1) for m in idx_maps]), K))
        quantized = zf + jax.lax.stop_gradient(f_hat - zf)  # [B, H, W, D]
        return QuantizerOutput(
            quantized=quantized.astype(z.dtype),
            indices=tuple(idx_maps),
            loss=(codebook_loss + self.beta * commitment_loss).astype(jnp.float32),
            metrics={k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()},
        )
