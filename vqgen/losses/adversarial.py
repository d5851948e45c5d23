"""Discriminators and adversarial losses for tokenizer training.

What is here, and where each piece comes from:

- :class:`PatchGANDiscriminator` -- the pix2pix / taming-transformers ``NLayerDiscriminator``
  (4x4 convolutions, ``ch`` filters doubling up to 8x, LeakyReLU 0.2, a per-patch logit map).
  **Deviation:** taming normalises with ``BatchNorm2d``; here the norm is ``GroupNorm`` (or
  none). Batch statistics are mutable state computed per call, which in a jitted, sharded step
  means an extra mutable collection, a cross-device reduction and different behaviour in
  train and eval; GroupNorm has none of that and every sample is judged independently (which
  also makes the R1 penalty a per-sample quantity). Like taming, normalised convolutions
  carry no bias.
- :class:`StyleGANDiscriminator` -- the StyleGAN2-style residual discriminator used by
  MaskGIT / MAGVIT (``videogvt/models/stylegan_discriminator_2d.py``): 3x3 convolutions,
  residual blocks that downsample both branches by a [1, 3, 3, 1] blur-pool, a 1x1 skip,
  ``(skip + x) / sqrt(2)``, then a dense head. No minibatch-std layer.
- Losses: hinge and non-saturating (``vanilla``) GAN losses as in taming's ``vqperceptual.py``
  (discriminator losses carry taming's factor 0.5), LeCam regularisation (Tseng et al. 2021,
  as in MAGVIT), the R1 gradient penalty, VQGAN's adaptive generator weight and its
  discriminator start factor.

Every loss is computed and returned in float32, whatever the compute dtype of the network.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Array = jax.Array


def _conv(
    features: int,
    kernel: int,
    *,
    strides: int = 1,
    padding: Any = "SAME",
    use_bias: bool = True,
    in_axis: str | None = "conv_in",
    out_axis: str | None = "conv_out",
    kernel_init: Callable = nn.initializers.normal(0.02),
    dtype: Dtype,
    param_dtype: Dtype,
    name: str | None = None,
) -> nn.Conv:
    """A 2D convolution with logical axis names on its kernel ``[k, k, in, out]`` and bias."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, in_axis, out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
        name=name,
    )


class PatchGANDiscriminator(nn.Module):
    """taming's PatchGAN ``NLayerDiscriminator`` with GroupNorm instead of BatchNorm.

    Layout for ``n_layers=3``, ``ch=64`` (as taming): conv 4x4/2 (64) + LeakyReLU; conv 4x4/2
    (128) + norm + LeakyReLU; conv 4x4/2 (256) + norm + LeakyReLU; conv 4x4/1 (512) + norm +
    LeakyReLU; conv 4x4/1 (1). All convolutions pad 1 pixel on each side, so a 256x256 image
    gives a 30x30 logit map. Kernels are initialised N(0, 0.02) as in taming's ``weights_init``.

    Attributes:
      ch: filters of the first convolution (taming's ``ndf``).
      n_layers: number of stride-2 convolutions.
      norm: ``"group"`` (GroupNorm with ``num_groups`` groups) or ``"none"``. BatchNorm is not
        offered: its mutable batch statistics do not belong in a pure jitted step.
      num_groups: GroupNorm groups (``gcd(num_groups, channels)`` is used, so narrow test
        widths work; 32 as in the tokenizer's GroupNorm for the real widths).
      dtype: compute dtype; param_dtype: storage dtype.
    """

    ch: int = 64
    n_layers: int = 3
    norm: str = "group"
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Maps images ``[B, H, W, C]`` to float32 patch logits ``[B, h, w, 1]``.

        (float64 only when ``dtype`` is float64, as in finite-difference tests.)

        ``train`` is accepted for the common discriminator signature; the network behaves the
        same either way (no dropout, no batch statistics).
        """
        del train
        if self.norm not in ("group", "none"):
            raise ValueError(
                f"PatchGANDiscriminator.norm={self.norm!r} is not supported; use 'group' or 'none' "
                "(BatchNorm is left out on purpose: its batch statistics are mutable state)."
            )
        if x.ndim != 4:
            raise ValueError(f"PatchGANDiscriminator expects images [B, H, W, C], got shape {x.shape}.")
        use_norm = self.norm == "group"
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pad = ((1, 1), (1, 1))

        def norm_act(h: Array, name: str) -> Array:
            if use_norm:
                h = nn.GroupNorm(
                    num_groups=math.gcd(self.num_groups, h.shape[-1]),
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                    name=name,
                    **kw,
                )(h)
            return nn.leaky_relu(h, 0.2)

        x = x.astype(self.dtype)
        h = _conv(self.ch, 4, strides=2, padding=pad, in_axis=None, name="conv_0", **kw)(x)  # [B, H/2, W/2, ch]
        h = nn.leaky_relu(h, 0.2)
        mult = 1
        for n in range(1, self.n_layers):
            mult = min(2**n, 8)
            h = _conv(self.ch * mult, 4, strides=2, padding=pad, use_bias=not use_norm, name=f"conv_{n}", **kw)(h)
            h = norm_act(h, f"norm_{n}")  # [B, H/2^(n+1), W/2^(n+1), ch*mult]
        mult = min(2**self.n_layers, 8)
        h = _conv(self.ch * mult, 4, strides=1, padding=pad, use_bias=not use_norm,
                  name=f"conv_{self.n_layers}", **kw)(h)
        h = norm_act(h, f"norm_{self.n_layers}")  # [B, h+1, w+1, ch*mult]
        logits = _conv(1, 4, strides=1, padding=pad, out_axis=None, name="conv_out", **kw)(h)  # [B, h, w, 1]
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


def blur_downsample(x: Array) -> Array:
    """Depthwise [1, 3, 3, 1] binomial blur then stride-2 subsampling of ``[B, H, W, C]``.

    The blur-pool of Zhang (2019) as MAGVIT's ``BlurPool2D(filter_size=4)``: 'SAME' padding,
    so ``H, W`` halve (rounding up).
    """
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    kernel = np.outer(taps, taps)
    kernel = kernel / kernel.sum()
    channels = x.shape[-1]
    kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), x.dtype)  # [4, 4, 1, C]
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(2, 2), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels,
    )  # [B, H/2, W/2, C]


class StyleGANResBlock(nn.Module):
    """Residual downsampling block of the StyleGAN2 discriminator (MAGVIT layout)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
        skip = x
        h = _conv(x.shape[-1], 3, name="conv_0", **kw)(x)  # [B, H, W, C]
        h = nn.leaky_relu(h, 0.2)
        h = blur_downsample(h)  # [B, H/2, W/2, C]
        skip = blur_downsample(skip)  # [B, H/2, W/2, C]
        skip = _conv(self.features, 1, use_bias=False, name="skip", **kw)(skip)  # [B, H/2, W/2, F]
        h = _conv(self.features, 3, name="conv_1", **kw)(h)  # [B, H/2, W/2, F]
        h = nn.leaky_relu(h, 0.2)
        return (skip + h) / math.sqrt(2.0)


class StyleGANDiscriminator(nn.Module):
    """StyleGAN2-style residual discriminator as used by MaskGIT / MAGVIT.

    conv 3x3 (``ch``) + LeakyReLU; one :class:`StyleGANResBlock` per entry of ``ch_mult``
    (each halves the resolution with a blur-pool and sets ``ch * mult`` filters); conv 3x3 +
    LeakyReLU; flatten; dense (``ch * ch_mult[-1]``) + LeakyReLU; dense (1). Xavier-uniform
    initialisation as in MAGVIT. The input must be ``image_size`` square, since the dense head's
    width depends on it.

    Attributes:
      ch: base filters; ch_mult: per-block multipliers; image_size: input height and width.
      dtype: compute dtype; param_dtype: storage dtype.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (2, 4, 4, 4, 4)
    image_size: int = 256
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Maps images ``[B, image_size, image_size, C]`` to float32 logits ``[B, 1]`` (float64 if ``dtype`` is)."""
        del train
        if x.ndim != 4 or x.shape[1] != self.image_size or x.shape[2] != self.image_size:
            raise ValueError(
                f"StyleGANDiscriminator was built for {self.image_size}x{self.image_size} images but got "
                f"shape {x.shape}; set image_size to the training resolution."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.xavier_uniform()
        x = x.astype(self.dtype)
        h = _conv(self.ch, 3, in_axis=None, kernel_init=init, name="conv_in", **kw)(x)  # [B, H, W, ch]
        h = nn.leaky_relu(h, 0.2)
        features = self.ch
        for i, mult in enumerate(self.ch_mult):
            features = int(self.ch * mult)
            h = StyleGANResBlock(features, name=f"block_{i}", **kw)(h)  # [B, H/2^(i+1), W/2^(i+1), F]
        h = _conv(features, 3, kernel_init=init, name="conv_out", **kw)(h)
        h = nn.leaky_relu(h, 0.2)
        h = h.reshape((h.shape[0], -1))  # [B, h*w*F]
        h = nn.Dense(
            features, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), name="dense_0",
        )(h)  # [B, F]
        h = nn.leaky_relu(h, 0.2)
        logits = nn.Dense(
            1, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(init, ("mlp", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)), name="dense_out",
        )(h)  # [B, 1]
        return logits.astype(jnp.promote_types(self.dtype, jnp.float32))


# --------------------------------------------------------------------------------------------
# GAN losses (float32 scalars).


def _f32(x: Array) -> Array:
    return jnp.asarray(x, jnp.float32)


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """Hinge discriminator loss: ``0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))``."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: Array) -> Array:
    """Hinge generator loss as in taming: ``-mean(fake)``."""
    return -jnp.mean(_f32(logits_fake))


def non_saturating_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """Non-saturating (``vanilla``) discriminator loss.

    ``0.5 * (mean(softplus(-real)) + mean(softplus(fake)))``, i.e. half the binary cross-entropy
    with labels real=1, fake=0 (taming's ``vanilla_d_loss``).
    """
    loss_real = jnp.mean(jax.nn.softplus(-_f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.softplus(_f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def non_saturating_g_loss(logits_fake: Array) -> Array:
    """Non-saturating generator loss: ``mean(softplus(-fake)) = -mean(log sigmoid(fake))``."""
    return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


def lecam_loss(logits_real: Array, logits_fake: Array, ema_real: Array, ema_fake: Array) -> Array:
    """LeCam regulariser (Tseng et al. 2021), as in MAGVIT.

    ``mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)``, where ``ema_real`` and
    ``ema_fake`` are running means of the discriminator's logits (see :func:`lecam_update_ema`);
    they are treated as constants. Added to the discriminator loss with a small weight.
    """
    ema_real = jax.lax.stop_gradient(_f32(ema_real))
    ema_fake = jax.lax.stop_gradient(_f32(ema_fake))
    term_real = jnp.mean(jnp.square(jax.nn.relu(_f32(logits_real) - ema_fake)))
    term_fake = jnp.mean(jnp.square(jax.nn.relu(ema_real - _f32(logits_fake))))
    return term_real + term_fake


def lecam_update_ema(
    ema_real: Array, ema_fake: Array, logits_real: Array, logits_fake: Array, decay: float = 0.999
) -> tuple[Array, Array]:
    """One EMA step of the LeCam anchors: ``ema = decay * ema + (1 - decay) * mean(logits)``.

    The anchors are explicit float32 scalars kept in the train state (start them at 0.0).
    Returns ``(ema_real, ema_fake)``; no gradient flows through them.
    """
    real = jax.lax.stop_gradient(jnp.mean(_f32(logits_real)))
    fake = jax.lax.stop_gradient(jnp.mean(_f32(logits_fake)))
    new_real = decay * _f32(ema_real) + (1.0 - decay) * real
    new_fake = decay * _f32(ema_fake) + (1.0 - decay) * fake
    return new_real, new_fake


def r1_penalty(disc_apply: Callable[[Any, Array], Array], params: Any, real: Array) -> Array:
    """R1 gradient penalty: ``mean_b ||d D(x_b) / d x_b||^2`` on real images.

    ``disc_apply(params, x)`` returns the logits for ``x`` (a patch map or ``[B, 1]``); ``D(x_b)``
    is the sum of sample ``b``'s logits. The gradient of the sum over the whole batch is taken
    once; this equals the per-sample gradients because the discriminators here treat every
    sample independently (no batch statistics). Differentiable in ``params``; multiply by
    ``gamma / 2`` in the caller as StyleGAN does.
    """

    def total_logit(x: Array) -> Array:
        return jnp.sum(_f32(disc_apply(params, x)))

    grads = jax.grad(total_logit)(real)  # [B, H, W, C]
    grads = _f32(grads).reshape((grads.shape[0], -1))  # [B, H*W*C]
    return jnp.mean(jnp.sum(jnp.square(grads), axis=-1))


def _global_norm(tree: Any) -> Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("adaptive_weight got an empty gradient; pass the gradient of the decoder's last layer.")
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(g))) for g in leaves))


def adaptive_weight(rec_grad: Any, gan_grad: Any, eps: float = 1e-4, max_weight: float = 1e4) -> Array:
    """VQGAN's adaptive generator weight ``||g_rec|| / (||g_gan|| + eps)``, clipped to [0, max_weight].

    ``rec_grad`` and ``gan_grad`` are the gradients (arrays or pytrees, e.g. kernel and bias) of
    the reconstruction loss (L1/L2 + perceptual) and of the generator's GAN loss with respect to
    the decoder's last layer; the norm is taken over all their leaves together. The result is
    stop-gradient'ed; the caller multiplies it by the configured discriminator weight and by
    :func:`gan_start_factor`, as taming's ``calculate_adaptive_weight`` / ``adopt_weight``.
    """
    weight = _global_norm(rec_grad) / (_global_norm(gan_grad) + eps)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def gan_start_factor(step: Array | int, start_step: Array | int) -> Array:
    """1.0 once ``step >= start_step``, else 0.0 (taming's ``adopt_weight``); traceable."""
    return jnp.where(jnp.asarray(step) >= jnp.asarray(start_step), 1.0, 0.0).astype(jnp.float32)
