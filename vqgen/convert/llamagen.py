"""Convert LlamaGen's released PyTorch weights (FoundationVision/LlamaGen) into a vqgen workdir.

    python -m vqgen.convert.llamagen --vq vq_ds16_c2i.pt --gpt c2i_B_256.pt --out runs/llamagen_B
    python -m vqgen.convert.llamagen --vq vq_ds16_c2i.pt --gpt c2i_XL_384.pt --out runs/llamagen_XL  # 384 px
    python -m vqgen.convert.llamagen --gpt c2i_L_256.pt --out runs/llamagen_L_gen      # generator only
    python -m vqgen.convert.llamagen --vq vq_ds8_c2i.pt --out runs/vq8                 # tokenizer only

The workdir holds ``config.json`` and step-0 checkpoints of the tokenizer and/or generator
phases (:mod:`vqgen.convert.workdir`), so ``vqgen.load_tokenizer(out)``,
``vqgen.load_generator(out)`` and ``--mode=sample`` use it as if vqgen had trained it, and
training on it fine-tunes the converted weights.

Config: ``configs/generators/llamagen.py:<size>`` for a GPT (the variant whose depth, width and
heads the file has; the variant of the nearest width for other sizes), or
``configs/tokenizers/llamagen_vq16.py`` for a VQ alone, or the config named by ``--config``;
every size read from the tensor shapes is written over it. A released GPT with VQ-16 at 256 px
gives the variant's config itself. Read from the shapes: the GPT's depth, width, kv heads
(``wqkv`` rows ``(heads + 2 kv_heads) * head_dim``), SwiGLU width (written as ``multiple_of`` /
``ffn_dim_multiplier`` when it is not LlamaGen's default), vocabulary and classes; the VQ's
``ch``, channel multipliers (VQ-16: 1,1,2,2,4; VQ-8: 1,2,2,4), res blocks, ``z_channels``,
codebook size and width, image channels.

Not in the files, so given or assumed: the attention heads (LlamaGen's for its widths 768 ... 4096,
else ``--num-heads``, or the head width of a stored ``freqs_cis`` table); the CFG null row (the
class table has ``num_classes + 1`` rows unless ``--num-classes`` says it has none, i.e. the model
was trained with ``class_dropout_prob=0``); the image size, which sets the token grid: ``--image-size``,
else the grid of a stored ``freqs_cis``, else a size at the end of the GPT file's name
(``c2i_XL_384.pt``: 384), else the config's 256. The VQ's lookup is l2-normalised as in every
LlamaGen release. ``--dtype float32`` sets the compute dtype of both models (the configs use
bfloat16).

Files: ``torch.load(map_location="cpu", weights_only=True)`` of a plain state dict, of a training
checkpoint (``{"model", "ema", "optimizer", "steps", "args"}``; the EMA weights when present
unless ``--weights model``; the ``argparse.Namespace`` of ``args`` is the one object allowed besides
tensors), of DeepSpeed's ``{"module"}``, of FSDP's consolidated full state dict (wrapper segments
and ``module.`` prefixes removed), or a ``.safetensors`` file. Every expected key and shape (the
manifests :func:`gpt_manifest` and :func:`vq_manifest`) is checked before anything is written;
a file of another family or size is refused with one sentence saying what it is. Accepted and not
converted: the VQ's ``quantize.codebook_used`` usage buffer, and a GPT's ``freqs_cis`` table
(checked against LlamaGen's 2D RoPE) or KV-cache buffers.

Mapping (PyTorch -> vqgen; convs ``OIHW -> HWIO``, linears transposed to ``[in, out]``):

GPT (``autoregressive/models/gpt.py`` ``Transformer``, c2i -> :class:`vqgen.generators.gpt.GPT`):

- ``cls_embedding.embedding_table.weight [C(+1), D]`` -> ``cls_embedding/embedding_table`` (row
  ``C`` is the CFG null class); ``tok_embeddings.weight`` -> ``tok_embeddings/embedding``.
- ``layers.{i}.attention.wqkv.weight [(H + 2 KV) hd, D]``: rows ``[0, D)`` -> ``layers_i/attention/wq``
  ``[D, H, hd]``, the next ``KV hd`` -> ``wk`` ``[D, KV, hd]``, the last ``KV hd`` -> ``wv``;
  ``attention.wo.weight [D, D]`` -> ``wo`` ``[H, hd, D]``.
- ``feed_forward.w1/w3/w2`` -> ``feed_forward/w1/w3/w2``; ``attention_norm``, ``ffn_norm`` and the
  final ``norm`` ``weight`` -> ``scale``; ``output.weight [V, D]`` -> ``output/kernel [D, V]``.

VQ (``tokenizer/tokenizer_image/vq_model.py`` ``VQModel`` -> :class:`vqgen.tokenizers.vqgan.VQGAN`,
``style="taming"``, 1x1 quant convs, l2-normalised ``VectorQuantizer``):

- ``encoder.conv_blocks.{i}.res.{j}`` -> ``encoder/down_{i}_block_{j}``, ``.attn.{j}`` ->
  ``down_{i}_attn_{j}``, ``.downsample.conv`` -> ``down_{i}_downsample/conv``.
- ``decoder.conv_blocks.{k}`` runs from the lowest resolution up: it is level ``L-1-k``, so
  ``.res.{j}`` -> ``decoder/up_{L-1-k}_block_{j}``, ``.attn.{j}`` -> ``up_{L-1-k}_attn_{j}``,
  ``.upsample.conv`` -> ``up_{L-1-k}_upsample/conv``.
- ``{encoder,decoder}.mid.0/1/2`` -> ``mid_block_1``, ``mid_attn_1``, ``mid_block_2``; GroupNorm
  ``weight`` -> ``scale``; ``AttnBlock.q/k/v/proj_out`` keep their names.
- ``quant_conv``, ``post_quant_conv`` keep their names; ``quantize.embedding.weight`` ->
  ``quantizer/codebook`` (stored as is; both sides normalise it on use).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from vqgen.convert.conv_blocks import (
    attn_keys,
    attn_params,
    conv_keys,
    conv_params,
    count_indices,
    norm_keys,
    norm_params,
    resnet_keys,
    resnet_params,
)
from vqgen.convert.workdir import ConversionError, check_keys, linear_kernel, read_state_dict, set_fields, write_workdir
from vqgen.generators import gpt as gpt_lib
from vqgen.modules.layers import swiglu_hidden_dim
from vqgen.modules.rope import rope_2d_table

# Where the weights sit in LlamaGen's files: training checkpoints (train_c2i.py, vq_train.py),
# DeepSpeed, Lightning-style; a file that is the state dict itself needs none.
EMA_WRAPPERS = (("ema",), ("model",), ("module",), ("state_dict",))
MODEL_WRAPPERS = (("model",), ("module",), ("state_dict",))
# LlamaGen's attention heads for the widths of its GPT_* sizes (the files do not store them).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2048: 32, 2560: 40, 3200: 32, 4096: 32}
ROPE_BASE = 10000.0
VQ_BUFFERS = ("quantize.codebook_used",)
IMAGE_SIZE_IN_NAME = re.compile(r"_(\d{3,4})\.(?:pt|pth|bin|ckpt|safetensors)$")


def _safe_globals() -> tuple[type, ...]:
    return (argparse.Namespace,)  # train_c2i.py / vq_train.py save their args beside the weights


@dataclasses.dataclass(frozen=True)
class VQInfo:
    """Sizes of a LlamaGen VQ state dict, read from its shapes."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    in_channels: int
    z_channels: int
    embed_dim: int
    codebook_size: int

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def name(self) -> str:
        return {(1, 1, 2, 2, 4): "VQ-16", (1, 2, 2, 4): "VQ-8"}.get(self.ch_mult, f"VQ-{self.downsample}")


@dataclasses.dataclass(frozen=True)
class GPTInfo:
    """Sizes of a LlamaGen c2i GPT state dict, read from its shapes (and the flags)."""

    depth: int
    width: int
    num_heads: int
    num_kv_heads: int
    hidden_dim: int
    vocab_size: int
    num_classes: int
    null_class: bool  # the class table has the CFG null row (class_dropout_prob > 0)
    grid: int | None  # side of the token grid, when the file stores freqs_cis

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def variant(self) -> str | None:
        """The name of LlamaGen's size with this depth, width and heads (``B`` ... ``3B``), if any."""
        for name, arch in gpt_lib.VARIANTS.items():
            if (arch["depth"], arch["width"], arch["num_heads"]) == (self.depth, self.width, self.num_heads):
                return name
        return None

    @property
    def name(self) -> str:
        return f"GPT-{self.variant}" if self.variant else f"GPT ({self.depth} layers, width {self.width})"


# ------------------------------------------------------------------------------ shared helpers


def _other_family(state: Mapping) -> str | None:
    """What a state dict that is neither a LlamaGen GPT nor a LlamaGen VQ is, when recognisable."""
    if "class_emb.weight" in state and any(k.startswith("blocks.0.") for k in state):
        return "a VAR transformer state dict; convert it with python -m vqgen.convert.var"
    if any(k.startswith("quantize.quant_resi") for k in state):
        return "a VAR VQ-VAE state dict; convert it with python -m vqgen.convert.var"
    if "encoder.down.0.block.0.conv1.weight" in state:
        return ("a taming-transformers-style VQGAN state dict (encoder.down.*), not LlamaGen's "
                "(encoder.conv_blocks.*); convert it with its own family's converter")
    if "cls_embedding.cap_proj.fc1.weight" in state:
        return ("a LlamaGen text-to-image GPT (its cls_embedding is a caption projection), which vqgen does not "
                "convert; pass a class-conditional (c2i) GPT")
    return None


def _is_gpt(state: Mapping) -> bool:
    return "tok_embeddings.weight" in state and any(k.startswith("layers.") for k in state)


def _is_vq(state: Mapping) -> bool:
    return "quantize.embedding.weight" in state and "encoder.conv_in.weight" in state


# ----------------------------------------------------------------------------------------- VQ


def vq_manifest(info: VQInfo) -> dict[str, tuple[int, ...]]:
    """Every parameter key of the official ``VQModel`` with these sizes, and its shape."""
    out: dict[str, tuple[int, ...]] = {}
    ch, mult, nrb = info.ch, info.ch_mult, info.num_res_blocks
    last = len(mult) - 1
    conv_keys(out, "encoder.conv_in", ch, info.in_channels, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            resnet_keys(out, f"encoder.conv_blocks.{i}.res.{j}", cin, ch * m)
            cin = ch * m
            if i == last:
                attn_keys(out, f"encoder.conv_blocks.{i}.attn.{j}", cin)
        if i != last:
            conv_keys(out, f"encoder.conv_blocks.{i}.downsample.conv", cin, cin, 3)
    for part in ("encoder", "decoder"):
        top = ch * mult[-1]
        resnet_keys(out, f"{part}.mid.0", top, top)
        attn_keys(out, f"{part}.mid.1", top)
        resnet_keys(out, f"{part}.mid.2", top, top)
    norm_keys(out, "encoder.norm_out", cin)
    conv_keys(out, "encoder.conv_out", info.z_channels, cin, 3)
    conv_keys(out, "decoder.conv_in", cin, info.z_channels, 3)
    for k, i in enumerate(reversed(range(len(mult)))):
        for j in range(nrb + 1):
            resnet_keys(out, f"decoder.conv_blocks.{k}.res.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i == last:
                attn_keys(out, f"decoder.conv_blocks.{k}.attn.{j}", cin)
        if i != 0:
            conv_keys(out, f"decoder.conv_blocks.{k}.upsample.conv", cin, cin, 3)
    norm_keys(out, "decoder.norm_out", cin)
    conv_keys(out, "decoder.conv_out", info.in_channels, cin, 3)
    conv_keys(out, "quant_conv", info.embed_dim, info.z_channels, 1)
    conv_keys(out, "post_quant_conv", info.z_channels, info.embed_dim, 1)
    out["quantize.embedding.weight"] = (info.codebook_size, info.embed_dim)
    return out


def inspect_vq(state: Mapping[str, np.ndarray], name: str = "the VQ file") -> VQInfo:
    """The sizes of a LlamaGen VQ state dict; raises :class:`ConversionError` unless every expected
    key is there with its shape and nothing else (besides ``quantize.codebook_used``)."""
    if _is_gpt(state) and not _is_vq(state):
        raise ConversionError(f"{name} is a LlamaGen GPT state dict, not the VQ tokenizer; pass it as --gpt.")
    other = _other_family(state)
    if other and "encoder.conv_blocks.0.res.0.conv1.weight" not in state:
        raise ConversionError(f"{name} is {other}.")
    need = ("encoder.conv_in.weight", "encoder.conv_blocks.0.res.0.conv1.weight", "encoder.conv_out.weight",
            "quant_conv.weight", "quantize.embedding.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"{name} is not a LlamaGen VQ state dict: it lacks {', '.join(missing)} "
                              f"(it has {len(state)} keys such as {', '.join(sorted(state)[:3])}).")
    ch, in_channels = (int(n) for n in state["encoder.conv_in.weight"].shape[:2])
    levels = count_indices(state, r"^encoder\.conv_blocks\.(\d+)\.")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.conv_blocks.{i}.res.0.conv1.weight"
        ch_mult.append(max(int(state[key].shape[0]) // ch, 1) if key in state else 1)
    dec_mult = []
    for k in range(count_indices(state, r"^decoder\.conv_blocks\.(\d+)\.")):
        key = f"decoder.conv_blocks.{k}.res.0.conv1.weight"
        dec_mult.insert(0, max(int(state[key].shape[0]) // ch, 1) if key in state else 1)
    if dec_mult and dec_mult != ch_mult:
        raise ConversionError(f"{name} has decoder multipliers {tuple(dec_mult)} unlike its encoder's "
                              f"{tuple(ch_mult)}, which vqgen's VQGAN (one ch_mult for both) does not build; pass a "
                              "VQ whose encoder and decoder mirror each other (VQ_8, VQ_16).")
    codebook = state["quantize.embedding.weight"]
    blocks = count_indices(state, r"^encoder\.conv_blocks\.0\.res\.(\d+)\.")
    info = VQInfo(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=blocks, in_channels=in_channels,
                  z_channels=int(state["encoder.conv_out.weight"].shape[0]), embed_dim=int(codebook.shape[1]) if codebook.ndim == 2 else -1,
                  codebook_size=int(codebook.shape[0]))
    check_keys(state, vq_manifest(info), name=name, kind=f"LlamaGen {info.name}", ignore=VQ_BUFFERS)
    return info


def convert_vq(state: Mapping[str, np.ndarray], info: VQInfo) -> dict:
    """The VQ's weights as the params of the :class:`~vqgen.tokenizers.vqgan.VQGAN` the config builds
    (nested dict of float32 arrays)."""

    conv, norm = functools.partial(conv_params, state), functools.partial(norm_params, state)
    resnet, attn = functools.partial(resnet_params, state), functools.partial(attn_params, state)

    def mid(part):
        return {"mid_block_1": resnet(f"{part}.mid.0"), "mid_attn_1": attn(f"{part}.mid.1"),
                "mid_block_2": resnet(f"{part}.mid.2")}

    levels, last = len(info.ch_mult), len(info.ch_mult) - 1
    enc = {"conv_in": conv("encoder.conv_in"), "norm_out": norm("encoder.norm_out"),
           "conv_out": conv("encoder.conv_out"), **mid("encoder")}
    dec = {"conv_in": conv("decoder.conv_in"), "norm_out": norm("decoder.norm_out"),
           "conv_out": conv("decoder.conv_out"), **mid("decoder")}
    for i in range(levels):
        src = f"encoder.conv_blocks.{i}"
        for j in range(info.num_res_blocks):
            enc[f"down_{i}_block_{j}"] = resnet(f"{src}.res.{j}")
            if i == last:
                enc[f"down_{i}_attn_{j}"] = attn(f"{src}.attn.{j}")
        if i != last:
            enc[f"down_{i}_downsample"] = {"conv": conv(f"{src}.downsample.conv")}
        src = f"decoder.conv_blocks.{last - i}"  # the decoder's blocks run from the lowest resolution up
        for j in range(info.num_res_blocks + 1):
            dec[f"up_{i}_block_{j}"] = resnet(f"{src}.res.{j}")
            if i == last:
                dec[f"up_{i}_attn_{j}"] = attn(f"{src}.attn.{j}")
        if i != 0:
            dec[f"up_{i}_upsample"] = {"conv": conv(f"{src}.upsample.conv")}
    return {"encoder": enc, "decoder": dec, "quant_conv": conv("quant_conv"),
            "post_quant_conv": conv("post_quant_conv"), "quantizer": {"codebook": state["quantize.embedding.weight"]}}


# ---------------------------------------------------------------------------------------- GPT


def gpt_manifest(info: GPTInfo) -> dict[str, tuple[int, ...]]:
    """Every parameter key of the official c2i ``Transformer`` with these sizes, and its shape."""
    d, f = info.width, info.hidden_dim
    out: dict[str, tuple[int, ...]] = {
        "cls_embedding.embedding_table.weight": (info.num_classes + int(info.null_class), d),
        "tok_embeddings.weight": (info.vocab_size, d), "norm.weight": (d,), "output.weight": (info.vocab_size, d),
    }
    qkv = (info.num_heads + 2 * info.num_kv_heads) * info.head_dim
    for i in range(info.depth):
        b = f"layers.{i}"
        out.update({
            f"{b}.attention.wqkv.weight": (qkv, d), f"{b}.attention.wo.weight": (d, d),
            f"{b}.feed_forward.w1.weight": (f, d), f"{b}.feed_forward.w3.weight": (f, d),
            f"{b}.feed_forward.w2.weight": (d, f), f"{b}.attention_norm.weight": (d,), f"{b}.ffn_norm.weight": (d,),
        })
    return out


def _gpt_buffers(state: Mapping, depth: int) -> list[str]:
    """The buffers a GPT file may hold besides its parameters (not converted)."""
    caches = [f"layers.{i}.attention.kv_cache.{c}_cache" for i in range(depth) for c in "kv"]
    return ["freqs_cis", *[k for k in caches if k in state]]


def _grid_from_rope(table: np.ndarray, name: str, head_dim: int | None) -> tuple[int, int]:
    """``(grid side, head_dim)`` of a stored ``freqs_cis [1 + g*g, hd/2, 2]``, checked against LlamaGen's table."""
    if table.ndim != 3 or table.shape[-1] != 2:
        raise ConversionError(f"{name}: freqs_cis has shape {tuple(table.shape)}, not [1 + grid², head_dim / 2, 2]; "
                              "this is not a LlamaGen c2i GPT state dict.")
    side, hd = math.isqrt(max(int(table.shape[0]) - 1, 0)), 2 * int(table.shape[1])
    if side * side + 1 != table.shape[0]:
        raise ConversionError(f"{name}: freqs_cis has {table.shape[0]} rows, not one class token and a square grid; "
                              "vqgen converts class-conditional GPTs with cls_token_num 1.")
    if head_dim is not None and head_dim != hd:
        raise ConversionError(f"{name}: freqs_cis is built for heads of width {hd} but the heads are {head_dim} wide; "
                              "drop --num-heads or pass the head count the model was trained with.")
    cos, sin = rope_2d_table((side, side), hd, ROPE_BASE, prefix_len=1)
    if not np.allclose(np.stack([cos, sin], -1), table, atol=1e-4):
        raise ConversionError(f"{name}: freqs_cis is not LlamaGen's 2D RoPE table with base {ROPE_BASE:g}, which is "
                              "the only one vqgen's GPT builds.")
    return side, hd



def kv_heads_of(name: str, wqkv_rows: int, width: int, num_heads: int) -> int:
    """The kv head count of a fused ``wqkv`` weight of ``wqkv_rows`` rows (queries of ``width``
    rows, then keys and values); a row count that fits no kv head count dividing ``num_heads`` is
    a :class:`ConversionError` naming ``--num-heads``."""
    head_dim = width // num_heads
    kv_rows = wqkv_rows - width
    kv_heads = kv_rows // (2 * head_dim) if kv_rows > 0 and kv_rows % (2 * head_dim) == 0 else 0
    if not kv_heads or num_heads % kv_heads:
        raise ConversionError(f"{name}: wqkv has {kv_rows + width} rows, which is not {width} query rows plus key and "
                              f"value rows for a number of kv heads dividing {num_heads} heads of width {head_dim}; "
                              "pass the head count it was trained with in --num-heads.")
    return kv_heads


def class_count(name: str, rows: int, num_classes: int | None) -> tuple[int, bool]:
    """``(num_classes, null_class)`` of a class table of ``rows`` rows: the last row is the CFG null
    class unless ``num_classes`` says the table has none; a count that fits neither is a
    :class:`ConversionError` naming ``--num-classes``."""
    if num_classes is None:
        num_classes, null_class = rows - 1, True
    elif num_classes in (rows, rows - 1):
        null_class = num_classes == rows - 1
    else:
        raise ConversionError(f"{name} has a class table of {rows} rows, which is neither {num_classes} classes nor "
                              f"{num_classes} classes and the CFG null row; drop --num-classes or fix it.")
    if num_classes < 1:
        raise ConversionError(f"{name} has a class table of {rows} row(s), which leaves no class besides the CFG "
                              "null row; pass --num-classes when the model was trained without one.")
    return num_classes, null_class

def inspect_gpt(state: Mapping[str, np.ndarray], name: str = "the GPT file", *, num_heads: int | None = None,
                num_classes: int | None = None) -> GPTInfo:
    """The sizes of a LlamaGen c2i GPT state dict; raises :class:`ConversionError` unless every
    expected key is there with its shape and nothing else (besides ``freqs_cis`` and KV caches).

    ``num_heads`` is needed only for a width that is none of LlamaGen's sizes (and no ``freqs_cis``
    is stored); ``num_classes`` only for a class table without the CFG null row.
    """
    if _is_vq(state) and not _is_gpt(state):
        raise ConversionError(f"{name} is a LlamaGen VQ tokenizer state dict, not the GPT; pass it as --vq.")
    other = _other_family(state)
    if other:
        raise ConversionError(f"{name} is {other}.")
    need = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight", "layers.0.attention.wqkv.weight",
            "layers.0.feed_forward.w1.weight", "output.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"{name} is not a LlamaGen c2i GPT state dict: it lacks {', '.join(missing)} "
                              f"(it has {len(state)} keys such as {', '.join(sorted(state)[:3])}).")
    depth = count_indices(state, r"^layers\.(\d+)\.")
    vocab, width = (int(n) for n in state["tok_embeddings.weight"].shape)
    grid, rope_hd = None, None
    if "freqs_cis" in state:
        grid, rope_hd = _grid_from_rope(state["freqs_cis"], name, width // num_heads if num_heads else None)
    if num_heads is None:
        if rope_hd is not None:
            num_heads = width // rope_hd
        elif width in HEADS_BY_WIDTH:
            num_heads = HEADS_BY_WIDTH[width]
        else:
            raise ConversionError(f"{name} has width {width}, which is none of LlamaGen's sizes, and its file does not "
                                  "store the attention heads; pass them with --num-heads.")
    if num_heads < 1 or width % num_heads:
        raise ConversionError(f"{name} has width {width}, which {num_heads} heads do not divide; pass the head count "
                              "it was trained with in --num-heads.")
    kv_heads = kv_heads_of(name, int(state["layers.0.attention.wqkv.weight"].shape[0]), width, num_heads)
    num_classes, null_class = class_count(name, int(state["cls_embedding.embedding_table.weight"].shape[0]),
                                          num_classes)
    info = GPTInfo(depth=depth, width=width, num_heads=num_heads, num_kv_heads=kv_heads,
                   hidden_dim=int(state["layers.0.feed_forward.w1.weight"].shape[0]), vocab_size=vocab,
                   num_classes=num_classes, null_class=null_class, grid=grid)
    buffers = _gpt_buffers(state, depth)
    check_keys(state, gpt_manifest(info), name=name, kind=f"LlamaGen {info.name}", ignore=buffers)
    return info


def convert_gpt(state: Mapping[str, np.ndarray], info: GPTInfo) -> dict:
    """The GPT's weights as the params of :class:`vqgen.generators.gpt.GPT` (nested dict of float32 arrays)."""
    d, h, kv, hd = info.width, info.num_heads, info.num_kv_heads, info.head_dim

    def dense(key):
        return {"kernel": linear_kernel(state[f"{key}.weight"])}

    params: dict[str, Any] = {
        "cls_embedding": {"embedding_table": state["cls_embedding.embedding_table.weight"]},
        "tok_embeddings": {"embedding": state["tok_embeddings.weight"]},
        "norm": {"scale": state["norm.weight"]}, "output": dense("output"),
    }
    for i in range(info.depth):
        b = f"layers.{i}"
        wqkv = state[f"{b}.attention.wqkv.weight"]  # [(H + 2 KV) hd, D]
        q, k, v = np.split(wqkv, [d, d + kv * hd])
        params[f"layers_{i}"] = {
            "attention": {
                "wq": {"kernel": linear_kernel(q).reshape(d, h, hd)},
                "wk": {"kernel": linear_kernel(k).reshape(d, kv, hd)},
                "wv": {"kernel": linear_kernel(v).reshape(d, kv, hd)},
                "wo": {"kernel": linear_kernel(state[f"{b}.attention.wo.weight"]).reshape(h, hd, d)},
            },
            "feed_forward": {part: dense(f"{b}.feed_forward.{part}") for part in ("w1", "w2", "w3")},
            "attention_norm": {"scale": state[f"{b}.attention_norm.weight"]},
            "ffn_norm": {"scale": state[f"{b}.ffn_norm.weight"]},
        }
    return params


def ffn_fields(width: int, hidden_dim: int) -> dict[str, Any]:
    """The GPT config fields (``multiple_of``, ``ffn_dim_multiplier``) that give this SwiGLU width:
    none for LlamaGen's default ``find_multiple(int(8 * width / 3), 256)``."""
    if swiglu_hidden_dim(width, 256, None) == hidden_dim:
        return {}
    if swiglu_hidden_dim(width, hidden_dim, None) == hidden_dim:  # int(8w/3) <= hidden: one multiple
        return {"multiple_of": hidden_dim}
    base = int(2 * 4 * width / 3)
    for multiplier in (hidden_dim / base, (hidden_dim + 0.5) / base):  # int(m * base) must land in (0, hidden]
        if swiglu_hidden_dim(width, hidden_dim, multiplier) == hidden_dim:
            return {"multiple_of": hidden_dim, "ffn_dim_multiplier": multiplier}
    raise ConversionError(f"no multiple_of/ffn_dim_multiplier gives a SwiGLU width of {hidden_dim} at width {width}; "
                          "this is not a LlamaGen GPT.")


# ---------------------------------------------------------------------------------------- config


def check_pair(vq: VQInfo, gpt: GPTInfo, vq_name: str = "the VQ file", gpt_name: str = "the GPT file") -> None:
    """Raises :class:`ConversionError` unless the GPT models this VQ's codes."""
    if vq.codebook_size != gpt.vocab_size:
        raise ConversionError(f"{vq_name} has {vq.codebook_size} codes but {gpt_name} predicts {gpt.vocab_size}; "
                              "pass the VQ the GPT was trained with.")


def image_size_from_name(path: str | None) -> int | None:
    """The image size at the end of a released file's name (``c2i_XL_384.pt``: 384), if any."""
    match = IMAGE_SIZE_IN_NAME.search(os.path.basename(path or ""))
    return int(match.group(1)) if match else None


def _base_config(gpt: GPTInfo | None, spec: str | None) -> tuple[ml_collections.ConfigDict, str]:
    from vqgen import config_lib  # the configs import the training stack

    if spec:
        return config_lib.load_config(spec), spec
    if gpt is None:
        return config_lib.load_config("tokenizers/llamagen_vq16"), "tokenizers/llamagen_vq16"
    variant = gpt.variant or min(gpt_lib.VARIANTS, key=lambda v: abs(gpt_lib.VARIANTS[v]["width"] - gpt.width))
    return config_lib.load_config("generators/llamagen", variant), f"generators/llamagen:{variant}"


def _check_against_config(config, spec: str, vq: VQInfo | None, gpt: GPTInfo | None, vq_name: str,
                          gpt_name: str) -> None:
    """Refuses files whose sizes differ from the architecture the ``--config`` describes."""
    if gpt is not None:
        gen = config.get("generator")
        if gen is None or gen.get("arch") != "gpt":
            raise ConversionError(f"--config {spec} has no GPT generator, so it cannot describe {gpt_name} "
                                  f"({gpt.name}); pass a generators/llamagen config or drop --config.")
        want = (int(gen.depth), int(gen.width), int(gen.num_heads))
        if want != (gpt.depth, gpt.width, gpt.num_heads):
            raise ConversionError(
                f"{gpt_name} is a {gpt.name} state dict ({gpt.depth} layers of width {gpt.width}, {gpt.num_heads} "
                f"heads) but --config {spec} describes {want[0]} layers of width {want[1]} with {want[2]} heads; "
                "pass the matching file or config, or drop --config.")
    if vq is not None:
        tok = config.get("tokenizer")
        if tok is None or tok.get("arch") != "vqgan" or tok.get("style") != "taming":
            raise ConversionError(f"--config {spec} has no taming-style VQGAN tokenizer, so it cannot describe "
                                  f"{vq_name} ({vq.name}); pass a LlamaGen config or drop --config.")
        want = (int(tok.ch), tuple(int(m) for m in tok.ch_mult), int(tok.quantizer.codebook_size))
        if want != (vq.ch, vq.ch_mult, vq.codebook_size):
            raise ConversionError(
                f"{vq_name} is a LlamaGen {vq.name} state dict (ch {vq.ch}, multipliers {vq.ch_mult}, "
                f"{vq.codebook_size} codes) but --config {spec} describes ch {want[0]}, multipliers {want[1]}, "
                f"{want[2]} codes; pass the matching file or config, or drop --config.")


def make_config(vq: VQInfo | None, gpt: GPTInfo | None, image_size: int | None = None, *, dtype: str | None = None,
                config: str | None = None, gpt_path: str | None = None, vq_name: str = "the VQ file",
                gpt_name: str = "the GPT file") -> tuple[ml_collections.ConfigDict, str]:
    """The config (locked) with the sizes of the converted files written over it, and its name.

    ``config`` names the base config (default: see the module docstring); a config of another
    size is refused. The image size is ``image_size``, else the GPT's stored grid, else the size in
    the GPT file's name ``gpt_path``, else the config's.
    """
    base, spec = _base_config(gpt, config)
    if config:
        _check_against_config(base, spec, vq, gpt, vq_name, gpt_name)
    tok = base.tokenizer
    ch_mult = vq.ch_mult if vq is not None else tuple(int(m) for m in tok.ch_mult)
    factor = 2 ** (len(ch_mult) - 1)
    if vq is not None:
        set_fields(tok, ch=vq.ch, ch_mult=vq.ch_mult, num_res_blocks=vq.num_res_blocks, z_channels=vq.z_channels,
             embed_dim=vq.embed_dim, attn_resolutions=(int(tok.resolution) // factor,))
        set_fields(tok.quantizer, codebook_size=vq.codebook_size)
        set_fields(base.data, channels=vq.in_channels)
    else:
        set_fields(tok.quantizer, codebook_size=gpt.vocab_size)
    stored = gpt.grid * factor if gpt is not None and gpt.grid else None
    if image_size is not None and stored is not None and int(image_size) != stored:
        raise ConversionError(f"{gpt_name} stores a {gpt.grid}x{gpt.grid} token grid ({stored}px with {factor}x "
                              f"downsampling) but --image-size {image_size} was given; drop --image-size.")
    size = int(image_size or stored or image_size_from_name(gpt_path) or base.data.image_size)
    if size % factor:
        raise ConversionError(f"the image size {size} is not a multiple of the VQ's downsampling {factor}; pass "
                              f"--image-size as a multiple of {factor} (256 or 384 for LlamaGen's releases).")
    set_fields(base.data, image_size=size)
    if gpt is not None:
        set_fields(base.data, num_classes=gpt.num_classes)
        gen = base.generator
        set_fields(gen, depth=gpt.depth, width=gpt.width, num_heads=gpt.num_heads, num_kv_heads=gpt.num_kv_heads,
             **ffn_fields(gpt.width, gpt.hidden_dim))
        if not gpt.null_class:
            set_fields(gen, class_dropout_prob=0.0)
            set_fields(base.sample, cfg_scale=1.0)  # guidance needs the null class
        elif float(gen.class_dropout_prob) <= 0:
            set_fields(gen, class_dropout_prob=0.1)  # the table has the null row: LlamaGen's rate
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(tok, dtype=dtype)
        if gpt is not None:
            set_fields(base.generator, dtype=dtype)
    base.lock()
    return base, spec


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config and the params of each model it was given."""

    config: ml_collections.ConfigDict
    config_name: str
    vq: VQInfo | None = None
    gpt: GPTInfo | None = None
    tokenizer_params: dict | None = None
    generator_params: dict | None = None
    weights: str = ""  # where in the GPT file its state dict was ("ema", "model", "" for a bare state dict)


def convert(vq_state: Mapping[str, np.ndarray] | None = None, gpt_state: Mapping[str, np.ndarray] | None = None, *,
            image_size: int | None = None, num_heads: int | None = None, num_classes: int | None = None,
            dtype: str | None = None, config: str | None = None, gpt_path: str | None = None,
            vq_name: str = "the VQ file", gpt_name: str = "the GPT file") -> Converted:
    """Checks and converts LlamaGen state dicts (NumPy arrays) into vqgen params and a config; writes nothing.

    Either state dict may be None (a tokenizer-only or generator-only conversion). Raises
    :class:`~vqgen.convert.workdir.ConversionError` with one sentence.
    """
    if vq_state is None and gpt_state is None:
        raise ConversionError("nothing to convert; pass --vq, --gpt or both.")
    vq = inspect_vq(vq_state, vq_name) if vq_state is not None else None
    gpt = inspect_gpt(gpt_state, gpt_name, num_heads=num_heads, num_classes=num_classes) \
        if gpt_state is not None else None
    if vq is not None and gpt is not None:
        check_pair(vq, gpt, vq_name, gpt_name)
    cfg, spec = make_config(vq, gpt, image_size, dtype=dtype, config=config, gpt_path=gpt_path, vq_name=vq_name,
                            gpt_name=gpt_name)
    return Converted(config=cfg, config_name=spec, vq=vq, gpt=gpt,
                     tokenizer_params=convert_vq(vq_state, vq) if vq is not None else None,
                     generator_params=convert_gpt(gpt_state, gpt) if gpt is not None else None)


def read(path: str, weights: str = "ema") -> tuple[dict[str, np.ndarray], str]:
    """The state dict of a LlamaGen file and where it was found (``"ema"``, ``"model"``, ``""``...);
    ``weights="ema"`` takes the EMA weights of a training checkpoint when it has them."""
    if weights not in ("ema", "model"):
        raise ConversionError(f"--weights {weights} is not a choice; use ema or model.")
    return read_state_dict(path, EMA_WRAPPERS if weights == "ema" else MODEL_WRAPPERS, safe_globals=_safe_globals())


def convert_files(vq: str | None, gpt: str | None, out: str, *, weights: str = "ema", mesh=None,
                  **kwargs: Any) -> Converted:
    """Reads the files, converts them (:func:`convert`, which takes ``kwargs``) and writes the
    workdir ``out`` (on ``mesh``, default the config's)."""
    vq_state = read(vq, weights)[0] if vq else None
    gpt_state, where = read(gpt, weights) if gpt else (None, "")
    converted = convert(vq_state, gpt_state, gpt_path=gpt, vq_name=os.path.basename(vq or "") or "the VQ file",
                        gpt_name=os.path.basename(gpt or "") or "the GPT file", **kwargs)
    converted.weights = where
    write_workdir(converted.config, out, tokenizer_params=converted.tokenizer_params,
                  generator_params=converted.generator_params, mesh=mesh)
    return converted


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m vqgen.convert.llamagen",
        description="Convert LlamaGen's PyTorch VQ tokenizer and/or c2i GPT into a vqgen workdir.")
    parser.add_argument("--vq", help="VQ tokenizer weights, e.g. vq_ds16_c2i.pt (.pt or .safetensors)")
    parser.add_argument("--gpt", help="class-conditional GPT weights, e.g. c2i_B_256.pt (.pt or .safetensors)")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold checkpoints yet)")
    parser.add_argument("--config", default=None,
                        help="base config (default generators/llamagen:<size> or tokenizers/llamagen_vq16); a file of "
                             "another size is refused")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size, which sets the token grid (default: from the GPT file, else 256)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, needed only for a width none of LlamaGen's sizes has")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes, needed only for a class table without the CFG null row")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="which weights of a training checkpoint to take (default: ema when present)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of both models (default: the config's bfloat16)")
    args = parser.parse_args(argv)
    if not args.vq and not args.gpt:
        parser.error("pass --vq, --gpt or both")
    converted = convert_files(args.vq, args.gpt, args.out, weights=args.weights, image_size=args.image_size,
                              num_heads=args.num_heads, num_classes=args.num_classes, dtype=args.dtype,
                              config=args.config)
    parts = []
    if converted.vq is not None:
        v = converted.vq
        parts.append(f"tokenizer (LlamaGen {v.name}, ch {v.ch}, {v.codebook_size} codes of width {v.embed_dim})")
    if converted.gpt is not None:
        g = converted.gpt
        source = f", its {converted.weights} weights" if converted.weights else ""
        parts.append(f"generator ({g.name}: {g.depth} layers, width {g.width}, {g.num_heads} heads, "
                     f"{g.num_classes} classes{source})")
    cfg = converted.config
    grid = cfg.data.image_size // 2 ** (len(cfg.tokenizer.ch_mult) - 1)
    print(f"wrote {args.out}: {' and '.join(parts)} for {cfg.data.image_size}px images ({grid}x{grid} tokens), "
          f"config {converted.config_name} with the sizes of the files")
    return converted


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
