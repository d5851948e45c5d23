"""Converts the FID InceptionV3 PyTorch weights into vqgen's Flax parameter file.

    python -m vqgen.convert.inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

SRC is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (the same state dict); it is read with
``torch.load(weights_only=True)`` (torch is needed only here). DST is an ``.npz`` that
``vqgen.evaluation.inception.load_inception_params`` reads.

Key mapping (PyTorch -> Flax): ``<block>.conv.weight [O, I, kh, kw]`` ->
``<block>/conv/kernel [kh, kw, I, O]``; ``<block>.bn.{weight, bias, running_mean, running_var}``
-> ``<block>/bn/{scale, bias, mean, var}``; ``fc.weight [1008, 2048]`` -> ``fc_kernel
[2048, 1008]``; ``fc.bias`` -> ``fc_bias``. ``num_batches_tracked`` and torchvision's
``AuxLogits.*`` are dropped.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from vqgen.evaluation import inception

_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


def convert(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """PyTorch FID-Inception state dict (tensors or arrays) -> Flax params tree of NumPy arrays.

    Raises ``ValueError`` when the state dict is not the FID InceptionV3.
    """
    flat: dict[str, np.ndarray] = {}
    unknown = []
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked" or parts[0] == "AuxLogits":
            continue
        arr = _to_numpy(value)
        if key == "fc.weight":
            flat["fc_kernel"] = arr.T  # [2048, 1008]
        elif key == "fc.bias":
            flat["fc_bias"] = arr
        elif len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight":
            if arr.ndim != 4:
                unknown.append(key)
                continue
            flat["/".join(parts[:-1] + ["kernel"])] = arr.transpose(2, 3, 1, 0)  # [kh, kw, I, O]
        elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN:
            flat["/".join(parts[:-1] + [_BN[parts[-1]]])] = arr
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"the state dict has {len(unknown)} keys that the FID InceptionV3 lacks (e.g. {unknown[:3]}); "
            "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth."
        )
    inception.check_params(flat, source="the converted weights")
    return traverse_util.unflatten_dict(flat, sep="/")


def convert_file(src: str) -> dict[str, Any]:
    """Reads a ``.pth`` state dict with ``torch.load(weights_only=True)`` and converts it."""
    if not os.path.exists(src):
        raise FileNotFoundError(
            f"{src} not found; download pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            "(github.com/mseitzer/pytorch-fid releases) and pass its path."
        )
    try:
        import torch
    except ImportError:
        raise ImportError("reading a .pth file needs PyTorch; `pip install torch` (the CPU wheel is enough).") from None
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{src} holds a {type(state).__name__}, not a state dict; pass the .pth state dict file.")
    return convert(state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or torch-fidelity's .pth")
    parser.add_argument("dst", help="output .npz for vqgen.evaluation.inception.load_inception_params")
    args = parser.parse_args(argv)
    params = convert_file(args.src)
    inception.save_params(args.dst, params)
    n = sum(int(np.prod(v.shape)) for v in traverse_util.flatten_dict(params).values())
    print(f"wrote {args.dst}: {n:,} parameters of the FID InceptionV3")


if __name__ == "__main__":
    main()
