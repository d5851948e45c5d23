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

from vqgen import config_lib
from vqgen.train import run as run_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True))
# Config files without a module-level VARIANTS tuple but with named variants.
EXTRA_VARIANTS = {"configs/quickstart.py": ("gpt", "maskgit", "var", "mar")}


def _load_module(rel_path: str):
    return config_lib.load_config_module(os.path.join(ROOT, rel_path))


def _variants(rel_path: str) -> tuple:
    if rel_path in EXTRA_VARIANTS:
        return EXTRA_VARIANTS[rel_path]
    return tuple(getattr(_load_module(rel_path), "VARIANTS", (None,)))


CASES = [(path, variant) for path in CONFIG_FILES for variant in _variants(path)]
IDS = [f"{os.path.splitext(os.path.basename(p))[0]}:{v}" if v else os.path.splitext(os.path.basename(p))[0] for p, v in CASES]


@functools.cache
def get_config(rel_path: str, variant: str | None):
    return _load_module(rel_path).get_config(variant)


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


_SUMMARY_CASES = CASES


@pytest.mark.parametrize("rel_path,variant", _SUMMARY_CASES, ids=IDS)
def test_summary_prints_counts_then_one_json_line(rel_path, variant):
    config = get_config(rel_path, variant)
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
    # VAR's model zoo: the VQ-VAE 108.9M (with its quantizer), VAR-d16/d20/d24/d30 310M, 600M,
    # "1.0B" (1.03B: the official build_vae_var counts 1,033,399,360), 2.0B.
    ("configs/tokenizers/var_vqvae.py", None, "tokenizer_params", 108.9e6),
    ("configs/generators/var.py", "d16", "generator_params", 310e6),
    ("configs/generators/var.py", "d20", "generator_params", 600e6),
    ("configs/generators/var.py", "d24", "generator_params", 1.03e9),
    ("configs/generators/var.py", "d30", "generator_params", 2.0e9),
    # MAR: 208M / 479M / 943M (the paper's Table); its KL-16 VAE counted exactly in tests/test_kl.py.
    ("configs/generators/mar.py", "B", "generator_params", 208e6),
    ("configs/generators/mar.py", "L", "generator_params", 479e6),
    ("configs/generators/mar.py", "H", "generator_params", 943e6),
])
def test_parameter_counts_match_the_papers(rel_path, variant, key, published):
    config = get_config(rel_path, variant)
    counts, _ = summary(rel_path, variant)
    value = sum(counts.values()) if key == "total" else counts[key]
    assert abs(value / published - 1) < 0.02, (key, value, published)


@pytest.mark.parametrize("variant,official", [
    ("d16", 310_283_520), ("d20", 600_917_136), ("d24", 1_033_399_360), ("d30", 2_010_020_356)])
def test_var_counts_equal_the_official_code(variant, official):
    """Counts of FoundationVision/VAR's ``build_vae_var`` (256 px, V=4096, 1000 classes), read off
    the official code: the VQ-VAE has 108,948,355 parameters, VAR-d``depth`` the ones below."""
    counts, _ = summary("configs/generators/var.py", variant)
    assert counts == {"tokenizer_params": 108_948_355, "generator_params": official}


@pytest.mark.parametrize("generator,variant,tokenizer", [
    ("configs/generators/maskgit.py", "paper", "configs/tokenizers/maskgit_vqgan.py"),
    ("configs/generators/maskgit.py", "cfg", "configs/tokenizers/maskgit_vqgan.py"),
    ("configs/generators/llamagen.py", "B", "configs/tokenizers/llamagen_vq16.py"),
    ("configs/generators/var.py", "d16", "configs/tokenizers/var_vqvae.py"),
    ("configs/generators/mar.py", "B", "configs/tokenizers/kl16.py"),
])
def test_generator_configs_accept_their_tokenizer_configs_checkpoints(generator, variant, tokenizer):
    """The checkpoint fingerprint covers these sections: they must be the tokenizer config's."""
    g, t = get_config(generator, variant), get_config(tokenizer, None)
    for section in ("data", "tokenizer", "tokenizer_train"):
        assert g[section].to_dict() == t[section].to_dict(), section


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
    # A correctly spelt override is accepted ...
    out = subprocess.run(cmd + ["--config.tokenizer_train.lr=2e-4"], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == summary("configs/tokenizers/llamagen_vq16.py", None)[0]
    # ... a misspelt one is an error that names it.
    typo = subprocess.run(cmd + ["--config.tokenizer_train.lrr=1e-3"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert typo.returncode != 0
    assert "lrr" in typo.stderr


# ------------------------------------------------------------------------------------ launch


def _bash(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_tpu_vm_dry_run_prints_one_gcloud_command_for_all_workers():
    import shlex

    main_args = ["--config=configs/tokenizers/llamagen_vq16.py", "--workdir=gs://bucket/runs/vq16",
                 "--config.data.data_dir=gs://bucket/tfds dir", "--mode=train_tokenizer"]
    out = _bash("tpu_vm.sh", "--tpu=my-v5e-32", "--zone=us-west4-a", "--dry-run", "--", *main_args)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    words = shlex.split(lines[0])
    assert words[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5e-32", "--zone=us-west4-a"]
    assert "--worker=all" in words
    remote = [w for w in words if w.startswith("--command=")]
    assert len(remote) == 1
    remote_words = shlex.split(remote[0][len("--command="):])
    assert "VQGEN_DISTRIBUTED=1" in remote_words
    i = remote_words.index("vqgen.main")
    assert remote_words[i - 1:i] == ["-m"] and remote_words[i + 1:] == main_args  # quoting survives

    setup = _bash("tpu_vm.sh", "--tpu=t", "--zone=z", "--setup", "--repo=https://example.org/vqgen.git", "--dry-run",
                  "--", "--config=configs/quickstart.py", "--workdir=gs://b/q")
    assert setup.returncode == 0, setup.stderr
    first, second = setup.stdout.strip().splitlines()
    assert "git clone" in first and "pip install" in first and "--worker=all" in first
    assert "vqgen.main" in second

    missing = _bash("tpu_vm.sh", "--dry-run", "--", "--config=x", env={"TPU_NAME": "", "ZONE": ""})
    assert missing.returncode == 2 and "--tpu=NAME" in missing.stderr


def test_slurm_and_xpk_dry_runs():
    import shlex

    out = _bash("slurm_gpu.sh", "--config=configs/generators/llamagen.py:L", "--workdir=/shared/runs/a b",
                env={"VQGEN_DRY_RUN": "1", "VQGEN_DIR": "/shared/vqgen"})
    assert out.returncode == 0, out.stderr
    words = shlex.split(out.stdout.strip())
    assert words[0] == "srun" and words[-2] == "-c"
    inner = shlex.split(words[-1])
    assert inner[:2] == ["cd", "/shared/vqgen"]
    assert inner[-5:] == ["python", "-m", "vqgen.main", "--config=configs/generators/llamagen.py:L",
                          "--workdir=/shared/runs/a b"]
    xpk = _bash("gke_xpk.sh", "--cluster=c1", "--tpu-type=v5p-64", "--workload=w1", "--dry-run", "--",
                "--config=configs/tokenizers/open_magvit2.py", "--workdir=gs://b/o")
    assert xpk.returncode == 0, xpk.stderr
    words = shlex.split(xpk.stdout.strip())
    assert words[:3] == ["xpk", "workload", "create"] and "--tpu-type=v5p-64" in words
    command = shlex.split([w for w in words if w.startswith("--command=")][0][len("--command="):])
    assert "VQGEN_DISTRIBUTED=1" in command and command[-2:] == ["--config=configs/tokenizers/open_magvit2.py",
                                                                  "--workdir=gs://b/o"]


def _aot_module():
    spec = importlib.util.spec_from_file_location("_test_aot_compile", os.path.join(ROOT, "launch", "aot_compile.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_aot_topology_names():
    """Slice names -> get_topology_desc arguments, as Cloud TPU (and MaxText's table) name them."""
    aot = _aot_module()
    assert aot.tpu_topology_kwargs("v5e-16") == dict(
        topology_name="v5e:4x4", chip_config_name="default", chips_per_host_bounds=(2, 2, 1), wrap=(False, False, False))
    assert aot.tpu_topology_kwargs("v5p-64")["topology_name"] == "v5:2x4x4"
    assert aot.tpu_topology_kwargs("v5p-64")["chip_config_name"] == "megacore"
    assert aot.tpu_topology_kwargs("v4-8")["topology_name"] == "v4:2x2x1"
    assert aot.tpu_topology_kwargs("v5p-128")["wrap"] == (True, True, True)
    assert aot.tpu_topology_kwargs("v5e-256")["wrap"] == (True, True, False)
    with pytest.raises(ValueError, match="v5e-16"):
        aot.tpu_topology_kwargs("v5e-12")
    with pytest.raises(ValueError, match="cannot read"):
        aot.tpu_topology_kwargs("tpu7-9")


def _tiny(name: str):
    if name == "video":
        return config_lib.load_config(os.path.join(ROOT, "tests", "tiny_video_config.py"))
    return config_lib.load_config(os.path.join(ROOT, "tests", "tiny_config.py"), name)


@pytest.mark.parametrize("config_name,target", [
    ("gpt", "tokenizer"), ("gpt", "generator"), ("maskgit", "generator"), ("video", "tokenizer"),
    ("video", "generator"), ("var", "tokenizer"), ("var", "generator"), ("mar", "tokenizer"), ("mar", "generator"),
    ("fractal", "generator"), ("vit_vqgan", "tokenizer"), ("titok", "tokenizer"), ("titok_proxy", "tokenizer"),
    ("ibq", "tokenizer"),
])
def test_aot_compile_every_family_on_a_2x4_cpu_mesh(config_name, target):
    """Each family's train step compiles on a 2x4 mesh from abstract inputs alone: the conv
    tokenizer, the GPT, MaskGIT, MAGVIT's 3D tokenizer and video transformer (its token
    grid is (t, h, w), from the same token spec the trainer uses), VAR's multi-scale
    tokenizer and next-scale transformer (with the quantizer's parameters as a frozen input),
    MAR's KL-VAE and diffusion-loss transformer, FractalMAR on pixels (no tokenizer), and the
    zoo tokenizers: ViT-VQGAN, TiTok with the pixel and the two-stage proxy-code head, IBQ.
    The CPU backend's LLVM optimisation is off (the executables are never run): the check is the
    partitioning and the memory report, and the compile takes about half as long."""
    import jax

    aot = _aot_module()
    report = aot.compile_step(_tiny(config_name), target, jax.devices()[:8], (2, 4, 1),
                              compiler_options=aot.CHECK_ONLY_CPU_OPTIONS)
    assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and report["num_devices"] == 8
    mem = report["memory_per_device"]
    assert mem["argument_size_in_bytes"] > 0 and mem["temp_size_in_bytes"] > 0
    assert report["flops_per_device"] > 0 and report["params"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("variant,target", [("B", "tokenizer"), ("B", "generator"), ("H", "generator")])
def test_aot_compile_paper_scale_mar_on_cpu8(variant, target):
    """The paper configs of MAR (KL-16 VAE; MAR-B and MAR-H over its 16x16x16 latents) compile for
    cpu:8 at a global batch of 8 (``launch/aot_compile.py --batch_size=8``): the real model sizes,
    MAR-H on its FSDP mesh."""
    import jax

    aot = _aot_module()
    config = _load_module("configs/generators/mar.py").get_config(variant)  # not the cached one: it is changed
    with config.unlocked():
        config[f"{target}_train"].batch_size = 8
    report = aot.compile_step(config, target, jax.devices()[:8], None)
    assert report["num_devices"] == 8 and report["global_batch"] == 8
    want = {"tokenizer": 66_456_019, "generator": {"B": 207_924_768, "H": 942_403_104}.get(variant)}[target]
    assert report["params"] == want and report["flops_per_device"] > 0


def test_aot_compile_errors():
    import jax

    aot = _aot_module()
    tiny = _tiny("gpt")
    tiny.generator_train.batch_size = 12
    with pytest.raises(ValueError, match="not divisible"):
        aot.compile_step(tiny, "generator", jax.devices()[:8], (2, 4, 1))
    with pytest.raises(ValueError, match="unknown --target"):
        aot.compile_step(tiny, "sampler", jax.devices()[:8], (2, 4, 1))


def test_aot_command_line_by_config_name():
    """``launch/aot_compile.py --config=NAME`` compiles every phase the config has and prints one
    JSON report per phase (the quickstart by name, from the repository root, on cpu:8)."""
    out = subprocess.run([sys.executable, "launch/aot_compile.py", "--config=tests/tiny_config.py:maskgit",
                          "--topology=cpu:8", "--mesh_shape=2,4,1", "--target=generator"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["target"] for r in reports] == ["generator"] and reports[0]["num_devices"] == 8
    bad = subprocess.run([sys.executable, "launch/aot_compile.py", "--config=quickstrat"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no config named 'quickstrat'" in bad.stderr and "quickstart" in bad.stderr
