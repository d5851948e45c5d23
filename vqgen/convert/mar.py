"""Convert MAR's released PyTorch weights (LTH14/mar) into vqgen parameters.

This module maps MAR's transformer (``models/mar.py``) onto :class:`vqgen.generators.mar.MAR` and
its diffusion head (``DiffLoss.net``, ``SimpleMLPAdaLN``) onto
:class:`vqgen.generators.diffusion_loss.DiffusionHead`; the KL-16 VAE and the command line that
writes a workdir are to build on it.

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

import dataclasses
import math
import re
from typing import Any, Mapping


import numpy as np

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
