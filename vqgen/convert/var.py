"""Convert VAR's released PyTorch weights (FoundationVision/VAR) into a vqgen workdir.

    python -m vqgen.convert.var --vae vae_ch160v4096z32.pth --var var_d16.pth --out runs/var_d16
    python -m vqgen.convert.var --vae vae_ch160v4096z32.pth --out runs/var_vqvae     # tokenizer only
    python -m vqgen.convert.var --var var_d16.pth --out runs/var_d16_gen               # generator only

The workdir holds ``config.json`` and step-0 checkpoints of the tokenizer and/or generator
phases (:mod:`vqgen.convert.workdir`), so ``vqgen.load_tokenizer(out)`` and
``vqgen.load_generator(out)`` use it as if vqgen had trained it, and training on it fine-tunes the
converted weights. The config is the paper config, ``configs/generators/var.py:d<depth>``
(``configs/tokenizers/var_vqvae.py`` for a VQ-VAE alone), with every size read from the tensor
shapes written over it; VAR's released files give the paper config itself, so
``python -m vqgen.main --config=generators/var:d16 --workdir=out --mode=sample`` samples from
them. Sizes read: the VQ-VAE's ``ch``, channel multipliers, res blocks, latent width,
vocabulary and Φ sharing; the transformer's depth (blocks), width, heads (``scale_mul_1H11``),
MLP width, AdaLN kind, classes (``class_emb`` rows - 1) and scale schedule (``lvl_1L`` when the
file has it, else ``pos_1LC``/``lvl_embed`` must match VAR's 256px schedule 1,2,3,4,5,6,8,10,13,16
or ``--scales`` says it); ``data.image_size`` is the VQ-VAE's downsampling (16) times the last
scale; ``sample.top_k`` (VAR's 900) is capped at the vocabulary. ``--dtype float32`` sets the
compute dtype of both models (the paper configs use bfloat16).

Files: ``torch.load(map_location="cpu", weights_only=True)`` of a plain state dict or of VAR's
training checkpoint (``{"trainer": {"var_wo_ddp": ..., "vae_local": ...}}``), or a
``.safetensors`` file. Every expected key and shape is checked before anything is written; a file
of another kind or size is refused with one sentence saying what it is. The buffers
``lvl_1L``, ``attn_bias_for_masking``, ``zero_k_bias`` (must be zero) and
``ema_vocab_hit_SV`` are accepted and not converted.

Mapping (PyTorch -> vqgen; convs ``OIHW -> HWIO``, linears transposed to ``[in, out]``):

VQ-VAE (``models/vqvae.py``, ``basic_vae.py``, ``quant.py`` -> :class:`vqgen.tokenizers.vqgan.VQGAN`
with ``style="taming"``, ``quant_conv_kernel=3`` and the ``msrq`` quantizer):

- ``encoder.down.{i}.block.{j}.*`` -> ``encoder/down_{i}_block_{j}/*``, ``.attn.{j}`` ->
  ``down_{i}_attn_{j}``, ``.downsample.conv`` -> ``down_{i}_downsample/conv``;
  ``decoder.up.{i}.*`` -> ``decoder/up_{i}_*`` (``i`` counts levels from full resolution in both);
  ``{encoder,decoder}.mid.{block_1,attn_1,block_2}`` -> ``mid_block_1``, ``mid_attn_1``,
  ``mid_block_2``; GroupNorm ``weight`` -> ``scale``.
- ``AttnBlock.qkv`` (one 1x1 conv to ``3C``) is split into the ``q``, ``k``, ``v`` convs in that order.
- ``quant_conv``, ``post_quant_conv`` (3x3) keep their names; ``quantize.embedding.weight`` ->
  ``quantizer/codebook``; the Φ convs ``quantize.quant_resi.qresi_ls.{k}`` (partially shared,
  ``phi_share=K``), ``.quant_resi.qresi`` (shared, ``phi_share=1``) or ``.quant_resi.{k}`` (one per
  scale, ``phi_share=0``) -> ``quantizer/phi_{k}/conv``. Φ's ratio (0.5) and the unnormalised
  lookup are not stored in the file; VAR's values are used (no Φ keys: ratio 0).

Transformer (``models/var.py``, ``basic_var.py`` -> :class:`vqgen.generators.var.VAR`):

- ``blocks.{i}`` -> ``blocks_{i}``; ``attn.mat_qkv.weight [3C, C]`` -> ``mat_qkv/kernel [C, 3, H,
  hd]``; ``q_bias``/``v_bias [C]`` -> ``[H, hd]``; ``scale_mul_1H11 [1, H, 1, 1]`` -> ``scale_mul
  [H]``; ``attn.proj.weight [C, C]`` -> ``proj/kernel [H, hd, C]``; ``ffn.fc1``/``fc2``,
  ``ada_lin.1`` -> ``ffn/fc1``, ``ffn/fc2``, ``ada_lin``; ``ada_gss [1, 1, 6, C]`` -> ``[6, C]``.
- ``word_embed``, ``head``, ``head_nm.ada_lin.1`` -> ``word_embed``, ``head``, ``head_nm/ada_lin``;
  ``shared_ada_lin.1`` -> ``shared_ada_lin``; ``class_emb.weight``, ``lvl_embed.weight`` ->
  ``class_emb``, ``lvl_embed``; ``pos_start``/``pos_1LC`` drop the leading 1.

VAR's transformer and VQ-VAE from one release agree on the vocabulary, latent width and scales;
a pair that does not is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from vqgen.convert.conv_blocks import (conv_keys, conv_params, count_indices, norm_keys, norm_params,
                                       resnet_keys, resnet_params)
from vqgen.convert.workdir import (
    ConversionError,
    check_keys,
    linear_kernel,
    load_state_dict,
    oihw_to_hwio,
    set_fields,
    write_workdir,
)
from vqgen.quantizers.multiscale import VAR_SCALES  # VAR's 256px schedule

PAPER_DEPTHS = (16, 20, 24, 30)  # configs/generators/var.py variants
VAE_BUFFERS = ("quantize.ema_vocab_hit_SV",)
# Where the weights sit inside VAR's training checkpoints (trainer.py) and other common wrappers.
VAE_WRAPPERS = (("trainer", "vae_local"), ("vae_local",), ("state_dict",), ("model",))
VAR_WRAPPERS = (("trainer", "var_wo_ddp"), ("var_wo_ddp",), ("state_dict",), ("model",))


@dataclasses.dataclass(frozen=True)
class VAEInfo:
    """Sizes of a VAR VQ-VAE state dict, read from its shapes."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    in_channels: int
    z_channels: int
    vocab_size: int
    quant_conv_kernel: int
    phi_style: str  # "partial" (qresi_ls.{k}), "shared" (qresi), "each" (quant_resi.{k}) or "none"
    phi_count: int

    def phi_share(self, num_scales: int) -> int:
        """vqgen's ``phi_share`` for this file's Φs over ``num_scales`` scales."""
        if self.phi_style in ("shared", "none") or self.phi_count == 1:
            return 1
        if self.phi_style == "each" and self.phi_count == num_scales:
            return 0
        return self.phi_count


@dataclasses.dataclass(frozen=True)
class VARInfo:
    """Sizes of a VAR transformer state dict, read from its shapes (and ``--scales``)."""

    depth: int
    width: int
    num_heads: int
    mlp_hidden: int
    num_classes: int
    vocab_size: int
    vae_dim: int
    scales: tuple[int, ...]
    shared_aln: bool
    attn_l2_norm: bool

    @property
    def seq_len(self) -> int:
        return sum(s * s for s in self.scales)


# --------------------------------------------------------------------------------- VQ-VAE


def _attn(out: dict, key: str, c: int) -> None:
    """VAR's AttnBlock: taming's with ``q``, ``k``, ``v`` fused into one 1x1 ``qkv`` conv."""
    norm_keys(out, f"{key}.norm", c)
    conv_keys(out, f"{key}.qkv", 3 * c, c, 1)
    conv_keys(out, f"{key}.proj_out", c, c, 1)


def vae_manifest(info: VAEInfo) -> dict[str, tuple[int, ...]]:
    """Every parameter key of the official ``VQVAE`` with these sizes, and its shape."""
    out: dict[str, tuple[int, ...]] = {}
    ch, mult, nrb, z = info.ch, info.ch_mult, info.num_res_blocks, info.z_channels
    last = len(mult) - 1
    conv_keys(out, "encoder.conv_in", ch, info.in_channels, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            resnet_keys(out, f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i == last:
                _attn(out, f"encoder.down.{i}.attn.{j}", cin)
        if i != last:
            conv_keys(out, f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    for part in ("encoder", "decoder"):
        top = ch * mult[-1]
        resnet_keys(out, f"{part}.mid.block_1", top, top)
        _attn(out, f"{part}.mid.attn_1", top)
        resnet_keys(out, f"{part}.mid.block_2", top, top)
    norm_keys(out, "encoder.norm_out", cin)
    conv_keys(out, "encoder.conv_out", z, cin, 3)
    conv_keys(out, "decoder.conv_in", cin, z, 3)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resnet_keys(out, f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i == last:
                _attn(out, f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv_keys(out, f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm_keys(out, "decoder.norm_out", cin)
    conv_keys(out, "decoder.conv_out", info.in_channels, cin, 3)
    k = info.quant_conv_kernel
    conv_keys(out, "quant_conv", z, z, k)
    conv_keys(out, "post_quant_conv", z, z, k)
    out["quantize.embedding.weight"] = (info.vocab_size, z)
    for key in _phi_keys(info):
        conv_keys(out, key, z, z, 3)
    return out


def _phi_keys(info: VAEInfo) -> list[str]:
    if info.phi_style == "partial":
        return [f"quantize.quant_resi.qresi_ls.{k}" for k in range(info.phi_count)]
    if info.phi_style == "shared":
        return ["quantize.quant_resi.qresi"]
    if info.phi_style == "each":
        return [f"quantize.quant_resi.{k}" for k in range(info.phi_count)]
    return []


def _var_depth(state: Mapping) -> int:
    return count_indices(state, r"^blocks\.(\d+)\.")


def _looks_like_var(state: Mapping) -> bool:
    return "class_emb.weight" in state and _var_depth(state) > 0


def _looks_like_vae(state: Mapping) -> bool:
    return "quantize.embedding.weight" in state and "encoder.conv_in.weight" in state


def inspect_vae(state: Mapping[str, np.ndarray], name: str = "the VQ-VAE file") -> VAEInfo:
    """The sizes of a VAR VQ-VAE state dict; raises :class:`ConversionError` unless every
    expected key is there with its shape and nothing else (besides ``ema_vocab_hit_SV``)."""
    if _looks_like_var(state) and not _looks_like_vae(state):
        raise ConversionError(f"{name} is a VAR transformer state dict ({_var_depth(state)} blocks), not the "
                              "VQ-VAE; pass it as --var.")
    need = ("encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight", "quant_conv.weight",
            "encoder.down.0.block.0.conv1.weight")
    if not all(k in state for k in need):
        missing = [k for k in need if k not in state]
        raise ConversionError(f"{name} is not a VAR VQ-VAE state dict: it lacks {', '.join(missing)} "
                              f"(it has {len(state)} keys such as {', '.join(sorted(state)[:3])}).")
    ch, in_channels = state["encoder.conv_in.weight"].shape[:2]
    levels = count_indices(state, r"^encoder\.down\.(\d+)\.")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        width = state[key].shape[0] if key in state else ch
        ch_mult.append(max(int(width) // int(ch), 1))
    if "quantize.quant_resi.qresi_ls.0.weight" in state:
        style, count = "partial", count_indices(state, r"^quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    elif "quantize.quant_resi.qresi.weight" in state:
        style, count = "shared", 1
    elif "quantize.quant_resi.0.weight" in state:
        style, count = "each", count_indices(state, r"^quantize\.quant_resi\.(\d+)\.")
    else:
        style, count = "none", 0
    info = VAEInfo(
        ch=int(ch), ch_mult=tuple(ch_mult), num_res_blocks=count_indices(state, r"^encoder\.down\.0\.block\.(\d+)\."),
        in_channels=int(in_channels), z_channels=int(state["encoder.conv_out.weight"].shape[0]),
        vocab_size=int(state["quantize.embedding.weight"].shape[0]),
        quant_conv_kernel=int(state["quant_conv.weight"].shape[-1]), phi_style=style, phi_count=count)
    check_keys(state, vae_manifest(info), name=name, kind="VAR VQ-VAE", ignore=VAE_BUFFERS)
    return info


def convert_vae(state: Mapping[str, np.ndarray], info: VAEInfo) -> dict:
    """The VQ-VAE's weights as the params of the :class:`~vqgen.tokenizers.vqgan.VQGAN` the config
    builds (nested dict of float32 arrays)."""

    conv = functools.partial(conv_params, state)
    norm = functools.partial(norm_params, state)
    resnet = functools.partial(resnet_params, state)

    def attn(key):  # the fused qkv conv split into taming's q, k, v
        w, b = state[f"{key}.qkv.weight"], state[f"{key}.qkv.bias"]  # [3C, C, 1, 1], [3C]
        c = w.shape[0] // 3
        out = {"norm": norm(f"{key}.norm"), "proj_out": conv(f"{key}.proj_out")}
        for n, part in enumerate("qkv"):
            out[part] = {"kernel": oihw_to_hwio(w[n * c:(n + 1) * c]), "bias": b[n * c:(n + 1) * c]}
        return out

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
            if i == last:
                enc[f"down_{i}_attn_{j}"] = attn(f"encoder.down.{i}.attn.{j}")
        if i != last:
            enc[f"down_{i}_downsample"] = {"conv": conv(f"encoder.down.{i}.downsample.conv")}
        for j in range(info.num_res_blocks + 1):
            dec[f"up_{i}_block_{j}"] = resnet(f"decoder.up.{i}.block.{j}")
            if i == last:
                dec[f"up_{i}_attn_{j}"] = attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            dec[f"up_{i}_upsample"] = {"conv": conv(f"decoder.up.{i}.upsample.conv")}
    quantizer = {"codebook": state["quantize.embedding.weight"]}
    for k, key in enumerate(_phi_keys(info)):
        quantizer[f"phi_{k}"] = {"conv": conv(key)}
    return {"encoder": enc, "decoder": dec, "quant_conv": conv("quant_conv"),
            "post_quant_conv": conv("post_quant_conv"), "quantizer": quantizer}


# ---------------------------------------------------------------------------- transformer


def var_manifest(info: VARInfo) -> dict[str, tuple[int, ...]]:
    """Every parameter key of the official ``VAR`` with these sizes, and its shape."""
    c, s = info.width, info.scales
    out: dict[str, tuple[int, ...]] = {
        "word_embed.weight": (c, info.vae_dim), "word_embed.bias": (c,),
        "class_emb.weight": (info.num_classes + 1, c), "pos_start": (1, s[0] * s[0], c),
        "pos_1LC": (1, info.seq_len, c), "lvl_embed.weight": (len(s), c),
        "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
        "head.weight": (info.vocab_size, c), "head.bias": (info.vocab_size,),
    }
    if info.shared_aln:
        out.update({"shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,)})
    for i in range(info.depth):
        b = f"blocks.{i}"
        out.update({
            f"{b}.attn.mat_qkv.weight": (3 * c, c), f"{b}.attn.q_bias": (c,), f"{b}.attn.v_bias": (c,),
            f"{b}.attn.proj.weight": (c, c), f"{b}.attn.proj.bias": (c,),
            f"{b}.ffn.fc1.weight": (info.mlp_hidden, c), f"{b}.ffn.fc1.bias": (info.mlp_hidden,),
            f"{b}.ffn.fc2.weight": (c, info.mlp_hidden), f"{b}.ffn.fc2.bias": (c,),
        })
        if info.attn_l2_norm:
            out[f"{b}.attn.scale_mul_1H11"] = (1, info.num_heads, 1, 1)
        if info.shared_aln:
            out[f"{b}.ada_gss"] = (1, 1, 6, c)
        else:
            out.update({f"{b}.ada_lin.1.weight": (6 * c, c), f"{b}.ada_lin.1.bias": (6 * c,)})
    return out


def _var_buffers(info: VARInfo) -> dict[str, tuple[int, ...]]:
    lay = info.seq_len
    out = {"lvl_1L": (1, lay), "attn_bias_for_masking": (1, 1, lay, lay)}
    out.update({f"blocks.{i}.attn.zero_k_bias": (info.width,) for i in range(info.depth)})
    return out


def _scales_from_levels(levels: np.ndarray, name: str) -> tuple[int, ...]:
    counts = np.bincount(np.asarray(levels, np.int64).reshape(-1))
    sides = [int(round(math.sqrt(n))) for n in counts]
    if any(s * s != n or s < 1 for s, n in zip(sides, counts)):
        raise ConversionError(f"{name}: lvl_1L has {counts.tolist()} tokens per scale, not square maps; this is "
                              "not a VAR state dict.")
    return tuple(sides)


def _infer_scales(state: Mapping, name: str, scales: Sequence[int] | None) -> tuple[int, ...]:
    num = int(state["lvl_embed.weight"].shape[0])
    length = int(state["pos_1LC"].shape[1]) if state["pos_1LC"].ndim == 3 else -1
    first = int(state["pos_start"].shape[1]) if state["pos_start"].ndim == 3 else -1
    stored = _scales_from_levels(state["lvl_1L"], name) if "lvl_1L" in state else None
    if scales is not None:
        scales = tuple(int(s) for s in scales)
        if stored is not None and stored != scales:
            raise ConversionError(f"{name} was trained on the scales {','.join(map(str, stored))} (its lvl_1L) but "
                                  f"--scales {','.join(map(str, scales))} was given; drop --scales.")
    elif stored is not None:
        scales = stored
    elif (num, length, first) == (len(VAR_SCALES), sum(s * s for s in VAR_SCALES), 1):
        scales = VAR_SCALES
    else:
        raise ConversionError(f"{name} has {num} scales over {length} tokens and no lvl_1L buffer, which is not "
                              "VAR's 256px schedule; pass its scales with --scales (1,2,3,4 for example).")
    if (num, length, first) != (len(scales), sum(s * s for s in scales), scales[0] ** 2):
        raise ConversionError(f"{name} has {num} scales over {length} tokens (first {first}) but the scales "
                              f"{','.join(map(str, scales))} make {len(scales)} over {sum(s * s for s in scales)}; "
                              "pass the scales it was trained with in --scales.")
    if max(scales) != scales[-1]:
        raise ConversionError(f"the scales {','.join(map(str, scales))} do not end with the largest map; pass them "
                              "from small to large in --scales.")
    return scales


def inspect_var(state: Mapping[str, np.ndarray], name: str = "the VAR file", *, scales: Sequence[int] | None = None,
                depth: int | None = None, num_heads: int | None = None) -> VARInfo:
    """The sizes of a VAR transformer state dict; raises :class:`ConversionError` unless every
    expected key is there with its shape and nothing else (besides VAR's buffers).

    ``scales`` is needed only for a file without ``lvl_1L`` trained on a schedule other than
    VAR's 256px one; ``depth`` is a check (a file of another depth is refused); ``num_heads`` is
    needed only where it is not stored (attention without l2 norm: VAR's rule ``heads = depth``).
    """
    if _looks_like_vae(state) and not _looks_like_var(state):
        raise ConversionError(f"{name} is a VAR VQ-VAE state dict, not the transformer; pass it as --vae.")
    need = ("class_emb.weight", "word_embed.weight", "head.weight", "pos_1LC", "pos_start", "lvl_embed.weight",
            "blocks.0.ffn.fc1.weight")
    if not all(k in state for k in need):
        missing = [k for k in need if k not in state]
        raise ConversionError(f"{name} is not a VAR transformer state dict: it lacks {', '.join(missing)} "
                              f"(it has {len(state)} keys such as {', '.join(sorted(state)[:3])}).")
    blocks = _var_depth(state)
    if depth is not None and int(depth) != blocks:
        raise ConversionError(f"{name} is a VAR-d{blocks} state dict ({blocks} blocks) but --depth {depth} was given; "
                              f"pass the d{depth} file or drop --depth.")
    width = int(state["class_emb.weight"].shape[1])
    l2 = "blocks.0.attn.scale_mul_1H11" in state
    if l2:
        heads = int(state["blocks.0.attn.scale_mul_1H11"].shape[1])
        if num_heads is not None and int(num_heads) != heads:
            raise ConversionError(f"{name} has {heads} attention heads (its scale_mul_1H11) but --num-heads "
                                  f"{num_heads} was given; drop --num-heads.")
    else:
        heads = int(num_heads) if num_heads is not None else blocks
    if heads < 1 or width % heads:
        raise ConversionError(f"{name} has width {width}, which {heads} heads do not divide; pass the head count "
                              "it was trained with in --num-heads.")
    info = VARInfo(
        depth=blocks, width=width, num_heads=heads, mlp_hidden=int(state["blocks.0.ffn.fc1.weight"].shape[0]),
        num_classes=int(state["class_emb.weight"].shape[0]) - 1, vocab_size=int(state["head.weight"].shape[0]),
        vae_dim=int(state["word_embed.weight"].shape[1]), scales=_infer_scales(state, name, scales),
        shared_aln="blocks.0.ada_gss" in state, attn_l2_norm=l2)
    buffers = _var_buffers(info)
    check_keys(state, var_manifest(info), name=name, kind=f"VAR-d{blocks} transformer", ignore=tuple(buffers))
    wrong = [k for k, shape in buffers.items() if k in state and tuple(state[k].shape) != shape]
    if wrong:
        raise ConversionError(f"{name}: the buffer {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, not "
                              f"{buffers[wrong[0]]}; this file is not a consistent VAR state dict.")
    nonzero = [k for k in buffers if k.endswith("zero_k_bias") and k in state and np.any(state[k])]
    if nonzero:
        raise ConversionError(f"{name}: {nonzero[0]} is not zero, but VAR's key projection has no bias; this file "
                              "does not come from VAR's models/basic_var.py.")
    return info


def convert_var(state: Mapping[str, np.ndarray], info: VARInfo) -> dict:
    """The transformer's weights as the params of :class:`vqgen.generators.var.VAR` (nested dict
    of float32 arrays)."""
    c, h = info.width, info.num_heads
    hd = c // h

    def linear(key):
        return {"kernel": linear_kernel(state[f"{key}.weight"]), "bias": state[f"{key}.bias"]}

    params: dict[str, Any] = {
        "word_embed": linear("word_embed"), "class_emb": state["class_emb.weight"],
        "pos_start": state["pos_start"][0], "pos_1LC": state["pos_1LC"][0], "lvl_embed": state["lvl_embed.weight"],
        "head_nm": {"ada_lin": linear("head_nm.ada_lin.1")}, "head": linear("head"),
    }
    if info.shared_aln:
        params["shared_ada_lin"] = linear("shared_ada_lin.1")
    for i in range(info.depth):
        b = f"blocks.{i}"
        attn = {
            "mat_qkv": {"kernel": linear_kernel(state[f"{b}.attn.mat_qkv.weight"]).reshape(c, 3, h, hd)},
            "q_bias": state[f"{b}.attn.q_bias"].reshape(h, hd), "v_bias": state[f"{b}.attn.v_bias"].reshape(h, hd),
            "proj": {"kernel": linear_kernel(state[f"{b}.attn.proj.weight"]).reshape(h, hd, c),
                     "bias": state[f"{b}.attn.proj.bias"]},
        }
        if info.attn_l2_norm:
            attn["scale_mul"] = state[f"{b}.attn.scale_mul_1H11"].reshape(h)
        block = {"attn": attn, "ffn": {"fc1": linear(f"{b}.ffn.fc1"), "fc2": linear(f"{b}.ffn.fc2")}}
        if info.shared_aln:
            block["ada_gss"] = state[f"{b}.ada_gss"].reshape(6, c)
        else:
            block["ada_lin"] = linear(f"{b}.ada_lin.1")
        params[f"blocks_{i}"] = block
    return params


# --------------------------------------------------------------------------------- config


def check_pair(vae: VAEInfo, var: VARInfo, vae_name: str = "the VQ-VAE file", var_name: str = "the VAR file") -> None:
    """Raises :class:`ConversionError` unless the transformer models this VQ-VAE's tokens."""
    if (vae.vocab_size, vae.z_channels) != (var.vocab_size, var.vae_dim):
        raise ConversionError(
            f"{vae_name} has {vae.vocab_size} codes of width {vae.z_channels} but {var_name} predicts "
            f"{var.vocab_size} codes of width {var.vae_dim}; pass the VQ-VAE the transformer was trained with.")


def make_config(vae: VAEInfo | None, var: VARInfo | None, scales: Sequence[int], *,
                dtype: str | None = None) -> ml_collections.ConfigDict:
    """The paper config with the sizes of the converted files written over it (locked).

    ``generators/var:d<depth>`` for a transformer (``d16`` for depths without a paper variant),
    ``tokenizers/var_vqvae`` for a VQ-VAE alone. ``dtype`` (``'float32'``/``'bfloat16'``)
    overrides both compute dtypes.
    """
    from vqgen import config_lib  # the configs import the training stack

    if var is not None:
        variant = f"d{var.depth}" if var.depth in PAPER_DEPTHS else "d16"
        config = config_lib.load_config("generators/var", variant)
    else:
        config = config_lib.load_config("tokenizers/var_vqvae")
    scales = tuple(int(s) for s in scales)
    tok = config.tokenizer
    ch_mult = tuple(vae.ch_mult) if vae is not None else tuple(tok.ch_mult)
    image_size = 2 ** (len(ch_mult) - 1) * scales[-1]
    if vae is not None:
        set_fields(tok, ch=vae.ch, ch_mult=ch_mult, num_res_blocks=vae.num_res_blocks, z_channels=vae.z_channels,
             embed_dim=vae.z_channels, quant_conv_kernel=vae.quant_conv_kernel)
        phi = dict(phi_share=vae.phi_share(len(scales)), phi_ratio=tok.quantizer.phi_ratio if vae.phi_count else 0.0)
        set_fields(tok.quantizer, codebook_size=vae.vocab_size, **phi)
    else:
        set_fields(tok, z_channels=var.vae_dim, embed_dim=var.vae_dim)
        set_fields(tok.quantizer, codebook_size=var.vocab_size)
    set_fields(tok, resolution=image_size, attn_resolutions=(scales[-1],))
    set_fields(tok.quantizer, scales=scales)
    set_fields(config.data, image_size=image_size, channels=vae.in_channels if vae is not None else 3)
    if var is not None:
        set_fields(config.data, num_classes=var.num_classes)
        gen = config.generator
        set_fields(gen, depth=var.depth, shared_aln=var.shared_aln, attn_l2_norm=var.attn_l2_norm)
        if var.width != 64 * var.depth:
            set_fields(gen, width=var.width)
        if var.num_heads != var.depth:
            set_fields(gen, num_heads=var.num_heads)
        if var.mlp_hidden != round(4.0 * var.width):
            set_fields(gen, mlp_ratio=var.mlp_hidden / var.width)
        if config.sample.top_k > var.vocab_size:  # VAR's top-k 900 is for 4096 codes
            set_fields(config.sample, top_k=var.vocab_size)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(tok, dtype=dtype)
        if var is not None:
            set_fields(config.generator, dtype=dtype)
    config.lock()
    return config


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config and the params of each model it was given."""

    config: ml_collections.ConfigDict
    scales: tuple[int, ...]
    vae: VAEInfo | None = None
    var: VARInfo | None = None
    tokenizer_params: dict | None = None
    generator_params: dict | None = None


def convert(vae_state: Mapping[str, np.ndarray] | None = None, var_state: Mapping[str, np.ndarray] | None = None, *,
            scales: Sequence[int] | None = None, depth: int | None = None, num_heads: int | None = None,
            dtype: str | None = None, vae_name: str = "the VQ-VAE file", var_name: str = "the VAR file") -> Converted:
    """Checks and converts VAR state dicts (NumPy arrays) into vqgen params and a config; writes nothing.

    Either state dict may be None (a tokenizer-only or generator-only conversion). The scales
    come from ``scales``, else the transformer's file, else VAR's 256px schedule (a VQ-VAE file
    does not store its scales; its ``ema_vocab_hit_SV`` buffer, when present, must have one row
    per scale). Raises :class:`~vqgen.convert.workdir.ConversionError` with one sentence.
    """
    if vae_state is None and var_state is None:
        raise ConversionError("nothing to convert; pass --vae, --var or both.")
    vae = inspect_vae(vae_state, vae_name) if vae_state is not None else None
    var = inspect_var(var_state, var_name, scales=scales, depth=depth, num_heads=num_heads) \
        if var_state is not None else None
    if vae is not None and var is not None:
        check_pair(vae, var, vae_name, var_name)
    final = tuple(var.scales) if var is not None else tuple(int(s) for s in (scales or VAR_SCALES))
    if vae is not None:
        hits = vae_state.get("quantize.ema_vocab_hit_SV")
        if scales is None and var is None and hits is not None and hits.shape[0] != len(final):
            raise ConversionError(f"{vae_name} was used with {hits.shape[0]} scales (its ema_vocab_hit_SV) but VAR's "
                                  f"256px schedule has {len(final)}; pass the scales with --scales.")
    return Converted(
        config=make_config(vae, var, final, dtype=dtype), scales=final, vae=vae, var=var,
        tokenizer_params=convert_vae(vae_state, vae) if vae is not None else None,
        generator_params=convert_var(var_state, var) if var is not None else None)


def convert_files(vae: str | None, var: str | None, out: str, *, mesh=None, **kwargs: Any) -> Converted:
    """Reads the files, converts them (:func:`convert`, which takes ``kwargs``) and writes the
    workdir ``out`` (on ``mesh``, default the config's)."""
    vae_state = load_state_dict(vae, VAE_WRAPPERS) if vae else None
    var_state = load_state_dict(var, VAR_WRAPPERS) if var else None
    converted = convert(vae_state, var_state, vae_name=os.path.basename(vae or "") or "the VQ-VAE file",
                        var_name=os.path.basename(var or "") or "the VAR file", **kwargs)
    write_workdir(converted.config, out, tokenizer_params=converted.tokenizer_params,
                  generator_params=converted.generator_params, mesh=mesh)
    return converted


def _parse_scales(text: str) -> tuple[int, ...]:
    try:
        scales = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales {text!r} is not a comma-separated list of sizes, e.g. 1,2,3,4")
    if not scales or min(scales) < 1:
        raise argparse.ArgumentTypeError(f"--scales {text!r} must list positive sizes, e.g. 1,2,3,4")
    return scales


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m vqgen.convert.var",
        description="Convert VAR's PyTorch VQ-VAE and/or transformer into a vqgen workdir.")
    parser.add_argument("--vae", help="VQ-VAE weights, e.g. vae_ch160v4096z32.pth (.pth or .safetensors)")
    parser.add_argument("--var", help="transformer weights, e.g. var_d16.pth (.pth or .safetensors)")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold checkpoints yet)")
    parser.add_argument("--scales", type=_parse_scales, default=None,
                        help="token map sizes, small to large (default: from the file, else 1,2,3,4,5,6,8,10,13,16)")
    parser.add_argument("--depth", type=int, default=None, help="refuse a transformer of another depth")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="attention heads, needed only for a transformer without l2-normalised attention")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of both models (default: the paper config's bfloat16)")
    args = parser.parse_args(argv)
    if not args.vae and not args.var:
        parser.error("pass --vae, --var or both")
    converted = convert_files(args.vae, args.var, args.out, scales=args.scales, depth=args.depth,
                              num_heads=args.num_heads, dtype=args.dtype)
    parts = []
    if converted.vae is not None:
        v = converted.vae
        parts.append(f"tokenizer (VQ-VAE ch={v.ch}, {v.vocab_size} codes of width {v.z_channels})")
    if converted.var is not None:
        parts.append(f"generator (VAR-d{converted.var.depth}, width {converted.var.width}, "
                     f"{converted.var.num_classes} classes)")
    print(f"wrote {args.out}: {' and '.join(parts)} over the scales {','.join(map(str, converted.scales))}, "
          f"{converted.config.data.image_size}px images")
    return converted


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
