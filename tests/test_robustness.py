"""Nothing lost, every mistake answered in one sentence: bad data and settings refused before
anything is compiled or written, a non-finite loss that stops the run with its last good checkpoint
intact, unreadable checkpoints that fall back to the step before, and SIGKILL at any moment
(the slow test: 20 random points of a tokenizer + generator run; the fast case, a kill during an
async checkpoint write, is ``test_train_tokenizer.test_exact_resume_after_sigkill``) resuming to
bit-identical weights."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import tiny_config
from vqgen import data as vdata
from vqgen import parallel
from vqgen.checkpoint import Checkpointer
from vqgen.train import common
from vqgen.train import generator as generator_lib
from vqgen.train import run as run_lib
from vqgen.train import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


def _config(**overrides):
    """The tiny config with ``section.key=value`` overrides (``data__num_classes=12``)."""
    config = tiny_config.get_config()
    config.unlock()
    for name, value in overrides.items():
        node = config
        *path, key = name.split("__")
        for part in path:
            node = node[part]
        node[key] = value
    config.lock()
    return config


def _folder(root, classes=2, size=(8, 8), mode="RGB", per_class=2):
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size if not callable(size) else size(c, i)
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(np.full(shape, 10 * c + i, np.uint8), mode=mode).save(root / f"class_{c:02d}" / f"{i}.png")
    return root


def _snapshot(path):
    """Every file under ``path`` with its bytes (a folder that does not exist: None)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- bad input


def _refused(config, workdir, phases, *needles):
    before = _snapshot(workdir)
    with pytest.raises(ValueError) as info:
        run_lib.validate(config, str(workdir), phases)
    message = str(info.value)
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, message
    assert _snapshot(workdir) == before, "a refused run changed the workdir"
    return message


def test_labels_beyond_num_classes_name_the_key(tmp_path):
    data = _folder(tmp_path / "twelve", classes=12)
    config = _config(data__source=f"folder:{data}", data__channels=3, data__image_size=8)
    _refused(config, tmp_path / "run", ("train_tokenizer",), "has 12 classes", "data.num_classes=10",
             "--config.data.num_classes=12")
    # the same folder with the right class count is accepted (and only then is the workdir made)
    run_lib.validate(_config(data__source=f"folder:{data}", data__channels=3, data__image_size=8,
                             data__num_classes=12), str(tmp_path / "run"), ("train_tokenizer",))
    assert (tmp_path / "run").is_dir()


def test_rgb_folder_under_a_one_channel_config_is_refused_before_compiling(tmp_path):
    data = _folder(tmp_path / "rgb")
    config = _config(data__source=f"folder:{data}", data__image_size=8)
    t0 = time.perf_counter()
    _refused(config, tmp_path / "run", ("train_tokenizer",), "3-channel images", "data.channels=1",
             "--config.data.channels=3")
    assert time.perf_counter() - t0 < 30  # no step was compiled


def test_first_batch_labels_are_checked_where_the_source_does_not_count_classes():
    class Labelled:
        num_classes = None

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": np.zeros((8, 8, 1), np.uint8), "label": np.int32(3 * i)}

    with pytest.raises(ValueError, match=r"gives label 6 \(example 2\) but data.num_classes=5"):
        vdata.check_source(Labelled(), source_name="x", num_classes=5, channels=1, image_size=8)
    with pytest.raises(ValueError, match="gives 8x8 images but data.image_size=16"):
        vdata.check_source(Labelled(), source_name="x", num_classes=10, channels=1, image_size=16)


def test_mixed_image_sizes_are_resized_or_refused_as_the_config_says(tmp_path, caplog):
    data = _folder(tmp_path / "mixed", size=lambda c, i: (8 + 4 * i, 8 + 2 * c))
    refuse = _config(data__source=f"folder:{data}", data__channels=3, data__image_size=8, data__resize="refuse")
    _refused(refuse, tmp_path / "run", ("train_tokenizer",), "has images of 4 size(s)", "data.resize='refuse'",
             "--config.data.resize=center_crop")
    source = vdata.make_source(f"folder:{data}", "train", image_size=8)  # center_crop, the default
    assert len(source.image_sizes) == 4 and "images of 4 sizes" in caplog.text
    assert {source[i]["image"].shape for i in range(len(source))} == {(8, 8, 3)}
    with pytest.raises(ValueError, match="data.resize='squash' is unknown"):
        vdata.make_source(f"folder:{data}", "train", image_size=8, resize="squash")


@pytest.mark.parametrize("key,value,needle", [
    ("tokenizer_train__num_steps", -5, "tokenizer_train.num_steps=-5 must be at least 1"),
    ("tokenizer_train__log_every", 0, "tokenizer_train.log_every=0 must be at least 1"),
    ("tokenizer_train__lr", -1.0, "tokenizer_train.lr=-1.0 must be a positive number"),
])
def test_loop_settings_no_run_can_use(tmp_path, key, value, needle):
    _refused(_config(**{key: value}), tmp_path / "run", ("train_tokenizer",), needle)


def test_workdir_that_is_a_file_or_read_only(tmp_path):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    _refused(_config(), afile, ("train_tokenizer",), "is a file")
    probe = "/sys/vqgen-read-only-probe"
    if os.access("/sys", os.W_OK) and not os.path.exists(probe):
        try:
            os.mkdir(probe)
        except OSError:
            pass
        else:
            os.rmdir(probe)
            pytest.skip("/sys is writable here; no read-only location to test")
    with pytest.raises(ValueError, match=r"--workdir=/sys/vqgen-run is not writable \(.+\); pass a directory"):
        run_lib.validate(_config(), "/sys/vqgen-run", ("train_tokenizer",))
    assert not os.path.exists("/sys/vqgen-run")


def test_files_the_run_reads_are_checked_before_config_json_is_written(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")  # an earlier run's: a refused run must not replace it
    lpips = _config(tokenizer_train__perceptual_weight=1.0, tokenizer_train__lpips_path=str(tmp_path / "no.npz"))
    with pytest.raises(FileNotFoundError, match=r"LPIPS weights file .*no.npz' \(tokenizer_train.lpips_path\) does"):
        run_lib.validate(lpips, str(workdir), ("train_tokenizer",))
    with pytest.raises(FileNotFoundError, match="no samples at .*samples.npz; run --mode=sample first"):
        run_lib.validate(_config(), str(workdir), ("evaluate",))
    assert _snapshot(workdir) == {"config.json": b"{}"}


def test_a_gs_workdir_without_gcsfs_names_the_package(tmp_path):
    """gcsfs missing (an import that fails, as on a machine without it): one sentence, exit 2."""
    blocker = tmp_path / "no_gcsfs"
    blocker.mkdir()
    (blocker / "gcsfs.py").write_text("raise ImportError('No module named gcsfs')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), ROOT, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-m", "vqgen.main", f"--config={CONFIG}", "--workdir=gs://bucket/run",
                          "--mode=train_tokenizer"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs the gcsfs package" in errors[0] and "pip install" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_gcsfs"]  # no ./gs:/bucket/run folder


# ------------------------------------------------------------------------------- non-finite


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(tmp_path):
    """A learning rate that blows the weights up: the run stops naming the step and the last good
    checkpoint, writes nothing after it, and resumes from it once the setting is changed."""
    plain = dict(tokenizer_train__disc__weight=0.0, tokenizer_train__save_every=2, tokenizer_train__log_every=4)
    tokenizer_lib.train(_config(tokenizer_train__num_steps=2, **plain), str(tmp_path))
    ckpt_dir = tmp_path / "checkpoints" / "tokenizer"
    good = _snapshot(ckpt_dir)
    with pytest.raises(common.NonFiniteLoss) as info:
        tokenizer_lib.train(_config(tokenizer_train__num_steps=8, tokenizer_train__lr=1e30, **plain), str(tmp_path))
    message = str(info.value)
    bad = int(re.search(r"non-finite loss at step (\d+)", message).group(1))
    assert 3 <= bad <= 4, message  # the first step after the blown-up update
    assert f"the last good checkpoint, step 2 in {ckpt_dir}, is left intact" in message, message
    assert "lower tokenizer_train.lr or set tokenizer_train.grad_clip" in message
    assert _snapshot(ckpt_dir) == good, "a checkpoint was written or changed after the bad step"
    state = tokenizer_lib.train(_config(tokenizer_train__num_steps=6, **plain), str(tmp_path))
    assert int(state.step) == 6
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.device_get(state.params)))
    logged = [json.loads(line)["step"] for line in (tmp_path / "tb" / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6], logged


# ------------------------------------------------------------------------ unreadable checkpoints


def _two_step_checkpoints(directory):
    src = vdata.make_source("mnist", "train", image_size=32)
    it = vdata.make_pipeline(src, global_batch_size=8, seed=0, train=True, process_index=0, process_count=1)
    ckpt = Checkpointer(str(directory), save_every=1, keep=3, fingerprint={"model": 1})
    for step in (1, 2):
        next(it)
        ckpt.save(step, {"w": jnp.full((64, 64), float(step)), "b": jnp.arange(5) * step}, it, force=True)
    ckpt.close()
    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32), "b": jax.ShapeDtypeStruct((5,), jnp.int32)}
    return target, lambda: vdata.make_pipeline(src, global_batch_size=8, seed=0, train=True, process_index=0,
                                               process_count=1)


@pytest.mark.parametrize("damage", ["truncate state/manifest.ocdbt", "truncate state/_METADATA",
                                    "truncate meta/metadata", "truncate data/process_0-of-1.json",
                                    "truncate an array file", "remove state"])
def test_an_unreadable_latest_checkpoint_falls_back_to_the_step_before(tmp_path, damage, capsys):
    target, fresh_iterator = _two_step_checkpoints(tmp_path / "ckpt")
    step2 = tmp_path / "ckpt" / "2"
    if damage == "remove state":
        import shutil

        shutil.rmtree(step2 / "state")
    else:
        name = damage.removeprefix("truncate ")
        path = (next(p for p in sorted((step2 / "state" / "d").iterdir())) if name == "an array file"
                else step2 / name)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expected = fresh_iterator()
    next(expected)  # where step 1 left the data
    it = fresh_iterator()
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=3, fingerprint={"model": 1})
    state = ckpt.restore(target, it)
    assert float(state["w"][0, 0]) == 1.0 and ckpt.all_steps() == [1]
    np.testing.assert_array_equal(next(it)["image"], next(expected)["image"])
    ckpt.close()
    assert (tmp_path / "ckpt" / "2.unreadable").is_dir()  # kept aside, not deleted
    assert "resuming from step 1" in capsys.readouterr().out


def test_incompatible_checkpoints_are_not_taken_for_broken_ones(tmp_path):
    target, fresh_iterator = _two_step_checkpoints(tmp_path / "ckpt")
    other = {"w": jax.ShapeDtypeStruct((32, 64), jnp.float32), "b": jax.ShapeDtypeStruct((5,), jnp.int32)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), save_every=1, keep=3, fingerprint={"model": 1})
    with pytest.raises(ValueError):
        ckpt.restore(other, fresh_iterator())
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2"]


# ------------------------------------------------------------------------------ SIGKILL


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(workdir, mode, *overrides):
    return [sys.executable, "-m", "vqgen.main", f"--config={CONFIG}", f"--workdir={workdir}", f"--mode={mode}",
            *overrides]


def _phase_state(workdir, phase_name, config):
    build = tokenizer_lib.build if phase_name == "tokenizer" else generator_lib.build
    phase = build(config)
    mesh = parallel.create_mesh(tuple(config.mesh_shape))
    ckpt = phase.checkpointer(str(workdir))
    state, _, _ = common.restore_or_create(phase, ckpt, mesh, parallel.rules_from_config(config.logical_rules))
    ckpt.close()
    return jax.device_get(state)


def _assert_bit_identical(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y)), \
            "a resumed run differs from the uninterrupted one"


def _wait_for_checkpoint_write(ckpt_dir, proc, timeout=300):
    """Returns once Orbax is writing a step (its temporary folder exists), or the run has ended."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if ckpt_dir.is_dir() and any("tmp" in p.name for p in ckpt_dir.iterdir()):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint write in {ckpt_dir} within {timeout}s")


@pytest.mark.slow
def test_twenty_random_sigkills_of_a_tokenizer_and_generator_run(tmp_path):
    """SIGKILL at 20 random moments of a tokenizer + generator run (some timed into a checkpoint
    write), resumed each time: the final weights of both equal an uninterrupted run's bit for bit."""
    overrides = ["--config.tokenizer_train.num_steps=12", "--config.tokenizer_train.save_every=3",
                 "--config.tokenizer_train.log_every=3", "--config.generator_train.num_steps=12",
                 "--config.generator_train.save_every=3", "--config.generator_train.log_every=3"]
    config = _config(tokenizer_train__num_steps=12, tokenizer_train__save_every=3, tokenizer_train__log_every=3,
                     generator_train__num_steps=12, generator_train__save_every=3, generator_train__log_every=3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    span = {}
    for mode in ("train_tokenizer", "train_generator"):
        t0 = time.time()
        subprocess.run(_cli(straight, mode, *overrides), check=True, env=_env(), capture_output=True)
        span[mode] = time.time() - t0
    rng = random.Random(14)
    kills, mode_index, modes = [], 0, ("train_tokenizer", "train_generator")
    while len(kills) < 20:
        mode = modes[mode_index]
        proc = subprocess.Popen(_cli(killed, mode, *overrides), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        phase = mode.removeprefix("train_")
        if len(kills) % 4 == 3:  # into an async checkpoint write
            _wait_for_checkpoint_write(killed / "checkpoints" / phase, proc)
            how = "during a checkpoint write"
        else:
            delay = rng.uniform(0.3, 0.95) * span[mode]  # from start-up to the last steps
            t_start = time.time()
            while proc.poll() is None and time.time() - t_start < delay:
                time.sleep(0.01)
            how = f"after {delay:.1f}s"
        if proc.poll() is not None:  # this phase finished before the kill: go on to the next one
            assert proc.returncode == 0
            if mode == "train_tokenizer":
                mode_index = 1
            else:  # both done: a fresh workdir for the remaining kills
                mode_index, killed = 0, tmp_path / f"killed{len(kills)}"
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpts = killed / "checkpoints" / phase
        saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
        kills.append(f"{phase} {how} (checkpoints {saved})")
    for mode in modes:  # the last interrupted run finishes
        res = subprocess.run(_cli(killed, mode, *overrides), env=_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
    print("kill points:", "; ".join(f"{i + 1}: {k}" for i, k in enumerate(kills)))
    for phase in ("tokenizer", "generator"):
        for workdir in sorted(tmp_path.glob("killed*")):
            _assert_bit_identical(_phase_state(workdir, phase, config), _phase_state(straight, phase, config))
    print("bit-identical: tokenizer and generator states (params, EMA, optimizer) of every killed run")
