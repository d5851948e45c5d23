"""Config files and the sections they share.

:func:`load_config` is the one way a config file is found and loaded (the command line, the
Python API, the tests and the config files that build on each other all use it): by path
(``configs/quickstart.py:maskgit``) or by name (``quickstart:maskgit``,
``generators/llamagen:B``, ``llamagen:B``), from any working directory. The section builders
below (mesh, data, training loops, sampling) are what every config in ``configs/`` shares.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from vqgen import generators, parallel

# Where configs are found by name: $VQGEN_CONFIG_DIR, else the configs/ folder beside the package
# (the repository checkout that `pip install -e .` installs from).
CONFIG_DIR_ENV = "VQGEN_CONFIG_DIR"


def config_dir() -> Path:
    env = os.environ.get(CONFIG_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "configs"


def known_configs() -> list[str]:
    """Names of the config files in :func:`config_dir` (``quickstart``, ``generators/llamagen``, ...)."""
    root = config_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.py") if not p.name.startswith("_"))


def split_spec(spec: str) -> tuple[str, str | None]:
    """``'name_or_path[:variant]'`` -> ``(name_or_path, variant or None)``."""
    name, sep, arg = str(spec).partition(":")
    return name, (arg if sep and arg else None)


def resolve_config(spec: str) -> tuple[Path, str | None]:
    """The file and variant of a config spec; ``ValueError`` listing the known names when none matches.

    Tried in order: the path as given (``.py`` optional), then the name under :func:`config_dir`
    (``quickstart``, ``generators/llamagen``), then a unique file of that name in a sub-folder
    (``llamagen`` -> ``generators/llamagen.py``).
    """
    name, arg = split_spec(spec)
    if not name:
        raise ValueError("--config is empty; pass a config name or file, e.g. --config=quickstart.")
    with_py = name if name.endswith(".py") else name + ".py"
    root = config_dir()
    candidates = [Path(name), Path(with_py), root / with_py]
    stem = Path(with_py).name
    candidates += sorted(root.rglob(stem)) if root.is_dir() and Path(name).name == name.removesuffix(".py") else []
    for path in candidates:
        if path.is_file():
            return path.resolve(), arg
    known = known_configs()
    close = difflib.get_close_matches(name.removesuffix(".py"), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"no config named {name!r}; known configs are {known} (or pass the path of a .py file).{hint}")


def load_config_module(spec: str) -> ModuleType:
    """The Python module of a config file (for configs that build on another's sections)."""
    path, _ = resolve_config(spec)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_spec = importlib.util.spec_from_file_location(f"_vqgen_config_{path.stem}_{digest}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{path} has no get_config(arg) function; a config file must define one.")
    return module


def load_config(spec: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads a config by name or path, ``'quickstart:maskgit'`` or ``'configs/quickstart.py'``.

    ``arg`` picks the variant when the spec has none after a colon.
    """
    _, spec_arg = split_spec(spec)
    return load_config_module(spec).get_config(spec_arg if spec_arg is not None else arg)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh_shape = (-1, 1, 1)                      # ('data', 'fsdp', 'tensor'); -1 auto-fills
    c.logical_rules = tuple(parallel.DEFAULT_RULES)
    c.distributed = False                          # call jax.distributed.initialize() (pods)
    c.data = ml_collections.ConfigDict(dict(
        source="mnist", image_size=32, channels=1, data_dir="", random_crop=False,
        random_flip=False, eval_examples=500, num_classes=10,
        resize="center_crop"))                     # folder images of other sizes: or "refuse"
    return c


def disc_config(**kw) -> ml_collections.ConfigDict:
    d = dict(type="patchgan", ch=64, n_layers=3, norm="group", ch_mult=(1, 2, 4, 4), weight=0.0,
             start_step=0, loss="hinge", adaptive_weight=True, lecam_weight=0.0, lecam_decay=0.999,
             r1_weight=0.0, lr=1e-4, dtype="float32")
    d.update(kw)
    return ml_collections.ConfigDict(d)


def tokenizer_train_config(**kw) -> ml_collections.ConfigDict:
    d = dict(num_steps=1000, batch_size=64, lr=1e-4, warmup_steps=0, schedule="cosine",
             weight_decay=0.0, b1=0.5, b2=0.9, grad_clip=1.0, ema_decay=0.999,
             l1_weight=1.0, l2_weight=0.0, perceptual_weight=0.0, lpips_path="",
             log_every=50, save_every=500, keep=2, image_every=0, eval_batch_size=0, disc=disc_config())
    disc = kw.pop("disc", None)
    d.update(kw)
    c = ml_collections.ConfigDict(d)
    if disc is not None:
        c.disc = disc
    return c


def generator_config(arch: str = "gpt", **kw) -> ml_collections.ConfigDict:
    """Generator architecture fields for the quickstart-sized models (override per config)."""
    if arch == "gpt":
        d = dict(arch="gpt", width=192, depth=4, num_heads=4, num_kv_heads=4,
                 class_dropout_prob=0.1, token_dropout_prob=0.0, resid_dropout_prob=0.0,
                 ffn_dropout_prob=0.0, attn_dropout_prob=0.0, qk_norm=False, dtype="float32")
    elif arch == "maskgit":
        d = dict(arch="maskgit", width=192, depth=4, num_heads=4, mlp_dim=768, dropout=0.0,
                 class_dropout_prob=0.1, label_smoothing=0.1, mask_schedule="cosine", dtype="float32")
    elif arch == "var":
        d = dict(arch="var", depth=4, width=192, num_heads=4, drop_path_rate=0.0, cond_drop_rate=0.1,
                 dtype="float32")
    else:
        raise ValueError(f"unknown generator arch {arch!r}; use 'gpt', 'maskgit' or 'var'.")
    d.update(kw)
    return ml_collections.ConfigDict(d)


def generator_train_config(arch: str = "gpt", **kw) -> ml_collections.ConfigDict:
    d = dict(num_steps=3000, batch_size=32, lr=1e-3, warmup_steps=100, schedule="cosine", min_lr_ratio=0.1,
             weight_decay=0.05, b1=0.9, b2=0.95, grad_clip=1.0, ema_decay=0.999, flip_augment=False,
             log_every=50, save_every=500, keep=2, image_every=0)
    d.update(kw)
    return ml_collections.ConfigDict(d)


# ------------------------------------------------------------------ command lines


class UserError(Exception):
    """A mistake on the command line, found before absl parses the flags."""


def _config_arg(argv: list[str]) -> tuple[int, str] | None:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return i, a.split("=", 1)[1]
    return None


def _override_error(config, path: str) -> str | None:
    """A sentence for ``--config.<path>=`` when ``path`` is not a key of ``config``, else None."""
    node, done = config, []
    for part in path.split("."):
        if hasattr(node, "keys") and part in node:
            node = node[part]
            done.append(part)
            continue
        where = ".".join(done)
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
        if where == "sample" and "generator" in config:
            return (f"sample.{part} is not read by the {config.generator.arch!r} generator; its sample keys are "
                    f"{keys} (remove --config.{path}).")
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f"; did you mean --config.{'.'.join(done + [close[0]])}?" if close else f"; the keys there are {keys}."
        return f"--config.{path}: the config has no key {'.'.join(done + [part])!r}{hint}"
    return None


def resolve_argv(argv: list[str]) -> list[str]:
    """Resolves ``--config=NAME[:variant]`` to its file and checks every ``--config.x=`` override.

    Raises :class:`UserError` with one sentence for an unknown config name or key.
    """
    found = _config_arg(argv)
    if found is None:
        return argv
    i, spec = found
    try:
        path, arg = resolve_config(spec)
        overrides = [m.group(1) for a in argv if (m := re.match(r"--config\.([\w.]+)=", a))]
        if overrides:
            config = load_config(str(path), arg)
            for key in overrides:
                message = _override_error(config, key)
                if message:
                    raise UserError(message)
    except ValueError as e:
        raise UserError(str(e)) from e
    argv = list(argv)
    argv[i] = f"--config={path}" + (f":{arg}" if arg else "")
    return argv


# Sampling defaults of the run configs where they differ from the samplers' own defaults.
_SAMPLE_DEFAULTS = dict(per_class=100, batch_size=100, use_ema=True, cfg_scale=2.0)


def sample_config(arch: str = "gpt", **kw) -> ml_collections.ConfigDict:
    """The ``sample`` section of generator family ``arch``: exactly the keys its sampler reads
    (the fields of its ``SamplerOptions``) plus ``per_class``, ``batch_size`` and ``use_ema``."""
    options = generators.family(arch).SamplerOptions
    d = {f.name: f.default for f in dataclasses.fields(options)}
    d.update(_SAMPLE_DEFAULTS)
    unknown = sorted(set(kw) - set(d))
    if unknown:
        raise ValueError(f"sample.{unknown[0]} is not an option of the {arch!r} generator; its sample keys are {sorted(d)}.")
    d.update(kw)
    return ml_collections.ConfigDict(d)


def evaluate_config(**kw) -> ml_collections.ConfigDict:
    d = dict(judge=True, inception_path="", reference_stats="", batch_size=100)
    d.update(kw)
    return ml_collections.ConfigDict(d)
