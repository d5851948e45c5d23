"""Convolutional VQ tokenizers: taming/LlamaGen VQGAN, MaskGIT's VQGAN and an Open-MAGVIT2-style LFQ
tokenizer, with any quantizer of :mod:`vqgen.quantizers` plugged in.

    x [B, H, W, C] -> Encoder -> quant_conv (1x1) -> quantizer -> post_quant_conv (1x1) -> Decoder

``VQGAN(quantizer=VectorQuantizer(codebook_size=16384, l2_normalize=True), **VARIANTS["llamagen_vq16"])``
builds LlamaGen's VQ-16. The ``style`` field selects the block structure of each family:

``"taming"`` (taming-transformers / LlamaGen ``tokenizer_image/vq_model.py``)
  Encoder: ``conv_in`` 3x3 -> per level ``num_res_blocks`` ResnetBlocks (each followed by an
  AttnBlock where the level's resolution is in ``attn_resolutions``) -> Downsample (zero pad
  (0, 1), 3x3 stride-2 conv) on all but the last level -> mid (ResnetBlock, AttnBlock,
  ResnetBlock) -> GroupNorm, swish, 3x3 ``conv_out`` to ``z_channels``. Decoder mirrors it with
  ``num_res_blocks + 1`` blocks per level and nearest x2 + 3x3 conv upsampling. All convs have
  biases; ResnetBlocks use a 1x1 ``nin_shortcut`` when channels change; dropout before the
  second conv of each block. ``quant_conv``/``post_quant_conv`` are 1x1 convs between
  ``z_channels`` and ``embed_dim``.
``"maskgit"`` (google-research/maskgit ``nets/vqgan_tokenizer.py``, config ``vqgan_config``)
  No attention anywhere; the 3x3 convs of the blocks and the encoder's first conv have no bias;
  the mid stage is ``num_res_blocks`` ResnetBlocks (encoder and decoder); the decoder has
  ``num_res_blocks`` (not +1) blocks per level; downsampling is a parameter-free TF-style 2x2
  average pool; upsampling is nearest x2 + 3x3 conv; the encoder ends with a 1x1 conv straight
  to the codebook dim (so ``use_quant_conv=False`` and ``embed_dim == z_channels``). MaskGIT's
  ResBlock applies its channel-changing 1x1 shortcut to the output of the residual branch, not
  to the block input; ``ResnetBlock(shortcut_from_output=True)`` reproduces this.
``"magvit2"`` (TencentARC/Open-MAGVIT2 ``modules/diffusionmodules/improved_model.py``)
  Like ``"maskgit"`` (no attention, bias-free block convs, ``num_res_blocks`` mid blocks, 1x1
  encoder output to the LFQ dim, no quant convs) but with a correct input shortcut,
  downsampling by a 3x3 stride-2 conv with padding 1, upsampling by a 3x3 conv to 4C channels
  and depth-to-space, and an adaptive GroupNorm (modulated by the decoder input) at the start
  of every decoder level.

Deviations from the official models, all of names or numerics, none of structure:
  * Parameter names follow taming's layout flattened into Flax scopes
    (``encoder/down_{i}_block_{j}/conv1/kernel``, ``decoder/up_{i}_attn_{j}/q``,
    ``decoder/mid_block_1``, ``mid_attn_1``, ``mid_block_2``, ``norm_out``, ``conv_out``), with
    ``i`` the resolution level counted from the full-resolution end in both encoder and
    decoder. LlamaGen's ``conv_blocks.{k}`` are ``down_{k}`` in its encoder and ``up_{L-1-k}`` in
    its decoder, and its ``mid.0/1/2`` are ``mid_block_1/mid_attn_1/mid_block_2``; MaskGIT's
    auto-named ``Conv_n``/``ResBlock_n`` map in creation order. Kernels are HWIO (PyTorch OIHW
    needs a transpose). These mappings are the converters' job (``vqgen/convert``).
  * MaskGIT's encoder/decoder halves are separate modules there too, but MaskGIT has no
    ``quant_conv``; Open-MAGVIT2 has none either. LlamaGen's quantizer stores its codebook
    un-normalised and l2-normalises on use, as does ``VectorQuantizer(l2_normalize=True)``.
  * GroupNorm statistics are float32 whatever the compute dtype; attention softmax is float32.
  * Conv kernels start from PyTorch's default U(+-1/sqrt(fan_in)); biases start at zero (PyTorch draws
    them from the same uniform).
  * ``resolution`` only decides where attention goes (as in taming); inputs of other sizes work.

Parameter counts (``count_params`` at 256x256, quantizer included; the first two equal hand
counts from the official code in ``tests/test_vqgan.py``): ``llamagen_vq16`` 71,883,403 (LlamaGen
reports 72M), ``maskgit`` 54,515,587, ``open_magvit2`` 115,127,829 (LFQ has no parameters).
``quickstart`` has 192,977 with a 512 x 8 codebook; one forward+backward of a batch of 32
32x32x1 images is 4.3 GFLOP.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.modules.conv import (
    AdaptiveGroupNorm,
    AttnBlock,
    Downsample,
    ResnetBlock,
    Upsample,
    check_groups,
    conv,
    group_norm,
    swish,
)
from vqgen.quantizers.base import QuantizerOutput

Dtype = Any

# Per-style structural switches (see the module docstring).
_STYLES: dict[str, dict[str, Any]] = {
    "taming": dict(block_bias=True, enc_conv_in_bias=True, shortcut_from_output=False, down="conv_asym",
                   up="nearest_conv", mid_attention=True, dec_extra_block=1, enc_out_kernel=3, adaptive_norm=False),
    "maskgit": dict(block_bias=False, enc_conv_in_bias=False, shortcut_from_output=True, down="avgpool",
                    up="nearest_conv", mid_attention=False, dec_extra_block=0, enc_out_kernel=1, adaptive_norm=False),
    "magvit2": dict(block_bias=False, enc_conv_in_bias=False, shortcut_from_output=False, down="conv",
                    up="depth_to_space", mid_attention=False, dec_extra_block=0, enc_out_kernel=1, adaptive_norm=True),
}

LAST_LAYER: tuple[str, ...] = ("decoder", "conv_out", "kernel")
"""Parameter path of the decoder's last conv kernel (VQGAN's adaptive GAN weight uses it)."""

ACTIVATION_AXES = ("batch", "height", "width", None)


def _style(style: str) -> dict[str, Any]:
    if style not in _STYLES:
        raise ValueError(f"tokenizer style {style!r} is unknown; use one of {sorted(_STYLES)}.")
    return _STYLES[style]


class Encoder(nn.Module):
    """Image -> latent map ``[B, H / 2**(L-1), W / 2**(L-1), z_channels]`` (``L = len(ch_mult)``)."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    z_channels: int = 256
    dropout: float = 0.0
    style: str = "taming"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = _style(self.style)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(dropout=self.dropout, use_bias=s["block_bias"], shortcut_from_output=s["shortcut_from_output"],
                        norm_groups=self.norm_groups, **kw)
        num_levels = len(self.ch_mult)
        h = conv(self.ch, 3, use_bias=s["enc_conv_in_bias"], name="conv_in", **kw)(x.astype(self.dtype))  # [B, H, W, ch]
        for i, mult in enumerate(self.ch_mult):
            res = self.resolution // 2**i
            for j in range(self.num_res_blocks):
                h = ResnetBlock(self.ch * mult, name=f"down_{i}_block_{j}", **block_kw)(h, train)  # [B, h, w, ch*mult]
                if res in self.attn_resolutions:
                    h = AttnBlock(self.norm_groups, name=f"down_{i}_attn_{j}", **kw)(h)
            if i != num_levels - 1:
                h = Downsample(s["down"], name=f"down_{i}_downsample", **kw)(h)  # [B, h/2, w/2, C]
        h = _mid(h, self.num_res_blocks, s, block_kw, self.norm_groups, kw, train)
        h = swish(group_norm(num_groups=self.norm_groups, name="norm_out", **kw)(h))
        h = conv(self.z_channels, s["enc_out_kernel"], name="conv_out", **kw)(h)  # [B, h, w, z_channels]
        return nn.with_logical_constraint(h, ACTIVATION_AXES)


def _mid(h, num_res_blocks, s, block_kw, norm_groups, kw, train):
    """Taming mid stage (res, attn, res) or ``num_res_blocks`` plain ResnetBlocks."""
    c = h.shape[-1]
    if s["mid_attention"]:
        h = ResnetBlock(c, name="mid_block_1", **block_kw)(h, train)
        h = AttnBlock(norm_groups, name="mid_attn_1", **kw)(h)
        return ResnetBlock(c, name="mid_block_2", **block_kw)(h, train)
    for k in range(num_res_blocks):
        h = ResnetBlock(c, name=f"mid_block_{k + 1}", **block_kw)(h, train)
    return h


class Decoder(nn.Module):
    """Latent map ``[B, h, w, z_channels]`` -> image ``[B, h * 2**(L-1), w * 2**(L-1), out_channels]``."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    out_channels: int = 3
    dropout: float = 0.0
    style: str = "taming"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        s = _style(self.style)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(dropout=self.dropout, use_bias=s["block_bias"], shortcut_from_output=s["shortcut_from_output"],
                        norm_groups=self.norm_groups, **kw)
        z = nn.with_logical_constraint(z.astype(self.dtype), ACTIVATION_AXES)
        num_levels = len(self.ch_mult)
        h = conv(self.ch * self.ch_mult[-1], 3, name="conv_in", **kw)(z)  # [B, h, w, C_top]
        h = _mid(h, self.num_res_blocks, s, block_kw, self.norm_groups, kw, train)
        for i in reversed(range(num_levels)):
            res = self.resolution // 2**i
            if s["adaptive_norm"]:
                h = AdaptiveGroupNorm(self.norm_groups, name=f"up_{i}_adaptive", **kw)(h, z)
            for j in range(self.num_res_blocks + s["dec_extra_block"]):
                h = ResnetBlock(self.ch * self.ch_mult[i], name=f"up_{i}_block_{j}", **block_kw)(h, train)
                if res in self.attn_resolutions:
                    h = AttnBlock(self.norm_groups, name=f"up_{i}_attn_{j}", **kw)(h)
            if i != 0:
                h = Upsample(s["up"], name=f"up_{i}_upsample", **kw)(h)  # [B, 2h, 2w, C]
        h = swish(group_norm(num_groups=self.norm_groups, name="norm_out", **kw)(h))
        return conv(self.out_channels, 3, name="conv_out", **kw)(h)  # [B, H, W, out_channels]


class VQGAN(nn.Module):
    """Conv encoder, quantizer, conv decoder: the tokenizer contract of DESIGN.md §3.

    Attributes:
      quantizer: an unbound quantizer module of :mod:`vqgen.quantizers` (any of them); it is
        called on ``[B, h, w, embed_dim]`` latents with ``train=...`` and must provide
        ``decode_indices``. Its parameters live under ``params/quantizer``.
      in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
      ch, ch_mult: base width and per-level multipliers; ``len(ch_mult) - 1`` halvings.
      num_res_blocks: ResnetBlocks per level (the decoder has one more in the taming style).
      attn_resolutions: feature-map sizes (computed from ``resolution``) that get AttnBlocks.
      resolution: the training image size, used only to place attention.
      z_channels: encoder output / decoder input channels.
      embed_dim: quantizer input channels (``quant_conv`` maps ``z_channels -> embed_dim``).
      dropout: ResnetBlock dropout rate (needs a ``'dropout'`` rng when ``train`` and > 0).
      style: ``"taming"``, ``"maskgit"`` or ``"magvit2"``; see the module docstring.
      use_quant_conv: whether ``quant_conv``/``post_quant_conv`` exist; without them
        ``embed_dim`` must equal ``z_channels``.
      quant_conv_kernel: their kernel size, 1 (taming, LlamaGen) or 3 (VAR's VQ-VAE, "same" padding).
      pixel_range: the image range the network itself reads and writes: ``"symmetric"`` [-1, 1]
        (vqgen's images), or ``"unit"`` [0, 1] (MaskGIT's released tokenizer): then ``encode``
        feeds it ``(x + 1) / 2`` and ``decode`` returns ``2 y - 1``, so the module still maps
        vqgen's [-1, 1] images.
      norm_groups: GroupNorm groups (32 in every official model).
      dtype, param_dtype: compute and storage dtypes, passed to every layer.
    """

    quantizer: nn.Module
    in_channels: int = 3
    out_channels: int | None = None
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    z_channels: int = 256
    embed_dim: int = 8
    dropout: float = 0.0
    style: str = "taming"
    use_quant_conv: bool = True
    quant_conv_kernel: int = 1
    pixel_range: str = "symmetric"
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        _style(self.style)
        if self.pixel_range not in ("symmetric", "unit"):
            raise ValueError(f"pixel_range={self.pixel_range!r} is unknown; use 'symmetric' ([-1, 1]) or 'unit' ([0, 1]).")
        if not self.ch_mult:
            raise ValueError("ch_mult is empty; give at least one channel multiplier, e.g. (1, 2, 2).")
        for mult in self.ch_mult:
            check_groups(self.ch * mult, self.norm_groups, f"VQGAN(ch={self.ch}, ch_mult={tuple(self.ch_mult)})")
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(
                f"embed_dim={self.embed_dim} differs from z_channels={self.z_channels} but use_quant_conv is "
                "False; set embed_dim equal to z_channels or enable use_quant_conv."
            )
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution, dropout=self.dropout,
                    style=self.style, norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(z_channels=self.z_channels, **arch)
        self.decoder = Decoder(out_channels=self.out_channels or self.in_channels, **arch)
        if self.use_quant_conv:
            k = self.quant_conv_kernel
            self.quant_conv = conv(self.embed_dim, k, dtype=self.dtype, param_dtype=self.param_dtype)
            self.post_quant_conv = conv(self.z_channels, k, dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def downsample_factor(self) -> int:
        """Image size / token-map size."""
        return 2 ** (len(self.ch_mult) - 1)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"VQGAN expects images [B, H, W, {self.in_channels}] in [-1, 1], got shape {tuple(x.shape)}; "
                "pass channels-last images or set in_channels."
            )
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the downsampling factor {f} "
                f"(ch_mult={tuple(self.ch_mult)}); resize or crop the images to a multiple of {f}."
            )

    def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
        """Images ``[B, H, W, C]`` -> :class:`QuantizerOutput` on ``[B, H/f, W/f, embed_dim]``."""
        self._check_input(x)
        if self.pixel_range == "unit":
            x = (x + 1.0) * 0.5  # [-1, 1] -> [0, 1], the range the network was trained on
        h = self.encoder(x, train)  # [B, h, w, z_channels]
        if self.use_quant_conv:
            h = self.quant_conv(h)  # [B, h, w, embed_dim]
        return self.quantizer(h, train=train)

    def decode(self, quantized: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents ``[B, h, w, embed_dim]`` -> images ``[B, h*f, w*f, out_channels]``."""
        h = quantized.astype(self.dtype)
        if self.use_quant_conv:
            h = self.post_quant_conv(h)  # [B, h, w, z_channels]
        y = self.decoder(h, train)
        return y * 2.0 - 1.0 if self.pixel_range == "unit" else y

    def decode_indices(self, indices: Any) -> jax.Array:
        """Code ids (``[B, h, w]`` for a flat codebook) -> images, through ``quantizer.decode_indices``."""
        return self.decode(self.quantizer.decode_indices(indices))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Reconstruction ``[B, H, W, out_channels]`` and the quantizer output."""
        out = self.encode(x, train=train)
        return self.decode(out.quantized, train=train), out


def last_layer_kernel(params: Any) -> jax.Array:
    """The decoder's last conv kernel (``LAST_LAYER``) from ``params`` or ``{"params": params}``."""
    tree = params["params"] if "params" in params and "decoder" not in params else params
    for key in LAST_LAYER:
        tree = tree[key]
    return nn.meta.unbox(tree)


def count_params(module: nn.Module, image_size: int, channels: int) -> int:
    """Number of parameters (the ``params`` collection) of ``module``, via ``jax.eval_shape``."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(variables.get("params", {})))))


# Architecture kwargs of each variant (the quantizer is configured separately; QUANTIZERS below
# names the official one). Token grid = image size / 2**(len(ch_mult) - 1).
VARIANTS: dict[str, dict[str, Any]] = {
    # MaskGIT ImageNet VQGAN (vqgan_config.py: filters 128, multipliers (1,1,2,2,4), 2 res blocks,
    # embedding_dim 256, 1024 codes, GroupNorm, swish, avg-pool downsampling): 256px -> 16x16.
    # Its released weights read and write images in [0, 1] (pixel_range="unit").
    "maskgit": dict(in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(),
                    resolution=256, z_channels=256, embed_dim=256, style="maskgit", use_quant_conv=False,
                    pixel_range="unit"),
    # LlamaGen VQ-16 (ModelArgs + Encoder/Decoder defaults): attention only at the lowest level
    # (16x16 for 256px) and in the mid stage; 16384 codes of dim 8, l2-normalised.
    "llamagen_vq16": dict(in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                          resolution=256, z_channels=256, embed_dim=8, dropout=0.0, style="taming",
                          use_quant_conv=True),
    # Open-MAGVIT2 (imagenet_lfqgan_256_L.yaml): ch 128, (1,1,2,2,4), 4 res blocks, 18-bit LFQ.
    "open_magvit2": dict(in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4, attn_resolutions=(),
                         resolution=256, z_channels=18, embed_dim=18, style="magvit2", use_quant_conv=False),
    # Tiny CPU tokenizer for 32x32x1 MNIST: 8x8 tokens, widths 8/16/32, GroupNorm with 8 groups,
    # mid attention at 8x8; ~4.3 GFLOP per forward+backward of a batch of 32.
    "quickstart": dict(in_channels=1, ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, attn_resolutions=(),
                       resolution=32, z_channels=32, embed_dim=8, style="taming", use_quant_conv=True, norm_groups=8),
}

# The quantizer each official variant ships with: (class name in vqgen.quantizers, kwargs).
QUANTIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "maskgit": ("VectorQuantizer", dict(codebook_size=1024, beta=0.25, entropy_loss_weight=0.1)),
    "llamagen_vq16": ("VectorQuantizer", dict(codebook_size=16384, l2_normalize=True, beta=0.25)),
    # num_groups=2 keeps the 2**18 codebook entropy in bounded memory (DESIGN.md §3, LFQ).
    "open_magvit2": ("LookupFreeQuantizer", dict(dim=18, entropy_loss_weight=0.1, commitment_weight=0.25,
                                                 codebook_entropy_weight=1.0, num_groups=2)),
    "quickstart": ("VectorQuantizer", dict(codebook_size=256, l2_normalize=True, beta=0.25)),
}


def build(variant: str, quantizer: nn.Module, **overrides: Any) -> VQGAN:
    """``VQGAN(quantizer=quantizer, **VARIANTS[variant] | overrides)`` with a clear error on a bad name."""
    if variant not in VARIANTS:
        raise ValueError(f"tokenizer variant {variant!r} is unknown; use one of {sorted(VARIANTS)}.")
    return VQGAN(quantizer=quantizer, **{**VARIANTS[variant], **overrides})
