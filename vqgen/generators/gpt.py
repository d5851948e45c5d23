"""LlamaGen class-conditional GPT (raster-order autoregressive model over VQ tokens): model,
loss and a KV-cache sampler jitted end to end.

Structure (identical to LlamaGen ``autoregressive/models/gpt.py``, c2i):

- ``cls_embedding.embedding_table [num_classes + 1, D]``: the class label is the single prefix
  token (``cls_token_num = 1``); row ``num_classes`` is the "no label" class used for
  classifier-free guidance. During training labels are replaced by it with probability
  ``class_dropout_prob`` (LlamaGen's ``LabelEmbedder``). As in LlamaGen the extra row exists
  only when ``class_dropout_prob > 0``.
- ``tok_embeddings [vocab_size, D]``, token dropout on the ``[class, tokens]`` sequence.
- ``depth`` pre-norm blocks (``layers_i``: RMSNorm, grouped-query attention with LlamaGen's 2D
  RoPE, RMSNorm, SwiGLU of width ``find_multiple(int(2*4*D/3) * ffn_dim_multiplier, 256)``),
  final ``norm`` and an untied, zero-initialised ``output [D, vocab_size]`` head.
- 2D RoPE over the ``grid = (h, w)`` token grid with the class token first; LlamaGen's table has
  zeros (cos = sin = 0) at the class position, which zeroes the class token's query and key —
  reproduced as is (see :mod:`vqgen.modules.rope`).

Deviations from LlamaGen, none of which changes the function computed:
- ``wqkv`` is stored as three kernels ``wq/wk/wv`` (split its rows ``[D, kv, kv]``), every
  kernel is ``[in, out]`` (PyTorch's transpose) and multi-head kernels keep the head axis
  (``wq [D, H, hd]``, ``wo [H, hd, D]``); RMSNorm ``weight`` is called ``scale`` and
  ``tok_embeddings.weight`` is ``tok_embeddings.embedding`` (flax names). The KV cache is an
  explicit pytree ``[B, KV, T, hd]`` per layer instead of module buffers.
- Stochastic depth (``drop_path_rate``, 0 in LlamaGen's c2i recipe) is not implemented.
- Non-square grids are allowed (LlamaGen asserts a square ``block_size``).

Parameter counts (:func:`count_params`) of :data:`VARIANTS` at vocab 16384, 1000 classes and
256 tokens: B 110.9M, L 342.9M, XL 774.7M, XXL 1.411B, 3B 3.097B — LlamaGen's 111M, 343M, 775M,
1.4B and 3.1B (LlamaGen's code lists GPT_3B under its t2i heading; the paper's c2i 3B has the
same shape and is counted here with the 1000-class table).

Sampler: :func:`sample` validates its inputs and calls a module-level ``jax.jit`` whose static
arguments are the model (a hashable linen dataclass) and the :class:`SamplerConfig`, so it
compiles once per (model, config, batch size) and reuses the executable for any params, labels
and key. Inside, the class token prefills a preallocated KV cache and one ``lax.fori_loop``
decodes one token per step; no per-token Python loop or host sync.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqgen.generators import sampling
from vqgen.modules import weight_quant
from vqgen.modules.attention import Cache, TransformerBlock
from vqgen.modules.attention import init_cache as init_layer_cache
from vqgen.modules.layers import DEFAULT_INIT_STD, RMSNorm, f32_dot_general
from vqgen.modules.rope import rope_2d_table

VIDEO = False  # the token grid is (h, w) (the generator protocol, vqgen/generators/__init__.py)

Dtype = Any

CLS_TOKEN_NUM = 1

# LlamaGen variants GPT_B ... GPT_XXL and GPT_3B: depth (n_layer), width (dim), heads (n_head).
VARIANTS: dict[str, dict[str, int]] = {
    "B": dict(depth=12, width=768, num_heads=12),
    "L": dict(depth=24, width=1024, num_heads=16),
    "XL": dict(depth=36, width=1280, num_heads=20),
    "XXL": dict(depth=48, width=1536, num_heads=24),
    "3B": dict(depth=24, width=3200, num_heads=32),
}


@functools.lru_cache(maxsize=32)
def _rope_tables(grid: tuple[int, int], head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    return rope_2d_table(grid, head_dim, base, prefix_len=CLS_TOKEN_NUM)


class LabelEmbedder(nn.Module):
    """Class-label embedding with label dropout for classifier-free guidance (LlamaGen).

    ``labels [B]`` -> ``[B, 1, D]``. With ``train=True`` and ``dropout_prob > 0`` each label is
    replaced by the null id ``num_classes`` with probability ``dropout_prob`` (rng ``'dropout'``).
    """

    num_classes: int
    features: int
    dropout_prob: float = 0.1
    init_std: float = DEFAULT_INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array, *, train: bool = False) -> jax.Array:
        rows = self.num_classes + int(self.dropout_prob > 0)
        table = self.param(
            "embedding_table",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), (None, "embed")),
            (rows, self.features),
            self.param_dtype,
        )  # [C(+1), D]
        if train and self.dropout_prob > 0:
            drop = jax.random.uniform(self.make_rng("dropout"), labels.shape) < self.dropout_prob  # [B]
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(table, labels, axis=0).astype(self.dtype)[:, None, :]  # [B, 1, D]


class GPT(nn.Module):
    """LlamaGen class-conditional GPT over a ``grid = (h, w)`` of VQ tokens (raster order).

    Methods (all return float32 logits):

    - ``__call__(tokens [B, L], labels [B], train=False) -> [B, L, V]``: teacher-forced; the
      input is ``[class, tokens[:, :-1]]`` and ``logits[:, t]`` predicts ``tokens[:, t]``.
      ``L <= block_size``.
    - ``prefill(labels, cache) -> ([B, V], cache)``: writes the class token at position 0 and
      returns the logits of the first image token.
    - ``decode(tokens [B, S], cache, pos) -> ([B, S, V], cache)``: feeds image tokens at
      sequence positions ``pos .. pos+S-1`` (image token ``t`` sits at position ``t + 1``).

    Caches come from :func:`init_cache`.
    """

    vocab_size: int = 16384
    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    class_dropout_prob: float = 0.1
    token_dropout_prob: float = 0.1
    resid_dropout_prob: float = 0.1
    ffn_dropout_prob: float = 0.1
    attn_dropout_prob: float = 0.0
    qk_norm: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = DEFAULT_INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def block_size(self) -> int:
        """Number of image tokens, ``h * w``."""
        return int(self.grid[0]) * int(self.grid[1])

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def max_len(self) -> int:
        """Cache length: the class prefix plus every image token."""
        return CLS_TOKEN_NUM + self.block_size

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}; change one of them.")
        init = nn.initializers.normal(self.init_std)
        self.cls_embedding = LabelEmbedder(
            self.num_classes, self.width, self.class_dropout_prob, self.init_std, self.dtype, self.param_dtype
        )
        self.tok_embeddings = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.tok_dropout = nn.Dropout(self.token_dropout_prob)
        self.layers = [
            TransformerBlock(
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                multiple_of=self.multiple_of,
                ffn_dim_multiplier=self.ffn_dim_multiplier,
                causal=True,
                qk_norm=self.qk_norm,
                norm_eps=self.norm_eps,
                attn_dropout_rate=self.attn_dropout_prob,
                resid_dropout_rate=self.resid_dropout_prob,
                ffn_dropout_rate=self.ffn_dropout_prob,
                init_std=self.init_std,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
            for _ in range(self.depth)
        ]
        self.norm = RMSNorm(self.norm_eps, "embed", self.dtype, self.param_dtype)
        self.output = nn.Dense(
            self.vocab_size,
            use_bias=False,
            kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=f32_dot_general,
        )

    def _trunk(self, h, pos, cache, train):
        """Blocks + final norm + head over embeddings ``h [B, S, D]`` at positions ``pos..``."""
        s = h.shape[1]
        cos_t, sin_t = _rope_tables(tuple(int(g) for g in self.grid), self.head_dim, float(self.rope_base))
        if cache is None:
            cos, sin = jnp.asarray(cos_t[:s]), jnp.asarray(sin_t[:s])  # [S, hd/2]
        else:
            cos = jax.lax.dynamic_slice_in_dim(jnp.asarray(cos_t), pos, s)  # [S, hd/2]
            sin = jax.lax.dynamic_slice_in_dim(jnp.asarray(sin_t), pos, s)  # [S, hd/2]
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        new_cache = None if cache is None else []
        for i, layer in enumerate(self.layers):
            h, c = layer(h, cos, sin, cache=None if cache is None else cache[i], pos=pos, train=train)  # [B, S, D]
            if cache is not None:
                new_cache.append(c)
        h = self.norm(h)  # [B, S, D]
        logits = self.output(h).astype(jnp.float32)  # [B, S, V]
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")), new_cache

    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False) -> jax.Array:
        if tokens.shape[1] > self.block_size:
            raise ValueError(
                f"tokens have length {tokens.shape[1]} > block_size {self.block_size} of grid {self.grid}; "
                "pass at most h*w tokens or build the model with a larger grid."
            )
        cond = self.cls_embedding(labels, train=train)  # [B, 1, D]
        tok = self.tok_embeddings(tokens[:, :-1])  # [B, L-1, D]
        h = jnp.concatenate([cond, tok.astype(self.dtype)], axis=1)  # [B, L, D]
        h = self.tok_dropout(h, deterministic=not train)
        logits, _ = self._trunk(h, 0, None, train)  # [B, L, V]
        return logits

    def prefill(self, labels: jax.Array, cache: list[Cache]) -> tuple[jax.Array, list[Cache]]:
        h = self.cls_embedding(labels, train=False)  # [B, 1, D]
        logits, cache = self._trunk(h, 0, cache, False)  # [B, 1, V]
        return logits[:, -1], cache

    def decode(self, tokens: jax.Array, cache: list[Cache], pos: jax.Array | int) -> tuple[jax.Array, list[Cache]]:
        h = self.tok_embeddings(tokens).astype(self.dtype)  # [B, S, D]
        return self._trunk(h, pos, cache, False)  # [B, S, V]


def gpt_variant(name: str, **overrides: Any) -> GPT:
    """A :class:`GPT` of the LlamaGen size ``name`` (one of :data:`VARIANTS`), fields overridable."""
    if name not in VARIANTS:
        raise ValueError(f"GPT variant {name!r} is unknown; choose one of {sorted(VARIANTS)}.")
    return GPT(**{**VARIANTS[name], **overrides})


def init_cache(model: GPT, batch: int, dtype: Dtype | None = None) -> list[Cache]:
    """Preallocated per-layer KV caches ``{'k', 'v'}: [batch, kv_heads, 1 + h*w, head_dim]`` (zeros)."""
    dtype = model.dtype if dtype is None else dtype
    return [init_layer_cache(batch, model.max_len, model.kv_heads, model.head_dim, dtype) for _ in range(model.depth)]


def _dummy_inputs(model: GPT, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    return jnp.zeros((batch, model.block_size), jnp.int32), jnp.zeros((batch,), jnp.int32)


def init_params(model: GPT, rng: jax.Array) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``model``."""
    return model.init({"params": rng}, *_dummy_inputs(model))["params"]


def abstract_params(model: GPT) -> Any:
    """Boxed ``ShapeDtypeStruct`` parameter tree via ``jax.eval_shape`` (nothing is allocated)."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def count_params(model: GPT) -> int:
    """Number of parameters of ``model``, from shapes only (``jax.eval_shape``)."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(model)))
    return int(sum(int(np.prod(x.shape)) for x in leaves))


def loss_fn(model: GPT, params: Any, batch: dict[str, jax.Array], rng: jax.Array, train: bool = True):
    """Next-token cross entropy (float32) of ``batch = {'tokens' [B, L], 'labels' [B]}``.

    The trainers' batches name the class ``'label'``; either key is accepted.

    ``rng`` drives class dropout, token dropout and residual/FFN dropout when ``train``.
    Returns ``(loss, {'loss', 'accuracy'})``.
    """
    if weight_quant.has_decode_kernels(params):
        raise ValueError("loss_fn got decode weights (made by decode_params for sampling); train and evaluate the loss "
                         "on the trained float32 parameters and convert them only to sample.")
    tokens = batch["tokens"].astype(jnp.int32)  # [B, L]
    logits = model.apply(
        {"params": params}, tokens, batch["labels" if "labels" in batch else "label"].astype(jnp.int32),
        train=train, rngs={"dropout": rng}
    )  # [B, L, V] float32
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32))
    return loss, {"loss": loss, "accuracy": accuracy}


# ----------------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerConfig(sampling.SamplingOptions):
    """The GPT's sampler options: the shared :class:`~vqgen.generators.sampling.SamplingOptions`
    (temperature, top-k, top-p, CFG scale, schedule and interval; the interval counts tokens, as
    LlamaGen's ``cfg_interval`` stops guidance after a position) and the decode weight dtype.

    ``weight_dtype``: how the linear layers' kernels are stored while sampling (the config's
    ``sample.weight_dtype``): ``'float32'`` (the trained weights, bit for bit), ``'bfloat16'`` or
    ``'int8'`` (weight-only, symmetric, one float32 scale per output channel). The trained float32
    parameters are converted once per :func:`sample` call (:func:`decode_params`); embeddings and
    norm scales stay float32, and the compute dtype stays the model's ``dtype``. See
    :mod:`vqgen.modules.weight_quant` for what each costs and what XLA's CPU backend does with it.
    """

    weight_dtype: str = "float32"

    def __post_init__(self):
        super().__post_init__()
        weight_quant.check_weight_dtype(self.weight_dtype, "sample.weight_dtype")


SamplerOptions = SamplerConfig  # the generator protocol's name for a family's options type


@flax.struct.dataclass
class _DecodeState:
    tokens: jax.Array  # [B, L] int32, filled up to the current step
    last: jax.Array  # [B] int32, the token sampled at the previous step
    cache: list  # per-layer KV caches


def _check_sample_args(model: GPT, labels: Any, config: SamplerConfig) -> None:
    if not isinstance(config, SamplerConfig):
        raise ValueError(f"config must be a SamplerConfig, got {type(config).__name__}; build one with SamplerConfig(...).")
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be a 1-D array of class ids [B], got shape {np.shape(labels)}; pass one id per sample.")
    if config.uses_cfg and model.class_dropout_prob <= 0:
        raise ValueError(
            f"cfg_scale={config.cfg_scale} needs the null class, but this model was built with "
            "class_dropout_prob=0; retrain with class_dropout_prob > 0 (LlamaGen uses 0.1) or sample with cfg_scale=1.0."
        )
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got dtype {lab.dtype}; cast them to int32.")
        top = model.num_classes + int(model.class_dropout_prob > 0)
        if lab.size and (lab.min() < 0 or lab.max() >= top):
            extra = f" (or {model.num_classes} for the unconditional null class)" if top > model.num_classes else ""
            raise ValueError(
                f"class ids must lie in [0, {model.num_classes}){extra}, got min {lab.min()} and max {lab.max()}; "
                "fix the labels or use a model with more classes."
            )


def _pick(logits, t, rng, batch, num_steps, config: SamplerConfig):
    """Samples token ``t`` from (guided) logits ``[B or 2B, V]`` with key ``fold_in(rng, t)``."""
    if config.uses_cfg:
        scale = sampling.cfg_scale_at(t, num_steps, config.cfg_scale, config.cfg_schedule, config.cfg_interval)
        logits = sampling.guide(logits[:batch], logits[batch:], scale)  # [B, V]
    key = jax.random.fold_in(rng, t)
    return sampling.sample_logits(key, logits, config.temperature, config.top_k, config.top_p)  # [B]


def _cond_labels(model: GPT, labels: jax.Array, config: SamplerConfig) -> jax.Array:
    labels = labels.astype(jnp.int32)
    if config.uses_cfg:
        return jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])  # [2B]
    return labels  # [B]


def decode_params(params: Any, weight_dtype: str = "float32", *,
                  chunk_columns: int | None = weight_quant.DEFAULT_CHUNK_COLUMNS) -> Any:
    """The GPT's parameters for decoding: every linear kernel a
    :class:`~vqgen.modules.weight_quant.DecodeKernel` of ``weight_dtype`` split into column chunks
    of at most ``chunk_columns`` outputs (``None``: whole), everything else as it is.

    :func:`sample` calls it on the params it is given (under jit, once per call, so the decode
    copy of the kernels exists beside the trained ones while sampling); passing its result to
    :func:`sample` instead skips that conversion. ``weight_dtype='float32'`` samples the same
    tokens, bit for bit, as the trained parameters.
    """
    return weight_quant.decode_params(nn.meta.unbox(params), weight_dtype, chunk_columns=chunk_columns)


def _chunk_columns(rows: int) -> int | None:
    """Column chunk width of the decode kernels for ``rows`` rows per step (see :func:`sample_tokens`)."""
    return weight_quant.DEFAULT_CHUNK_COLUMNS if rows == 1 else None


def _prefill(model: GPT, params: Any, cond: jax.Array, cache: list[Cache]):
    with weight_quant.decode_matmuls():
        return model.apply({"params": params}, cond, cache, method=GPT.prefill)  # [B', V]


def _decode(model: GPT, params: Any, feed: jax.Array, cache: list[Cache], pos: jax.Array):
    with weight_quant.decode_matmuls():
        return model.apply({"params": params}, feed, cache, pos, method=GPT.decode)  # [B', S, V]


def sample_tokens(model: GPT, params: Any, labels: jax.Array, rng: jax.Array, config: SamplerConfig) -> jax.Array:
    """Un-jitted body of :func:`sample` (pure; ``model`` and ``config`` must be static under jit).

    The kernels are split into column chunks when a step multiplies one row (batch 1 without
    CFG): there that is several times faster on XLA's CPU backend and gives the same float32
    numbers bit for bit; with more rows XLA's matrix-matrix kernels block their sums by the
    matrix width, so the kernels stay whole and float32 sampling stays bit-identical.
    """
    batch, num_steps = labels.shape[0], model.block_size
    cond = _cond_labels(model, labels, config)  # [B] or [2B]
    params = decode_params(params, config.weight_dtype, chunk_columns=_chunk_columns(cond.shape[0]))
    cache = init_cache(model, cond.shape[0])
    logits, cache = _prefill(model, params, cond, cache)  # [B', V]
    first = _pick(logits, 0, rng, batch, num_steps, config)  # [B]
    tokens = jnp.zeros((batch, num_steps), jnp.int32).at[:, 0].set(first)  # [B, L]

    def body(t, state: _DecodeState) -> _DecodeState:
        feed = jnp.concatenate([state.last, state.last]) if config.uses_cfg else state.last  # [B']
        # Image token t-1 sits at sequence position CLS_TOKEN_NUM + t - 1.
        step_logits, cache = _decode(model, params, feed[:, None], state.cache, CLS_TOKEN_NUM + t - 1)  # [B', 1, V]
        nxt = _pick(step_logits[:, 0], t, rng, batch, num_steps, config)  # [B]
        toks = jax.lax.dynamic_update_slice(state.tokens, nxt[:, None], (0, t))  # [B, L]
        return _DecodeState(tokens=toks, last=nxt, cache=cache)

    state = jax.lax.fori_loop(1, num_steps, body, _DecodeState(tokens=tokens, last=first, cache=cache))
    return state.tokens


@functools.partial(jax.jit, static_argnames=("model", "weight_dtype"))
def cached_logits(model: GPT, params: Any, tokens: jax.Array, labels: jax.Array,
                  weight_dtype: str = "float32") -> jax.Array:
    """float32 logits ``[B, L, V]`` of ``tokens [B, L]`` computed by the sampler's own path: decode
    weights of ``weight_dtype``, the class token prefilled into the KV cache, then one cached
    decoding step per token (``logits[:, t]`` predicts ``tokens[:, t]``, as ``model(tokens, labels)``).
    Used to measure what a decode weight dtype does to the sampler's logits."""
    weight_quant.check_weight_dtype(weight_dtype)
    b, n = tokens.shape
    params = decode_params(params, weight_dtype, chunk_columns=_chunk_columns(b))
    cache = init_cache(model, b)
    first, cache = _prefill(model, params, labels.astype(jnp.int32), cache)  # [B, V]
    out = jnp.zeros((b, n, model.vocab_size), jnp.float32).at[:, 0].set(first)  # [B, L, V]

    def body(t, carry):
        out, cache = carry
        logits, cache = _decode(model, params, tokens[:, t - 1][:, None], cache, CLS_TOKEN_NUM + t - 1)  # [B, 1, V]
        return out.at[:, t].set(logits[:, 0]), cache

    return jax.lax.fori_loop(1, n, body, (out, cache))[0]


_sample_jit = jax.jit(sample_tokens, static_argnames=("model", "config"))


def sample(
    model: GPT, params: Any, labels: Any, rng: jax.Array, config: SamplerConfig = SamplerConfig()
) -> jax.Array:
    """Samples ``int32 [B, h*w]`` image tokens for class ids ``labels [B]`` (KV cache, one lax loop).

    Jitted end to end with ``model`` and ``config`` static: one compile per model, config and
    batch size. Token ``t`` is drawn with key ``jax.random.fold_in(rng, t)``. The linear kernels
    are read in ``config.weight_dtype`` (converted inside the jitted call; pass
    :func:`decode_params` of that dtype to convert once for many calls). Raises ``ValueError`` for
    class ids out of range and for CFG on a model without class dropout.
    """
    _check_sample_args(model, labels, config)
    return _sample_jit(model, params, jnp.asarray(labels, jnp.int32), rng, config)


def sample_tokens_without_cache(
    model: GPT, params: Any, labels: jax.Array, rng: jax.Array, config: SamplerConfig, num_steps: int | None = None
) -> jax.Array:
    """Reference sampler without a KV cache: every step runs the full causal forward pass on the
    zero-padded ``[B, h*w]`` token buffer and reads the logits at the current position.

    Same keys and options as :func:`sample`, so it draws the same tokens; used by the benchmark
    as the "recompute the prefix" baseline. ``num_steps`` (static) stops after that many tokens
    (the rest stay 0); every step costs the same, so timing a few steps gives the rate.
    """
    params = nn.meta.unbox(params)
    batch, total = labels.shape[0], model.block_size
    steps = total if num_steps is None else int(num_steps)
    cond = _cond_labels(model, labels, config)  # [B']

    def body(t, tokens):
        feed = jnp.concatenate([tokens, tokens]) if config.uses_cfg else tokens  # [B', L]
        logits = model.apply({"params": params}, feed, cond)  # [B', L, V]
        step_logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)  # [B', V]
        nxt = _pick(step_logits, t, rng, batch, total, config)  # [B]
        return jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, t))  # [B, L]

    return jax.lax.fori_loop(0, steps, body, jnp.zeros((batch, total), jnp.int32))


sample_without_cache = jax.jit(sample_tokens_without_cache, static_argnames=("model", "config", "num_steps"))


# ------------------------------------------------------------------ family adapter (trainers)

_BUILD_KEYS = {f.name for f in dataclasses.fields(GPT)} - {"vocab_size", "num_classes", "grid", "parent", "name"}


def build(cfg: dict, *, vocab_size: int, num_classes: int, grid: tuple[int, ...]) -> GPT:
    """A :class:`GPT` from a config section (``config.generator`` as a dict; ``arch`` ignored)."""
    kw = {k: v for k, v in cfg.items() if k != "arch"}
    if "weight_dtype" in kw:
        raise ValueError(f"generator.weight_dtype={kw['weight_dtype']!r} is a sampling option, not a training one; "
                         "remove it from the generator section and set sample.weight_dtype instead.")
    for key in ("dtype", "param_dtype"):
        name = kw.get(key)
        name = name if isinstance(name, str) or name is None else jnp.dtype(name).name
        if name == "int8":
            raise ValueError(f"generator.{key}='int8' cannot train (int8 is a decode-time weight dtype); train in "
                             "float32 and sample with sample.weight_dtype='int8'.")
        if key == "param_dtype" and name == "bfloat16":
            raise ValueError("generator.param_dtype='bfloat16' would train bfloat16-stored weights; keep param_dtype "
                             "float32 (dtype='bfloat16' gives bfloat16 compute) and sample with "
                             "sample.weight_dtype='bfloat16' to read bfloat16 weights.")
    unknown = sorted(set(kw) - _BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown GPT config keys {unknown}; valid keys are {sorted(_BUILD_KEYS)}.")
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[kw["dtype"]]
    if len(grid) != 2:
        raise ValueError(f"the GPT models a 2D token grid, got grid {tuple(grid)}; use a 2D image tokenizer.")
    return GPT(vocab_size=vocab_size, num_classes=num_classes, grid=tuple(int(g) for g in grid), **kw)


def sampler_options(cfg: dict, **overrides: Any) -> SamplerConfig:
    """:class:`SamplerConfig` from a ``config.sample`` section; a key the GPT does not read is an error."""
    return SamplerConfig.from_dict(cfg, "gpt", **overrides)
