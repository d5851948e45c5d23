"""From config sections to modules: a dict from name to constructor, nothing more.

Modules receive explicit fields; only this file reads ConfigDicts.
"""
from __future__ import annotations

import importlib
from typing import Any

import flax.linen as nn

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


def _to_plain(cfg: Any) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}.")
    module, cls = table[name]
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
    dtype = dtype_from_name(kw.pop("dtype", "float32"))
    quantizer = build_quantizer(kw.pop("quantizer"), dtype)
    if arch == "vqgan":
        from vqgen.tokenizers.vqgan import VQGAN
        return VQGAN(in_channels=channels, out_channels=channels, quantizer=quantizer, dtype=dtype, **kw)
    if arch == "magvit":
        from vqgen.tokenizers.magvit import MAGVIT
        return MAGVIT(in_channels=channels, out_channels=channels, quantizer=quantizer, dtype=dtype, **kw)
    raise ValueError(f"unknown tokenizer arch {arch!r}; choose 'vqgan' or 'magvit'.")


def build_discriminator(cfg: Any, image_size: int) -> nn.Module | None:
    """``config.tokenizer_train.disc`` -> a discriminator, or None when ``type == 'none'``."""
    from vqgen.losses import adversarial

    kind = cfg.type
    dtype = dtype_from_name(cfg.get("dtype", "float32"))
    if kind == "none":
        return None
    if kind == "patchgan":
        return adversarial.PatchGANDiscriminator(ch=cfg.ch, n_layers=cfg.n_layers, norm=cfg.norm, dtype=dtype)
    if kind == "stylegan":
        return adversarial.StyleGANDiscriminator(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), image_size=image_size, dtype=dtype)
    raise ValueError(f"unknown discriminator type {kind!r}; choose 'patchgan', 'stylegan' or 'none'.")
