"""Convert the Open-MAGVIT2 and IBQ tokenizers (TencentARC/SEED-Voken) into a vqgen tokenizer workdir.

    python -m vqgen.convert.seed_voken imagenet_256_L.ckpt --out runs/open_magvit2_256_L
    python -m vqgen.convert.seed_voken imagenet_128_L.ckpt --out runs/open_magvit2_128_L --image-size 128
    python -m vqgen.convert.seed_voken pretrain256_262144.ckpt --out runs/open_magvit2_pretrain_262144
    python -m vqgen.convert.seed_voken imagenet256_16384.ckpt --out runs/ibq_16384
    python -m vqgen.convert.seed_voken imagenet256_262144.ckpt --out runs/ibq_262144

The workdir holds ``config.json`` and a step-0 checkpoint of the tokenizer phase
(:mod:`vqgen.convert.workdir`), so ``vqgen.load_tokenizer(out)`` encodes and decodes with it and
``--mode=train_tokenizer`` fine-tunes it.

Which model: the keys say. Open-MAGVIT2 (``src/Open_MAGVIT2/models/lfqgan.py`` and
``lfqgan_pretrain.py``: the ``improved_model`` encoder/decoder with ``mid_block.{k}`` and the
decoder's ``adaptive.{i}`` GroupNorms, lookup-free quantization with no weights of its own) or IBQ
(``src/IBQ/models/ibqgan.py``: the taming-transformers encoder/decoder with ``mid.block_1`` /
``mid.attn_1``, 1x1 ``quant_conv`` / ``post_quant_conv`` and ``quantize.embedding.weight``). Every
size is read from the tensor shapes: ``ch``, the channel multipliers, res blocks, the levels with
attention (IBQ), ``z_channels``, the LFQ bits (``2**bits`` codes) or the IBQ codebook, image channels.
A file of another family (a SEED-Voken autoregressive transformer, LlamaGen's VQ, VAR's VQ-VAE, a
KL autoencoder, an Open-MAGVIT2 video tokenizer) is refused with one sentence saying what it is.
A taming-transformers VQGAN has IBQ's key layout exactly and no EMA weights; it is refused by the
EMA check below, and should be converted with ``python -m vqgen.convert.taming`` (its lookup is
the nearest code, IBQ's the largest dot product).

EMA: the released tokenizers were trained with ``use_ema: True``; the Lightning module then holds
the official ``LitEma`` as ``model_ema``, a buffer ``model_ema.<parameter name without dots>`` per
trainable parameter (``model_ema.encoderconv_inweight`` ...) beside ``model_ema.decay`` and
``model_ema.num_updates``, and the official evaluation swaps them in (``ema_scope``). They are
converted by default; ``--no-ema`` converts the raw weights instead. Asking for EMA weights from a
file without them is refused in one sentence.

Files: a PyTorch Lightning ``.ckpt`` (the weights under ``state_dict``) or a plain state dict, read
with ``torch.load(map_location="cpu", weights_only=True)``. Lightning pickles its own objects beside
the weights (callbacks, hyper-parameters); those are read as inert placeholders that nothing is
built from (:class:`vqgen.convert.workdir.OpaqueObject`, the reader the taming converter uses, not
``add_safe_globals``), so no code named by the file runs, and only the state dict, which must hold
tensors alone, is used. The training loss's weights (``loss.*`` and their EMA copies
``model_ema.loss*``: LPIPS, the discriminator) are not converted. Every other key and its shape
(:func:`manifest`, EMA keys included when the file has them) is checked before anything is written.

Config and mapping:

- Open-MAGVIT2 -> ``configs/tokenizers/open_magvit2.py`` with the file's sizes,
  :class:`~vqgen.tokenizers.vqgan.VQGAN` ``style="magvit2"`` (no quant convs) and a
  :class:`~vqgen.quantizers.lfq.LookupFreeQuantizer` with ``bit_order="lsb"`` (channel ``i`` is
  bit ``i`` of the id, Open-MAGVIT2's own ids) and the official ``entropy_eps=1e-5``.
  ``encoder.down.{i}.block.{j}`` -> ``encoder/down_{i}_block_{j}`` (``norm1``, ``conv1``,
  ``norm2``, ``conv2``, ``nin_shortcut``; the convs have no bias), ``encoder.down.{i}.downsample``
  -> ``down_{i}_downsample/conv``; ``{encoder,decoder}.mid_block.{k}`` -> ``mid_block_{k+1}``;
  ``decoder.adaptive.{i}.{gamma,beta}`` (Linear) -> ``decoder/up_{i}_adaptive/{gamma,beta}``
  (Dense, weight transposed); ``decoder.up.{i}.block.{j}`` -> ``up_{i}_block_{j}``;
  ``decoder.up.{i}.upsample.conv1`` -> ``up_{i}_upsample/conv`` (conv then depth-to-space);
  ``conv_in``, ``norm_out``, ``conv_out`` keep their names.
- IBQ -> ``configs/tokenizers/ibq.py`` (the variant of the file's codebook size when there is one)
  with the file's sizes and an :class:`~vqgen.quantizers.ibq.IndexBackpropQuantizer`; the
  encoder/decoder map as in :mod:`vqgen.convert.taming`, ``quantize.embedding.weight`` ->
  ``quantizer/codebook``.

Convs ``OIHW -> HWIO``, GroupNorm ``weight`` -> ``scale``. ``data.image_size`` is ``--image-size``
(default the config's 256; Open-MAGVIT2's ``imagenet_128_L`` was trained at 128). ``--dtype
float32`` sets the compute dtype (the configs use bfloat16).
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

from vqgen.convert import taming
from vqgen.convert.conv_blocks import Manifest, conv_keys, conv_params, count_indices, norm_keys, norm_params
from vqgen.convert.workdir import (
    ConversionError,
    check_keys,
    linear_kernel,
    oihw_to_hwio,
    read_state_dict,
    set_fields,
    write_workdir,
)

WRAPPERS = (("state_dict",), ("model",))
EMA_PREFIX = "model_ema."
LOSS_PREFIX = "loss."  # Lightning keeps the training loss (LPIPS, discriminator) in the module's state dict
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
# LFQ's constant buffers (not saved by the official code, which registers them non-persistent).
LFQ_BUFFERS = tuple(f"quantize.{b}" for b in ("mask", "pre_mask", "post_mask", "zero", "codebook"))
FAMILIES = ("magvit2", "ibq")
CONFIGS = {"magvit2": "tokenizers/open_magvit2", "ibq": "tokenizers/ibq"}
OFFICIAL_ENTROPY_EPS = 1e-5
NO_EMA = "this checkpoint holds no EMA weights; pass --no-ema to convert the raw weights"


@dataclasses.dataclass(frozen=True)
class SeedVokenInfo:
    """Family and sizes of an Open-MAGVIT2 or IBQ tokenizer state dict, read from its shapes."""

    family: str  # "magvit2" or "ibq"
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]  # IBQ: levels (0 = full resolution) with attention blocks
    in_channels: int
    out_channels: int
    z_channels: int
    embed_dim: int  # LFQ bits (Open-MAGVIT2) or code width (IBQ)
    codebook_size: int
    has_ema: bool = False

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def name(self) -> str:
        if self.family == "magvit2":
            return f"Open-MAGVIT2 tokenizer f{self.downsample} with {self.embed_dim}-bit LFQ"
        return f"IBQ tokenizer f{self.downsample} with {self.codebook_size} codes"

    def vqgan_info(self) -> taming.VQGANInfo:
        """IBQ's autoencoder as the taming VQGAN it is built from."""
        return taming.VQGANInfo(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                                attn_levels=self.attn_levels, in_channels=self.in_channels,
                                out_channels=self.out_channels, z_channels=self.z_channels,
                                embed_dim=self.embed_dim, codebook_size=self.codebook_size)


def ema_key(key: str) -> str:
    """The official ``LitEma`` buffer that holds the EMA of parameter ``key``."""
    return EMA_PREFIX + key.replace(".", "")


def _resblock_keys(out: Manifest, key: str, cin: int, cout: int) -> None:
    """Open-MAGVIT2's ``ResBlock``: bias-free 3x3 convs and 1x1 shortcut."""
    norm_keys(out, f"{key}.norm1", cin)
    out[f"{key}.conv1.weight"] = (cout, cin, 3, 3)
    norm_keys(out, f"{key}.norm2", cout)
    out[f"{key}.conv2.weight"] = (cout, cout, 3, 3)
    if cin != cout:
        out[f"{key}.nin_shortcut.weight"] = (cout, cin, 1, 1)


def magvit2_manifest(info: SeedVokenInfo) -> Manifest:
    """Every weight of the official Open-MAGVIT2 ``VQModel`` (``loss.*`` aside) with these sizes."""
    out: Manifest = {}
    ch, mult, nrb, z = info.ch, info.ch_mult, info.num_res_blocks, info.z_channels
    out["encoder.conv_in.weight"] = (ch, info.in_channels, 3, 3)
    cin = ch
    for i, m in enumerate(mult):
        for j in range(nrb):
            _resblock_keys(out, f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
        if i != len(mult) - 1:
            conv_keys(out, f"encoder.down.{i}.downsample", cin, cin, 3)
    for k in range(nrb):
        _resblock_keys(out, f"encoder.mid_block.{k}", cin, cin)
    norm_keys(out, "encoder.norm_out", cin)
    conv_keys(out, "encoder.conv_out", z, cin, 1)
    conv_keys(out, "decoder.conv_in", cin, z, 3)
    for k in range(nrb):
        _resblock_keys(out, f"decoder.mid_block.{k}", cin, cin)
    for i in reversed(range(len(mult))):
        for part in ("gamma", "beta"):
            out[f"decoder.adaptive.{i}.{part}.weight"] = (cin, z)
            out[f"decoder.adaptive.{i}.{part}.bias"] = (cin,)
        for j in range(nrb):
            _resblock_keys(out, f"decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            conv_keys(out, f"decoder.up.{i}.upsample.conv1", 4 * cin, cin, 3)
    norm_keys(out, "decoder.norm_out", cin)
    conv_keys(out, "decoder.conv_out", info.out_channels, cin, 3)
    return out


def manifest(info: SeedVokenInfo, *, ema: bool | None = None) -> Manifest:
    """Every key of the official model with these sizes and its shape (``loss.*`` aside), with the
    EMA copies when ``ema`` (default: when the file had them)."""
    weights = magvit2_manifest(info) if info.family == "magvit2" else taming.manifest(info.vqgan_info())
    out = dict(weights)
    if info.has_ema if ema is None else ema:
        for key, shape in weights.items():
            out[ema_key(key)] = shape
        out.update({k: () for k in EMA_BUFFERS})
    return out


def _other_family(state: Mapping) -> str | None:
    """What a state dict that is not an Open-MAGVIT2 / IBQ tokenizer is, when recognisable."""
    if any(k.startswith(("transformer.", "first_stage_model.", "cond_stage_model.")) for k in state):
        return ("an autoregressive transformer checkpoint (transformer.*), not a tokenizer; pass the tokenizer's "
                "checkpoint, such as imagenet_256_L.ckpt or imagenet256_16384.ckpt")
    if "encoder.conv_blocks.0.res.0.conv1.weight" in state:
        return "a LlamaGen VQ state dict; convert it with python -m vqgen.convert.llamagen"
    if any(k.startswith("quantize.quant_resi") for k in state):
        return "a VAR VQ-VAE state dict; convert it with python -m vqgen.convert.var"
    if "tok_embeddings.weight" in state or "class_emb.weight" in state:
        return "a transformer state dict, not a tokenizer"
    conv_in = state.get("encoder.conv_in.weight")
    if conv_in is not None and np.ndim(conv_in) == 5:
        return "a video tokenizer (3D convolutions), which this converter does not convert; pass an image tokenizer"
    if "encoder.mid.block_1.conv1.weight" in state and "quantize.embedding.weight" not in state:
        return "an autoencoder without a codebook (a KL autoencoder), not an Open-MAGVIT2 or IBQ tokenizer"
    return None


def family_of(state: Mapping, name: str = "the tokenizer file") -> str:
    """``"magvit2"`` or ``"ibq"`` from the keys; raises :class:`ConversionError` for anything else."""
    other = _other_family(state)
    if other:
        raise ConversionError(f"{name} is {other}.")
    if "encoder.mid_block.0.conv1.weight" in state or "decoder.adaptive.0.gamma.weight" in state:
        return "magvit2"
    if "encoder.mid.block_1.conv1.weight" in state and "quantize.embedding.weight" in state:
        return "ibq"
    shown = ", ".join(sorted(state)[:3])
    raise ConversionError(f"{name} is neither an Open-MAGVIT2 nor an IBQ tokenizer state dict (it has {len(state)} "
                          f"keys such as {shown}); pass a tokenizer checkpoint of TencentARC/SEED-Voken.")


def _sizes(state: Mapping, family: str, name: str) -> SeedVokenInfo:
    need = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.conv_out.weight",
            "decoder.conv_out.weight"] + (["quant_conv.weight"] if family == "ibq" else [])
    missing = [k for k in need if k not in state]
    if missing:
        kind = "an Open-MAGVIT2" if family == "magvit2" else "an IBQ"
        raise ConversionError(f"{name} is not {kind} tokenizer state dict: it lacks {', '.join(missing)} (it has "
                              f"{len(state)} keys such as {', '.join(sorted(state)[:3])}).")
    ch, in_channels = (int(n) for n in state["encoder.conv_in.weight"].shape[:2])
    levels = count_indices(state, r"^encoder\.down\.(\d+)\.")
    ch_mult = []
    for i in range(levels):
        key = f"encoder.down.{i}.block.0.conv1.weight"
        ch_mult.append(max(int(state[key].shape[0]) // ch, 1) if key in state else 1)
    z = int(state["encoder.conv_out.weight"].shape[0])
    nrb = count_indices(state, r"^encoder\.down\.0\.block\.(\d+)\.")
    common = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=nrb,
                  in_channels=in_channels, out_channels=int(state["decoder.conv_out.weight"].shape[0]), z_channels=z,
                  has_ema=any(k.startswith(EMA_PREFIX) for k in state))
    if family == "magvit2":
        info = SeedVokenInfo(family=family, attn_levels=(), embed_dim=z, codebook_size=2**z, **common)
    else:
        enc_attn = tuple(i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state)
        dec_attn = tuple(i for i in range(levels) if f"decoder.up.{i}.attn.0.q.weight" in state)
        if enc_attn != dec_attn:
            raise ConversionError(f"{name} has attention at encoder levels {enc_attn} but decoder levels {dec_attn}, "
                                  "which vqgen's VQGAN (one attn_resolutions for both) does not build; this is not "
                                  "an IBQ tokenizer.")
        codebook = state["quantize.embedding.weight"]
        info = SeedVokenInfo(family=family, attn_levels=enc_attn, embed_dim=int(codebook.shape[-1]),
                             codebook_size=int(codebook.shape[0]), **common)
    if info.out_channels != info.in_channels:
        raise ConversionError(f"{name} reads {info.in_channels}-channel images but writes {info.out_channels}, which "
                              "vqgen's tokenizers do not; pass an image tokenizer (in_channels == out_ch).")
    return info


def _ignored(key: str, family: str) -> bool:
    """Keys that are not the tokenizer's: the training loss and its EMA copies, LFQ's constants."""
    if key.startswith((LOSS_PREFIX, EMA_PREFIX + "loss")):
        return True
    return family == "magvit2" and key in LFQ_BUFFERS


def inspect(state: Mapping[str, np.ndarray], name: str = "the tokenizer file", *, use_ema: bool = True
            ) -> SeedVokenInfo:
    """The family and sizes of an Open-MAGVIT2 / IBQ state dict; raises :class:`ConversionError`
    unless every expected key (EMA copies included when the file has any) is there with its shape
    and nothing else (besides ``loss.*``), or when ``use_ema`` and the file has no EMA weights."""
    family = family_of(state, name)
    info = _sizes(state, family, name)
    expected = manifest(info)
    check_keys({k: v for k, v in state.items() if not _ignored(k, family)}, expected, name=name,
               kind=f"SeedVoken {info.name}")
    weights = manifest(info, ema=False)
    if len({ema_key(k) for k in weights}) != len(weights):  # two names that differ only in their dots
        raise ConversionError(f"{name} has parameter names whose EMA copies cannot be told apart once their dots are "
                              "removed; pass --no-ema to convert the raw weights.")
    if use_ema and not info.has_ema:
        hint = (" (a taming-transformers VQGAN has IBQ's keys and no EMA weights: convert one with python -m "
                "vqgen.convert.taming)") if family == "ibq" else ""
        raise ConversionError(f"{name}: {NO_EMA}{hint}.")
    return info


def select_weights(state: Mapping[str, np.ndarray], info: SeedVokenInfo, use_ema: bool) -> dict[str, np.ndarray]:
    """The tokenizer's weights under their official parameter names: the EMA copies or the raw ones."""
    keys = manifest(info, ema=False)
    return {k: state[ema_key(k) if use_ema else k] for k in keys}


def _kernel(state: Mapping[str, np.ndarray], key: str) -> dict:
    return {"kernel": oihw_to_hwio(state[f"{key}.weight"])}


def _resblock_params(state: Mapping[str, np.ndarray], key: str) -> dict:
    out = {"norm1": norm_params(state, f"{key}.norm1"), "conv1": _kernel(state, f"{key}.conv1"),
           "norm2": norm_params(state, f"{key}.norm2"), "conv2": _kernel(state, f"{key}.conv2")}
    if f"{key}.nin_shortcut.weight" in state:
        out["nin_shortcut"] = _kernel(state, f"{key}.nin_shortcut")
    return out


def _dense(state: Mapping[str, np.ndarray], key: str) -> dict:
    return {"kernel": linear_kernel(state[f"{key}.weight"]), "bias": state[f"{key}.bias"]}


def magvit2_params(state: Mapping[str, np.ndarray], info: SeedVokenInfo) -> dict:
    """Open-MAGVIT2's weights as the params of ``VQGAN(style="magvit2")`` (nested dict of float32 arrays)."""
    conv, norm = functools.partial(conv_params, state), functools.partial(norm_params, state)
    last = len(info.ch_mult) - 1
    enc = {"conv_in": _kernel(state, "encoder.conv_in"), "norm_out": norm("encoder.norm_out"),
           "conv_out": conv("encoder.conv_out")}
    dec = {"conv_in": conv("decoder.conv_in"), "norm_out": norm("decoder.norm_out"),
           "conv_out": conv("decoder.conv_out")}
    for part, tree in (("encoder", enc), ("decoder", dec)):
        for k in range(info.num_res_blocks):
            tree[f"mid_block_{k + 1}"] = _resblock_params(state, f"{part}.mid_block.{k}")
    for i in range(len(info.ch_mult)):
        for j in range(info.num_res_blocks):
            enc[f"down_{i}_block_{j}"] = _resblock_params(state, f"encoder.down.{i}.block.{j}")
            dec[f"up_{i}_block_{j}"] = _resblock_params(state, f"decoder.up.{i}.block.{j}")
        if i != last:
            enc[f"down_{i}_downsample"] = {"conv": conv(f"encoder.down.{i}.downsample")}
        if i != 0:
            dec[f"up_{i}_upsample"] = {"conv": conv(f"decoder.up.{i}.upsample.conv1")}
        dec[f"up_{i}_adaptive"] = {p: _dense(state, f"decoder.adaptive.{i}.{p}") for p in ("gamma", "beta")}
    return {"encoder": enc, "decoder": dec}


def convert_params(weights: Mapping[str, np.ndarray], info: SeedVokenInfo) -> dict:
    """The tokenizer's weights (official names, :func:`select_weights`) as vqgen params."""
    if info.family == "magvit2":
        return magvit2_params(weights, info)
    return taming.convert_params(weights, info.vqgan_info())


def _lfq_groups(dim: int, current: int) -> int:
    """The config's LFQ ``num_groups`` when it divides ``dim``, else the fewest groups of <= 18 bits."""
    from vqgen.quantizers.lfq import MAX_GROUP_BITS

    if current >= 1 and dim % current == 0 and dim // current <= MAX_GROUP_BITS:
        return current
    return min(g for g in range(1, dim + 1) if dim % g == 0 and dim // g <= MAX_GROUP_BITS)


def make_config(info: SeedVokenInfo, image_size: int | None = None, *, dtype: str | None = None
                ) -> tuple[ml_collections.ConfigDict, str]:
    """The family's config with the file's sizes written over it (locked), and its name."""
    from vqgen import config_lib  # the configs import the training stack

    spec = CONFIGS[info.family]
    if info.family == "ibq" and str(info.codebook_size) in config_lib.load_config_module(spec).VARIANTS:
        spec = f"{spec}:{info.codebook_size}"
    base = config_lib.load_config(spec)
    tok = base.tokenizer
    resolution = int(tok.resolution)
    set_fields(tok, ch=info.ch, ch_mult=info.ch_mult, num_res_blocks=info.num_res_blocks, z_channels=info.z_channels,
         embed_dim=info.embed_dim, attn_resolutions=tuple(resolution // 2**i for i in info.attn_levels))
    if info.family == "magvit2":
        set_fields(tok, style="magvit2", use_quant_conv=False)
        set_fields(tok.quantizer, dim=info.embed_dim, bit_order="lsb", entropy_eps=OFFICIAL_ENTROPY_EPS,
             num_groups=_lfq_groups(info.embed_dim, int(tok.quantizer.num_groups)))
    else:
        set_fields(tok, style="taming", use_quant_conv=True)
        set_fields(tok.quantizer, codebook_size=info.codebook_size)
    size = int(image_size or base.data.image_size)
    if size % info.downsample:
        raise ConversionError(f"the image size {size} is not a multiple of the tokenizer's downsampling "
                              f"{info.downsample}; pass --image-size as a multiple of {info.downsample}.")
    set_fields(base.data, image_size=size, channels=info.in_channels)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(tok, dtype=dtype)
    base.lock()
    return base, spec


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config, its name, the sizes, whether EMA weights were taken,
    and the tokenizer params."""

    config: ml_collections.ConfigDict
    config_name: str
    info: SeedVokenInfo
    ema: bool
    tokenizer_params: dict


def convert(state: Mapping[str, np.ndarray], *, use_ema: bool = True, image_size: int | None = None,
            dtype: str | None = None, name: str = "the tokenizer file") -> Converted:
    """Checks and converts an Open-MAGVIT2 / IBQ state dict (NumPy arrays); writes nothing. Raises
    :class:`~vqgen.convert.workdir.ConversionError` with one sentence."""
    info = inspect(state, name, use_ema=use_ema)
    cfg, spec = make_config(info, image_size, dtype=dtype)
    params = convert_params(select_weights(state, info, use_ema), info)
    return Converted(config=cfg, config_name=spec, info=info, ema=use_ema, tokenizer_params=params)


def read(path: str) -> dict[str, np.ndarray]:
    """The state dict of a SeedVoken checkpoint (Lightning ``.ckpt`` or plain), its other entries never built."""
    return read_state_dict(path, WRAPPERS, opaque_objects=True)[0]


def convert_files(ckpt: str, out: str, *, mesh=None, **kwargs: Any) -> Converted:
    """Reads ``ckpt``, converts it (:func:`convert`, which takes ``kwargs``) and writes the workdir ``out``."""
    converted = convert(read(ckpt), name=os.path.basename(ckpt), **kwargs)
    write_workdir(converted.config, out, tokenizer_params=converted.tokenizer_params, mesh=mesh)
    return converted


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m vqgen.convert.seed_voken",
                                     description="Convert an Open-MAGVIT2 or IBQ tokenizer (TencentARC/SEED-Voken) "
                                                 "into a vqgen tokenizer workdir.")
    parser.add_argument("ckpt", help="the tokenizer's checkpoint, e.g. imagenet_256_L.ckpt or imagenet256_16384.ckpt")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold a tokenizer yet)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="convert the raw weights instead of the EMA weights (model_ema.*)")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: the config's 256)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the config's bfloat16)")
    args = parser.parse_args(argv)
    converted = convert_files(args.ckpt, args.out, use_ema=args.use_ema, image_size=args.image_size, dtype=args.dtype)
    info, cfg = converted.info, converted.config
    grid = cfg.data.image_size // info.downsample
    print(f"wrote {args.out}: tokenizer ({info.name}, ch {info.ch}, {'EMA' if converted.ema else 'raw'} weights) for "
          f"{cfg.data.image_size}px images ({grid}x{grid} tokens), config {converted.config_name} with the sizes of "
          "the file")
    return converted


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
