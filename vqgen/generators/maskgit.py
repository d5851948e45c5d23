"""MaskGIT: a bidirectional (BERT-style) transformer over VQ tokens, its masked-token training
loss and its iterative parallel-decoding sampler, jitted end to end.

Structure (as the released google-research/maskgit ``nets/maskgit_transformer.py``):

- Vocabulary of ``codebook_size + num_classes + 1`` ids: codes ``[0, K)``, then the classes
  (class ``c`` is id ``K + c``), then the mask token ``K + C``. (The released config sets
  ``mask_token_id = -1``, which ``nn.Embed`` reads as the last row, ``K + C``; its inference
  prepends ``label + K``.)
- ``embed``: ``word_embeddings [V, D]`` + learned ``position_embeddings [1 + L, D]`` (the class
  token sits at position 0, image token ``i`` at ``1 + i``), then ``embeddings_ln`` (LayerNorm,
  eps 1e-12) and dropout.
- ``depth`` post-LN BERT layers ``layers_{i}``: ``x = LN(x + drop(attn(x)))`` with biased
  ``query/key/value/out`` projections and no attention mask (``attention_output_ln``), then
  ``x = LN(x + drop(dense(gelu(dense(x)))))`` (``intermediate_output``, ``layer_output``,
  ``layer_output_ln``). ``gelu`` is the tanh approximation (``jax.nn.gelu``'s default, as in
  the released code).
- ``mlm`` head: ``mlm_dense`` + gelu + ``mlm_ln``, logits against the TIED word-embedding
  matrix (``tie_embeddings=False`` adds a separate ``output`` kernel instead) plus a learned
  ``mlm_bias [V]``.
- Initialisation: N(0, 0.02) truncated at two standard deviations, biases zero.

Parameter names follow the released ones with Flax's auto-names replaced by explicit ones
(``Embed_0`` -> ``embed``, ``TransformerLayer_i`` -> ``layers_{i}``, ``Attention_0/
self_attention`` -> ``attention``, ``Mlp_0`` -> the layer itself, ``MlmLayer_0`` -> ``mlm``);
kernels keep the head axis (``query [D, H, hd]``, ``out [H, hd, D]``), as flax's attention does.

Deviations from the released model, written down so a converter knows them:

- Classifier-free guidance (not in the released MaskGIT): when ``class_dropout_prob > 0`` the
  vocabulary has ONE extra row at the end, id ``K + C + 1``, the "no label" class. Training
  replaces the label by it with probability ``class_dropout_prob``. The released layout is then
  a prefix of ours (copy its ``[K + C + 1]`` rows, initialise the last one). With
  ``class_dropout_prob == 0`` the model is exactly the released structure.
- The loss (MaskGIT released no training code) is a label-smoothed cross entropy over the
  codebook logits ``[..., :K]`` only -- the same restriction the released sampler applies --
  averaged over the masked positions.
- Attention softmax and every loss are float32 whatever the compute dtype.

Sampler (:func:`sample`): one ``lax.fori_loop`` of ``num_steps`` iterations over a
``flax.struct.dataclass`` state with static shapes. At step ``t`` every masked position is
sampled (optionally guided, tempered, top-k/top-p filtered); the confidence of a newly sampled
token is its log-probability plus Gumbel noise times ``choice_temperature * (1 - (t + 1) / T)``
(MaskGIT anneals with the ratio of the NEXT step, ``(t + 1) / T``); tokens decoded earlier or
given by the user get +inf; the ``num_masked`` lowest-confidence new tokens are masked again
(:func:`vqgen.generators.mask_schedules.num_masked`, exact counts by rank, not by a threshold).
Tokens decoded at one step are never re-masked later, as in MaskGIT.

Sampler details that differ from ``libml/parallel_decode.py`` (none changes MaskGIT's default
setting of temperature 1, no top-k/top-p, no guidance):

- The schedule's counts are computed in float64 on the host (:func:`mask_schedules.
  scheduled_counts`) and passed into the loop as a table, so they equal :func:`num_masked`
  exactly; MaskGIT computes them in float32 inside the loop (a count can differ by one where
  ``ratio * N`` is within float32 rounding of an integer).
- Positions are re-masked by rank (exactly ``num_masked`` of them); MaskGIT's threshold
  ``confidence < sorted[mask_len]`` can mask fewer on ties.
- The last step decodes every remaining position (MaskGIT returns the sampled sequence of its
  last iteration, which is the same thing).
- The confidence is the log-probability under the distribution actually sampled from (after
  guidance, temperature and top-k/top-p); MaskGIT has only the plain softmax.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.generators import mask_schedules, sampling
from vqgen.modules.layers import f32_dot_general

VIDEO = False  # the token grid is (h, w) (the generator protocol, vqgen/generators/__init__.py)

Dtype = Any

LAYERNORM_EPSILON = 1e-12  # BERT / MaskGIT
INIT_STD = 0.02

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def truncated_normal_init(stddev: float = INIT_STD):
    """MaskGIT's initialiser: standard normal truncated to [-2, 2], times ``stddev``."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * stddev).astype(dtype)

    return init


def _dense(features, axes, name, dtype, param_dtype, use_bias=True):
    """``nn.Dense`` with MaskGIT's init, logical axes ``axes = (in, out)`` and a zero bias."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        kernel_init=nn.with_logical_partitioning(truncated_normal_init(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[-1:]),
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=f32_dot_general,
        name=name,
    )


class HeadProjection(nn.Module):
    """Multi-head projection with bias (flax ``DenseGeneral`` layout, parameters created
    directly so their logical names always match their rank).

    ``to_heads=True``: ``[B, S, D] -> [B, S, H, hd]`` with ``kernel [D, H, hd]``, ``bias [H, hd]``.
    ``to_heads=False``: ``[B, S, H, hd] -> [B, S, D]`` with ``kernel [H, hd, D]``, ``bias [D]``.
    """

    num_heads: int
    head_dim: int
    features: int
    to_heads: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, hd, d = self.num_heads, self.head_dim, self.features
        if self.to_heads:
            k_shape, k_axes, b_shape, b_axes, eq = (d, h, hd), ("embed", "heads", "kv"), (h, hd), ("heads", "kv"), "bsd,dhk->bshk"
        else:
            k_shape, k_axes, b_shape, b_axes, eq = (h, hd, d), ("heads", "kv", "embed"), (d,), ("embed",), "bshk,hkd->bsd"
        kernel = self.param("kernel", nn.with_logical_partitioning(truncated_normal_init(), k_axes), k_shape, self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, b_axes), b_shape, self.param_dtype)
        y = jnp.einsum(eq, x.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=jnp.float32).astype(self.dtype)  # [B, S, H, hd] or [B, S, D]
        return y + bias.astype(self.dtype)


def _layer_norm(name, dtype, param_dtype):
    return nn.LayerNorm(
        epsilon=LAYERNORM_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class BidirectionalAttention(nn.Module):
    """Full (unmasked) multi-head self-attention with biased projections (flax/BERT layout).

    ``x [B, S, D] -> [B, S, D]``; scores and softmax in float32; dropout on the probabilities.
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        hd = d // self.num_heads

        def proj(name, to_heads=True):
            return HeadProjection(self.num_heads, hd, d, to_heads, self.dtype, self.param_dtype, name=name)

        q = proj("query")(x)  # [B, S, H, hd]
        k = proj("key")(x)  # [B, S, H, hd]
        v = proj("value")(x)  # [B, S, H, hd]
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)  # [B, H, S, S]
        probs = jax.nn.softmax(scores * (hd**-0.5), axis=-1)  # [B, H, S, S] float32
        probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32).astype(self.dtype)  # [B, S, H, hd]
        return proj("out", to_heads=False)(out)  # [B, S, D]


class BertLayer(nn.Module):
    """One post-LN MaskGIT/BERT layer: attention + residual + LN, GELU MLP + residual + LN."""

    num_heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        d = x.shape[-1]
        a = BidirectionalAttention(self.num_heads, self.dropout, self.dtype, self.param_dtype, name="attention")(
            x, train=train
        )  # [B, S, D]
        a = nn.Dropout(self.dropout)(a, deterministic=not train)
        x = _layer_norm("attention_output_ln", self.dtype, self.param_dtype)(a + x)  # [B, S, D]
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = _dense(self.mlp_dim, ("embed", "mlp"), "intermediate_output", self.dtype, self.param_dtype)(x)  # [B, S, F]
        h = nn.with_logical_constraint(jax.nn.gelu(h), ("batch", "length", "mlp"))
        h = _dense(d, ("mlp", "embed"), "layer_output", self.dtype, self.param_dtype)(h)  # [B, S, D]
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        x = _layer_norm("layer_output_ln", self.dtype, self.param_dtype)(h + x)  # [B, S, D]
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class MaskGITTransformer(nn.Module):
    """MaskGIT's bidirectional transformer over ``seq_len`` image tokens with a class token.

    Call: ``model.apply(vars, tokens [B, L], labels [B], train=False) -> logits [B, L, V]``
    (float32, over the whole vocabulary; :attr:`codebook_size` first). ``tokens`` hold code ids
    or :attr:`mask_token_id`; ``labels`` are class indices in ``[0, num_classes)`` or
    :attr:`null_class` (``num_classes``) for "no label" when ``class_dropout_prob > 0``.

    ``class_dropout_prob``, ``label_smoothing`` and ``mask_schedule`` are training settings
    read by :func:`loss_fn`; they change no parameter except the extra null-class row.
    """

    codebook_size: int = 1024
    num_classes: int = 1000
    seq_len: int = 256
    width: int = 768
    depth: int = 24
    num_heads: int = 16
    mlp_dim: int = 3072
    dropout: float = 0.1
    class_dropout_prob: float = 0.0
    label_smoothing: float = 0.1
    mask_schedule: str = "cosine"
    tie_embeddings: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # ------------------------------------------------------------------ vocabulary layout
    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def mask_token_id(self) -> int:
        """``K + C``: the row after the class ids (the released model's last row)."""
        return self.codebook_size + self.num_classes

    @property
    def null_class(self) -> int:
        """Label index of "no label" (``num_classes``), token id ``K + C + 1``; CFG models only."""
        return self.num_classes

    @property
    def vocab_size(self) -> int:
        """``K + C + 1`` (+1 for the null class when ``class_dropout_prob > 0``)."""
        return self.codebook_size + self.num_classes + 1 + int(self.has_null_class)

    def label_token(self, labels: jax.Array) -> jax.Array:
        """Token ids ``[B]`` of class indices: ``K + c``, and ``K + C + 1`` for the null class."""
        labels = labels.astype(jnp.int32)
        return jnp.where(labels == self.null_class, self.mask_token_id + 1, self.codebook_size + labels)

    @nn.compact
    def __call__(self, tokens: jax.Array, labels: jax.Array, *, train: bool = False) -> jax.Array:
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}; change one of them.")
        if tokens.shape[-1] != self.seq_len:
            raise ValueError(
                f"tokens have length {tokens.shape[-1]} but the model was built for seq_len={self.seq_len}; "
                "pass h*w tokens of the model's grid."
            )
        init = truncated_normal_init()
        seq = jnp.concatenate([self.label_token(labels)[:, None], tokens.astype(jnp.int32)], axis=1)  # [B, 1+L]
        word = self.param(
            "word_embeddings", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (self.vocab_size, self.width), self.param_dtype,
        )  # [V, D]
        pos = self.param(
            "position_embeddings", nn.with_logical_partitioning(init, (None, "embed")),
            (1 + self.seq_len, self.width), self.param_dtype,
        )  # [1+L, D]
        h = jnp.take(word, seq, axis=0).astype(self.dtype) + pos.astype(self.dtype)[None]  # [B, 1+L, D]
        h = _layer_norm("embeddings_ln", self.dtype, self.param_dtype)(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        for i in range(self.depth):
            h = BertLayer(self.num_heads, self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name=f"layers_{i}")(
                h, train=train
            )  # [B, 1+L, D]
        h = h[:, 1:]  # [B, L, D] drop the class position
        h = _dense(self.width, ("embed", "mlp"), "mlm_dense", self.dtype, self.param_dtype)(h)  # [B, L, D]
        h = _layer_norm("mlm_ln", self.dtype, self.param_dtype)(jax.nn.gelu(h))  # [B, L, D]
        if self.tie_embeddings:
            logits = jnp.einsum("bld,vd->blv", h, word.astype(self.dtype), preferred_element_type=jnp.float32)  # [B, L, V]
        else:
            logits = _dense(self.vocab_size, ("embed", "vocab"), "output", self.dtype, self.param_dtype, use_bias=False)(
                h
            ).astype(jnp.float32)  # [B, L, V]
        bias = self.param(
            "mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (self.vocab_size,), self.param_dtype
        )  # [V]
        logits = logits + bias.astype(jnp.float32)  # [B, L, V]
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


# ------------------------------------------------------------------------------ family API


def build(cfg: dict, *, vocab_size: int, num_classes: int, grid: tuple[int, ...]) -> MaskGITTransformer:
    """``config.generator`` (as a plain dict) -> :class:`MaskGITTransformer` over ``grid`` tokens
    (``(h, w)``, or a 1-D ``(n,)`` such as TiTok's latent tokens: positions are learned per token).

    Keys: ``width, depth, num_heads, mlp_dim, dropout, class_dropout_prob, label_smoothing,
    mask_schedule, dtype`` (``'float32'``/``'bfloat16'``), optional ``tie_embeddings``;
    ``arch`` is ignored.
    """
    kw = {k: v for k, v in dict(cfg).items() if k != "arch"}
    dtype_name = kw.pop("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"generator dtype {dtype_name!r} is unknown; use one of {sorted(DTYPES)}.")
    fields = {f.name for f in dataclasses.fields(MaskGITTransformer)} - {"parent", "name"}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise ValueError(f"unknown maskgit generator keys {unknown}; valid keys are {sorted(fields - {'dtype'})}.")
    mask_schedules.check_schedule(kw.get("mask_schedule", "cosine"))
    seq_len = int(np.prod([int(g) for g in grid]))
    return MaskGITTransformer(
        codebook_size=int(vocab_size), num_classes=int(num_classes), seq_len=seq_len, dtype=DTYPES[dtype_name], **kw
    )


def init_params(model: MaskGITTransformer, rng: jax.Array) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``model``."""
    tokens = jnp.zeros((1, model.seq_len), jnp.int32)
    return model.init({"params": rng}, tokens, jnp.zeros((1,), jnp.int32))["params"]


def count_params(model: MaskGITTransformer) -> int:
    """Number of parameters of ``model`` from shapes only (``jax.eval_shape``)."""
    abstract = jax.eval_shape(lambda r: init_params(model, r), jax.random.key(0))
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract))))


def random_mask(schedule: str, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """MaskGIT's training mask: per example ``r ~ U[0, 1)``, ``n = ceil(mask_ratio(r) * L)``
    clamped to ``[1, L]``, and ``n`` positions chosen uniformly (the ``n`` smallest of i.i.d.
    uniform scores, exact by rank). Returns ``(mask bool [B, L], ratio float32 [B])``.
    """
    b, length = tokens.shape
    r_key, s_key = jax.random.split(rng)
    r = jax.random.uniform(r_key, (b,), jnp.float32)  # [B]
    ratio = mask_schedules.mask_ratio(schedule, r, jnp.float32(length))  # [B]
    n = jnp.clip(jnp.ceil(ratio * length).astype(jnp.int32), 1, length)  # [B]
    scores = jax.random.uniform(s_key, (b, length))  # [B, L]
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # [B, L]
    return ranks < n[:, None], ratio


def drop_labels(model: MaskGITTransformer, labels: jax.Array, rng: jax.Array) -> jax.Array:
    """Replaces each label by the null class with probability ``model.class_dropout_prob``."""
    if model.class_dropout_prob <= 0:
        return labels
    drop = jax.random.uniform(rng, labels.shape) < model.class_dropout_prob  # [B]
    return jnp.where(drop, model.null_class, labels)


def training_inputs(model: MaskGITTransformer, batch: dict, rng: jax.Array):
    """What :func:`loss_fn` feeds the model for ``rng``: ``(tokens [B, L], inputs [B, L],
    labels [B], mask [B, L], ratio [B], dropout_rng)``, with ``tokens`` the targets, ``inputs``
    the tokens with masked positions set to the mask token and ``labels`` after class dropout."""
    tokens = batch["tokens"].astype(jnp.int32)
    tokens = tokens.reshape(tokens.shape[0], -1)  # [B, L]
    labels = batch["label"] if "label" in batch else batch["labels"]
    mask_rng, label_rng, dropout_rng = jax.random.split(rng, 3)
    mask, ratio = random_mask(model.mask_schedule, tokens, mask_rng)  # [B, L], [B]
    inputs = jnp.where(mask, model.mask_token_id, tokens)  # [B, L]
    labels = drop_labels(model, labels.astype(jnp.int32), label_rng)  # [B]
    return tokens, inputs, labels, mask, ratio, dropout_rng


def loss_fn(model: MaskGITTransformer, params: Any, batch: dict, rng: jax.Array, train: bool = True):
    """Masked-token loss of ``batch = {'tokens' int32 [B, L] (or [B, h, w]), 'label' int32 [B]}``.

    Draws the mask with :func:`random_mask` (schedule ``model.mask_schedule``), applies class
    dropout, and returns the float32 cross entropy -- with ``model.label_smoothing`` over the
    codebook logits -- averaged over the masked positions only, with metrics ``{'loss',
    'accuracy'`` (argmax over the codebook on masked positions), ``'mask_ratio'}``.
    """
    tokens, inputs, labels, mask, ratio, dropout_rng = training_inputs(model, batch, rng)
    logits = model.apply({"params": params}, inputs, labels, train=train, rngs={"dropout": dropout_rng})  # [B, L, V]
    logits = logits[..., : model.codebook_size].astype(jnp.float32)  # [B, L, K]
    k = model.codebook_size
    targets = jax.nn.one_hot(tokens, k, dtype=jnp.float32)  # [B, L, K]
    if model.label_smoothing > 0:
        targets = targets * (1.0 - model.label_smoothing) + model.label_smoothing / k
    ce = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # [B, L]
    w = mask.astype(jnp.float32)  # [B, L]
    denom = jnp.maximum(jnp.sum(w), 1.0)
    loss = jnp.sum(ce * w) / denom
    accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32) * w) / denom
    return loss, {"loss": loss, "accuracy": accuracy, "mask_ratio": jnp.mean(ratio)}


# ----------------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerOptions(sampling.SamplingOptions):
    """Static, hashable options of :func:`sample` (the random key is an argument).

    The shared options (:class:`~vqgen.generators.sampling.SamplingOptions`: ``temperature``,
    ``top_k``, ``top_p``, ``cfg_scale``, ``cfg_schedule`` over the steps, ``cfg_interval`` as
    fractions of the steps; temperature 0 is greedy; guidance ``uncond + s * (cond - uncond)``),
    plus:

    - ``num_steps``: decoding iterations T (at most the number of tokens).
    - ``choice_temperature``: scale of the Gumbel noise on confidences, annealed linearly to 0
      as ``choice_temperature * (1 - (t + 1) / T)`` (MaskGIT: 4.5).
    - ``mask_schedule``: how many tokens stay masked after each step (:mod:`mask_schedules`).
    """

    num_steps: int = 8
    choice_temperature: float = 4.5
    mask_schedule: str = "cosine"

    _UNIT = "step"

    def __post_init__(self):
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps={self.num_steps} must be at least 1; MaskGIT uses 8 to 16.")
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature={self.choice_temperature} is negative; use 0 (no noise) or more.")
        super().__post_init__()
        mask_schedules.check_schedule(self.mask_schedule)
        object.__setattr__(self, "num_steps", int(self.num_steps))


def sampler_options(cfg: dict, **overrides: Any) -> SamplerOptions:
    """``config.sample`` (a plain dict) -> :class:`SamplerOptions`; a key MaskGIT does not read is an error."""
    return SamplerOptions.from_dict(cfg, "maskgit", **overrides)


@flax.struct.dataclass
class _DecodeState:
    tokens: jax.Array  # [B, L] int32: code ids, mask_token_id where still masked
    history: jax.Array  # [T, B] int32: masked count after each step


def _check_sample_args(model, labels, opts, known_tokens, known_mask) -> None:
    if not isinstance(opts, SamplerOptions):
        raise ValueError(f"opts must be a SamplerOptions, got {type(opts).__name__}; build one with SamplerOptions(...).")
    if opts.num_steps > model.seq_len:
        raise ValueError(
            f"num_steps={opts.num_steps} is more than the {model.seq_len} tokens to decode; "
            f"use at most {model.seq_len} steps."
        )
    if opts.uses_cfg and not model.has_null_class:
        raise ValueError(
            f"cfg_scale={opts.cfg_scale} needs the null class, but this model was built with class_dropout_prob=0; "
            "train with class_dropout_prob > 0 (e.g. 0.1) or sample with cfg_scale=1.0."
        )
    if np.ndim(labels) != 1:
        raise ValueError(f"labels must be a 1-D array of class ids [B], got shape {np.shape(labels)}; pass one id per sample.")
    if not isinstance(labels, jax.core.Tracer):
        lab = np.asarray(labels)
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"labels must be integer class ids, got dtype {lab.dtype}; cast them to int32.")
        top = model.num_classes + int(model.has_null_class)
        if lab.size and (lab.min() < 0 or lab.max() >= top):
            extra = f" (or {model.num_classes} for no label)" if model.has_null_class else ""
            raise ValueError(
                f"class ids must lie in [0, {model.num_classes}){extra}, got min {lab.min()} and max {lab.max()}; "
                "fix the labels or use a model with more classes."
            )
    if (known_tokens is None) != (known_mask is None):
        raise ValueError("known_tokens and known_mask go together; pass both (editing) or neither (generation).")
    if known_tokens is not None:
        want = (len(labels), model.seq_len)
        if np.shape(known_tokens) != want or np.shape(known_mask) != want:
            raise ValueError(
                f"known_tokens {np.shape(known_tokens)} and known_mask {np.shape(known_mask)} must both have shape "
                f"{want} ([batch, tokens]); flatten the token grid."
            )
        if not isinstance(known_tokens, jax.core.Tracer) and not isinstance(known_mask, jax.core.Tracer):
            kt, km = np.asarray(known_tokens), np.asarray(known_mask).astype(bool)
            if km.any() and (kt[km].min() < 0 or kt[km].max() >= model.codebook_size):
                raise ValueError(
                    f"known tokens must be code ids in [0, {model.codebook_size}), got min {kt[km].min()} and max "
                    f"{kt[km].max()}; pass tokenizer indices."
                )


def sample_tokens(
    model: MaskGITTransformer,
    params: Any,
    labels: jax.Array,
    rng: jax.Array,
    opts: SamplerOptions,
    known_tokens: jax.Array | None = None,
    known_mask: jax.Array | None = None,
    counts: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Un-jitted body of :func:`sample` (pure; ``model`` and ``opts`` static under jit).

    ``counts`` is the schedule's table ``[T, L + 1]``
    (:func:`~vqgen.generators.mask_schedules.scheduled_counts`); None builds it from
    ``opts.mask_schedule``. Passing it as an array lets schedules share one compile. Returns ``(tokens int32 [B, L], history int32 [B, T])`` where ``history[:, t]`` is the
    number of positions still masked after step ``t``. Step ``t`` draws its keys from
    ``jax.random.fold_in(rng, t)``.
    """
    params = nn.meta.unbox(params)
    batch, length, steps = labels.shape[0], model.seq_len, opts.num_steps
    k, mask_id = model.codebook_size, model.mask_token_id
    labels = labels.astype(jnp.int32)
    tokens = jnp.full((batch, length), mask_id, jnp.int32)  # [B, L]
    if known_tokens is not None:
        tokens = jnp.where(known_mask.astype(bool), known_tokens.astype(jnp.int32), tokens)  # [B, L]
    initial_unknown = jnp.sum(tokens == mask_id, axis=-1)  # [B]
    if counts is None:
        counts = mask_schedules.scheduled_counts(opts.mask_schedule, steps, length)
    table = jnp.asarray(counts, jnp.int32)  # [T, L+1]
    cond = jnp.concatenate([labels, jnp.full_like(labels, model.null_class)]) if opts.uses_cfg else labels  # [B']

    def body(t, state: _DecodeState) -> _DecodeState:
        cur = state.tokens  # [B, L]
        unknown = cur == mask_id  # [B, L]
        feed = jnp.concatenate([cur, cur]) if opts.uses_cfg else cur  # [B', L]
        logits = model.apply({"params": params}, feed, cond)[..., :k]  # [B', L, K] float32
        if opts.uses_cfg:
            scale = sampling.cfg_scale_at(t, steps, opts.cfg_scale, opts.cfg_schedule, opts.cfg_interval)
            logits = sampling.guide(logits[:batch], logits[batch:], scale)  # [B, L, K]
        sample_key, choice_key = jax.random.split(jax.random.fold_in(rng, t))
        filtered = sampling.filter_logits(logits, opts.temperature, opts.top_k, opts.top_p)  # [B, L, K]
        if opts.temperature == 0:
            drawn = jnp.argmax(filtered, axis=-1).astype(jnp.int32)  # [B, L]
        else:
            drawn = jax.random.categorical(sample_key, filtered, axis=-1).astype(jnp.int32)  # [B, L]
        drawn = jnp.where(unknown, drawn, cur)  # [B, L]
        logp = jax.nn.log_softmax(filtered, axis=-1)  # [B, L, K]
        picked = jnp.take_along_axis(logp, jnp.clip(drawn, 0, k - 1)[..., None], axis=-1)[..., 0]  # [B, L]
        ratio = (t + 1.0) / steps
        noise = opts.choice_temperature * (1.0 - ratio) * jax.random.gumbel(choice_key, (batch, length))  # [B, L]
        confidence = jnp.where(unknown, picked + noise, jnp.inf)  # [B, L]
        n_unknown = jnp.sum(unknown, axis=-1)  # [B]
        target = table[t][initial_unknown]  # [B]
        mask_len = jnp.maximum(1, jnp.minimum(n_unknown - 1, target))  # [B]
        mask_len = jnp.where(t == steps - 1, 0, jnp.minimum(mask_len, n_unknown))  # [B]
        ranks = jnp.argsort(jnp.argsort(confidence, axis=-1), axis=-1)  # [B, L] 0 = least confident
        new = jnp.where(ranks < mask_len[:, None], mask_id, drawn)  # [B, L]
        history = state.history.at[t].set(jnp.sum(new == mask_id, axis=-1).astype(jnp.int32))  # [T, B]
        return _DecodeState(tokens=new, history=history)

    init = _DecodeState(tokens=tokens, history=jnp.zeros((steps, batch), jnp.int32))
    final = jax.lax.fori_loop(0, steps, body, init)
    return final.tokens, final.history.T


_sample_jit = jax.jit(sample_tokens, static_argnames=("model", "opts"))


def sample(
    model: MaskGITTransformer,
    params: Any,
    labels: Any,
    rng: jax.Array,
    opts: SamplerOptions = SamplerOptions(),
    known_tokens: Any = None,
    known_mask: Any = None,
    *,
    return_history: bool = False,
):
    """Samples ``int32 [B, L]`` code ids for class ids ``labels [B]`` by MaskGIT decoding.

    One jitted ``lax.fori_loop`` with ``model`` and ``opts`` static: one compile per (model,
    opts except the mask schedule, batch size, editing or not); any params, labels, key and
    schedule reuse it. Editing /
    inpainting: ``known_tokens`` and ``known_mask`` (``[B, L]``) fix the tokens where the mask is
    true from the start; they are never changed, and the schedule runs over the remaining
    unknown positions of each example. ``return_history=True`` also returns ``[B, T]``, the
    number of still-masked positions after each step. Raises ``ValueError`` for more steps than
    tokens, CFG on a model without a null class, class ids or known tokens out of range.
    """
    _check_sample_args(model, labels, opts, known_tokens, known_mask)
    if known_tokens is not None:
        known_tokens = jnp.asarray(known_tokens, jnp.int32)
        known_mask = jnp.asarray(known_mask, bool)
    # The schedule enters only through its count table (a traced argument), so switching
    # schedules at a fixed number of steps reuses the executable.
    counts = mask_schedules.scheduled_counts(opts.mask_schedule, opts.num_steps, model.seq_len)  # [T, L+1]
    core = dataclasses.replace(opts, mask_schedule=SamplerOptions.mask_schedule)
    tokens, history = _sample_jit(
        model, params, jnp.asarray(labels, jnp.int32), rng, core, known_tokens, known_mask, jnp.asarray(counts)
    )
    return (tokens, history) if return_history else tokens
