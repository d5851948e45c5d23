"""Convert MAR's released PyTorch weights (LTH14/mar) into vqgen parameters.

This module holds the mapping of MAR's diffusion head (``DiffLoss.net``, ``SimpleMLPAdaLN``) onto
:class:`vqgen.generators.diffusion_loss.DiffusionHead`; the transformer, the KL-16 VAE and the
command line that writes a workdir build on it.

Mapping (PyTorch -> vqgen; linear weights ``[out, in]`` transposed to kernels ``[in, out]``), with
``P`` the prefix of the head in the state dict (``diffloss.net.`` in a MAR checkpoint):

- ``P time_embed.mlp.0`` / ``.mlp.2`` -> ``time_embed/mlp_0`` / ``mlp_2``
- ``P cond_embed``, ``P input_proj`` -> ``cond_embed``, ``input_proj``
- ``P res_blocks.{i}.in_ln.weight`` / ``.bias`` -> ``res_blocks_{i}/in_ln/scale`` / ``bias``;
  ``.mlp.0`` / ``.mlp.2`` -> ``mlp_0`` / ``mlp_2``; ``.adaLN_modulation.1`` -> ``adaLN_modulation``
- ``P final_layer.linear``, ``P final_layer.adaLN_modulation.1`` -> ``final_layer/linear``,
  ``final_layer/adaLN_modulation``

Sizes are read from the shapes: the token width (``input_proj`` inputs), the head width, the
number of residual blocks and the condition width (``cond_embed`` inputs). Every expected key
and shape is checked before anything is converted; a state dict that does not hold a head is
refused with one sentence saying what is missing.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from vqgen.generators import diffusion_loss as dl

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
