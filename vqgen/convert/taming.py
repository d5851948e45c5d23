"""Convert taming-transformers' VQGAN (CompVis/taming-transformers) into a vqgen tokenizer workdir.

    python -m vqgen.convert.taming --ckpt vqgan_imagenet_f16_1024/checkpoints/last.ckpt --out runs/taming_f16_1024
    python -m vqgen.convert.taming --ckpt vqgan_imagenet_f16_16384/checkpoints/last.ckpt --out runs/taming_f16_16384

The workdir holds ``config.json`` and a step-0 checkpoint of the tokenizer phase
(:mod:`vqgen.convert.workdir`), so ``vqgen.load_tokenizer(out)`` encodes and decodes with it and
``--mode=train_tokenizer`` fine-tunes it. A generator over its codes can be trained into the same
workdir with a config whose tokenizer section is the one written here.

Config: ``configs/tokenizers/llamagen_vq16.py`` (the taming-style VQGAN section; LlamaGen's VQ is
taming's autoencoder with 1x1 quant convs), or the config named by ``--config``, with every size
read from the tensor shapes written over it: ``ch``, channel multipliers, res blocks, the levels
that have attention (``attn_resolutions``, counted from the config's ``resolution``),
``z_channels``, codebook size and width, image channels; the lookup is the plain Euclidean one
(``l2_normalize=False``, as taming's ``VectorQuantizer2``). ``data.image_size`` is ``--image-size``
(default the config's 256, at which the f16 releases have 16x16 tokens). ``--dtype float32`` sets
the compute dtype (the config uses bfloat16).

Files: a PyTorch Lightning ``.ckpt`` (the weights under ``state_dict``) or a plain state dict,
read with ``torch.load(map_location="cpu", weights_only=True)``. Lightning pickles its own objects
beside the weights (callbacks keyed by class, hyper-parameters); those are read as inert
placeholders that nothing is built from (:class:`vqgen.convert.workdir.OpaqueObject`), so no code
named by the file runs, and only the state dict, which must hold tensors alone, is used. The
training loss's weights (``loss.*``: LPIPS and the discriminator) are not converted. Every other
key and its shape (:func:`manifest`) is checked before anything is written; a file of another
family (LlamaGen's VQ, VAR's VQ-VAE, a Gumbel-quantized or KL autoencoder, a transformer) is
refused with one sentence saying what it is.

Mapping (PyTorch -> :class:`vqgen.tokenizers.vqgan.VQGAN` with ``style="taming"``; convs
``OIHW -> HWIO``, GroupNorm ``weight`` -> ``scale``):

- ``encoder.down.{i}.block.{j}`` -> ``encoder/down_{i}_block_{j}``, ``.attn.{j}`` ->
  ``down_{i}_attn_{j}``, ``.downsample.conv`` -> ``down_{i}_downsample/conv``; ``decoder.up.{i}.*``
  -> ``decoder/up_{i}_*`` (``i`` counts levels from full resolution in both, as in taming).
- ``{encoder,decoder}.mid.block_1/attn_1/block_2`` keep their names (``mid_block_1`` ...);
  ``AttnBlock.q/k/v/proj_out`` keep theirs; ``norm_out``, ``conv_in``, ``conv_out`` too.
- ``quant_conv``, ``post_quant_conv`` (1x1) keep their names; ``quantize.embedding.weight`` ->
  ``quantizer/codebook``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
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
from vqgen.convert.workdir import ConversionError, check_keys, read_state_dict, set_fields, write_workdir

WRAPPERS = (("state_dict",), ("model",))
LOSS_PREFIX = "loss."  # Lightning keeps the training loss (LPIPS, discriminator) in the module's state dict
BASE_CONFIG = "tokenizers/llamagen_vq16"


@dataclasses.dataclass(frozen=True)
class VQGANInfo:
    """Sizes of a taming VQGAN state dict, read from its shapes."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # levels (0 = full resolution) with attention blocks
    in_channels: int
    out_channels: int
    z_channels: int
    embed_dim: int
    codebook_size: int

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def name(self) -> str:
        return f"VQGAN f{self.downsample} with {self.codebook_size} codes"


def manifest(info: VQGANInfo) -> dict[str, tuple[int, ...]]:
    """Every autoencoder key of the official ``VQModel`` with these sizes, and its shape."""
    out: dict[str, tuple[int, ...]] = {}
    ch, mult, nrb = info.ch, info.ch_mult, info.num_res_blocks
    last = len(mult) - 1
    conv_keys(out, "encoder.conv_in", ch, info.in_channels, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            resnet_keys(out, f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i in info.attn_levels:
                attn_keys(out, f"encoder.down.{i}.attn.{j}", cin)
        if i != last:
            conv_keys(out, f"encoder.down.{i}.downsample.conv", cin, cin, 3)
    for part in ("encoder", "decoder"):
        top = ch * mult[-1]
        resnet_keys(out, f"{part}.mid.block_1", top, top)
        attn_keys(out, f"{part}.mid.attn_1", top)
        resnet_keys(out, f"{part}.mid.block_2", top, top)
    norm_keys(out, "encoder.norm_out", cin)
    conv_keys(out, "encoder.conv_out", info.z_channels, cin, 3)
    conv_keys(out, "decoder.conv_in", cin, info.z_channels, 3)
    for i in reversed(range(len(mult))):
        for j in range(nrb + 1):
            resnet_keys(out, f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
            if i in info.attn_levels:
                attn_keys(out, f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv_keys(out, f"decoder.up.{i}.upsample.conv", cin, cin, 3)
    norm_keys(out, "decoder.norm_out", cin)
    conv_keys(out, "decoder.conv_out", info.out_channels, cin, 3)
    conv_keys(out, "quant_conv", info.embed_dim, info.z_channels, 1)
    conv_keys(out, "post_quant_conv", info.z_channels, info.embed_dim, 1)
    out["quantize.embedding.weight"] = (info.codebook_size, info.embed_dim)
    return out


def _other_family(state: Mapping) -> str | None:
    """What a state dict that is not a taming VQGAN autoencoder is, when recognisable."""
    if "encoder.conv_blocks.0.res.0.conv1.weight" in state:
        return "a LlamaGen VQ state dict; convert it with python -m vqgen.convert.llamagen"
    if any(k.startswith("quantize.quant_resi") for k in state) or "encoder.down.0.attn.0.qkv.weight" in state:
        return "a VAR VQ-VAE state dict; convert it with python -m vqgen.convert.var"
    if "quantize.proj.weight" in state or "quantize.embed.weight" in state:
        return "a Gumbel-quantized VQGAN (quantize.proj, quantize.embed), which vqgen does not convert"
    if "quantize.used" in state:
        return ("a VQGAN with remapped code indices (quantize.used), which vqgen does not convert; pass a model "
                "trained without remap")
    if "encoder.conv_in.weight" in state and "quantize.embedding.weight" not in state:
        return "an autoencoder without a codebook (a KL autoencoder), which vqgen's VQ converters do not convert"
    if any(k.startswith(("transformer.", "first_stage_model.")) for k in state):
        return ("a taming-transformers Net2NetTransformer (a transformer over VQGAN codes), not the VQGAN; pass the "
                "VQGAN's own checkpoint")
    if "tok_embeddings.weight" in state or "class_emb.weight" in state:
        return "a transformer state dict, not a VQGAN"
    return None


def inspect(state: Mapping[str, np.ndarray], name: str = "the VQGAN file") -> VQGANInfo:
    """The sizes of a taming VQGAN state dict; raises :class:`ConversionError` unless every expected
    autoencoder key is there with its shape and nothing else (besides the ``loss.*`` weights)."""
    other = _other_family(state)
    if other:
        raise ConversionError(f"{name} is {other}.")
    need = ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.conv_out.weight",
            "decoder.conv_out.weight", "quant_conv.weight", "quantize.embedding.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"{name} is not a taming-transformers VQGAN state dict: it lacks {', '.join(missing)} "
                              f"(it has {len(state)} keys such as {', '.join(sorted(state)[:3])}).")
    ch, in_channels = (int(n) for n in state["encoder.conv_in.weight"].shape[:2])
    levels = count_indices(state, r"^encoder\.down\.(\d+)\.")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        ch_mult.append(max(int(state[key].shape[0]) // ch, 1) if key in state else 1)
    enc_attn = tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
    dec_attn = tuple(i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state)
    if enc_attn != dec_attn:
        raise ConversionError(f"{name} has attention at encoder levels {enc_attn} but decoder levels {dec_attn}, which "
                              "vqgen's VQGAN (one attn_resolutions for both) does not build; this is not a "
                              "taming-transformers VQGAN.")
    codebook = state["quantize.embedding.weight"]
    info = VQGANInfo(
        ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=count_indices(state, r"^encoder\.down\.0\.block\.(\d+)\."),
        attn_levels=enc_attn, in_channels=in_channels, out_channels=int(state["decoder.conv_out.weight"].shape[0]),
        z_channels=int(state["encoder.conv_out.weight"].shape[0]),
        embed_dim=int(codebook.shape[1]) if codebook.ndim == 2 else -1, codebook_size=int(codebook.shape[0]))
    if info.out_channels != info.in_channels:
        raise ConversionError(f"{name} reads {info.in_channels}-channel images but writes {info.out_channels}, which "
                              "vqgen's tokenizers do not; pass an image VQGAN (in_channels == out_ch).")
    weights = {k: v for k, v in state.items() if not k.startswith(LOSS_PREFIX)}
    check_keys(weights, manifest(info), name=name, kind=f"taming-transformers {info.name}")
    return info


def convert_params(state: Mapping[str, np.ndarray], info: VQGANInfo) -> dict:
    """The VQGAN's weights as the params of the :class:`~vqgen.tokenizers.vqgan.VQGAN` the config
    builds (nested dict of float32 arrays)."""
    conv, norm = functools.partial(conv_params, state), functools.partial(norm_params, state)
    resnet, attn = functools.partial(resnet_params, state), functools.partial(attn_params, state)
    last = len(info.ch_mult) - 1
    enc = {"conv_in": conv("encoder.conv_in"), "norm_out": norm("encoder.norm_out"),
           "conv_out": conv("encoder.conv_out")}
    dec = {"conv_in": conv("decoder.conv_in"), "norm_out": norm("decoder.norm_out"),
           "conv_out": conv("decoder.conv_out")}
    for part, tree in (("encoder", enc), ("decoder", dec)):
        tree.update(mid_block_1=resnet(f"{part}.mid.block_1"), mid_attn_1=attn(f"{part}.mid.attn_1"),
                    mid_block_2=resnet(f"{part}.mid.block_2"))
    for i in range(len(info.ch_mult)):
        for j in range(info.num_res_blocks):
            enc[f"down_{i}_block_{j}"] = resnet(f"encoder.down.{i}.block.{j}")
            if i in info.attn_levels:
                enc[f"down_{i}_attn_{j}"] = attn(f"encoder.down.{i}.attn.{j}")
        if i != last:
            enc[f"down_{i}_downsample"] = {"conv": conv(f"encoder.down.{i}.downsample.conv")}
        for j in range(info.num_res_blocks + 1):
            dec[f"up_{i}_block_{j}"] = resnet(f"decoder.up.{i}.block.{j}")
            if i in info.attn_levels:
                dec[f"up_{i}_attn_{j}"] = attn(f"decoder.up.{i}.attn.{j}")
        if i != 0:
            dec[f"up_{i}_upsample"] = {"conv": conv(f"decoder.up.{i}.upsample.conv")}
    return {"encoder": enc, "decoder": dec, "quant_conv": conv("quant_conv"),
            "post_quant_conv": conv("post_quant_conv"), "quantizer": {"codebook": state["quantize.embedding.weight"]}}


def make_config(info: VQGANInfo, image_size: int | None = None, *, dtype: str | None = None,
                config: str | None = None, name: str = "the VQGAN file") -> tuple[ml_collections.ConfigDict, str]:
    """The base config (``config``, default :data:`BASE_CONFIG`) with the file's sizes written over
    it (locked), and its name; a ``config`` whose tokenizer is not a taming-style VQGAN is refused."""
    from vqgen import config_lib  # the configs import the training stack

    spec = config or BASE_CONFIG
    base = config_lib.load_config(spec)
    tok = base.get("tokenizer")
    if tok is None or (tok.get("arch"), tok.get("style"), tok.quantizer.get("type")) != ("vqgan", "taming", "vq"):
        raise ConversionError(f"--config {spec} has no taming-style VQGAN tokenizer with a plain VQ, so it cannot "
                              f"describe {name} ({info.name}); pass a config with one or drop --config.")
    if config:
        want = (int(tok.ch), tuple(int(m) for m in tok.ch_mult), int(tok.quantizer.codebook_size))
        if want != (info.ch, info.ch_mult, info.codebook_size):
            raise ConversionError(
                f"{name} is a taming-transformers {info.name} (ch {info.ch}, multipliers {info.ch_mult}) but "
                f"--config {spec} describes ch {want[0]}, multipliers {want[1]}, {want[2]} codes; pass the matching "
                "file or config, or drop --config.")
    resolution = int(tok.resolution)
    set_fields(tok, ch=info.ch, ch_mult=info.ch_mult, num_res_blocks=info.num_res_blocks, z_channels=info.z_channels,
         embed_dim=info.embed_dim, attn_resolutions=tuple(resolution // 2**i for i in info.attn_levels),
         use_quant_conv=True)
    if "quant_conv_kernel" in tok:
        set_fields(tok, quant_conv_kernel=1)
    set_fields(tok.quantizer, codebook_size=info.codebook_size, l2_normalize=False)
    size = int(image_size or base.data.image_size)
    if size % info.downsample:
        raise ConversionError(f"the image size {size} is not a multiple of the VQGAN's downsampling {info.downsample}; "
                              f"pass --image-size as a multiple of {info.downsample}.")
    set_fields(base.data, image_size=size, channels=info.in_channels)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(tok, dtype=dtype)
    base.lock()
    return base, spec


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config, its name, the sizes and the tokenizer params."""

    config: ml_collections.ConfigDict
    config_name: str
    info: VQGANInfo
    tokenizer_params: dict


def convert(state: Mapping[str, np.ndarray], *, image_size: int | None = None, dtype: str | None = None,
            config: str | None = None, name: str = "the VQGAN file") -> Converted:
    """Checks and converts a taming VQGAN state dict (NumPy arrays); writes nothing. Raises
    :class:`~vqgen.convert.workdir.ConversionError` with one sentence."""
    info = inspect(state, name)
    cfg, spec = make_config(info, image_size, dtype=dtype, config=config, name=name)
    return Converted(config=cfg, config_name=spec, info=info, tokenizer_params=convert_params(state, info))


def read(path: str) -> dict[str, np.ndarray]:
    """The state dict of a taming checkpoint (Lightning ``.ckpt`` or plain), its other entries never built."""
    return read_state_dict(path, WRAPPERS, opaque_objects=True)[0]


def convert_files(ckpt: str, out: str, *, mesh=None, **kwargs: Any) -> Converted:
    """Reads ``ckpt``, converts it (:func:`convert`, which takes ``kwargs``) and writes the workdir ``out``."""
    converted = convert(read(ckpt), name=os.path.basename(ckpt), **kwargs)
    write_workdir(converted.config, out, tokenizer_params=converted.tokenizer_params, mesh=mesh)
    return converted


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m vqgen.convert.taming",
                                     description="Convert a taming-transformers VQGAN into a vqgen tokenizer workdir.")
    parser.add_argument("--ckpt", required=True, help="the VQGAN's checkpoint, e.g. last.ckpt (.ckpt, .pt or "
                                                      ".safetensors)")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold a tokenizer yet)")
    parser.add_argument("--config", default=None, help=f"base config (default {BASE_CONFIG}); a config of another "
                                                       "size is refused")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: the config's 256)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the config's bfloat16)")
    args = parser.parse_args(argv)
    converted = convert_files(args.ckpt, args.out, image_size=args.image_size, dtype=args.dtype, config=args.config)
    info, cfg = converted.info, converted.config
    grid = cfg.data.image_size // info.downsample
    print(f"wrote {args.out}: tokenizer (taming-transformers {info.name} of width {info.embed_dim}, ch {info.ch}) for "
          f"{cfg.data.image_size}px images ({grid}x{grid} tokens), config {converted.config_name} with the sizes of "
          "the file")
    return converted


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
