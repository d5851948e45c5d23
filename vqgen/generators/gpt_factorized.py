"""Open-MAGVIT2's class-conditional AR generator with a factorised token head: model, loss and a
KV-cache sampler jitted end to end.

Open-MAGVIT2 (TencentARC/SEED-Voken ``src/Open_MAGVIT2/modules/transformer/gpt.py``, ``GPT`` with
``token_factorization=True``) models the ids of its 2^18-code LFQ tokenizer without a 2^18-way
softmax: every id is cut into two sub-ids over contiguous channel blocks of ``factorized_bits``
channels (the released models use ``[6, 12]``: a 64-way and a 4096-way head; ``(9, 9)`` is the
symmetric cut), and each image position predicts its first sub-id, then its second conditioned on
the first. The cut is :func:`vqgen.quantizers.lfq.split_factorized_ids` in the tokenizer's
``bit_order`` (``'lsb'`` for Open-MAGVIT2's own ids: ``id = pre + 2**bits0 * post``), so the
generator reads and returns the tokenizer's whole ids and the sub-ids are its business alone.

Structure (the official layout; parameter names follow it):

- ``class_emb.embedding_table [num_classes + 1, D]``: the class label is the single prefix token;
  row ``num_classes`` is the CFG null class, substituted with probability ``class_dropout_prob``
  in training (the official ``LabelEmbedder``, rate 0.1, which the official configs do not change).
- ``pre_emb [2**bits0, D]`` and ``post_emb [2**bits1, D]``: a token's input embedding is the *sum*
  of its two sub-id embeddings; the sequence is ``[class, tokens[:, :-1]]`` with token dropout.
- ``depth`` spatial blocks (``spatial_blocks_i``: LlamaGen's pre-norm block, RMSNorm, attention
  with LlamaGen's 2D RoPE over the grid with the class position's zero rotation, SwiGLU), causal
  over the raster sequence. No norm after them.
- per position, ``factorized_depth`` factorised blocks (``factorized_blocks_i``, the same block)
  over the two-step sequence ``[h_t, pre_emb(pre_t)]`` (``h_t`` the spatial output that predicts
  token ``t``), causal, with the first two rows of the same RoPE table (the class row's zero
  rotation at step 0, the grid origin's identity at step 1, exactly as the official code slices
  ``freqs_cis[:2]``);
- the final ``norm`` and two untied, zero-initialised heads: ``head_0 [D, 2**bits0]`` on step 0
  predicts ``pre_t``, ``head_1 [D, 2**bits1]`` on step 1 predicts ``post_t``.

Loss (the official ``Net2NetTransformer.shared_step``): ``CE(pre) + CE(post)``, the *sum* of the
two heads' mean cross entropies (float32). Metrics add each term and the accuracies of each
sub-id and of the whole token.

Sampler (the official ``sample_Open_MAGVIT2``): the class token prefills a preallocated spatial
KV cache, and one ``lax.fori_loop`` runs one spatial step per token; within it the factorised
blocks run twice over a two-slot cache (the spatial output, then the drawn first sub-id), and each
sub-id is drawn with its own temperature, top-k, top-p and CFG scale (the official script takes
comma-separated pairs: ``-t 1.1,1.0 --cfg_scale 1.75,1.85``). :class:`SamplerOptions` holds the
first sub-id's options in the shared fields and the second's in ``post_*`` (``None`` = the same
as the first). Guidance doubles the batch with the null class; both halves are fed the guided
draw, as the official sampler does. Sub-id ``i`` of token ``t`` is drawn with key
``fold_in(fold_in(rng, t), i)``. The result is the whole ids, joined with
:func:`~vqgen.quantizers.lfq.join_factorized_ids` in ``bit_order``.

Deviations from the official code, none of which changes the function computed:
- ``wqkv`` is stored as ``wq/wk/wv`` with head axes, kernels ``[in, out]``, RMSNorm ``weight`` is
  ``scale`` (see :mod:`vqgen.generators.gpt`); the heads ``head.{i}`` are ``head_{i}``.
- Stochastic depth (``drop_path_rate``, 0 in every official config) is not implemented.
- Only two sub-ids (``factorized_k = 2``, the only value the official forward and sampler run)
  and one class token (c2i). Non-square grids are allowed (the official code asserts a square).

Parameter counts (:func:`count_params`, 1000 classes, 16x16 tokens, ``factorized_bits=(6, 12)``)
of :data:`VARIANTS` equal the official module's: B 343,570,432, L 804,362,240, XL 1,486,679,040
(the README's 343M, 804M and 1.5B).
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
from vqgen.generators.gpt import LabelEmbedder
from vqgen.modules.attention import Cache, TransformerBlock
from vqgen.modules.attention import init_cache as init_layer_cache
from vqgen.modules.layers import DEFAULT_INIT_STD, RMSNorm, f32_dot_general
from vqgen.modules.rope import rope_2d_table
from vqgen.quantizers.lfq import BIT_ORDERS, join_factorized_ids, split_factorized_ids

VIDEO = False  # the token grid is (h, w) (the generator protocol, vqgen/generators/__init__.py)

Dtype = Any

CLS_TOKEN_NUM = 1
NUM_SUBTOKENS = 2  # the official factorized_k

# Open-MAGVIT2 AR B/L/XL (configs/Open-MAGVIT2/gpu/imagenet_conditional_llama_{B,L,XL}.yaml):
# spatial_n_layer, dim, n_head, factorized_n_layer.
VARIANTS: dict[str, dict[str, int]] = {
    "B": dict(depth=24, width=1024, num_heads=16, factorized_depth=2),
    "L": dict(depth=36, width=1280, num_heads=20, factorized_depth=3),
    "XL": dict(depth=48, width=1536, num_heads=24, factorized_depth=4),
}


@functools.lru_cache(maxsize=32)
def _rope_tables(grid: tuple[int, int], head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    return rope_2d_table(grid, head_dim, base, prefix_len=CLS_TOKEN_NUM)


class FactorizedGPT(nn.Module):
    """Open-MAGVIT2's class-conditional GPT with a two-head factorised output over ``grid = (h, w)``.

    Token ids are the tokenizer's whole ids (``sum(factorized_bits)`` bits in ``bit_order``).
    Methods (logits are float32):

    - ``__call__(tokens [B, L], labels [B], train=False) -> (logits_pre [B, L, 2**b0],
      logits_post [B, L, 2**b1])``: teacher-forced; position ``t`` predicts the sub-ids of
      ``tokens[:, t]``, the second head given the first sub-id of ``tokens[:, t]``.
    - ``prefill(labels, cache) -> (h [B, 1, D], cache)``: the class token at position 0.
    - ``step(tokens [B, S], cache, pos) -> (h [B, S, D], cache)``: image tokens at sequence
      positions ``pos ..`` (image token ``t`` sits at position ``t + 1``).
    - ``head_pre(h [B, 1, D], fcache) -> ([B, 2**b0], fcache)`` and
      ``head_post(pre [B, 1], fcache) -> ([B, 2**b1], fcache)``: the factorised steps 0 and 1.

    Caches come from :func:`init_cache` and :func:`init_factorized_cache`.
    """

    num_classes: int = 1000
    grid: tuple[int, int] = (16, 16)
    factorized_bits: tuple[int, int] = (6, 12)
    bit_order: str = "lsb"
    width: int = 1024
    depth: int = 24
    factorized_depth: int = 2
    num_heads: int = 16
    num_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    class_dropout_prob: float = 0.1
    token_dropout_prob: float = 0.1
    resid_dropout_prob: float = 0.1
    ffn_dropout_prob: float = 0.1
    attn_dropout_prob: float = 0.0
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
    def num_bits(self) -> int:
        return int(sum(self.factorized_bits))

    @property
    def vocab_size(self) -> int:
        """Codes of the tokenizer whose ids the model reads: ``2 ** sum(factorized_bits)``."""
        return 2**self.num_bits

    @property
    def sub_vocab_sizes(self) -> tuple[int, int]:
        return tuple(2 ** int(b) for b in self.factorized_bits)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def max_len(self) -> int:
        """Spatial cache length: the class prefix plus every image token."""
        return CLS_TOKEN_NUM + self.block_size

    def setup(self):
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}; change one of them.")
        if len(self.factorized_bits) != NUM_SUBTOKENS or min(self.factorized_bits) < 1:
            raise ValueError(f"factorized_bits={tuple(self.factorized_bits)} must be two positive bit counts (the "
                             "official (6, 12) or (9, 9)); the model has exactly two sub-token heads.")
        if self.bit_order not in BIT_ORDERS:
            raise ValueError(f"bit_order={self.bit_order!r} is unknown; use one of {BIT_ORDERS} (the tokenizer's).")
        init = nn.initializers.normal(self.init_std)
        self.class_emb = LabelEmbedder(
            self.num_classes, self.width, self.class_dropout_prob, self.init_std, self.dtype, self.param_dtype
        )

        def embed(size):
            return nn.Embed(size, self.width, embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")),
                            dtype=self.dtype, param_dtype=self.param_dtype)

        self.pre_emb = embed(self.sub_vocab_sizes[0])
        self.post_emb = embed(self.sub_vocab_sizes[1])
        self.tok_dropout = nn.Dropout(self.token_dropout_prob)

        def block():
            return TransformerBlock(
                num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, multiple_of=self.multiple_of,
                ffn_dim_multiplier=self.ffn_dim_multiplier, causal=True, norm_eps=self.norm_eps,
                attn_dropout_rate=self.attn_dropout_prob, resid_dropout_rate=self.resid_dropout_prob,
                ffn_dropout_rate=self.ffn_dropout_prob, init_std=self.init_std, dtype=self.dtype,
                param_dtype=self.param_dtype)

        self.spatial_blocks = [block() for _ in range(self.depth)]
        self.factorized_blocks = [block() for _ in range(self.factorized_depth)]
        self.norm = RMSNorm(self.norm_eps, "embed", self.dtype, self.param_dtype)
        self.head = [
            nn.Dense(size, use_bias=False,
                     kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "vocab")),
                     dtype=self.dtype, param_dtype=self.param_dtype, dot_general=f32_dot_general)
            for size in self.sub_vocab_sizes
        ]

    # ------------------------------------------------------------------------------ pieces

    def split(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Whole ids ``[...]`` -> ``(pre, post)`` sub-ids in the tokenizer's ``bit_order``."""
        return split_factorized_ids(tokens, self.num_bits, tuple(self.factorized_bits), self.bit_order)

    def join(self, pre: jax.Array, post: jax.Array) -> jax.Array:
        """``(pre, post)`` sub-ids -> whole ids (the inverse of :meth:`split`)."""
        return join_factorized_ids((pre, post), self.num_bits, tuple(self.factorized_bits), self.bit_order)

    def _embed_tokens(self, tokens: jax.Array) -> jax.Array:
        pre, post = self.split(tokens)
        return (self.pre_emb(pre) + self.post_emb(post)).astype(self.dtype)  # [B, S, D]

    def _rope(self, pos, s: int, cache: bool):
        cos_t, sin_t = _rope_tables(tuple(int(g) for g in self.grid), self.head_dim, float(self.rope_base))
        if not cache:
            return jnp.asarray(cos_t[:s]), jnp.asarray(sin_t[:s])  # [S, hd/2]
        return (jax.lax.dynamic_slice_in_dim(jnp.asarray(cos_t), pos, s),
                jax.lax.dynamic_slice_in_dim(jnp.asarray(sin_t), pos, s))  # [S, hd/2]

    def _blocks(self, blocks, h, pos, cache, train):
        """``blocks`` over ``h [B, S, D]`` at positions ``pos ..`` (with per-layer caches or none)."""
        cos, sin = self._rope(pos, h.shape[1], cache is not None)
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        new_cache = None if cache is None else []
        for i, layer in enumerate(blocks):
            h, c = layer(h, cos, sin, cache=None if cache is None else cache[i], pos=pos, train=train)  # [B, S, D]
            if cache is not None:
                new_cache.append(c)
        return h, new_cache

    def _logits(self, h: jax.Array, i: int) -> jax.Array:
        logits = self.head[i](self.norm(h)).astype(jnp.float32)  # [..., V_i]
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

    # ------------------------------------------------------------------------------ calls

    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        b, n = tokens.shape
        if n > self.block_size:
            raise ValueError(
                f"tokens have length {n} > block_size {self.block_size} of grid {self.grid}; "
                "pass at most h*w tokens or build the model with a larger grid."
            )
        pre, _ = self.split(tokens)
        cond = self.class_emb(labels, train=train)  # [B, 1, D]
        tok = self._embed_tokens(tokens[:, :-1])  # [B, L-1, D]
        h = jnp.concatenate([cond, tok], axis=1)  # [B, L, D]
        h = self.tok_dropout(h, deterministic=not train)
        h, _ = self._blocks(self.spatial_blocks, h, 0, None, train)  # [B, L, D]
        ctx = jnp.stack([h, self.pre_emb(pre).astype(self.dtype)], axis=2)  # [B, L, 2, D]
        ctx, _ = self._blocks(self.factorized_blocks, ctx.reshape(b * n, NUM_SUBTOKENS, -1), 0, None, train)
        ctx = ctx.reshape(b, n, NUM_SUBTOKENS, -1)  # [B, L, 2, D]
        return self._logits(ctx[:, :, 0], 0), self._logits(ctx[:, :, 1], 1)  # [B, L, V0], [B, L, V1]

    def prefill(self, labels: jax.Array, cache: list[Cache]) -> tuple[jax.Array, list[Cache]]:
        h = self.class_emb(labels, train=False)  # [B, 1, D]
        return self._blocks(self.spatial_blocks, h, 0, cache, False)  # [B, 1, D]

    def step(self, tokens: jax.Array, cache: list[Cache], pos: jax.Array | int) -> tuple[jax.Array, list[Cache]]:
        return self._blocks(self.spatial_blocks, self._embed_tokens(tokens), pos, cache, False)  # [B, S, D]

    def head_pre(self, h: jax.Array, fcache: list[Cache]) -> tuple[jax.Array, list[Cache]]:
        out, fcache = self._blocks(self.factorized_blocks, h, 0, fcache, False)  # [B, 1, D]
        return self._logits(out[:, 0], 0), fcache  # [B, V0]

    def head_post(self, pre: jax.Array, fcache: list[Cache]) -> tuple[jax.Array, list[Cache]]:
        h = self.pre_emb(pre).astype(self.dtype)  # [B, 1, D]
        out, fcache = self._blocks(self.factorized_blocks, h, 1, fcache, False)  # [B, 1, D]
        return self._logits(out[:, 0], 1), fcache  # [B, V1]


def gpt_variant(name: str, **overrides: Any) -> FactorizedGPT:
    """A :class:`FactorizedGPT` of the Open-MAGVIT2 AR size ``name`` (one of :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"Open-MAGVIT2 AR variant {name!r} is unknown; choose one of {sorted(VARIANTS)}.")
    return FactorizedGPT(**{**VARIANTS[name], **overrides})


def init_cache(model: FactorizedGPT, batch: int, dtype: Dtype | None = None) -> list[Cache]:
    """Per-spatial-layer KV caches ``{'k', 'v'}: [batch, kv_heads, 1 + h*w, head_dim]`` (zeros)."""
    dtype = model.dtype if dtype is None else dtype
    return [init_layer_cache(batch, model.max_len, model.kv_heads, model.head_dim, dtype) for _ in range(model.depth)]


def init_factorized_cache(model: FactorizedGPT, batch: int, dtype: Dtype | None = None) -> list[Cache]:
    """Per-factorised-layer KV caches of the two sub-token steps ``[batch, kv_heads, 2, head_dim]``."""
    dtype = model.dtype if dtype is None else dtype
    return [init_layer_cache(batch, NUM_SUBTOKENS, model.kv_heads, model.head_dim, dtype)
            for _ in range(model.factorized_depth)]


def init_params(model: FactorizedGPT, rng: jax.Array) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``model``."""
    tokens, labels = jnp.zeros((1, model.block_size), jnp.int32), jnp.zeros((1,), jnp.int32)
    return model.init({"params": rng}, tokens, labels)["params"]


def abstract_params(model: FactorizedGPT) -> Any:
    """Boxed ``ShapeDtypeStruct`` parameter tree via ``jax.eval_shape`` (nothing is allocated)."""
    return jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))


def count_params(model: FactorizedGPT) -> int:
    """Number of parameters of ``model``, from shapes only."""
    leaves = jax.tree.leaves(nn.meta.unbox(abstract_params(model)))
    return int(sum(int(np.prod(x.shape)) for x in leaves))


def loss_fn(model: FactorizedGPT, params: Any, batch: dict[str, jax.Array], rng: jax.Array, train: bool = True):
    """Open-MAGVIT2's loss of ``batch = {'tokens' [B, L] whole ids, 'label' [B]}`` (or ``'labels'``):
    ``CE(pre) + CE(post)``, each the mean over positions, float32.

    ``rng`` drives class, token, residual and FFN dropout when ``train``. Returns ``(loss,
    {'loss', 'loss_pre', 'loss_post', 'accuracy', 'accuracy_pre', 'accuracy_post'})``; ``accuracy``
    counts a token right when both its sub-ids are.
    """
    tokens = batch["tokens"].astype(jnp.int32)  # [B, L]
    labels = batch["labels" if "labels" in batch else "label"].astype(jnp.int32)  # [B]
    logits_pre, logits_post = model.apply({"params": params}, tokens, labels, train=train, rngs={"dropout": rng})
    pre, post = split_factorized_ids(tokens, model.num_bits, tuple(model.factorized_bits), model.bit_order)
    loss_pre = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_pre, pre))
    loss_post = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_post, post))
    hit_pre = jnp.argmax(logits_pre, axis=-1) == pre  # [B, L]
    hit_post = jnp.argmax(logits_post, axis=-1) == post  # [B, L]
    loss = loss_pre + loss_post
    return loss, {
        "loss": loss, "loss_pre": loss_pre, "loss_post": loss_post,
        "accuracy": jnp.mean((hit_pre & hit_post).astype(jnp.float32)),
        "accuracy_pre": jnp.mean(hit_pre.astype(jnp.float32)),
        "accuracy_post": jnp.mean(hit_post.astype(jnp.float32)),
    }


# ----------------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerOptions(sampling.SamplingOptions):
    """Options of the factorised sampler: the shared fields (temperature, top-k, top-p, CFG scale,
    schedule and interval, the interval counting tokens) apply to the first sub-id; ``post_*``
    are the second sub-id's temperature, top-k, top-p and CFG scale (``None`` = the first's). The
    official ``-t 1.1,1.0 --cfg_scale 1.75,1.85`` is ``temperature=1.1, post_temperature=1.0,
    cfg_scale=1.75, post_cfg_scale=1.85``. The CFG schedule and interval apply to both scales.
    """

    post_temperature: float | None = None
    post_top_k: int | None = None
    post_top_p: float | None = None
    post_cfg_scale: float | None = None

    def __post_init__(self):
        super().__post_init__()
        sampling.check_options(temperature=self.sub(1)[0], top_k=self.sub(1)[1], top_p=self.sub(1)[2],
                               cfg_schedule=self.cfg_schedule, cfg_interval=self.cfg_interval)
        if self.post_top_k is not None:
            object.__setattr__(self, "post_top_k", int(self.post_top_k))

    def sub(self, i: int) -> tuple[float, int, float, float]:
        """``(temperature, top_k, top_p, cfg_scale)`` of sub-id ``i`` (0 or 1)."""
        first = (self.temperature, self.top_k, self.top_p, self.cfg_scale)
        if i == 0:
            return first
        post = (self.post_temperature, self.post_top_k, self.post_top_p, self.post_cfg_scale)
        return tuple(a if b is None else b for a, b in zip(first, post))

    @property
    def uses_cfg(self) -> bool:
        return self.sub(0)[3] != 1.0 or self.sub(1)[3] != 1.0


SamplerConfig = SamplerOptions


@flax.struct.dataclass
class _DecodeState:
    tokens: jax.Array  # [B, L] int32 whole ids, filled up to the current step
    last: jax.Array  # [B] int32, the whole id drawn at the previous step
    cache: list  # per-spatial-layer KV caches


def _check_sample_args(model: FactorizedGPT, labels: Any, opts: SamplerOptions) -> None:
    if not isinstance(opts, SamplerOptions):
        raise ValueError(f"opts must be a gpt_factorized.SamplerOptions, got {type(opts).__name__}; build one with "
                         "SamplerOptions(...).")
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be a 1-D array of class ids [B], got shape {np.shape(labels)}; pass one id "
                         "per sample.")
    if opts.uses_cfg and model.class_dropout_prob <= 0:
        raise ValueError(
            f"CFG scales {opts.sub(0)[3]}/{opts.sub(1)[3]} need the null class, but this model was built with "
            "class_dropout_prob=0; sample with cfg_scale=1.0 and post_cfg_scale=1.0 or use a model with the null "
            "class.")
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got dtype {lab.dtype}; cast them to int32.")
        top = model.num_classes + int(model.class_dropout_prob > 0)
        if lab.size and (lab.min() < 0 or lab.max() >= top):
            extra = f" (or {model.num_classes} for the unconditional null class)" if top > model.num_classes else ""
            raise ValueError(
                f"class ids must lie in [0, {model.num_classes}){extra}, got min {lab.min()} and max {lab.max()}; "
                "fix the labels or use a model with more classes.")


def _pick(logits, t, i, rng, batch, num_steps, opts: SamplerOptions):
    """Draws sub-id ``i`` of token ``t`` from (guided) logits ``[B or 2B, V_i]``."""
    temperature, top_k, top_p, scale = opts.sub(i)
    if opts.uses_cfg:
        s = sampling.cfg_scale_at(t, num_steps, scale, opts.cfg_schedule, opts.cfg_interval)
        logits = sampling.guide(logits[:batch], logits[batch:], s)  # [B, V_i]
    key = jax.random.fold_in(jax.random.fold_in(rng, t), i)
    return sampling.sample_logits(key, logits, temperature, top_k, top_p)  # [B]


def sample_tokens(model: FactorizedGPT, params: Any, labels: jax.Array, rng: jax.Array,
                  opts: SamplerOptions) -> jax.Array:
    """Un-jitted body of :func:`sample` (pure; ``model`` and ``opts`` must be static under jit)."""
    params = nn.meta.unbox(params)
    variables = {"params": params}
    batch, num_steps = labels.shape[0], model.block_size
    labels = labels.astype(jnp.int32)
    cond = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if opts.uses_cfg else labels  # [B']

    def both(x):  # the guided draw is fed to the conditional and the unconditional half
        return jnp.concatenate([x, x]) if opts.uses_cfg else x

    def draw(h, t):
        """The two sub-ids of token ``t`` from the spatial output ``h [B', 1, D]``; whole ids ``[B]``."""
        fcache = init_factorized_cache(model, cond.shape[0])
        logits, fcache = model.apply(variables, h, fcache, method=FactorizedGPT.head_pre)  # [B', V0]
        pre = _pick(logits, t, 0, rng, batch, num_steps, opts)  # [B]
        logits, _ = model.apply(variables, both(pre)[:, None], fcache, method=FactorizedGPT.head_post)  # [B', V1]
        post = _pick(logits, t, 1, rng, batch, num_steps, opts)  # [B]
        return join_factorized_ids((pre, post), model.num_bits, tuple(model.factorized_bits), model.bit_order)  # [B]

    cache = init_cache(model, cond.shape[0])
    h, cache = model.apply(variables, cond, cache, method=FactorizedGPT.prefill)  # [B', 1, D]
    first = draw(h, 0)  # [B]
    tokens = jnp.zeros((batch, num_steps), jnp.int32).at[:, 0].set(first)  # [B, L]

    def body(t, state: _DecodeState) -> _DecodeState:
        # Image token t-1 sits at sequence position CLS_TOKEN_NUM + t - 1.
        h, cache = model.apply(variables, both(state.last)[:, None], state.cache, CLS_TOKEN_NUM + t - 1,
                               method=FactorizedGPT.step)  # [B', 1, D]
        nxt = draw(h, t)  # [B]
        toks = jax.lax.dynamic_update_slice(state.tokens, nxt[:, None], (0, t))  # [B, L]
        return _DecodeState(tokens=toks, last=nxt, cache=cache)

    state = jax.lax.fori_loop(1, num_steps, body, _DecodeState(tokens=tokens, last=first, cache=cache))
    return state.tokens


_sample_jit = jax.jit(sample_tokens, static_argnames=("model", "opts"))


def sample(model: FactorizedGPT, params: Any, labels: Any, rng: jax.Array,
           opts: SamplerOptions = SamplerOptions()) -> jax.Array:
    """Samples ``int32 [B, h*w]`` whole token ids (the tokenizer's ``bit_order``) for class ids
    ``labels [B]``: KV caches, one lax loop, jitted end to end with ``model`` and ``opts`` static
    (one compile per model, options and batch size). Raises ``ValueError`` for class ids out of
    range and for CFG on a model without class dropout.
    """
    _check_sample_args(model, labels, opts)
    return _sample_jit(model, params, jnp.asarray(labels, jnp.int32), rng, opts)


# ------------------------------------------------------------------ family adapter (trainers)

_BUILD_KEYS = {f.name for f in dataclasses.fields(FactorizedGPT)} - {"num_classes", "grid", "parent", "name"}


def build(cfg: dict, *, vocab_size: int, num_classes: int, grid: tuple[int, ...]) -> FactorizedGPT:
    """A :class:`FactorizedGPT` from a config section (``config.generator`` as a dict; ``arch``
    ignored); ``vocab_size`` must be ``2 ** sum(factorized_bits)``."""
    kw = {k: v for k, v in cfg.items() if k != "arch"}
    unknown = sorted(set(kw) - _BUILD_KEYS)
    if unknown:
        raise ValueError(f"unknown gpt_factorized config keys {unknown}; valid keys are {sorted(_BUILD_KEYS)}.")
    if isinstance(kw.get("dtype"), str):
        kw["dtype"] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[kw["dtype"]]
    if "factorized_bits" in kw:
        kw["factorized_bits"] = tuple(int(b) for b in kw["factorized_bits"])
    if len(grid) != 2:
        raise ValueError(f"the factorised GPT models a 2D token grid, got grid {tuple(grid)}; use a 2D image "
                         "tokenizer.")
    model = FactorizedGPT(num_classes=num_classes, grid=tuple(int(g) for g in grid), **kw)
    if vocab_size != model.vocab_size:
        raise ValueError(
            f"generator.factorized_bits={tuple(model.factorized_bits)} cut {model.num_bits}-bit ids "
            f"({model.vocab_size} codes) but the tokenizer has {vocab_size} codes; set factorized_bits to two "
            "numbers adding up to the tokenizer's bits (an LFQ tokenizer of that many channels).")
    return model


def sampler_options(cfg: dict, **overrides: Any) -> SamplerOptions:
    """:class:`SamplerOptions` from a ``config.sample`` section; a key this family does not read is an error."""
    return SamplerOptions.from_dict(cfg, "gpt_factorized", **overrides)
