"""Build the LPIPS-VGG16 weights file for :mod:`vqgen.losses.perceptual`.

Usage::

    python -m vqgen.convert.lpips --vgg16 vgg16-397923af.pth --out lpips_vgg.npz [--heads PATH]

``--vgg16`` is a torchvision ``vgg16`` state-dict file (the ImageNet weights torchvision
downloads as ``vgg16-397923af.pth``; keys ``features.{0,2,5,...,28}.weight/.bias``, the
``classifier.*`` keys are ignored). The linear heads default to ``lpips/weights/v0.1/vgg.pth``
inside the installed ``lpips`` package (found without importing it, since ``lpips`` imports
torchvision). Both files are read with plain ``torch.load(weights_only=True)``; torch is imported
only here and torchvision is not needed.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vqgen.losses.perceptual import HEAD_NAMES, VGG16_STAGES, VGG16_WIDTHS, save_lpips_params, validate_params

# Index of each 3x3 conv inside torchvision's ``vgg16().features`` (ReLUs and pools between).
VGG16_FEATURE_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_NAMES = tuple(name for stage in VGG16_STAGES for name in stage)


def default_heads_path() -> str:
    """Path of ``weights/v0.1/vgg.pth`` inside the installed ``lpips`` package (not imported)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the lpips package is not installed, so its linear-head weights cannot be found; "
            "`pip install --no-deps lpips` or pass --heads PATH/TO/vgg.pth."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the lpips package has no {path!r}; reinstall lpips or pass --heads PATH/TO/vgg.pth.")
    return path


def _to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy()
        out[key] = np.asarray(value, np.float32)
    return out


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Accepts ``features.N.*`` (torchvision ``vgg16()``), ``module.features.N.*`` or ``N.*``."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("classifier."):
            continue
        key = key.removeprefix("features.")
        out[key] = value
    return out


def convert(vgg_state_dict: Mapping[str, Any], heads_state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision VGG16 + lpips heads state dicts (tensors or arrays) -> LPIPS params pytree.

    Conv weights go from PyTorch ``OIHW`` to Flax ``HWIO``; head weights ``[1, C, 1, 1]`` become
    ``[1, 1, C, 1]``. Raises ValueError naming the missing or misshapen key.
    """
    vgg = _strip_prefix(_to_numpy(vgg_state_dict))
    params: dict[str, Any] = {}
    for index, name in zip(VGG16_FEATURE_INDICES, VGG16_CONV_NAMES):
        w_key, b_key = f"{index}.weight", f"{index}.bias"
        if w_key not in vgg or b_key not in vgg:
            raise ValueError(
                f"the VGG16 state dict has no features.{w_key}/.bias; pass a torchvision vgg16 state dict "
                f"(keys features.0.weight ... features.28.bias), got keys like {sorted(vgg)[:4]}."
            )
        weight = vgg[w_key]  # [O, I, 3, 3]
        if weight.ndim != 4 or weight.shape[2:] != (3, 3):
            raise ValueError(
                f"features.{w_key} has shape {weight.shape}, not [out, in, 3, 3]; pass a torchvision vgg16 "
                "(not vgg16_bn or another network) state dict."
            )
        params[name] = {"kernel": np.transpose(weight, (2, 3, 1, 0)), "bias": vgg[b_key]}  # [3, 3, I, O]

    heads = _to_numpy(heads_state_dict)
    for name, width in zip(HEAD_NAMES, VGG16_WIDTHS):
        pattern = re.compile(rf"^(?:.*\.)?{name}\.model\.\d+\.weight$")
        matches = [k for k in heads if pattern.match(k)]
        if len(matches) != 1:
            raise ValueError(
                f"the LPIPS heads state dict has {len(matches)} entries for {name} (expected one "
                f"'{name}.model.N.weight'); pass lpips/weights/v0.1/vgg.pth."
            )
        weight = heads[matches[0]]  # [1, C, 1, 1]
        if weight.shape != (1, width, 1, 1):
            raise ValueError(
                f"{matches[0]} has shape {weight.shape}, not (1, {width}, 1, 1); pass the VGG heads "
                "(lpips/weights/v0.1/vgg.pth), not those of alex or squeeze."
            )
        params[name] = np.transpose(weight, (2, 3, 1, 0))  # [1, 1, C, 1]

    flat = {f"{k}/{s}": v for k, d in params.items() if isinstance(d, dict) for s, v in d.items()}
    flat.update({k: v for k, v in params.items() if not isinstance(v, dict)})
    validate_params(flat, "the converted state dicts")
    return params


def _torch_load(path: str) -> dict[str, Any]:
    import torch  # only the converter needs torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist; pass the path of a PyTorch state-dict file.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict; save model.state_dict().")
    return dict(state)


def main(argv: Sequence[str] | None = None) -> str:
    """Command-line entry point; returns the path written."""
    parser = argparse.ArgumentParser(
        prog="python -m vqgen.convert.lpips",
        description="Convert torchvision VGG16 + lpips linear heads into vqgen's LPIPS weights file.",
    )
    parser.add_argument("--vgg16", required=True, help="torchvision vgg16 state-dict file (.pth)")
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument("--heads", default=None, help="LPIPS head weights (default: lpips/weights/v0.1/vgg.pth)")
    args = parser.parse_args(argv)
    heads_path = args.heads or default_heads_path()
    params = convert(_torch_load(args.vgg16), _torch_load(heads_path))
    save_lpips_params(params, args.out)
    print(f"wrote LPIPS-VGG16 weights to {args.out} (trunk {args.vgg16}, heads {heads_path})")
    return args.out


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
