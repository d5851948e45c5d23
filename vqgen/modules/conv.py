"""Convolutional building blocks of the conv tokenizers (taming/LlamaGen, MaskGIT, Open-MAGVIT2).

Everything here works on channels-last arrays. The blocks are written for any number of spatial
dimensions ``N`` (``x`` of shape ``[B, *spatial, C]``): the kernel shape, padding and logical axis
names are derived from ``spatial_dims`` (``("height", "width")`` for images), so a causal-3D
variant for video only has to add ``"time"`` and its causal padding.

Conventions shared by every block:
  * ``dtype`` is the compute dtype and ``param_dtype`` the storage dtype; both reach every
    sublayer.
  * GroupNorm computes its statistics in float32 whatever ``dtype`` is (Flax's
    ``force_float32_reductions``) and returns ``dtype``; its scale and bias are stored in
    ``param_dtype``. Attention logits and softmax are float32.
  * Conv kernels carry the logical axes ``(*spatial_dims, "conv_in", "conv_out")`` and biases
    ``("conv_out",)``; norm scales/biases ``("conv_out",)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
SPATIAL_2D = ("height", "width")


def _spatial_window(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    return (value,) * ndim if isinstance(value, int) else tuple(value)


def conv(
    features: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = None,
    use_bias: bool = True,
    spatial_dims: Sequence[str] = SPATIAL_2D,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A PyTorch-equivalent ``Conv{N}d`` with logical axis names on its parameters.

    Args:
      features: output channels.
      kernel_size: an int (same for every spatial dim) or one size per spatial dim.
      strides: like ``kernel_size``.
      padding: explicit ``[(lo, hi), ...]`` per spatial dim, or a Flax string; the default is
        PyTorch's ``padding=k // 2`` on both sides (``"same"`` for odd kernels at stride 1).
      use_bias: whether the conv has a bias.
      spatial_dims: logical names of the spatial axes, e.g. ``("height", "width")``.
      dtype, param_dtype: compute and storage dtypes.
      name: parameter scope name.
    """
    nd = len(spatial_dims)
    kernel = _spatial_window(kernel_size, nd)
    if padding is None:
        padding = [(k // 2, k // 2) for k in kernel]
    return nn.Conv(
        features,
        kernel,
        strides=_spatial_window(strides, nd),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            flat_kernel_init(nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")),  # PyTorch default
            tuple(spatial_dims) + ("conv_in", "conv_out"),
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def flat_kernel_init(init: Callable) -> Callable:
    """Wraps a fan-in/fan-out initializer so it draws ``[prod(window) * Cin, Cout]`` and reshapes.

    Same fans, same distribution; but XLA:CPU compiles a 2D random draw in a fraction of the time
    it takes for a rank-4/5 one (seconds per kernel with partitionable threefry).
    """

    def wrapped(key, shape, dtype=jnp.float32):
        flat = (math.prod(shape[:-1]), shape[-1])
        return init(key, flat, dtype).reshape(shape)

    return wrapped


def group_norm(
    *,
    num_groups: int = 32,
    epsilon: float = 1e-6,
    use_affine: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.GroupNorm:
    """PyTorch ``GroupNorm(num_groups, C, eps)``: two-pass float32 statistics, ``dtype`` output."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        use_bias=use_affine,
        use_scale=use_affine,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def swish(x: jax.Array) -> jax.Array:
    """``x * sigmoid(x)`` (a.k.a. SiLU), the nonlinearity of every VQGAN-family conv net."""
    return nn.swish(x)


def check_groups(channels: int, num_groups: int, where: str) -> None:
    """Raises a clear error when GroupNorm cannot split ``channels`` into ``num_groups``."""
    if channels % num_groups:
        raise ValueError(
            f"{where}: {channels} channels are not divisible by {num_groups} GroupNorm groups; "
            f"choose ch * ch_mult values that are multiples of {num_groups} or change norm_groups."
        )


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm, swish, conv, norm, swish, dropout, conv, + shortcut.

    Attributes:
      features: output channels.
      dropout: dropout rate before the second conv (taming/LlamaGen), active when ``train``.
      use_bias: bias on the two 3x3 convs and the shortcut (True in taming/LlamaGen; False in
        MaskGIT and Open-MAGVIT2).
      conv_shortcut: 3x3 instead of 1x1 shortcut conv when channels change.
      shortcut_from_output: reproduce MaskGIT's ``ResBlock``, whose channel-changing shortcut
        conv is applied to the *output of the residual branch* rather than to the block input
        (``y = h + conv1x1(h)``); its released checkpoint has that structure (a ``C_out x C_out``
        shortcut kernel), so it is kept as an explicit switch.
      norm_groups: GroupNorm groups.
      spatial_dims: logical names of the spatial axes.
    """

    features: int
    dropout: float = 0.0
    use_bias: bool = True
    conv_shortcut: bool = False
    shortcut_from_output: bool = False
    norm_groups: int = 32
    spatial_dims: Sequence[str] = SPATIAL_2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype, param_dtype=self.param_dtype)
        nkw = dict(num_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        in_features = x.shape[-1]
        h = swish(group_norm(name="norm1", **nkw)(x))  # [B, *S, Cin]
        h = conv(self.features, 3, use_bias=self.use_bias, name="conv1", **kw)(h)  # [B, *S, C]
        h = swish(group_norm(name="norm2", **nkw)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.features, 3, use_bias=self.use_bias, name="conv2", **kw)(h)  # [B, *S, C]
        if in_features != self.features:
            if self.conv_shortcut:
                shortcut = conv(self.features, 3, use_bias=self.use_bias, name="conv_shortcut", **kw)
            else:
                shortcut = conv(self.features, 1, use_bias=self.use_bias, name="nin_shortcut", **kw)
            x = shortcut(h if self.shortcut_from_output else x)  # [B, *S, C]
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (taming ``AttnBlock``).

    ``q, k, v, proj_out`` are 1x1 convs (kept as convs so PyTorch weights map one-to-one);
    logits and softmax are float32, scaled by ``C ** -0.5``; residual output.
    """

    norm_groups: int = 32
    spatial_dims: Sequence[str] = SPATIAL_2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        h = group_norm(name="norm", num_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        q = conv(c, 1, name="q", **kw)(h).reshape(x.shape[0], -1, c)  # [B, L, C]
        k = conv(c, 1, name="k", **kw)(h).reshape(x.shape[0], -1, c)  # [B, L, C]
        v = conv(c, 1, name="v", **kw)(h).reshape(x.shape[0], -1, c)  # [B, L, C]
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * (c**-0.5)  # [B, L, L]
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bij,bjc->bic", weights, v).reshape(x.shape)  # [B, *S, C]
        h = conv(c, 1, name="proj_out", **kw)(h)
        return x + h


def tf_avg_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """TensorFlow-style ``avg_pool(window, stride=window, 'SAME')`` over the spatial dims.

    Padding cells (added at the end of a dim whose size is not a multiple of ``window``) are
    excluded from the average, as in MaskGIT's ``dsample``; for sizes divisible by ``window`` it
    is a plain mean over non-overlapping windows.
    """
    spatial = x.shape[1:-1]
    pads = [(0, 0)] + [(0, -s % window) for s in spatial] + [(0, 0)]
    counts = jnp.pad(jnp.ones((1, *spatial, 1), jnp.float32), pads)  # [1, *S', 1]
    x = jnp.pad(x, pads)  # [B, *S', C]

    def window_sum(a):
        shape = [a.shape[0]]
        for s in a.shape[1:-1]:
            shape += [s // window, window]
        a = a.reshape(shape + [a.shape[-1]])
        return a.sum(axis=tuple(range(2, a.ndim - 1, 2)))  # [B, *S'/window, C]

    return (window_sum(x) / window_sum(counts).astype(x.dtype)).astype(x.dtype)


class Downsample(nn.Module):
    """Halves every spatial dim.

    Attributes:
      mode: ``"conv_asym"``: taming/LlamaGen, zero pad (0, 1) on each spatial dim then a 3x3
        stride-2 conv with no further padding; ``"conv"``: 3x3 stride-2 conv with padding 1
        (Open-MAGVIT2); ``"avgpool"``: TF-style 2x2 average pooling, no parameters (MaskGIT).
    """

    mode: str = "conv_asym"
    spatial_dims: Sequence[str] = SPATIAL_2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = len(self.spatial_dims)
        kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.mode == "avgpool":
            return tf_avg_pool(x)  # [B, *S/2, C]
        if self.mode == "conv_asym":
            return conv(x.shape[-1], 3, strides=2, padding=[(0, 1)] * nd, name="conv", **kw)(x)
        if self.mode == "conv":
            return conv(x.shape[-1], 3, strides=2, padding=[(1, 1)] * nd, name="conv", **kw)(x)
        raise ValueError(f"Downsample mode {self.mode!r} is unknown; use 'conv_asym', 'conv' or 'avgpool'.")


def depth_to_space(x: jax.Array, block: int = 2) -> jax.Array:
    """Channels-last DCR depth-to-space: ``[B, H, W, b*b*C] -> [B, H*b, W*b, C]``.

    Channel ``(i * b + j) * C + c`` goes to sub-pixel ``(i, j)`` of channel ``c``, the order of
    PyTorch's DCR mode used by Open-MAGVIT2's ``Upsampler``.
    """
    b, h, w, c = x.shape
    out = c // (block * block)
    x = x.reshape(b, h, w, block, block, out)  # [B, H, W, bi, bj, C]
    x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H, bi, W, bj, C]
    return x.reshape(b, h * block, w * block, out)


class Upsample(nn.Module):
    """Doubles every spatial dim.

    Attributes:
      mode: ``"nearest_conv"``: nearest-neighbour x2 then a 3x3 conv (taming, LlamaGen, MaskGIT);
        ``"depth_to_space"``: 3x3 conv to ``4 C`` channels then depth-to-space (Open-MAGVIT2).
    """

    mode: str = "nearest_conv"
    spatial_dims: Sequence[str] = SPATIAL_2D
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(spatial_dims=self.spatial_dims, dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        if self.mode == "nearest_conv":
            for axis in range(1, x.ndim - 1):
                x = jnp.repeat(x, 2, axis=axis)  # [B, ..., 2 S_axis, ..., C]
            return conv(c, 3, name="conv", **kw)(x)
        if self.mode == "depth_to_space":
            if len(self.spatial_dims) != 2:
                raise ValueError("Upsample mode 'depth_to_space' is 2D only; use 'nearest_conv' for video.")
            x = conv(4 * c, 3, name="conv", **kw)(x)  # [B, H, W, 4C]
            return depth_to_space(x, 2)  # [B, 2H, 2W, C]
        raise ValueError(f"Upsample mode {self.mode!r} is unknown; use 'nearest_conv' or 'depth_to_space'.")


class AdaptiveGroupNorm(nn.Module):
    """Open-MAGVIT2's adaptive GroupNorm: affine-free GroupNorm of ``x`` modulated by ``z``.

    ``scale = gamma(sqrt(var_spatial(z) + eps))`` and ``bias = beta(mean_spatial(z))`` per
    sample and channel, ``y = scale * GN(x) + bias``. The variance is the unbiased one (PyTorch's
    ``Tensor.var`` default, which Open-MAGVIT2 uses), computed in float32.
    """

    norm_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        c = x.shape[-1]
        spatial = tuple(range(1, z.ndim - 1))
        z32 = z.astype(jnp.float32)
        std = jnp.sqrt(jnp.var(z32, axis=spatial, ddof=1) + self.epsilon)  # [B, Dz]
        mean = jnp.mean(z32, axis=spatial)  # [B, Dz]

        def dense(name):
            return nn.Dense(
                c, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_in", "conv_out")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
            )

        scale = dense("gamma")(std)  # [B, C]
        bias = dense("beta")(mean)  # [B, C]
        h = group_norm(num_groups=self.norm_groups, epsilon=self.epsilon, use_affine=False,
                       dtype=self.dtype, param_dtype=self.param_dtype, name="gn")(x)
        bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
        return scale.reshape(bshape) * h + bias.reshape(bshape)
