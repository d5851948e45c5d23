"""Makes ``tests/fixtures/fractal/fractalmar_tiny.npz`` and ``fractalar_tiny.npz``: golden outputs of
the official fractal generative models (LTH14/fractalgen; tiny, random weights).

    git clone https://github.com/LTH14/fractalgen /tmp/fractalgen
    pip install --no-deps --target /tmp/timm timm==0.9.12   # for timm's Mlp/DropPath, which the models import
    python tools/make_fractal_fixture.py --repo /tmp/fractalgen --timm /tmp/timm

``fractalmar_tiny.npz``: the official ``FractalGen`` (``models/fractalgen.py`` with ``models/mar.py``
and ``models/pixelloss.py``) at 8x8 with levels (8, 4, 2, 1): three MAR levels (widths 16, 12, 8,
one block each, 2 heads) over a pixel head of width 8 (1 block, 2 heads), 5 conditions, the guiding
pixel at levels 1 and 2 (its heads are the official fixed width 128, 3 blocks, 4 heads), 5
classes, R weight 5, built on CPU in float32 in training mode with every dropout and the label drop
at 0. It holds:

- ``images [B, 3, 8, 8]`` (ImageNet-normalised values of integer intensities whose 2x2 blocks sum
  to multiples of 16, so no target, pixel or patch mean, sits at a rounding tie that the official
  rounding noise would decide) and ``labels [B]``;
- ``mask0 [B, 4]``, ``mask1 [M1, 4]``, ``mask2 [M2, 4]``: the masks each level's
  ``random_masking`` returned (replaced by these draws), ``M1``/``M2`` the masked patches that
  reached the level, in the official row order (example, then position);
- ``conds0 [5, B, 4, 16]``: level 0's ``predict`` outputs (middle, top, right, bottom, left) for the
  images' patches, ``mask0`` and the class embeddings; ``loss``: ``FractalGen.forward`` with those
  masks, and ``pixel_losses [3]``: the three ``PixelLoss.forward`` values it summed (guiding pixel
  of level 1, of level 2, the pixels);
- ``pix_cond [P, 8]``, ``pix_target [P, 3]`` and ``pix_logits [P, 3, 256]``: ``PixelLoss.predict``
  of the bottom head; ``sample_probs [3, P, 256]`` and ``sample_ids [P, 3]``: ``PixelLoss.sample``
  at temperature 1.1, guidance 3.0 and filter threshold 0.01 over conditional and unconditional
  conditions (``cfg_cond [2P, 8]``), with ``torch.multinomial`` replaced by a recorder that returns
  the most likely value (the probabilities it was given are the official guided distribution).

``fractalar_tiny.npz``: the official FractalAR (``models/ar.py`` levels) at 4x4 with levels
(4, 2, 1), widths 16 and 8 (1 block, 2 heads; head widths 8 and 4 for the 2D rotary embedding), a
pixel head of width 8, 1 condition, in training mode with the AR levels' dropout modules set to 0:
``images``, ``labels``, ``conds0 [B, 4, 16]`` (level 0's ``predict``), ``loss`` and ``pixel_loss``.

The weights are not stored: the ``.npz`` holds a manifest of every state-dict entry, and each
parameter is ``standard_normal(shape) * scale + offset`` drawn in manifest order from
``numpy.random.RandomState(seed)``. The test (``tests/test_fractal.py``) rebuilds the state dict,
checks each tensor's checksum and converts it with :mod:`vqgen.convert.fractal`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "tests", "fixtures", "fractal")
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)

MAR_CONFIG = dict(img_size_list=(8, 4, 2, 1), embed_dim_list=(16, 12, 8, 8), num_blocks_list=(1, 1, 1, 1),
                  num_heads_list=(2, 2, 2, 2), generator_type_list=("mar", "mar", "mar", "ar"), class_num=5,
                  guiding_pixel=True, num_conds=5, r_weight=5.0, batch=3, labels=(1, 4, 0), seed=0,
                  sample_temperature=1.1, sample_cfg=3.0, sample_filter=0.01)
AR_CONFIG = dict(img_size_list=(4, 2, 1), embed_dim_list=(16, 8, 8), num_blocks_list=(1, 1, 1),
                 num_heads_list=(2, 2, 2), generator_type_list=("ar", "ar", "ar"), class_num=5, guiding_pixel=False,
                 num_conds=1, r_weight=5.0, batch=2, labels=(3, 1), seed=1)


def _stub_modules() -> None:
    """What the official models import but do not use here: torchvision (timm imports it for its
    data transforms) and the repository's ``util.visualize`` (matplotlib)."""
    import torch

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from make_mar_fixture import _stub_torchvision  # noqa: E402

    _stub_torchvision()
    for name, module in list(sys.modules.items()):
        if name.startswith("torchvision"):
            module.__file__ = "<stub>"  # torch's meta/refs code inspects module files
    util, vis = types.ModuleType("util"), types.ModuleType("util.visualize")
    util.__path__ = []
    vis.visualize_patch = lambda *a, **k: None
    sys.modules["util"], sys.modules["util.visualize"] = util, vis
    torch.Tensor.cuda = lambda self, *a, **k: self  # the official code moves tensors with .cuda()


def _draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a parameter: every one of order one in its role."""
    if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln.weight", "patch_emb_ln.weight")):
        return 0.2, 1.0
    if key.endswith(".bias"):
        return 0.1, 0.0
    if len(shape) != 2 or "codebook" in key or key == "class_emb.weight":  # tables and position embeddings
        return 0.5, 0.0
    return 1.0 / math.sqrt(shape[1]), 0.0


def _randomize(module, seed: int):
    """Draws every parameter of ``module`` (manifest order) and returns the manifest."""
    import torch

    rs = np.random.RandomState(seed)
    manifest, state = [], {}
    for key, tensor in module.state_dict().items():
        shape = tuple(tensor.shape)
        scale, offset = _draw(key, shape)
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        manifest.append([key, list(shape), scale, offset, float(np.sum(w, dtype=np.float64))])
        state[key] = torch.from_numpy(w)
    module.load_state_dict(state)
    return manifest


def _images(rs: np.random.RandomState, b: int, size: int) -> np.ndarray:
    """ImageNet-normalised images of integer intensities whose 2x2 blocks (per channel) sum to a
    multiple of 16, so every patch mean a guiding pixel reads is an integer intensity: no target
    then sits at a rounding tie, where the official noise (not reproducible) would decide it."""
    ints = rs.randint(0, 240, size=(b, 3, size, size))
    blocks = ints.reshape(b, 3, size // 2, 2, size // 2, 2)
    rest = blocks.sum(axis=(3, 5)) - blocks[:, :, :, 1, :, 1]
    blocks[:, :, :, 1, :, 1] = (-rest) % 16 + 16 * rs.randint(0, 15, size=rest.shape)
    ints = blocks.reshape(b, 3, size, size).astype(np.float32)
    assert ints.max() <= 255 and not (ints.reshape(b, 3, size // 2, 2, size // 2, 2).sum(axis=(3, 5)) % 16).any()
    return ((ints / 255.0 - MEAN[None, :, None, None]) / STD[None, :, None, None]).astype(np.float32)


def _build(fractalgen, cfg: dict):
    """The official model without dropout: the MAR levels take their rates as arguments; the AR
    levels' fixed residual and feed-forward dropout (0.1, ModelArgs) is set to 0 on the modules."""
    import torch

    keys = ("img_size_list", "embed_dim_list", "num_blocks_list", "num_heads_list", "generator_type_list",
            "class_num", "guiding_pixel", "num_conds", "r_weight")
    model = fractalgen.FractalGen(label_drop_prob=0.0, attn_dropout=0.0, proj_dropout=0.0,
                                  **{k: cfg[k] for k in keys})
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _generators(model) -> list:
    out, node = [], model
    while hasattr(node, "generator"):
        out.append(node.generator)
        node = node.next_fractal
    return out, node  # the generators by level and the bottom PixelLoss


def _record_pixel_losses(pixel_modules: list) -> list:
    """Wraps each PixelLoss.forward to record what it returns (in call order)."""
    seen: list = []
    for m in pixel_modules:
        forward = m.forward

        def wrapped(*a, _f=forward, **k):
            out = _f(*a, **k)
            seen.append(float(out))
            return out

        m.forward = wrapped
    return seen


def make_mar(fractalgen, out: str) -> None:
    import torch

    cfg = MAR_CONFIG
    torch.manual_seed(cfg["seed"])
    model = _build(fractalgen, cfg)
    manifest = _randomize(model, cfg["seed"])
    model.train()  # the training loss; every dropout and the label drop are 0
    gens, pixel = _generators(model)
    rs = np.random.RandomState(cfg["seed"] + 1)
    b = cfg["batch"]
    images = _images(rs, b, cfg["img_size_list"][0])
    labels = np.asarray(cfg["labels"], np.int64)
    masks: list[np.ndarray] = []

    for gen in gens:
        def masking(x, orders, _gen=gen):
            n, length = x.shape[0], x.shape[1]
            m = np.zeros((n, length), np.float32)
            for row in range(n):  # a random order and count per row, at least one masked
                k = rs.randint(1, length + 1)
                m[row, rs.permutation(length)[:k]] = 1.0
            masks.append(m)
            return torch.from_numpy(m)

        gen.random_masking = masking

    with torch.no_grad():
        cls = model.class_emb(torch.from_numpy(labels))
        patches = gens[0].patchify(torch.from_numpy(images))
        m0 = rs.randint(0, 2, size=patches.shape[:2]).astype(np.float32)
        m0[:, 0] = 1.0
        conds0 = gens[0].predict(patches, torch.from_numpy(m0), [cls] * 5)
        conds0 = np.stack([c.numpy() for c in conds0])

        heads = [g.guiding_pixel_loss for g in gens if getattr(g, "guiding_pixel", False)] + [pixel]
        seen = _record_pixel_losses(heads)
        loss = float(model(torch.from_numpy(images), torch.from_numpy(labels)))

        # The bottom head alone: logits for given targets and conditions, and its guided sampler.
        p = 7
        pix_cond = rs.standard_normal((p, cfg["embed_dim_list"][-2])).astype(np.float32)
        ints = rs.randint(0, 256, size=(p, 3)).astype(np.float32)
        pix_target = ((ints / 255.0 - MEAN) / STD).astype(np.float32)
        logits, target = pixel.predict(torch.from_numpy(pix_target), [torch.from_numpy(pix_cond)])
        cfg_cond = rs.standard_normal((2 * p, cfg["embed_dim_list"][-2])).astype(np.float32)
        probs: list[np.ndarray] = []

        def recorder(prob, num_samples=1, **_):
            probs.append(prob.numpy().copy())
            return torch.argmax(prob, dim=-1, keepdim=True)

        real = torch.multinomial
        torch.multinomial = recorder
        try:
            values = pixel.sample([torch.from_numpy(cfg_cond)], cfg["sample_temperature"], cfg["sample_cfg"],
                                  cfg["sample_filter"])
        finally:
            torch.multinomial = real
        ids = np.rint((values.numpy() * STD + MEAN) * 255).astype(np.int32)

    assert np.array_equal(target.numpy(), ints.astype(np.int64)), "targets must round to the drawn intensities"
    np.savez_compressed(
        out, manifest=json.dumps({"config": cfg, "params": manifest}), images=images, labels=labels.astype(np.int32),
        mask0=masks[0], mask1=masks[1], mask2=masks[2], conds0_mask=m0, conds0=conds0, loss=np.float32(loss),
        pixel_losses=np.asarray(seen, np.float32), pix_cond=pix_cond, pix_target=pix_target,
        pix_logits=logits.numpy(), cfg_cond=cfg_cond, sample_probs=np.stack(probs), sample_ids=ids)
    print(f"wrote {out} ({os.path.getsize(out)} bytes): {sum(int(np.prod(e[1])) for e in manifest)} parameters, "
          f"loss {loss:.6f}, pixel losses {seen}, masked rows {[m.shape[0] for m in masks]}")


def make_ar(fractalgen, out: str) -> None:
    import torch

    cfg = AR_CONFIG
    torch.manual_seed(cfg["seed"])
    model = _build(fractalgen, cfg)
    manifest = _randomize(model, cfg["seed"])
    model.train()
    gens, pixel = _generators(model)
    rs = np.random.RandomState(cfg["seed"] + 1)
    images = _images(rs, cfg["batch"], cfg["img_size_list"][0])
    labels = np.asarray(cfg["labels"], np.int64)
    with torch.no_grad():
        cls = model.class_emb(torch.from_numpy(labels))
        conds0 = gens[0].predict(gens[0].patchify(torch.from_numpy(images)), [cls])[0].numpy()
        seen = _record_pixel_losses([pixel])
        loss = float(model(torch.from_numpy(images), torch.from_numpy(labels)))
    np.savez_compressed(out, manifest=json.dumps({"config": cfg, "params": manifest}), images=images,
                        labels=labels.astype(np.int32), conds0=conds0, loss=np.float32(loss),
                        pixel_loss=np.float32(seen[0]))
    print(f"wrote {out} ({os.path.getsize(out)} bytes): {sum(int(np.prod(e[1])) for e in manifest)} parameters, "
          f"loss {loss:.6f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="an LTH14/fractalgen checkout")
    parser.add_argument("--timm", default="", help="a folder holding timm (pip install --target), if not installed")
    parser.add_argument("--out-dir", default=OUT_DIR)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.repo, "models", "fractalgen.py")):
        sys.exit(f"error: {args.repo} is not an LTH14/fractalgen checkout (no models/fractalgen.py); pass --repo.")
    if args.timm:
        sys.path.insert(0, os.path.abspath(args.timm))
    _stub_modules()
    sys.path.insert(0, os.path.abspath(args.repo))
    from models import fractalgen  # noqa: E402  (the official module)

    os.makedirs(args.out_dir, exist_ok=True)
    make_mar(fractalgen, os.path.join(args.out_dir, "fractalmar_tiny.npz"))
    make_ar(fractalgen, os.path.join(args.out_dir, "fractalar_tiny.npz"))


if __name__ == "__main__":
    main()
