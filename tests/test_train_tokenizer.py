"""The tokenizer trainer: one compile, sharded == unsharded, exact resume after SIGKILL,
SIGTERM checkpoints, the tfds path offline, and clear errors for bad input."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import flax
import jax
import numpy as np
import pytest

import tiny_config
from vqgen import parallel
from vqgen.checkpoint import IncompatibleCheckpointError
from vqgen.train import common
from vqgen.train import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


def _cli(workdir, *overrides, mode="train_tokenizer"):
    return [sys.executable, "-m", "vqgen.main", f"--config={CONFIG}", f"--workdir={workdir}",
            f"--mode={mode}", *overrides]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _final_params(workdir):
    config = tiny_config.get_config()
    phase = tokenizer_lib.build(config)
    mesh = parallel.create_mesh(tuple(config.mesh_shape))
    rules = parallel.rules_from_config(config.logical_rules)
    ckpt = phase.checkpointer(str(workdir))
    state, _, _ = common.restore_or_create(phase, ckpt, mesh, rules)
    ckpt.close()
    return jax.device_get(state)


def _setup(config, mesh):
    """(phase, state, compiled step, data iterator, rules) of the tokenizer phase on ``mesh``."""
    phase = tokenizer_lib.build(config)
    rules = parallel.rules_from_config(config.logical_rules)
    state, shardings = common.create_state(phase, mesh, rules)
    _, it = tokenizer_lib.make_data(config, "train", train=True)
    return phase, state, common.compile_phase(phase, mesh, shardings, max_traces=1), it, rules


def test_step_compiles_once_and_sharded_equals_single_device(tmp_path):
    config = tiny_config.get_config()
    config.unlock()
    config.tokenizer_train.warmup_steps = 0  # full learning rate from the first step
    config.tokenizer_train.disc.start_step = 0  # the GAN terms are live in the compared steps
    config.lock()
    results = {}
    for name, mesh in {"single": parallel.create_mesh((1, 1, 1), devices=jax.devices()[:1]),
                       "2x4": parallel.create_mesh((2, 4, 1))}.items():
        phase, state, step, it, rules = _setup(config, mesh)
        rng = jax.random.key(1)
        losses = []
        with parallel.mesh_context(mesh, rules):
            for _ in range(2):  # 2 calls, 1 trace: the guard raises on a retrace
                state, metrics = step(state, common.put_batch(next(it), mesh, phase.batch), rng, None)
                losses.append({k: float(metrics[k]) for k in ("loss", "d_loss", "g_loss", "q/usage")})
        results[name] = (losses, jax.device_get(state.params), jax.device_get(state.disc_params))
    for a, b in zip(results["2x4"][0], results["single"][0]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    # The key bias of an attention block has an identically zero gradient (softmax is invariant
    # to a per-query constant), so what it receives is rounding noise that Adam rescales to +-lr.
    # Every other parameter must agree to float tolerance (Adam's first steps divide by |g|, so
    # reduction-order differences in tiny gradients show up at ~1e-5); those within 2 * lr.
    lr = config.tokenizer_train.lr
    flat_a = flax.traverse_util.flatten_dict(results["2x4"][1], sep="/")
    flat_b = flax.traverse_util.flatten_dict(results["single"][1], sep="/")
    # An element whose gradient is itself rounding-sized can land anywhere within Adam's +-lr per
    # step; allow that for at most 0.2% of a tensor's elements (1 of 2304 was seen), never beyond.
    for key in flat_b:
        a, b = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        if key.endswith("k/bias"):
            np.testing.assert_allclose(a, b, atol=2 * 2 * lr, err_msg=key)
            continue
        diff = np.abs(a - b)
        off = diff > 5e-5 + 1e-4 * np.abs(b)
        assert off.mean() <= 0.002 and diff.max() <= 2 * 2 * lr, (key, int(off.sum()), off.size, float(diff.max()))
    disc_a = flax.traverse_util.flatten_dict(results["2x4"][2], sep="/")
    disc_b = flax.traverse_util.flatten_dict(results["single"][2], sep="/")
    for key in disc_b:  # the same rule: rounding that Adam amplifies in a handful of elements
        diff = np.abs(np.asarray(disc_a[key]) - np.asarray(disc_b[key]))
        off = diff > 5e-5 + 1e-4 * np.abs(np.asarray(disc_b[key]))
        assert off.mean() <= 0.002 and diff.max() <= 2 * 2 * lr, (key, int(off.sum()), off.size, float(diff.max()))


def test_retrace_is_detected(tmp_path):
    """The compile-once guard is live: a second input shape must trip it."""
    config = tiny_config.get_config()
    mesh = parallel.create_mesh(tuple(config.mesh_shape))
    phase, state, step, it, rules = _setup(config, mesh)
    batch = common.put_batch(next(it), mesh, phase.batch)
    with parallel.mesh_context(mesh, rules):
        state, _ = step(state, batch, jax.random.key(0), None)
        half = parallel.shard_batch({k: np.asarray(v)[:, :, :16] if k == "image" else np.asarray(v)
                                     for k, v in batch.items()}, mesh)
        with pytest.raises(AssertionError):
            step(state, half, jax.random.key(0), None)


def _wait_for(path, proc, timeout=240):
    t0 = time.time()
    while not os.path.isdir(path):
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with code {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.02)


def test_exact_resume_after_sigkill(tmp_path):
    steps = ["--config.tokenizer_train.num_steps=12", "--config.tokenizer_train.save_every=3",
             "--config.tokenizer_train.log_every=3"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_cli(straight, *steps), check=True, env=_env(), capture_output=True, text=True)
    proc = subprocess.Popen(_cli(killed, *steps), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ckpt_dir = killed / "checkpoints" / "tokenizer"
    _wait_for(ckpt_dir / "3", proc)
    # killed while Orbax writes a later step asynchronously (its temporary folder exists)
    while proc.poll() is None and not any("tmp" in p.name for p in ckpt_dir.iterdir()):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "report.json").exists(), "the run finished before it was killed"
    done = subprocess.run(_cli(killed, *steps), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"tokenizer: resuming from step (3|6|9) to 12", done.stdout), done.stdout
    # the metrics log holds every step once: the steps replayed after the resume replace the lost ones
    logged = [json.loads(line)["step"] for line in (killed / "tb" / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(3, 13, 3)), logged
    a, b = _final_params(straight), _final_params(killed)
    assert int(a.step) == int(b.step) == 12
    # bit for bit: parameters, EMA, optimiser and discriminator states
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))
    ra = json.loads((straight / "report.json").read_text())["tokenizer"]
    rb = json.loads((killed / "report.json").read_text())["tokenizer"]
    for k in ("psnr", "ssim", "codebook_usage", "codebook_perplexity"):
        assert rb[k] == pytest.approx(ra[k], abs=1e-6), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_and_exit_zero(tmp_path, sig):
    proc = subprocess.Popen(
        _cli(tmp_path, "--config.tokenizer_train.num_steps=100000", "--config.tokenizer_train.save_every=50000"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the tensorboard log appears once the loop runs (log_every=1)
    log = tmp_path / "tb" / "tokenizer" / "metrics.jsonl"
    t0 = time.time()
    while not log.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t0 < 240
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints" / "tokenizer") if p.isdigit())
    assert steps and 0 < steps[-1] < 50000, steps
    assert signal.Signals(sig).name in out + err and "resume with the same command" in out + err


def test_tfds_source_one_step(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tiny_config.get_config()
    config.unlock()
    config.data.source = "tfds:mnist"
    config.tokenizer_train.num_steps = 1
    config.lock()
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        state = tokenizer_lib.train(config, str(tmp_path))
    assert int(state.step) == 1
    assert np.isfinite(jax.device_get(jax.tree.leaves(state.params)[0])).all()


def test_batch_not_divisible_by_data_axis(tmp_path):
    config = tiny_config.get_config()
    config.unlock()
    config.tokenizer_train.batch_size = 6
    config.lock()
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        tokenizer_lib.train(config, str(tmp_path))


def test_incompatible_checkpoint_is_refused_and_untouched(tmp_path):
    config = tiny_config.get_config()
    config.unlock()
    config.tokenizer_train.num_steps = 2
    config.lock()
    tokenizer_lib.train(config, str(tmp_path))
    ckpt_dir = tmp_path / "checkpoints" / "tokenizer"
    before = sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*"))
    other = tiny_config.get_config()
    other.unlock()
    other.tokenizer.ch = 16
    other.lock()
    with pytest.raises(IncompatibleCheckpointError, match="different model configuration"):
        tokenizer_lib.train(other, str(tmp_path))
    assert sorted(str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*")) == before


def test_config_key_typo_is_one_clear_error(tmp_path):
    res = subprocess.run(_cli(tmp_path, "--config.tokenizer_train.nmu_steps=3", mode="summary"),
                         env=_env(), capture_output=True, text=True)
    assert res.returncode != 0
    assert "nmu_steps" in res.stderr


def test_metric_log_drops_steps_a_resumed_run_replays(tmp_path):
    """Steps logged after the last checkpoint are trained again on resume; they appear once."""
    writer = common.MetricWriter(str(tmp_path))
    for step in range(1, 11):
        writer.scalars(step, {"loss": float(step)})
    writer.close()
    resumed = common.MetricWriter(str(tmp_path), start_step=6)  # the last checkpoint was step 6
    for step in range(7, 9):
        resumed.scalars(step, {"loss": -float(step)})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows[-2:]] == [-7.0, -8.0]
