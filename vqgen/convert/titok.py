"""Convert TiTok's released PyTorch tokenizers (bytedance/1d-tokenizer) into a vqgen workdir.

    python -m vqgen.convert.titok tokenizer_titok_l32.bin --out runs/titok_l32
    python -m vqgen.convert.titok tokenizer_titok_b64.bin --out runs/titok_b64
    python -m vqgen.convert.titok tokenizer_titok_s128.bin --out runs/titok_s128
    python -m vqgen.convert.titok model.safetensors --out runs/titok_l32   # the hub's yucornetto/tokenizer_titok_l32_imagenet
    python -m vqgen.convert.titok tokenizer_titok_bl64_vq8k.bin --out runs/titok_bl64_vq8k   # single stage

The workdir holds ``config.json`` and a step-0 tokenizer checkpoint (:mod:`vqgen.convert.workdir`),
so ``vqgen.load_tokenizer(out)`` uses it as if vqgen had trained it, and
``--mode=train_tokenizer`` on it fine-tunes the converted weights.

Files: ``torch.load(map_location="cpu", weights_only=True)`` of the state dict of
``modeling/titok.py`` ``TiTok`` (``tokenizer_titok_*.bin`` of ``fun-research/TiTok``, or a plain
``{"state_dict": ...}`` / ``{"model": ...}`` wrapper), or the ``model.safetensors`` that the hub's
``TiTok.from_pretrained`` repositories hold. Every expected key and shape is checked before
anything is written (:func:`titok_manifest`); the buffer ``quantize.embed_prob`` of "clustering
VQ" training is accepted and not converted. A file of another kind (TiTok's generator, a TiTok VAE,
TA-TiTok, a convolutional VQGAN, a truncated file) is refused with one sentence.

Config: ``configs/tokenizers/titok.py:<variant>`` (``L-32``, ``B-64``, ``S-128`` for the
two-stage releases, ``BL-64-VQ`` for the single-stage ones; the nearest of the two layouts for
other sizes) with every size read from the shapes written over it, plus
``tokenizer.pixel_range="unit"``. Read from the shapes: image channels, patch size and image size
(the encoder's position embedding holds ``1 + (H/p)^2`` rows), latent tokens, token size,
codebook size, each transformer's width, depth and MLP width, the decoder head (``decoder.ffn.2``:
the proxy-code head of the two-stage models, else pixels), the proxy codebook and, under the
proxy head, the MaskGIT VQGAN decoder's filters, multipliers and res blocks. Not in the file:
the attention heads (PyTorch's ``nn.MultiheadAttention`` keeps one ``[3D, D]`` projection), which
are ``width / 64`` as in all three official sizes (512/8, 768/12, 1024/16) unless
``--enc-heads`` / ``--dec-heads`` say otherwise; and the l2 normalisation of the lookup, which
the official configs tie to the layout (on for the two-stage, proxy-code models, off for the
single-stage VQ8k ones) unless ``--l2-norm`` / ``--no-l2-norm`` say otherwise. The official
``is_legacy`` switch sets both the decoder head and the encoder's token layout, so
``legacy_token_layout`` follows the head. ``--dtype float32`` sets the compute dtype (the
paper configs use bfloat16).

Pixel range: TiTok reads and writes images in [0, 1] (its demo divides uint8 images by 255 and
clamps the reconstruction to [0, 1]). The weights are converted as released and the config sets
``tokenizer.pixel_range="unit"``: the network sees ``(x + 1) / 2`` of vqgen's [-1, 1] images and
its output ``y`` comes back as ``2 y - 1``.

Mapping (PyTorch -> :class:`vqgen.tokenizers.vit.TiTok`; linears transposed to ``[in, out]``,
convs ``OIHW -> HWIO``, 1x1 convs on the token grid as Dense kernels ``[in, out]``):

- ``latent_tokens`` -> ``latent_tokens``; ``encoder.patch_embed`` -> ``encoder/patch_embed``;
  ``{encoder,decoder}.{class_embedding, positional_embedding, latent_token_positional_embedding}``
  keep their names, ``decoder.mask_token`` too; ``ln_pre``, ``ln_post`` (``weight -> scale``).
- ``{encoder,decoder}.transformer.{i}`` -> ``transformer_{i}``: ``ln_1``, ``ln_2``;
  ``attn.in_proj_weight [3D, D]`` / ``in_proj_bias`` split by rows into ``attn/q``, ``attn/k``,
  ``attn/v``; ``attn.out_proj`` -> ``attn/out``; ``mlp.c_fc``, ``mlp.c_proj`` -> ``c_fc``, ``c_proj``.
- ``encoder.conv_out`` (1x1, applied after the legacy ``[B, N, D] -> [B, D, N, 1]`` memory reshape,
  which ``legacy_token_layout`` reproduces) -> ``encoder/conv_out``; ``decoder.decoder_embed`` ->
  ``decoder/decoder_embed``.
- Proxy-code head: ``decoder.ffn.0`` / ``decoder.ffn.2`` (1x1 convs, tanh between) ->
  ``decoder/ffn_0`` / ``decoder/ffn_2``; ``pixel_quantize.embedding.weight`` -> ``pixel_codebook``;
  ``pixel_decoder`` (MaskGIT's VQGAN decoder as ``modeling/modules/maskgit_vqgan.py`` ports it) ->
  ``pixel_decoder`` (:class:`vqgen.tokenizers.vqgan.Decoder`, ``style="maskgit"``): ``conv_in``,
  ``mid.{k}`` -> ``mid_block_{k+1}``, ``up.{i}.block.{j}`` -> ``up_{i}_block_{j}`` (``i`` counts
  levels from full resolution in both), ``up.{i}.upsample_conv`` -> ``up_{i}_upsample/conv``,
  ``norm_out``, ``conv_out``; in a block ``norm1/2``, ``conv1/2`` (no biases) and the 1x1
  ``nin_shortcut`` (applied to the branch output, as ``shortcut_from_output`` does).
- Pixel head: ``decoder.ffn.0`` (1x1 to ``p*p*3``, channels ``(p1, p2, c)``, the order of
  vqgen's depth-to-space) -> ``decoder/ffn_0``; ``decoder.conv_out`` (3x3) -> ``decoder/conv_out``.
- ``quantize.embedding.weight`` -> ``quantizer/codebook``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from vqgen.convert.conv_blocks import conv_keys, count_indices, norm_keys, norm_params
from vqgen.convert.workdir import (
    ConversionError,
    check_keys,
    linear_kernel,
    load_state_dict,
    oihw_to_hwio,
    set_fields,
    write_workdir,
)

CONFIG = "tokenizers/titok"
HEAD_WIDTH = 64  # every official TiTok size has 64-wide attention heads (512/8, 768/12, 1024/16)
BUFFERS = ("quantize.embed_prob",)  # clustering VQ's usage statistics (training only)
WRAPPERS = (("state_dict",), ("model",))
# configs/tokenizers/titok.py variants: (enc width, enc depth, dec width, dec depth, tokens, token size, codes, head)
PAPER = {
    "L-32": (1024, 24, 1024, 24, 32, 12, 4096, "proxy_codes"),
    "B-64": (768, 12, 768, 12, 64, 12, 4096, "proxy_codes"),
    "S-128": (512, 8, 512, 8, 128, 12, 4096, "proxy_codes"),
    "BL-64-VQ": (768, 12, 1024, 24, 64, 64, 8192, "pixels"),
}
# Defaults of vqgen's TiTok under the proxy-code head (the official MaskGIT VQGAN decoder).
PROXY_DEFAULTS = dict(proxy_codebook_size=1024, proxy_code_dim=256, pixel_decoder_ch=128,
                      pixel_decoder_ch_mult=(1, 1, 2, 2, 4), pixel_decoder_num_res_blocks=2)


@dataclasses.dataclass(frozen=True)
class TiTokInfo:
    """Sizes of a TiTok state dict, read from its shapes (heads and l2 from the rules above)."""

    in_channels: int
    image_size: int
    patch_size: int
    num_latent_tokens: int
    token_size: int
    codebook_size: int
    enc_width: int
    enc_depth: int
    enc_mlp_dim: int
    enc_heads: int
    dec_width: int
    dec_depth: int
    dec_mlp_dim: int
    dec_heads: int
    decoder_head: str  # "proxy_codes" (two-stage, is_legacy) or "pixels"
    l2_normalize: bool
    proxy_codebook_size: int = 0
    proxy_code_dim: int = 0
    pixel_decoder_ch: int = 0
    pixel_decoder_ch_mult: tuple[int, ...] = ()
    pixel_decoder_num_res_blocks: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def variant(self) -> str | None:
        """The paper variant of these sizes, if any."""
        sizes = (self.enc_width, self.enc_depth, self.dec_width, self.dec_depth, self.num_latent_tokens,
                 self.token_size, self.codebook_size, self.decoder_head)
        return next((name for name, want in PAPER.items() if want == sizes), None)


# ------------------------------------------------------------------------------------ manifest


def _linear_keys(out: dict, key: str, cout: int, cin: int) -> None:
    out[f"{key}.weight"] = (cout, cin)
    out[f"{key}.bias"] = (cout,)


def _vit_keys(out: dict, part: str, width: int, depth: int, mlp: int, grid: int, tokens: int) -> None:
    out[f"{part}.class_embedding"] = (1, width)
    out[f"{part}.positional_embedding"] = (grid * grid + 1, width)
    out[f"{part}.latent_token_positional_embedding"] = (tokens, width)
    norm_keys(out, f"{part}.ln_pre", width)
    norm_keys(out, f"{part}.ln_post", width)
    for i in range(depth):
        b = f"{part}.transformer.{i}"
        norm_keys(out, f"{b}.ln_1", width)
        norm_keys(out, f"{b}.ln_2", width)
        out[f"{b}.attn.in_proj_weight"] = (3 * width, width)
        out[f"{b}.attn.in_proj_bias"] = (3 * width,)
        _linear_keys(out, f"{b}.attn.out_proj", width, width)
        _linear_keys(out, f"{b}.mlp.c_fc", mlp, width)
        _linear_keys(out, f"{b}.mlp.c_proj", width, mlp)


def _pixel_block_keys(out: dict, key: str, cin: int, cout: int) -> None:
    """MaskGIT's ResnetBlock as the 1d-tokenizer port lays it out: bias-free convs, and a bias-free
    ``cout x cout`` shortcut applied to the branch output where the width changes."""
    norm_keys(out, f"{key}.norm1", cin)
    out[f"{key}.conv1.weight"] = (cout, cin, 3, 3)
    norm_keys(out, f"{key}.norm2", cout)
    out[f"{key}.conv2.weight"] = (cout, cout, 3, 3)
    if cin != cout:
        out[f"{key}.nin_shortcut.weight"] = (cout, cout, 1, 1)


def _pixel_decoder_keys(out: dict, info: TiTokInfo) -> None:
    ch, mult, nrb = info.pixel_decoder_ch, info.pixel_decoder_ch_mult, info.pixel_decoder_num_res_blocks
    top = ch * mult[-1]
    conv_keys(out, "pixel_decoder.conv_in", top, info.proxy_code_dim, 3)
    for k in range(nrb):
        _pixel_block_keys(out, f"pixel_decoder.mid.{k}", top, top)
    cin = top
    for i in reversed(range(len(mult))):
        for j in range(nrb):
            _pixel_block_keys(out, f"pixel_decoder.up.{i}.block.{j}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i != 0:
            conv_keys(out, f"pixel_decoder.up.{i}.upsample_conv", cin, cin, 3)
    norm_keys(out, "pixel_decoder.norm_out", cin)
    conv_keys(out, "pixel_decoder.conv_out", info.in_channels, cin, 3)


def titok_manifest(info: TiTokInfo) -> dict[str, tuple[int, ...]]:
    """Every parameter key of the official ``TiTok`` with these sizes, and its shape."""
    out: dict[str, tuple[int, ...]] = {"latent_tokens": (info.num_latent_tokens, info.enc_width)}
    p, g, n = info.patch_size, info.grid, info.num_latent_tokens
    out["encoder.patch_embed.weight"] = (info.enc_width, info.in_channels, p, p)
    out["encoder.patch_embed.bias"] = (info.enc_width,)
    _vit_keys(out, "encoder", info.enc_width, info.enc_depth, info.enc_mlp_dim, g, n)
    conv_keys(out, "encoder.conv_out", info.token_size, info.enc_width, 1)
    _linear_keys(out, "decoder.decoder_embed", info.dec_width, info.token_size)
    out["decoder.mask_token"] = (1, 1, info.dec_width)
    _vit_keys(out, "decoder", info.dec_width, info.dec_depth, info.dec_mlp_dim, g, n)
    out["quantize.embedding.weight"] = (info.codebook_size, info.token_size)
    if info.decoder_head == "proxy_codes":
        conv_keys(out, "decoder.ffn.0", 2 * info.dec_width, info.dec_width, 1)
        conv_keys(out, "decoder.ffn.2", info.proxy_codebook_size, 2 * info.dec_width, 1)
        out["pixel_quantize.embedding.weight"] = (info.proxy_codebook_size, info.proxy_code_dim)
        _pixel_decoder_keys(out, info)
    else:
        conv_keys(out, "decoder.ffn.0", p * p * info.in_channels, info.dec_width, 1)
        conv_keys(out, "decoder.conv_out", info.in_channels, info.in_channels, 3)
    return out


# ------------------------------------------------------------------------------------- inspect


def _refuse_other_families(state: Mapping, name: str) -> None:
    """One sentence for the files people confuse with a TiTok tokenizer."""
    keys = list(state)
    if any(k.startswith(("model.embeddings.", "in_blocks.", "lm_head.")) for k in keys):
        raise ConversionError(f"{name} is a TiTok generator (MaskGIT-style transformer) state dict, not the "
                              "tokenizer; pass the tokenizer file (tokenizer_titok_l32.bin and the like).")
    if "decoder.text_guidance_proj.weight" in state:
        raise ConversionError(f"{name} is a TA-TiTok state dict (a text-conditioned decoder), which vqgen's TiTok "
                              "does not express; convert a TiTok tokenizer (L-32, B-64, S-128 or a VQ8k model).")
    titok = ("latent_tokens", "encoder.latent_token_positional_embedding", "decoder.mask_token")
    if all(k in state for k in titok) and "quantize.embedding.weight" not in state:
        channels = state["encoder.conv_out.weight"].shape[0] if "encoder.conv_out.weight" in state else "2C"
        raise ConversionError(f"{name} is a TiTok VAE state dict (continuous tokens: its encoder emits {channels} "
                              "channels of mean and log-variance and it has no codebook), which vqgen's TiTok "
                              "does not express; convert a VQ TiTok (L-32, B-64, S-128 or a VQ8k model).")
    if "encoder.conv_in.weight" in state and not any(k in state for k in titok):
        raise ConversionError(f"{name} is a convolutional VQGAN state dict (encoder.conv_in, no latent tokens), not "
                              "a TiTok tokenizer; convert it with the converter of its family "
                              "(vqgen.convert.llamagen, vqgen.convert.taming).")
    need = ("latent_tokens", "encoder.patch_embed.weight", "encoder.positional_embedding", "encoder.conv_out.weight",
            "encoder.transformer.0.mlp.c_fc.weight", "decoder.mask_token", "decoder.transformer.0.mlp.c_fc.weight",
            "decoder.ffn.0.weight", "quantize.embedding.weight")
    missing = [k for k in need if k not in state]
    if missing:
        shown = ", ".join(sorted(keys)[:3])
        raise ConversionError(f"{name} is not a TiTok tokenizer state dict: it lacks {', '.join(missing[:3])}"
                              f"{' and more' if len(missing) > 3 else ''} (it has {len(keys)} keys such as {shown}); "
                              "pass the tokenizer file of bytedance/1d-tokenizer (tokenizer_titok_l32.bin or the "
                              "hub's model.safetensors).")


def _heads(width: int, given: int | None, part: str, flag: str, name: str) -> int:
    if given is None:
        if width % HEAD_WIDTH:
            raise ConversionError(f"{name} has {part} width {width}, which is not a multiple of the official "
                                  f"{HEAD_WIDTH}-wide heads, and the file does not store the head count; pass it "
                                  f"with {flag}.")
        return width // HEAD_WIDTH
    if given < 1 or width % given:
        raise ConversionError(f"{flag} {given} does not divide the {part} width {width} of {name}; pass the head "
                              "count it was trained with.")
    return int(given)


def inspect_titok(state: Mapping[str, np.ndarray], name: str = "the TiTok file", *, enc_heads: int | None = None,
                  dec_heads: int | None = None, l2_normalize: bool | None = None) -> TiTokInfo:
    """The sizes of a TiTok state dict; raises :class:`ConversionError` unless every expected key
    is there with its shape and nothing else (besides ``quantize.embed_prob``)."""
    _refuse_other_families(state, name)
    n, enc_width = (int(s) for s in state["latent_tokens"].shape)
    patch = state["encoder.patch_embed.weight"]
    in_channels, patch_size = int(patch.shape[1]), int(patch.shape[-1])
    positions = int(state["encoder.positional_embedding"].shape[0]) - 1
    grid = math.isqrt(max(positions, 0))
    if grid < 1 or grid * grid != positions:
        raise ConversionError(f"{name} has {positions + 1} encoder positions, not one class token and a square grid "
                              "of patches; this file does not come from TiTok's TiTokEncoder.")
    dec_width = int(state["decoder.mask_token"].shape[-1])
    head = "proxy_codes" if "decoder.ffn.2.weight" in state else "pixels"
    proxy = {}
    if head == "proxy_codes":
        if "pixel_quantize.embedding.weight" not in state or "pixel_decoder.conv_in.weight" not in state:
            raise ConversionError(f"{name} is a stage-1 TiTok state dict (proxy-code logits without the MaskGIT "
                                  "VQGAN decoder of stage 2), which decodes no pixels; convert the released "
                                  "stage-2 tokenizer.")
        levels = count_indices(state, r"^pixel_decoder\.up\.(\d+)\.")
        widths = [int(state[f"pixel_decoder.up.{i}.block.0.conv1.weight"].shape[0])
                  if f"pixel_decoder.up.{i}.block.0.conv1.weight" in state else 0 for i in range(levels)]
        ch = widths[0] if widths and widths[0] else 1
        proxy = dict(proxy_codebook_size=int(state["decoder.ffn.2.weight"].shape[0]),
                     proxy_code_dim=int(state["pixel_quantize.embedding.weight"].shape[1]), pixel_decoder_ch=ch,
                     pixel_decoder_ch_mult=tuple(max(w // ch, 1) for w in widths),
                     pixel_decoder_num_res_blocks=count_indices(state, r"^pixel_decoder\.up\.0\.block\.(\d+)\."))
    info = TiTokInfo(
        in_channels=in_channels, image_size=grid * patch_size, patch_size=patch_size, num_latent_tokens=n,
        token_size=int(state["encoder.conv_out.weight"].shape[0]),
        codebook_size=int(state["quantize.embedding.weight"].shape[0]),
        enc_width=enc_width, enc_depth=count_indices(state, r"^encoder\.transformer\.(\d+)\."),
        enc_mlp_dim=int(state["encoder.transformer.0.mlp.c_fc.weight"].shape[0]),
        enc_heads=_heads(enc_width, enc_heads, "encoder", "--enc-heads", name),
        dec_width=dec_width, dec_depth=count_indices(state, r"^decoder\.transformer\.(\d+)\."),
        dec_mlp_dim=int(state["decoder.transformer.0.mlp.c_fc.weight"].shape[0]),
        dec_heads=_heads(dec_width, dec_heads, "decoder", "--dec-heads", name),
        decoder_head=head, l2_normalize=(head == "proxy_codes") if l2_normalize is None else bool(l2_normalize),
        **proxy)
    kind = f"TiTok-{info.variant}" if info.variant else "TiTok"
    check_keys(state, titok_manifest(info), name=name, kind=f"{kind} tokenizer", ignore=BUFFERS)
    if head == "proxy_codes" and 2 ** (len(info.pixel_decoder_ch_mult) - 1) != patch_size:
        raise ConversionError(f"{name} decodes {patch_size}x{patch_size} patches through a MaskGIT VQGAN decoder "
                              f"that upsamples by {2 ** (len(info.pixel_decoder_ch_mult) - 1)}, which TiTok's "
                              "proxy-code head cannot join; this file does not come from TiTok.")
    return info


# ------------------------------------------------------------------------------------- convert


def _dense(state: Mapping[str, np.ndarray], key: str) -> dict:
    return {"kernel": linear_kernel(state[f"{key}.weight"]), "bias": state[f"{key}.bias"]}


def _conv1x1(state: Mapping[str, np.ndarray], key: str) -> dict:
    """A 1x1 conv ``[O, I, 1, 1]`` as a Dense ``[I, O]`` (vqgen applies it to the token grid)."""
    return {"kernel": linear_kernel(state[f"{key}.weight"][:, :, 0, 0]), "bias": state[f"{key}.bias"]}


def _conv(state: Mapping[str, np.ndarray], key: str, bias: bool = True) -> dict:
    out = {"kernel": oihw_to_hwio(state[f"{key}.weight"])}
    if bias:
        out["bias"] = state[f"{key}.bias"]
    return out


def _block(state: Mapping[str, np.ndarray], key: str) -> dict:
    w, b = state[f"{key}.attn.in_proj_weight"], state[f"{key}.attn.in_proj_bias"]  # [3D, D], [3D]
    d = w.shape[1]
    attn = {part: {"kernel": linear_kernel(w[k * d:(k + 1) * d]), "bias": b[k * d:(k + 1) * d]}
            for k, part in enumerate("qkv")}
    attn["out"] = _dense(state, f"{key}.attn.out_proj")
    return {"ln_1": norm_params(state, f"{key}.ln_1"), "attn": attn, "ln_2": norm_params(state, f"{key}.ln_2"),
            "c_fc": _dense(state, f"{key}.mlp.c_fc"), "c_proj": _dense(state, f"{key}.mlp.c_proj")}


def _vit(state: Mapping[str, np.ndarray], part: str, depth: int) -> dict:
    out = {k: state[f"{part}.{k}"] for k in ("class_embedding", "positional_embedding",
                                             "latent_token_positional_embedding")}
    out["ln_pre"], out["ln_post"] = norm_params(state, f"{part}.ln_pre"), norm_params(state, f"{part}.ln_post")
    for i in range(depth):
        out[f"transformer_{i}"] = _block(state, f"{part}.transformer.{i}")
    return out


def _pixel_decoder(state: Mapping[str, np.ndarray], info: TiTokInfo) -> dict:
    def block(key):
        out = {"norm1": norm_params(state, f"{key}.norm1"), "conv1": _conv(state, f"{key}.conv1", bias=False),
               "norm2": norm_params(state, f"{key}.norm2"), "conv2": _conv(state, f"{key}.conv2", bias=False)}
        if f"{key}.nin_shortcut.weight" in state:
            out["nin_shortcut"] = _conv(state, f"{key}.nin_shortcut", bias=False)
        return out

    out = {"conv_in": _conv(state, "pixel_decoder.conv_in"), "norm_out": norm_params(state, "pixel_decoder.norm_out"),
           "conv_out": _conv(state, "pixel_decoder.conv_out")}
    for k in range(info.pixel_decoder_num_res_blocks):
        out[f"mid_block_{k + 1}"] = block(f"pixel_decoder.mid.{k}")
    for i in range(len(info.pixel_decoder_ch_mult)):
        for j in range(info.pixel_decoder_num_res_blocks):
            out[f"up_{i}_block_{j}"] = block(f"pixel_decoder.up.{i}.block.{j}")
        if i != 0:
            out[f"up_{i}_upsample"] = {"conv": _conv(state, f"pixel_decoder.up.{i}.upsample_conv")}
    return out


def convert_params(state: Mapping[str, np.ndarray], info: TiTokInfo) -> dict:
    """The weights as the params of the :class:`~vqgen.tokenizers.vit.TiTok` the config builds
    (nested dict of float32 arrays)."""
    enc = _vit(state, "encoder", info.enc_depth)
    enc["patch_embed"] = _conv(state, "encoder.patch_embed")
    enc["conv_out"] = _conv1x1(state, "encoder.conv_out")
    dec = _vit(state, "decoder", info.dec_depth)
    dec["mask_token"] = state["decoder.mask_token"]
    dec["decoder_embed"] = _dense(state, "decoder.decoder_embed")
    dec["ffn_0"] = _conv1x1(state, "decoder.ffn.0")
    params = {"latent_tokens": state["latent_tokens"], "encoder": enc, "decoder": dec,
              "quantizer": {"codebook": state["quantize.embedding.weight"]}}
    if info.decoder_head == "proxy_codes":
        dec["ffn_2"] = _conv1x1(state, "decoder.ffn.2")
        params["pixel_codebook"] = state["pixel_quantize.embedding.weight"]
        params["pixel_decoder"] = _pixel_decoder(state, info)
    else:
        dec["conv_out"] = _conv(state, "decoder.conv_out")
    return params


# -------------------------------------------------------------------------------------- config


def config_variant(info: TiTokInfo) -> str:
    """The ``configs/tokenizers/titok.py`` variant the config starts from."""
    return info.variant or ("L-32" if info.decoder_head == "proxy_codes" else "BL-64-VQ")


def make_config(info: TiTokInfo, *, dtype: str | None = None) -> ml_collections.ConfigDict:
    """The paper config with the sizes of the file written over it (locked)."""
    from vqgen import config_lib  # the configs import the training stack

    config = config_lib.load_config(CONFIG, config_variant(info))
    tok = config.tokenizer
    set_fields(tok, image_size=info.image_size, patch_size=info.patch_size, num_latent_tokens=info.num_latent_tokens,
         token_size=info.token_size, enc_width=info.enc_width, enc_depth=info.enc_depth, enc_heads=info.enc_heads,
         enc_mlp_dim=info.enc_mlp_dim, dec_width=info.dec_width, dec_depth=info.dec_depth, dec_heads=info.dec_heads,
         dec_mlp_dim=info.dec_mlp_dim, decoder_head=info.decoder_head,
         legacy_token_layout=info.decoder_head == "proxy_codes", pixel_range="unit")
    if info.decoder_head == "proxy_codes":  # sizes of the MaskGIT decoder, written only where not the official ones
        extra = {k: getattr(info, k) for k, default in PROXY_DEFAULTS.items() if getattr(info, k) != default}
        if extra:
            set_fields(tok, **extra)
    set_fields(tok.quantizer, codebook_size=info.codebook_size, l2_normalize=info.l2_normalize)
    set_fields(config.data, image_size=info.image_size, channels=info.in_channels)
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(tok, dtype=dtype)
    config.lock()
    return config


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config, the sizes and the tokenizer params."""

    config: ml_collections.ConfigDict
    info: TiTokInfo
    tokenizer_params: dict


def convert(state: Mapping[str, np.ndarray], *, enc_heads: int | None = None, dec_heads: int | None = None,
            l2_normalize: bool | None = None, dtype: str | None = None, name: str = "the TiTok file") -> Converted:
    """Checks and converts a TiTok state dict (NumPy arrays) into vqgen params and a config; writes
    nothing. Raises :class:`~vqgen.convert.workdir.ConversionError` with one sentence."""
    info = inspect_titok(state, name, enc_heads=enc_heads, dec_heads=dec_heads, l2_normalize=l2_normalize)
    return Converted(config=make_config(info, dtype=dtype), info=info, tokenizer_params=convert_params(state, info))


def convert_file(path: str, out: str, *, mesh=None, **kwargs: Any) -> Converted:
    """Reads the file, converts it (:func:`convert`, which takes ``kwargs``) and writes the workdir
    ``out`` (on ``mesh``, default the config's)."""
    state = load_state_dict(path, WRAPPERS)
    converted = convert(state, name=os.path.basename(path) or "the TiTok file", **kwargs)
    write_workdir(converted.config, out, tokenizer_params=converted.tokenizer_params, mesh=mesh)
    return converted


def describe(converted: Converted, out: str) -> str:
    """The line the command prints after writing ``out``."""
    i = converted.info
    head = "proxy codes through MaskGIT's VQGAN decoder" if i.decoder_head == "proxy_codes" else "pixels"
    return (f"wrote {out}: TiTok tokenizer (encoder {i.enc_width}x{i.enc_depth}, decoder {i.dec_width}x{i.dec_depth}, "
            f"{i.num_latent_tokens} tokens of a {i.codebook_size} x {i.token_size} codebook, decoding {head}) for "
            f"{i.image_size}px images, config {CONFIG}:{config_variant(i)} with the sizes of the file")


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m vqgen.convert.titok",
                                     description="Convert a released TiTok tokenizer into a vqgen workdir.")
    parser.add_argument("checkpoint", help="tokenizer weights, e.g. tokenizer_titok_l32.bin or model.safetensors")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold checkpoints yet)")
    parser.add_argument("--enc-heads", type=int, default=None, help="encoder attention heads (default width / 64)")
    parser.add_argument("--dec-heads", type=int, default=None, help="decoder attention heads (default width / 64)")
    l2 = parser.add_mutually_exclusive_group()
    l2.add_argument("--l2-norm", dest="l2_normalize", action="store_true", default=None,
                    help="cosine code lookup (default: on for the two-stage proxy-code models)")
    l2.add_argument("--no-l2-norm", dest="l2_normalize", action="store_false",
                    help="Euclidean code lookup (default: for the single-stage pixel-decoding models)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: the paper config's bfloat16)")
    args = parser.parse_args(argv)
    converted = convert_file(args.checkpoint, args.out, enc_heads=args.enc_heads, dec_heads=args.dec_heads,
                             l2_normalize=args.l2_normalize, dtype=args.dtype)
    print(describe(converted, args.out))
    return converted


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
