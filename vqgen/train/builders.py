"""From config sections to modules: a dict from name to constructor, nothing more.

Modules receive explicit fields; only this file reads the model sections of a config. It also
holds the one rule for what a tokenizer config produces, :func:`token_spec` (token grid,
vocabulary, image or video), computed with ``jax.eval_shape`` from the config alone.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vqgen import generators
from vqgen.generators import var
from vqgen.losses import adversarial
from vqgen.train.common import dtype_from_name

# name -> (module path, class name); imported lazily so a missing optional family costs nothing.
QUANTIZERS = {
    "vq": ("vqgen.quantizers.vq", "VectorQuantizer"),
    "lfq": ("vqgen.quantizers.lfq", "LookupFreeQuantizer"),
    "fsq": ("vqgen.quantizers.fsq", "FiniteScalarQuantizer"),
    "ibq": ("vqgen.quantizers.ibq", "IndexBackpropQuantizer"),
    "rq": ("vqgen.quantizers.residual", "ResidualQuantizer"),
    "msrq": ("vqgen.quantizers.multiscale", "MultiScaleResidualQuantizer"),
}


# tokenizer.arch -> (module path, class name, whether it reads video clips [T, H, W, C]).
TOKENIZERS = {
    "vqgan": ("vqgen.tokenizers.vqgan", "VQGAN", False),
    "magvit": ("vqgen.tokenizers.magvit", "MAGVIT", True),
    "vit_vqgan": ("vqgen.tokenizers.vit", "ViTVQGAN", False),
    "titok": ("vqgen.tokenizers.vit", "TiTok", False),
    "kl": ("vqgen.tokenizers.kl", "KLVAE", False),  # continuous latents, no quantizer section
}


def _to_plain(cfg: Any) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}.")
    module, cls = table[name][:2]
    return getattr(importlib.import_module(module), cls)


def build_quantizer(cfg: Any, dtype: Any) -> nn.Module:
    kw = _to_plain(cfg)
    cls = _lookup(QUANTIZERS, kw.pop("type"), "quantizer type")
    if "dtype" in cls.__dataclass_fields__:
        kw["dtype"] = dtype
    return cls(**kw)


def build_tokenizer(cfg: Any, channels: int) -> nn.Module:
    """``config.tokenizer`` -> a tokenizer module (``arch`` picks the family)."""
    kw = _to_plain(cfg)
    arch = kw.pop("arch")
    cls = _lookup(TOKENIZERS, arch, "tokenizer arch")
    dtype = dtype_from_name(kw.pop("dtype", "float32"))
    if "quantizer" in cls.__dataclass_fields__:
        if "quantizer" not in kw:
            raise ValueError(f"tokenizer.arch={arch!r} needs a tokenizer.quantizer section (type vq, lfq, fsq, ibq, rq "
                             "or msrq); add one, or use tokenizer.arch='kl' for continuous latents.")
        kw["quantizer"] = build_quantizer(kw.pop("quantizer"), dtype)
    elif "quantizer" in kw:
        raise ValueError(f"tokenizer.arch={arch!r} gives continuous latents and has no quantizer; remove the "
                         "tokenizer.quantizer section (or use a VQ tokenizer such as arch='vqgan').")
    return cls(in_channels=channels, out_channels=channels, dtype=dtype, **kw)


def is_video(config) -> bool:
    """Whether the config's tokenizer reads video clips (the one place this is decided); a config
    without a tokenizer (a family over pixels) models images."""
    if "tokenizer" not in config:
        return False
    arch = config.tokenizer.arch
    if arch not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer arch {arch!r}; choose one of {sorted(TOKENIZERS)}.")
    return TOKENIZERS[arch][2]


def example_shape(config) -> tuple[int, ...]:
    """Shape of one tokenizer input: ``(H, W, C)``, or ``(T, H, W, C)`` for a video tokenizer."""
    size, channels = int(config.data.image_size), int(config.data.channels)
    image = (size, size, channels)
    return (int(config.tokenizer.num_frames),) + image if is_video(config) else image


def quantizer_codebook_size(q: nn.Module) -> int | None:
    """Number of codes of a quantizer module, or None where it has no discrete codebook."""
    if q is None:
        return None
    size = getattr(q, "codebook_size", None)
    if isinstance(size, (int, np.integer)):
        return int(size)
    levels = getattr(q, "levels", None)
    return int(np.prod(levels)) if levels is not None else None


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """What a tokenizer config produces per example.

    Attributes:
      grid: token-map shape, ``(h, w)`` for images or ``(t, h, w)`` for video; for a multi-scale
        tokenizer the grid of its last (largest) scale.
      vocab_size: number of codes (None for a tokenizer without a discrete codebook).
      example: input shape ``(H, W, C)`` or ``(T, H, W, C)``.
      scales: the side lengths of a multi-scale tokenizer's square token maps, small to large
        (VAR's pyramid; ``grid == (scales[-1],) * 2``), or None for a single token map.
      code_dim: channels of the quantized latent (the quantizer's code dimension; for a KL
        tokenizer the latent width).
      kind: what a generator reads (the ``INPUT_KIND`` of :mod:`vqgen.generators`): ``'tokens'``
        (code ids), ``'latents'`` (a KL tokenizer's continuous latent map ``[h, w, latent_dim]``)
        or ``'pixels'`` (the images, no tokenizer; ``grid`` is ``(H, W)``).
      latent_dim: channels of a KL tokenizer's latent map (None otherwise).
      latent_scale: the factor latents are multiplied by before a generator reads them (the KL
        tokenizer's ``scale_factor``; 1 otherwise).
    """

    grid: tuple[int, ...]
    vocab_size: int | None
    example: tuple[int, ...]
    scales: tuple[int, ...] | None = None
    code_dim: int | None = None
    kind: str = "tokens"
    latent_dim: int | None = None
    latent_scale: float = 1.0

    @property
    def video(self) -> bool:
        return len(self.example) == 4

    @property
    def num_frames(self) -> int | None:
        return self.example[0] if self.video else None

    @property
    def seq_len(self) -> int:
        """Tokens per example: the grid's size, or every scale's map for a pyramid."""
        if self.scales is not None:
            return sum(s * s for s in self.scales)
        return math.prod(self.grid)

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Shape of one example's generator input: token ids over the grid, or ``(seq_len,)`` for a
        pyramid (the maps flattened row-major and joined from the smallest scale on); the latent
        map ``(h, w, latent_dim)`` for ``kind='latents'``; the image for ``kind='pixels'``."""
        if self.kind == "latents":
            return tuple(self.grid) + (int(self.latent_dim),)
        if self.kind == "pixels":
            return tuple(self.example)
        return (self.seq_len,) if self.scales is not None else tuple(self.grid)


def flat_indices(indices: Any) -> jax.Array:
    """A quantizer's ``indices`` as ``[B, L]``: a tuple of per-scale maps is flattened and joined
    (the token-pyramid layout of :attr:`TokenSpec.token_shape`); an array is flattened per example."""
    if isinstance(indices, (tuple, list)):
        return jnp.concatenate([i.reshape(i.shape[0], -1) for i in indices], axis=1)
    return indices.reshape(indices.shape[0], -1)


def split_pyramid(tokens: jax.Array, scales: tuple[int, ...]) -> tuple[jax.Array, ...]:
    """``[B, L]`` token pyramid -> a tuple of ``[B, s, s]`` maps (the inverse of :func:`flat_indices`;
    VAR's :func:`~vqgen.generators.var.split_scales`)."""
    return var.split_scales(tokens, scales)


@functools.lru_cache(maxsize=64)
def _token_spec(tokenizer_json: str, channels: int, example: tuple[int, ...]) -> TokenSpec:
    cfg = ml_collections.ConfigDict(json.loads(tokenizer_json))  # cached by its JSON
    model = build_tokenizer(cfg, channels)
    dummy = jax.ShapeDtypeStruct((1,) + example, jnp.float32)

    def encode(rng, x):
        rngs = {"params": rng, "dropout": rng, "codebook": rng, "quantizer": rng}
        out, _ = model.init_with_output(rngs, x, method="encode")
        return out.indices, out.quantized

    indices, quantized = jax.eval_shape(encode, jax.random.key(0), dummy)
    if getattr(model, "continuous", False):  # a KL tokenizer: latents [1, h, w, C], no codebook
        return TokenSpec(grid=tuple(int(s) for s in quantized.shape[1:-1]), vocab_size=None, example=example,
                         code_dim=int(quantized.shape[-1]), kind="latents", latent_dim=int(quantized.shape[-1]),
                         latent_scale=float(model.scale_factor))
    scales = None
    if isinstance(indices, (tuple, list)):
        scales = tuple(int(i.shape[1]) for i in indices)
        indices = indices[-1]
    return TokenSpec(grid=tuple(int(s) for s in indices.shape[1:]),
                     vocab_size=quantizer_codebook_size(getattr(model, "quantizer", None)),
                     example=example, scales=scales, code_dim=int(quantized.shape[-1]))


def token_spec(config) -> TokenSpec:
    """The token spec of ``config``'s tokenizer (``jax.eval_shape``: no weights, no devices)."""
    if "tokenizer" not in config:
        raise ValueError("the config has no tokenizer section; add one (e.g. from configs/quickstart.py), or use a "
                         "generator over pixels, which needs none.")
    return _token_spec(config.tokenizer.to_json(), int(config.data.channels), example_shape(config))


def pixel_spec(config) -> TokenSpec:
    """The spec of a family that models the images themselves (``kind='pixels'``, no tokenizer)."""
    example = example_shape(config)
    return TokenSpec(grid=tuple(example[:-1]), vocab_size=None, example=example, kind="pixels")


def generator_kind(config) -> str:
    """What ``config``'s generator family models: ``'tokens'``, ``'latents'`` or ``'pixels'``."""
    return generators.input_kind(generators.family(config.generator.arch))


def input_spec(config) -> TokenSpec:
    """What ``config``'s generator phase reads: :func:`pixel_spec` for a family over pixels, else
    the :func:`token_spec` of its tokenizer."""
    return pixel_spec(config) if generator_kind(config) == "pixels" else token_spec(config)


def needs_tokenizer(config) -> bool:
    """Whether the config's runs involve a tokenizer: a config without a generator, or one whose
    generator reads tokens or latents (not pixels)."""
    return "generator" not in config or generator_kind(config) != "pixels"


def build_discriminator(cfg: Any, image_size: int) -> nn.Module | None:
    """``config.tokenizer_train.disc`` -> a discriminator, or None when ``type == 'none'``."""
    kind = cfg.type
    dtype = dtype_from_name(cfg.get("dtype", "float32"))
    if kind == "none":
        return None
    if kind == "patchgan":
        return adversarial.PatchGANDiscriminator(ch=cfg.ch, n_layers=cfg.n_layers, norm=cfg.norm, dtype=dtype)
    if kind == "stylegan":
        return adversarial.StyleGANDiscriminator(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), image_size=image_size, dtype=dtype)
    raise ValueError(f"unknown discriminator type {kind!r}; choose 'patchgan', 'stylegan' or 'none'.")
