"""The public Python API on a trained tiny workdir, the frozen tokenizer's compatibility rule,
and the command line's answers to bad input (one sentence each, no traceback)."""
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import tiny_config
import vqgen
from vqgen import config_lib, fileio
from vqgen.checkpoint import IncompatibleCheckpointError
from vqgen.train import builders
from vqgen.train import generator as generator_lib
from vqgen.train import run as run_lib
from vqgen.train import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny quickstart workdir: tokenizer, GPT, samples (what the README's snippet reads)."""
    path = tmp_path_factory.mktemp("api")
    config = tiny_config.get_config()
    for mode in ("train_tokenizer", "train_generator", "sample"):
        assert run_lib.run(config, str(path), mode) == 0
    return path


def test_readme_snippet_runs_on_a_trained_workdir(workdir, capsys):
    """The README's Python API block, run as written against a trained workdir."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 11  # the promised ten lines (and the print)
    scope: dict = {}
    exec(code.replace("runs/quickstart", str(workdir)), scope)  # noqa: S102
    tokens, recon, images, codes = (scope[k] for k in ("tokens", "recon", "images", "codes"))
    grid = builders.token_spec(tiny_config.get_config()).grid  # (16, 16): the tiny tokenizer downsamples 2x
    assert tokens.dtype == np.int32 and tokens.shape == (8,) + grid and tokens.max() < 32
    assert recon.dtype == np.uint8 and recon.shape == (8, 32, 32, 1)
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 1)
    assert codes.dtype == np.int32 and codes.shape == (4,) + grid
    assert "cfg_scale" in capsys.readouterr().out


def test_api_matches_the_trained_models(workdir):
    tok = vqgen.load_tokenizer(str(workdir))
    config = tiny_config.get_config()
    frozen = tokenizer_lib.load_frozen_tokenizer(config, str(workdir))
    x = tokenizer_lib.eval_images(config, "test", 8)["image"]
    uint8 = ((x + 1.0) * 127.5).round().astype(np.uint8)
    # uint8 and float input agree, and equal the frozen tokenizer's own encoding
    np.testing.assert_array_equal(tok.encode(uint8), tok.encode(uint8.astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_array_equal(tok.encode(uint8), frozen.encode(uint8.astype(np.float32) / 127.5 - 1.0))
    ids = tok.encode(uint8)
    decoded = tok.decode(ids)
    np.testing.assert_array_equal(decoded, ((frozen.decode(ids) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8))
    # sampling: same key, same tokens; greedy top_k=1 is key independent; images decode the tokens
    gen = vqgen.load_generator(str(workdir))
    a = gen.sample_tokens([1, 2, 3], jax.random.key(0))
    np.testing.assert_array_equal(a, gen.sample_tokens([1, 2, 3], jax.random.key(0)))
    g1 = gen.sample_tokens([4, 4], jax.random.key(1), top_k=1)
    np.testing.assert_array_equal(g1, gen.sample_tokens([4, 4], jax.random.key(2), top_k=1))
    np.testing.assert_array_equal(gen.sample([4, 4], jax.random.key(9), top_k=1), tok.decode(g1))
    assert set(gen.option_names) >= {"temperature", "top_k", "top_p", "cfg_scale"}
    # bad input: one sentence each
    with pytest.raises(ValueError, match="not an option of the 'gpt' generator"):
        gen.sample_tokens([0], jax.random.key(0), choice_temperature=2.0)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\)"):
        gen.sample_tokens([10], jax.random.key(0))
    with pytest.raises(ValueError, match="per example"):
        tok.encode(uint8[:, :16])
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        tok.encode(uint8.astype(np.float32))


def test_generator_workdir_without_a_tokenizer_samples_tokens(workdir, tmp_path):
    gen_only = tmp_path / "gen_only"
    (gen_only / "checkpoints").mkdir(parents=True)
    shutil.copy(workdir / "config.json", gen_only / "config.json")
    shutil.copytree(workdir / "checkpoints" / "generator", gen_only / "checkpoints" / "generator")
    gen = vqgen.load_generator(str(gen_only))
    assert gen.tokenizer is None
    full = vqgen.load_generator(str(workdir))
    np.testing.assert_array_equal(gen.sample_tokens([5, 6], jax.random.key(3)),
                                  full.sample_tokens([5, 6], jax.random.key(3)))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        gen.sample([5], jax.random.key(3))


def test_tokenizer_compatibility_is_its_architecture_only(workdir, tmp_path):
    """Training keys of the tokenizer (discriminator, optimiser) may change after training; its
    architecture may not."""
    config = tiny_config.get_config()
    config.unlock()
    config.tokenizer_train.disc.lr = 1e-2
    config.tokenizer_train.disc.weight = 0.0  # no discriminator at all now
    config.tokenizer_train.lr = 5e-2
    config.tokenizer_train.b1 = 0.5
    config.lock()
    frozen = tokenizer_lib.load_frozen_tokenizer(config, str(workdir))
    assert frozen.step == 4 and frozen.spec.grid == (16, 16)
    other = tiny_config.get_config()
    other.unlock()
    other.tokenizer.ch = 16
    other.lock()
    with pytest.raises(IncompatibleCheckpointError, match="another tokenizer architecture.*tokenizer.ch"):
        tokenizer_lib.load_frozen_tokenizer(other, str(workdir))
    with pytest.raises(IncompatibleCheckpointError, match="another tokenizer architecture"):
        generator_lib.train(other, str(workdir))


def test_sample_section_holds_only_the_family_keys():
    for arch in ("gpt", "maskgit", "magvit"):
        section = config_lib.sample_config(arch).to_dict()
        family = vqgen.generators.family(arch)
        family.sampler_options(section)  # every key is read
        assert set(section) - {"per_class", "batch_size", "use_ema"} == set(family.SamplerOptions.keys())
    with pytest.raises(ValueError, match="sample.choice_temperature is not an option of the 'gpt' generator"):
        vqgen.generators.family("gpt").sampler_options({**config_lib.sample_config("gpt"), "choice_temperature": 3.0})
    with pytest.raises(ValueError, match="not an option of the 'maskgit' generator"):
        config_lib.sample_config("maskgit", task="frame_prediction")


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "vqgen.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_sentence(res, *needles):
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_on_the_command_line(workdir, tmp_path):
    # a sample key the chosen family does not read
    _one_sentence(_cli(f"--config={CONFIG}", "--config.sample.choice_temperature=3", "--mode=summary"),
                  "sample.choice_temperature is not read by the 'gpt' generator")
    # a config name that does not exist: the known ones are listed
    _one_sentence(_cli("--config=quickstrat", "--mode=summary"), "no config named 'quickstrat'", "quickstart",
                  "generators/llamagen")
    # a workdir that is a file
    afile = tmp_path / "a_file"
    afile.write_text("x")
    _one_sentence(_cli(f"--config={CONFIG}", f"--workdir={afile}"), "is a file")
    # a workdir whose tokenizer was trained with another tokenizer architecture
    before = (workdir / "config.json").read_text()
    res = _cli(f"--config={CONFIG}", f"--workdir={workdir}", "--mode=train_generator", "--config.tokenizer.ch=16")
    _one_sentence(res, "another tokenizer architecture", "tokenizer.ch")
    assert (workdir / "config.json").read_text() == before  # a refused run writes nothing
    assert not list(workdir.glob("config.*.json"))
    # --verbosity=1 shows the traceback
    verbose = _cli(f"--config={CONFIG}", f"--workdir={afile}", "--verbosity=1")
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr


def test_a_changed_config_keeps_the_previous_one(tmp_path):
    config = tiny_config.get_config()
    run_lib.write_config(config, str(tmp_path))
    run_lib.write_config(config, str(tmp_path))  # the same config: nothing to keep
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    config.sample.per_class = 3
    run_lib.write_config(config, str(tmp_path))
    kept = list(tmp_path.glob("config.*.json"))
    assert len(kept) == 1 and '"per_class": 2' in kept[0].read_text()
    assert '"per_class": 3' in (tmp_path / "config.json").read_text()


def test_console_script_finds_configs_by_name_from_any_directory(tmp_path):
    script = shutil.which("vqgen", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the vqgen console script is not installed in this environment (pip install -e .)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([script, "--config=quickstart:maskgit", "--mode=summary"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"generator_params"' in out.stdout.splitlines()[-1] and "maskgit" in out.stdout


def test_sweep_sampling_scores_each_setting_as_evaluate_does(workdir):
    """``--mode=sweep_sampling``: one row per setting; the row of the config's own setting is what
    ``--mode=sample`` + ``--mode=evaluate`` score (same keys, same samples), and the report holds
    the rows and the real-digit reference."""
    config = tiny_config.get_config()
    scale = float(config.sample.cfg_scale)
    assert run_lib.run(config, str(workdir), "evaluate") == 0
    evaluated = fileio.read_json(os.path.join(workdir, "report.json"))["samples"]
    assert run_lib.run(config, str(workdir), "sweep_sampling", (f"cfg_scale=1,{scale}", "top_k=0")) == 0
    report = fileio.read_json(os.path.join(workdir, "report.json"))["sampling_sweep"]
    saved = fileio.read_json(os.path.join(workdir, "sweeps", "sampling.json"))
    assert saved["rows"] == report["rows"] and report["keys"] == ["cfg_scale", "top_k"]
    rows = {r["cfg_scale"]: r for r in report["rows"]}
    assert sorted(rows) == sorted({1.0, scale}) and all(r["top_k"] == 0 for r in rows.values())
    for key in ("judge_accuracy", "judge_fid", "judge_precision", "judge_recall"):
        assert rows[scale][key] == evaluated[key], key
    assert 0.0 <= rows[1.0]["judge_recall"] <= 1.0 and rows[1.0]["seconds_per_image"] > 0
    assert report["real_reference"]["judge_real_accuracy"] == evaluated["judge_real_accuracy"]


@pytest.mark.parametrize("sweeps, mode, needle", [
    (("choice_temperature=1,2",), "sweep_sampling", "'gpt' sampler has no option 'choice_temperature'"),
    (("cfg_scale=",), "sweep_sampling", "has no values"),
    (("cfg_scale=1", "cfg_scale=2"), "sweep_sampling", "given twice"),
    (("top_k=a",), "sweep_sampling", "'a' is not an integer"),
    (("top_p=2",), "sweep_sampling", "top_p=2.0 is outside"),
    ((), "sweep_sampling", "at least one --sweep"),
    (("cfg_scale=1,2",), "sample", "read by --mode=sweep_sampling only"),
])
def test_sweep_bad_input_is_one_sentence_before_anything_loads(tmp_path, sweeps, mode, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        run_lib.run(tiny_config.get_config(), str(tmp_path / "none"), mode, sweeps)
    assert not (tmp_path / "none").exists()
