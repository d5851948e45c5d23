"""Convert the released fractal generative models (LTH14/fractalgen: FractalAR-64, FractalMAR-64,
FractalMAR-B/L/H-256) into a vqgen workdir.

    python -m vqgen.convert.fractal --ckpt fractalmar_in64/checkpoint-last.pth --out runs/fractalmar_64

The workdir holds ``config.json`` and a step-0 checkpoint of the generator phase
(:mod:`vqgen.convert.workdir`), so ``vqgen.load_generator(out)`` and ``--mode=sample`` use it as if
vqgen had trained it. The config is ``configs/generators/fractal.py`` of the variant whose sizes
the file has (with the README's sampling settings), every size read from the tensor shapes written
over it. FractalMAR needs no tokenizer: the workdir has none.

Sizes read from the state dict: the levels (nested ``next_fractal.``), each level's kind (``mask_token``:
MAR; ``blocks.0.attention.wqkv``: AR), width, blocks and patch size (``patch_emb`` is ``3 p² -> D``),
the guiding pixel (``pix_proj``), the number of conditions (a MAR level's position table is
``guiding pixel + conditions + patches``), the classes (``class_emb``) and so the image size. Heads
are not stored in a state dict: the released models' head counts are used when the widths and
depths are theirs, otherwise ``--num-heads`` gives them (one per level, the pixel head last).

Files: ``torch.load(map_location="cpu", weights_only=True)`` of the official training checkpoint
(``{"model": ...}``, which holds ``argparse.Namespace`` arguments beside it, accepted as inert) or of
a plain state dict, or a ``.safetensors`` file. Every key and shape is checked before anything is
written; a file of another kind is refused in one sentence.

Mapping (PyTorch -> vqgen; linears transposed to ``[in, out]``, LayerNorm ``weight`` -> ``scale``):

- ``class_emb.weight``, ``fake_latent [1, D]`` -> ``class_emb``, ``fake_latent [D]``.
- Level ``l`` (prefix ``next_fractal.`` ``l`` times, then ``generator.``) -> ``levels_{l}``: ``patch_emb``,
  ``cond_emb``, ``pix_proj``, ``patch_emb_ln``, ``norm`` keep their names; ``mask_token [1, 1, D]``
  and ``pos_embed_learned [1, S, D]`` drop the leading ones. MAR blocks ``blocks.{i}`` ->
  ``blocks_{i}`` with ``attn.qkv [3D, D]`` -> ``qkv [D, 3, H, hd]``, ``attn.proj`` -> ``proj [H,
  hd, D]``, ``mlp.fc1/fc2`` -> ``fc1/fc2``. AR blocks: ``attention.wqkv [3D, D]`` split into
  ``attention/wq|wk|wv [D, H, hd]``, ``attention.wo`` -> ``[H, hd, D]``, ``feed_forward.w1|w2|w3``,
  ``attention_norm``/``ffn_norm`` ``weight`` -> ``scale``. ``guiding_pixel_loss.*`` -> the level's
  ``guiding_pixel_loss`` pixel head.
- The pixel head (prefix ``next_fractal.`` once per level) -> ``pixel_loss``: ``cond_proj``, ``ln``,
  ``norm``, causal ``blocks.{i}`` as MAR blocks; ``r/g/b_codebook.weight [256, W]`` ->
  ``codebooks [3, 256, W]``; ``r/g/b_mlm.bias [1, 256]`` -> ``mlm_bias [3, 256]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vqgen.convert.workdir import ConversionError, load_state_dict, write_workdir

WRAPPERS = (("model",), ("model_ema",), ("state_dict",))
CHANNELS = ("r", "g", "b")
GUIDE = dict(width=128, depth=3, num_heads=4)  # the official guiding-pixel head


@dataclasses.dataclass(frozen=True)
class FractalInfo:
    """The sizes of a FractalGen state dict."""

    img_size_list: tuple[int, ...]
    embed_dim_list: tuple[int, ...]
    num_blocks_list: tuple[int, ...]
    num_heads_list: tuple[int, ...]
    generator_type_list: tuple[str, ...]
    num_classes: int
    num_conds: int
    guiding_pixel: bool

    def fields(self) -> dict[str, Any]:
        """The :class:`vqgen.generators.fractal.FractalMAR` fields of these sizes."""
        return dict(img_size_list=self.img_size_list, embed_dim_list=self.embed_dim_list,
                    num_blocks_list=self.num_blocks_list, num_heads_list=self.num_heads_list,
                    generator_type_list=self.generator_type_list, num_classes=self.num_classes,
                    num_conds=self.num_conds, guiding_pixel=self.guiding_pixel, channels=3)

    def variant(self) -> str | None:
        """The released model with these sizes, if any."""
        from vqgen.generators import fractal

        for name, v in fractal.VARIANTS.items():
            if all(tuple(v[k]) == tuple(getattr(self, k)) for k in
                   ("img_size_list", "embed_dim_list", "num_blocks_list", "num_heads_list")) \
                    and tuple(v["generator_type_list"][:-1]) == self.generator_type_list[:-1] \
                    and v["num_conds"] == self.num_conds and v["guiding_pixel"] == self.guiding_pixel:
                return name
        return None


def level_prefix(l: int) -> str:
    return "next_fractal." * l + "generator."


def _linear(out: dict, key: str, fan_out: int, fan_in: int, bias: bool = True) -> None:
    out[f"{key}.weight"] = (fan_out, fan_in)
    if bias:
        out[f"{key}.bias"] = (fan_out,)


def _norm(out: dict, key: str, d: int) -> None:
    out[f"{key}.weight"] = (d,)
    out[f"{key}.bias"] = (d,)


def _vit_block(out: dict, key: str, d: int) -> None:
    _norm(out, f"{key}.norm1", d)
    _norm(out, f"{key}.norm2", d)
    _linear(out, f"{key}.attn.qkv", 3 * d, d)
    _linear(out, f"{key}.attn.proj", d, d)
    _linear(out, f"{key}.mlp.fc1", 4 * d, d)
    _linear(out, f"{key}.mlp.fc2", d, 4 * d)


def _pixel_manifest(out: dict, prefix: str, cond_dim: int, width: int, depth: int) -> None:
    _linear(out, f"{prefix}cond_proj", width, cond_dim)
    for ch in CHANNELS:
        out[f"{prefix}{ch}_codebook.weight"] = (256, width)
        out[f"{prefix}{ch}_mlm.bias"] = (1, 256)
    _norm(out, f"{prefix}ln", width)
    _norm(out, f"{prefix}norm", width)
    for i in range(depth):
        _vit_block(out, f"{prefix}blocks.{i}", width)


def manifest(info: FractalInfo) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict of these sizes with its shape."""
    from vqgen.modules.layers import swiglu_hidden_dim

    sizes, dims, n = info.img_size_list, info.embed_dim_list, len(info.img_size_list) - 1
    out: dict[str, tuple[int, ...]] = {"class_emb.weight": (info.num_classes, dims[0]), "fake_latent": (1, dims[0])}
    for l in range(n):
        pre, d = level_prefix(l), dims[l]
        p, length = sizes[l + 1], (sizes[l] // sizes[l + 1]) ** 2
        cond_dim = dims[l - 1] if l else dims[0]
        _linear(out, f"{pre}patch_emb", d, 3 * p * p)
        _linear(out, f"{pre}cond_emb", d, cond_dim)
        _norm(out, f"{pre}patch_emb_ln", d)
        _norm(out, f"{pre}norm", d)
        if info.generator_type_list[l] == "mar":
            gp = bool(info.guiding_pixel and l > 0)
            out[f"{pre}mask_token"] = (1, 1, d)
            out[f"{pre}pos_embed_learned"] = (1, length + info.num_conds + int(gp), d)
            for i in range(info.num_blocks_list[l]):
                _vit_block(out, f"{pre}blocks.{i}", d)
            if gp:
                _linear(out, f"{pre}pix_proj", d, 3)
                _pixel_manifest(out, f"{pre}guiding_pixel_loss.", cond_dim, GUIDE["width"], GUIDE["depth"])
        else:
            hidden = swiglu_hidden_dim(d)
            out[f"{pre}pos_embed_learned"] = (1, length + 1, d)
            for i in range(info.num_blocks_list[l]):
                b = f"{pre}blocks.{i}"
                _linear(out, f"{b}.attention.wqkv", 3 * d, d, bias=False)
                _linear(out, f"{b}.attention.wo", d, d, bias=False)
                _linear(out, f"{b}.feed_forward.w1", hidden, d, bias=False)
                _linear(out, f"{b}.feed_forward.w3", hidden, d, bias=False)
                _linear(out, f"{b}.feed_forward.w2", d, hidden, bias=False)
                out[f"{b}.attention_norm.weight"] = (d,)
                out[f"{b}.ffn_norm.weight"] = (d,)
    _pixel_manifest(out, "next_fractal." * n, dims[n - 1], dims[n], info.num_blocks_list[n])
    return out


def _count(state: Mapping, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({int(m.group(1)) for k in state if (m := pattern.match(k))})


def inspect(state: Mapping[str, Any], name: str = "the FractalGen file", *,
            num_heads_list: Sequence[int] | None = None) -> FractalInfo:
    """The :class:`FractalInfo` of an official state dict; raises
    :class:`~vqgen.convert.workdir.ConversionError` (one sentence) when a key is missing, a shape
    differs from the model its sizes describe, or a key is not the model's."""
    from vqgen.generators import fractal

    for key in ("class_emb.weight", "fake_latent", "generator.patch_emb.weight"):
        if key not in state:
            raise ConversionError(f"{name} has no {key!r}, so it is not a FractalGen model; pass the official "
                                  "checkpoint-last.pth (its 'model' state dict).")
    n = 0
    while f"{level_prefix(n)}patch_emb.weight" in state:
        n += 1
    kinds, dims, blocks, patch = [], [], [], []
    for l in range(n):
        pre = level_prefix(l)
        kind = "mar" if f"{pre}mask_token" in state else "ar"
        kinds.append(kind)
        d, fan_in = (int(v) for v in np.shape(state[f"{pre}patch_emb.weight"]))
        p = math.isqrt(fan_in // 3)
        if 3 * p * p != fan_in:
            raise ConversionError(f"{name}: level {l}'s patch_emb reads {fan_in} values, not 3 p² of an RGB patch; "
                                  "the file is not an official FractalGen model.")
        dims.append(d)
        patch.append(p)
        blocks.append(_count(state, f"{pre}blocks."))
    pix = "next_fractal." * n
    if f"{pix}cond_proj.weight" not in state:
        raise ConversionError(f"{name} has no pixel head ({pix}cond_proj.weight) below its {n} levels; pass a "
                              "complete FractalGen checkpoint.")
    dims.append(int(np.shape(state[f"{pix}cond_proj.weight"])[0]))
    blocks.append(_count(state, f"{pix}blocks."))
    guiding = any(f"{level_prefix(l)}pix_proj.weight" in state for l in range(n))
    # Conditions: from a MAR level below the first (its patch count is known from the patch sizes).
    pos = lambda l: int(np.shape(state[f"{level_prefix(l)}pos_embed_learned"])[1])  # noqa: E731
    below = [l for l in range(1, n) if kinds[l] == "mar"]
    if below:
        l = below[0]
        num_conds = pos(l) - (patch[l - 1] // patch[l]) ** 2 - int(guiding)
    else:
        num_conds = 5 if kinds[0] == "mar" else 1  # the paper's FractalMAR / FractalAR
    length0 = pos(0) - (num_conds if kinds[0] == "mar" else 1)
    side0 = math.isqrt(max(length0, 0))
    if side0 < 1 or side0 * side0 != length0:
        raise ConversionError(f"{name}: level 0 has {length0} patch positions, not a square grid; the file is not an "
                              "official FractalGen model.")
    if patch[-1] != 1:
        raise ConversionError(f"{name}: the last level's patches are {patch[-1]}x{patch[-1]}, not single pixels; the "
                              "file is not an official FractalGen model.")
    img_size_list = (side0 * patch[0],) + tuple(patch)
    if num_heads_list is None:
        for v in fractal.VARIANTS.values():
            if tuple(v["embed_dim_list"]) == tuple(dims) and tuple(v["num_blocks_list"]) == tuple(blocks):
                num_heads_list = v["num_heads_list"]
                break
        else:
            raise ConversionError(f"{name} has widths {tuple(dims)} and blocks {tuple(blocks)}, which no released "
                                  "model has, and a state dict does not record heads; pass --num-heads (one per "
                                  "level, the pixel head last).")
    heads = tuple(int(h) for h in num_heads_list)
    if len(heads) != n + 1:
        raise ConversionError(f"--num-heads lists {len(heads)} counts for {n} levels and the pixel head; give "
                              f"{n + 1}.")
    info = FractalInfo(img_size_list=img_size_list, embed_dim_list=tuple(dims), num_blocks_list=tuple(blocks),
                       num_heads_list=heads, generator_type_list=tuple(kinds) + ("ar",),
                       num_classes=int(np.shape(state["class_emb.weight"])[0]), num_conds=int(num_conds),
                       guiding_pixel=guiding)
    want = manifest(info)
    for key, shape in want.items():
        if key not in state:
            raise ConversionError(f"{name} lacks {key!r} of the model its sizes describe; pass a complete "
                                  "FractalGen checkpoint.")
        if tuple(np.shape(state[key])) != shape:
            raise ConversionError(f"{name} has {key!r} of shape {tuple(np.shape(state[key]))} where this model needs "
                                  f"{shape}; the file is damaged or not a FractalGen checkpoint.")
    extra = sorted(k for k in state if k not in want and ".kv_cache." not in k)
    if extra:
        raise ConversionError(f"{name} has {len(extra)} key{'s' if len(extra) > 1 else ''} FractalGen does not have "
                              f"(first {extra[0]!r}); pass the official model state dict.")
    return info


def convert_state(state: Mapping[str, Any], info: FractalInfo | None = None, **kw: Any) -> dict:
    """An official state dict -> params of ``FractalMAR(**info.fields())`` (float32 NumPy,
    unboxed). ``kw`` (``num_heads_list=``) goes to :func:`inspect`."""
    info = inspect(state, **kw) if info is None else info
    get = lambda key: np.asarray(state[key], np.float32)  # noqa: E731

    def linear(key: str) -> dict:
        return {"kernel": np.ascontiguousarray(get(f"{key}.weight").T), "bias": get(f"{key}.bias")}

    def norm(key: str) -> dict:
        return {"scale": get(f"{key}.weight"), "bias": get(f"{key}.bias")}

    def vit_block(key: str, d: int, h: int) -> dict:
        hd = d // h
        return {
            "norm1": norm(f"{key}.norm1"), "norm2": norm(f"{key}.norm2"),
            "qkv": {"kernel": np.ascontiguousarray(get(f"{key}.attn.qkv.weight").T).reshape(d, 3, h, hd),
                    "bias": get(f"{key}.attn.qkv.bias").reshape(3, h, hd)},
            "proj": {"kernel": np.ascontiguousarray(get(f"{key}.attn.proj.weight").T).reshape(h, hd, d),
                     "bias": get(f"{key}.attn.proj.bias")},
            "fc1": linear(f"{key}.mlp.fc1"), "fc2": linear(f"{key}.mlp.fc2"),
        }

    def pixel_head(prefix: str, width: int, depth: int, heads: int) -> dict:
        out = {"cond_proj": linear(f"{prefix}cond_proj"), "ln": norm(f"{prefix}ln"), "norm": norm(f"{prefix}norm"),
               "codebooks": np.stack([get(f"{prefix}{c}_codebook.weight") for c in CHANNELS]),
               "mlm_bias": np.stack([get(f"{prefix}{c}_mlm.bias").reshape(-1) for c in CHANNELS])}
        for i in range(depth):
            out[f"blocks_{i}"] = vit_block(f"{prefix}blocks.{i}", width, heads)
        return out

    params: dict[str, Any] = {"class_emb": get("class_emb.weight"), "fake_latent": get("fake_latent").reshape(-1)}
    n = len(info.img_size_list) - 1
    for l in range(n):
        pre, d, h = level_prefix(l), info.embed_dim_list[l], info.num_heads_list[l]
        hd = d // h
        lv: dict[str, Any] = {"patch_emb": linear(f"{pre}patch_emb"), "cond_emb": linear(f"{pre}cond_emb"),
                              "patch_emb_ln": norm(f"{pre}patch_emb_ln"), "norm": norm(f"{pre}norm"),
                              "pos_embed_learned": get(f"{pre}pos_embed_learned")[0]}
        if info.generator_type_list[l] == "mar":
            lv["mask_token"] = get(f"{pre}mask_token").reshape(-1)
            for i in range(info.num_blocks_list[l]):
                lv[f"blocks_{i}"] = vit_block(f"{pre}blocks.{i}", d, h)
            if info.guiding_pixel and l > 0:
                lv["pix_proj"] = linear(f"{pre}pix_proj")
                lv["guiding_pixel_loss"] = pixel_head(f"{pre}guiding_pixel_loss.", GUIDE["width"], GUIDE["depth"],
                                                      GUIDE["num_heads"])
        else:
            for i in range(info.num_blocks_list[l]):
                b = f"{pre}blocks.{i}"
                q, k, v = np.split(get(f"{b}.attention.wqkv.weight"), 3)  # [D, D] each
                dense = lambda w: np.ascontiguousarray(w.T)  # noqa: E731
                lv[f"blocks_{i}"] = {
                    "attention": {"wq": {"kernel": dense(q).reshape(d, h, hd)},
                                  "wk": {"kernel": dense(k).reshape(d, h, hd)},
                                  "wv": {"kernel": dense(v).reshape(d, h, hd)},
                                  "wo": {"kernel": dense(get(f"{b}.attention.wo.weight")).reshape(h, hd, d)}},
                    "feed_forward": {w: {"kernel": dense(get(f"{b}.feed_forward.{w}.weight"))}
                                     for w in ("w1", "w2", "w3")},
                    "attention_norm": {"scale": get(f"{b}.attention_norm.weight")},
                    "ffn_norm": {"scale": get(f"{b}.ffn_norm.weight")},
                }
        params[f"levels_{l}"] = lv
    params["pixel_loss"] = pixel_head("next_fractal." * n, info.embed_dim_list[n], info.num_blocks_list[n],
                                      info.num_heads_list[n])
    return params


def make_config(info: FractalInfo, *, dtype: str | None = None):
    """``configs/generators/fractal.py`` of the released variant with these sizes (``MAR-64`` for
    others), the sizes written over it (locked)."""
    from vqgen import config_lib

    variant = info.variant()
    config = config_lib.load_config("generators/fractal", variant or "MAR-64")
    with config.unlocked():
        gen = config.generator
        gen.variant = None
        for key, value in info.fields().items():
            if key not in ("num_classes", "channels"):
                gen[key] = tuple(value) if isinstance(value, tuple) else value
        if dtype is not None:
            if dtype not in ("float32", "bfloat16"):
                raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
            gen.dtype = dtype
        config.data.image_size = int(info.img_size_list[0])
        config.data.num_classes = int(info.num_classes)
    config.lock()
    return config


def convert_files(ckpt: str, out: str, *, num_heads_list: Sequence[int] | None = None, dtype: str | None = None,
                  mesh=None) -> tuple[FractalInfo, Any]:
    """Reads ``ckpt``, converts it and writes the workdir ``out``; returns the sizes and the config."""
    import argparse as _argparse

    state = load_state_dict(ckpt, WRAPPERS, safe_globals=(_argparse.Namespace,))
    name = os.path.basename(ckpt) or "the FractalGen file"
    info = inspect(state, name, num_heads_list=num_heads_list)
    params = convert_state(state, info)
    config = make_config(info, dtype=dtype)
    write_workdir(config, out, generator_params=params, mesh=mesh)
    return info, config


def main(argv: Sequence[str] | None = None):
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m vqgen.convert.fractal",
                                     description="Convert an official FractalGen checkpoint into a vqgen workdir.")
    parser.add_argument("--ckpt", required=True, help="checkpoint-last.pth of a released model (or .safetensors)")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold checkpoints yet)")
    parser.add_argument("--num-heads", default=None,
                        help="heads per level and the pixel head, e.g. 16,8,4 (only for sizes no released model has)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the paper config's bfloat16)")
    args = parser.parse_args(argv)
    heads = tuple(int(h) for h in args.num_heads.split(",")) if args.num_heads else None
    info, config = convert_files(args.ckpt, args.out, num_heads_list=heads, dtype=args.dtype)
    print(f"wrote {args.out}: {info.variant() or 'FractalGen'} with levels {info.img_size_list}, "
          f"{'/'.join(info.generator_type_list[:-1])}, {info.num_classes} classes, {config.data.image_size}px images")
    return info, config


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
