"""3D convolutional blocks for video tokenizers (MAGVIT, MAGVIT-v2-style causal).

Video is channels-last ``[B, T, H, W, C]``. Every conv kernel carries the logical axes
``("time", "height", "width", "conv_in", "conv_out")``, biases ``("conv_out",)``, GroupNorm
scales and biases ``("conv_out",)``; ``dtype`` (compute) and ``param_dtype`` (storage) reach
every layer.

Padding. For a kernel ``k`` and stride ``s`` along one axis the total padding is ``k - s``
(TensorFlow ``SAME`` for lengths divisible by ``s``):

* spatial axes, and time when ``causal=False`` (MAGVIT v1): ``((k - s) // 2, k - s - (k - s) // 2)``,
  i.e. ``(1, 1)`` for a 3-tap stride-1 kernel;
* time when ``causal=True`` (MAGVIT-v2): all ``k - s`` padding goes before the first frame, so
  output frame ``i`` of a stride-``s`` conv sees input frames ``s*i - (k - s) .. s*i + s - 1``.
  At stride 1 that is frames ``i - k + 1 .. i``: output frame ``t`` never depends on input frames
  after ``t``. Padding values are zeros.

Causal normalisation. GroupNorm over ``(T, H, W)`` mixes future frames into the statistics of
past ones, so with ``causal=True`` the statistics are taken per frame (over ``(H, W)`` and the
group's channels), which keeps the whole network causal. With ``causal=False`` they are taken
over the whole clip, as in MAGVIT v1.

Temporal down/up-sampling works on non-overlapping blocks of ``2`` frames (average pooling, or a
causal strided conv whose receptive field ends at the block's last frame; nearest-neighbour
repetition followed by a causal conv), so a causal network stays *block-causal*: everything
computed for frames in block ``j`` depends only on input frames up to the end of block ``j``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgen.modules.conv import check_groups, group_norm, swish

Dtype = Any
VIDEO_DIMS = ("time", "height", "width")
ACTIVATION_AXES_3D = ("batch", "time", "height", "width", None)


def flat_fan_in_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
    """Variance-scaling (1.0, fan_in, truncated normal) init of a conv kernel ``[*window, Cin, Cout]``.

    Draws a 2D ``[prod(window) * Cin, Cout]`` sample (same fan-in, same distribution) and reshapes
    it: with ``jax_threefry_partitionable`` (the default), XLA:CPU takes seconds to compile a
    random draw of a rank-5 shape, and a 3D tokenizer has dozens of kernels.
    """
    flat = (math.prod(shape[:-1]), shape[-1])
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")(key, flat, dtype).reshape(shape)


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    out = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3:
        raise ValueError(f"expected an int or 3 values (time, height, width), got {value!r}.")
    return out  # type: ignore[return-value]


def conv3d_padding(kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1,
                   causal: bool = False, first_frame: bool = False) -> list[tuple[int, int]]:
    """Explicit ``[(lo, hi)] * 3`` padding of a 3D conv (see the module docstring).

    ``first_frame`` (causal only): ``kt - 1`` past frames of padding whatever the temporal
    stride, so a strided conv maps ``1 + s m`` frames to ``1 + m`` and output frame 0 sees input
    frame 0 alone (MAGVIT-v2's image-and-video layout)."""
    pads = []
    for axis, (k, s) in enumerate(zip(_triple(kernel_size), _triple(strides))):
        total = max(k - s, 0)
        if axis == 0 and causal:
            pads.append((k - 1 if first_frame else total, 0))
        else:
            pads.append((total // 2, total - total // 2))
    return pads


class Conv3D(nn.Module):
    """A 3D conv over ``[B, T, H, W, C]`` computed as one 2D conv over time-shifted frames.

    Parameters are those of ``nn.Conv`` with a 3D window: ``kernel`` ``[kt, kh, kw, Cin, Cout]``
    and ``bias`` ``[Cout]``. With temporal stride 1 the ``kt`` time-shifted copies of the (time
    padded) input are stacked on the channel axis and convolved per frame with the kernel
    reshaped to ``[kh, kw, kt * Cin, Cout]``: the same sum as the 3D conv, but XLA:CPU runs
    2D convs several times faster than 3D ones (forward and backward; ~5x at the moving-MNIST
    sizes). A temporal stride above 1 uses the 3D conv directly.

    Attributes:
      features: output channels.
      kernel_size: ``(kt, kh, kw)``.
      strides: ``(st, sh, sw)``.
      padding: ``[(lo, hi)] * 3`` explicit zero padding (see :func:`conv3d_padding`).
      use_bias: add ``bias``.
      dtype, param_dtype: compute and storage dtypes.
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    strides: tuple[int, int, int] = (1, 1, 1)
    padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1), (1, 1))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 5:
            raise ValueError(f"Conv3D expects [B, T, H, W, C] input, got shape {tuple(x.shape)}.")
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.strides
        cin = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(flat_fan_in_init, VIDEO_DIMS + ("conv_in", "conv_out")),
            (kt, kh, kw, cin, self.features), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)  # [kt, kh, kw, Cin, Cout]
        (t_lo, t_hi), pad_h, pad_w = (tuple(p) for p in self.padding)
        if st == 1:
            b = x.shape[0]
            xp = jnp.pad(x, ((0, 0), (t_lo, t_hi), (0, 0), (0, 0), (0, 0)))  # [B, T + pads, H, W, Cin]
            t_out = xp.shape[1] - kt + 1
            if kt == 1:
                stacked = xp
            else:
                stacked = jnp.concatenate([xp[:, dt:dt + t_out] for dt in range(kt)], axis=-1)  # [B, T', H, W, kt*Cin]
            frames = stacked.reshape((b * t_out,) + stacked.shape[2:])  # [B*T', H, W, kt*Cin]
            k2 = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kt * cin, self.features)
            y = jax.lax.conv_general_dilated(
                frames, k2, (sh, sw), [pad_h, pad_w],
                dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B*T', H', W', Cout]
            y = y.reshape((b, t_out) + y.shape[1:])  # [B, T', H', W', Cout]
        else:
            y = jax.lax.conv_general_dilated(
                x, kernel, (st, sh, sw), [(t_lo, t_hi), pad_h, pad_w],
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))  # [B, T', H', W', Cout]
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                              (self.features,), self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y


def conv3d(
    features: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    strides: int | Sequence[int] = 1,
    causal: bool = False,
    first_frame: bool = False,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> Conv3D:
    """A 3D conv over ``[B, T, H, W, C]`` with causal (past-only) or centred padding in time.

    The parameters sit directly under ``name`` (``kernel`` ``[kt, kh, kw, Cin, Cout]``,
    ``bias``), like the 2D convs of :mod:`vqgen.modules.conv`, so 2D weights map onto them by
    name (see :func:`vqgen.tokenizers.magvit.inflate_2d_params`). See :class:`Conv3D`.
    """
    return Conv3D(
        features,
        _triple(kernel_size),
        strides=_triple(strides),
        padding=tuple(conv3d_padding(kernel_size, strides, causal, first_frame)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def apply_norm(norm: nn.Module, x: jax.Array, causal: bool) -> jax.Array:
    """Applies a GroupNorm to ``x`` ``[B, T, H, W, C]``; per-frame statistics when ``causal``."""
    if not causal:
        return norm(x)  # statistics over (T, H, W, channels of a group)
    b, t = x.shape[:2]
    return norm(x.reshape((b * t,) + x.shape[2:])).reshape(x.shape)  # per-frame statistics


class ResBlock3D(nn.Module):
    """Pre-activation 3D residual block: GN, swish, 3x3x3 conv, GN, swish, dropout, 3x3x3 conv.

    A 1x1x1 ``nin_shortcut`` (or 3x3x3 ``conv_shortcut``) maps the block input when the channel
    count changes (MAGVIT ``enc_dec_3dcnn.ResBlock``). Parameter names (``norm1``, ``conv1``,
    ``norm2``, ``conv2``, ``nin_shortcut``) are those of the 2D :class:`~vqgen.modules.conv.ResnetBlock`.

    Attributes:
      features: output channels.
      causal: causal time padding and per-frame GroupNorm statistics.
      dropout: dropout rate before the second conv, active when ``train``.
      use_bias: bias on the two 3x3x3 convs and the shortcut (False in MAGVIT).
      conv_shortcut: 3x3x3 instead of 1x1x1 shortcut when channels change.
      norm_groups: GroupNorm groups.
    """

    features: int
    causal: bool = False
    dropout: float = 0.0
    use_bias: bool = False
    conv_shortcut: bool = False
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kw = dict(causal=self.causal, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
        nkw = dict(num_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        in_features = x.shape[-1]
        check_groups(in_features, self.norm_groups, "ResBlock3D input")
        check_groups(self.features, self.norm_groups, "ResBlock3D output")
        h = swish(apply_norm(group_norm(name="norm1", **nkw), x, self.causal))  # [B, T, H, W, Cin]
        h = conv3d(self.features, 3, name="conv1", **kw)(h)  # [B, T, H, W, C]
        h = swish(apply_norm(group_norm(name="norm2", **nkw), h, self.causal))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv3d(self.features, 3, name="conv2", **kw)(h)  # [B, T, H, W, C]
        if in_features != self.features:
            if self.conv_shortcut:
                x = conv3d(self.features, 3, name="conv_shortcut", **kw)(x)  # [B, T, H, W, C]
            else:
                x = conv3d(self.features, 1, name="nin_shortcut", **kw)(x)  # [B, T, H, W, C]
        return nn.with_logical_constraint(x + h, ACTIVATION_AXES_3D)


def avg_pool_3d(x: jax.Array, temporal: bool, first_frame: bool = False) -> jax.Array:
    """Mean over non-overlapping ``(2 or 1) x 2 x 2`` blocks of ``x`` ``[B, T, H, W, C]``.

    Equal to TensorFlow's ``avg_pool3d(..., 'SAME')`` (MAGVIT's ``downsample``) for sizes divisible
    by the window, which :class:`Downsample3D` checks. ``first_frame`` (with ``temporal``): frame
    0 is pooled alone in space and frames ``1 ..`` in pairs, so ``1 + 2m`` frames become ``1 + m``.
    """
    if temporal and first_frame:
        head = avg_pool_3d(x[:, :1], temporal=False)  # [B, 1, H/2, W/2, C]
        if x.shape[1] == 1:
            return head
        return jnp.concatenate([head, avg_pool_3d(x[:, 1:], temporal=True)], axis=1)  # [B, 1 + (T-1)/2, ...]
    b, t, h, w, c = x.shape
    ft = 2 if temporal else 1
    x = x.reshape(b, t // ft, ft, h // 2, 2, w // 2, 2, c)  # [B, T/ft, ft, H/2, 2, W/2, 2, C]
    return jnp.mean(x, axis=(2, 4, 6), dtype=jnp.float32).astype(x.dtype)  # [B, T/ft, H/2, W/2, C]


class Downsample3D(nn.Module):
    """Halves H and W, and T when ``temporal``.

    Attributes:
      temporal: also halve the time axis.
      mode: ``"avgpool"`` (MAGVIT v1, parameter-free) or ``"conv"`` (3x3x3 conv with stride
        ``(2 or 1, 2, 2)``, causal in time when ``causal``; MAGVIT's ``conv_downsample``).
      causal: causal time padding of the ``"conv"`` mode.
      first_frame: frame 0 is downsampled alone and the rest in pairs (``1 + 2m`` frames ->
        ``1 + m``; MAGVIT-v2), in either mode.
    """

    temporal: bool = True
    mode: str = "avgpool"
    causal: bool = False
    first_frame: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ft = 2 if self.temporal else 1
        first = self.first_frame and self.temporal
        if (x.shape[1] - first) % ft or x.shape[2] % 2 or x.shape[3] % 2:
            frames = f"T - 1 divisible by {ft}" if first else f"T divisible by {ft}"
            raise ValueError(
                f"Downsample3D(temporal={self.temporal}) needs {frames} and even H, W; got "
                f"{tuple(x.shape[1:4])}. Use clip lengths and sizes divisible by the tokenizer's factors."
            )
        if self.mode == "avgpool":
            return avg_pool_3d(x, self.temporal, first)  # [B, T/ft (or 1 + (T-1)/ft), H/2, W/2, C]
        if self.mode == "conv":
            return conv3d(x.shape[-1], 3, strides=(ft, 2, 2), causal=self.causal, first_frame=first,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)  # [B, t', H/2, W/2, C]
        raise ValueError(f"Downsample3D mode {self.mode!r} is unknown; use 'avgpool' or 'conv'.")


class Upsample3D(nn.Module):
    """Doubles H and W (and T when ``temporal``) by nearest-neighbour repetition, then a 3x3x3 conv.

    MAGVIT's ``nearest+conv`` upsampler. The conv's parameters live under ``conv``, like the 2D
    :class:`~vqgen.modules.conv.Upsample`. ``first_frame`` (with ``temporal``): the first of the
    doubled frames is dropped, so ``1 + m`` frames become ``1 + 2m`` and frame 0 stays alone
    (MAGVIT-v2).
    """

    temporal: bool = True
    causal: bool = False
    first_frame: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.temporal:
            x = jnp.repeat(x, 2, axis=1)  # [B, 2T, H, W, C]
            if self.first_frame:
                x = x[:, 1:]  # [B, 2T - 1, H, W, C]
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # [B, T', 2H, 2W, C]
        return conv3d(x.shape[-1], 3, causal=self.causal, dtype=self.dtype, param_dtype=self.param_dtype,
                      name="conv")(x)
