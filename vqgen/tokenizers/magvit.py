"""MAGVIT's 3D-conv VQ tokenizer for video, optionally causal in time, with 2D->3D weight inflation.

    x [B, T, H, W, C] -> Encoder3D -> (quant_conv 1x1x1) -> quantizer -> (post_quant_conv) -> Decoder3D

The structure follows google-research/magvit ``models/enc_dec_3dcnn.py`` (MAGVIT v1, "3D-VQ"):

Encoder
  ``conv_in`` 3x3x3 (no bias) -> per level ``i``: ``num_res_blocks`` :class:`ResBlock3D`
  (``down_{i}_block_{j}``; GroupNorm, swish, 3x3x3 convs without bias, 1x1x1 ``nin_shortcut`` on
  the block input when channels change) -> on all but the last level a parameter-free average
  pool halving H, W and, where ``temporal_downsample[i]``, T -> ``num_res_blocks`` mid blocks
  (``mid_block_{k}``) -> GroupNorm (``norm_out``), swish, 1x1x1 ``conv_out`` to ``z_channels``.
Decoder
  ``conv_in`` 3x3x3 to ``ch * ch_mult[-1]`` -> ``num_res_blocks`` mid blocks -> per level ``i``
  from the top: ``num_res_blocks`` blocks (``up_{i}_block_{j}``), then for ``i > 0``
  nearest-neighbour x2 in H, W (and T where ``temporal_downsample[i - 1]``) and a 3x3x3 conv
  (``up_{i}_upsample/conv``) -> ``norm_out``, swish, 3x3x3 ``conv_out``.

Names match :mod:`vqgen.tokenizers.vqgan` (``"maskgit"`` style, the closest 2D model), so an
image tokenizer's parameters can be inflated into this one by name (:func:`inflate_2d_params`).

``causal=True`` gives a MAGVIT-v2-style causal tokenizer: every time padding is on the past side
and GroupNorm statistics are per frame (see :mod:`vqgen.modules.conv3d`). With temporal factor
``f``, token frame ``j`` depends only on input frames ``< f * (j + 1)`` and reconstructed frame
``t`` only on input frames ``< f * (t // f + 1)`` (block-causal; strictly causal when
``f == 1``). ``first_frame=True`` (with ``causal``) is MAGVIT-v2's layout: frame 0 is encoded
alone and the rest in blocks of ``f`` (``T = 1 + k f`` frames -> ``1 + k`` token frames; every
temporal downsampling pools frame 0 alone, or pads ``kt - 1`` past frames before a strided conv,
and every temporal upsampling drops the first repeated frame), so an image (``T = 1``) and the
first frame of a video share their tokens and one tokenizer serves both. Remaining deviations
from MAGVIT-v2: average-pool downsampling by default (``down_mode="conv"`` for strided convs),
and no LFQ-specific decoder (adaptive GroupNorm, depth-to-space); plug in a
``LookupFreeQuantizer`` as ``quantizer`` for LFQ.

Parameter paths: the decoder's last conv kernel is ``("decoder", "conv_out", "kernel")``
(:data:`LAST_LAYER`), the same path as the 2D VQGAN.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.modules.conv import check_groups, group_norm, swish
from vqgen.modules.conv3d import (
    ACTIVATION_AXES_3D,
    Downsample3D,
    ResBlock3D,
    Upsample3D,
    apply_norm,
    conv3d,
)
from vqgen.quantizers.base import QuantizerOutput

Dtype = Any

LAST_LAYER: tuple[str, ...] = ("decoder", "conv_out", "kernel")
"""Parameter path of the decoder's last conv kernel (the adaptive GAN weight uses it)."""


class Encoder3D(nn.Module):
    """Video ``[B, T, H, W, C]`` -> latents ``[B, T / ft, H / 2**(L-1), W / 2**(L-1), z_channels]``."""

    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    temporal_downsample: Sequence[bool] = (True, True, False)
    causal: bool = False
    first_frame: bool = False
    z_channels: int = 256
    norm_groups: int = 32
    down_mode: str = "avgpool"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(causal=self.causal, norm_groups=self.norm_groups, use_bias=False, **kw)
        x = nn.with_logical_constraint(x.astype(self.dtype), ACTIVATION_AXES_3D)
        h = conv3d(self.ch, 3, causal=self.causal, use_bias=False, name="conv_in", **kw)(x)  # [B, T, H, W, ch]
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = ResBlock3D(self.ch * mult, name=f"down_{i}_block_{j}", **bkw)(h, train)  # [B, t, h, w, C_i]
            if i != len(self.ch_mult) - 1:
                h = Downsample3D(bool(self.temporal_downsample[i]), self.down_mode, self.causal, self.first_frame,
                                 name=f"down_{i}_downsample", **kw)(h)  # [B, t/ft, h/2, w/2, C_i]
        for k in range(self.num_res_blocks):
            h = ResBlock3D(h.shape[-1], name=f"mid_block_{k + 1}", **bkw)(h, train)
        h = swish(apply_norm(group_norm(num_groups=self.norm_groups, name="norm_out", **kw), h, self.causal))
        h = conv3d(self.z_channels, 1, causal=self.causal, name="conv_out", **kw)(h)  # [B, t, h, w, z_channels]
        return nn.with_logical_constraint(h, ACTIVATION_AXES_3D)


class Decoder3D(nn.Module):
    """Latents ``[B, t, h, w, z_channels]`` -> video ``[B, t * ft, h * 2**(L-1), w * 2**(L-1), out_channels]``."""

    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    temporal_downsample: Sequence[bool] = (True, True, False)
    causal: bool = False
    first_frame: bool = False
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(causal=self.causal, norm_groups=self.norm_groups, use_bias=False, **kw)
        z = nn.with_logical_constraint(z.astype(self.dtype), ACTIVATION_AXES_3D)
        h = conv3d(self.ch * self.ch_mult[-1], 3, causal=self.causal, name="conv_in", **kw)(z)  # [B, t, h, w, C_top]
        for k in range(self.num_res_blocks):
            h = ResBlock3D(h.shape[-1], name=f"mid_block_{k + 1}", **bkw)(h, train)
        for i in reversed(range(len(self.ch_mult))):
            for j in range(self.num_res_blocks):
                h = ResBlock3D(self.ch * self.ch_mult[i], name=f"up_{i}_block_{j}", **bkw)(h, train)
            if i != 0:
                h = Upsample3D(bool(self.temporal_downsample[i - 1]), self.causal, self.first_frame,
                               name=f"up_{i}_upsample", **kw)(h)  # [B, t*ft, 2h, 2w, C_i]
        h = swish(apply_norm(group_norm(num_groups=self.norm_groups, name="norm_out", **kw), h, self.causal))
        return conv3d(self.out_channels, 3, causal=self.causal, name="conv_out", **kw)(h)  # [B, T, H, W, out]


class MAGVIT(nn.Module):
    """3D-conv VQ video tokenizer: the tokenizer contract of DESIGN.md §3 for ``[B, T, H, W, C]``.

    Attributes:
      quantizer: an unbound quantizer module of :mod:`vqgen.quantizers`; called on
        ``[B, t, h, w, embed_dim]`` latents with ``train=...``; its parameters live under
        ``params/quantizer``. Indices have shape ``[B, t, h, w]``.
      in_channels, out_channels: video channels (``out_channels`` defaults to ``in_channels``).
      ch, ch_mult: base width and per-level multipliers; ``len(ch_mult) - 1`` spatial halvings.
      num_res_blocks: ResBlock3Ds per level and in the mid stage (encoder and decoder).
      temporal_downsample: one bool per downsampling (``len(ch_mult) - 1``): whether that level
        also halves T. Temporal factor ``2 ** sum(temporal_downsample)``.
      causal: MAGVIT-v2-style causal padding and per-frame normalisation (see module docstring).
      first_frame: with ``causal``, frame 0 is encoded alone (MAGVIT-v2): clips of ``1 + k ft``
        frames give ``1 + k`` token frames, and an image (``T = 1``) gives the same tokens as the
        first frame of any video that starts with it.
      z_channels: encoder output / decoder input channels.
      embed_dim: quantizer input channels; with ``use_quant_conv`` 1x1x1 convs map
        ``z_channels <-> embed_dim``, otherwise the two must be equal (MAGVIT v1).
      num_frames: the clip length the model is trained on (also tells trainers the model is video).
      resolution: the training frame size (documentation and dummy inputs only).
      norm_groups: GroupNorm groups.
      down_mode: ``"avgpool"`` (MAGVIT v1) or ``"conv"`` (strided 3x3x3 convs).
      dtype, param_dtype: compute and storage dtypes, passed to every layer.
    """

    quantizer: nn.Module
    in_channels: int = 3
    out_channels: int | None = None
    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    temporal_downsample: Sequence[bool] = (True, True, False)
    causal: bool = False
    first_frame: bool = False
    z_channels: int = 256
    embed_dim: int = 256
    use_quant_conv: bool = False
    num_frames: int = 16
    resolution: int = 128
    norm_groups: int = 32
    down_mode: str = "avgpool"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        where = f"MAGVIT(ch={self.ch}, ch_mult={tuple(self.ch_mult)})"
        if not self.ch_mult:
            raise ValueError("ch_mult is empty; give at least one channel multiplier, e.g. (1, 2, 4).")
        if len(self.temporal_downsample) != len(self.ch_mult) - 1:
            raise ValueError(
                f"temporal_downsample has {len(self.temporal_downsample)} entries but ch_mult={tuple(self.ch_mult)} "
                f"has {len(self.ch_mult) - 1} downsamplings; give one bool per downsampling."
            )
        for mult in self.ch_mult:
            check_groups(self.ch * mult, self.norm_groups, where)
        if self.first_frame and not self.causal:
            raise ValueError("first_frame=True encodes frame 0 alone, which needs causal=True; set causal=True "
                             "or first_frame=False.")
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(
                f"embed_dim={self.embed_dim} differs from z_channels={self.z_channels} but use_quant_conv is "
                "False; set embed_dim equal to z_channels or enable use_quant_conv."
            )
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    temporal_downsample=tuple(bool(t) for t in self.temporal_downsample), causal=self.causal,
                    first_frame=self.first_frame, norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder3D(z_channels=self.z_channels, down_mode=self.down_mode, **arch)
        self.decoder = Decoder3D(out_channels=self.out_channels or self.in_channels, **arch)
        if self.use_quant_conv:
            kw = dict(causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype)
            self.quant_conv = conv3d(self.embed_dim, 1, **kw)
            self.post_quant_conv = conv3d(self.z_channels, 1, **kw)

    @property
    def spatial_factor(self) -> int:
        """Frame size / token-map size."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Clip length / number of token frames."""
        return 2 ** int(sum(bool(t) for t in self.temporal_downsample))

    def token_shape(self, num_frames: int | None = None, size: int | None = None) -> tuple[int, int, int]:
        """Token grid ``(t, h, w)`` of a clip of ``num_frames`` frames of ``size x size`` pixels."""
        t = self.num_frames if num_frames is None else num_frames
        s = self.resolution if size is None else size
        frames = 1 + (t - 1) // self.temporal_factor if self.first_frame else t // self.temporal_factor
        return frames, s // self.spatial_factor, s // self.spatial_factor

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 5 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"MAGVIT expects video [B, T, H, W, {self.in_channels}] in [-1, 1], got shape {tuple(x.shape)}; "
                "pass channels-last clips or set in_channels."
            )
        ft, fs = self.temporal_factor, self.spatial_factor
        if self.first_frame and (x.shape[1] - 1) % ft:
            raise ValueError(
                f"clip of {x.shape[1]} frames does not fit a first-frame tokenizer with time factor {ft}; use "
                f"1 + k*{ft} frames (1 for an image, {1 + 4 * ft} for {4 * ft} frames after the first)."
            )
        if (not self.first_frame and x.shape[1] % ft) or x.shape[2] % fs or x.shape[3] % fs:
            raise ValueError(
                f"clip of {x.shape[1]} frames of {x.shape[2]}x{x.shape[3]} does not fit the tokenizer's factors "
                f"(time {ft}, space {fs}); use a frame count divisible by {ft} and sizes divisible by {fs}."
            )

    def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
        """Video ``[B, T, H, W, C]`` -> :class:`QuantizerOutput` on ``[B, T/ft, H/fs, W/fs, embed_dim]``."""
        self._check_input(x)
        h = self.encoder(x, train)  # [B, t, h, w, z_channels]
        if self.use_quant_conv:
            h = self.quant_conv(h)  # [B, t, h, w, embed_dim]
        return self.quantizer(h, train=train)

    def decode(self, quantized: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents ``[B, t, h, w, embed_dim]`` -> video ``[B, T, H, W, out_channels]``."""
        h = quantized.astype(self.dtype)
        if self.use_quant_conv:
            h = self.post_quant_conv(h)  # [B, t, h, w, z_channels]
        return self.decoder(h, train)

    def decode_indices(self, indices: Any) -> jax.Array:
        """Code ids ``[B, t, h, w]`` -> video, through ``quantizer.decode_indices``."""
        return self.decode(self.quantizer.decode_indices(indices))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Reconstruction ``[B, T, H, W, out_channels]`` and the quantizer output."""
        out = self.encode(x, train=train)
        return self.decode(out.quantized, train=train), out


# ------------------------------------------------------------------------------------ inflation

def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, dict) or hasattr(tree, "items") and not hasattr(tree, "shape"):
        out: dict[tuple[str, ...], Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def inflate_2d_params(
    params_2d: Any,
    params_3d: Any,
    mode: str = "central",
    causal: bool = False,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Initialises a 3D tokenizer's parameters from a 2D image tokenizer's, matching by name.

    For every leaf of ``params_3d`` (the 3D model's ``params`` collection: initialised arrays,
    or ``jax.ShapeDtypeStruct``s from ``jax.eval_shape``) with the same path in ``params_2d``:

    * same shape (GroupNorm scales/biases, conv biases, the quantizer codebook, 1x1 convs
      between 3D latents that are stored ``[1, 1, 1, Ci, Co]`` in both): copied;
    * 3D shape ``[kt, *2D shape]`` (a ``kh x kw`` conv kernel inflated to ``kt x kh x kw``):
      ``mode="central"`` (MAGVIT's default) puts the 2D kernel at one time tap and zeros at the
      others: the centre tap ``kt // 2`` for a centred conv, the last tap ``kt - 1`` (the current
      frame) when ``causal``. Such a conv applied to any video equals the 2D conv of every frame.
      ``mode="average"`` puts ``kernel / kt`` at every tap: on a video of identical frames it
      equals the 2D conv away from the first/last ``kt // 2`` frames (the zero time padding
      removes taps there; for causal padding, the first ``kt - 1`` frames).

    Cannot be inflated (kept from ``params_3d``, or an error if those are abstract): leaves with
    no same-named 2D leaf (e.g. ``down_*_downsample/conv`` of ``down_mode="conv"``, absent in
    avg-pool 2D models; ``quant_conv`` when only one model has it) and leaves whose shapes do
    not match either rule (a MaskGIT-style 2D ``nin_shortcut`` ``[1, 1, Co, Co]`` applied to
    the block output vs MAGVIT's ``[1, 1, 1, Ci, Co]`` on the block input; different widths).
    2D-only leaves (attention blocks of taming-style models) are unused.

    With abstract ``params_2d`` (``jax.eval_shape`` of the 2D model) nothing is computed: the
    result holds ``ShapeDtypeStruct``s and only ``report`` is of interest (a dry run).

    Both inputs may be boxed (``nn.Partitioned``) or plain; the output is plain (unboxed) and in
    the dtypes of ``params_3d``. Returns ``(params, report)`` with ``report`` listing the paths
    (``"/"``-joined) that were ``"inflated"``, ``"copied"``, ``"kept"`` (not inflatable) and
    ``"unused_2d"``.
    """
    if mode not in ("central", "average"):
        raise ValueError(f"inflation mode {mode!r} is unknown; use 'central' or 'average'.")
    flat_2d = _flatten(nn.meta.unbox(params_2d))
    flat_3d = _flatten(nn.meta.unbox(params_3d))
    report: dict[str, list[str]] = {"inflated": [], "copied": [], "kept": [], "unused_2d": []}
    out: dict[tuple[str, ...], Any] = {}
    abstract_kept = []
    dry_run = any(isinstance(v, jax.ShapeDtypeStruct) for v in flat_2d.values())
    for path, leaf in flat_3d.items():
        name = "/".join(path)
        src = flat_2d.get(path)
        shape3, dtype3 = tuple(leaf.shape), leaf.dtype
        if src is not None and tuple(src.shape) == shape3:
            out[path] = jax.ShapeDtypeStruct(shape3, dtype3) if dry_run else jnp.asarray(src, dtype3)
            report["copied"].append(name)
        elif src is not None and len(shape3) == len(src.shape) + 1 and shape3[1:] == tuple(src.shape):
            kt = shape3[0]
            report["inflated"].append(name)
            if dry_run:
                out[path] = jax.ShapeDtypeStruct(shape3, dtype3)
                continue
            src = jnp.asarray(src, jnp.float32)
            if mode == "central":
                tap = kt - 1 if causal else kt // 2
                val = jnp.zeros(shape3, jnp.float32).at[tap].set(src)
            else:
                val = jnp.broadcast_to(src[None] / kt, shape3)
            out[path] = val.astype(dtype3)
        else:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                abstract_kept.append(name)
            out[path] = leaf
            report["kept"].append(name)
    report["unused_2d"] = ["/".join(p) for p in flat_2d if p not in flat_3d]
    if abstract_kept and not dry_run:
        raise ValueError(
            f"{len(abstract_kept)} 3D parameters have no inflatable 2D counterpart ({abstract_kept[:5]}...); "
            "pass initialised 3D params (model.init) instead of abstract shapes so they keep their init values."
        )
    return _unflatten(out), report


# ------------------------------------------------------------------------------------ variants

def count_params(module: nn.Module, num_frames: int, size: int, channels: int) -> int:
    """Number of parameters (the ``params`` collection) of ``module``, via ``jax.eval_shape``."""
    x = jax.ShapeDtypeStruct((1, num_frames, size, size, channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(variables.get("params", {})))))


# Architecture kwargs of each variant; the quantizer is configured separately (QUANTIZERS).
VARIANTS: dict[str, dict[str, Any]] = {
    # Tiny causal CPU model for moving MNIST: 16x32x32x1 -> 4x8x8 tokens, widths 16/32/64, 1x1x1
    # convs to the 4 FSQ channels (configs/generators/magvit.py:moving_mnist).
    "moving_mnist": dict(in_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, temporal_downsample=(True, True),
                         causal=True, z_channels=32, embed_dim=4, use_quant_conv=True, num_frames=16,
                         resolution=32, norm_groups=8),
    # MAGVIT-B 3D-VQ (google-research/magvit configs/vqgan3d_ucf101_config.py, version 'B'):
    # filters 64, channel_multipliers (1, 2, 2, 4), 2 encoder / 2 decoder res blocks,
    # temporal_downsample (True, True, False), embedding_dim 256, GroupNorm + swish, average-pool
    # down / nearest+conv up, 1024 codes; 16x128x128 -> 4x16x16 tokens. 40,579,843 parameters
    # with its 1024 x 256 codebook (count_params).
    "B": dict(in_channels=3, ch=64, ch_mult=(1, 2, 2, 4), num_res_blocks=2, temporal_downsample=(True, True, False),
              causal=False, z_channels=256, embed_dim=256, use_quant_conv=False, num_frames=16, resolution=128),
    # MAGVIT-L 3D-VQ: the same with filters 128. 157,811,971 parameters with the codebook.
    "L": dict(in_channels=3, ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, temporal_downsample=(True, True, False),
              causal=False, z_channels=256, embed_dim=256, use_quant_conv=False, num_frames=16, resolution=128),
}

# The quantizer of each variant: (class name in vqgen.quantizers, kwargs). MAGVIT's 3D-VQ uses
# 1024 codes, commitment 0.25 and an entropy loss of weight 0.1 at temperature 0.01.
QUANTIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    # FSQ: a learned 256-code VQ collapsed on moving MNIST within the CPU budget (see the config).
    "moving_mnist": ("FiniteScalarQuantizer", dict(levels=(8, 5, 5, 5))),
    "B": ("VectorQuantizer", dict(codebook_size=1024, beta=0.25, entropy_loss_weight=0.1, entropy_temperature=0.01)),
    "L": ("VectorQuantizer", dict(codebook_size=1024, beta=0.25, entropy_loss_weight=0.1, entropy_temperature=0.01)),
}


def build(variant: str, quantizer: nn.Module, **overrides: Any) -> MAGVIT:
    """``MAGVIT(quantizer=quantizer, **VARIANTS[variant] | overrides)`` with a clear error on a bad name."""
    if variant not in VARIANTS:
        raise ValueError(f"MAGVIT variant {variant!r} is unknown; use one of {sorted(VARIANTS)}.")
    return MAGVIT(quantizer=quantizer, **{**VARIANTS[variant], **overrides})
