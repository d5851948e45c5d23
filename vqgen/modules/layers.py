"""Shared feed-forward layers: RMSNorm and the LLaMA/LlamaGen SwiGLU feed-forward.

Every module takes ``dtype`` (compute) and ``param_dtype`` (storage) and carries logical axis
names on its parameters (``embed``, ``mlp``, ``kv``), so the same code shards on any mesh.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# LlamaGen initialises every linear and embedding with N(0, 0.02).
DEFAULT_INIT_STD = 0.02


def f32_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    """``lax.dot_general`` accumulated and returned in float32, then cast to the inputs' dtype.

    The ``dot_general`` of vqgen's linear layers (``nn.Dense(dot_general=...)``): for float32
    inputs the same as the default; for bfloat16 inputs the same numbers that accelerators give
    (float32 accumulation, one rounding), and XLA's CPU backend runs a bfloat16 matmul with a
    float32 result several times faster than one with a bfloat16 result on a CPU with bfloat16
    matrix units (a 2-core host with AMX: 1.2-1.5 TFLOP/s against 0.23 at 1024x1024x4096). On a
    CPU without them bfloat16 buys nothing (a 2-core AVX-512 host without AMX: 153 GFLOP/s against
    194 in float32, same shapes).
    """
    del preferred_element_type  # always float32 here
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32, **kwargs)
    return out.astype(jnp.result_type(lhs, rhs))


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is >= ``n``."""
    return n if n % k == 0 else n + k - (n % k)


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA/LlamaGen SwiGLU width: ``find_multiple(int(m * int(2 * 4 * dim / 3)), multiple_of)``.

    ``int(2 * (4 * dim) / 3)`` keeps the parameter count of a 4x GELU MLP with three matrices;
    ``ffn_dim_multiplier`` (when given) scales it before rounding up to ``multiple_of``.
    E.g. dim 768 -> 2048, 1024 -> 2816, 1280 -> 3584, 1536 -> 4096.
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, ``x / sqrt(mean(x²) + eps) * scale``.

    The normalisation is computed in float32 and cast back to ``dtype`` before the learned
    scale is applied (as LlamaGen does: ``_norm(x.float()).type_as(x) * weight``).
    """

    eps: float = 1e-5
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (dim,), self.param_dtype
        )  # [D]
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)  # [..., D]
        return y.astype(self.dtype) * scale.astype(self.dtype)


class SwiGLU(nn.Module):
    """LlamaGen ``FeedForward``: ``w2(silu(w1 x) * w3 x)`` with bias-free linears.

    ``hidden_dim`` defaults to :func:`swiglu_hidden_dim` of the input width. Kernels are stored
    as ``[in, out]`` (the transpose of PyTorch's ``Linear.weight``); ``w1``/``w3`` carry the
    logical axes ``('embed', 'mlp')`` and ``w2`` ``('mlp', 'embed')``. Dropout is applied to the
    output (LlamaGen's ``ffn_dropout_p``).
    """

    hidden_dim: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    dropout_rate: float = 0.0
    init_std: float = DEFAULT_INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        dim = x.shape[-1]
        hidden = self.hidden_dim or swiglu_hidden_dim(dim, self.multiple_of, self.ffn_dim_multiplier)
        init = nn.initializers.normal(self.init_std)

        def dense(name, features, axes):
            return nn.Dense(
                features,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(init, axes),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                dot_general=f32_dot_general,
                name=name,
            )

        gate = dense("w1", hidden, ("embed", "mlp"))(x)  # [..., F]
        up = dense("w3", hidden, ("embed", "mlp"))(x)  # [..., F]
        h = nn.silu(gate) * up  # [..., F]
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp")) if h.ndim == 3 else h
        out = dense("w2", dim, ("mlp", "embed"))(h)  # [..., D]
        return nn.Dropout(self.dropout_rate)(out, deterministic=not train)


class DenseGeneral(nn.Module):
    """Bias-free linear map contracting the last ``contract_dims`` input axes into ``features``.

    The kernel is created directly with its full shape ``[*in_axes, *features]`` (flax's
    ``nn.DenseGeneral`` initialises a flattened 2D kernel, which breaks logical partitioning of
    multi-axis kernels under a mesh). ``axes`` are the kernel's logical names.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    contract_dims: int = 1
    init_std: float = DEFAULT_INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.contract_dims :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            in_shape + features,
            self.param_dtype,
        )  # [*in, *features]
        contract = (tuple(range(x.ndim - self.contract_dims, x.ndim)), tuple(range(self.contract_dims)))
        return f32_dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
