"""Decode-time weight storage for the linear layers: float32, bfloat16, or int8 weight-only
with a float32 scale per output channel, and a column-chunked layout for matrix-vector decoding.

Sampling one token at batch 1 reads every weight matrix once to multiply it by one vector, so
its speed is set by the bytes of weights read per token. :func:`decode_params` converts a trained
float32 parameter tree once, before sampling:

- ``'float32'``: kernels unchanged (values bit for bit);
- ``'bfloat16'``: kernels stored in bfloat16 (half the bytes);
- ``'int8'``: kernels stored as int8 ``q`` with a float32 scale ``s`` per output channel,
  symmetric: ``s = max|w| / 127`` over the kernel's input axes and ``q = round(w / s)`` in
  ``[-127, 127]`` (a quarter of the bytes, plus one float per output). ``|w - q s| <= s / 2``.

Only the kernels of ``nn.Dense`` and :class:`~vqgen.modules.layers.DenseGeneral` change: the
embedding tables (one row is read per token) and the norm scales stay float32 in every mode.
Each kernel becomes a :class:`DecodeKernel`: the kernel viewed as a matrix
``[prod(in axes), prod(out axes)]`` and split into column chunks of at most ``chunk_columns``
outputs. Inside :func:`decode_matmuls` (a flax method interceptor) every ``Dense`` and
``DenseGeneral`` whose kernel is a :class:`DecodeKernel` computes
``concat_i(x @ chunk_i) * scale`` in float32 instead of its own matmul; modules whose kernel is
a plain array run unchanged. Splitting the columns of a matrix does not change any output's sum
over the input axis, so float32 decode weights give the module's own results bit for bit (the
tests check it).

What XLA's CPU backend does (jax 0.10, measured on this project's 2-core x86 VM; see
``benchmarks/README.md``):

- A matrix-vector product with a wide matrix (``[768, 2048]`` and wider, e.g. GPT-B's SwiGLU and
  16,384-way output head) runs far below the memory bandwidth as one ``dot``; the same columns as
  several independent ``dot`` ops of a few hundred columns each run several times faster (the
  runtime executes independent ops concurrently and picks a faster kernel for the smaller
  matrices). That is what the column chunks are for, in every mode.
- A dot never reads int8 (or bfloat16) operands directly: XLA converts the kernel to the compute
  dtype in a separate fusion that writes a dequantised float32 copy on every decoding step
  (``wrapped_convert`` in the optimised HLO), then multiplies that copy. With column chunks the
  copy is one chunk at a time and can stay in cache, but the conversion itself costs about what
  the float32 read saves, so on this CPU int8 and bfloat16 weights shrink the bytes stored and
  read from memory without making batch-1 decoding clearly faster (GPT-B, one run at load 8:
  float32 12.3, bfloat16 10.2, int8 13.0 tokens/s for 390, 195 and 98 MB of weights per token).
  Accelerator backends (TPU) fuse the conversion into the matmul. The int8 scale multiplies the
  float32 output, never the weights.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.modules.layers import DenseGeneral

WEIGHT_DTYPES = ("float32", "bfloat16", "int8")
_STORAGE = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8}

# Column chunk width of decode kernels: GPT-B's output head becomes 32 matrix-vector products
# of [768, 512], its SwiGLU input kernels 4 of [768, 512]; narrower kernels stay whole.
DEFAULT_CHUNK_COLUMNS = 512


def check_weight_dtype(weight_dtype: Any, what: str = "weight_dtype") -> str:
    """``weight_dtype`` if it names one of :data:`WEIGHT_DTYPES`, else one ``ValueError`` sentence."""
    if not isinstance(weight_dtype, str) or weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{what}={weight_dtype!r} is not a decode weight dtype; use one of {list(WEIGHT_DTYPES)}.")
    return weight_dtype


def quantize_int8(kernel: jax.Array, num_in_axes: int = 1) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-output-channel int8 quantisation of ``kernel [*in, *out]``.

    Returns ``(q int8 [*in, *out], scale float32 [*out])`` with ``scale = max|w| / 127`` over the
    first ``num_in_axes`` axes (1 where a column is all zeros) and ``q = round(w / scale)``, so
    ``|w - q * scale| <= scale / 2`` elementwise.
    """
    w = jnp.asarray(kernel, jnp.float32)
    in_axes = tuple(range(num_in_axes))
    absmax = jnp.max(jnp.abs(w), axis=in_axes)  # [*out]
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0).astype(jnp.float32)  # [*out]
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)  # [*in, *out]
    return q, scale


def dequantize_int8(q: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 ``q * scale`` (``scale`` broadcast over the leading input axes of ``q``)."""
    return q.astype(jnp.float32) * scale.astype(jnp.float32)


@flax.struct.dataclass
class DecodeKernel:
    """A linear layer's kernel ``[*in_shape, *out_shape]`` stored for decoding.

    ``chunks``: column chunks of the ``[prod(in_shape), prod(out_shape)]`` matrix, in order, each
    float32, bfloat16 or int8; ``scales``: for int8, the float32 per-output scale of each chunk
    (``None`` otherwise).
    """

    chunks: tuple
    scales: tuple | None
    in_shape: tuple = flax.struct.field(pytree_node=False)
    out_shape: tuple = flax.struct.field(pytree_node=False)

    @property
    def weight_dtype(self) -> str:
        return {jnp.dtype(v): k for k, v in _STORAGE.items()}[jnp.dtype(self.chunks[0].dtype)]

    @property
    def nbytes(self) -> int:
        """Bytes read by one matrix-vector product: every chunk, plus the int8 scales."""
        n = sum(int(c.size) * jnp.dtype(c.dtype).itemsize for c in self.chunks)
        return n + (sum(int(s.size) * 4 for s in self.scales) if self.scales is not None else 0)

    def dense(self) -> jax.Array:
        """The float32 kernel ``[*in_shape, *out_shape]`` these chunks hold (dequantised for int8)."""
        cols = [c.astype(jnp.float32) if self.scales is None else dequantize_int8(c, s)
                for c, s in zip(self.chunks, self.scales or (None,) * len(self.chunks))]
        return jnp.concatenate(cols, axis=1).reshape(self.in_shape + self.out_shape)

    def matmul(self, x: jax.Array, dtype: Any) -> jax.Array:
        """``x [..., *in_shape] @ kernel -> [..., *out_shape]``, accumulated in float32, int8 scales
        applied to the float32 output, cast to ``dtype`` once at the end (as ``f32_dot_general``)."""
        k = len(self.in_shape)
        if tuple(x.shape[x.ndim - k:]) != tuple(self.in_shape):
            raise ValueError(f"input of shape {x.shape} does not end in the kernel's input shape {self.in_shape}; "
                             "convert the parameters of this model with decode_params.")
        lead = x.shape[: x.ndim - k]
        x2 = x.astype(dtype).reshape((-1, math.prod(self.in_shape)))  # [N, IN]
        outs = []
        for i, c in enumerate(self.chunks):
            y = jax.lax.dot_general(x2, c.astype(dtype), (((1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32)  # [N, chunk]
            if self.scales is not None:
                y = y * self.scales[i]
            outs.append(y)
        y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)  # [N, OUT]
        return y.astype(dtype).reshape(lead + tuple(self.out_shape))


def to_decode_kernel(kernel: jax.Array, num_in_axes: int, weight_dtype: str,
                     chunk_columns: int | None = DEFAULT_CHUNK_COLUMNS) -> DecodeKernel:
    """One kernel ``[*in, *out]`` (its first ``num_in_axes`` axes are inputs) as a :class:`DecodeKernel`.

    ``chunk_columns``: the widest chunk; columns are split into ``ceil(out / chunk_columns)``
    chunks of near-equal width (``None``: one chunk).
    """
    check_weight_dtype(weight_dtype)
    in_shape, out_shape = tuple(kernel.shape[:num_in_axes]), tuple(kernel.shape[num_in_axes:])
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if weight_dtype == "int8":
        q, scale = quantize_int8(kernel, num_in_axes)
        mat, scale = q.reshape(n_in, n_out), scale.reshape(n_out)
    else:
        mat, scale = jnp.asarray(kernel).astype(_STORAGE[weight_dtype]).reshape(n_in, n_out), None
    n = 1 if not chunk_columns else max(1, -(-n_out // int(chunk_columns)))
    edges = np.linspace(0, n_out, n + 1).round().astype(int)
    chunks = tuple(mat[:, a:b] for a, b in zip(edges[:-1], edges[1:]))
    scales = None if scale is None else tuple(scale[a:b] for a, b in zip(edges[:-1], edges[1:]))
    return DecodeKernel(chunks=chunks, scales=scales, in_shape=in_shape, out_shape=out_shape)


def decode_params(params: Any, weight_dtype: str = "float32", *, chunk_columns: int | None = DEFAULT_CHUNK_COLUMNS,
                  contract_dims: dict[str, int] | None = None) -> Any:
    """``params`` with every ``kernel`` leaf as a :class:`DecodeKernel` of ``weight_dtype``.

    ``params``: an (unboxed) linen parameter tree whose ``kernel`` leaves belong to ``nn.Dense``
    or :class:`~vqgen.modules.layers.DenseGeneral` layers. ``contract_dims`` maps a layer name to
    the number of input axes of its kernel when it is not 1 (the attention output projection
    ``wo [heads, head_dim, D]`` contracts 2). Other leaves are returned as they are. Use the
    result inside :func:`decode_matmuls`. Works under ``jax.jit``. Decode kernels already in the
    tree are kept when they hold ``weight_dtype``; another dtype is an error (the quantisation
    error of one dtype cannot be undone by converting again).
    """
    check_weight_dtype(weight_dtype)
    contract_dims = {"wo": 2, **(contract_dims or {})}

    def convert(tree, path):
        if isinstance(tree, DecodeKernel):
            if tree.weight_dtype != weight_dtype:
                raise ValueError(
                    f"the parameters at {'/'.join(path)} are already {tree.weight_dtype} decode weights, but "
                    f"weight_dtype={weight_dtype!r} was asked for; pass the trained parameters instead, or sample with "
                    f"weight_dtype={tree.weight_dtype!r}.")
            return tree
        if isinstance(tree, dict) or hasattr(tree, "items"):
            return {k: convert(v, path + (k,)) for k, v in tree.items()}
        if path and path[-1] == "kernel":
            in_axes = contract_dims.get(path[-2], 1) if len(path) >= 2 else 1
            return to_decode_kernel(tree, in_axes, weight_dtype, chunk_columns)
        return tree

    return convert(params, ())


def has_decode_kernels(params: Any) -> bool:
    """True when ``params`` holds any :class:`DecodeKernel` (i.e. it was made for decoding)."""
    return any(isinstance(x, DecodeKernel)
               for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, DecodeKernel)))


def weight_bytes(params: Any) -> int:
    """Bytes of every kernel of ``params`` (decode kernels at their stored dtype, plus int8 scales)."""
    total = 0
    for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, DecodeKernel)):
        if isinstance(x, DecodeKernel):
            total += x.nbytes
    return total


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, DenseGeneral)):
        return next_fun(*args, **kwargs)
    kernel = module.scope.get_variable("params", "kernel") if module.scope is not None else None
    if not isinstance(kernel, DecodeKernel):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs" if isinstance(module, nn.Dense) else "x"]
    dtype = module.dtype if module.dtype is not None else jnp.result_type(x.dtype, jnp.float32)
    y = kernel.matmul(x, dtype)
    if isinstance(module, nn.Dense) and module.use_bias:
        bias = module.scope.get_variable("params", "bias")
        y = y + jnp.asarray(bias, dtype)
    return y


@contextlib.contextmanager
def decode_matmuls():
    """Within this context, ``nn.Dense`` and ``DenseGeneral`` layers whose kernel is a
    :class:`DecodeKernel` multiply with it (:meth:`DecodeKernel.matmul`); others are unchanged."""
    with nn.intercept_methods(_interceptor):
        yield
