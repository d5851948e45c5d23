"""The generator trainer over a frozen tokenizer: clear errors, sharded == single device,
and the whole ``--mode=all`` job on a tiny config (tokenizer, generator, samples, evaluation)."""
import json
import os

import chex
import jax
import numpy as np
import pytest

import tiny_config
from vqgen import parallel
from vqgen.data import tokens as token_data
from vqgen.train import common
from vqgen.train import generator as generator_lib
from vqgen.train import run as run_lib
from vqgen.train import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tokenizer_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gen")
    config = tiny_config.get_config()
    config.unlock()
    config.tokenizer_train.num_steps = 2
    config.lock()
    tokenizer_lib.train(config, str(workdir))
    return workdir


def test_missing_tokenizer_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--mode=train_tokenizer"):
        generator_lib.train(tiny_config.get_config(), str(tmp_path))


@pytest.mark.parametrize("arch", ["gpt", "maskgit"])
def test_generator_step_sharded_equals_single_device(tokenizer_workdir, arch):
    config = tiny_config.get_config(arch)
    config.unlock()
    config.generator_train.warmup_steps = 0
    config.lock()
    out = {}
    for name, mesh in {"single": parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1]),
                       "2x4": parallel.create_mesh((2, 4, 1))}.items():
        rules = parallel.rules_from_config(config.logical_rules)
        tok = tokenizer_lib.load_frozen_tokenizer(config, str(tokenizer_workdir), mesh)
        path = generator_lib.build_token_cache(config, str(tokenizer_workdir), tok,
                                               path=str(tokenizer_workdir / f"tokens_{arch}_{name}.npz"))
        it = token_data.make_token_pipeline(token_data.TokenSource(path), global_batch_size=8, seed=0)
        phase = generator_lib.build(config)
        state, shardings = common.create_state(phase, mesh, rules)
        step = common.compile_phase(phase, mesh, shardings)
        losses = []
        with parallel.mesh_context(mesh, rules):
            for _ in range(2):
                state, metrics = step(state, common.put_batch(next(it), mesh, phase.batch), jax.random.key(3))
                losses.append(float(metrics["loss"]))
        out[name] = (losses, jax.device_get(state.params))
    assert out["2x4"][0] == pytest.approx(out["single"][0], rel=1e-5)
    chex.assert_trees_all_close(out["2x4"][1], out["single"][1], atol=5e-5, rtol=1e-4)


def test_mode_all_writes_samples_grid_and_report(tmp_path):
    config = tiny_config.get_config()
    workdir = str(tmp_path)
    assert run_lib.run(config, workdir, "all") == 0
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
        images, labels = f["images"], f["labels"]
    per_class = config.sample.per_class
    assert images.dtype == np.uint8 and images.shape == (10 * per_class, 32, 32, 1)
    assert labels.dtype == np.int32 and np.array_equal(labels, np.repeat(np.arange(10), per_class))
    assert os.path.getsize(os.path.join(workdir, "samples", "grid.png")) > 0
    report = json.loads(open(os.path.join(workdir, "report.json")).read())
    assert set(report) >= {"tokenizer", "generator", "sampling", "samples"}
    assert 0.0 <= report["samples"]["judge_accuracy"] <= 1.0
    assert report["samples"]["judge_test_accuracy"] >= 0.97
    assert json.loads(open(os.path.join(workdir, "config.json")).read())["seed"] == config.seed
    # Running the same command again resumes: nothing is retrained, the samples are rewritten.
    mtime = os.path.getmtime(os.path.join(workdir, "checkpoints", "generator"))
    assert run_lib.run(config, workdir, "train_generator") == 0
    assert os.path.getmtime(os.path.join(workdir, "checkpoints", "generator")) == mtime
