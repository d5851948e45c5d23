"""A gs:// workdir: the whole tiny pipeline (tokenizer, generator, sample, evaluate) runs against an
in-memory Cloud Storage server, every output lands in the bucket and nothing in the current
directory."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

import gcs_emulator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")


def _cli(env_extra, cwd, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", **env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "vqgen.main", f"--config={CONFIG}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_tokenizer_phase_on_a_gs_workdir(tmp_path):
    """The default suite's gs:// check: one phase writes its config, checkpoints, logs and report
    into the bucket and nothing into the current directory, and the same command finds it there
    (the whole pipeline below takes minutes against the emulator and is a slow test)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = f"gs://{gcs_emulator.BUCKET}/runs/tok"
    args = (f"--workdir={run}", "--mode=train_tokenizer", "--config.tokenizer_train.num_steps=2",
            "--config.tokenizer_train.save_every=2")  # one checkpoint: each save is seconds of emulator round trips
    with gcs_emulator.gcs_server() as env:
        res = _cli(env, cwd, *args)
        assert res.returncode == 0, res.stderr[-3000:]
        files = gcs_emulator.listing(env, run)
        report = json.loads(gcs_emulator.read_bytes(env, f"{run}/report.json"))
        again = _cli(env, cwd, *args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"tokenizer: already trained to step 2 in {run}/checkpoints/tokenizer" in again.stdout
    assert list(cwd.iterdir()) == [], "the run wrote into the current directory"
    for expected in ("config.json", "report.json", "tb/tokenizer/metrics.jsonl"):
        assert expected in files, (expected, files)
    assert {f.split("/")[2] for f in files if f.startswith("checkpoints/tokenizer/")} >= {"2"}, files
    assert report["tokenizer"]["steps"] == 2 and "psnr" in report["tokenizer"]
    assert not any(".tmp" in f or "write-test" in f for f in files), files


@pytest.mark.slow
def test_whole_pipeline_on_a_gs_workdir(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = f"gs://{gcs_emulator.BUCKET}/runs/tiny"
    with gcs_emulator.gcs_server() as env:
        res = _cli(env, cwd, f"--workdir={run}", "--mode=all")
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"done: report in {run}/report.json" in res.stdout
        files = gcs_emulator.listing(env, run)
        report = json.loads(gcs_emulator.read_bytes(env, f"{run}/report.json"))
        samples = np.load(io.BytesIO(gcs_emulator.read_bytes(env, f"{run}/samples/samples.npz")))
        metrics = gcs_emulator.read_bytes(env, f"{run}/tb/tokenizer/metrics.jsonl").decode().splitlines()
        # the same command again: everything is found in the bucket, nothing is trained twice
        again = _cli(env, cwd, f"--workdir={run}", "--mode=train_tokenizer")
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"tokenizer: already trained to step 4 in {run}/checkpoints/tokenizer" in again.stdout
    assert list(cwd.iterdir()) == [], "the run wrote into the current directory"
    for expected in ("config.json", "report.json", "tokens/train.npz", "samples/samples.npz", "samples/grid.png",
                     "judge/digit_judge_seed0.npz", "tb/tokenizer/metrics.jsonl", "tb/generator/metrics.jsonl"):
        assert expected in files, (expected, files)
    for phase in ("tokenizer", "generator"):
        steps = {f.split("/")[2] for f in files if f.startswith(f"checkpoints/{phase}/")}
        assert {"2", "4"} <= steps, (phase, steps)
        assert any(f.startswith(f"tb/{phase}/events.out.tfevents") for f in files), files
    assert set(report) >= {"tokenizer", "generator", "sampling", "samples"}
    assert report["tokenizer"]["steps"] == 4 and report["generator"]["steps"] == 4
    assert samples["images"].shape == (20, 32, 32, 1) and samples["images"].dtype == np.uint8
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4]
    assert not any(".tmp" in f or "write-test" in f for f in files), files


def test_a_gs_data_dir_names_the_real_cause(monkeypatch):
    """Not "not prepared as ArrayRecord" for every failure: a data dir that does not exist, one
    without the dataset, and one that holds it (the ArrayRecord reader opens local files only)."""
    from vqgen import fileio
    from vqgen.data import make_source

    with gcs_emulator.gcs_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        base = f"gs://{gcs_emulator.BUCKET}/tfds"
        with pytest.raises(FileNotFoundError, match=f"data.data_dir={base} does not exist"):
            make_source("tfds:mnist", "train", image_size=32, data_dir=base)
        fileio.write_text(f"{base}/other/README", "another dataset")
        with pytest.raises(FileNotFoundError, match=f"data.data_dir={base} has no mnist/ folder"):
            make_source("tfds:mnist", "train", image_size=32, data_dir=base)
        fileio.write_text(f"{base}/mnist/3.0.1/dataset_info.json", "{}")
        with pytest.raises(OSError, match="ArrayRecord reader opens local files only: mount the bucket"):
            make_source("tfds:mnist", "train", image_size=32, data_dir=base)
