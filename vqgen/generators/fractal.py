"""FractalMAR: fractal generative models, generators of generators down to single pixels
(Li et al. 2025, "Fractal Generative Models", LTH14/fractalgen ``models/``): model, the per-pixel
categorical loss and a sampler with every level nested in one jitted function.

The image is generated in levels. ``img_size_list = (S_0, S_1, ..., S_n = 1)`` (64x64 FractalMAR:
``(64, 4, 1)``; 256x256: ``(256, 16, 4, 1)``): generator ``l`` (``l < n``) models an ``S_l x S_l``
image as ``(S_l / S_{l+1})²`` patches of ``S_{l+1} x S_{l+1}`` pixels, and its output at each
patch conditions the generator of that patch one level down; below the last generator, a pixel
head draws the channels of each single pixel in order (R, then G given R, then B given both) as
categorical distributions over the 256 intensities. Images in and out of the model are channels
last; the data pipeline's ``[-1, 1]`` images are mapped to the model's normalisation
``(x01 - pixel_mean) / pixel_std`` (the paper's configs: ImageNet's mean and std, as the official
data loader; the default 0.5/0.5 makes it the identity on ``[-1, 1]``).

Structure (parameter names as the official modules'; kernels ``[in, out]``; see
:mod:`vqgen.convert.fractal` for the mapping of a state dict):

- ``class_emb [num_classes, D_0]`` and ``fake_latent [D_0]`` (the "no label" embedding of
  classifier-free guidance; label id ``num_classes`` here). Training replaces the class embedding
  by ``fake_latent`` with probability ``label_drop_prob`` (0.1). Level 0 is conditioned on
  ``num_conds`` copies of it.
- ``levels_{l}``, one generator per level, of type ``generator_type_list[l]``:

  - ``'mar'`` (:class:`MARLevel`, the official ``models/mar.py``): a bidirectional ViT over
    ``[guiding pixel?, cond_{K-1}, ..., cond_0, patch_1..patch_L]`` (K = ``num_conds``): patches
    through ``patch_emb`` (``C p² -> D``), masked ones replaced by ``mask_token``, the conditions
    through ``cond_emb`` (``D_{l-1} -> D``; one shared linear), the guiding pixel through
    ``pix_proj`` (``C -> D``), plus ``pos_embed_learned [1 + K + L, D]``, ``patch_emb_ln``,
    ``blocks_{i}`` (timm ``Block``: pre-LN, ``qkv`` with bias, exact-GELU MLP of 4D, attention and
    projection dropout 0.1; :class:`vqgen.generators.mar.Block`) and ``norm``. Its outputs at the
    patches give FIVE conditions per patch for the level below: the patch's own output and those of
    its top, right, bottom and left neighbours (zeros beyond the border).
  - ``'ar'`` (:class:`ARLevel`, the official ``models/ar.py``): a causal LlamaGen transformer
    (RMSNorm, SwiGLU, 2D RoPE with the condition as the class token whose rotation table is zero,
    :class:`vqgen.modules.attention.TransformerBlock`) over ``[cond_0, patch_1..patch_L]`` with
    ``patch_emb``, ``cond_emb``, ``pos_embed_learned [1 + L, D]``, ``patch_emb_ln`` and ``norm``
    (LayerNorm); output ``t`` conditions patch ``t + 1`` (one condition per patch), and the KV cache
    is a preallocated pytree in the sampler.
  - Levels ``l > 0`` with ``guiding_pixel``: a pixel head ``guiding_pixel_loss`` (width 128, 3
    blocks, 4 heads, R weight 5) models the mean colour of the patch from the parent's condition;
    it is drawn first and conditions the level through ``pix_proj``.

- ``pixel_loss`` (:class:`PixelHead`, the official ``models/pixelloss.py``): a causal ViT over
  ``[cond_proj(cond), codebook_0[v_0], ..., codebook_{C-1}[v_{C-1}]]`` (no position embedding; the
  causal mask orders the channels), ``ln``, ``blocks_{i}``, ``norm``; the logits of channel ``c``
  are the output at position ``c`` times ``codebooks[c]ᵀ`` plus ``mlm_bias[c]`` (weights tied to
  the input tables). ``codebooks [C, 256, W]`` stacks the official ``r/g/b_codebook``, ``mlm_bias
  [C, 256]`` the ``r/g/b_mlm.bias``; ``C`` is any channel count (1 for the quickstart's digits).

Training loss (:func:`loss_fn`, the official ``FractalGen.forward`` in training mode): at each MAR
level a random order per example and a mask ratio from ``N(1, 0.25)`` truncated to ``[0, 1]``;
``ceil(L * ratio)`` patches are masked, the first ones in the order, and only the masked patches
(with their conditions) go down a level (an AR level sends all). The pixel loss is the
cross-entropy of the 256-way intensity of each channel of each pixel that reached the bottom,
``(r_weight * CE_0 + CE_1 + ... + CE_{C-1}) / (r_weight + C - 1)`` (``r_weight`` 5), averaged over
those pixels; each guiding-pixel loss (same form, R weight 5) is averaged over the patches of its
level and added. Targets are ``round(255 * x01 + 0.01 n)`` with ``n`` standard normal, as the
official code breaks exact ties of banker's rounding.

Sampling (:func:`sample`, the official ``FractalGen.sample``): level ``l`` runs MAR's cosine
schedule of ``num_iter_list[l]`` iterations (at most its patch count; :func:`vqgen.generators.mar.
iteration_counts`), each iteration sampling the patches it reveals by running the whole level below
on their conditions; an AR level runs one patch per step. At the bottom each pixel's channels are
drawn in order. Guidance: the batch runs with the class and with ``fake_latent``; level 0 uses
``cfg_schedule`` (``'linear'``: ``1 + (cfg - 1) (L - m'_{t+1}) / L`` as MAR, or per step
``1 + (cfg - 1)(t + 1) / L`` at an AR level), and every level below uses the scale its parent
passed, constant. The pixel head guides ``logits = u + s (c - u)`` after raising the unconditional
logits of tokens whose conditional probability is below ``filter_threshold`` (1e-4) to at least the
conditional logits shifted to the unconditional maximum. ``temperature`` MULTIPLIES the logits, as
the official sampler does (its 1.02 and 1.1 sharpen).

Deviations from the official code, none of which changes what is computed:

- Static shapes. Training runs every level on all patches and weights each pixel's (and each
  guiding pixel's) loss by whether all its ancestors were masked, then divides by the weights'
  sum: the same average as the official selection of masked patches, at the cost of computing the
  unmasked ones too (about 1.25x per MAR level at the mean mask ratio of 0.8). Sampling draws
  ``max_t (m_t - m_{t+1})`` patches per iteration at every level (7 at 64 iterations over 256
  patches; the unused ones are discarded, as :mod:`vqgen.generators.mar` does), so one iteration
  compiles for all and the whole nested sampler compiles once.
- The official AR sampler feeds the sequence again each step and keeps a KV cache in module
  buffers; here the cache is an explicit pytree written with ``dynamic_update_slice``.
- The AR level's kernels are initialised ``N(0, 0.02)`` (the official applies Xavier-uniform to
  them too); everything else is initialised as the official code.
- Random numbers come from ``jax.random``: orders, ratios, label drops and draws differ from
  PyTorch's; :func:`forward_loss` takes the masks explicitly to reproduce a reference.

Parameter counts (:func:`count_params`, 1000 classes, 3 channels; the official guiding pixel and
5 conditions for the 256 models, 5 for FractalMAR-64, 1 for FractalAR-64): FractalAR-64
442,068,224, FractalMAR-64 431,995,648, FractalMAR-B/L/H-256 186,300,224 / 437,000,064 /
849,586,240 — each equal to the official module counted on the meta device, and the README's
432M, 186M, 438M and 848M (its FractalAR-64 row says 432M; the official module has 442M).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.generators import diffusion_loss as dl
from vqgen.generators import mar as mar_lib
from vqgen.generators import sampling
from vqgen.modules.attention import TransformerBlock
from vqgen.modules.attention import init_cache as init_layer_cache
from vqgen.modules.rope import rope_2d_table

# The generator protocol (vqgen/generators/__init__.py): the family trains on the images
# themselves (no tokenizer) and samples images.
VIDEO = False
INPUT_KIND = "pixels"

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
INIT_STD = 0.02
NORM_EPS = 1e-6
NUM_INTENSITIES = 256
MASK_RATIO_MIN = 0.0  # FractalGen's truncnorm(-4, 0, loc=1, scale=0.25): ratios in [0, 1]
TIE_NOISE = 1e-2  # the official noise added before rounding targets to intensities
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GUIDING_PIXEL_HEAD = dict(width=128, depth=3, num_heads=4, r_weight=5.0)
_MASK_VALUE = -1e30

# The official model functions (models/fractalgen.py); the released checkpoints' sizes.
VARIANTS: dict[str, dict[str, Any]] = {
    "AR-64": dict(img_size_list=(64, 4, 1), embed_dim_list=(1024, 512, 128), num_blocks_list=(32, 8, 3),
                  num_heads_list=(16, 8, 4), generator_type_list=("ar", "ar", "ar"), num_conds=1,
                  guiding_pixel=False),
    "MAR-64": dict(img_size_list=(64, 4, 1), embed_dim_list=(1024, 512, 128), num_blocks_list=(32, 8, 3),
                   num_heads_list=(16, 8, 4), generator_type_list=("mar", "mar", "ar"), num_conds=5,
                   guiding_pixel=False),
    "MAR-B-256": dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(768, 384, 192, 64),
                      num_blocks_list=(24, 6, 3, 1), num_heads_list=(12, 6, 3, 4),
                      generator_type_list=("mar", "mar", "mar", "ar"), num_conds=5, guiding_pixel=True),
    "MAR-L-256": dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(1024, 512, 256, 64),
                      num_blocks_list=(32, 8, 4, 1), num_heads_list=(16, 8, 4, 4),
                      generator_type_list=("mar", "mar", "mar", "ar"), num_conds=5, guiding_pixel=True),
    "MAR-H-256": dict(img_size_list=(256, 16, 4, 1), embed_dim_list=(1280, 640, 320, 64),
                      num_blocks_list=(40, 10, 5, 1), num_heads_list=(16, 8, 4, 4),
                      generator_type_list=("mar", "mar", "mar", "ar"), num_conds=5, guiding_pixel=True),
}
# The official README's parameter counts.
PAPER_PARAMS = {"AR-64": 432e6, "MAR-64": 432e6, "MAR-B-256": 186e6, "MAR-L-256": 438e6, "MAR-H-256": 848e6}


# ---------------------------------------------------------------------------------- layers


class CausalBlock(nn.Module):
    """The pixel head's block (the official ``CausalBlock``): :class:`vqgen.generators.mar.Block`'s
    layers and parameter names (``norm1``, ``qkv``, ``proj``, ``norm2``, ``fc1``, ``fc2``) with a
    causal attention mask and no dropout."""

    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    norm_eps: float = NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, h = self.width, self.num_heads
        hd, s = d // h, x.shape[1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = dl.LayerNorm(self.norm_eps, "embed", name="norm1", **kw)(x)  # [N, S, W]
        qkv = mar_lib.Dense((3, h, hd), ("embed", None, "heads", "kv"), name="qkv", **kw)(y)  # [N, S, 3, H, hd]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, S, H, hd]
        scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * hd**-0.5  # [N, H, S, S]
        causal = jnp.tril(jnp.ones((s, s), bool))
        probs = jax.nn.softmax(jnp.where(causal, scores, _MASK_VALUE), axis=-1)
        out = jnp.einsum("bhst,bthd->bshd", probs.astype(self.dtype), v)  # [N, S, H, hd]
        x = x + mar_lib.Dense((d,), ("heads", "kv", "embed"), contract_dims=2, name="proj", **kw)(out)
        y = dl.LayerNorm(self.norm_eps, "embed", name="norm2", **kw)(x)
        y = mar_lib.Dense((int(d * self.mlp_ratio),), ("embed", "mlp"), name="fc1", **kw)(y)  # [N, S, F]
        y = mar_lib.Dense((d,), ("mlp", "embed"), name="fc2", **kw)(jax.nn.gelu(y, approximate=False))
        return x + y


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple, std: float = INIT_STD):
    return module.param(name, nn.with_logical_partitioning(nn.initializers.normal(std), axes), shape,
                        module.param_dtype)


class PixelHead(nn.Module):
    """Categorical model of one pixel's ``channels`` intensities in order, given a condition
    (the official ``PixelLoss``; see the module docstring).

    ``__call__(values int32 [N, C], cond [N, Dc]) -> logits float32 [N, C, 256]``: the logits of
    channel ``c`` see the condition and ``values[:, :c]`` only.
    """

    width: int
    depth: int
    num_heads: int
    channels: int = 3
    norm_eps: float = NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, values: jax.Array, cond: jax.Array) -> jax.Array:
        w, c = self.width, self.channels
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        codebooks = _param(self, "codebooks", (c, NUM_INTENSITIES, w), (None, None, "embed"))  # [C, 256, W]
        bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None, None)),
                          (c, NUM_INTENSITIES), self.param_dtype)  # [C, 256]
        tables = codebooks.astype(self.dtype)
        cond_tok = mar_lib.Dense((w,), (None, "embed"), name="cond_proj", **kw)(cond.astype(self.dtype))  # [N, W]
        emb = jnp.stack([jnp.take(tables[i], values[:, i], axis=0) for i in range(c)], axis=1)  # [N, C, W]
        x = jnp.concatenate([cond_tok[:, None], emb], axis=1)  # [N, 1 + C, W]
        x = dl.LayerNorm(self.norm_eps, "embed", name="ln", **kw)(x)
        for i in range(self.depth):
            x = CausalBlock(w, self.num_heads, norm_eps=self.norm_eps, name=f"blocks_{i}", **kw)(x)
        x = dl.LayerNorm(self.norm_eps, "embed", name="norm", **kw)(x)[:, :c].astype(jnp.float32)  # [N, C, W]
        logits = jnp.einsum("ncw,cvw->ncv", x, codebooks.astype(jnp.float32))  # [N, C, 256]
        return logits + bias.astype(jnp.float32)[None]


def _neighbours(middle: jax.Array, side: int) -> list[jax.Array]:
    """``[middle, top, right, bottom, left]`` conditions ``[N, L, D]`` over a ``side x side`` grid:
    each patch's own output and its neighbours' (zeros beyond the border)."""
    n, length, d = middle.shape
    g = middle.reshape(n, side, side, d)
    zr, zc = jnp.zeros((n, 1, side, d), g.dtype), jnp.zeros((n, side, 1, d), g.dtype)
    top = jnp.concatenate([zr, g[:, :-1]], axis=1)
    right = jnp.concatenate([g[:, :, 1:], zc], axis=2)
    bottom = jnp.concatenate([g[:, 1:], zr], axis=1)
    left = jnp.concatenate([zc, g[:, :, :-1]], axis=2)
    return [middle] + [t.reshape(n, length, d) for t in (top, right, bottom, left)]


def guide_head(channels: int, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, **kw) -> PixelHead:
    """The guiding-pixel head of a MAR level (width 128, 3 blocks, 4 heads; params
    ``levels_{l}/guiding_pixel_loss``)."""
    return PixelHead(channels=channels, dtype=dtype, param_dtype=param_dtype, **kw,
                     **{k: v for k, v in GUIDING_PIXEL_HEAD.items() if k != "r_weight"})


class MARLevel(nn.Module):
    """One masked generator level (the official ``models/mar.py`` ``MAR``; see the module docstring).

    ``__call__(patches [N, L, C p²], mask bool [N, L], conds [K x [N, Dc]], guide [N, C] | None,
    train) -> 5 x [N, L, D]``: the conditions of each patch for the level below. ``mask`` marks
    the patches to predict (their values are never read).
    """

    side: int  # patches per side: L = side²
    patch_size: int
    embed_dim: int
    num_blocks: int
    num_heads: int
    channels: int = 3
    num_conds: int = 5
    guiding_pixel: bool = False
    mlp_ratio: float = 4.0
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    norm_eps: float = NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def seq_len(self) -> int:
        return self.side * self.side

    @property
    def num_outputs(self) -> int:
        return 5

    @nn.compact
    def __call__(self, patches, mask, conds, guide=None, train: bool = False, init_guide_cond=None):
        d, k, gp = self.embed_dim, self.num_conds, int(self.guiding_pixel)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if gp and init_guide_cond is not None:  # init only: the loss and sampler apply it on its own
            guide_head(self.channels, self.dtype, self.param_dtype, name="guiding_pixel_loss")(
                jnp.zeros(guide.shape, jnp.int32), init_guide_cond)
        mask_token = _param(self, "mask_token", (d,), ("embed",))
        pos = _param(self, "pos_embed_learned", (gp + k + self.seq_len, d), (None, "embed"))
        x = mar_lib.Dense((d,), (None, "embed"), name="patch_emb", **kw)(patches.astype(self.dtype))  # [N, L, D]
        x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
        cond_emb = mar_lib.Dense((d,), (None, "embed"), name="cond_emb", **kw)
        front = [cond_emb(conds[i].astype(self.dtype)) for i in reversed(range(k))]  # cond_{K-1} first
        if gp:
            front = [mar_lib.Dense((d,), (None, "embed"), name="pix_proj", **kw)(guide.astype(self.dtype))] + front
        x = jnp.concatenate([jnp.stack(front, axis=1).astype(x.dtype), x], axis=1) + pos.astype(x.dtype)[None]
        x = dl.LayerNorm(self.norm_eps, "embed", name="patch_emb_ln", **kw)(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))  # [N, gp + K + L, D]
        for i in range(self.num_blocks):
            x = mar_lib.Block(d, self.num_heads, self.mlp_ratio, self.attn_dropout, self.proj_dropout, self.norm_eps,
                              name=f"blocks_{i}", **kw)(x, None, train)
        x = dl.LayerNorm(self.norm_eps, "embed", name="norm", **kw)(x)
        return _neighbours(x[:, gp + k:], self.side)


class ARLevel(nn.Module):
    """One causal generator level (the official ``models/ar.py`` ``AR``; see the module docstring).

    ``__call__(patches [N, L, C p²], conds, train) -> [N, L, D]``: output ``t`` (after the
    condition and patches ``< t``) conditions patch ``t``. ``step(token_input, cache, pos)``
    runs one position with the KV cache (``pos`` 0 feeds the condition).
    """

    side: int
    patch_size: int
    embed_dim: int
    num_blocks: int
    num_heads: int
    channels: int = 3
    dropout: float = 0.1  # the official ModelArgs' resid_dropout_p and ffn_dropout_p
    rope_base: float = 10000.0
    norm_eps: float = NORM_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def seq_len(self) -> int:
        return self.side * self.side

    @property
    def num_outputs(self) -> int:
        return 1

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def setup(self):
        d, kw = self.embed_dim, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_emb = mar_lib.Dense((d,), (None, "embed"), **kw)
        self.cond_emb = mar_lib.Dense((d,), (None, "embed"), **kw)
        self.pos_embed_learned = _param(self, "pos_embed_learned", (1 + self.seq_len, d), (None, "embed"))
        self.patch_emb_ln = dl.LayerNorm(self.norm_eps, "embed", **kw)
        self.blocks = [TransformerBlock(num_heads=self.num_heads, causal=True, norm_eps=1e-5,
                                        resid_dropout_rate=self.dropout, ffn_dropout_rate=self.dropout,
                                        init_std=INIT_STD, **kw) for _ in range(self.num_blocks)]
        self.norm = dl.LayerNorm(self.norm_eps, "embed", **kw)

    def _rope(self):
        cos, sin = rope_2d_table((self.side, self.side), self.head_dim, self.rope_base, prefix_len=1)
        return jnp.asarray(cos), jnp.asarray(sin)  # [1 + L, hd/2]

    def __call__(self, patches, conds, train: bool = False):
        x = self.patch_emb(patches.astype(self.dtype))[:, :-1]  # [N, L-1, D] (the last patch is never input)
        x = jnp.concatenate([self.cond_emb(conds[0].astype(self.dtype))[:, None], x], axis=1)  # [N, L, D]
        x = self.patch_emb_ln(x + self.pos_embed_learned[: self.seq_len].astype(x.dtype)[None])
        cos, sin = self._rope()
        for block in self.blocks:
            x, _ = block(x, cos[: self.seq_len], sin[: self.seq_len], train=train)
        return [self.norm(x)]  # [N, L, D]

    def step(self, patch, cond, cache, pos):
        """Output ``[N, D]`` at sequence position ``pos`` (traced) whose input is ``cond`` at 0 and
        ``patch [N, C p²]`` (patch ``pos - 1``) after; returns it and the updated caches."""
        tok = jnp.where(pos == 0, self.cond_emb(cond.astype(self.dtype)), self.patch_emb(patch.astype(self.dtype)))
        row = jax.lax.dynamic_slice_in_dim(self.pos_embed_learned, pos, 1)  # [1, D]
        x = self.patch_emb_ln(tok[:, None] + row.astype(tok.dtype)[None])  # [N, 1, D]
        cos, sin = self._rope()
        cos, sin = jax.lax.dynamic_slice_in_dim(cos, pos, 1), jax.lax.dynamic_slice_in_dim(sin, pos, 1)
        new = []
        for block, c in zip(self.blocks, cache):
            x, c = block(x, cos, sin, cache=c, pos=pos)
            new.append(c)
        return self.norm(x)[:, 0], new


# ----------------------------------------------------------------------------------- model


class FractalMAR(nn.Module):
    """A fractal generative model (FractalMAR / FractalAR; see the module docstring).

    ``__call__`` initialises every parameter; training and sampling go through :func:`loss_fn`
    and :func:`sample`, which apply the submodules level by level (:func:`level_module`,
    :func:`pixel_head_module`, :meth:`class_embedding`).
    """

    img_size_list: tuple[int, ...] = (64, 4, 1)
    embed_dim_list: tuple[int, ...] = (1024, 512, 128)
    num_blocks_list: tuple[int, ...] = (32, 8, 3)
    num_heads_list: tuple[int, ...] = (16, 8, 4)
    generator_type_list: tuple[str, ...] = ("mar", "mar", "ar")
    num_classes: int = 1000
    channels: int = 3
    num_conds: int = 5
    guiding_pixel: bool = False
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    r_weight: float = 5.0
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def num_levels(self) -> int:
        """Generator levels (the pixel head below them not counted)."""
        return len(self.img_size_list) - 1

    @property
    def image_size(self) -> int:
        return int(self.img_size_list[0])

    @property
    def null_class(self) -> int:
        return int(self.num_classes)

    def norm_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` float32 ``[C]`` of the model's pixel normalisation of ``[0, 1]`` images."""
        mean = self.pixel_mean if self.pixel_mean is not None else (0.5,) * self.channels
        std = self.pixel_std if self.pixel_std is not None else (0.5,) * self.channels
        return np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def setup(self):
        check_model(self)
        d0 = int(self.embed_dim_list[0])
        self.class_emb = _param(self, "class_emb", (self.num_classes, d0), (None, "embed"))
        self.fake_latent = _param(self, "fake_latent", (d0,), ("embed",))
        self.levels = [level_module(self, l) for l in range(self.num_levels)]
        self.pixel_loss = pixel_head_module(self)

    def class_embedding(self, labels: jax.Array) -> jax.Array:
        """``[B, D_0]`` float32: ``class_emb[label]``, or ``fake_latent`` for label ``num_classes``."""
        labels = labels.astype(jnp.int32)
        table = jnp.take(self.class_emb.astype(jnp.float32), jnp.clip(labels, 0, self.num_classes - 1), axis=0)
        return jnp.where((labels == self.null_class)[:, None], self.fake_latent.astype(jnp.float32)[None], table)

    def __call__(self, labels: jax.Array) -> jax.Array:
        """Touches every parameter once on one example per level (for ``init``)."""
        cond = self.class_embedding(labels)
        n = labels.shape[0]
        conds = [cond] * self.num_conds
        c = self.channels
        for l, gen in enumerate(self.levels):
            p = int(self.img_size_list[l + 1])
            patches = jnp.zeros((n, gen.seq_len, c * p * p), jnp.float32)
            if isinstance(gen, ARLevel):
                outs = gen(patches, conds)
            else:
                guide = jnp.zeros((n, c), jnp.float32) if gen.guiding_pixel else None
                outs = gen(patches, jnp.ones((n, gen.seq_len), bool), conds, guide, init_guide_cond=conds[0])
            conds = [o[:, 0] for o in outs]
        return self.pixel_loss(jnp.zeros((n, c), jnp.int32), conds[0])


def level_module(model: FractalMAR, l: int) -> nn.Module:
    """Generator ``l`` of ``model`` as a standalone module (params ``params[f'levels_{l}']``)."""
    s, sub = int(model.img_size_list[l]), int(model.img_size_list[l + 1])
    kw = dict(side=s // sub, patch_size=sub, embed_dim=int(model.embed_dim_list[l]),
              num_blocks=int(model.num_blocks_list[l]), num_heads=int(model.num_heads_list[l]), channels=model.channels,
              dtype=model.dtype, param_dtype=model.param_dtype)
    if model.generator_type_list[l] == "ar":
        return ARLevel(**kw)
    return MARLevel(num_conds=model.num_conds, guiding_pixel=bool(model.guiding_pixel and l > 0),
                    attn_dropout=model.attn_dropout, proj_dropout=model.proj_dropout, **kw)


def pixel_head_module(model: FractalMAR) -> PixelHead:
    """The bottom pixel head of ``model`` as a standalone module (params ``params['pixel_loss']``)."""
    n = model.num_levels
    return PixelHead(width=int(model.embed_dim_list[n]), depth=int(model.num_blocks_list[n]),
                     num_heads=int(model.num_heads_list[n]), channels=model.channels, dtype=model.dtype,
                     param_dtype=model.param_dtype)


def check_model(model: FractalMAR) -> None:
    """One ``ValueError`` sentence for each setting FractalMAR cannot run with."""
    sizes = tuple(int(s) for s in model.img_size_list)
    n = len(sizes)
    if n < 2:
        raise ValueError(f"img_size_list={sizes} needs at least the image size and 1 (the pixel); use e.g. "
                         "(64, 4, 1).")
    for name in ("embed_dim_list", "num_blocks_list", "num_heads_list", "generator_type_list"):
        if len(getattr(model, name)) != n:
            raise ValueError(f"{name} has {len(getattr(model, name))} entries but img_size_list={sizes} has {n}; give "
                             "one entry per level (the last one sizes the pixel head).")
    if sizes[-1] != 1:
        raise ValueError(f"img_size_list={sizes} must end at 1 (single pixels, which the pixel head models); append "
                         "1 to the list.")
    for big, small in zip(sizes[:-1], sizes[1:]):
        if small < 1 or big % small or big == small:
            raise ValueError(f"img_size_list={sizes}: {big} is not split by {small} into patches; each level's size "
                             f"must be a multiple of the next one and larger (e.g. (64, 4, 1) or (256, 16, 4, 1)).")
    for l in range(n - 1):
        kind = model.generator_type_list[l]
        if kind not in ("mar", "ar"):
            raise ValueError(f"generator_type_list[{l}]={kind!r} is unknown; use 'mar' or 'ar'.")
    for l in range(n):
        d, h = int(model.embed_dim_list[l]), int(model.num_heads_list[l])
        if d % h:
            raise ValueError(f"embed_dim_list[{l}]={d} is not divisible by num_heads_list[{l}]={h}; change one.")
        if l < n - 1 and model.generator_type_list[l] == "ar" and (d // h) % 4:
            raise ValueError(f"level {l} is 'ar' with head width {d // h}, not a multiple of 4 (2D rotary "
                             "embeddings); change embed_dim_list or num_heads_list.")
    for l in range(1, n - 1):
        if model.generator_type_list[l - 1] == "ar" and model.generator_type_list[l] == "mar" and model.num_conds != 1:
            raise ValueError(f"level {l} is 'mar' below an 'ar' level, which gives one condition per patch, but "
                             f"num_conds={model.num_conds}; use num_conds=1 (FractalAR) or a 'mar' level above.")
    if not 1 <= int(model.num_conds) <= 5:
        raise ValueError(f"num_conds={model.num_conds} must lie in [1, 5] (a patch and its four neighbours); the "
                         "paper's FractalMAR uses 5.")
    if not 0.0 <= float(model.label_drop_prob) < 1.0:
        raise ValueError(f"label_drop_prob={model.label_drop_prob} is outside [0, 1); FractalMAR uses 0.1.")
    for name in ("pixel_mean", "pixel_std"):
        v = getattr(model, name)
        if v is not None and len(v) != model.channels:
            raise ValueError(f"{name} has {len(v)} entries for {model.channels} channels; give one per channel.")
    if model.pixel_std is not None and min(model.pixel_std) <= 0:
        raise ValueError(f"pixel_std={model.pixel_std} must be positive; use e.g. ImageNet's {IMAGENET_STD}.")


def fractal_variant(name: str, **overrides: Any) -> FractalMAR:
    """A :class:`FractalMAR` of the official size ``name`` (one of :data:`VARIANTS`), overridable."""
    if name not in VARIANTS:
        raise ValueError(f"FractalMAR variant {name!r} is unknown; choose one of {sorted(VARIANTS)}.")
    return FractalMAR(**{**VARIANTS[name], **overrides})


def init_params(model: FractalMAR, rng: jax.Array) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``model``."""
    check_model(model)
    return model.init({"params": rng}, jnp.zeros((1,), jnp.int32))["params"]


def abstract_params(model: FractalMAR) -> Any:
    """Boxed ``ShapeDtypeStruct`` parameter tree via ``jax.eval_shape`` (nothing is allocated)."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def count_params(model: FractalMAR) -> int:
    """Number of parameters of ``model``, from shapes only."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract_params(model)))))


# -------------------------------------------------------------------------------- pixels


def to_model_pixels(model: FractalMAR, images: jax.Array) -> jax.Array:
    """``[-1, 1]`` images -> the model's normalisation ``((x + 1) / 2 - mean) / std`` (float32)."""
    mean, std = model.norm_stats()
    return ((jnp.asarray(images, jnp.float32) + 1.0) * 0.5 - mean) / std


def from_model_pixels(model: FractalMAR, x: jax.Array) -> jax.Array:
    """Inverse of :func:`to_model_pixels`: ``[-1, 1]`` images (clipped) of model-normalised pixels."""
    mean, std = model.norm_stats()
    return jnp.clip((x * std + mean) * 2.0 - 1.0, -1.0, 1.0)


def intensities(model: FractalMAR, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """int32 intensities in [0, 255] of model-normalised values ``x [..., C]``: ``round(255 x01 +
    0.01 n)`` (the official targets; ``rng=None`` leaves the noise out)."""
    mean, std = model.norm_stats()
    v = (x.astype(jnp.float32) * std + mean) * 255.0
    if rng is not None:
        v = v + TIE_NOISE * jax.random.normal(rng, v.shape, jnp.float32)
    return jnp.clip(jnp.round(v), 0, NUM_INTENSITIES - 1).astype(jnp.int32)


def from_intensities(model: FractalMAR, ids: jax.Array) -> jax.Array:
    """Model-normalised values ``(id / 255 - mean) / std`` of intensities ``[..., C]``."""
    mean, std = model.norm_stats()
    return (ids.astype(jnp.float32) / 255.0 - mean) / std


def channel_weights(channels: int, r_weight: float) -> np.ndarray:
    """The pixel loss's channel weights: ``r_weight`` for the first channel, 1 for the others."""
    w = np.ones((channels,), np.float32)
    w[0] = r_weight
    return w


def pixel_nll(head: PixelHead, params: Any, x: jax.Array, cond: jax.Array, r_weight: float,
              model: FractalMAR, rng: jax.Array | None) -> jax.Array:
    """``[N]`` float32: the channel-weighted cross-entropy of pixels ``x [N, C]`` (model-normalised)."""
    ids = intensities(model, x, rng)  # [N, C]
    logits = head.apply({"params": params}, ids, cond)  # [N, C, 256]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[..., None], axis=-1)[..., 0]  # [N, C]
    w = channel_weights(head.channels, r_weight)
    return jnp.sum(ce * w, axis=-1) / float(w.sum())


def _patches_to_images(patches: jax.Array, p: int, channels: int) -> jax.Array:
    """``[N, L, C p²]`` (MAR's ``(c, pi, pj)`` order) -> ``[N L, p, p, C]``."""
    n, length, _ = patches.shape
    return patches.reshape(n * length, channels, p, p).transpose(0, 2, 3, 1)


def _images_to_patch_rows(images: jax.Array) -> jax.Array:
    """``[M, p, p, C]`` -> ``[M, C p²]`` in MAR's ``(c, pi, pj)`` order."""
    m = images.shape[0]
    return images.transpose(0, 3, 1, 2).reshape(m, -1)


# ------------------------------------------------------------------------------------ loss


def random_mask(rng: jax.Array, batch: int, length: int) -> jax.Array:
    """FractalMAR's training mask ``bool [B, L]``: a random order and a ratio from ``N(1, 0.25)``
    truncated to ``[0, 1]`` per example; the first ``ceil(L * ratio)`` positions of the order."""
    o_key, r_key = jax.random.split(rng)
    orders = mar_lib.random_orders(o_key, batch, length)  # [B, L]
    ratio = mar_lib.mask_ratios(r_key, batch, MASK_RATIO_MIN)  # [B]
    n = jnp.ceil(ratio * length).astype(jnp.int32)
    return jnp.argsort(orders, axis=-1) < n[:, None]


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def forward_loss(model: FractalMAR, params: Any, x: jax.Array, labels: jax.Array, rng: jax.Array, *,
                 train: bool = True, masks: Sequence[jax.Array | None] | None = None):
    """FractalMAR's training loss of model-normalised images ``x [B, S_0, S_0, C]`` and class ids
    ``labels [B]`` (``num_classes``: no label).

    ``masks[l]`` (optional, ``bool [B L_0 ... L_{l-1}, L_l]``) replaces level ``l``'s random mask;
    rows whose ancestors were not all masked do not count. ``train`` enables dropout and label
    dropout. Returns ``(loss, metrics)`` with the pixel loss and each guiding-pixel loss.
    """
    params = nn.meta.unbox(params)
    b, c = x.shape[0], model.channels
    keys = jax.random.split(rng, 2 * model.num_levels + 3)
    cls = model.apply({"params": params}, labels, method=FractalMAR.class_embedding)  # [B, D0]
    if train and model.label_drop_prob > 0:
        drop = jax.random.uniform(keys[0], (b,)) < model.label_drop_prob
        cls = jnp.where(drop[:, None], params["fake_latent"].astype(jnp.float32)[None], cls)
    conds, imgs, weight = [cls] * model.num_conds, x.astype(jnp.float32), jnp.ones((b,), jnp.float32)
    metrics = {}
    total = jnp.float32(0.0)
    for l in range(model.num_levels):
        gen = level_module(model, l)
        lp = params[f"levels_{l}"]
        p = int(model.img_size_list[l + 1])
        patches = mar_lib.patchify(imgs, p)  # [N, L, C p²]
        n, length = patches.shape[:2]
        guide = None
        if isinstance(gen, MARLevel):
            mask = masks[l] if masks is not None and masks[l] is not None else random_mask(keys[2 * l + 1], n, length)
            mask = jnp.asarray(mask, bool)
            if gen.guiding_pixel:
                guide = jnp.mean(imgs, axis=(1, 2))  # [N, C]
                head = guide_head(model.channels, model.dtype, model.param_dtype)
                gl = pixel_nll(head, lp["guiding_pixel_loss"], guide, conds[0], GUIDING_PIXEL_HEAD["r_weight"], model,
                               keys[2 * l + 2])
                gl = _weighted_mean(gl, weight)
                metrics[f"guiding_pixel_loss_{l}"] = gl
                total = total + gl
            outs = gen.apply({"params": lp}, patches, mask, conds, guide, train,
                             rngs={"dropout": jax.random.fold_in(keys[2 * l + 2], 1)})
            weight = (weight[:, None] * mask.astype(jnp.float32)).reshape(-1)  # [N L]
            metrics[f"mask_ratio_{l}"] = jnp.mean(mask.astype(jnp.float32))
        else:
            outs = gen.apply({"params": lp}, patches, conds, train,
                             rngs={"dropout": jax.random.fold_in(keys[2 * l + 2], 1)})
            weight = jnp.repeat(weight, length)
        conds = [o.reshape(n * length, -1).astype(jnp.float32) for o in outs]
        imgs = _patches_to_images(patches, p, c)  # [N L, p, p, C]
    pix = pixel_nll(pixel_head_module(model), params["pixel_loss"], imgs.reshape(-1, c), conds[0], model.r_weight,
                    model, keys[-1])
    pixel_loss = _weighted_mean(pix, weight)
    total = total + pixel_loss
    metrics["pixel_loss"] = pixel_loss
    return total, {"loss": total, **metrics}


def loss_fn(model: FractalMAR, params: Any, batch: dict, rng: jax.Array, train: bool = True):
    """The training loss of ``batch = {'images': float [B, H, W, C] in [-1, 1], 'label': int32
    [B]}`` (``'labels'`` accepted): :func:`forward_loss` with random masks, dropout and label
    dropout when ``train``. Returns ``(loss, metrics)``, float32."""
    if "images" not in batch:
        raise ValueError("the FractalMAR loss reads batch['images'] (float [B, H, W, C] in [-1, 1]); FractalMAR "
                         "trains on pixels, not tokens.")
    images = jnp.asarray(batch["images"], jnp.float32)
    want = (model.image_size, model.image_size, model.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images of shape {tuple(images.shape)} are not [B, {want[0]}, {want[1]}, {want[2]}]; build "
                         "the model with img_size_list[0] and channels equal to the data's.")
    labels = batch["label"] if "label" in batch else batch["labels"]
    return forward_loss(model, params, to_model_pixels(model, images), jnp.asarray(labels, jnp.int32), rng,
                        train=train)


# ----------------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerOptions(sampling.SamplingOptions):
    """FractalMAR's sampling options (static, hashable; the key is an argument).

    From :class:`~vqgen.generators.sampling.SamplingOptions`: ``temperature`` MULTIPLIES the pixel
    logits (the official convention; 1.02 for FractalMAR-64, 1.1 at 256), ``cfg_scale`` (1 = off;
    the official 6.5 at 64, 29/21/19 for B/L/H at 256), ``cfg_schedule`` (``'linear'``, the
    official default, or ``'constant'``; level 0 only, see the module docstring),
    ``cfg_interval`` (fractions of level 0's iterations). ``top_k``/``top_p`` are not FractalMAR's
    and must stay 0 and 1. Plus:

    - ``num_iter_list``: iterations per generator level (the official ``64,16`` at 64 and
      ``64,16,16`` at 256); a level runs at most its patch count, an AR level exactly that.
    - ``filter_threshold``: conditional probability below which guidance may not promote a pixel
      value (1e-4).
    """

    cfg_schedule: str = "linear"
    num_iter_list: tuple[int, ...] = (64, 16, 16)
    filter_threshold: float = 1e-4

    _UNIT = "step"

    def __post_init__(self):
        its = tuple(self.num_iter_list) if not isinstance(self.num_iter_list, int) else (self.num_iter_list,)
        if not its or any(isinstance(i, bool) or int(i) < 1 for i in its):
            raise ValueError(f"num_iter_list={self.num_iter_list} must hold a positive iteration count per level; "
                             "the official values are (64, 16) at 64px and (64, 16, 16) at 256px.")
        if int(self.top_k) != 0 or float(self.top_p) != 1.0:
            raise ValueError(f"top_k={self.top_k} and top_p={self.top_p} are not FractalMAR sampling options; leave "
                             "top_k=0 and top_p=1.0 (temperature and filter_threshold shape the pixel draws).")
        if float(self.temperature) <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive (it multiplies the logits); use 1.0 "
                             "or the official 1.02.")
        if not 0.0 <= float(self.filter_threshold) < 1.0:
            raise ValueError(f"filter_threshold={self.filter_threshold} is outside [0, 1); use 1e-4 (the official).")
        super().__post_init__()
        object.__setattr__(self, "num_iter_list", tuple(int(i) for i in its))
        object.__setattr__(self, "filter_threshold", float(self.filter_threshold))


def sampler_options(cfg: dict, **overrides: Any) -> SamplerOptions:
    """:class:`SamplerOptions` from a ``config.sample`` section; a key FractalMAR does not read is an error."""
    return SamplerOptions.from_dict(cfg, "fractal", **overrides)


def level_iterations(model: FractalMAR, opts: SamplerOptions) -> tuple[int, ...]:
    """Iterations each generator level runs: ``min(L_l, num_iter_list[l])`` at a MAR level (the
    last entry repeats for deeper levels), ``L_l`` at an AR level."""
    out = []
    for l in range(model.num_levels):
        gen = level_module(model, l)
        it = opts.num_iter_list[min(l, len(opts.num_iter_list) - 1)]
        out.append(gen.seq_len if isinstance(gen, ARLevel) else min(gen.seq_len, it))
    return tuple(out)


def guided_logits(cond: jax.Array, uncond: jax.Array, scale: jax.Array, threshold: float) -> jax.Array:
    """The official pixel guidance: unconditional logits of values the conditional distribution
    gives less than ``threshold`` are raised to ``max(u, c - max c + max u)``, then
    ``u + scale (c - u)``; float32 ``[..., 256]``."""
    c, u = cond.astype(jnp.float32), uncond.astype(jnp.float32)
    low = jax.nn.softmax(c, axis=-1) < threshold
    lifted = jnp.maximum(u, c - jnp.max(c, axis=-1, keepdims=True) + jnp.max(u, axis=-1, keepdims=True))
    u = jnp.where(low, lifted, u)
    return u + scale * (c - u)


def sample_pixels(model: FractalMAR, head: PixelHead, params: Any, cond: jax.Array, scale: jax.Array,
                  rng: jax.Array, opts: SamplerOptions) -> jax.Array:
    """Draws ``[N, C]`` model-normalised pixels channel by channel from a pixel head given
    ``cond [N', Dc]`` (``N' = 2N`` with guidance: conditional rows, then unconditional ones)."""
    n = cond.shape[0] // 2 if opts.uses_cfg else cond.shape[0]
    ids = jnp.zeros((n, head.channels), jnp.int32)
    for ch in range(head.channels):
        feed = jnp.concatenate([ids, ids]) if opts.uses_cfg else ids
        logits = head.apply({"params": params}, feed, cond)[:, ch] * opts.temperature  # [N', 256]
        if opts.uses_cfg:
            logits = guided_logits(logits[:n], logits[n:], scale, opts.filter_threshold)
        draw = jax.random.categorical(jax.random.fold_in(rng, ch), logits, axis=-1).astype(jnp.int32)  # [N]
        ids = ids.at[:, ch].set(draw)
    return from_intensities(model, ids)


def _split_pair(x: jax.Array, n: int, uses_cfg: bool) -> tuple[jax.Array, jax.Array | None]:
    return (x[:n], x[n:]) if uses_cfg else (x, None)


def _gather_rows(out: jax.Array, pos: jax.Array, n: int, uses_cfg: bool) -> jax.Array:
    """Rows of ``out [N', L, D]`` at positions ``pos [N, W]``: ``[N W (x2), D]``, conditional first."""
    c, u = _split_pair(out, n, uses_cfg)
    rows = [jnp.take_along_axis(c, pos[..., None], axis=1).reshape(-1, out.shape[-1])]
    if u is not None:
        rows.append(jnp.take_along_axis(u, pos[..., None], axis=1).reshape(-1, out.shape[-1]))
    return jnp.concatenate(rows)


def _below(model: FractalMAR, params: Any, l: int, conds: list, scale, rng, opts: SamplerOptions, iters) -> jax.Array:
    """Samples what lies below level ``l``'s patches: ``[M, p, p, C]`` model-normalised."""
    if l + 1 < model.num_levels:
        return _sample_level(model, params, l + 1, conds, scale, rng, opts, iters)
    x = sample_pixels(model, pixel_head_module(model), params["pixel_loss"], conds[0], scale, rng, opts)  # [M, C]
    return x[:, None, None, :]


def _sample_level(model: FractalMAR, params: Any, l: int, conds: list, scale, rng: jax.Array,
                  opts: SamplerOptions, iters: tuple[int, ...]) -> jax.Array:
    """Generator ``l`` sampling ``[N, S_l, S_l, C]`` model-normalised images given its conditions
    ``conds`` (each ``[N', D]``) and guidance ``scale`` (level 0: ``opts.cfg_scale`` with its
    schedule; deeper: the parent's scale, constant)."""
    gen, lp = level_module(model, l), params[f"levels_{l}"]
    c, p, length = model.channels, gen.patch_size, gen.seq_len
    n = conds[0].shape[0] // 2 if opts.uses_cfg else conds[0].shape[0]
    order_key, guide_key, loop_key = jax.random.split(rng, 3)
    steps = iters[l]
    top = l == 0
    base = jnp.float32(opts.cfg_scale) if top else scale

    def level_scale(t, ramp):
        if not opts.uses_cfg:
            return jnp.float32(1.0)
        if not top:
            return base
        s = 1.0 + (opts.cfg_scale - 1.0) * ramp if opts.cfg_schedule == "linear" else jnp.float32(opts.cfg_scale)
        frac = jnp.asarray(t, jnp.float32) / steps
        on = (frac >= opts.cfg_interval[0]) & (frac < opts.cfg_interval[1])
        return jnp.where(on, s, 1.0).astype(jnp.float32)

    patches = jnp.zeros((n, length, c * p * p), jnp.float32)
    if isinstance(gen, ARLevel):
        nn_rows = conds[0].shape[0]
        cache = [init_layer_cache(nn_rows, 1 + length, gen.num_heads, gen.head_dim, gen.dtype)
                 for _ in range(gen.num_blocks)]

        def ar_body(t, carry):
            patches, cache = carry
            prev = jax.lax.dynamic_index_in_dim(patches, jnp.maximum(t - 1, 0), axis=1, keepdims=False)  # [N, Cp²]
            feed = jnp.concatenate([prev, prev]) if opts.uses_cfg else prev
            out, cache = gen.apply({"params": lp}, feed, conds[0], cache, t, method=ARLevel.step)  # [N', D]
            s = level_scale(t, (t + 1).astype(jnp.float32) / length)
            sub = _below(model, params, l, [out.astype(jnp.float32)], s, jax.random.fold_in(loop_key, t), opts, iters)
            patches = jax.lax.dynamic_update_index_in_dim(patches, _images_to_patch_rows(sub), t, axis=1)
            return patches, cache

        patches, _ = jax.lax.fori_loop(0, length, ar_body, (patches, cache))
        return mar_lib.unpatchify(patches, (gen.side, gen.side), p)

    guide = None
    if gen.guiding_pixel:
        head = guide_head(model.channels, model.dtype, model.param_dtype)
        guide = sample_pixels(model, head, lp["guiding_pixel_loss"], conds[0], base, guide_key, opts)
        if opts.uses_cfg:
            guide = jnp.concatenate([guide, guide])
    masked_np, guide_np = mar_lib.iteration_counts(length, steps)
    width = int(np.max(masked_np[:-1] - masked_np[1:]))
    masked, ramp_counts = jnp.asarray(masked_np), jnp.asarray(guide_np)
    orders = mar_lib.random_orders(order_key, n, length)  # [N, L]
    rank = jnp.argsort(orders, axis=-1)
    rows = jnp.arange(n)[:, None]

    def body(t, patches):
        mask = rank < masked[t]  # [N, L]
        feed, feed_mask = patches, mask
        if opts.uses_cfg:
            feed, feed_mask = jnp.concatenate([patches, patches]), jnp.concatenate([mask, mask])
        outs = gen.apply({"params": lp}, feed, feed_mask, conds, guide)  # 5 x [N', L, D]
        j = masked[t + 1] + jnp.arange(width)  # [W] indices into the order
        valid = j < masked[t]
        pos = jnp.take(orders, jnp.clip(j, 0, length - 1), axis=1)  # [N, W]
        nxt = [_gather_rows(o.astype(jnp.float32), pos, n, opts.uses_cfg) for o in outs]
        s = level_scale(t, (length - ramp_counts[t]).astype(jnp.float32) / length)
        sub = _below(model, params, l, nxt, s, jax.random.fold_in(loop_key, t), opts, iters)  # [N W, p, p, C]
        vals = _images_to_patch_rows(sub).reshape(n, width, -1)
        write = jnp.where(valid[None], pos, length)  # [N, W]; index L is dropped
        return patches.at[rows, write].set(vals, mode="drop")

    patches = jax.lax.fori_loop(0, steps, body, patches)
    return mar_lib.unpatchify(patches, (gen.side, gen.side), p)


def sample_images(model: FractalMAR, params: Any, labels: jax.Array, rng: jax.Array, opts: SamplerOptions):
    """Un-jitted body of :func:`sample`: ``[B, S, S, C]`` model-normalised images."""
    params = nn.meta.unbox(params)
    labels = labels.astype(jnp.int32)
    if opts.uses_cfg:
        labels = jnp.concatenate([labels, jnp.full_like(labels, model.null_class)])
    cls = model.apply({"params": params}, labels, method=FractalMAR.class_embedding)  # [B', D0]
    return _sample_level(model, params, 0, [cls] * model.num_conds, jnp.float32(opts.cfg_scale), rng, opts,
                         level_iterations(model, opts))


def _sample_body(model: FractalMAR, params: Any, labels: jax.Array, rng: jax.Array, opts: SamplerOptions):
    return from_model_pixels(model, sample_images(model, params, labels, rng, opts))


_sample_jit = jax.jit(_sample_body, static_argnames=("model", "opts"))


def _check_sample_args(model: FractalMAR, labels: Any, opts: Any) -> None:
    if not isinstance(opts, SamplerOptions):
        raise ValueError(f"opts must be fractal.SamplerOptions, got {type(opts).__name__}; build them with "
                         "fractal.sampler_options(...).")
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be a 1-D array of class ids [B], got shape {np.shape(labels)}; pass one id "
                         "per sample.")
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got dtype {lab.dtype}; cast them to int32.")
        if lab.size and (lab.min() < 0 or lab.max() > model.num_classes):
            raise ValueError(f"class ids must lie in [0, {model.num_classes}) (or {model.num_classes} for no label), "
                             f"got min {lab.min()} and max {lab.max()}; fix the labels or use a model with more "
                             "classes.")


def sample(model: FractalMAR, params: Any, labels: Any, rng: jax.Array,
           opts: SamplerOptions = SamplerOptions()) -> jax.Array:
    """Samples images ``float32 [B, S, S, C]`` in ``[-1, 1]`` for class ids ``labels [B]``
    (``num_classes``: unconditional).

    One jitted function with every level's loop nested inside its parent's (``model`` and
    ``opts`` static): one compile per model, options and batch size.
    """
    _check_sample_args(model, labels, opts)
    return _sample_jit(model, params, jnp.asarray(labels, jnp.int32), rng, opts)


# ------------------------------------------------------------------ family adapter (trainers)

_BUILD_KEYS = ({f.name for f in dataclasses.fields(FractalMAR)} - {"num_classes", "channels", "parent", "name"})


def build(cfg: dict, *, num_classes: int, image_size: int | Sequence[int] | None = None,
          channels: int | None = None, **_: Any) -> FractalMAR:
    """A :class:`FractalMAR` from a config section (``config.generator`` as a dict; ``arch``
    ignored) for ``image_size`` (an int or ``(H, W)``, square) images of ``channels`` channels.

    ``variant`` (one of :data:`VARIANTS`) gives the official sizes, other keys override them.
    Unknown keys, and a level list that does not start at the image size, are a ``ValueError``.
    """
    kw = {k: v for k, v in dict(cfg).items() if k != "arch"}
    variant = kw.pop("variant", None)
    unknown = sorted(set(kw) - _BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown FractalMAR config keys {unknown}; valid keys are "
                         f"{sorted(_BUILD_KEYS | {'variant'})}.")
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"generator.variant={variant!r} is unknown; choose one of {sorted(VARIANTS)}.")
        kw = {**VARIANTS[variant], **kw}
    for key in ("dtype", "param_dtype"):
        if isinstance(kw.get(key), str):
            if kw[key] not in DTYPES:
                raise ValueError(f"generator.{key}={kw[key]!r} is unknown; use one of {sorted(DTYPES)}.")
            kw[key] = DTYPES[kw[key]]
    for key in ("img_size_list", "embed_dim_list", "num_blocks_list", "num_heads_list", "generator_type_list",
                "pixel_mean", "pixel_std"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    model = FractalMAR(num_classes=int(num_classes), channels=int(channels or 3), **kw)
    check_model(model)
    if image_size is not None:
        hw = (int(image_size),) * 2 if np.ndim(image_size) == 0 else tuple(int(s) for s in image_size)
        if hw[0] != hw[1] or hw[0] != model.image_size:
            raise ValueError(f"img_size_list={model.img_size_list} starts at {model.image_size} but the data's images "
                             f"are {hw[0]}x{hw[1]}; start the level list at the image size (e.g. ({hw[0]}, 4, 1) when "
                             f"4 divides {hw[0]}).")
    return model
