"""Every run config in configs/: loads, is locked, and ``--mode=summary`` reports its parameter
counts (``jax.eval_shape`` only) with one JSON line last; the published model sizes; the launch
scripts' dry runs and ahead-of-time compilation on a small CPU mesh."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from vqgen.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
# Config files without a module-level VARIANTS tuple but with named variants.
EXTRA_VARIANTS = {"configs/quickstart.py": ("gpt", "maskgit")}


def _load_module(rel_path: str):
    name = "_test_config_" + rel_path.replace("/", "_").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _variants(rel_path: str) -> tuple:
    if rel_path in EXTRA_VARIANTS:
        return EXTRA_VARIANTS[rel_path]
    return tuple(getattr(_load_module(rel_path), "VARIANTS", (None,)))


CASES = [(path, variant) for path in CONFIG_FILES for variant in _variants(path)]
IDS = [f"{os.path.splitext(os.path.basename(p))[0]}:{v}" if v else os.path.splitext(os.path.basename(p))[0] for p, v in CASES]


@functools.cache
def get_config(rel_path: str, variant: str | None):
    return _load_module(rel_path).get_config(variant)


def _skip_unless_generator_family_ready(config) -> None:
    """The generator families are written alongside these configs; name what is missing."""
    if "generator" not in config:
        return
    from vqgen.train.generator import FAMILIES

    arch = config.generator.arch
    try:
        family = importlib.import_module(FAMILIES[arch])
    except ModuleNotFoundError as e:
        pytest.skip(f"generator family {arch!r} is not importable yet ({e}).")
    if not hasattr(family, "build"):
        pytest.skip(f"{FAMILIES[arch]} has no build(cfg, vocab_size, num_classes, grid) adapter yet.")


@functools.cache
def summary(rel_path: str, variant: str | None) -> tuple[dict, tuple[str, ...]]:
    """``run.summary(config)`` in-process: (returned counts, printed lines)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        counts = run_lib.summary(get_config(rel_path, variant))
    return counts, tuple(buf.getvalue().strip().splitlines())


@pytest.mark.parametrize("rel_path,variant", CASES, ids=IDS)
def test_config_loads_and_is_locked(rel_path, variant):
    config = get_config(rel_path, variant)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.sead = 1  # a typo at the top level
    for section in ("data", "tokenizer", "tokenizer_train", "generator", "generator_train", "sample"):
        if section in config:
            with pytest.raises(AttributeError):
                setattr(config[section], "batch_sise", 1)  # a typo inside a section
    assert "sead" not in json.loads(config.to_json_best_effort())
    config.seed = config.seed  # existing keys stay writable


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="use one of"):
        _load_module("configs/generators/llamagen.py").get_config("XXXL")
    with pytest.raises(ValueError, match="no variants"):
        _load_module("configs/tokenizers/llamagen_vq16.py").get_config("B")


@pytest.mark.parametrize("rel_path,variant", CASES, ids=IDS)
def test_summary_prints_counts_then_one_json_line(rel_path, variant):
    config = get_config(rel_path, variant)
    _skip_unless_generator_family_ready(config)
    counts, lines = summary(rel_path, variant)
    assert json.loads(lines[-1]) == counts
    expected = {k for k, sec in (("tokenizer_params", "tokenizer"), ("generator_params", "generator")) if sec in config}
    assert set(counts) == expected
    for key, value in counts.items():
        assert isinstance(value, int) and value > 0
        assert any(f"{value:,}" in line for line in lines[:-1]), f"{key} is not printed before the JSON line"


@pytest.mark.parametrize("variant", ("B", "L", "XL", "XXL", "3B"))
def test_llamagen_generator_keys_are_gpt_fields(variant):
    """Every key of the generator section is a field of the GPT module (nothing silently ignored)."""
    from vqgen.generators import gpt

    config = get_config("configs/generators/llamagen.py", variant)
    fields = {f.name for f in dataclasses.fields(gpt.GPT)} - {"parent", "name"}
    assert set(config.generator) - {"arch", "dtype"} <= fields
    arch = gpt.VARIANTS[variant]
    assert (config.generator.depth, config.generator.width, config.generator.num_heads) == (
        arch["depth"], arch["width"], arch["num_heads"])


# Published sizes: LlamaGen (tokenizer 72M; GPT-B/L/XL/XXL/3B), MaskGIT (227M with its tokenizer).
@pytest.mark.parametrize("rel_path,variant,key,published", [
    ("configs/tokenizers/llamagen_vq16.py", None, "tokenizer_params", 71.9e6),
    ("configs/generators/llamagen.py", "B", "tokenizer_params", 71.9e6),
    ("configs/generators/llamagen.py", "B", "generator_params", 111e6),
    ("configs/generators/llamagen.py", "L", "generator_params", 343e6),
    ("configs/generators/llamagen.py", "XL", "generator_params", 775e6),
    ("configs/generators/llamagen.py", "XXL", "generator_params", 1.4e9),
    ("configs/generators/llamagen.py", "3B", "generator_params", 3.1e9),
    ("configs/generators/maskgit.py", "paper", "total", 227e6),
])
def test_parameter_counts_match_the_papers(rel_path, variant, key, published):
    config = get_config(rel_path, variant)
    _skip_unless_generator_family_ready(config)
    counts, _ = summary(rel_path, variant)
    value = sum(counts.values()) if key == "total" else counts[key]
    assert abs(value / published - 1) < 0.02, (key, value, published)


def test_tokenizer_configs_match_the_official_quantizers():
    """The three tokenizer configs build the tokenizer variants of vqgen/tokenizers/vqgan.py."""
    from vqgen.tokenizers import vqgan

    for name, variant in (("maskgit_vqgan", "maskgit"), ("llamagen_vq16", "llamagen_vq16"),
                          ("open_magvit2", "open_magvit2")):
        c = get_config(f"configs/tokenizers/{name}.py", None)
        arch = vqgan.VARIANTS[variant]
        for k, v in arch.items():
            if k != "in_channels":
                got = tuple(c.tokenizer[k]) if isinstance(v, tuple) else c.tokenizer[k]
                assert got == v, (name, k, got, v)
        q_cls, q_kw = vqgan.QUANTIZERS[variant]
        for k, v in q_kw.items():
            assert c.tokenizer.quantizer[k] == v, (name, k)
        assert c.data.channels == arch["in_channels"]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_summary_and_config_typo():
    cmd = [sys.executable, "-m", "vqgen.main", "--config=configs/tokenizers/llamagen_vq16.py", "--mode=summary"]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == summary("configs/tokenizers/llamagen_vq16.py", None)[0]
    typo = subprocess.run(cmd + ["--config.tokenizer_train.lrr=1e-3"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode != 0
    assert "lrr" in typo.stderr
