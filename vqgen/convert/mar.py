"""Convert MAR's released PyTorch weights (LTH14/mar) into a vqgen workdir.

    python -m vqgen.convert.mar --vae kl16.ckpt --mar mar_base.pth --out runs/mar_b
    python -m vqgen.convert.mar --vae kl16.ckpt --out runs/kl16            # tokenizer only
    python -m vqgen.convert.mar --mar mar_large.pth --out runs/mar_l_gen    # generator only

The workdir holds ``config.json`` and step-0 checkpoints of the tokenizer and/or generator phases
(:mod:`vqgen.convert.workdir`), so ``vqgen.load_tokenizer(out)`` / ``vqgen.load_generator(out)``
and ``--mode=sample`` use it as if vqgen had trained it. The config is the paper config,
``configs/generators/mar.py:B|L|H`` (by the encoder width 768 / 1024 / 1280; ``B`` for other
widths) or ``configs/tokenizers/kl16.py`` for a VAE alone, with every size read from the tensor
shapes written over it. The MAR checkpoint's EMA weights (``model_ema``) are converted unless
``--no-ema`` asks for the raw ``model`` weights. ``--dtype float32`` sets both compute dtypes.

Files: ``torch.load(map_location="cpu", weights_only=True)`` (the pickled ``argparse.Namespace``
of MAR's training checkpoints is read as an inert placeholder, nothing it names is built) of a
plain state dict, MAR's ``{"model", "model_ema", ...}`` checkpoint or the VAE's ``{"model": ...}``,
or a ``.safetensors`` file. Every expected key and shape is checked before anything is written;
a file of another kind or size, or a VAE whose latent width is not the one the MAR reads, is
refused with one sentence. The VAE file's LDM training-loss entries (``loss.*``: LPIPS, the
discriminator, the output log-variance) are accepted and not converted.

KL-VAE (``models/vae.py``, LDM's ``AutoencoderKL`` -> :class:`vqgen.tokenizers.kl.KLVAE`): taming's
encoder/decoder keys mapped by :mod:`vqgen.convert.conv_blocks` as the VQGAN converters map them
(``encoder.down.{i}.block.{j}`` -> ``encoder/down_{i}_block_{j}``, ``.attn.{j}`` ->
``down_{i}_attn_{j}``, ``.downsample.conv`` -> ``down_{i}_downsample/conv``, ``decoder.up.{i}.*``
-> ``decoder/up_{i}_*``, ``mid.{block_1,attn_1,block_2}`` -> ``mid_block_1``, ``mid_attn_1``,
``mid_block_2``), ``quant_conv`` / ``post_quant_conv`` keep their names. The latent width is
``post_quant_conv``'s; which levels have attention is read per half from the keys.

This module maps MAR's transformer (``models/mar.py``) onto :class:`vqgen.generators.mar.MAR` and
its diffusion head (``DiffLoss.net``, ``SimpleMLPAdaLN``) onto
:class:`vqgen.generators.diffusion_loss.DiffusionHead`:

Transformer (PyTorch -> vqgen; linear weights ``[out, in]`` transposed to kernels ``[in, out]``,
LayerNorm ``weight`` -> ``scale``):

- ``class_emb.weight`` -> ``class_emb``; ``fake_latent [1, De]``, ``mask_token [1, 1, Dd]`` and the
  position tables ``[1, n, D]`` drop their leading ones.
- ``z_proj``, ``z_proj_ln``, ``encoder_norm``, ``decoder_embed``, ``decoder_norm`` keep their names.
- ``{encoder,decoder}_blocks.{i}`` -> ``{encoder,decoder}_blocks_{i}``: ``norm1``, ``norm2``,
  ``mlp.fc1`` / ``mlp.fc2`` -> ``fc1`` / ``fc2``; ``attn.qkv.weight [3D, D]`` -> ``qkv/kernel
  [D, 3, H, hd]`` and its bias -> ``[3, H, hd]``; ``attn.proj.weight [D, D]`` -> ``proj/kernel
  [H, hd, D]``.
- ``diffloss.net.*`` -> ``diffloss`` (below).

Sizes come from the shapes (token width, grid from ``diffusion_pos_embed_learned``, buffer,
widths, depths, MLP ratio, classes, the head) except the number of heads, which a state dict
does not hold: MAR's widths 768, 1024 and 1280 have 12, 16 and 16 heads; other widths need
``heads=``.

Diffusion head, with ``P`` its prefix in the state dict (``diffloss.net.`` in a MAR checkpoint):

- ``P time_embed.mlp.0`` / ``.mlp.2`` -> ``time_embed/mlp_0`` / ``mlp_2``
- ``P cond_embed``, ``P input_proj`` -> ``cond_embed``, ``input_proj``
- ``P res_blocks.{i}.in_ln.weight`` / ``.bias`` -> ``res_blocks_{i}/in_ln/scale`` / ``bias``;
  ``.mlp.0`` / ``.mlp.2`` -> ``mlp_0`` / ``mlp_2``; ``.adaLN_modulation.1`` -> ``adaLN_modulation``
- ``P final_layer.linear``, ``P final_layer.adaLN_modulation.1`` -> ``final_layer/linear``,
  ``final_layer/adaLN_modulation``

Head sizes are read from the shapes: the token width (``input_proj`` inputs), the head width,
the number of residual blocks and the condition width (``cond_embed`` inputs). Every expected
key and shape is checked before anything is converted; a state dict of another kind or size is
refused with one sentence saying what is missing or wrong.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, Mapping

import ml_collections
import numpy as np

from vqgen.convert.conv_blocks import (attn_keys, attn_params, conv_keys, conv_params, count_indices, norm_keys,
                                       norm_params, resnet_keys, resnet_params)
from vqgen.convert.workdir import (
    ConversionError,
    check_keys,
    load_state_dict,
    read_state_dict,
    set_fields,
    write_workdir,
)

from vqgen.generators import diffusion_loss as dl
from vqgen.generators import mar as mar_lib

HEAD_PREFIX = "diffloss.net."  # where a MAR checkpoint keeps the head


@dataclasses.dataclass(frozen=True)
class HeadInfo:
    """The sizes of a diffusion head read from its state dict."""

    in_channels: int  # the token width C (the head outputs 2C)
    width: int
    depth: int
    cond_dim: int
    frequency_dim: int = dl.FREQUENCY_DIM

    def module(self, **kw: Any) -> dl.DiffusionHead:
        """The :class:`~vqgen.generators.diffusion_loss.DiffusionHead` of these sizes."""
        return dl.DiffusionHead(self.in_channels, self.width, self.depth, self.frequency_dim, **kw)


def _linear(out: dict, key: str, fan_out: int, fan_in: int) -> None:
    out[f"{key}.weight"] = (fan_out, fan_in)
    out[f"{key}.bias"] = (fan_out,)


def head_manifest(info: HeadInfo, prefix: str = HEAD_PREFIX) -> dict[str, tuple[int, ...]]:
    """Every key of MAR's ``SimpleMLPAdaLN`` state dict with its shape."""
    c, w = info.in_channels, info.width
    out: dict[str, tuple[int, ...]] = {}
    _linear(out, f"{prefix}time_embed.mlp.0", w, info.frequency_dim)
    _linear(out, f"{prefix}time_embed.mlp.2", w, w)
    _linear(out, f"{prefix}cond_embed", w, info.cond_dim)
    _linear(out, f"{prefix}input_proj", w, c)
    for i in range(info.depth):
        b = f"{prefix}res_blocks.{i}"
        out[f"{b}.in_ln.weight"] = (w,)
        out[f"{b}.in_ln.bias"] = (w,)
        _linear(out, f"{b}.mlp.0", w, w)
        _linear(out, f"{b}.mlp.2", w, w)
        _linear(out, f"{b}.adaLN_modulation.1", 3 * w, w)
    _linear(out, f"{prefix}final_layer.linear", 2 * c, w)
    _linear(out, f"{prefix}final_layer.adaLN_modulation.1", 2 * w, w)
    return out


def inspect_head(state: Mapping[str, Any], prefix: str = HEAD_PREFIX, name: str = "the MAR file") -> HeadInfo:
    """The :class:`HeadInfo` of the head under ``prefix`` in ``state``; raises ``ValueError`` (one
    sentence) when a key is missing or a shape differs from the head its sizes describe."""
    proj, cond, emb = f"{prefix}input_proj.weight", f"{prefix}cond_embed.weight", f"{prefix}time_embed.mlp.0.weight"
    for key in (proj, cond, emb):
        if key not in state:
            raise ValueError(f"{name} has no {key!r}, so it holds no MAR diffusion head under {prefix!r}; pass a MAR "
                             "checkpoint (or the prefix its head is stored under).")
    width, in_channels = (int(s) for s in np.shape(state[proj]))
    pattern = re.compile(re.escape(prefix) + r"res_blocks\.(\d+)\.")
    blocks = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    info = HeadInfo(in_channels=in_channels, width=width, depth=len(blocks), cond_dim=int(np.shape(state[cond])[1]),
                    frequency_dim=int(np.shape(state[emb])[1]))
    want = head_manifest(info, prefix)
    for key, shape in want.items():
        if key not in state:
            raise ValueError(f"{name} lacks {key!r} of a {info.depth}-block head; pass a complete MAR checkpoint.")
        if tuple(np.shape(state[key])) != shape:
            raise ValueError(f"{name} has {key!r} of shape {tuple(np.shape(state[key]))} where a head of width "
                             f"{info.width} over {info.in_channels}-channel tokens needs {shape}; the file is "
                             "damaged or not a MAR head.")
    extra = sorted(k for k in state if k.startswith(prefix) and k not in want)
    if extra:
        raise ValueError(f"{name} has {len(extra)} head key{'s' if len(extra) > 1 else ''} MAR's head does not have "
                         f"(first {extra[0]!r}); pass a MAR checkpoint.")
    return info


def convert_head(state: Mapping[str, Any], info: HeadInfo | None = None, prefix: str = HEAD_PREFIX) -> dict:
    """MAR's head weights (NumPy or anything ``np.asarray`` reads) -> params of
    ``info.module()`` (float32 NumPy, unboxed)."""
    info = inspect_head(state, prefix) if info is None else info
    get = lambda key: np.asarray(state[prefix + key], np.float32)  # noqa: E731

    def linear(key: str) -> dict:
        return {"kernel": np.ascontiguousarray(get(f"{key}.weight").T), "bias": get(f"{key}.bias")}

    params: dict[str, Any] = {
        "time_embed": {"mlp_0": linear("time_embed.mlp.0"), "mlp_2": linear("time_embed.mlp.2")},
        "cond_embed": linear("cond_embed"),
        "input_proj": linear("input_proj"),
        "final_layer": {"linear": linear("final_layer.linear"),
                        "adaLN_modulation": linear("final_layer.adaLN_modulation.1")},
    }
    for i in range(info.depth):
        b = f"res_blocks.{i}"
        params[f"res_blocks_{i}"] = {
            "in_ln": {"scale": get(f"{b}.in_ln.weight"), "bias": get(f"{b}.in_ln.bias")},
            "mlp_0": linear(f"{b}.mlp.0"),
            "mlp_2": linear(f"{b}.mlp.2"),
            "adaLN_modulation": linear(f"{b}.adaLN_modulation.1"),
        }
    return params


# ------------------------------------------------------------------------------ transformer

# Heads of MAR's released widths (mar_base, mar_large, mar_huge): not stored in a state dict.
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16}


@dataclasses.dataclass(frozen=True)
class MARInfo:
    """The sizes of a MAR transformer (and its head) read from its state dict."""

    num_classes: int
    grid: tuple[int, int]
    token_dim: int
    buffer_size: int
    encoder_width: int
    encoder_depth: int
    encoder_heads: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    mlp_ratio: float
    head: HeadInfo

    def module(self, **kw: Any) -> mar_lib.MAR:
        """The :class:`~vqgen.generators.mar.MAR` of these sizes (other fields from ``kw``)."""
        return mar_lib.MAR(
            num_classes=self.num_classes, grid=self.grid, token_dim=self.token_dim, buffer_size=self.buffer_size,
            encoder_width=self.encoder_width, encoder_depth=self.encoder_depth, encoder_heads=self.encoder_heads,
            decoder_width=self.decoder_width, decoder_depth=self.decoder_depth, decoder_heads=self.decoder_heads,
            mlp_ratio=self.mlp_ratio, diffloss_depth=self.head.depth, diffloss_width=self.head.width, **kw)


def _block_keys(out: dict, key: str, d: int, hidden: int) -> None:
    for norm in ("norm1", "norm2"):
        out[f"{key}.{norm}.weight"] = (d,)
        out[f"{key}.{norm}.bias"] = (d,)
    _linear(out, f"{key}.attn.qkv", 3 * d, d)
    _linear(out, f"{key}.attn.proj", d, d)
    _linear(out, f"{key}.mlp.fc1", hidden, d)
    _linear(out, f"{key}.mlp.fc2", d, hidden)


def mar_manifest(info: MARInfo) -> dict[str, tuple[int, ...]]:
    """Every key of MAR's state dict (transformer and head) with its shape."""
    de, dd, length = info.encoder_width, info.decoder_width, info.grid[0] * info.grid[1]
    out: dict[str, tuple[int, ...]] = {
        "fake_latent": (1, de),
        "encoder_pos_embed_learned": (1, length + info.buffer_size, de),
        "mask_token": (1, 1, dd),
        "decoder_pos_embed_learned": (1, length + info.buffer_size, dd),
        "diffusion_pos_embed_learned": (1, length, dd),
        "class_emb.weight": (info.num_classes, de),
    }
    _linear(out, "z_proj", de, info.token_dim)
    for name, d in (("z_proj_ln", de), ("encoder_norm", de), ("decoder_norm", dd)):
        out[f"{name}.weight"] = (d,)
        out[f"{name}.bias"] = (d,)
    for i in range(info.encoder_depth):
        _block_keys(out, f"encoder_blocks.{i}", de, int(de * info.mlp_ratio))
    _linear(out, "decoder_embed", dd, de)
    for i in range(info.decoder_depth):
        _block_keys(out, f"decoder_blocks.{i}", dd, int(dd * info.mlp_ratio))
    out.update(head_manifest(info.head))
    return out


def _heads(width: int, given: int | None, part: str, name: str) -> int:
    if given is not None:
        return int(given)
    if width not in HEADS_BY_WIDTH:
        raise ValueError(f"{name}'s {part} has width {width}, which no released MAR has, and a state dict does not "
                         f"record heads; pass {part}_heads= (MAR uses {HEADS_BY_WIDTH}).")
    return HEADS_BY_WIDTH[width]


def inspect_mar(state: Mapping[str, Any], name: str = "the MAR file", *, encoder_heads: int | None = None,
                decoder_heads: int | None = None) -> MARInfo:
    """The :class:`MARInfo` of a MAR state dict; raises ``ValueError`` (one sentence) when a key is
    missing or a shape differs from the model its sizes describe."""
    for key in ("z_proj.weight", "diffusion_pos_embed_learned", "encoder_pos_embed_learned", "class_emb.weight",
                "decoder_embed.weight"):
        if key not in state:
            raise ValueError(f"{name} has no {key!r}, so it is not a MAR transformer; pass MAR's checkpoint (its "
                             "'model' or 'model_ema' state dict).")
    de, token_dim = (int(v) for v in np.shape(state["z_proj.weight"]))
    dd = int(np.shape(state["decoder_embed.weight"])[0])
    length = int(np.shape(state["diffusion_pos_embed_learned"])[1])
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"{name} has {length} token positions, not a square grid; MAR's grids are square.")
    count = lambda part: len({int(m.group(1)) for k in state if (m := re.match(part + r"\.(\d+)\.", k))})  # noqa: E731
    fc1 = "encoder_blocks.0.mlp.fc1.weight"
    if fc1 not in state:
        raise ValueError(f"{name} has no {fc1!r}; pass a complete MAR checkpoint.")
    info = MARInfo(
        num_classes=int(np.shape(state["class_emb.weight"])[0]), grid=(side, side), token_dim=token_dim,
        buffer_size=int(np.shape(state["encoder_pos_embed_learned"])[1]) - length,
        encoder_width=de, encoder_depth=count("encoder_blocks"), encoder_heads=_heads(de, encoder_heads, "encoder", name),
        decoder_width=dd, decoder_depth=count("decoder_blocks"), decoder_heads=_heads(dd, decoder_heads, "decoder", name),
        mlp_ratio=int(np.shape(state[fc1])[0]) / de, head=inspect_head(state, HEAD_PREFIX, name))
    want = mar_manifest(info)
    for key, shape in want.items():
        if key not in state:
            raise ValueError(f"{name} lacks {key!r} of the MAR its sizes describe; pass a complete MAR checkpoint.")
        if tuple(np.shape(state[key])) != shape:
            raise ValueError(f"{name} has {key!r} of shape {tuple(np.shape(state[key]))} where this MAR needs {shape}; "
                             "the file is damaged or not a MAR checkpoint.")
    extra = sorted(k for k in state if k not in want)
    if extra:
        raise ValueError(f"{name} has {len(extra)} key{'s' if len(extra) > 1 else ''} MAR does not have (first "
                         f"{extra[0]!r}); pass MAR's model state dict.")
    return info


def convert_mar(state: Mapping[str, Any], info: MARInfo | None = None, **heads: Any) -> dict:
    """A MAR state dict -> params of ``info.module()`` (float32 NumPy, unboxed; the head under
    ``'diffloss'``). ``heads`` (``encoder_heads=``, ``decoder_heads=``) go to :func:`inspect_mar`."""
    info = inspect_mar(state, **heads) if info is None else info
    get = lambda key: np.asarray(state[key], np.float32)  # noqa: E731

    def linear(key: str) -> dict:
        return {"kernel": np.ascontiguousarray(get(f"{key}.weight").T), "bias": get(f"{key}.bias")}

    def norm(key: str) -> dict:
        return {"scale": get(f"{key}.weight"), "bias": get(f"{key}.bias")}

    def block(key: str, d: int, h: int) -> dict:
        hd = d // h
        return {
            "norm1": norm(f"{key}.norm1"), "norm2": norm(f"{key}.norm2"),
            "qkv": {"kernel": np.ascontiguousarray(get(f"{key}.attn.qkv.weight").T).reshape(d, 3, h, hd),
                    "bias": get(f"{key}.attn.qkv.bias").reshape(3, h, hd)},
            "proj": {"kernel": np.ascontiguousarray(get(f"{key}.attn.proj.weight").T).reshape(h, hd, d),
                     "bias": get(f"{key}.attn.proj.bias")},
            "fc1": linear(f"{key}.mlp.fc1"), "fc2": linear(f"{key}.mlp.fc2"),
        }

    params: dict[str, Any] = {
        "class_emb": get("class_emb.weight"),
        "fake_latent": get("fake_latent").reshape(-1),
        "mask_token": get("mask_token").reshape(-1),
        "encoder_pos_embed_learned": get("encoder_pos_embed_learned")[0],
        "decoder_pos_embed_learned": get("decoder_pos_embed_learned")[0],
        "diffusion_pos_embed_learned": get("diffusion_pos_embed_learned")[0],
        "z_proj": linear("z_proj"), "z_proj_ln": norm("z_proj_ln"), "encoder_norm": norm("encoder_norm"),
        "decoder_embed": linear("decoder_embed"), "decoder_norm": norm("decoder_norm"),
        "diffloss": convert_head(state, info.head),
    }
    for i in range(info.encoder_depth):
        params[f"encoder_blocks_{i}"] = block(f"encoder_blocks.{i}", info.encoder_width, info.encoder_heads)
    for i in range(info.decoder_depth):
        params[f"decoder_blocks_{i}"] = block(f"decoder_blocks.{i}", info.decoder_width, info.decoder_heads)
    return params


# ------------------------------------------------------------------------------------- VAE

VAE_IGNORED_PREFIX = "loss."  # LDM's training loss (LPIPS, discriminator, logvar) saved beside the VAE


@dataclasses.dataclass(frozen=True)
class VAEInfo:
    """The sizes of a KL-VAE read from its state dict."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    in_channels: int
    embed_dim: int
    encoder_attn_levels: tuple[int, ...]  # levels (0 = full resolution) with AttnBlocks
    decoder_attn_levels: tuple[int, ...]

    def attn_resolutions(self, resolution: int, levels: tuple[int, ...]) -> tuple[int, ...]:
        """The ``*_attn_resolutions`` that put attention at ``levels`` for images of ``resolution``."""
        return tuple(resolution // 2 ** i for i in levels)

    def module(self, resolution: int = 256, **kw: Any):
        """The :class:`~vqgen.tokenizers.kl.KLVAE` of these sizes."""
        from vqgen.tokenizers.kl import KLVAE

        return KLVAE(in_channels=self.in_channels, ch=self.ch, ch_mult=self.ch_mult,
                     num_res_blocks=self.num_res_blocks, embed_dim=self.embed_dim, resolution=resolution,
                     encoder_attn_resolutions=self.attn_resolutions(resolution, self.encoder_attn_levels),
                     decoder_attn_resolutions=self.attn_resolutions(resolution, self.decoder_attn_levels), **kw)


def vae_manifest(info: VAEInfo) -> dict[str, tuple[int, ...]]:
    """Every parameter key of LDM's ``AutoencoderKL`` with these sizes, and its shape."""
    out: dict[str, tuple[int, ...]] = {}
    ch, mult, nrb, e = info.ch, info.ch_mult, info.num_res_blocks, info.embed_dim
    last = len(mult) - 1
    conv_keys(out, "encoder.conv_in", ch, info.in_channels, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            resnet_keys(out, f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i in info.encoder_attn_levels:
                attn_keys(out, f"encoder.down.{i}.attn.{j}", cin)
        if i != last:
            conv_keys(out, f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    for part in ("encoder", "decoder"):
        top = ch * mult[-1]
        resnet_keys(out, f"{part}.mid.block_1", top, top)
        attn_keys(out, f"{part}.mid.attn_1", top)
        resnet_keys(out, f"{part}.mid.block_2", top, top)
    norm_keys(out, "encoder.norm_out", cin)
    conv_keys(out, "encoder.conv_out", 2 * e, cin, 3)
    conv_keys(out, "decoder.conv_in", cin, e, 3)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resnet_keys(out, f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i in info.decoder_attn_levels:
                attn_keys(out, f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv_keys(out, f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm_keys(out, "decoder.norm_out", cin)
    conv_keys(out, "decoder.conv_out", info.in_channels, cin, 3)
    conv_keys(out, "quant_conv", 2 * e, 2 * e, 1)
    conv_keys(out, "post_quant_conv", e, e, 1)
    return out


def _looks_like_mar(state: Mapping) -> bool:
    return "z_proj.weight" in state and "diffusion_pos_embed_learned" in state


def inspect_vae(state: Mapping[str, np.ndarray], name: str = "the VAE file") -> VAEInfo:
    """The sizes of a KL-VAE state dict; raises :class:`ConversionError` (one sentence) unless every
    expected key is there with its shape and nothing else (besides LDM's ``loss.*`` entries)."""
    if _looks_like_mar(state):
        raise ConversionError(f"{name} is a MAR transformer state dict, not the KL-VAE; pass it as --mar.")
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "post_quant_conv.weight", "quant_conv.weight",
            "encoder.down.0.block.0.conv1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"{name} is not a KL-VAE state dict: it lacks {', '.join(missing)} (it has "
                              f"{len(state)} keys such as {', '.join(sorted(state)[:3])}).")
    if "quantize.embedding.weight" in state:
        raise ConversionError(f"{name} is a VQ-VAE (it has a codebook, quantize.embedding.weight), not MAR's KL-VAE; "
                              "convert it with its own converter (e.g. python -m vqgen.convert.var).")
    ch, in_channels = (int(v) for v in state["encoder.conv_in.weight"].shape[:2])
    levels = count_indices(state, r"^encoder\.down\.(\d+)\.")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        ch_mult.append(max(int(state[key].shape[0]) // ch, 1) if key in state else 1)
    attn = lambda part, tag: tuple(sorted({int(m.group(1)) for k in state  # noqa: E731
                                           if (m := re.match(rf"^{part}\.{tag}\.(\d+)\.attn\.", k))}))
    info = VAEInfo(ch=ch, ch_mult=tuple(ch_mult),
                   num_res_blocks=count_indices(state, r"^encoder\.down\.0\.block\.(\d+)\."),
                   in_channels=in_channels, embed_dim=int(state["post_quant_conv.weight"].shape[0]),
                   encoder_attn_levels=attn("encoder", "down"), decoder_attn_levels=attn("decoder", "up"))
    ignore = [k for k in state if k.startswith(VAE_IGNORED_PREFIX)]
    check_keys(state, vae_manifest(info), name=name, kind="KL-VAE", ignore=ignore)
    return info


def convert_vae(state: Mapping[str, np.ndarray], info: VAEInfo) -> dict:
    """The KL-VAE's weights as the params of the :class:`~vqgen.tokenizers.kl.KLVAE` the config
    builds (nested dict of float32 arrays)."""
    conv = functools.partial(conv_params, state)
    norm = functools.partial(norm_params, state)
    resnet = functools.partial(resnet_params, state)
    attn = functools.partial(attn_params, state)

    def mid(part):
        return {"mid_block_1": resnet(f"{part}.mid.block_1"), "mid_attn_1": attn(f"{part}.mid.attn_1"),
                "mid_block_2": resnet(f"{part}.mid.block_2")}

    last = len(info.ch_mult) - 1
    enc = {"conv_in": conv("encoder.conv_in"), "norm_out": norm("encoder.norm_out"),
           "conv_out": conv("encoder.conv_out"), **mid("encoder")}
    dec = {"conv_in": conv("decoder.conv_in"), "norm_out": norm("decoder.norm_out"),
           "conv_out": conv("decoder.conv_out"), **mid("decoder")}
    for i in range(len(info.ch_mult)):
        for j in range(info.num_res_blocks):
            enc[f"down_{i}_block_{j}"] = resnet(f"encoder.down.{i}.block.{j}")
            if i in info.encoder_attn_levels:
                enc[f"down_{i}_attn_{j}"] = attn(f"encoder.down.{i}.attn.{j}")
        if i != last:
            enc[f"down_{i}_downsample"] = {"conv": conv(f"encoder.down.{i}.downsample.conv")}
        for j in range(info.num_res_blocks + 1):
            dec[f"up_{i}_block_{j}"] = resnet(f"decoder.up.{i}.block.{j}")
            if i in info.decoder_attn_levels:
                dec[f"up_{i}_attn_{j}"] = attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            dec[f"up_{i}_upsample"] = {"conv": conv(f"decoder.up.{i}.upsample.conv")}
    return {"encoder": enc, "decoder": dec, "quant_conv": conv("quant_conv"), "post_quant_conv": conv("post_quant_conv")}


# ------------------------------------------------------------------------------- workdir

MAR_WRAPPERS = {True: (("model_ema",), ("model",), ("state_dict",)), False: (("model",), ("state_dict",))}
VAE_WRAPPERS = (("model",), ("state_dict",))
PAPER_VARIANTS = {768: "B", 1024: "L", 1280: "H"}  # encoder width -> configs/generators/mar.py variant


def check_pair(vae: VAEInfo, mar: MARInfo, vae_name: str = "the VAE file", mar_name: str = "the MAR file") -> int:
    """The patch size at which ``mar`` reads ``vae``'s latents; raises :class:`ConversionError` when
    the MAR's token width is not the VAE's latent width times a square."""
    p = math.isqrt(mar.token_dim // vae.embed_dim) if mar.token_dim % vae.embed_dim == 0 else 0
    if p < 1 or vae.embed_dim * p * p != mar.token_dim:
        raise ConversionError(
            f"{vae_name} has {vae.embed_dim} latent channels but {mar_name} reads {mar.token_dim}-channel tokens, which "
            f"no patch of {vae.embed_dim}-channel latents makes; pass the VAE the MAR was trained with (KL-16 for "
            "MAR's releases).")
    return p


def make_config(vae: VAEInfo | None, mar: MARInfo | None, *, patch_size: int = 1,
                dtype: str | None = None) -> ml_collections.ConfigDict:
    """The paper config with the sizes of the converted files written over it (locked)."""
    from vqgen import config_lib  # the configs import the training stack

    if mar is not None:
        config = config_lib.load_config("generators/mar", PAPER_VARIANTS.get(mar.encoder_width, "B"))
    else:
        config = config_lib.load_config("tokenizers/kl16")
    tok = config.tokenizer
    ch_mult = tuple(vae.ch_mult) if vae is not None else tuple(tok.ch_mult)
    stride = 2 ** (len(ch_mult) - 1)
    image_size = mar.grid[0] * patch_size * stride if mar is not None else int(config.data.image_size)
    if vae is not None:
        set_fields(tok, ch=vae.ch, ch_mult=ch_mult, num_res_blocks=vae.num_res_blocks, embed_dim=vae.embed_dim,
             resolution=image_size,
             encoder_attn_resolutions=vae.attn_resolutions(image_size, vae.encoder_attn_levels),
             decoder_attn_resolutions=vae.attn_resolutions(image_size, vae.decoder_attn_levels))
    else:
        set_fields(tok, embed_dim=mar.token_dim // (patch_size * patch_size), resolution=image_size,
             encoder_attn_resolutions=(image_size // stride,))
    set_fields(config.data, image_size=image_size, channels=vae.in_channels if vae is not None else 3)
    if mar is not None:
        set_fields(config.data, num_classes=mar.num_classes)
        set_fields(config.generator, patch_size=patch_size, buffer_size=mar.buffer_size, encoder_width=mar.encoder_width,
             encoder_depth=mar.encoder_depth, encoder_heads=mar.encoder_heads, decoder_width=mar.decoder_width,
             decoder_depth=mar.decoder_depth, decoder_heads=mar.decoder_heads, mlp_ratio=mar.mlp_ratio,
             diffloss_depth=mar.head.depth, diffloss_width=mar.head.width)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(tok, dtype=dtype)
        if mar is not None:
            set_fields(config.generator, dtype=dtype)
    config.lock()
    return config


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config and the params of each model it was given."""

    config: ml_collections.ConfigDict
    vae: VAEInfo | None = None
    mar: MARInfo | None = None
    tokenizer_params: dict | None = None
    generator_params: dict | None = None


def convert(vae_state: Mapping[str, np.ndarray] | None = None, mar_state: Mapping[str, np.ndarray] | None = None, *,
            encoder_heads: int | None = None, decoder_heads: int | None = None, dtype: str | None = None,
            vae_name: str = "the VAE file", mar_name: str = "the MAR file") -> Converted:
    """Checks and converts MAR's state dicts (NumPy arrays) into vqgen params and a config; writes
    nothing. Either may be None. Raises ``ValueError`` (:class:`ConversionError` for the files) with one
    sentence."""
    if vae_state is None and mar_state is None:
        raise ConversionError("nothing to convert; pass --vae, --mar or both.")
    if vae_state is not None and mar_state is None and _looks_like_mar(vae_state):
        raise ConversionError(f"{vae_name} is a MAR transformer state dict, not the KL-VAE; pass it as --mar.")
    vae = inspect_vae(vae_state, vae_name) if vae_state is not None else None
    mar = None
    if mar_state is not None:
        if not _looks_like_mar(mar_state) and "encoder.conv_in.weight" in mar_state:
            raise ConversionError(f"{mar_name} is a VAE state dict, not a MAR transformer; pass it as --vae.")
        mar = inspect_mar(mar_state, mar_name, encoder_heads=encoder_heads, decoder_heads=decoder_heads)
    patch = check_pair(vae, mar, vae_name, mar_name) if vae is not None and mar is not None else 1
    return Converted(config=make_config(vae, mar, patch_size=patch, dtype=dtype), vae=vae, mar=mar,
                     tokenizer_params=convert_vae(vae_state, vae) if vae is not None else None,
                     generator_params=convert_mar(mar_state, mar) if mar is not None else None)


def convert_files(vae: str | None, mar: str | None, out: str, *, ema: bool = True, mesh=None,
                  **kwargs: Any) -> Converted:
    """Reads the files (MAR's EMA weights unless ``ema=False``), converts them (:func:`convert`,
    which takes ``kwargs``) and writes the workdir ``out`` (on ``mesh``, default the config's)."""
    vae_state = load_state_dict(vae, VAE_WRAPPERS, opaque_objects=True) if vae else None
    mar_state = None
    if mar:
        mar_state, where = read_state_dict(mar, MAR_WRAPPERS[bool(ema)], opaque_objects=True)
        if ema and where not in ("model_ema", ""):
            raise ConversionError(f"{mar} holds no EMA weights (no 'model_ema' state dict, only {where!r}); pass "
                                  "--no-ema to convert its raw weights.")
    converted = convert(vae_state, mar_state, vae_name=os.path.basename(vae or "") or "the VAE file",
                        mar_name=os.path.basename(mar or "") or "the MAR file", **kwargs)
    write_workdir(converted.config, out, tokenizer_params=converted.tokenizer_params,
                  generator_params=converted.generator_params, mesh=mesh)
    return converted


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m vqgen.convert.mar",
        description="Convert MAR's PyTorch KL-VAE and/or MAR transformer into a vqgen workdir.")
    parser.add_argument("--vae", help="KL-VAE weights, e.g. kl16.ckpt (.ckpt/.pth or .safetensors)")
    parser.add_argument("--mar", help="MAR weights, e.g. checkpoint-last.pth of mar_base (.pth or .safetensors)")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold checkpoints yet)")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="convert MAR's raw 'model' weights instead of its EMA ('model_ema')")
    parser.add_argument("--encoder-heads", type=int, default=None,
                        help="attention heads of the encoder, needed only for widths MAR did not release")
    parser.add_argument("--decoder-heads", type=int, default=None, help="likewise for the decoder")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of both models (default: the paper config's bfloat16)")
    args = parser.parse_args(argv)
    if not args.vae and not args.mar:
        parser.error("pass --vae, --mar or both")
    converted = convert_files(args.vae, args.mar, args.out, ema=args.ema, encoder_heads=args.encoder_heads,
                              decoder_heads=args.decoder_heads, dtype=args.dtype)
    parts = []
    if converted.vae is not None:
        v = converted.vae
        parts.append(f"tokenizer (KL-VAE ch={v.ch}, {v.embed_dim} latent channels)")
    if converted.mar is not None:
        m = converted.mar
        parts.append(f"generator (MAR encoder {m.encoder_depth}x{m.encoder_width}, decoder {m.decoder_depth}x"
                     f"{m.decoder_width}, head {m.head.depth}x{m.head.width}, {m.num_classes} classes"
                     f"{', EMA' if args.ema else ''})")
    print(f"wrote {args.out}: {' and '.join(parts)}, {converted.config.data.image_size}px images")
    return converted


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
