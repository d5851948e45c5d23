"""Convert MaskGIT's released Flax checkpoints (google-research/maskgit) into a vqgen workdir.

    python -m vqgen.convert.maskgit --tokenizer tokenizer_imagenet256_checkpoint \\
        --transformer maskgit_imagenet256_checkpoint --out runs/maskgit_256
    python -m vqgen.convert.maskgit --tokenizer tokenizer_imagenet512_checkpoint \\
        --transformer maskgit_imagenet512_checkpoint --out runs/maskgit_512          # 512 px, 32x32 tokens
    python -m vqgen.convert.maskgit --tokenizer tokenizer_imagenet256_checkpoint --out runs/maskgit_vqgan
    python -m vqgen.convert.maskgit --transformer maskgit_imagenet256_checkpoint --out runs/maskgit_gen

The workdir holds ``config.json`` and step-0 checkpoints of the tokenizer and/or generator phases
(:mod:`vqgen.convert.workdir`), so ``vqgen.load_tokenizer(out)``, ``vqgen.load_generator(out)``
and ``--mode=sample`` use it as if vqgen had trained it, and training on it fine-tunes the
converted weights.

Files: the released checkpoints are the bytes of ``flax.serialization.to_bytes`` of the model's
variables ``{"params": tree}`` (MaskGIT's ``utils.restore_from_path`` reads them back with
``flax.serialization.from_bytes(None, ...)``). They are read here with
``flax.serialization.msgpack_restore``, which builds nothing but dicts, numbers and arrays; a bare
parameter tree (no ``"params"`` level) is accepted too, and other top-level entries are not
used. A truncated file, a PyTorch or safetensors file, or a tree of another model is refused in
one sentence; every expected parameter path and shape (:func:`tokenizer_manifest`,
:func:`transformer_manifest`) is checked before anything is written.

Config: ``configs/generators/maskgit.py:paper`` when a transformer is converted, else
``configs/tokenizers/maskgit_vqgan.py``, or the config named by ``--config`` (a config of other
sizes is refused); every size read from the shapes is written over it, and the released 256 px
pair gives exactly ``generators/maskgit:paper``. Read from the shapes: the tokenizer's filters,
channel multipliers, res blocks, code width, codebook size and image channels; the transformer's
depth, width, heads (the attention kernels keep the head axis), MLP width, vocabulary and
positions (one class token and a square grid: 257 at 256 px, 1025 at 512 px). Not in the files:
how the vocabulary ``codes + classes + 1`` splits, which is the tokenizer's codebook size when
both are converted, else ``--num-classes`` (default 1000, ImageNet); the image size, which is
``--image-size``, else the transformer's grid times the tokenizer's downsampling, else a size in
a file's name (``..._imagenet512_checkpoint``: 512), else the config's 256. The released
transformer has no "no label" class, so guidance is off (``class_dropout_prob = 0``,
``sample.cfg_scale = 1``). ``--dtype float32`` sets the compute dtype of both models (the
generator config uses bfloat16).

Mapping (both sides Flax, so kernels keep their layouts; only names change):

Tokenizer (``nets/vqgan_tokenizer.py`` ``VQVAE`` with ``configs/vqgan_config.py``: GroupNorm,
swish, average-pool downsampling, no attention -> :class:`vqgen.tokenizers.vqgan.VQGAN` with
``style="maskgit"``, no quant convs). MaskGIT's layers are auto-named in creation order, so:

- ``encoder/Conv_0`` -> ``encoder/conv_in`` (no bias); ``encoder/ResBlock_{n}`` for
  ``n = i * R + j`` (level ``i``, block ``j`` of ``R`` res blocks) -> ``encoder/down_{i}_block_{j}``,
  the next ``R`` -> ``encoder/mid_block_{1..R}``; ``encoder/GroupNorm_0`` -> ``norm_out``;
  ``encoder/Conv_1`` (1x1, to the code width) -> ``conv_out``.
- ``decoder/Conv_0`` -> ``decoder/conv_in``; ``decoder/ResBlock_{0..R-1}`` -> ``mid_block_{1..R}``,
  then the levels from the lowest resolution up: ``ResBlock_{R + k R + j}`` -> ``up_{L-1-k}_block_{j}``
  and ``Conv_{1 + k}`` (after the nearest x2 resize) -> ``up_{L-1-k}_upsample/conv``;
  ``decoder/GroupNorm_0`` -> ``norm_out``; ``decoder/Conv_{L}`` -> ``conv_out``.
- In a block: ``GroupNorm_0/1`` -> ``norm1/2``, ``Conv_0/1`` -> ``conv1/2`` (no biases), ``Conv_2``
  (the 1x1 shortcut where the width changes, which MaskGIT applies to the residual branch's
  output) -> ``nin_shortcut``. ``quantizer/codebook`` keeps its name (a plain Euclidean lookup).

Transformer (``nets/maskgit_transformer.py`` ``Transformer`` ->
:class:`vqgen.generators.maskgit.MaskGITTransformer`):

- ``Embed_0/word_embeddings/embedding [K + C + 1, D]`` -> ``word_embeddings``; its rows are codes,
  then classes (class ``c`` is id ``K + c``), then the mask token. The released code writes the
  mask as ``mask_token_id = -1``, which ``nn.Embed``'s lookup reads as the last row, ``K + C``:
  that row is vqgen's ``mask_token_id``, so the table is copied as it is.
  ``Embed_0/position_embeddings/embedding [1 + L, D]`` -> ``position_embeddings`` (the class token
  at position 0); ``Embed_0/embeddings_ln`` -> ``embeddings_ln``.
- ``TransformerLayer_{i}/Attention_0/self_attention/{query,key,value,out}`` ->
  ``layers_{i}/attention/...``; ``Attention_0/attention_output_ln`` -> ``layers_{i}/attention_output_ln``;
  ``Mlp_0/{intermediate_output,layer_output,layer_output_ln}`` -> ``layers_{i}/...``.
- ``MlmLayer_0/{mlm_dense,mlm_ln}`` -> ``mlm_dense``, ``mlm_ln``; ``MlmLayer_0/mlm_bias/bias`` ->
  ``mlm_bias``; the output layer is tied to ``word_embeddings`` on both sides.
- The released model also computes logits at the class position, which its sampler never reads
  (the class token is not a mask); vqgen's model returns the ``L`` image positions only, and like
  the released sampler it samples from the first ``K`` (code) logits.

Pixel range: MaskGIT's tokenizer reads and writes images in [0, 1] (its demo divides uint8 images
by 255 and clips the decoded ones to [0, 1]), not in vqgen's [-1, 1]. The weights are converted as
released and the config sets ``tokenizer.pixel_range="unit"``: the VQGAN feeds its network
``(x + 1) / 2`` of vqgen's images and returns ``2 y - 1`` of its output, so the converted
tokenizer maps [-1, 1] images like every other vqgen tokenizer. (Folding the shift into the
weights is not exact: the first conv zero-pads, so a shifted input differs at the borders.)
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

import ml_collections
import numpy as np
from flax import serialization

from vqgen.convert.workdir import ConversionError, check_keys, set_fields, write_workdir

TOKENIZER_CONFIG = "tokenizers/maskgit_vqgan"
GENERATOR_CONFIG = "generators/maskgit:paper"
NUM_CLASSES = 1000  # ImageNet, the released transformer's classes
IMAGE_SIZE_IN_NAME = re.compile(r"imagenet(\d{2,4})")
WHAT = "checkpoint"  # how refusals name the file (a Flax parameter tree, not a state dict)
TOKENIZER_PARTS = ("encoder", "decoder", "quantizer")
TRANSFORMER_PARTS = ("Embed_0", "MlmLayer_0")

Manifest = dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """Sizes of a MaskGIT tokenizer checkpoint, read from its shapes."""

    filters: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    in_channels: int
    out_channels: int
    embedding_dim: int
    codebook_size: int

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def name(self) -> str:
        return f"VQGAN f{self.downsample} with {self.codebook_size} codes"


@dataclasses.dataclass(frozen=True)
class TransformerInfo:
    """Sizes of a MaskGIT transformer checkpoint, read from its shapes (and the class count)."""

    depth: int
    width: int
    num_heads: int
    mlp_dim: int
    vocab_size: int
    positions: int
    num_classes: int

    @property
    def codebook_size(self) -> int:
        return self.vocab_size - self.num_classes - 1

    @property
    def grid(self) -> int:
        return math.isqrt(self.positions - 1)

    @property
    def name(self) -> str:
        return f"transformer ({self.depth} layers, width {self.width})"


# ------------------------------------------------------------------------------------ reading


def _flatten(tree: Mapping, prefix: str, out: dict[str, Any]) -> None:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _flatten(value, f"{path}/", out)
        else:
            out[path] = value


def _file_kind(head: bytes) -> str | None:
    """What a file that is not msgpack is, from its first bytes, when recognisable."""
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch (zip) file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (PyTorch) file"
    if len(head) > 9 and head[8:10] == b'{"':
        return "a safetensors file"
    return None


def read(path: str) -> dict[str, np.ndarray]:
    """The parameters of a MaskGIT checkpoint as a flat dict ``{"encoder/Conv_0/kernel": array}``
    (floating point as float32). Raises ``FileNotFoundError`` for a missing file and
    :class:`ConversionError` for a file that is not Flax msgpack bytes of a parameter tree."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; pass the path of a MaskGIT checkpoint such as "
                                "maskgit_imagenet256_checkpoint or tokenizer_imagenet256_checkpoint.")
    with open(path, "rb") as f:
        data = f.read()
    kind = _file_kind(data[:16])
    if kind:
        raise ConversionError(f"{path} is {kind}, not the Flax msgpack bytes MaskGIT released; convert PyTorch "
                              "checkpoints with their family's converter (python -m vqgen.convert.taming, "
                              ".llamagen or .var).")
    try:
        restored = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack's ExtraData/ValueError/TypeError on a truncated or foreign file
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{path} cannot be read as Flax msgpack bytes (flax.serialization), it is truncated "
                              f"or not a MaskGIT checkpoint ({first[:120]}); download it again or pass the "
                              "checkpoint file itself.") from e
    if not isinstance(restored, Mapping):
        raise ConversionError(f"{path} holds a {type(restored).__name__} rather than a tree of arrays; pass a MaskGIT "
                              "checkpoint (flax.serialization.to_bytes of the model's variables).")
    tree = restored.get("params")
    if not isinstance(tree, Mapping):
        if any(part in restored for part in TOKENIZER_PARTS + TRANSFORMER_PARTS):
            tree = restored  # a bare parameter tree
        else:
            top = sorted(map(str, restored))[:6]
            raise ConversionError(f"{path} holds no 'params' tree (top level: {top}); pass a MaskGIT checkpoint "
                                  "(flax.serialization.to_bytes of the model's variables).")
    flat: dict[str, Any] = {}
    _flatten(tree, "", flat)
    out = {}
    for key, value in flat.items():
        array = np.asarray(value)
        if array.dtype.kind not in "fiuV":  # "V": bfloat16 (ml_dtypes)
            raise ConversionError(f"{path}: {key} is a {type(value).__name__}, not an array of numbers; pass a "
                                  "MaskGIT checkpoint (flax.serialization.to_bytes of the model's variables).")
        out[key] = array.astype(np.float32, copy=False) if array.dtype.kind in "fV" else array
    return out


# ------------------------------------------------------------------------------------- shared


def _indices(flat: Mapping, pattern: str) -> list[int]:
    """Sorted distinct integers ``{n}`` in keys matching ``pattern`` (a regex with one group)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in flat if (m := rx.match(k))})


def _is_tokenizer(flat: Mapping) -> bool:
    return any(k.split("/", 1)[0] in TOKENIZER_PARTS for k in flat)


def _is_transformer(flat: Mapping) -> bool:
    return any(k.split("/", 1)[0] in TRANSFORMER_PARTS or k.startswith("TransformerLayer_") for k in flat)


def _conv(out: Manifest, key: str, k: int, cin: int, cout: int, bias: bool) -> None:
    out[f"{key}/kernel"] = (k, k, cin, cout)
    if bias:
        out[f"{key}/bias"] = (cout,)


def _norm(out: Manifest, key: str, c: int) -> None:
    out[f"{key}/scale"] = (c,)
    out[f"{key}/bias"] = (c,)


# ---------------------------------------------------------------------------------- tokenizer


def _resblock_keys(out: Manifest, key: str, cin: int, cout: int) -> None:
    _norm(out, f"{key}/GroupNorm_0", cin)
    _conv(out, f"{key}/Conv_0", 3, cin, cout, False)
    _norm(out, f"{key}/GroupNorm_1", cout)
    _conv(out, f"{key}/Conv_1", 3, cout, cout, False)
    if cin != cout:
        _conv(out, f"{key}/Conv_2", 1, cout, cout, False)  # applied to the branch output: [cout, cout]


def tokenizer_manifest(info: TokenizerInfo) -> Manifest:
    """Every parameter path of the official ``VQVAE`` with these sizes (``vqgan_config``'s
    structure), and its shape."""
    out: Manifest = {}
    f, mult, nrb = info.filters, info.ch_mult, info.num_res_blocks
    _conv(out, "encoder/Conv_0", 3, info.in_channels, f, False)
    cin, n = f, 0
    for m in list(mult) + [mult[-1]]:  # the levels, then the mid blocks at the last width
        for _ in range(nrb):
            _resblock_keys(out, f"encoder/ResBlock_{n}", cin, f * m)
            cin, n = f * m, n + 1
    _norm(out, "encoder/GroupNorm_0", cin)
    _conv(out, "encoder/Conv_1", 1, cin, info.embedding_dim, True)
    out["quantizer/codebook"] = (info.codebook_size, info.embedding_dim)
    _conv(out, "decoder/Conv_0", 3, info.embedding_dim, cin, True)
    n, c = 0, 1
    for i in [len(mult) - 1] + list(reversed(range(len(mult)))):  # the mid blocks, then the levels
        for _ in range(nrb):
            _resblock_keys(out, f"decoder/ResBlock_{n}", cin, f * mult[i])
            cin, n = f * mult[i], n + 1
        if i > 0 and n > nrb:
            _conv(out, f"decoder/Conv_{c}", 3, cin, cin, True)
            c += 1
    _norm(out, "decoder/GroupNorm_0", cin)
    _conv(out, f"decoder/Conv_{c}", 3, cin, info.out_channels, True)
    return out


def inspect_tokenizer(flat: Mapping[str, np.ndarray], name: str = "the tokenizer file") -> TokenizerInfo:
    """The sizes of a MaskGIT tokenizer checkpoint; raises :class:`ConversionError` unless every
    expected parameter is there with its shape and nothing else."""
    if _is_transformer(flat) and not _is_tokenizer(flat):
        raise ConversionError(f"{name} is a MaskGIT transformer checkpoint, not the tokenizer; pass it as "
                              "--transformer.")
    need = ("encoder/Conv_0/kernel", "encoder/ResBlock_0/Conv_0/kernel", "quantizer/codebook", "decoder/Conv_0/kernel")
    missing = [k for k in need if k not in flat]
    if missing:
        raise ConversionError(f"{name} is not a MaskGIT tokenizer checkpoint: it lacks {', '.join(missing)} (it has "
                              f"{len(flat)} parameters such as {', '.join(sorted(flat)[:3])}).")
    norms = sorted({p for k in flat for p in k.split("/") if p.startswith(("BatchNorm_", "LayerNorm_"))})
    if norms:
        kind = "BN" if norms[0].startswith("Batch") else "LN"
        raise ConversionError(f"{name} is a MaskGIT tokenizer built with norm_type {kind} ({norms[0]}), which vqgen "
                              "does not convert; pass one with GroupNorm (the released vqgan_config).")
    enc_convs = _indices(flat, r"^encoder/Conv_(\d+)/")
    if len(enc_convs) > 2:
        raise ConversionError(f"{name} is a MaskGIT tokenizer built with conv_downsample=True ({len(enc_convs)} "
                              "encoder convs), which vqgen's MaskGIT VQGAN (average-pool downsampling, as released) "
                              "does not build.")
    conv_in = flat["encoder/Conv_0/kernel"]
    if conv_in.ndim != 4:
        raise ConversionError(f"{name}: encoder/Conv_0/kernel has shape {tuple(conv_in.shape)}, not a 2D conv kernel "
                              "[kh, kw, in, out]; this is not a MaskGIT tokenizer checkpoint.")
    in_channels, filters = int(conv_in.shape[2]), int(conv_in.shape[3])
    levels = len(_indices(flat, r"^decoder/Conv_(\d+)/")) - 1
    blocks = len(_indices(flat, r"^encoder/ResBlock_(\d+)/"))
    nrb = blocks // (levels + 1) if levels >= 1 else 0
    if nrb < 1:
        raise ConversionError(f"{name} has {blocks} encoder ResBlocks and {levels + 1} decoder convs, which is no "
                              "MaskGIT tokenizer's structure (levels x res blocks, then as many mid blocks).")
    ch_mult = []
    for i in range(levels):
        key = f"encoder/ResBlock_{i * nrb}/Conv_0/kernel"
        ch_mult.append(max(int(flat[key].shape[-1]) // filters, 1) if key in flat else 1)
    codebook = flat["quantizer/codebook"]
    last = f"decoder/Conv_{levels}/kernel"
    info = TokenizerInfo(filters=filters, ch_mult=tuple(ch_mult), num_res_blocks=nrb, in_channels=in_channels,
                         out_channels=int(flat[last].shape[-1]) if last in flat else in_channels,
                         embedding_dim=int(codebook.shape[-1]), codebook_size=int(codebook.shape[0]))
    if info.out_channels != info.in_channels:
        raise ConversionError(f"{name} reads {info.in_channels}-channel images but writes {info.out_channels}, which "
                              "vqgen's tokenizers do not; pass an image tokenizer (the same channels in and out).")
    check_keys(flat, tokenizer_manifest(info), name=name, kind=f"MaskGIT tokenizer ({info.name})", what=WHAT)
    return info


def _resblock_params(flat: Mapping[str, np.ndarray], key: str) -> dict:
    out = {"norm1": {"scale": flat[f"{key}/GroupNorm_0/scale"], "bias": flat[f"{key}/GroupNorm_0/bias"]},
           "conv1": {"kernel": flat[f"{key}/Conv_0/kernel"]},
           "norm2": {"scale": flat[f"{key}/GroupNorm_1/scale"], "bias": flat[f"{key}/GroupNorm_1/bias"]},
           "conv2": {"kernel": flat[f"{key}/Conv_1/kernel"]}}
    if f"{key}/Conv_2/kernel" in flat:
        out["nin_shortcut"] = {"kernel": flat[f"{key}/Conv_2/kernel"]}
    return out


def _copy(flat: Mapping[str, np.ndarray], key: str) -> dict:
    """The leaves under ``key`` (``kernel``/``bias`` or ``scale``/``bias``) as a dict."""
    prefix = f"{key}/"
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}


def convert_tokenizer(flat: Mapping[str, np.ndarray], info: TokenizerInfo) -> dict:
    """The tokenizer's weights as the params of the :class:`~vqgen.tokenizers.vqgan.VQGAN` the
    config builds (nested dict of float32 arrays)."""
    nrb, levels = info.num_res_blocks, len(info.ch_mult)
    enc = {"conv_in": _copy(flat, "encoder/Conv_0"), "norm_out": _copy(flat, "encoder/GroupNorm_0"),
           "conv_out": _copy(flat, "encoder/Conv_1")}
    for i in range(levels):
        for j in range(nrb):
            enc[f"down_{i}_block_{j}"] = _resblock_params(flat, f"encoder/ResBlock_{i * nrb + j}")
    dec = {"conv_in": _copy(flat, "decoder/Conv_0"), "norm_out": _copy(flat, "decoder/GroupNorm_0"),
           "conv_out": _copy(flat, f"decoder/Conv_{levels}")}
    for j in range(nrb):
        enc[f"mid_block_{j + 1}"] = _resblock_params(flat, f"encoder/ResBlock_{levels * nrb + j}")
        dec[f"mid_block_{j + 1}"] = _resblock_params(flat, f"decoder/ResBlock_{j}")
    for k in range(levels):  # the decoder's k-th level from the lowest resolution is level L-1-k
        i = levels - 1 - k
        for j in range(nrb):
            dec[f"up_{i}_block_{j}"] = _resblock_params(flat, f"decoder/ResBlock_{nrb + k * nrb + j}")
        if i > 0:
            dec[f"up_{i}_upsample"] = {"conv": _copy(flat, f"decoder/Conv_{1 + k}")}
    return {"encoder": enc, "decoder": dec, "quantizer": {"codebook": flat["quantizer/codebook"]}}


# -------------------------------------------------------------------------------- transformer


def transformer_manifest(info: TransformerInfo) -> Manifest:
    """Every parameter path of the official ``Transformer`` with these sizes, and its shape."""
    d, h, f, v = info.width, info.num_heads, info.mlp_dim, info.vocab_size
    hd = d // h
    out: Manifest = {"Embed_0/word_embeddings/embedding": (v, d),
                     "Embed_0/position_embeddings/embedding": (info.positions, d)}
    _norm(out, "Embed_0/embeddings_ln", d)
    for i in range(info.depth):
        b = f"TransformerLayer_{i}"
        for part in ("query", "key", "value"):
            out[f"{b}/Attention_0/self_attention/{part}/kernel"] = (d, h, hd)
            out[f"{b}/Attention_0/self_attention/{part}/bias"] = (h, hd)
        out[f"{b}/Attention_0/self_attention/out/kernel"] = (h, hd, d)
        out[f"{b}/Attention_0/self_attention/out/bias"] = (d,)
        _norm(out, f"{b}/Attention_0/attention_output_ln", d)
        out.update({f"{b}/Mlp_0/intermediate_output/kernel": (d, f), f"{b}/Mlp_0/intermediate_output/bias": (f,),
                    f"{b}/Mlp_0/layer_output/kernel": (f, d), f"{b}/Mlp_0/layer_output/bias": (d,)})
        _norm(out, f"{b}/Mlp_0/layer_output_ln", d)
    out.update({"MlmLayer_0/mlm_dense/kernel": (d, d), "MlmLayer_0/mlm_dense/bias": (d,),
                "MlmLayer_0/mlm_bias/bias": (v,)})
    _norm(out, "MlmLayer_0/mlm_ln", d)
    return out


def inspect_transformer(flat: Mapping[str, np.ndarray], name: str = "the transformer file", *,
                        num_classes: int | None = None, codebook_size: int | None = None,
                        tokenizer_name: str = "the tokenizer file") -> TransformerInfo:
    """The sizes of a MaskGIT transformer checkpoint; raises :class:`ConversionError` unless every
    expected parameter is there with its shape and nothing else.

    The vocabulary ``codes + classes + 1`` is split by ``codebook_size`` (the tokenizer's, when it
    is converted too), else by ``num_classes`` (default :data:`NUM_CLASSES`).
    """
    if _is_tokenizer(flat) and not _is_transformer(flat):
        raise ConversionError(f"{name} is a MaskGIT tokenizer checkpoint, not the transformer; pass it as --tokenizer.")
    need = ("Embed_0/word_embeddings/embedding", "Embed_0/position_embeddings/embedding",
            "TransformerLayer_0/Attention_0/self_attention/query/kernel",
            "TransformerLayer_0/Mlp_0/intermediate_output/kernel", "MlmLayer_0/mlm_bias/bias")
    missing = [k for k in need if k not in flat]
    if missing:
        raise ConversionError(f"{name} is not a MaskGIT transformer checkpoint: it lacks {', '.join(missing)} (it has "
                              f"{len(flat)} parameters such as {', '.join(sorted(flat)[:3])}).")
    vocab, width = (int(n) for n in flat["Embed_0/word_embeddings/embedding"].shape)
    positions = int(flat["Embed_0/position_embeddings/embedding"].shape[0])
    query = flat["TransformerLayer_0/Attention_0/self_attention/query/kernel"]
    if query.ndim != 3 or int(query.shape[1]) * int(query.shape[2]) != width:
        raise ConversionError(f"{name}: the attention query kernel has shape {tuple(query.shape)}, not [width {width}, "
                              "heads, head width] with heads x head width = width; this is not a MaskGIT transformer "
                              "checkpoint.")
    side = math.isqrt(max(positions - 1, 0))
    if side < 1 or side * side + 1 != positions:
        raise ConversionError(f"{name} has {positions} position embeddings, which is not one class token and a square "
                              "token grid; vqgen converts MaskGIT's class-conditional transformer.")
    if codebook_size is not None:
        classes = vocab - codebook_size - 1
        if num_classes is not None and num_classes != classes:
            raise ConversionError(f"{name} has {vocab} vocabulary rows, which are {codebook_size} codes of "
                                  f"{tokenizer_name}, {classes} classes and the mask token, but --num-classes is "
                                  f"{num_classes}; drop --num-classes.")
        if classes < 1:
            raise ConversionError(f"{name} has {vocab} vocabulary rows, which leaves no class besides the "
                                  f"{codebook_size} codes of {tokenizer_name} and the mask token; pass the tokenizer "
                                  "the transformer was trained with.")
    else:
        classes = NUM_CLASSES if num_classes is None else int(num_classes)
        if vocab - classes - 1 < 1:
            raise ConversionError(f"{name} has {vocab} vocabulary rows, which leaves no code besides {classes} classes "
                                  "and the mask token; pass --num-classes with the number it was trained with.")
    info = TransformerInfo(depth=len(_indices(flat, r"^TransformerLayer_(\d+)/")), width=width,
                           num_heads=int(query.shape[1]),
                           mlp_dim=int(flat["TransformerLayer_0/Mlp_0/intermediate_output/kernel"].shape[-1]),
                           vocab_size=vocab, positions=positions, num_classes=classes)
    check_keys(flat, transformer_manifest(info), name=name, kind=f"MaskGIT {info.name}", what=WHAT)
    return info


def convert_transformer(flat: Mapping[str, np.ndarray], info: TransformerInfo) -> dict:
    """The transformer's weights as the params of :class:`vqgen.generators.maskgit.MaskGITTransformer`
    (nested dict of float32 arrays)."""
    params: dict[str, Any] = {
        "word_embeddings": flat["Embed_0/word_embeddings/embedding"],  # row K + C: the mask token (id -1 there)
        "position_embeddings": flat["Embed_0/position_embeddings/embedding"],
        "embeddings_ln": _copy(flat, "Embed_0/embeddings_ln"),
        "mlm_dense": _copy(flat, "MlmLayer_0/mlm_dense"), "mlm_ln": _copy(flat, "MlmLayer_0/mlm_ln"),
        "mlm_bias": flat["MlmLayer_0/mlm_bias/bias"],
    }
    for i in range(info.depth):
        b = f"TransformerLayer_{i}"
        params[f"layers_{i}"] = {
            "attention": {p: _copy(flat, f"{b}/Attention_0/self_attention/{p}")
                          for p in ("query", "key", "value", "out")},
            "attention_output_ln": _copy(flat, f"{b}/Attention_0/attention_output_ln"),
            **{p: _copy(flat, f"{b}/Mlp_0/{p}") for p in ("intermediate_output", "layer_output", "layer_output_ln")},
        }
    return params


# ------------------------------------------------------------------------------------- config


def image_size_from_name(*paths: str | None) -> int | None:
    """The image size in a released file's name (``maskgit_imagenet512_checkpoint``: 512), if any."""
    for path in paths:
        match = IMAGE_SIZE_IN_NAME.search(os.path.basename(path or ""))
        if match:
            return int(match.group(1))
    return None


def _check_against_config(config, spec: str, tok: TokenizerInfo | None, tr: TransformerInfo | None, tok_name: str,
                          tr_name: str) -> None:
    """Refuses files whose sizes differ from the architecture ``--config`` describes."""
    section = config.get("tokenizer")
    if section is None or (section.get("arch"), section.get("style")) != ("vqgan", "maskgit"):
        what = f"{tok_name} ({tok.name})" if tok is not None else f"the tokenizer of {tr_name}"
        raise ConversionError(f"--config {spec} has no MaskGIT-style VQGAN tokenizer, so it cannot describe {what}; "
                              "pass a MaskGIT config or drop --config.")
    if tok is not None:
        want = (int(section.ch), tuple(int(m) for m in section.ch_mult), int(section.quantizer.codebook_size))
        if want != (tok.filters, tok.ch_mult, tok.codebook_size):
            raise ConversionError(
                f"{tok_name} is a MaskGIT tokenizer with {tok.filters} filters, multipliers {tok.ch_mult} and "
                f"{tok.codebook_size} codes but --config {spec} describes {want[0]} filters, multipliers {want[1]} "
                f"and {want[2]} codes; pass the matching file or config, or drop --config.")
    if tr is not None:
        gen = config.get("generator")
        if gen is None or gen.get("arch") != "maskgit":
            raise ConversionError(f"--config {spec} has no MaskGIT generator, so it cannot describe {tr_name} "
                                  f"({tr.name}); pass a generators/maskgit config or drop --config.")
        want = (int(gen.depth), int(gen.width), int(gen.num_heads))
        if want != (tr.depth, tr.width, tr.num_heads):
            raise ConversionError(
                f"{tr_name} is a MaskGIT {tr.name} with {tr.num_heads} heads but --config {spec} describes {want[0]} "
                f"layers of width {want[1]} with {want[2]} heads; pass the matching file or config, or drop --config.")


def make_config(tok: TokenizerInfo | None, tr: TransformerInfo | None, image_size: int | None = None, *,
                dtype: str | None = None, config: str | None = None, paths: Sequence[str | None] = (),
                tok_name: str = "the tokenizer file", tr_name: str = "the transformer file"
                ) -> tuple[ml_collections.ConfigDict, str]:
    """The config (locked) with the sizes of the converted files written over it, and its name.

    ``config`` names the base config (default :data:`GENERATOR_CONFIG` with a transformer, else
    :data:`TOKENIZER_CONFIG`); a config of other sizes is refused. The image size is
    ``image_size``, else the transformer's grid times the downsampling, else a size in one of the
    file names ``paths``, else the config's.
    """
    from vqgen import config_lib  # the configs import the training stack

    spec = config or (GENERATOR_CONFIG if tr is not None else TOKENIZER_CONFIG)
    base = config_lib.load_config(spec)
    if config:
        _check_against_config(base, spec, tok, tr, tok_name, tr_name)
    section = base.tokenizer
    if tok is not None:
        set_fields(section, ch=tok.filters, ch_mult=tok.ch_mult, num_res_blocks=tok.num_res_blocks,
             z_channels=tok.embedding_dim, embed_dim=tok.embedding_dim, attn_resolutions=(), use_quant_conv=False,
             norm_groups=32, pixel_range="unit")
        set_fields(section.quantizer, codebook_size=tok.codebook_size)
        if "l2_normalize" in section.quantizer:
            set_fields(section.quantizer, l2_normalize=False)
        set_fields(base.data, channels=tok.in_channels)
    else:
        set_fields(section.quantizer, codebook_size=tr.codebook_size)
    factor = 2 ** (len(section.ch_mult) - 1)
    stored = tr.grid * factor if tr is not None else None
    if image_size is not None and stored is not None and int(image_size) != stored:
        raise ConversionError(f"{tr_name} has a {tr.grid}x{tr.grid} token grid ({stored}px with {factor}x "
                              f"downsampling) but --image-size {image_size} was given; drop --image-size.")
    size = int(image_size or stored or image_size_from_name(*paths) or base.data.image_size)
    if size % factor:
        raise ConversionError(f"the image size {size} is not a multiple of the tokenizer's downsampling {factor}; "
                              f"pass --image-size as a multiple of {factor} (256 or 512 for MaskGIT's releases).")
    set_fields(base.data, image_size=size)
    if tr is not None:
        set_fields(base.data, num_classes=tr.num_classes)
        set_fields(base.generator, depth=tr.depth, width=tr.width, num_heads=tr.num_heads, mlp_dim=tr.mlp_dim,
             class_dropout_prob=0.0)  # the released vocabulary has no "no label" row
        if "tie_embeddings" in base.generator:
            set_fields(base.generator, tie_embeddings=True)
        set_fields(base.sample, cfg_scale=1.0, cfg_schedule="constant")  # guidance needs the null class
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(section, dtype=dtype)
        if tr is not None:
            set_fields(base.generator, dtype=dtype)
    base.lock()
    return base, spec


# ------------------------------------------------------------------------------------ convert


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config and the params of each model it was given."""

    config: ml_collections.ConfigDict
    config_name: str
    tokenizer: TokenizerInfo | None = None
    transformer: TransformerInfo | None = None
    tokenizer_params: dict | None = None
    generator_params: dict | None = None


def convert(tokenizer: Mapping[str, np.ndarray] | None = None, transformer: Mapping[str, np.ndarray] | None = None,
            *, image_size: int | None = None, num_classes: int | None = None, dtype: str | None = None,
            config: str | None = None, paths: Sequence[str | None] = (), tokenizer_name: str = "the tokenizer file",
            transformer_name: str = "the transformer file") -> Converted:
    """Checks and converts MaskGIT parameter trees (flat, as :func:`read` returns them) into vqgen
    params and a config; writes nothing. Either may be None (a tokenizer-only or generator-only
    conversion). Raises :class:`~vqgen.convert.workdir.ConversionError` with one sentence."""
    if tokenizer is None and transformer is None:
        raise ConversionError("nothing to convert; pass --tokenizer, --transformer or both.")
    tok = inspect_tokenizer(tokenizer, tokenizer_name) if tokenizer is not None else None
    tr = None
    if transformer is not None:
        tr = inspect_transformer(transformer, transformer_name, num_classes=num_classes,
                                 codebook_size=tok.codebook_size if tok is not None else None,
                                 tokenizer_name=tokenizer_name)
    cfg, spec = make_config(tok, tr, image_size, dtype=dtype, config=config, paths=paths, tok_name=tokenizer_name,
                            tr_name=transformer_name)
    return Converted(config=cfg, config_name=spec, tokenizer=tok, transformer=tr,
                     tokenizer_params=convert_tokenizer(tokenizer, tok) if tok is not None else None,
                     generator_params=convert_transformer(transformer, tr) if tr is not None else None)


def convert_files(tokenizer: str | None, transformer: str | None, out: str, *, mesh=None, **kwargs: Any) -> Converted:
    """Reads the files, converts them (:func:`convert`, which takes ``kwargs``) and writes the
    workdir ``out`` (on ``mesh``, default the config's)."""
    converted = convert(read(tokenizer) if tokenizer else None, read(transformer) if transformer else None,
                        paths=(transformer, tokenizer),
                        tokenizer_name=os.path.basename(tokenizer or "") or "the tokenizer file",
                        transformer_name=os.path.basename(transformer or "") or "the transformer file", **kwargs)
    write_workdir(converted.config, out, tokenizer_params=converted.tokenizer_params,
                  generator_params=converted.generator_params, mesh=mesh)
    return converted


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m vqgen.convert.maskgit",
        description="Convert MaskGIT's released Flax tokenizer and/or transformer checkpoints into a vqgen workdir.")
    parser.add_argument("--tokenizer", help="the tokenizer checkpoint, e.g. tokenizer_imagenet256_checkpoint")
    parser.add_argument("--transformer", help="the transformer checkpoint, e.g. maskgit_imagenet256_checkpoint")
    parser.add_argument("--out", required=True, help="the workdir to write (must not hold checkpoints yet)")
    parser.add_argument("--config", default=None, help=f"base config (default {GENERATOR_CONFIG}, or "
                                                       f"{TOKENIZER_CONFIG} for a tokenizer alone); a config of "
                                                       "other sizes is refused")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size (default: from the transformer's grid, else the file name, else 256)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help=f"classes of a transformer converted without its tokenizer (default {NUM_CLASSES})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of both models (default: the config's)")
    args = parser.parse_args(argv)
    if not args.tokenizer and not args.transformer:
        parser.error("pass --tokenizer, --transformer or both")
    converted = convert_files(args.tokenizer, args.transformer, args.out, image_size=args.image_size,
                              num_classes=args.num_classes, dtype=args.dtype, config=args.config)
    print("\n".join(describe(converted, args.out)))
    return converted


def describe(converted: Converted, out: str) -> list[str]:
    """The lines the command prints after writing ``out``: what was converted."""
    parts = []
    if converted.tokenizer is not None:
        t = converted.tokenizer
        parts.append(f"tokenizer (MaskGIT {t.name} of width {t.embedding_dim}, {t.filters} filters)")
    if converted.transformer is not None:
        g = converted.transformer
        parts.append(f"generator (MaskGIT {g.name}: {g.num_heads} heads, {g.codebook_size} codes, "
                     f"{g.num_classes} classes)")
    cfg = converted.config
    grid = cfg.data.image_size // 2 ** (len(cfg.tokenizer.ch_mult) - 1)
    lines = [f"wrote {out}: {' and '.join(parts)} for {cfg.data.image_size}px images ({grid}x{grid} tokens), "
             f"config {converted.config_name} with the sizes of the files"]
    return lines


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
