"""Key manifests and parameter trees of the taming-style conv blocks that the VQGAN converters share.

taming-transformers' ``ResnetBlock`` (``norm1``, ``conv1``, ``norm2``, ``conv2`` and a 1x1
``nin_shortcut`` when the width changes) and ``AttnBlock`` (``norm`` and the 1x1 convs ``q``,
``k``, ``v``, ``proj_out``) are reused as they are by LlamaGen's VQ and others. The ``*_keys``
functions add a block's PyTorch state-dict keys and shapes to a manifest; the ``*_params``
functions read a block out of a state dict as the params of :mod:`vqgen.modules.conv`'s blocks
(convs ``OIHW -> HWIO``, GroupNorm ``weight -> scale``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from vqgen.convert.workdir import oihw_to_hwio

Manifest = dict[str, tuple[int, ...]]
ATTN_CONVS = ("q", "k", "v", "proj_out")


def conv_keys(out: Manifest, key: str, cout: int, cin: int, k: int) -> None:
    out[f"{key}.weight"] = (cout, cin, k, k)
    out[f"{key}.bias"] = (cout,)


def norm_keys(out: Manifest, key: str, c: int) -> None:
    out[f"{key}.weight"] = (c,)
    out[f"{key}.bias"] = (c,)


def resnet_keys(out: Manifest, key: str, cin: int, cout: int) -> None:
    norm_keys(out, f"{key}.norm1", cin)
    conv_keys(out, f"{key}.conv1", cout, cin, 3)
    norm_keys(out, f"{key}.norm2", cout)
    conv_keys(out, f"{key}.conv2", cout, cout, 3)
    if cin != cout:
        conv_keys(out, f"{key}.nin_shortcut", cout, cin, 1)


def attn_keys(out: Manifest, key: str, c: int) -> None:
    norm_keys(out, f"{key}.norm", c)
    for part in ATTN_CONVS:
        conv_keys(out, f"{key}.{part}", c, c, 1)


def count_indices(state: Mapping, pattern: str) -> int:
    """Number of distinct integers ``{n}`` in keys matching ``pattern`` (a regex with one group)."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def conv_params(state: Mapping[str, np.ndarray], key: str) -> dict:
    return {"kernel": oihw_to_hwio(state[f"{key}.weight"]), "bias": state[f"{key}.bias"]}


def norm_params(state: Mapping[str, np.ndarray], key: str) -> dict:
    return {"scale": state[f"{key}.weight"], "bias": state[f"{key}.bias"]}


def resnet_params(state: Mapping[str, np.ndarray], key: str) -> dict:
    out = {"norm1": norm_params(state, f"{key}.norm1"), "conv1": conv_params(state, f"{key}.conv1"),
           "norm2": norm_params(state, f"{key}.norm2"), "conv2": conv_params(state, f"{key}.conv2")}
    if f"{key}.nin_shortcut.weight" in state:
        out["nin_shortcut"] = conv_params(state, f"{key}.nin_shortcut")
    return out


def attn_params(state: Mapping[str, np.ndarray], key: str) -> dict:
    return {"norm": norm_params(state, f"{key}.norm"), **{p: conv_params(state, f"{key}.{p}") for p in ATTN_CONVS}}
