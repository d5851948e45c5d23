"""The digit judge: trains on the embedded digits, reaches >= 97% held-out, caches, scores samples."""
import os

import numpy as np
import pytest

from vqgen.data import embedded
from vqgen.evaluation import judge as judge_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("judge"))
    return cache, judge_lib.load_or_train_judge(cache, seed=0)


def test_held_out_accuracy_and_cache(trained):
    cache, judge = trained
    x_test, y_test = embedded.load_mnist("test")
    assert judge.accuracy >= 0.97
    np.testing.assert_allclose(np.mean(judge.predict(x_test) == y_test), judge.accuracy)
    assert os.listdir(cache) == ["digit_judge_seed0.npz"]
    again = judge_lib.load_or_train_judge(cache, seed=0)  # from the cache, no training
    assert again.accuracy == judge.accuracy
    np.testing.assert_array_equal(again.predict(x_test[:50]), judge.predict(x_test[:50]))


def test_shared_cache_is_read_before_training(trained, tmp_path, monkeypatch):
    _, judge = trained
    shared, workdir = tmp_path / "shared", tmp_path / "workdir"
    monkeypatch.setenv(judge_lib.SHARED_CACHE_ENV, str(shared))
    judge_lib._save(str(shared / "digit_judge_seed0.npz"), judge)

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the shared cache holds the judge")

    monkeypatch.setattr(judge_lib, "train_judge", no_training)
    got = judge_lib.load_or_train_judge(str(workdir), seed=0)
    assert got.accuracy == judge.accuracy and os.listdir(workdir) == ["digit_judge_seed0.npz"]
    with pytest.raises(AssertionError, match="trained although"):  # another seed is not in it
        judge_lib.load_or_train_judge(str(workdir), seed=1)


def test_judge_metrics(trained):
    _, judge = trained
    x_test, y_test = embedded.load_mnist("test")
    x_train, y_train = embedded.load_mnist("train")
    pick = np.random.default_rng(0).permutation(len(x_train))[:500]  # the split is sorted by class
    x_train, y_train = x_train[pick], y_train[pick]
    same = judge_lib.judge_metrics(judge, x_test, y_test)
    np.testing.assert_allclose(same["judge_accuracy"], judge.accuracy)
    assert abs(same["judge_fid"]) < 1e-6  # the test digits against themselves
    real = judge_lib.judge_metrics(judge, x_train[:500], y_train[:500])
    floats = judge.features(x_train[:20].astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(floats, judge.features(x_train[:20]), rtol=1e-5, atol=1e-5)
    noise = np.random.default_rng(0).integers(0, 256, size=(500, 32, 32, 1), dtype=np.uint8)
    bad = judge_lib.judge_metrics(judge, noise, y_train[:500])
    assert real["judge_accuracy"] > 0.95 and bad["judge_accuracy"] < 0.5
    assert bad["judge_fid"] > 10 * real["judge_fid"] > 0
    assert judge.features(x_test[:3]).shape == (3, judge_lib.FEATURE_DIM)


def test_bad_digit_input(trained):
    _, judge = trained
    with pytest.raises(ValueError, match="32x32"):
        judge.predict(np.zeros((2, 28, 28, 1), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        judge.predict(np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        judge.predict(np.full((2, 32, 32, 1), 255.0, np.float32))
    with pytest.raises(ValueError, match="one class id per image"):
        judge_lib.judge_metrics(judge, np.zeros((2, 32, 32, 1), np.uint8), np.zeros((3,), np.int32))


def _report_of(tmp_path, trained, images, labels):
    """``run.evaluate`` of ``images`` written as a run's samples; returns its report section."""
    import shutil

    import tiny_config
    from vqgen import fileio
    from vqgen.train import run as run_lib

    cache, _ = trained
    workdir = str(tmp_path / "run")
    os.makedirs(os.path.join(workdir, "judge"))
    shutil.copy(os.path.join(cache, "digit_judge_seed0.npz"), os.path.join(workdir, "judge"))
    os.makedirs(os.path.join(workdir, "samples"))
    fileio.save_npz(os.path.join(workdir, "samples", "samples.npz"), images=images, labels=labels)
    run_lib.evaluate(tiny_config.get_config(), workdir)
    return fileio.read_json(os.path.join(workdir, "report.json"))["samples"]


def test_precision_and_recall_reach_the_report(tmp_path, trained):
    """Through ``--mode=evaluate``: the test digits scored as samples are the reference itself
    (precision = recall = 1); blank images lie outside the digits' manifold and cover none of it
    (0, 0); the real-digit reference row is there and well inside (0, 1]."""
    x_test, y_test = embedded.load_mnist("test")
    same = _report_of(tmp_path / "same", trained, x_test, y_test)
    assert same["judge_precision"] == 1.0 and same["judge_recall"] == 1.0
    blank = _report_of(tmp_path / "blank", trained, np.zeros_like(x_test), y_test)
    assert blank["judge_precision"] == 0.0 and blank["judge_recall"] == 0.0
    for row in (same, blank):  # the reference depends on the labels only
        assert 0.5 < row["judge_real_precision"] <= 1.0 and 0.5 < row["judge_real_recall"] <= 1.0
        assert row["judge_real_accuracy"] > 0.95
    assert same["judge_real_recall"] == blank["judge_real_recall"]
