"""Multi-head / grouped-query attention with an explicit, preallocated KV cache, and the
pre-norm LLaMA transformer block built on it.

The KV cache is a plain pytree (no linen collection): :func:`init_cache` allocates
``{'k': [B * KV, T, hd], 'v': [B * KV, T, hd]}`` once (head-major, as LlamaGen's cache, so that
attention reads it without a transpose; batch and kv heads share the leading axis, batch major),
and every call that is given a cache and a position ``pos`` writes its ``S`` new keys/values at
``[pos, pos + S)`` with ``lax.dynamic_update_slice`` and returns the updated cache. The merged
leading axis is for batch 1: a ``[1, KV, T, hd]`` cache is read by the attention products as
``[KV, T, hd]``, and XLA's CPU backend then fuses the cache update once for each shape and copies
the whole cache to feed each fusion, four full-cache copies per layer and step. The same code prefills many tokens
(``S > 1``) and decodes one token per step (``S == 1``); ``pos`` may be a traced scalar, so a
``lax.fori_loop`` over decoding steps compiles once. Queries attend to every cache slot whose
absolute position is ``<=`` their own (causal) — slots not yet written are masked out.

Parameters (logical axes in brackets; kernels are ``[in, ..., out]``):
``wq [embed, heads, kv]``, ``wk``/``wv [embed, heads, kv]`` (with ``num_kv_heads`` heads),
``wo [heads, kv, embed]``; optional QK-norm scales ``[kv]``. LlamaGen stores ``wq|wk|wv`` as
one fused ``wqkv`` linear; splitting its rows ``[dim, kv_dim, kv_dim]`` and reshaping gives
these kernels one-to-one.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgen.modules.layers import DEFAULT_INIT_STD, DenseGeneral, RMSNorm, SwiGLU
from vqgen.modules.rope import apply_rope

Dtype = Any
Cache = dict[str, jax.Array]

_MASK_VALUE = -1e30


def init_cache(batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: Dtype = jnp.float32) -> Cache:
    """Allocates an empty KV cache ``{'k', 'v'}`` of shape ``[batch * kv_heads, max_len, head_dim]``
    (row ``b * kv_heads + j`` holds kv head ``j`` of sample ``b``)."""
    shape = (batch * kv_heads, max_len, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def attention_mask(q_len: int, k_len: int, pos: jax.Array | int, causal: bool) -> jax.Array:
    """Boolean ``[q_len, k_len]`` mask for queries at absolute positions ``pos .. pos+q_len-1``.

    Causal: key ``j`` is visible to query ``i`` iff ``j <= pos + i``. Non-causal: every key
    written so far (``j < pos + q_len``) is visible.
    """
    q_pos = pos + jnp.arange(q_len, dtype=jnp.int32)[:, None]  # [S, 1]
    k_pos = jnp.arange(k_len, dtype=jnp.int32)[None, :]  # [1, T]
    if causal:
        return k_pos <= q_pos  # [S, T]
    return jnp.broadcast_to(k_pos < pos + q_len, (q_len, k_len))  # [S, T]


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional QK-norm and an optional KV cache.

    Call: ``out, cache = attn(x, cos, sin, cache=None, pos=0, train=False)`` with
    ``x [B, S, D]`` and RoPE tables ``cos/sin [S, hd/2]`` for the ``S`` positions being written
    (``None`` for no RoPE). Without a cache, ``x`` is the whole sequence starting at position 0
    and the returned cache is ``None``. Scores and softmax are float32.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    causal: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-5
    attn_dropout_rate: float = 0.0
    init_std: float = DEFAULT_INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array | None = None,
        sin: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        pos: jax.Array | int = 0,
        train: bool = False,
    ) -> tuple[jax.Array, Cache | None]:
        b, s, dim = x.shape
        h = self.num_heads
        kvh = self.num_kv_heads or h
        if h % kvh:
            raise ValueError(f"num_heads={h} is not a multiple of num_kv_heads={kvh}; pick kv heads dividing the heads.")
        hd = self.head_dim or dim // h

        def proj(name, heads):
            return DenseGeneral(
                (heads, hd), ("embed", "heads", "kv"), 1, self.init_std, self.dtype, self.param_dtype, name=name
            )

        q = proj("wq", h)(x)  # [B, S, H, hd]
        k = proj("wk", kvh)(x)  # [B, S, KV, hd]
        v = proj("wv", kvh)(x)  # [B, S, KV, hd]
        if self.qk_norm:
            q = RMSNorm(self.norm_eps, "kv", self.dtype, self.param_dtype, name="q_norm")(q)
            k = RMSNorm(self.norm_eps, "kv", self.dtype, self.param_dtype, name="k_norm")(k)
        if cos is not None:
            q = apply_rope(q, cos, sin)  # [B, S, H, hd]
            k = apply_rope(k, cos, sin)  # [B, S, KV, hd]
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
        k = k.transpose(0, 2, 1, 3)  # [B, KV, S, hd]
        v = v.transpose(0, 2, 1, 3)  # [B, KV, S, hd]

        qg = q.reshape(b, s, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4)  # [B, KV, G, S, hd]
        if cache is None:
            keys, values, new_cache, q_start = k, v, None, 0  # [B, KV, S, hd]
        else:
            if cache["k"].shape[0] != b * kvh:
                raise ValueError(f"the KV cache holds {cache['k'].shape[0]} rows but batch {b} x {kvh} kv heads "
                                 f"needs {b * kvh}; allocate it with init_cache(batch={b}, ...).")
            qg = qg.reshape(b * kvh, h // kvh, s, hd)  # [B*KV, G, S, hd]
            start = (0, pos, 0)
            k = k.reshape(b * kvh, s, hd).astype(cache["k"].dtype)  # [B*KV, S, hd]
            v = v.reshape(b * kvh, s, hd).astype(cache["v"].dtype)  # [B*KV, S, hd]
            keys = jax.lax.dynamic_update_slice(cache["k"], k, start)  # [B*KV, T, hd]
            values = jax.lax.dynamic_update_slice(cache["v"], v, start)  # [B*KV, T, hd]
            new_cache, q_start = {"k": keys, "v": values}, pos
        t = keys.shape[-2]

        # "..." is [B, KV] without a cache and [B*KV] with one.
        scores = jnp.einsum(
            "...gsd,...td->...gst", qg, keys.astype(self.dtype), preferred_element_type=jnp.float32
        )  # [..., G, S, T]
        scores = scores * (hd**-0.5)
        mask = attention_mask(s, t, q_start, self.causal)  # [S, T]
        scores = jnp.where(mask, scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1)  # [..., G, S, T] float32
        probs = nn.Dropout(self.attn_dropout_rate)(probs, deterministic=not train)
        out = jnp.einsum("...gst,...td->...gsd", probs.astype(self.dtype), values.astype(self.dtype),
                         preferred_element_type=jnp.float32).astype(self.dtype)  # [..., G, S, hd]
        out = out.reshape(b, kvh, h // kvh, s, hd).transpose(0, 3, 1, 2, 4).reshape(b, s, h, hd)  # [B, S, H, hd]
        out = DenseGeneral(
            (dim,), ("heads", "kv", "embed"), 2, self.init_std, self.dtype, self.param_dtype, name="wo"
        )(out)  # [B, S, D]
        return out, new_cache


class TransformerBlock(nn.Module):
    """Pre-norm LLaMA block (LlamaGen ``TransformerBlock``):
    ``h = x + drop(attn(attention_norm(x)))``, ``out = h + ffn(ffn_norm(h))``.

    Sub-module names follow LlamaGen (``attention_norm``, ``attention``, ``ffn_norm``,
    ``feed_forward``). ``resid_dropout_rate`` drops the attention output (LlamaGen's
    ``resid_dropout``), ``ffn_dropout_rate`` the feed-forward output. Stochastic depth
    (``drop_path``, 0 in LlamaGen's c2i recipes) is not implemented.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    causal: bool = True
    qk_norm: bool = False
    norm_eps: float = 1e-5
    attn_dropout_rate: float = 0.0
    resid_dropout_rate: float = 0.0
    ffn_dropout_rate: float = 0.0
    init_std: float = DEFAULT_INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array | None = None,
        sin: jax.Array | None = None,
        *,
        cache: Cache | None = None,
        pos: jax.Array | int = 0,
        train: bool = False,
    ) -> tuple[jax.Array, Cache | None]:
        attn_out, cache = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.causal,
            self.qk_norm,
            self.norm_eps,
            self.attn_dropout_rate,
            self.init_std,
            self.dtype,
            self.param_dtype,
            name="attention",
        )(RMSNorm(self.norm_eps, "embed", self.dtype, self.param_dtype, name="attention_norm")(x), cos, sin,
          cache=cache, pos=pos, train=train)  # [B, S, D]
        attn_out = nn.Dropout(self.resid_dropout_rate)(attn_out, deterministic=not train)
        h = x + attn_out  # [B, S, D]
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        ffn_out = SwiGLU(
            self.hidden_dim,
            self.multiple_of,
            self.ffn_dim_multiplier,
            self.ffn_dropout_rate,
            self.init_std,
            self.dtype,
            self.param_dtype,
            name="feed_forward",
        )(RMSNorm(self.norm_eps, "embed", self.dtype, self.param_dtype, name="ffn_norm")(h), train=train)  # [B, S, D]
        out = h + ffn_out  # [B, S, D]
        return nn.with_logical_constraint(out, ("batch", "length", "embed")), cache
