"""The KL-VAE tokenizer of MAR (the latent-diffusion autoencoder with a diagonal Gaussian posterior):
images <-> continuous latent maps.

    x [B, H, W, C] -> Encoder -> quant_conv (1x1) -> (mean, logvar) [B, h, w, embed_dim] each
    z = mean (+ exp(logvar / 2) * eps when sampling) -> post_quant_conv (1x1) -> Decoder -> x_rec

Mirrors LTH14/mar ``models/vae.py`` (adopted there from CompVis/latent-diffusion), as MAR builds
its KL-16 (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``): the taming encoder and
decoder of :mod:`vqgen.tokenizers.vqgan` (``style='taming'``: ResnetBlocks with biases and 1x1
``nin_shortcut``, zero-pad (0, 1) stride-2 conv downsampling, nearest x2 + conv upsampling,
GroupNorm(32, eps 1e-6), swish, a mid stage of ResnetBlock/AttnBlock/ResnetBlock, one extra
ResnetBlock per decoder level) with filters 128, two res blocks per level, the encoder's
``conv_out`` giving ``2 * embed_dim`` channels (LDM's ``double_z``), ``quant_conv``
``2 e -> 2 e`` and ``post_quant_conv`` ``e -> e`` (1x1). MAR's encoder has attention at
resolution 16 (its last level at 256 px) and its decoder none outside the mid stage, so the two
halves take separate ``encoder_attn_resolutions`` / ``decoder_attn_resolutions``.

The posterior (LDM's ``DiagonalGaussianDistribution``): the ``quant_conv`` output split into mean
and log-variance along channels (mean first), the log-variance clamped to [-30, 20];
``KL = 0.5 * sum(mean² + var - 1 - logvar)`` over the latent map of each example. Training
reconstructs from a posterior sample (the ``'quantizer'`` rng); :meth:`KLVAE.encode` gives the
mean unless ``sample_posterior=True``.

Loss weighting. LDM's ``LPIPSWithDiscriminator`` sums the reconstruction error over the pixels
and the KL over the latent, each averaged over the batch, and adds ``kl_weight * KL`` (1e-6 for
KL-16). vqgen's tokenizer phase averages the reconstruction over the pixels instead, so the
quantizer-slot loss here is ``kl_weight * KL / (H * W * C)`` averaged over the batch: the same
ratio of the two terms as LDM's. LDM's learned output log-variance (initialised at 0, which is
the plain L1 sum) is not modelled.

Latents enter a generator multiplied by ``scale_factor`` (MAR: 0.2325 for KL-16, which makes them
roughly unit-variance) and sampled latents are divided by it before :meth:`KLVAE.decode`; the
tokenizer carries the factor, the trainer applies it (``vqgen.train.builders.TokenSpec.latent_scale``).

The module honours the tokenizer contract of DESIGN.md §3 where it applies: ``__call__`` gives
``(x_rec, QuantizerOutput)`` with the latents in ``quantized``, the weighted KL in ``loss`` and
``metrics`` ``{'kl', 'posterior_std', 'latent_std'}``; ``indices`` is an all-zero ``int32 [B, h, w]``
placeholder (there are no codes) that only carries the latent grid. ``decode_indices`` is refused.

Parameter names follow :mod:`vqgen.tokenizers.vqgan` (``encoder/down_{i}_block_{j}/conv1``,
``decoder/up_{i}_block_{j}``, ``mid_block_1``, ``mid_attn_1``, ...), so the decoder's last kernel is
at ``LAST_LAYER`` for the adaptive GAN weight and ``vqgen.convert.conv_blocks`` maps MAR's keys.

Parameter counts (``count_params``): ``kl16`` (MAR's KL-16, 256x256x3) 66,456,019, exactly the
count of the official ``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`` built on torch's
meta device; the quickstart's digit VAE (``configs/tokenizers/kl16.py``, 32x32x1 -> 8x8x4) 241,749.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgen.modules.conv import check_groups, conv
from vqgen.quantizers.base import QuantizerOutput
from vqgen.tokenizers.vqgan import Decoder, Encoder

Dtype = Any

LOGVAR_RANGE = (-30.0, 20.0)  # LDM's clamp of the posterior log-variance
MAR_SCALE_FACTOR = 0.2325     # MAR's latent scale for KL-16 (engine_mar.py)


class KLVAE(nn.Module):
    """Conv encoder, diagonal Gaussian posterior, conv decoder (see the module docstring).

    Attributes:
      in_channels, out_channels: image channels (``out_channels`` defaults to ``in_channels``).
      ch, ch_mult, num_res_blocks, resolution, dropout, norm_groups: the taming encoder/decoder's
        (``len(ch_mult) - 1`` halvings; ``resolution`` only places attention).
      encoder_attn_resolutions, decoder_attn_resolutions: feature-map sizes with AttnBlocks in
        each half (MAR's KL-16: ``(16,)`` and ``()``).
      embed_dim: latent channels (16 for KL-16).
      kl_weight: weight of the KL term (LDM's, per the module docstring's normalisation).
      scale_factor: the factor latents are multiplied by before a generator sees them.
      dtype, param_dtype: compute and storage dtypes, passed to every layer.
    """

    in_channels: int = 3
    out_channels: int | None = None
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    encoder_attn_resolutions: Sequence[int] = (16,)
    decoder_attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    embed_dim: int = 16
    dropout: float = 0.0
    kl_weight: float = 1e-6
    scale_factor: float = MAR_SCALE_FACTOR
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    continuous = True  # no codebook: the generator reads latents (vqgen.train.builders.token_spec)

    def setup(self):
        if not self.ch_mult:
            raise ValueError("ch_mult is empty; give at least one channel multiplier, e.g. (1, 2, 2).")
        for mult in self.ch_mult:
            check_groups(self.ch * mult, self.norm_groups, f"KLVAE(ch={self.ch}, ch_mult={tuple(self.ch_mult)})")
        if int(self.embed_dim) < 1:
            raise ValueError(f"embed_dim={self.embed_dim} must be at least 1; MAR's KL-16 uses 16.")
        if not float(self.scale_factor) > 0:
            raise ValueError(f"scale_factor={self.scale_factor} must be positive; MAR uses 0.2325 for KL-16.")
        if float(self.kl_weight) < 0:
            raise ValueError(f"kl_weight={self.kl_weight} must be >= 0; LDM's KL-16 uses 1e-6.")
        arch = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    resolution=self.resolution, dropout=self.dropout, style="taming", norm_groups=self.norm_groups,
                    dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(z_channels=2 * self.embed_dim, attn_resolutions=tuple(self.encoder_attn_resolutions),
                               **arch)
        self.decoder = Decoder(out_channels=self.out_channels or self.in_channels,
                               attn_resolutions=tuple(self.decoder_attn_resolutions), **arch)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.quant_conv = conv(2 * self.embed_dim, 1, **kw)
        self.post_quant_conv = conv(self.embed_dim, 1, **kw)

    @property
    def downsample_factor(self) -> int:
        """Image size / latent-map size."""
        return 2 ** (len(self.ch_mult) - 1)

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"KLVAE expects images [B, H, W, {self.in_channels}] in [-1, 1], got shape "
                             f"{tuple(x.shape)}; pass channels-last images or set in_channels.")
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by the downsampling factor {f} "
                             f"(ch_mult={tuple(self.ch_mult)}); resize or crop the images to a multiple of {f}.")

    def posterior(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(mean, logvar)``, float32 ``[B, h, w, embed_dim]`` each, of images ``[B, H, W, C]``
        (the log-variance clamped to LDM's [-30, 20])."""
        self._check_input(x)
        moments = self.quant_conv(self.encoder(x, train)).astype(jnp.float32)  # [B, h, w, 2e]
        mean, logvar = jnp.split(moments, 2, axis=-1)  # mean first, as LDM's torch.chunk on channels
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def encode(self, x: jax.Array, train: bool = False, sample_posterior: bool | None = None) -> QuantizerOutput:
        """Images -> :class:`QuantizerOutput` whose ``quantized`` is the (unscaled) latent map
        ``[B, h, w, embed_dim]``: a posterior sample (``'quantizer'`` rng) when ``sample_posterior``
        (default: ``train``), else the mean; ``loss`` is the weighted KL."""
        sample_posterior = train if sample_posterior is None else sample_posterior
        mean, logvar = self.posterior(x, train)
        std = jnp.exp(0.5 * logvar)
        z = mean
        if sample_posterior:
            z = mean + std * jax.random.normal(self.make_rng("quantizer"), mean.shape, jnp.float32)
        kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))  # [B]
        pixels = float(np.prod(x.shape[1:]))
        loss = float(self.kl_weight) * jnp.mean(kl) / pixels
        metrics = {"kl": jnp.mean(kl), "posterior_std": jnp.mean(std), "latent_std": jnp.std(mean)}
        indices = jnp.zeros(mean.shape[:-1], jnp.int32)  # [B, h, w]: no codes, only the grid
        return QuantizerOutput(quantized=z.astype(self.dtype), indices=indices, loss=loss, metrics=metrics)

    def decode(self, z: jax.Array, train: bool = False) -> jax.Array:
        """Unscaled latents ``[B, h, w, embed_dim]`` -> images ``[B, h*f, w*f, out_channels]``."""
        if z.ndim != 4 or z.shape[-1] != self.embed_dim:
            raise ValueError(f"latents of shape {tuple(z.shape)} are not [B, h, w, {self.embed_dim}]; pass this "
                             f"tokenizer's latent maps ({self.embed_dim} channels).")
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)), train)

    def decode_indices(self, indices: Any) -> jax.Array:
        raise ValueError("a KL tokenizer has no code ids; decode its latents with decode(latents) instead.")

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Reconstruction ``[B, H, W, out_channels]`` (from a posterior sample when training) and
        the posterior's :class:`QuantizerOutput`."""
        out = self.encode(x, train=train)
        return self.decode(out.quantized, train=train), out


def count_params(module: nn.Module, image_size: int, channels: int) -> int:
    """Number of parameters of ``module`` (shapes only, via ``jax.eval_shape``)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(lambda r, xx: module.init({"params": r, "quantizer": r}, xx), jax.random.key(0), x)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(variables["params"]))))


# Architecture kwargs of each variant (the ``config.tokenizer`` section minus ``arch``).
VARIANTS: dict[str, dict[str, Any]] = {
    # MAR's KL-16 (main_mar.py: AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)), LDM's defaults
    # otherwise): 256 px -> 16x16x16 latents.
    "kl16": dict(in_channels=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, encoder_attn_resolutions=(16,),
                 decoder_attn_resolutions=(), resolution=256, embed_dim=16, dropout=0.0, kl_weight=1e-6,
                 scale_factor=MAR_SCALE_FACTOR, norm_groups=32),
}
