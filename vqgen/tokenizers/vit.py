"""Transformer tokenizers: ViT-VQGAN (a 2D grid of patch tokens) and TiTok (a 1D sequence of
latent tokens), with any quantizer of :mod:`vqgen.quantizers` plugged in.

Both are built from one pre-norm ViT block (``ViTBlock``: ``x + attn(ln_1(x))``, then
``x + mlp(ln_2(x))``; multi-head attention with biased q/k/v/out projections, a GELU MLP with
biases, LayerNorm with eps 1e-5), the block of OpenCLIP / TiTok's ``ResidualAttentionBlock``.

ViT-VQGAN (Yu et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN")
  ``x [B, H, W, C]`` -> ``patch_embed`` (p x p conv, stride p) -> + learned positions ->
  ``enc_depth`` blocks -> ``ln_post`` -> ``ffn`` (Dense D -> mlp, tanh, Dense mlp -> D) ->
  ``[B, H/p, W/p, D]`` -> quantizer -> ``decoder_embed`` (Dense to the decoder width) -> + learned
  positions -> ``dec_depth`` blocks -> ``ln_post`` -> ``ffn`` (Dense D -> mlp, tanh) ->
  ``conv_out`` (Dense mlp -> p*p*C, i.e. a 1x1 conv on the token grid) -> pixels.
  From the paper: 8x8 patches of 256x256 images (32x32 = 1024 tokens); the encoder/decoder sizes
  of its Table 1 (Small: 8 blocks, 8 heads, width 512, MLP 2048; Base: 12, 12, 768, 3072; Large:
  32, 16, 1280, 5120), combined as ``SS``, ``BB`` and ``SL`` (encoder size, decoder size); a
  two-layer feed-forward network with a tanh in the middle after the blocks of both stacks and
  no activation at either output; codes factorised into a 32-dim, l2-normalised lookup space
  with 8192 entries. The quantizer is ``VectorQuantizer(codebook_size=8192, code_dim=32,
  l2_normalize=True)``: its ``proj_down`` / ``proj_up`` are the factorisation.
  Our choices where the paper is silent or no code was released: learned absolute position
  embeddings, GELU in the blocks, LayerNorm before the output feed-forward network, its hidden
  width equal to the blocks' MLP width, the decoder's linear input projection (``decoder_embed``,
  needed when the two widths differ), truncated-normal(0.02) initialisation.

TiTok (Yu et al. 2024, "An Image is Worth 32 Tokens for Reconstruction and Generation"; official
code bytedance/1d-tokenizer ``modeling/titok.py``, ``modeling/modules/blocks.py``)
  Encoder: ``patch_embed`` (p x p conv, stride p) -> ``[class_embedding; patches] +
  positional_embedding`` followed by ``num_latent_tokens`` learned ``latent_tokens`` (top-level
  parameter) ``+ latent_token_positional_embedding`` -> ``ln_pre`` -> blocks -> the latent
  positions only -> ``ln_post`` -> ``conv_out`` (1x1, width -> ``token_size``) -> ``[B, N,
  token_size]`` -> quantizer (TiTok: 4096 codes of dim 12, l2-normalised; indices ``[B, N]``).
  Decoder: ``decoder_embed`` (Dense token_size -> width) ``+ latent_token_positional_embedding``
  appended after ``[class_embedding; mask_token x (H/p)(W/p)] + positional_embedding`` ->
  ``ln_pre`` -> blocks -> the mask-token positions -> ``ln_post`` -> a head on the ``H/p x W/p``
  grid. Sizes (``TITOK_SIZES``): small 512/8 blocks/8 heads, base 768/12/12, large 1024/24/16,
  MLP ratio 4, patch 16 for 256px images.
  ``decoder_head="pixels"`` (the single-stage recipe; the official ``is_legacy=False``):
  ``ffn_0`` (1x1 conv, width -> p*p*C), depth-to-space, ``conv_out`` (3x3 conv C -> C).
  ``decoder_head="proxy_codes"`` (the two-stage recipe; the released TiTok-L-32/B-64/S-128):
  ``ffn_0`` (1x1, width -> 2 width), tanh, ``ffn_2`` (1x1, -> 1024) gives logits over the codes of
  MaskGIT's VQGAN at every patch; ``softmax(logits) @ pixel_codebook`` ``[1024, 256]`` goes
  through ``pixel_decoder``, MaskGIT's VQGAN decoder (``vqgan.Decoder`` in the ``"maskgit"``
  style, 128 filters, multipliers (1, 1, 2, 2, 4), 2 res blocks), to pixels. Stage 1 of that
  recipe trains encoder, quantizer and ``ffn_2``'s logits by cross-entropy against the frozen
  MaskGIT VQGAN's codes of the image (:meth:`TiTok.proxy_logits` gives the logits); stage 2
  (the official ``finetune_decoder``) freezes encoder, latent tokens and quantizer
  (``freeze_encoder=True``: their outputs are stop-gradient and the quantizer loss is zero) and
  trains the rest on pixels with L2, perceptual and GAN losses.
  ``legacy_token_layout=True`` reproduces the released models' encoder output: the official
  code reshapes the ``[B, N, width]`` latents to ``[B, width, N, 1]`` in memory order (not a
  transpose) before ``conv_out``; checkpoints trained that way need the same reshape.
  ``pixel_range="unit"`` reproduces the released models' image range: the official code reads
  and writes images in [0, 1] (its demo divides uint8 images by 255 and clamps the
  reconstruction to [0, 1]); the network then sees ``(x + 1) / 2`` of vqgen's [-1, 1] images and
  its output ``y`` is returned as ``2 y - 1``, so the tokenizer still maps [-1, 1] to [-1, 1].
  ``pixel_decoder_ch``, ``pixel_decoder_ch_mult`` and ``pixel_decoder_num_res_blocks`` size the
  MaskGIT VQGAN decoder under ``proxy_codes`` (the official 128, (1, 1, 2, 2, 4), 2 by default;
  other sizes serve small converted or test models).

Deviations from the official TiTok, none of structure: attention q/k/v are three Dense layers
(PyTorch's ``nn.MultiheadAttention`` keeps one ``in_proj_weight`` ``[3D, D]``: split its rows);
every kernel starts from truncated-normal(0.02) (the official code leaves ``in_proj_weight`` at
PyTorch's Xavier-uniform); the codebook starts from the quantizer's own initialiser (the official
one is uniform(+-1/K); with l2-normalised codes only directions matter); softmax and LayerNorm
statistics are float32 whatever the compute dtype. The official single-stage VQ models re-seed
unused codes by their "clustering VQ"; here ``dead_code_threshold`` of the quantizer does that
job differently (restart from batch vectors).

Parameter counts (``count_params``, quantizer included, 256x256x3):
  * TiTok two-stage (released) models, equal to the official modules' counts (built on the torch
    meta device): ``L-32`` 641,054,735, ``B-64`` 204,814,095, ``S-128`` 83,674,639 (each with
    the 30,478,339-parameter MaskGIT pixel decoder and its 1024 x 256 codebook). Single-stage ``BL-64-VQ`` (base encoder, large decoder, 64 tokens of an
    8192 x 64 codebook): 390,016,148, as the official ``titok_bl64_vq8k`` configuration.
  * ViT-VQGAN (our structure on the paper's sizes, 8192 x 32 codes): ``SS`` 55,689,440, ``BB``
    180,410,592, ``SL`` 667,428,320; encoder 27,942,912 (Small) / 90,713,088 (Base), decoder
    27,451,072 / 89,385,408 / 639,189,952 (Small / Base / Large), quantizer 295,456 at width 512.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgen import quantizers
from vqgen.quantizers.base import QuantizerOutput
from vqgen.tokenizers.vqgan import Decoder as ConvDecoder

Dtype = Any

INIT_STD = 0.02
LAYERNORM_EPS = 1e-5
ACTIVATION_AXES = ("batch", "length", "embed")

LAST_LAYER: tuple[str, ...] = ("decoder", "conv_out", "kernel")
"""Parameter path of the decoder's last layer for ViT-VQGAN and TiTok with ``decoder_head="pixels"``
(the same path as the conv VQGAN, which the tokenizer trainer's adaptive GAN weight reads)."""

# Transformer sizes of each paper: width, depth, heads, MLP width.
VITVQGAN_SIZES: dict[str, dict[str, int]] = {  # ViT-VQGAN Table 1
    "S": dict(width=512, depth=8, heads=8, mlp_dim=2048),
    "B": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "L": dict(width=1280, depth=32, heads=16, mlp_dim=5120),
}
TITOK_SIZES: dict[str, dict[str, int]] = {  # TiTokEncoder / TiTokDecoder
    "small": dict(width=512, depth=8, heads=8, mlp_dim=2048),
    "base": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, heads=16, mlp_dim=4096),
}

# MaskGIT's VQGAN decoder under TiTok's proxy codes (the official ``Pixel_Decoder`` config).
PIXEL_DECODER = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(), resolution=256,
                     style="maskgit", norm_groups=32)


def truncated_normal(stddev: float = INIT_STD):
    """Standard normal truncated to [-2, 2] times ``stddev`` (TiTok's ``trunc_normal_(std=0.02)``)."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * stddev).astype(dtype)

    return init


def _dense(features: int, axes: tuple[str | None, str | None], name: str, dtype: Dtype, param_dtype: Dtype,
           use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(truncated_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
    )


def _layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LAYERNORM_EPS, dtype=dtype, param_dtype=param_dtype, name=name, use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )


def _patch_embed(width: int, patch: int, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
    return nn.Conv(
        width, (patch, patch), strides=(patch, patch), padding="VALID", dtype=dtype, param_dtype=param_dtype,
        name="patch_embed",
        kernel_init=nn.with_logical_partitioning(truncated_normal(), ("height", "width", "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )


def _embedding(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> jax.Array:
    """A free parameter drawn as ``width**-0.5 * N(0, 1)`` (TiTok's class/position/latent embeddings)."""
    scale = shape[-1] ** -0.5

    def init(key, shape, dtype=jnp.float32):
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.param_dtype)


def depth_to_space(x: jax.Array, patch: int, channels: int) -> jax.Array:
    """``[B, h, w, p*p*C]`` (channel index ``(i*p + j)*C + c``) -> ``[B, h*p, w*p, C]``."""
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)  # [B, h, p, w, p, C]
    return x.reshape(b, h * patch, w * patch, channels)


class SelfAttention(nn.Module):
    """Full multi-head self-attention with biased q/k/v/out projections; float32 softmax."""

    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        if d % self.num_heads:
            raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}; pick heads that divide it.")
        hd = d // self.num_heads

        def proj(name):
            return _dense(d, ("embed", "heads"), name, self.dtype, self.param_dtype)(x).reshape(b, n, self.num_heads, hd)

        q, k, v = proj("q"), proj("k"), proj("v")  # [B, N, H, hd]
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * hd**-0.5  # [B, H, N, N]
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d)  # [B, N, D]
        return _dense(d, ("heads", "embed"), "out", self.dtype, self.param_dtype)(out)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` (GELU MLP)."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x.shape[-1]
        x = x + SelfAttention(self.num_heads, name="attn", **kw)(_layer_norm("ln_1", **kw)(x))  # [B, N, D]
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)
        h = _dense(self.mlp_dim, ("embed", "mlp"), "c_fc", **kw)(_layer_norm("ln_2", **kw)(x))  # [B, N, F]
        h = nn.gelu(h, approximate=False)
        x = x + _dense(d, ("mlp", "embed"), "c_proj", **kw)(h)  # [B, N, D]
        return nn.with_logical_constraint(x, ACTIVATION_AXES)


def _blocks(x: jax.Array, depth: int, heads: int, mlp_dim: int, kw: dict) -> jax.Array:
    for i in range(depth):
        x = ViTBlock(heads, mlp_dim, name=f"transformer_{i}", **kw)(x)
    return x


def _check_image(name: str, x: jax.Array, channels: int, size: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{name} expects images [B, H, W, {channels}] in [-1, 1], got shape {tuple(x.shape)}; "
                         "pass channels-last images or set in_channels.")
    if x.shape[1] != size or x.shape[2] != size:
        raise ValueError(f"{name} was built for {size}x{size} images (image_size={size}; its position embeddings "
                         f"have that grid), got {x.shape[1]}x{x.shape[2]}; resize the images or set "
                         f"image_size={x.shape[1]} and train a new model.")


def _check_patch(name: str, image_size: int, patch_size: int) -> None:
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"{name}: image_size={image_size} is not divisible by patch_size={patch_size}; choose a "
                         "patch size that divides the image size.")


# ---------------------------------------------------------------------------------- ViT-VQGAN


class ViTEncoder(nn.Module):
    """Images ``[B, H, W, C]`` -> latent grid ``[B, H/p, W/p, width]`` (ViT-VQGAN's encoder)."""

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _patch_embed(self.width, self.patch_size, **kw)(x.astype(self.dtype))  # [B, h, w, D]
        b, gh, gw, d = h.shape
        h = h.reshape(b, gh * gw, d) + _embedding(self, "positional_embedding", (gh * gw, d), (None, "embed"))
        h = nn.with_logical_constraint(h.astype(self.dtype), ACTIVATION_AXES)  # [B, L, D]
        h = _blocks(h, self.depth, self.num_heads, self.mlp_dim, kw)
        h = _layer_norm("ln_post", **kw)(h)
        h = jnp.tanh(_dense(self.mlp_dim, ("embed", "mlp"), "ffn", **kw)(h))  # [B, L, F]
        h = _dense(d, ("mlp", "embed"), "ffn_out", **kw)(h)  # [B, L, D]
        return h.reshape(b, gh, gw, d)


class ViTDecoder(nn.Module):
    """Quantized grid ``[B, h, w, E]`` -> images ``[B, h*p, w*p, out_channels]`` (ViT-VQGAN's decoder)."""

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    out_channels: int = 3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, gh, gw, e = z.shape
        h = _dense(self.width, (None, "embed"), "decoder_embed", **kw)(z.reshape(b, gh * gw, e).astype(self.dtype))
        h = h + _embedding(self, "positional_embedding", (gh * gw, self.width), (None, "embed"))
        h = nn.with_logical_constraint(h.astype(self.dtype), ACTIVATION_AXES)  # [B, L, D]
        h = _blocks(h, self.depth, self.num_heads, self.mlp_dim, kw)
        h = _layer_norm("ln_post", **kw)(h)
        h = jnp.tanh(_dense(self.mlp_dim, ("embed", "mlp"), "ffn", **kw)(h))  # [B, L, F]
        p, c = self.patch_size, self.out_channels
        h = _dense(p * p * c, ("mlp", None), "conv_out", **kw)(h)  # [B, L, p*p*C]
        return depth_to_space(h.reshape(b, gh, gw, p * p * c), p, c)  # [B, H, W, C]


class ViTVQGAN(nn.Module):
    """ViT encoder, quantizer, ViT decoder over a grid of patch tokens (DESIGN.md §3 contract).

    Attributes:
      quantizer: an unbound quantizer (ViT-VQGAN's: ``VectorQuantizer(codebook_size=8192,
        code_dim=32, l2_normalize=True)``), called on ``[B, H/p, W/p, enc_width]`` latents; its
        parameters live under ``params/quantizer``. Indices are ``[B, H/p, W/p]``.
      in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
      image_size: the (square) image size the position embeddings are built for.
      patch_size: pixels per token side (8 in the paper: 256px -> 32x32 tokens).
      enc_width, enc_depth, enc_heads, enc_mlp_dim: encoder transformer (``VITVQGAN_SIZES``).
      dec_width, dec_depth, dec_heads, dec_mlp_dim: decoder transformer.
      dtype, param_dtype: compute and storage dtypes, passed to every layer.
    """

    quantizer: nn.Module
    in_channels: int = 3
    out_channels: int | None = None
    image_size: int = 256
    patch_size: int = 8
    enc_width: int = 512
    enc_depth: int = 8
    enc_heads: int = 8
    enc_mlp_dim: int = 2048
    dec_width: int = 512
    dec_depth: int = 8
    dec_heads: int = 8
    dec_mlp_dim: int = 2048
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        _check_patch("ViTVQGAN", self.image_size, self.patch_size)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = ViTEncoder(self.patch_size, self.enc_width, self.enc_depth, self.enc_heads, self.enc_mlp_dim, **kw)
        self.decoder = ViTDecoder(self.patch_size, self.dec_width, self.dec_depth, self.dec_heads, self.dec_mlp_dim,
                                  self.out_channels or self.in_channels, **kw)

    @property
    def last_layer(self) -> tuple[str, ...]:
        """Parameter path of the decoder's last layer (for the adaptive GAN weight)."""
        return LAST_LAYER

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(H/p, W/p)``."""
        return (self.image_size // self.patch_size,) * 2

    def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
        """Images ``[B, H, W, C]`` -> :class:`QuantizerOutput` on ``[B, H/p, W/p, enc_width]``."""
        _check_image("ViTVQGAN", x, self.in_channels, self.image_size)
        return self.quantizer(self.encoder(x), train=train)

    def decode(self, quantized: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents ``[B, H/p, W/p, E]`` -> images ``[B, H, W, out_channels]``."""
        if tuple(quantized.shape[1:3]) != self.grid:
            raise ValueError(f"ViTVQGAN's decoder was built for a {self.grid[0]}x{self.grid[1]} token grid, got "
                             f"latents of shape {tuple(quantized.shape)}; decode tokens of this tokenizer's grid.")
        return self.decoder(quantized)

    def decode_indices(self, indices: Any) -> jax.Array:
        """Code ids ``[B, H/p, W/p]`` -> images, through ``quantizer.decode_indices``."""
        return self.decode(self.quantizer.decode_indices(indices))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Reconstruction ``[B, H, W, out_channels]`` and the quantizer output."""
        out = self.encode(x, train=train)
        return self.decode(out.quantized, train=train), out


# -------------------------------------------------------------------------------------- TiTok


class TiTokEncoder(nn.Module):
    """Images ``[B, H, W, C]`` and latent tokens ``[N, width]`` -> latents ``[B, N, token_size]``."""

    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    token_size: int
    legacy_token_layout: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latent_tokens: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, n = self.width, latent_tokens.shape[0]
        h = _patch_embed(d, self.patch_size, **kw)(x.astype(self.dtype))  # [B, g, g, D]
        b, gh, gw, _ = h.shape
        h = h.reshape(b, gh * gw, d)
        cls = _embedding(self, "class_embedding", (1, d), (None, "embed"))
        h = jnp.concatenate([jnp.broadcast_to(cls.astype(h.dtype), (b, 1, d)), h], axis=1)  # [B, 1+g², D]
        h = h + _embedding(self, "positional_embedding", (gh * gw + 1, d), (None, "embed")).astype(h.dtype)
        lat = latent_tokens + _embedding(self, "latent_token_positional_embedding", (n, d), (None, "embed"))
        h = jnp.concatenate([h, jnp.broadcast_to(lat.astype(h.dtype), (b, n, d))], axis=1)  # [B, 1+g²+N, D]
        h = nn.with_logical_constraint(_layer_norm("ln_pre", **kw)(h), ACTIVATION_AXES)
        h = _blocks(h, self.depth, self.num_heads, self.mlp_dim, kw)
        h = _layer_norm("ln_post", **kw)(h[:, 1 + gh * gw:])  # [B, N, D]
        if self.legacy_token_layout:  # the released models' [B, N, D] -> [B, D, N, 1] memory reshape
            h = h.reshape(b, d, n).transpose(0, 2, 1)  # [B, N, D]
        return _dense(self.token_size, ("embed", None), "conv_out", **kw)(h)  # [B, N, token_size]


class TiTokDecoder(nn.Module):
    """Latents ``[B, N, token_size]`` -> pixels ``[B, H, W, C]`` (``head="pixels"``) or proxy-code
    logits ``[B, H/p, W/p, proxy_codebook_size]`` (``head="proxy_codes"``)."""

    patch_size: int
    grid: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    head: str = "pixels"
    out_channels: int = 3
    proxy_codebook_size: int = 1024
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, _ = z.shape
        d, g = self.width, self.grid
        x = _dense(d, (None, "embed"), "decoder_embed", **kw)(z.astype(self.dtype))  # [B, N, D]
        x = x + _embedding(self, "latent_token_positional_embedding", (n, d), (None, "embed")).astype(x.dtype)
        cls = _embedding(self, "class_embedding", (1, d), (None, "embed"))
        mask = _embedding(self, "mask_token", (1, 1, d), (None, None, "embed"))
        h = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)),
                             jnp.broadcast_to(mask.astype(x.dtype), (b, g * g, d))], axis=1)  # [B, 1+g², D]
        h = h + _embedding(self, "positional_embedding", (g * g + 1, d), (None, "embed")).astype(x.dtype)
        h = jnp.concatenate([h, x], axis=1)  # [B, 1+g²+N, D]
        h = nn.with_logical_constraint(_layer_norm("ln_pre", **kw)(h), ACTIVATION_AXES)
        h = _blocks(h, self.depth, self.num_heads, self.mlp_dim, kw)
        h = _layer_norm("ln_post", **kw)(h[:, 1:1 + g * g]).reshape(b, g, g, d)  # [B, g, g, D]
        if self.head == "proxy_codes":
            h = jnp.tanh(_dense(2 * d, ("embed", "mlp"), "ffn_0", **kw)(h))  # [B, g, g, 2D]
            return _dense(self.proxy_codebook_size, ("mlp", "vocab"), "ffn_2", **kw)(h)  # [B, g, g, 1024]
        p, c = self.patch_size, self.out_channels
        h = depth_to_space(_dense(p * p * c, ("embed", None), "ffn_0", **kw)(h), p, c)  # [B, H, W, C]
        return nn.Conv(c, (3, 3), padding=[(1, 1), (1, 1)], name="conv_out", **kw,
                       kernel_init=nn.with_logical_partitioning(truncated_normal(), ("height", "width", None, None)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(h)


DECODER_HEADS = ("pixels", "proxy_codes")
PIXEL_RANGES = ("symmetric", "unit")


class TiTok(nn.Module):
    """TiTok: images -> a 1D sequence of ``num_latent_tokens`` codes -> images (DESIGN.md §3).

    Attributes:
      quantizer: an unbound quantizer (TiTok's: ``VectorQuantizer(codebook_size=4096,
        l2_normalize=True)`` on ``token_size``-dim latents); indices are ``[B, num_latent_tokens]``.
        Its parameters live under ``params/quantizer``.
      in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
      image_size: the (square) image size the position embeddings are built for.
      patch_size: pixels per patch side, the same for encoder and decoder (16 in the paper).
      num_latent_tokens: tokens per image (32 / 64 / 128 for TiTok-L / B / S).
      token_size: width of the latents the quantizer sees (12 in the paper).
      enc_width, enc_depth, enc_heads, enc_mlp_dim: encoder transformer (``TITOK_SIZES``).
      dec_width, dec_depth, dec_heads, dec_mlp_dim: decoder transformer.
      decoder_head: ``"pixels"`` (single stage) or ``"proxy_codes"`` (two stage, through
        MaskGIT's VQGAN decoder); see the module docstring.
      legacy_token_layout: the released models' encoder-output reshape (module docstring).
      proxy_codebook_size, proxy_code_dim: the MaskGIT VQGAN codebook under ``proxy_codes``.
      pixel_decoder_ch, pixel_decoder_ch_mult, pixel_decoder_num_res_blocks: the MaskGIT VQGAN
        decoder under ``proxy_codes`` (its upsampling ``2**(len(ch_mult) - 1)`` must equal
        ``patch_size``).
      pixel_range: ``"symmetric"``: the network reads and writes [-1, 1] images; ``"unit"``: it
        reads and writes [0, 1] (the released models), converted at both ends (module docstring).
      freeze_encoder: stage 2 of the two-stage recipe: no gradient reaches the encoder, the
        latent tokens or the quantizer, and the quantizer loss is zero.
      dtype, param_dtype: compute and storage dtypes, passed to every layer.
    """

    quantizer: nn.Module
    in_channels: int = 3
    out_channels: int | None = None
    image_size: int = 256
    patch_size: int = 16
    num_latent_tokens: int = 32
    token_size: int = 12
    enc_width: int = 1024
    enc_depth: int = 24
    enc_heads: int = 16
    enc_mlp_dim: int = 4096
    dec_width: int = 1024
    dec_depth: int = 24
    dec_heads: int = 16
    dec_mlp_dim: int = 4096
    decoder_head: str = "pixels"
    legacy_token_layout: bool = False
    proxy_codebook_size: int = 1024
    proxy_code_dim: int = 256
    pixel_decoder_ch: int = PIXEL_DECODER["ch"]
    pixel_decoder_ch_mult: tuple[int, ...] = PIXEL_DECODER["ch_mult"]
    pixel_decoder_num_res_blocks: int = PIXEL_DECODER["num_res_blocks"]
    pixel_range: str = "symmetric"
    freeze_encoder: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        _check_patch("TiTok", self.image_size, self.patch_size)
        if self.decoder_head not in DECODER_HEADS:
            raise ValueError(f"TiTok decoder_head {self.decoder_head!r} is unknown; use one of {DECODER_HEADS}.")
        if self.num_latent_tokens < 1:
            raise ValueError(f"num_latent_tokens={self.num_latent_tokens} must be at least 1.")
        if self.pixel_range not in PIXEL_RANGES:
            raise ValueError(f"TiTok pixel_range={self.pixel_range!r} is unknown; use one of {PIXEL_RANGES}.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_channels = self.out_channels or self.in_channels
        self.latent_tokens = _embedding(self, "latent_tokens", (self.num_latent_tokens, self.enc_width),
                                        (None, "embed"))
        self.encoder = TiTokEncoder(self.patch_size, self.enc_width, self.enc_depth, self.enc_heads, self.enc_mlp_dim,
                                    self.token_size, self.legacy_token_layout, **kw)
        self.decoder = TiTokDecoder(self.patch_size, self.image_size // self.patch_size, self.dec_width,
                                    self.dec_depth, self.dec_heads, self.dec_mlp_dim, self.decoder_head,
                                    out_channels, self.proxy_codebook_size, **kw)
        if self.decoder_head == "proxy_codes":
            factor = 2 ** (len(self.pixel_decoder_ch_mult) - 1)
            if self.patch_size != factor:
                raise ValueError(f"decoder_head='proxy_codes' decodes through MaskGIT's VQGAN, which upsamples by "
                                 f"{factor}, but patch_size={self.patch_size}; use patch_size={factor} or "
                                 "decoder_head='pixels'.")
            self.pixel_codebook = self.param(
                "pixel_codebook", nn.with_logical_partitioning(truncated_normal(), ("codebook", "embed")),
                (self.proxy_codebook_size, self.proxy_code_dim), self.param_dtype)
            sizes = dict(ch=self.pixel_decoder_ch, ch_mult=tuple(self.pixel_decoder_ch_mult),
                         num_res_blocks=self.pixel_decoder_num_res_blocks)
            self.pixel_decoder = ConvDecoder(out_channels=out_channels, **{**PIXEL_DECODER, **sizes}, **kw)

    @property
    def last_layer(self) -> tuple[str, ...]:
        """Parameter path of the last layer before the pixels (for the adaptive GAN weight)."""
        if self.decoder_head == "proxy_codes":
            return ("pixel_decoder", "conv_out", "kernel")
        return LAST_LAYER

    def encode(self, x: jax.Array, train: bool = False) -> QuantizerOutput:
        """Images ``[B, H, W, C]`` -> :class:`QuantizerOutput` on ``[B, N, token_size]`` (indices ``[B, N]``)."""
        _check_image("TiTok", x, self.in_channels, self.image_size)
        if self.pixel_range == "unit":
            x = (x + 1.0) / 2.0
        out = self.quantizer(self.encoder(x, self.latent_tokens), train=train)
        if self.freeze_encoder:
            out = out.replace(quantized=jax.lax.stop_gradient(out.quantized),
                              loss=jnp.zeros_like(out.loss),
                              metrics=jax.lax.stop_gradient(out.metrics))
        return out

    def _check_tokens(self, quantized: jax.Array) -> None:
        if quantized.ndim != 3 or quantized.shape[1] != self.num_latent_tokens:
            raise ValueError(f"TiTok's decoder was built for {self.num_latent_tokens} tokens (num_latent_tokens), got "
                             f"latents of shape {tuple(quantized.shape)}; decode [B, {self.num_latent_tokens}] tokens "
                             "of this tokenizer or use the config whose num_latent_tokens produced them.")

    def proxy_logits(self, quantized: jax.Array) -> jax.Array:
        """Stage-1 output of the two-stage recipe: logits ``[B, H/p, W/p, proxy_codebook_size]`` over
        MaskGIT VQGAN codes (``decoder_head="proxy_codes"`` only)."""
        if self.decoder_head != "proxy_codes":
            raise ValueError("proxy_logits needs decoder_head='proxy_codes'; this TiTok decodes pixels directly.")
        self._check_tokens(quantized)
        return self.decoder(quantized)

    def decode(self, quantized: jax.Array, train: bool = False) -> jax.Array:
        """Quantized latents ``[B, N, token_size]`` -> images ``[B, H, W, out_channels]``."""
        self._check_tokens(quantized)
        h = self.decoder(quantized)
        if self.decoder_head == "proxy_codes":
            probs = jax.nn.softmax(h.astype(jnp.float32), axis=-1)  # [B, g, g, 1024]
            codes = jnp.einsum("bhwk,kc->bhwc", probs.astype(self.dtype), self.pixel_codebook.astype(self.dtype))
            h = self.pixel_decoder(codes, train)  # [B, H, W, C]
        return h * 2.0 - 1.0 if self.pixel_range == "unit" else h

    def decode_indices(self, indices: Any) -> jax.Array:
        """Code ids ``[B, N]`` -> images, through ``quantizer.decode_indices``."""
        if indices.ndim != 2 or indices.shape[1] != self.num_latent_tokens:
            raise ValueError(f"TiTok's decoder was built for {self.num_latent_tokens} tokens (num_latent_tokens), got "
                             f"token ids of shape {tuple(indices.shape)}; pass [B, {self.num_latent_tokens}] ids.")
        return self.decode(self.quantizer.decode_indices(indices))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Reconstruction ``[B, H, W, out_channels]`` and the quantizer output."""
        out = self.encode(x, train=train)
        return self.decode(out.quantized, train=train), out


# ------------------------------------------------------------------------------------ variants


def _stacks(prefix: str, size: dict[str, int]) -> dict[str, int]:
    return {f"{prefix}_width": size["width"], f"{prefix}_depth": size["depth"], f"{prefix}_heads": size["heads"],
            f"{prefix}_mlp_dim": size["mlp_dim"]}


def _vitvqgan(enc: str, dec: str) -> dict[str, Any]:
    return dict(image_size=256, patch_size=8, **_stacks("enc", VITVQGAN_SIZES[enc]), **_stacks("dec", VITVQGAN_SIZES[dec]))


def _titok(enc: str, dec: str, tokens: int, **kw: Any) -> dict[str, Any]:
    return dict(image_size=256, patch_size=16, num_latent_tokens=tokens, **_stacks("enc", TITOK_SIZES[enc]),
                **_stacks("dec", TITOK_SIZES[dec]), **kw)


# Architecture kwargs of each variant (the quantizer is configured separately: QUANTIZERS).
VARIANTS: dict[str, dict[str, Any]] = {
    "vit_vqgan_SS": _vitvqgan("S", "S"),
    "vit_vqgan_BB": _vitvqgan("B", "B"),
    "vit_vqgan_SL": _vitvqgan("S", "L"),
    # Released two-stage TiTok models (configs/training/TiTok/stage2/*.yaml, is_legacy=True).
    "titok_L-32": _titok("large", "large", 32, token_size=12, decoder_head="proxy_codes", legacy_token_layout=True),
    "titok_B-64": _titok("base", "base", 64, token_size=12, decoder_head="proxy_codes", legacy_token_layout=True),
    "titok_S-128": _titok("small", "small", 128, token_size=12, decoder_head="proxy_codes", legacy_token_layout=True),
    # Single-stage TiTok-BL-64-VQ8k (configs/infer/TiTok/titok_bl64_vq8k.yaml, is_legacy=False).
    "titok_BL-64-VQ": _titok("base", "large", 64, token_size=64),
}

# The quantizer of each variant: (class name in vqgen.quantizers, kwargs).
QUANTIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"vit_vqgan_{k}": ("VectorQuantizer", dict(codebook_size=8192, code_dim=32, l2_normalize=True, beta=0.25))
       for k in ("SS", "BB", "SL")},
    **{f"titok_{k}": ("VectorQuantizer", dict(codebook_size=4096, l2_normalize=True, beta=0.25))
       for k in ("L-32", "B-64", "S-128")},
    "titok_BL-64-VQ": ("VectorQuantizer", dict(codebook_size=8192, l2_normalize=False, beta=0.25)),
}


def build(variant: str, quantizer: nn.Module | None = None, **overrides: Any) -> nn.Module:
    """The module of ``VARIANTS[variant]`` (with its official quantizer unless one is given)."""
    if variant not in VARIANTS:
        raise ValueError(f"ViT tokenizer variant {variant!r} is unknown; use one of {sorted(VARIANTS)}.")
    if quantizer is None:
        name, kw = QUANTIZERS[variant]
        quantizer = getattr(quantizers, name)(**kw)
    cls = ViTVQGAN if variant.startswith("vit_vqgan") else TiTok
    return cls(quantizer=quantizer, **{**VARIANTS[variant], **overrides})


def count_params(module: nn.Module, image_size: int, channels: int) -> int:
    """Number of parameters (the ``params`` collection) of ``module``, via ``jax.eval_shape``."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(variables.get("params", {})))))


__all__ = ["ViTVQGAN", "TiTok", "ViTBlock", "VARIANTS", "QUANTIZERS", "VITVQGAN_SIZES", "TITOK_SIZES", "build",
           "count_params", "LAST_LAYER"]
