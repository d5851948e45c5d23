"""The golden fixtures' tiny models as the files their official code releases.

``tests/fixtures/<family>/*.npz`` (made by ``tools/make_<family>_fixture.py``) store no weights: a
manifest lists every state-dict entry, drawn as ``standard_normal(shape) * scale + offset`` in
manifest order from ``numpy.random.RandomState(seed)`` and checked against a stored checksum.
:func:`states` rebuilds them; :func:`write_released_files` writes them in the format of each
family's released checkpoints, so the converters' command lines (and the
``notebooks/released_weights.ipynb`` notebook, in CI) read them as they read the real files:

- ``llamagen``: ``vq16.pt`` (``{"model": ...}``, VQ-16's layout at ch 32, 64 codes) and
  ``gpt.pt`` (``{"model", "ema"}`` training checkpoint of a 2-layer c2i GPT, 10 classes + the
  CFG null row, 4x4 tokens); convert with ``--image-size 64 --num-heads 4`` (a tiny width no
  released size has).
- ``var``: ``vae.pth`` (the multi-scale VQ-VAE) and ``var.pth`` (a depth-2 VAR), plain state dicts.
- ``maskgit``: ``tokenizer_imagenet64_checkpoint`` and ``maskgit_imagenet64_checkpoint``,
  ``flax.serialization`` msgpack bytes of ``{"params": ...}``.
- ``taming``: ``last.ckpt``, a Lightning checkpoint with the autoencoder under ``state_dict``;
  convert with ``--image-size 64``.

``torch`` is needed for the PyTorch families (the CPU wheel of the test extra).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FILES = {"llamagen": "llamagen/llamagen_tiny.npz", "var": "var/var_tiny.npz", "maskgit": "maskgit/maskgit_tiny.npz",
         "taming": "taming/taming_tiny.npz"}


def load(family: str) -> dict:
    """The fixture's arrays (official inputs and outputs) with its parsed ``manifest``."""
    if family not in FILES:
        raise ValueError(f"no golden fixture for {family!r}; choose one of {sorted(FILES)}.")
    with np.load(FIXTURES / FILES[family]) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    return data


def _draw(rs: np.random.RandomState, entries, what: str) -> dict[str, np.ndarray]:
    out = {}
    for key, shape, scale, offset, checksum in entries:
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        if not np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9):
            raise AssertionError(f"{what}: {key} does not match the fixture's checksum; the manifest was drawn "
                                 "differently, remake the fixture with its tools/ script.")
        out[key] = w
    return out


def states(fx: dict) -> dict[str, dict[str, np.ndarray]]:
    """Every model's official state dict (NumPy), rebuilt from the manifest; keys as the official
    files name them (MaskGIT's as ``/``-joined parameter paths). A single-model fixture (taming)
    gives ``{"model": state}``."""
    manifest = fx["manifest"]
    rs = np.random.RandomState(manifest["seed"])
    if "models" not in manifest:
        return {"model": _draw(rs, manifest["params"], "model")}
    out = {}
    for name, entry in manifest["models"].items():
        params, buffers = (entry["params"], entry["buffers"]) if isinstance(entry, dict) else (entry, ())
        state = _draw(rs, params, name)
        for key in buffers:
            state[key] = fx[f"buffer/{name}/{key}"]
        out[name] = state
    return out


def _tensors(state: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def write_released_files(family: str, out_dir: str | Path) -> dict[str, Path]:
    """Writes the fixture's models of ``family`` into ``out_dir`` as their official code saves them
    and returns their paths by role (``vq``/``gpt``, ``vae``/``var``, ``tokenizer``/``transformer``,
    ``ckpt``); see the module docstring for the formats and the flags the tiny sizes need."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = states(load(family))
    if family == "maskgit":
        from flax import serialization, traverse_util

        paths = {"tokenizer": out / "tokenizer_imagenet64_checkpoint",
                 "transformer": out / "maskgit_imagenet64_checkpoint"}
        for role, name in (("tokenizer", "tok"), ("transformer", "transformer")):
            tree = traverse_util.unflatten_dict(models[name], sep="/")
            paths[role].write_bytes(serialization.msgpack_serialize({"params": tree}))
        return paths
    import torch

    if family == "llamagen":
        paths = {"vq": out / "vq16.pt", "gpt": out / "gpt.pt"}
        torch.save({"model": _tensors(models["vq16"]), "steps": 10}, paths["vq"])
        gpt = models["gpt"]
        torch.save({"model": _tensors(gpt), "ema": _tensors(gpt), "steps": 10}, paths["gpt"])
    elif family == "var":
        paths = {"vae": out / "vae.pth", "var": out / "var.pth"}
        torch.save(_tensors(models["vae"]), paths["vae"])
        torch.save(_tensors(models["var"]), paths["var"])
    else:  # taming
        paths = {"ckpt": out / "last.ckpt"}
        torch.save({"epoch": 0, "global_step": 10, "state_dict": _tensors(models["model"])}, paths["ckpt"])
    return paths
