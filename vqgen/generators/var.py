"""VAR: the class-conditional next-scale transformer of Visual Autoregressive Modeling (Tian et
al. 2024, FoundationVision/VAR ``models/var.py``, ``models/basic_var.py``): model, loss, the
teacher-forcing input and a KV-cache sampler jitted end to end.

The token sequence is VAR's token pyramid: the code maps of the multi-scale residual quantizer
(:class:`vqgen.quantizers.multiscale.MultiScaleResidualQuantizer`) for ``scales = (s_0, ...,
s_{S-1})``, each ``[B, s, s]`` map flattened row-major, scales from small to large, ``L =
sum(s*s)`` tokens in all (680 for VAR's 256px schedule). :func:`join_scales` and
:func:`split_scales` convert between the maps and the ``[B, L]`` sequence. The last scale equals
the tokenizer's ``(h, w)`` grid.

Structure (as VAR, ``build_vae_var``: ``width = 64 * depth``, ``num_heads = depth``,
``drop_path_rate = 0.1 * depth / 24``, ``attn_l2_norm=True``, ``shared_aln=False``):

- Input: the teacher-forcing input ``x_input [B, L - s_0², Cvae]`` (VAR's ``idxBl_to_var_input``,
  see :func:`teacher_forcing_input`) goes through ``word_embed`` (Linear ``Cvae -> C``). The first
  ``s_0²`` positions (the start of sequence) are the class embedding plus ``pos_start``.
- ``class_emb [num_classes + 1, C]``: row ``num_classes`` is the "no label" class of
  classifier-free guidance; in training a label is replaced by it with probability
  ``cond_drop_rate`` (0.1). The class embedding is also the AdaLN condition of every block and of
  the head.
- Position: ``lvl_embed [S, C]`` (the scale of each position) plus the absolute ``pos_1LC [L, C]``.
- ``depth`` blocks ``blocks_i``: ``x += drop_path(attn(LN(x) * (1 + scale1) + shift1) * gamma1)``,
  ``x += drop_path(ffn(LN(x) * (1 + scale2) + shift2) * gamma2)``, LayerNorm without affine
  (eps 1e-6). The six modulation vectors come from ``ada_lin`` (SiLU + Linear ``C -> 6C``) of the
  class embedding in each block (VAR's default), or with ``shared_aln`` from one model-level
  ``shared_ada_lin`` plus a per-block learned ``ada_gss [6, C]``. Order: gamma1, gamma2, scale1,
  scale2, shift1, shift2. Drop-path rates rise linearly from 0 to ``drop_path_rate`` over blocks.
- Attention: ``mat_qkv`` without bias plus learned ``q_bias`` and ``v_bias`` (the key has no
  bias). With ``attn_l2_norm`` queries and keys are l2-normalised, queries are multiplied by a
  learned per-head ``exp(min(scale_mul, log 100))`` (initialised to 4) and the softmax scale is 1;
  otherwise the softmax scale is ``0.25 / sqrt(head_dim)``. The mask is block-causal over
  scales: a token attends to every token of its own scale and of earlier scales.
- FFN: ``fc1`` (``C -> round(4 C)``), tanh-GELU, ``fc2``.
- Head: ``head_nm`` (AdaLN before the head: LN, then ``* (1 + scale) + shift`` from
  SiLU + Linear ``C -> 2C`` of the class embedding) and ``head`` (Linear ``C -> V``).
- Initialisation (VAR's ``init_weights`` with ``build_vae_var``'s arguments): every linear and
  embedding ``N(0, sqrt(1 / (3 C)))`` with zero biases; ``head`` weight times 0.02; ``head_nm``
  weight times 0.5; in each block ``proj`` and ``fc2`` divided by ``sqrt(2 depth)``, the
  ``ada_lin`` columns of the two gammas times 1e-5 and the rest times 0.5 (``ada_gss``: ``N(0,
  1/C)`` with the same multipliers).

Parameter names follow VAR where they are identifiers; every kernel is ``[in, out]`` (PyTorch's
transpose) and attention kernels keep the head axis: ``mat_qkv [C, 3, H, hd]`` (VAR's ``[3C, C]``
weight transposed and reshaped), ``q_bias``/``v_bias [H, hd]``, ``scale_mul [H]`` (VAR's
``scale_mul_1H11``), ``proj [H, hd, C]`` with ``proj_bias [C]``; ``pos_start [s_0², C]`` and
``pos_1LC [L, C]`` drop VAR's leading 1.

Deviations from VAR, none of which changes the function computed by VAR's 256px models:

- Dropout and attention dropout (``drop_rate``, ``attn_drop_rate``: 0 in every VAR build) and
  progressive training (``prog_si``) are not implemented.
- VAR's ``forward`` drops labels to the null class in every call, evaluation included; here only
  with ``train=True``.
- VAR draws its weights with ``trunc_normal_`` cut at ±2 in absolute value, more than 100
  standard deviations at these widths; a plain normal is used here.
- The head runs in the compute dtype; logits are returned as float32.
- Sampling: VAR's ``cfg`` is the guidance *added* at the last scale (``(1 + t) cond - t uncond``
  with ``t = cfg * si / (S - 1)``); here guidance is the shared ``cond + (s - 1) (cond - uncond)``
  with the linear schedule ``s = 1 + (cfg_scale - 1) * si / (S - 1)``, so VAR's ``cfg=1.5`` is
  ``cfg_scale=2.5`` (and ``cfg_scale=1`` is no guidance). VAR's ``top_p=0`` means "off"; here
  ``top_p=1`` is off (:mod:`vqgen.generators.sampling`). VAR's ``more_smooth`` (Gumbel-softmax
  code mixing for visualisation, not used for FID) is not implemented.

Parameter counts (:func:`count_params`, vocabulary 4096, 1000 classes, VAR's 256px scales,
``Cvae = 32``): d16 310.28M, d20 600.92M, d24 1.033B, d30 2.010B — VAR's model zoo lists 310M,
600M, 1.0B and 2.0B.

Sampler (:func:`sample`): the tokenizer's quantizer is an explicit input — its parameters
``vq_params`` (the ``codebook [V, Cvae]`` and Φ convolutions ``phi_k``) and a static
:class:`ScaleCodec` (scales, Φ sharing and ratio; ``phi_ratio=0`` is Φ = identity). One jitted
program runs all scales: at scale ``k`` the input is the area-downsampled running ``f_hat``
(the class token at ``k = 0``), a preallocated KV cache of ``L`` slots receives the scale's keys
and values, all tokens of the scale are drawn at once, and ``f_hat += Φ_k(bicubic
up(codebook[codes]))`` (VAR's ``get_next_autoregressive_input``). By default the scales are
traced one after another into the program, each at its own ``s_k²`` positions (no Python runs
per scale when sampling; the program holds one copy of the transformer per scale). With
``unroll=False`` a ``lax.fori_loop`` holds one copy whose every iteration processes a block of
``max(s)²`` positions from the scale's first position; positions beyond the scale are padding —
masked as keys, ignored in ``f_hat`` and overwritten by the next scale — which costs up to
``S * max(s)² / L`` times the compute (3.8 for VAR's 256px schedule) for a smaller program.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqgen.generators import sampling
from vqgen.modules.attention import Cache
from vqgen.quantizers.multiscale import VAR_SCALES, Phi, area_matrix, bicubic_matrix, phi_assignment

# The generator protocol (vqgen/generators/__init__.py): image tokens, as the multi-scale pyramid
# of a tokenizer with scales, and the tokenizer's quantizer (codebook and Φ) as a frozen input.
VIDEO = False
TOKEN_PYRAMID = True
USES_QUANTIZER = True

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

_MASK_VALUE = -1e30
_MAX_SCALE_MUL = math.log(100.0)


def var_dims(depth: int) -> dict[str, Any]:
    """VAR's sizes tied to depth (``build_vae_var``): width 64·depth, depth heads, drop path 0.1·depth/24."""
    return dict(depth=depth, width=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24)


# VAR's model zoo (256px): VAR-d16 310M, d20 600M, d24 1.0B, d30 2.0B parameters.
VARIANTS: dict[str, dict[str, Any]] = {f"d{d}": var_dims(d) for d in (16, 20, 24, 30)}


# ------------------------------------------------------------------------------ scale layout


class Layout(NamedTuple):
    """Static bookkeeping of a scale schedule (NumPy, cached per schedule)."""

    scales: tuple[int, ...]
    seq_len: int  # L = sum(s*s)
    first_len: int  # s_0²: the start-of-sequence positions
    block: int  # max(s)²: positions one sampler iteration processes
    begins: np.ndarray  # [S] int32, first position of each scale
    levels: np.ndarray  # [L] int32, the scale index of each position


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """``scales`` as a tuple of ints; raises ``ValueError`` unless positive with the largest last."""
    scales = tuple(int(s) for s in scales)
    if not scales or min(scales) < 1:
        raise ValueError(f"scales={scales} must be a non-empty list of positive map sizes, e.g. {VAR_SCALES}.")
    if max(scales) != scales[-1]:
        raise ValueError(f"scales={scales} must end with the largest map (the token grid), e.g. {VAR_SCALES}.")
    return scales


@functools.lru_cache(maxsize=32)
def layout(scales: tuple[int, ...]) -> Layout:
    """The :class:`Layout` of a schedule."""
    scales = check_scales(scales)
    sizes = [s * s for s in scales]
    begins = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    levels = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(sizes)])
    return Layout(scales, int(sum(sizes)), sizes[0], max(sizes), begins, levels)


def split_scales(tokens: jax.Array, scales: Sequence[int]) -> tuple[jax.Array, ...]:
    """``[B, L]`` token sequence -> tuple of row-major ``[B, s, s]`` code maps."""
    lay = layout(tuple(scales))
    if tokens.shape[-1] != lay.seq_len:
        raise ValueError(
            f"tokens have length {tokens.shape[-1]} but scales {lay.scales} make {lay.seq_len} tokens; "
            "pass the whole token pyramid."
        )
    return tuple(
        tokens[:, b : b + s * s].reshape(tokens.shape[0], s, s) for b, s in zip(lay.begins.tolist(), lay.scales)
    )


def join_scales(maps: Sequence[jax.Array]) -> jax.Array:
    """Tuple of ``[B, s, s]`` code maps (the quantizer's ``indices``) -> ``[B, L]`` int32 sequence."""
    return jnp.concatenate([m.reshape(m.shape[0], -1) for m in maps], axis=1).astype(jnp.int32)


def block_causal_mask(scales: Sequence[int]) -> np.ndarray:
    """Boolean ``[L, L]``: position ``i`` sees ``j`` iff ``j``'s scale is not after ``i``'s (VAR's mask)."""
    levels = layout(tuple(scales)).levels
    return levels[None, :] <= levels[:, None]


# ------------------------------------------------------------- tokenizer side: f_hat and Φ


@dataclasses.dataclass(frozen=True)
class ScaleCodec:
    """How code maps become VAR's continuous inputs: the static part of the tokenizer's
    multi-scale residual quantizer (its weights, ``vq_params``, are passed separately).

    Scale ``k``'s codes add ``Φ_k(bicubic_up(codebook[codes]))`` to ``f_hat [B, H, W, Cvae]``
    (no resampling at the last scale), and the input of scale ``k + 1`` is ``f_hat``
    area-downsampled to ``s_{k+1}``: VAR's ``idxBl_to_var_input`` and
    ``get_next_autoregressive_input``, with the same resampling matrices as
    :class:`~vqgen.quantizers.multiscale.MultiScaleResidualQuantizer`.

    Attributes:
      scales: the schedule (the quantizer's ``scales``).
      phi_share: Φ sharing (the quantizer's ``phi_share``: 1 shared, 0 one per scale, k > 1 k Φs).
      phi_ratio: Φ's mixing ratio; 0 makes Φ the identity (then ``vq_params`` needs only the codebook).
      dtype: compute dtype of the Φ convolutions (the quantizer's ``dtype``).
    """

    scales: tuple[int, ...] = VAR_SCALES
    phi_share: int = 4
    phi_ratio: float = 0.5
    dtype: Dtype = jnp.float32

    def __post_init__(self):
        object.__setattr__(self, "scales", check_scales(self.scales))

    @classmethod
    def from_quantizer(cls, quantizer: Any) -> "ScaleCodec":
        """The codec of a :class:`~vqgen.quantizers.multiscale.MultiScaleResidualQuantizer`."""
        return cls(tuple(quantizer.scales), int(quantizer.phi_share), float(quantizer.phi_ratio), quantizer.dtype)

    @property
    def uses_phi(self) -> bool:
        return abs(self.phi_ratio) > 1e-6  # as the quantizer decides

    @property
    def phi_index(self) -> tuple[int, ...]:
        """Which Φ (``phi_{i}``) each scale uses."""
        return tuple(phi_assignment(len(self.scales), self.phi_share))


class _CodecTables(NamedTuple):
    up: np.ndarray  # [S, H, H] bicubic s_k -> H (columns >= s_k zero; identity at s_k == H)
    down: np.ndarray  # [S, H, H] area H -> s_k (rows >= s_k zero; identity at s_k == H)
    grid_token: np.ndarray  # [S, H*H] int32: which token of scale k fills map cell (i, j), i, j < s_k
    grid_valid: np.ndarray  # [S, H*H] float32: 1 where i, j < s_k
    token_cell: np.ndarray  # [S, P] int32: the H×H cell (i*H + j) of token t = i*s_k + j
    token_valid: np.ndarray  # [S, P] float32: 1 where t < s_k²


@functools.lru_cache(maxsize=32)
def _codec_tables(scales: tuple[int, ...]) -> _CodecTables:
    lay = layout(scales)
    size, p = scales[-1], lay.block
    up = np.zeros((len(scales), size, size), np.float32)
    down = np.zeros((len(scales), size, size), np.float32)
    grid_token = np.zeros((len(scales), size * size), np.int32)
    grid_valid = np.zeros((len(scales), size * size), np.float32)
    token_cell = np.zeros((len(scales), p), np.int32)
    token_valid = np.zeros((len(scales), p), np.float32)
    for k, s in enumerate(scales):
        up[k, :, :s] = np.eye(size, dtype=np.float32) if s == size else bicubic_matrix(size, s)
        down[k, :s, :] = np.eye(size, dtype=np.float32) if s == size else area_matrix(s, size)
        i, j = np.divmod(np.arange(s * s), s)
        grid_token[k, i * size + j] = np.arange(s * s)
        grid_valid[k, i * size + j] = 1.0
        token_cell[k, : s * s] = i * size + j
        token_valid[k, : s * s] = 1.0
    return _CodecTables(up, down, grid_token, grid_valid, token_cell, token_valid)


def _table_row(table: np.ndarray, k: jax.Array | int) -> jax.Array:
    return table[k] if isinstance(k, int) else jnp.asarray(table)[k]


def _resample(matrix: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.einsum("ih,jw,bhwc->bijc", matrix, matrix, x, precision=jax.lax.Precision.HIGHEST)


def check_vq_params(vq_params: Any, codec: ScaleCodec, vocab_size: int | None = None, vae_dim: int | None = None):
    """Raises ``ValueError`` unless ``vq_params`` holds the codebook (and Φs) that ``codec`` needs."""
    if not isinstance(vq_params, dict) or "codebook" not in vq_params:
        raise ValueError(
            "vq_params must be the params of the tokenizer's MultiScaleResidualQuantizer (a dict with "
            "'codebook' [V, Cvae] and its Φ convolutions 'phi_k'); pass tokenizer_params[...]['quantizer']."
        )
    shape = tuple(np.shape(nn.meta.unbox(vq_params["codebook"])))
    wrong_vocab = vocab_size is not None and len(shape) == 2 and shape[0] != vocab_size
    wrong_dim = vae_dim is not None and len(shape) == 2 and shape[1] != vae_dim
    if len(shape) != 2 or wrong_vocab or wrong_dim:
        raise ValueError(
            f"vq_params['codebook'] has shape {shape} but this VAR predicts {vocab_size} codes of width "
            f"{vae_dim}; build the generator with the tokenizer's codebook_size and latent width (vae_dim)."
        )
    if codec.uses_phi:
        missing = sorted({f"phi_{i}" for i in codec.phi_index} - set(vq_params))
        if missing:
            raise ValueError(
                f"vq_params lacks {missing} for phi_share={codec.phi_share}; pass the quantizer's params with its Φs, "
                "or a ScaleCodec with phi_ratio=0.0 for a tokenizer without Φ."
            )


def scale_input(codec: ScaleCodec, f_hat: jax.Array, k: jax.Array | int) -> jax.Array:
    """``f_hat [B, H, W, C]`` area-downsampled to scale ``k``, as float32 tokens in row-major order:
    ``[B, s_k², C]`` for a Python int ``k``; ``[B, max(s)², C]``, zero beyond ``s_k²``, for a
    traced ``k``."""
    if isinstance(k, int):
        s, size = codec.scales[k], codec.scales[-1]
        small = f_hat.astype(jnp.float32)
        if s != size:
            small = _resample(jnp.asarray(area_matrix(s, size)), small)  # [B, s, s, C]
        return small.reshape(small.shape[0], s * s, small.shape[-1])
    tab = _codec_tables(codec.scales)
    b, size, _, c = f_hat.shape
    small = _resample(_table_row(tab.down, k), f_hat.astype(jnp.float32))  # [B, H, H, C], valid [:s, :s]
    cells = _table_row(tab.token_cell, k)  # [P]
    tokens = jnp.take(small.reshape(b, size * size, c), cells, axis=1)  # [B, P, C]
    return tokens * _table_row(tab.token_valid, k)[None, :, None]


def _apply_phi(codec: ScaleCodec, vq_params: Any, h: jax.Array, k: jax.Array | int) -> jax.Array:
    if not codec.uses_phi:
        return h
    phi = Phi(codec.phi_ratio, dtype=codec.dtype)
    index = codec.phi_index
    count = max(index) + 1
    branches = [
        functools.partial(lambda i, x: phi.apply({"params": vq_params[f"phi_{i}"]}, x), i) for i in range(count)
    ]
    if isinstance(k, int):
        return branches[index[k]](h)
    if count == 1:
        return branches[0](h)
    return jax.lax.switch(jnp.asarray(index, jnp.int32)[k], branches, h)


def scale_residual(codec: ScaleCodec, vq_params: Any, codes: jax.Array, k: jax.Array | int) -> jax.Array:
    """Scale ``k``'s contribution to ``f_hat``: ``Φ_k(bicubic_up(codebook[codes]))`` ``[B, H, W, C]``
    float32, from ``codes [B, P]`` (P >= s_k²; codes beyond ``s_k²`` are ignored). ``k`` may be traced."""
    codebook = nn.meta.unbox(vq_params["codebook"]).astype(jnp.float32)  # [V, C]
    size = codec.scales[-1]
    b = codes.shape[0]
    if isinstance(k, int):  # the scale's own size: no padding
        s = codec.scales[k]
        h = jnp.take(codebook, codes[:, : s * s].astype(jnp.int32), axis=0).reshape(b, s, s, -1)  # [B, s, s, C]
        if s != size:
            h = _resample(jnp.asarray(bicubic_matrix(size, s)), h)  # [B, H, W, C]
        return _apply_phi(codec, nn.meta.unbox(vq_params), h, k).astype(jnp.float32)
    tab = _codec_tables(codec.scales)
    emb = jnp.take(codebook, codes.astype(jnp.int32), axis=0)  # [B, P, C]
    grid = jnp.take(emb, _table_row(tab.grid_token, k), axis=1)  # [B, H*H, C]
    grid = (grid * _table_row(tab.grid_valid, k)[None, :, None]).reshape(b, size, size, -1)  # [B, H, H, C]
    h = _resample(_table_row(tab.up, k), grid)  # [B, H, W, C]
    return _apply_phi(codec, nn.meta.unbox(vq_params), h, k).astype(jnp.float32)


def _accumulate(tokens: Any, vq_params: Any, codec: ScaleCodec) -> tuple[jax.Array, jax.Array]:
    if isinstance(tokens, (tuple, list)):
        tokens = join_scales(tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    check_vq_params(vq_params, codec)
    lay = layout(codec.scales)
    if tokens.ndim != 2 or tokens.shape[1] != lay.seq_len:
        raise ValueError(
            f"tokens have shape {tokens.shape} but scales {lay.scales} make [B, {lay.seq_len}] sequences; "
            "pass the whole token pyramid (or the tuple of [B, s, s] maps)."
        )
    b, size = tokens.shape[0], codec.scales[-1]
    cvae = np.shape(nn.meta.unbox(vq_params["codebook"]))[1]
    f_hat = jnp.zeros((b, size, size, cvae), jnp.float32)
    inputs = []
    for k, s in enumerate(codec.scales):
        start = int(lay.begins[k])
        f_hat = f_hat + scale_residual(codec, vq_params, tokens[:, start : start + s * s], k)
        if k + 1 < len(codec.scales):
            inputs.append(scale_input(codec, f_hat, k + 1))  # [B, s_{k+1}², C]
    x_input = jnp.concatenate(inputs, axis=1) if inputs else jnp.zeros((b, 0, cvae), jnp.float32)
    return x_input, f_hat


def teacher_forcing_input(tokens: Any, vq_params: Any, codec: ScaleCodec = ScaleCodec()) -> jax.Array:
    """VAR's teacher-forcing input (``idxBl_to_var_input``) of a token pyramid: float32
    ``[B, L - s_0², Cvae]``.

    ``tokens`` is the ``[B, L]`` sequence or the tuple of ``[B, s, s]`` maps; ``vq_params`` the
    tokenizer quantizer's params (``codebook`` and Φs ``phi_k``), ``codec`` its static settings
    (:meth:`ScaleCodec.from_quantizer`). For ``k = 0 .. S-2``: ``f_hat += Φ_k(up(codebook[map_k]))``,
    then ``area_down(f_hat, s_{k+1})`` flattened row-major is the input of scale ``k + 1``. Pure
    and jittable (``codec`` static).
    """
    return _accumulate(tokens, vq_params, codec)[0]


def f_hat_from_tokens(tokens: Any, vq_params: Any, codec: ScaleCodec = ScaleCodec()) -> jax.Array:
    """The quantized feature map ``f_hat [B, H, W, Cvae]`` of a token pyramid (what the
    quantizer's ``decode_indices`` returns), float32."""
    return _accumulate(tokens, vq_params, codec)[1]


# ------------------------------------------------------------------------------------ model


def _normal(std: float, chunk_scale: tuple[float, ...] | None = None, chunk_axis: int = -1):
    """``N(0, std)`` initializer; ``chunk_scale`` multiplies equal chunks of ``chunk_axis`` (VAR's
    AdaLN init scales the two gamma chunks and the four scale/shift chunks differently)."""

    def init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, jnp.float32) * std
        if chunk_scale is not None:
            axis = chunk_axis % len(shape)
            mult = np.repeat(np.asarray(chunk_scale, np.float32), shape[axis] // len(chunk_scale))
            w = w * jnp.asarray(mult).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        return w.astype(dtype)

    return init


class Linear(nn.Module):
    """Linear map of the last ``contract_dims`` axes to ``features`` (kernel ``[*in, *features]``
    with logical ``axes``), optional zero-initialised bias ``[*features]``; ``N(0, std)`` kernel
    whose last axis is split into ``len(chunk_scale)`` equal chunks multiplied by ``chunk_scale``."""

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    std: float
    contract_dims: int = 1
    use_bias: bool = True
    chunk_scale: tuple[float, ...] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = tuple(self.features)
        in_shape = x.shape[x.ndim - self.contract_dims :]
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(_normal(self.std, self.chunk_scale), self.axes), in_shape + feats,
            self.param_dtype,
        )  # [*in, *out]
        contract = (tuple(range(x.ndim - self.contract_dims, x.ndim)), tuple(range(self.contract_dims)))
        # Accumulated and returned in float32 before the cast to the compute dtype: the same
        # numbers as a bfloat16 output on accelerators, and XLA's CPU backend runs a bfloat16
        # matmul with a float32 result several times faster than one with a bfloat16 result.
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())),
                                preferred_element_type=jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.contract_dims :]),
                feats, self.param_dtype,
            )  # [*out]
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def layer_norm(x: jax.Array, eps: float, dtype: Dtype) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(dtype)


def _l2_normalize(x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), 1e-12)


def drop_path(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth: zeroes a sample's residual branch with probability ``rate`` and scales
    the others by ``1 / (1 - rate)``; the identity when ``rng`` is None."""
    if rate <= 0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class SelfAttention(nn.Module):
    """VAR's self-attention with an optional preallocated KV cache ``{'k', 'v'}: [B, H, L, hd]``.

    ``mask [S, T]`` (bool) says which of the ``T`` keys (the cache, or the ``S`` inputs without
    one) each query sees; with a cache the ``S`` new keys/values are written at ``pos``, and a
    mask narrower than the cache (``T < L``, static) attends to its first ``T`` slots only, so
    the sampler's early scales do not pay for the empty slots of later ones.
    """

    width: int
    num_heads: int
    l2_norm: bool = True
    init_std: float = 0.02
    proj_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, cache: Cache | None = None, pos: jax.Array | int = 0):
        b, s, _ = x.shape
        h, hd = self.num_heads, self.width // self.num_heads
        qkv = Linear((3, h, hd), ("embed", None, "heads", "kv"), self.init_std, use_bias=False,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="mat_qkv")(x)  # [B, S, 3, H, hd]
        zeros = nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "kv"))
        q_bias = self.param("q_bias", zeros, (h, hd), self.param_dtype)
        v_bias = self.param("v_bias", zeros, (h, hd), self.param_dtype)
        q = qkv[:, :, 0] + q_bias.astype(self.dtype)  # [B, S, H, hd]
        k = qkv[:, :, 1]  # [B, S, H, hd]
        v = qkv[:, :, 2] + v_bias.astype(self.dtype)  # [B, S, H, hd]
        if self.l2_norm:
            scale_mul = self.param(
                "scale_mul", nn.with_logical_partitioning(nn.initializers.constant(math.log(4.0)), ("heads",)),
                (h,), self.param_dtype,
            )  # [H] log-scale
            mul = jnp.exp(jnp.minimum(scale_mul.astype(jnp.float32), _MAX_SCALE_MUL))  # [H]
            q = (_l2_normalize(q) * mul[:, None]).astype(self.dtype)
            k = _l2_normalize(k).astype(self.dtype)
            softmax_scale = 1.0
        else:
            softmax_scale = 0.25 / math.sqrt(hd)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = k.transpose(0, 2, 1, 3)  # [B, H, S, hd]
        v = v.transpose(0, 2, 1, 3)  # [B, H, S, hd]
        if cache is None:
            keys, values, new_cache = k, v, None
        else:
            start = (0, 0, pos, 0)
            keys = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)  # [B, H, T, hd]
            values = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)  # [B, H, T, hd]
            new_cache = {"k": keys, "v": values}
            if mask.shape[-1] < keys.shape[2]:  # a mask over the first cache slots: attend to those only
                keys, values = keys[:, :, :mask.shape[-1]], values[:, :, :mask.shape[-1]]
        scores = jnp.einsum("bshd,bhtd->bhst", q, keys.astype(self.dtype), preferred_element_type=jnp.float32)
        scores = jnp.where(mask, scores * softmax_scale, _MASK_VALUE)  # [B, H, S, T]
        probs = jax.nn.softmax(scores, axis=-1)  # float32
        out = jnp.einsum("bhst,bhtd->bshd", probs.astype(self.dtype), values.astype(self.dtype),
                         preferred_element_type=jnp.float32).astype(self.dtype)  # [B, S, H, hd]
        out = Linear((self.width,), ("heads", "kv", "embed"), self.proj_std, contract_dims=2,
                     dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(out)  # [B, S, C]
        return out, new_cache


class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))`` with hidden width ``round(C * mlp_ratio)``."""

    mlp_ratio: float = 4.0
    init_std: float = 0.02
    out_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        hidden = int(round(c * self.mlp_ratio))
        y = Linear((hidden,), ("embed", "mlp"), self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                   name="fc1")(x)  # [B, S, F]
        y = nn.with_logical_constraint(jax.nn.gelu(y, approximate=True), ("batch", "length", "mlp"))
        return Linear((c,), ("mlp", "embed"), self.out_std, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="fc2")(y)  # [B, S, C]


class AdaLNSelfAttn(nn.Module):
    """A VAR block: AdaLN-modulated self-attention and FFN, each gated and drop-pathed.

    ``cond`` is the class embedding ``[B, C]`` (per-block AdaLN) or, with ``shared_aln``, the
    output of the model's ``shared_ada_lin`` ``[B, 6, C]``.
    """

    width: int
    num_heads: int
    depth: int
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    shared_aln: bool = False
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond, mask, cache=None, pos=0, train=False):
        c = self.width
        mult = (self.init_adaln_gamma,) * 2 + (self.init_adaln,) * 4  # gamma1, gamma2, scale1, scale2, shift1, shift2
        if self.shared_aln:
            gss = self.param(
                "ada_gss", nn.with_logical_partitioning(_normal(c**-0.5, mult, chunk_axis=0), (None, "embed")),
                (6, c), self.param_dtype,
            )  # [6, C]
            ada = gss.astype(jnp.float32)[None] + cond.astype(jnp.float32)  # [B, 6, C]
        else:
            ada = Linear((6 * c,), ("embed", "mlp"), self.init_std, chunk_scale=mult, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="ada_lin")(nn.silu(cond))  # [B, 6C]
            ada = ada.reshape(-1, 6, c)
        ada = ada.astype(self.dtype)[:, :, None, :]  # [B, 6, 1, C]
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada[:, i] for i in range(6))  # [B, 1, C] each
        proj_std = self.init_std / math.sqrt(2 * self.depth)
        rng = self.make_rng("dropout") if train and self.drop_path_rate > 0 else None
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))

        h = layer_norm(x, self.norm_eps, self.dtype) * (1 + scale1) + shift1  # [B, S, C]
        attn, cache = SelfAttention(c, self.num_heads, self.attn_l2_norm, self.init_std, proj_std, self.dtype,
                                    self.param_dtype, name="attn")(h, mask, cache, pos)  # [B, S, C]
        x = x + drop_path(attn * gamma1, self.drop_path_rate, rngs[0])
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = layer_norm(x, self.norm_eps, self.dtype) * (1 + scale2) + shift2  # [B, S, C]
        ffn = FFN(self.mlp_ratio, self.init_std, proj_std, self.dtype, self.param_dtype, name="ffn")(h)  # [B, S, C]
        x = x + drop_path(ffn * gamma2, self.drop_path_rate, rngs[1])
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class AdaLNBeforeHead(nn.Module):
    """LN without affine, then ``* (1 + scale) + shift`` from SiLU + Linear ``C -> 2C`` of the condition."""

    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cond):
        c = x.shape[-1]
        ada = Linear((2 * c,), ("embed", "mlp"), self.init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="ada_lin")(nn.silu(cond))  # [B, 2C]
        scale, shift = ada[:, None, :c], ada[:, None, c:]  # [B, 1, C] each
        return layer_norm(x, self.norm_eps, self.dtype) * (1 + scale) + shift


class VAR(nn.Module):
    """VAR next-scale transformer over the token pyramid of ``scales`` (see the module docstring).

    Methods (logits are float32):

    - ``__call__(x_input [B, L - s_0², vae_dim], labels [B], train=False) -> [B, L, V]``: the
      teacher-forced forward pass; ``logits[:, i]`` predicts token ``i`` of the pyramid.
      ``train=True`` drops labels to the null class with probability ``cond_drop_rate`` and
      applies drop path (rng ``'dropout'``).
    - ``step(x_block [B, P, vae_dim], labels [B], k, cache) -> ([B, P, V], cache)``: scale ``k``
      (may be traced) with a KV cache from :func:`init_cache`; ``P = max(s)²``, the first
      ``s_k²`` rows are the scale's inputs (ignored at ``k = 0``, where the class token is used)
      and the rest is padding.

    ``width``, ``num_heads`` and ``drop_path_rate`` default to VAR's ties to ``depth`` (64·depth,
    depth, 0.1·depth/24); ``init_std`` to ``sqrt(1 / (3 width))``.
    """

    vocab_size: int = 4096
    num_classes: int = 1000
    scales: tuple[int, ...] = VAR_SCALES
    vae_dim: int = 32
    depth: int = 16
    width: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_path_rate: float | None = None
    cond_drop_rate: float = 0.1
    shared_aln: bool = False
    attn_l2_norm: bool = True
    norm_eps: float = 1e-6
    init_std: float | None = None
    init_head: float = 0.02
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def embed_dim(self) -> int:
        return int(self.width or 64 * self.depth)

    @property
    def heads(self) -> int:
        return int(self.num_heads or self.depth)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.heads

    @property
    def drop_path_rates(self) -> tuple[float, ...]:
        """Per-block drop-path rates, ``linspace(0, drop_path_rate, depth)`` (VAR's rule)."""
        top = 0.1 * self.depth / 24 if self.drop_path_rate is None else float(self.drop_path_rate)
        return tuple(float(r) for r in np.linspace(0.0, top, self.depth))

    @property
    def layout(self) -> Layout:
        return layout(tuple(self.scales))

    @property
    def seq_len(self) -> int:
        """L: the number of tokens of the pyramid."""
        return self.layout.seq_len

    @property
    def std(self) -> float:
        return float(self.init_std) if self.init_std is not None else math.sqrt(1.0 / self.embed_dim / 3.0)

    def setup(self):
        if self.embed_dim % self.heads:
            raise ValueError(f"width={self.embed_dim} is not divisible by num_heads={self.heads}; change one of them.")
        lay = self.layout
        c, std = self.embed_dim, self.std
        table = lambda: nn.with_logical_partitioning(_normal(std), (None, "embed"))  # noqa: E731
        self.word_embed = Linear((c,), (None, "embed"), std, dtype=self.dtype, param_dtype=self.param_dtype)
        self.class_emb = self.param("class_emb", table(), (self.num_classes + 1, c), self.param_dtype)
        self.pos_start = self.param("pos_start", table(), (lay.first_len, c), self.param_dtype)
        self.pos_1LC = self.param("pos_1LC", table(), (lay.seq_len, c), self.param_dtype)
        self.lvl_embed = self.param("lvl_embed", table(), (len(lay.scales), c), self.param_dtype)
        if self.shared_aln:
            self.shared_ada_lin = Linear(
                (6 * c,), ("embed", "mlp"), std, dtype=self.dtype, param_dtype=self.param_dtype
            )
        self.blocks = [
            AdaLNSelfAttn(
                c, self.heads, self.depth, self.mlp_ratio, rate, self.shared_aln, self.attn_l2_norm, self.norm_eps,
                std, self.init_adaln, self.init_adaln_gamma, self.dtype, self.param_dtype,
            )
            for rate in self.drop_path_rates
        ]
        self.head_nm = AdaLNBeforeHead(self.norm_eps, std * self.init_adaln, self.dtype, self.param_dtype)
        self.head = Linear((self.vocab_size,), ("embed", "vocab"), std * self.init_head, dtype=self.dtype,
                           param_dtype=self.param_dtype)

    def _lvl_pos(self) -> jax.Array:
        """``lvl_embed[level] + pos_1LC``: ``[L, C]`` float32."""
        lvl = jnp.take(self.lvl_embed.astype(jnp.float32), jnp.asarray(self.layout.levels), axis=0)
        return lvl + self.pos_1LC.astype(jnp.float32)

    def _cond(self, labels: jax.Array) -> jax.Array:
        return jnp.take(self.class_emb.astype(jnp.float32), labels.astype(jnp.int32), axis=0)  # [B, C]

    def _trunk(self, h, cond, mask, cache, pos, train):
        """Blocks + AdaLN head over ``h [B, S, C]`` with the class embedding ``cond [B, C]``."""
        h = nn.with_logical_constraint(h.astype(self.dtype), ("batch", "length", "embed"))
        cond_in = cond.astype(self.dtype)
        block_cond = cond_in
        if self.shared_aln:
            block_cond = self.shared_ada_lin(nn.silu(cond_in)).reshape(-1, 6, self.embed_dim)  # [B, 6, C]
        new_cache = None if cache is None else []
        for i, block in enumerate(self.blocks):
            h, c = block(h, block_cond, mask, None if cache is None else cache[i], pos, train)  # [B, S, C]
            if cache is not None:
                new_cache.append(c)
        logits = self.head(self.head_nm(h, cond_in)).astype(jnp.float32)  # [B, S, V]
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), new_cache

    def __call__(self, x_input: jax.Array, labels: jax.Array, *, train: bool = False) -> jax.Array:
        lay = self.layout
        want = (lay.seq_len - lay.first_len, self.vae_dim)
        if x_input.ndim != 3 or tuple(x_input.shape[1:]) != want:
            raise ValueError(
                f"x_input has shape {tuple(x_input.shape)} but scales {lay.scales} with vae_dim={self.vae_dim} need "
                f"[B, {want[0]}, {want[1]}]; compute it with var.teacher_forcing_input(tokens, vq_params, codec)."
            )
        labels = labels.astype(jnp.int32)
        if train and self.cond_drop_rate > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.cond_drop_rate  # [B]
            labels = jnp.where(drop, self.num_classes, labels)
        cond = self._cond(labels)  # [B, C]
        sos = cond[:, None, :] + self.pos_start.astype(jnp.float32)[None]  # [B, s_0², C]
        words = self.word_embed(x_input.astype(jnp.float32)).astype(jnp.float32)  # [B, L - s_0², C]
        h = jnp.concatenate([sos, words], axis=1) + self._lvl_pos()[None]  # [B, L, C]
        mask = jnp.asarray(block_causal_mask(lay.scales))  # [L, L]
        logits, _ = self._trunk(h, cond, mask, None, 0, train)  # [B, L, V]
        return logits

    def step(self, x_block: jax.Array, labels: jax.Array, k: jax.Array | int, cache: list[Cache]):
        lay = self.layout
        if isinstance(k, int):  # a static scale: exactly its s_k² positions
            begin, n = int(lay.begins[k]), lay.scales[k] ** 2
            cond = self._cond(labels)  # [B, C]
            if k == 0:
                h = cond[:, None, :] + self.pos_start.astype(jnp.float32)[None]  # [B, s_0², C]
            else:
                h = self.word_embed(x_block[:, :n].astype(jnp.float32)).astype(jnp.float32)  # [B, s_k², C]
            h = h + self._lvl_pos()[None, begin:begin + n]
            end = begin + n  # keys of scales <= k: the first `end` cache slots, the only ones attended
            mask = np.ones((1, end), bool)  # [1, end]
            return self._trunk(h, cond, mask, cache, begin, False)  # [B, s_k², V]
        p = lay.block
        begin = jnp.asarray(lay.begins)[k]
        cond = self._cond(labels)  # [B, C]
        first = cond[:, None, :] + jnp.pad(self.pos_start.astype(jnp.float32), ((0, p - lay.first_len), (0, 0)))[None]
        words = self.word_embed(x_block.astype(jnp.float32)).astype(jnp.float32)  # [B, P, C]
        pos = jax.lax.dynamic_slice_in_dim(self._lvl_pos(), begin, p)  # [P, C]
        h = jnp.where(k == 0, first, words) + pos[None]  # [B, P, C]
        mask = (jnp.asarray(lay.levels) <= k)[None, :]  # [1, L]: every key of scales <= k
        return self._trunk(h, cond, mask, cache, begin, False)  # [B, P, V]


def var_variant(name: str, **overrides: Any) -> VAR:
    """A :class:`VAR` of the size ``name`` (one of :data:`VARIANTS`), fields overridable."""
    if name not in VARIANTS:
        raise ValueError(f"VAR variant {name!r} is unknown; choose one of {sorted(VARIANTS)}.")
    return VAR(**{**VARIANTS[name], **overrides})


def init_cache(model: VAR, batch: int, dtype: Dtype | None = None) -> list[Cache]:
    """Preallocated per-block KV caches ``{'k', 'v'}: [batch, heads, L, head_dim]`` (zeros)."""
    dtype = model.dtype if dtype is None else dtype
    shape = (batch, model.heads, model.seq_len, model.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(model.depth)]


def _dummy_inputs(model: VAR, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    lay = model.layout
    return jnp.zeros((batch, lay.seq_len - lay.first_len, model.vae_dim), jnp.float32), jnp.zeros((batch,), jnp.int32)


def init_params(model: VAR, rng: jax.Array) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``model``."""
    return model.init({"params": rng}, *_dummy_inputs(model))["params"]


def abstract_params(model: VAR) -> Any:
    """Boxed ``ShapeDtypeStruct`` parameter tree via ``jax.eval_shape`` (nothing is allocated)."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def count_params(model: VAR) -> int:
    """Number of parameters of ``model``, from shapes only (``jax.eval_shape``)."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(model)))
    return int(sum(int(np.prod(x.shape)) for x in leaves))


def loss_fn(model: VAR, params: Any, batch: dict[str, jax.Array], rng: jax.Array, vq_params: Any = None, *,
            codec: "ScaleCodec | None" = None, train: bool = True):
    """Cross entropy (float32) over every token of every scale, VAR's uniform weights.

    ``batch = {'tokens' int32 [B, L], 'label' int32 [B]}`` plus either ``'x_input'`` float32
    ``[B, L - s_0², vae_dim]`` (:func:`teacher_forcing_input` of the tokens) or the tokenizer's
    quantizer params ``vq_params`` (with its static ``codec``, default VAR's), from which the
    input is computed here (``'labels'`` is accepted for ``'label'``). ``rng`` drives label
    dropout and drop path when ``train``. Returns ``(loss, {'loss', 'accuracy',
    'loss_last_scale', 'accuracy_last_scale'})`` (VAR logs the last scale as its "tail").
    """
    if "x_input" not in batch and vq_params is not None:
        codec = ScaleCodec(tuple(model.scales)) if codec is None else codec
        batch = {**batch, "x_input": teacher_forcing_input(batch["tokens"].astype(jnp.int32), vq_params, codec)}
    if "x_input" not in batch:
        raise ValueError(
            "the VAR loss needs batch['x_input'], the teacher-forcing input of the tokens; pass the tokenizer's "
            "quantizer params as vq_params (or add var.teacher_forcing_input(batch['tokens'], vq_params, codec))."
        )
    tokens = batch["tokens"].astype(jnp.int32)  # [B, L]
    if tokens.ndim != 2 or tokens.shape[1] != model.seq_len:
        raise ValueError(
            f"tokens have shape {tuple(tokens.shape)} but scales {model.layout.scales} make [B, {model.seq_len}]; "
            "pass the whole token pyramid (var.join_scales of the quantizer's index maps)."
        )
    labels = batch["labels" if "labels" in batch else "label"]
    logits = model.apply({"params": params}, batch["x_input"], labels, train=train, rngs={"dropout": rng})  # [B, L, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)  # [B, L]
    hit = (jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32)  # [B, L]
    tail = model.layout.scales[-1] ** 2
    loss = jnp.mean(ce)
    return loss, {
        "loss": loss,
        "accuracy": jnp.mean(hit),
        "loss_last_scale": jnp.mean(ce[:, -tail:]),
        "accuracy_last_scale": jnp.mean(hit[:, -tail:]),
    }


# ----------------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerOptions(sampling.SamplingOptions):
    """VAR's sampler options: the shared :class:`~vqgen.generators.sampling.SamplingOptions`, with
    the guidance schedule defaulting to VAR's ramp over scales (``'linear'``: scale ``si`` of
    ``S`` is guided with ``1 + (cfg_scale - 1) * si / (S - 1)``; the interval counts scales).

    VAR's FID settings (``cfg=1.5, top_k=900, top_p=0.96``) are ``cfg_scale=2.5, top_k=900,
    top_p=0.96`` here: VAR's ``cfg`` is the guidance added at the last scale.
    """

    cfg_schedule: str = "linear"

    _UNIT = "scale"


@flax.struct.dataclass
class _ScaleState:
    tokens: jax.Array  # [B, L] int32, filled up to the current scale
    f_hat: jax.Array  # [B, H, W, Cvae] float32, the running sum of the scales sampled so far
    cache: list  # per-block KV caches
    logits: Any  # [B, L, V] float32 guided logits, or None


def _check_sample_args(model: VAR, labels: Any, opts: Any, vq_params: Any, codec: ScaleCodec) -> None:
    if not isinstance(opts, SamplerOptions):
        raise ValueError(
            f"opts must be var.SamplerOptions, got {type(opts).__name__}; build them with var.sampler_options(...)."
        )
    if opts.top_k > model.vocab_size:
        raise ValueError(
            f"top_k={opts.top_k} is larger than the vocabulary of {model.vocab_size} codes; use at most "
            f"{model.vocab_size}, or 0 to turn top-k off."
        )
    if not isinstance(codec, ScaleCodec):
        raise ValueError(
            f"codec must be a var.ScaleCodec, got {type(codec).__name__}; use ScaleCodec.from_quantizer(q)."
        )
    if tuple(codec.scales) != tuple(model.scales):
        raise ValueError(
            f"the tokenizer's scales {codec.scales} differ from the generator's {tuple(model.scales)}; build both "
            "with the same scale list."
        )
    if vq_params is None:
        raise ValueError(
            "VAR's sampler needs the tokenizer quantizer's params to build each scale's input; pass "
            "vq_params=tokenizer_params[...]['quantizer'] (and codec=ScaleCodec.from_quantizer(q))."
        )
    check_vq_params(nn.meta.unbox(vq_params), codec, model.vocab_size, model.vae_dim)
    if np.ndim(labels) != 1:
        raise ValueError(
            f"labels must be a 1-D array of class ids [B], got shape {np.shape(labels)}; pass one id per sample."
        )
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got dtype {lab.dtype}; cast them to int32.")
        if lab.size and (lab.min() < 0 or lab.max() > model.num_classes):
            raise ValueError(
                f"class ids must lie in [0, {model.num_classes}) (or {model.num_classes} for the unconditional "
                f"null class), got min {lab.min()} and max {lab.max()}; fix the labels or use a model with more "
                "classes."
            )


def sample_tokens(
    model: VAR,
    params: Any,
    labels: jax.Array,
    rng: jax.Array,
    opts: SamplerOptions,
    vq_params: Any,
    codec: ScaleCodec,
    return_logits: bool = False,
    unroll: bool = True,
):
    """Un-jitted body of :func:`sample` (pure; ``model``, ``opts``, ``codec``, ``return_logits``
    and ``unroll`` must be static under jit). Returns ``tokens [B, L]``, or ``(tokens, logits
    [B, L, V], f_hat [B, H, W, Cvae])`` with ``return_logits`` (the guided float32 logits each
    scale was drawn from, and the final quantized feature map).

    ``unroll=True`` traces the scales one after another into the one program, each at its own
    size (``s_k²`` positions); ``unroll=False`` runs a ``lax.fori_loop`` whose body processes
    ``max(s)²`` positions per scale (one copy of the transformer in the program, more compute).
    """
    params = nn.meta.unbox(params)
    vq_params = nn.meta.unbox(vq_params)
    lay = model.layout
    num_scales, size = len(lay.scales), lay.scales[-1]
    batch = labels.shape[0]
    labels = labels.astype(jnp.int32)
    cond = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if opts.uses_cfg else labels  # [B']
    cvae = vq_params["codebook"].shape[1]
    state = _ScaleState(
        tokens=jnp.zeros((batch, lay.seq_len), jnp.int32),
        f_hat=jnp.zeros((batch, size, size, cvae), jnp.float32),
        cache=init_cache(model, cond.shape[0]),
        logits=jnp.zeros((batch, lay.seq_len, model.vocab_size), jnp.float32) if return_logits else None,
    )
    begins = jnp.asarray(lay.begins)

    def body(k, st: _ScaleState) -> _ScaleState:
        x = scale_input(codec, st.f_hat, k)  # [B, P, Cvae]; unused at k = 0
        feed = jnp.concatenate([x, x]) if opts.uses_cfg else x  # [B', P, Cvae]
        logits, cache = model.apply({"params": params}, feed, cond, k, st.cache, method=VAR.step)  # [B', P, V]
        if opts.uses_cfg:
            scale = sampling.cfg_scale_at(k, num_scales, opts.cfg_scale, opts.cfg_schedule, opts.cfg_interval)
            logits = sampling.guide(logits[:batch], logits[batch:], scale)  # [B, P, V]
        codes = sampling.sample_logits(jax.random.fold_in(rng, k), logits, opts.temperature, opts.top_k, opts.top_p)
        # Writes P slots from the scale's start; slots past the scale are rewritten by the next one.
        tokens = jax.lax.dynamic_update_slice(st.tokens, codes, (0, begins[k]))  # [B, L]
        f_hat = st.f_hat + scale_residual(codec, vq_params, codes, k)  # [B, H, W, Cvae]
        out = st.logits
        if out is not None:
            out = jax.lax.dynamic_update_slice(out, logits.astype(jnp.float32), (0, begins[k], 0))  # [B, L, V]
        return _ScaleState(tokens=tokens, f_hat=f_hat, cache=cache, logits=out)

    if unroll:
        for k in range(num_scales):
            state = body(k, state)
    else:
        state = jax.lax.fori_loop(0, num_scales, body, state)
    if return_logits:
        return state.tokens, state.logits, state.f_hat
    return state.tokens


_sample_jit = jax.jit(sample_tokens, static_argnames=("model", "opts", "codec", "return_logits", "unroll"))


def sample(
    model: VAR,
    params: Any,
    labels: Any,
    rng: jax.Array,
    opts: SamplerOptions = SamplerOptions(),
    *,
    vq_params: Any = None,
    codec: ScaleCodec | None = None,
    return_logits: bool = False,
    unroll: bool = True,
):
    """Samples the ``int32 [B, L]`` token pyramid for class ids ``labels [B]`` (KV cache, one program).

    ``vq_params`` are the params of the tokenizer's multi-scale quantizer (``codebook`` and
    ``phi_k``) and ``codec`` its static settings (default: VAR's, ``ScaleCodec(model.scales)``;
    ``phi_ratio=0`` samples with Φ = identity). Jitted end to end with ``model``, ``opts`` and
    ``codec`` static: one compile per model, options, codec and batch size; no Python runs per
    scale. ``unroll`` (default) processes each scale at its own size; ``unroll=False`` uses one
    loop body padded to the largest scale (see :func:`sample_tokens`). Scale ``k`` is drawn
    with key ``jax.random.fold_in(rng, k)``. Raises ``ValueError`` for class ids out of range,
    ``top_k`` above the vocabulary, and missing or mismatched quantizer params.
    """
    codec = ScaleCodec(tuple(model.scales)) if codec is None else codec
    _check_sample_args(model, labels, opts, vq_params, codec)
    return _sample_jit(model, params, jnp.asarray(labels, jnp.int32), rng, opts, vq_params, codec, return_logits,
                       unroll)


# ------------------------------------------------------------------ family adapter (trainers)

_BUILD_KEYS = {f.name for f in dataclasses.fields(VAR)} - {"vocab_size", "num_classes", "parent", "name"}


def build(cfg: dict, *, vocab_size: int, num_classes: int, grid: tuple[int, ...],
          scales: Sequence[int] | None = None, code_dim: int | None = None) -> VAR:
    """A :class:`VAR` from a config section (``config.generator`` as a dict; ``arch`` ignored).

    ``depth`` alone gives VAR's sizes (width 64·depth, depth heads, drop path 0.1·depth/24).
    ``scales`` and ``code_dim`` are the tokenizer's scale list and code dimension (the generator
    phase passes them); the section's own ``scales``/``vae_dim``, where given, must equal them.
    The scales must end with the tokenizer's square grid.
    """
    kw = {k: v for k, v in dict(cfg).items() if k != "arch"}
    unknown = sorted(set(kw) - _BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown VAR config keys {unknown}; valid keys are {sorted(_BUILD_KEYS)}.")
    for key in ("dtype", "param_dtype"):
        if isinstance(kw.get(key), str):
            if kw[key] not in DTYPES:
                raise ValueError(f"generator.{key}={kw[key]!r} is unknown; use one of {sorted(DTYPES)}.")
            kw[key] = DTYPES[kw[key]]
    for key, given in (("scales", scales), ("vae_dim", code_dim)):
        if given is None:
            continue
        given = tuple(int(s) for s in given) if key == "scales" else int(given)
        own = kw.get(key)
        if own is not None and (tuple(int(s) for s in own) if key == "scales" else int(own)) != given:
            raise ValueError(
                f"generator.{key}={own} differs from the tokenizer's {given}; drop generator.{key} (it follows the "
                "tokenizer) or change the tokenizer's quantizer.")
        kw[key] = given
    scales = check_scales(kw.get("scales", VAR_SCALES))
    kw["scales"] = scales
    grid = tuple(int(g) for g in grid)
    if len(grid) != 2 or grid != (scales[-1], scales[-1]):
        raise ValueError(
            f"the last scale of {scales} is {scales[-1]} but the tokenizer's token grid is {grid}; set "
            f"the scales to end with the (square) grid size, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) for 16x16."
        )
    return VAR(vocab_size=vocab_size, num_classes=num_classes, **kw)


def quantizer_codec(quantizer: Any) -> ScaleCodec:
    """The static :class:`ScaleCodec` of a tokenizer's multi-scale quantizer (the generator protocol's
    ``quantizer_codec``)."""
    return ScaleCodec.from_quantizer(quantizer)


def sampler_options(cfg: dict, **overrides: Any) -> SamplerOptions:
    """:class:`SamplerOptions` from a ``config.sample`` section; a key VAR does not read is an error."""
    return SamplerOptions.from_dict(cfg, "var", **overrides)
