"""Convert Open-MAGVIT2's released AR generators (TencentARC/SEED-Voken) into a vqgen workdir.

    python -m vqgen.convert.open_magvit2_ar --ckpt AR_256_B.ckpt --tokenizer imagenet_256_L.ckpt --out runs/om2_B
    python -m vqgen.convert.open_magvit2_ar --ckpt AR_256_L.ckpt --tokenizer runs/open_magvit2_256_L --out runs/om2_L
    python -m vqgen.convert.open_magvit2_ar --ckpt AR_256_XL.ckpt --tokenizer AR_256_XL.ckpt --out runs/om2_XL

The workdir holds ``config.json`` and step-0 checkpoints of the tokenizer and generator phases
(:mod:`vqgen.convert.workdir`), so ``vqgen.load_generator(out)`` and ``--mode=sample`` use it as
if vqgen had trained it. The generator is :class:`vqgen.generators.gpt_factorized.FactorizedGPT`
(``generator.arch='gpt_factorized'``) with ``configs/generators/open_magvit2_ar.py:<size>`` as the
base config (the variant of the file's depth, width and factorised depth, else the nearest width)
and the released sampling settings.

The tokenizer (``--tokenizer``), which must be Open-MAGVIT2's LFQ with as many bits as the AR
model's two heads cut (``sum(factorized_bits)``):

- a SeedVoken tokenizer checkpoint (``imagenet_256_L.ckpt``), converted with
  :mod:`vqgen.convert.seed_voken` (its EMA weights, or the raw ones with ``--no-ema``);
- the AR checkpoint itself: the Lightning module keeps the tokenizer it trained on and decodes
  with as ``first_stage_model.*`` (the raw tokenizer weights: the AR configs set ``use_ema:
  False``), converted the same way;
- a vqgen workdir holding an Open-MAGVIT2 tokenizer (``python -m vqgen.convert.seed_voken``'s):
  ``--out`` may be that workdir (the generator is added to it) or a new one (the tokenizer's
  weights are copied).

Its ids must be numbered in Open-MAGVIT2's own bit order (``bit_order='lsb'``, which the
seed_voken converter writes): the official AR model's first head predicts the low
``factorized_bits[0]`` bits of the id.

Read from the shapes: the spatial and factorised depths (``spatial_blocks.{i}``,
``factorized_blocks.{i}``), the width, the kv heads (``wqkv`` rows ``(heads + 2 kv_heads) *
head_dim``), the SwiGLU width, ``factorized_bits`` (``pre_emb``/``post_emb`` rows ``2**bits``)
and the classes (``class_emb`` rows: the classes and the CFG null row, unless ``--num-classes``
says there is none). Not in the files: the attention heads (``--num-heads``; default width / 64,
the head width of every release) and the token grid, which is the tokenizer's at its image size.

Files: a Lightning ``.ckpt`` (the transformer under ``state_dict`` as ``transformer.*``, beside
``first_stage_model.*``) or a plain state dict of the ``GPT`` module, read with
``torch.load(map_location="cpu", weights_only=True)``; Lightning's other pickled objects are read
as inert placeholders (:class:`vqgen.convert.workdir.OpaqueObject`). The released AR checkpoints
hold no EMA weights (``Net2NetTransformer`` keeps none); a checkpoint with ``LitEma`` copies of
the transformer (``model_ema.transformer<name without dots>``, SeedVoken's EMA layout) gives
those by default and the raw ones with ``--no-ema``. Every key of the transformer and its shape
(:func:`manifest`) is checked before anything is written; the official KV-cache buffers are
accepted and not converted; a file of another family (a tokenizer, LlamaGen's or IBQ's GPT) is
refused in one sentence.

Mapping (PyTorch -> vqgen, linears transposed to ``[in, out]``):

- ``class_emb.embedding_table.weight`` -> ``class_emb/embedding_table``; ``pre_emb.weight`` /
  ``post_emb.weight`` -> ``pre_emb/embedding`` / ``post_emb/embedding``.
- ``{spatial,factorized}_blocks.{i}.attention.wqkv.weight`` -> ``{..}_blocks_{i}/attention/wq, wk,
  wv`` (rows ``[D, KV hd, KV hd]``, head axes split off), ``attention.wo`` -> ``wo [H, hd, D]``,
  ``feed_forward.w1/w3/w2`` keep their names, ``attention_norm``, ``ffn_norm`` and ``norm``
  ``weight`` -> ``scale``; ``head.{i}.weight [2**bits_i, D]`` -> ``head_{i}/kernel``.
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

from vqgen.convert import seed_voken
from vqgen.convert.conv_blocks import count_indices
from vqgen.convert.llamagen import class_count, ffn_fields, kv_heads_of
from vqgen.convert.workdir import ConversionError, check_keys, linear_kernel, read_state_dict, set_fields, write_workdir
from vqgen.generators import gpt_factorized

WRAPPERS = (("state_dict",), ("model",))
TRANSFORMER = "transformer."
TOKENIZER = "first_stage_model."
EMA_PREFIX = "model_ema."
EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")
CONFIG = "generators/open_magvit2_ar"
HEAD_WIDTH = 64  # the head width of every released size (1024/16, 1280/20, 1536/24)
BLOCKS = ("spatial_blocks", "factorized_blocks")


@dataclasses.dataclass(frozen=True)
class ARInfo:
    """Sizes of an Open-MAGVIT2 AR transformer state dict, read from its shapes (and the flags)."""

    depth: int
    factorized_depth: int
    width: int
    num_heads: int
    num_kv_heads: int
    hidden_dim: int
    factorized_bits: tuple[int, int]
    num_classes: int
    null_class: bool
    has_ema: bool = False

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def variant(self) -> str | None:
        """The released size with this depth, width, heads and factorised depth, if any."""
        for name, arch in gpt_factorized.VARIANTS.items():
            if (arch["depth"], arch["width"], arch["num_heads"], arch["factorized_depth"]) == (
                    self.depth, self.width, self.num_heads, self.factorized_depth):
                return name
        return None

    @property
    def name(self) -> str:
        return (f"Open-MAGVIT2 AR-{self.variant}" if self.variant else
                f"Open-MAGVIT2 AR ({self.depth}+{self.factorized_depth} layers, width {self.width})")


def manifest(info: ARInfo) -> dict[str, tuple[int, ...]]:
    """Every parameter key of the official ``GPT(token_factorization=True)`` with these sizes."""
    d, f = info.width, info.hidden_dim
    b0, b1 = info.factorized_bits
    out: dict[str, tuple[int, ...]] = {
        "class_emb.embedding_table.weight": (info.num_classes + int(info.null_class), d),
        "pre_emb.weight": (2**b0, d), "post_emb.weight": (2**b1, d), "norm.weight": (d,),
        "head.0.weight": (2**b0, d), "head.1.weight": (2**b1, d),
    }
    qkv = (info.num_heads + 2 * info.num_kv_heads) * info.head_dim
    for blocks, depth in zip(BLOCKS, (info.depth, info.factorized_depth)):
        for i in range(depth):
            b = f"{blocks}.{i}"
            out.update({
                f"{b}.attention.wqkv.weight": (qkv, d), f"{b}.attention.wo.weight": (d, d),
                f"{b}.feed_forward.w1.weight": (f, d), f"{b}.feed_forward.w3.weight": (f, d),
                f"{b}.feed_forward.w2.weight": (d, f), f"{b}.attention_norm.weight": (d,),
                f"{b}.ffn_norm.weight": (d,)})
    return out


def ema_key(key: str) -> str:
    """The ``LitEma`` buffer of the Lightning module's parameter ``transformer.<key>``."""
    return EMA_PREFIX + (TRANSFORMER + key).replace(".", "")


def _other_family(state: Mapping) -> str | None:
    if "tok_embeddings.weight" in state and any(k.startswith("layers.") for k in state):
        return "a LlamaGen GPT state dict; convert it with python -m vqgen.convert.llamagen"
    if "tok_emb.weight" in state or any(k.startswith("blocks.") for k in state):
        return ("a transformer without Open-MAGVIT2's factorised embeddings (tok_emb/blocks: IBQ's or VAR's "
                "transformer), which this converter does not convert")
    if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in state):
        return ("a tokenizer state dict, not the AR transformer; pass it as --tokenizer and the AR checkpoint "
                "(AR_256_B.ckpt ...) as --ckpt")
    return None


def split_checkpoint(state: Mapping[str, np.ndarray], name: str = "the AR checkpoint"
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(transformer state dict, everything else)``: the ``transformer.*`` keys of a Lightning
    ``Net2NetTransformer`` without the prefix, or the whole of a bare ``GPT`` state dict."""
    if any(k.startswith(TRANSFORMER) for k in state):
        gpt = {k[len(TRANSFORMER):]: v for k, v in state.items() if k.startswith(TRANSFORMER)}
        rest = {k: v for k, v in state.items() if not k.startswith(TRANSFORMER)}
        return gpt, rest
    other = _other_family(state)
    if other:
        raise ConversionError(f"{name} is {other}.")
    return dict(state), {}


def _buffers(state: Mapping) -> list[str]:
    """The official KV-cache buffers a state dict may hold (saved after sampling; not converted)."""
    return [k for k in state if k.endswith((".attention.kv_cache.k_cache", ".attention.kv_cache.v_cache"))]


def _bits(rows: int, key: str, name: str) -> int:
    bits = int(round(math.log2(rows))) if rows > 0 else -1
    if bits < 1 or 2**bits != rows:
        raise ConversionError(f"{name}: {key} has {rows} rows, not a power of two, so it is not an Open-MAGVIT2 "
                              "sub-token embedding; pass an Open-MAGVIT2 AR checkpoint.")
    return bits


def inspect(state: Mapping[str, np.ndarray], name: str = "the AR checkpoint", *, num_heads: int | None = None,
            num_classes: int | None = None, use_ema: bool = True) -> ARInfo:
    """The sizes of an Open-MAGVIT2 AR checkpoint (after :func:`split_checkpoint`: the transformer's
    keys, and the rest); raises :class:`ConversionError` unless every expected key is there with
    its shape and nothing else."""
    gpt, rest = split_checkpoint(state, name)
    other = _other_family(gpt)
    if other:
        raise ConversionError(f"{name} is {other}.")
    need = ("pre_emb.weight", "post_emb.weight", "class_emb.embedding_table.weight", "head.0.weight",
            "spatial_blocks.0.attention.wqkv.weight", "spatial_blocks.0.feed_forward.w1.weight")
    missing = [k for k in need if k not in gpt]
    if missing:
        raise ConversionError(f"{name} is not an Open-MAGVIT2 AR transformer (GPT with token_factorization): it lacks "
                              f"{', '.join(missing)} (it has {len(gpt)} keys such as {', '.join(sorted(gpt)[:3])}).")
    width = int(gpt["pre_emb.weight"].shape[1])
    bits = (_bits(int(gpt["pre_emb.weight"].shape[0]), "pre_emb.weight", name),
            _bits(int(gpt["post_emb.weight"].shape[0]), "post_emb.weight", name))
    if num_heads is None:
        if width % HEAD_WIDTH:
            raise ConversionError(f"{name} has width {width}, which is not a multiple of the released head width "
                                  f"{HEAD_WIDTH}, and the file does not store the attention heads; pass --num-heads.")
        num_heads = width // HEAD_WIDTH
    if num_heads < 1 or width % num_heads:
        raise ConversionError(f"{name} has width {width}, which {num_heads} heads do not divide; pass the head count "
                              "it was trained with in --num-heads.")
    kv_heads = kv_heads_of(name, int(gpt["spatial_blocks.0.attention.wqkv.weight"].shape[0]), width, num_heads)
    num_classes, null_class = class_count(name, int(gpt["class_emb.embedding_table.weight"].shape[0]), num_classes)
    info = ARInfo(depth=count_indices(gpt, r"^spatial_blocks\.(\d+)\."),
                  factorized_depth=count_indices(gpt, r"^factorized_blocks\.(\d+)\."), width=width,
                  num_heads=num_heads, num_kv_heads=kv_heads,
                  hidden_dim=int(gpt["spatial_blocks.0.feed_forward.w1.weight"].shape[0]), factorized_bits=bits,
                  num_classes=num_classes, null_class=null_class,
                  has_ema=any(k.startswith(EMA_PREFIX + TRANSFORMER.rstrip(".")) for k in rest))
    weights = manifest(info)
    check_keys(gpt, weights, name=name, kind=f"SeedVoken {info.name}", ignore=_buffers(gpt))
    if info.has_ema:
        ema = {ema_key(k): v for k, v in weights.items()}
        present = {k: v for k, v in rest.items() if k.startswith(EMA_PREFIX + TRANSFORMER.rstrip("."))}
        check_keys(present, ema, name=name, kind=f"SeedVoken {info.name} EMA")
    unexpected = sorted(k for k in rest if not k.startswith((TOKENIZER, EMA_PREFIX)))
    if unexpected:
        raise ConversionError(f"{name} holds {len(unexpected)} key(s) that are neither the transformer, its EMA nor "
                              f"the tokenizer ({', '.join(unexpected[:3])}); pass an Open-MAGVIT2 AR checkpoint.")
    return info


def select_weights(state: Mapping[str, np.ndarray], info: ARInfo, use_ema: bool) -> dict[str, np.ndarray]:
    """The transformer's weights under their official names: the EMA copies when the file has them
    and ``use_ema``, else the raw ones."""
    gpt, rest = split_checkpoint(state)
    if use_ema and info.has_ema:
        return {k: rest[ema_key(k)] for k in manifest(info)}
    return {k: gpt[k] for k in manifest(info)}


def convert_params(weights: Mapping[str, np.ndarray], info: ARInfo) -> dict:
    """The transformer's weights as the params of :class:`~vqgen.generators.gpt_factorized.FactorizedGPT`."""
    d, h, kv, hd = info.width, info.num_heads, info.num_kv_heads, info.head_dim

    def dense(key):
        return {"kernel": linear_kernel(weights[f"{key}.weight"])}

    params: dict[str, Any] = {
        "class_emb": {"embedding_table": weights["class_emb.embedding_table.weight"]},
        "pre_emb": {"embedding": weights["pre_emb.weight"]}, "post_emb": {"embedding": weights["post_emb.weight"]},
        "norm": {"scale": weights["norm.weight"]}, "head_0": dense("head.0"), "head_1": dense("head.1"),
    }
    for blocks, depth in zip(BLOCKS, (info.depth, info.factorized_depth)):
        for i in range(depth):
            b = f"{blocks}.{i}"
            q, k, v = np.split(weights[f"{b}.attention.wqkv.weight"], [d, d + kv * hd])  # rows [D, KV hd, KV hd]
            params[f"{blocks}_{i}"] = {
                "attention": {
                    "wq": {"kernel": linear_kernel(q).reshape(d, h, hd)},
                    "wk": {"kernel": linear_kernel(k).reshape(d, kv, hd)},
                    "wv": {"kernel": linear_kernel(v).reshape(d, kv, hd)},
                    "wo": {"kernel": linear_kernel(weights[f"{b}.attention.wo.weight"]).reshape(h, hd, d)},
                },
                "feed_forward": {part: dense(f"{b}.feed_forward.{part}") for part in ("w1", "w2", "w3")},
                "attention_norm": {"scale": weights[f"{b}.attention_norm.weight"]},
                "ffn_norm": {"scale": weights[f"{b}.ffn_norm.weight"]},
            }
    return params


# ------------------------------------------------------------------------------------ tokenizer


@dataclasses.dataclass
class TokenizerSource:
    """The tokenizer the generator is written with: its config sections, and its params unless
    the workdir written to already holds it."""

    config: ml_collections.ConfigDict  # a config with the tokenizer's data and tokenizer sections
    params: dict | None
    description: str


def _tokenizer_from_state(state: Mapping[str, np.ndarray], name: str, *, use_ema: bool, image_size: int | None,
                          dtype: str | None) -> TokenizerSource:
    if any(k.startswith(TOKENIZER) for k in state):  # an AR checkpoint: the tokenizer it trained and decodes with
        state = {k[len(TOKENIZER):]: v for k, v in state.items() if k.startswith(TOKENIZER)}
        what = "the AR checkpoint's first_stage_model"
    elif any(k.startswith(TRANSFORMER) for k in state):
        raise ConversionError(f"{name} is an AR checkpoint without its tokenizer (no first_stage_model.* keys); pass "
                              "the tokenizer's checkpoint (imagenet_256_L.ckpt) or workdir as --tokenizer.")
    else:
        what = name
    family = seed_voken.family_of(state, name)
    if family != "magvit2":
        raise ConversionError(f"{name} is an IBQ tokenizer, but Open-MAGVIT2's AR models read the ids of an "
                              "Open-MAGVIT2 (LFQ) tokenizer; pass the one the AR model was trained with.")
    ema = use_ema and any(k.startswith(seed_voken.EMA_PREFIX) for k in state)
    converted = seed_voken.convert(state, use_ema=ema, image_size=image_size, dtype=dtype, name=name)
    weights = "EMA" if ema else "raw"
    return TokenizerSource(converted.config, converted.tokenizer_params,
                           f"{converted.info.name} from {what}, {weights} weights")


def _tokenizer_from_workdir(path: str, out: str, mesh=None) -> TokenizerSource:
    from vqgen import fileio
    from vqgen.api import load_config_from_workdir
    from vqgen.train import tokenizer as tokenizer_lib

    config = load_config_from_workdir(path)
    if "tokenizer" not in config:
        raise ConversionError(f"{path} is a vqgen workdir without a tokenizer; pass the Open-MAGVIT2 tokenizer's "
                              "workdir or checkpoint as --tokenizer.")
    same = os.path.abspath(fileio.display(path)) == os.path.abspath(fileio.display(out))
    params = None
    if not same:
        import jax

        frozen = tokenizer_lib.load_frozen_tokenizer(config, path, mesh)
        params = jax.tree.map(np.asarray, jax.device_get(frozen.params))
    return TokenizerSource(config, params, f"the tokenizer of {path}" + (" (kept)" if same else " (copied)"))


def read_tokenizer(path: str, out: str, *, use_ema: bool = True, image_size: int | None = None,
                   dtype: str | None = None, mesh=None) -> TokenizerSource:
    """The tokenizer named by ``--tokenizer``: a vqgen workdir, a SeedVoken tokenizer checkpoint or an
    AR checkpoint with its ``first_stage_model``."""
    if os.path.isdir(path) or str(path).startswith("gs://"):
        if image_size is not None:
            raise ConversionError(f"--image-size is read from the tokenizer workdir {path}; drop --image-size.")
        return _tokenizer_from_workdir(path, out, mesh)
    state = read_state_dict(path, WRAPPERS, opaque_objects=True)[0]
    return _tokenizer_from_state(state, os.path.basename(path), use_ema=use_ema, image_size=image_size, dtype=dtype)


def check_tokenizer(tok_config, info: ARInfo, tok_name: str, name: str) -> None:
    """Raises :class:`ConversionError` unless the tokenizer's ids are what the AR model reads."""
    q = tok_config.tokenizer.get("quantizer")
    if q is None or q.get("type") != "lfq":
        raise ConversionError(f"{tok_name} is not a lookup-free (LFQ) tokenizer, but {name} reads the ids of "
                              "Open-MAGVIT2's LFQ tokenizer; pass the tokenizer the AR model was trained with.")
    bits = sum(info.factorized_bits)
    if int(q.dim) != bits:
        raise ConversionError(f"{tok_name} has {int(q.dim)}-bit codes but {name} cuts {bits}-bit ids into "
                              f"{info.factorized_bits}; pass the tokenizer the AR model was trained with.")
    if q.get("bit_order", "msb") != "lsb":
        raise ConversionError(f"{tok_name} numbers its codes most significant bit first, but {name} reads "
                              "Open-MAGVIT2's own ids (channel i = bit i); convert the tokenizer with python -m "
                              "vqgen.convert.seed_voken.")


# ----------------------------------------------------------------------------------------- config


def make_config(info: ARInfo, tokenizer: ml_collections.ConfigDict, *, dtype: str | None = None
                ) -> tuple[ml_collections.ConfigDict, str]:
    """``configs/generators/open_magvit2_ar.py:<size>`` with the tokenizer's sections and the
    file's sizes written over it (locked), and its name."""
    from vqgen import config_lib  # the configs import the training stack

    variant = info.variant or min(gpt_factorized.VARIANTS,
                                  key=lambda v: abs(gpt_factorized.VARIANTS[v]["width"] - info.width))
    spec = f"{CONFIG}:{variant}"
    base = config_lib.load_config(spec)
    with base.unlocked():
        base.tokenizer = ml_collections.ConfigDict(tokenizer.tokenizer.to_dict())
        base.data = ml_collections.ConfigDict(tokenizer.data.to_dict())
    set_fields(base.data, num_classes=info.num_classes)
    gen = base.generator
    set_fields(gen, depth=info.depth, factorized_depth=info.factorized_depth, width=info.width,
               num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, factorized_bits=info.factorized_bits,
               bit_order="lsb", **ffn_fields(info.width, info.hidden_dim))
    if not info.null_class:
        set_fields(gen, class_dropout_prob=0.0)
        set_fields(base.sample, cfg_scale=1.0, post_cfg_scale=1.0)  # guidance needs the null class
    if dtype is not None:
        if dtype not in ("float32", "bfloat16"):
            raise ConversionError(f"--dtype {dtype} is not a compute dtype vqgen runs; use float32 or bfloat16.")
        set_fields(gen, dtype=dtype)
        set_fields(base.tokenizer, dtype=dtype)
    base.lock()
    return base, spec


@dataclasses.dataclass
class Converted:
    """What :func:`convert` makes: the config and its name, the sizes, the generator params, whether
    EMA weights were taken, and the tokenizer."""

    config: ml_collections.ConfigDict
    config_name: str
    info: ARInfo
    generator_params: dict
    ema: bool
    tokenizer: TokenizerSource


def convert(state: Mapping[str, np.ndarray], tokenizer: TokenizerSource, *, num_heads: int | None = None,
            num_classes: int | None = None, use_ema: bool = True, dtype: str | None = None,
            name: str = "the AR checkpoint", tokenizer_name: str = "the tokenizer") -> Converted:
    """Checks and converts an Open-MAGVIT2 AR state dict (NumPy arrays) for ``tokenizer``; writes
    nothing. Raises :class:`~vqgen.convert.workdir.ConversionError` with one sentence."""
    info = inspect(state, name, num_heads=num_heads, num_classes=num_classes, use_ema=use_ema)
    check_tokenizer(tokenizer.config, info, tokenizer_name, name)
    cfg, spec = make_config(info, tokenizer.config, dtype=dtype)
    params = convert_params(select_weights(state, info, use_ema), info)
    return Converted(config=cfg, config_name=spec, info=info, generator_params=params,
                     ema=use_ema and info.has_ema, tokenizer=tokenizer)


def convert_files(ckpt: str, tokenizer: str, out: str, *, use_ema: bool = True, image_size: int | None = None,
                  dtype: str | None = None, mesh=None, **kwargs: Any) -> Converted:
    """Reads the files, converts them (:func:`convert`, which takes ``kwargs``) and writes ``out``."""
    state = read_state_dict(ckpt, WRAPPERS, opaque_objects=True)[0]
    if os.path.abspath(tokenizer) == os.path.abspath(ckpt):
        source = _tokenizer_from_state(state, os.path.basename(ckpt), use_ema=use_ema, image_size=image_size,
                                       dtype=dtype)
    else:
        source = read_tokenizer(tokenizer, out, use_ema=use_ema, image_size=image_size, dtype=dtype, mesh=mesh)
    converted = convert(state, source, use_ema=use_ema, dtype=dtype, name=os.path.basename(ckpt),
                        tokenizer_name=os.path.basename(os.path.normpath(tokenizer)), **kwargs)
    write_workdir(converted.config, out, tokenizer_params=source.params, generator_params=converted.generator_params,
                  mesh=mesh)
    return converted


def main(argv: Sequence[str] | None = None) -> Converted:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m vqgen.convert.open_magvit2_ar",
                                     description="Convert an Open-MAGVIT2 AR generator (TencentARC/SEED-Voken) and its "
                                                 "tokenizer into a vqgen workdir.")
    parser.add_argument("--ckpt", required=True, help="the AR checkpoint, e.g. AR_256_B.ckpt")
    parser.add_argument("--tokenizer", required=True,
                        help="the Open-MAGVIT2 tokenizer: its checkpoint (imagenet_256_L.ckpt), a vqgen workdir "
                             "holding it, or the AR checkpoint itself (its first_stage_model)")
    parser.add_argument("--out", required=True, help="the workdir to write (may be the --tokenizer workdir)")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (default: width / 64)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes, needed only for a class table without the CFG null row")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="convert raw weights instead of EMA copies (model_ema.*) where a file has them")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size of a tokenizer checkpoint (default: its config's 256)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of both models (default: the config's bfloat16)")
    args = parser.parse_args(argv)
    converted = convert_files(args.ckpt, args.tokenizer, args.out, use_ema=args.use_ema, image_size=args.image_size,
                              dtype=args.dtype, num_heads=args.num_heads, num_classes=args.num_classes)
    info, cfg = converted.info, converted.config
    from vqgen.train import builders

    grid = "x".join(map(str, builders.token_spec(cfg).grid))
    print(f"wrote {args.out}: generator ({info.name}: {info.depth} spatial + {info.factorized_depth} factorised "
          f"layers, width {info.width}, {info.num_heads} heads, sub-ids of {info.factorized_bits[0]}+{info.factorized_bits[1]} "
          f"bits, {info.num_classes} classes, {'EMA' if converted.ema else 'raw'} weights) and tokenizer "
          f"({converted.tokenizer.description}) for {cfg.data.image_size}px images ({grid} tokens), config "
          f"{converted.config_name} with the sizes of the files")
    return converted


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
