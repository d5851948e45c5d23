"""Evaluation metrics against independent NumPy/SciPy/scikit-image computations."""
import json
import warnings

import numpy as np
import pytest
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vqgen.evaluation import fid, metrics


def _random_feats(rng, n, d, shift=0.0):
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def _reference_fid(a, b):
    """Written out here independently: float64 means/covariances, scipy sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca = (a - mu_a).T @ (a - mu_a) / (len(a) - 1)
    cb = (b - mu_b).T @ (b - mu_b) / (len(b) - 1)
    root = linalg.sqrtm(ca @ cb)
    root = np.real(root[0] if isinstance(root, tuple) else root)
    return np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * np.trace(root)


def test_fid_matches_independent_float64():
    rng = np.random.default_rng(0)
    a, b = _random_feats(rng, 300, 32), _random_feats(rng, 400, 32, shift=0.3)
    ours = metrics.fid_from_activations(a, b)
    ref = _reference_fid(a, b)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # A second route: Tr sqrt(Ca Cb) is the sum of square roots of the (real, >= 0) eigenvalues.
    mu_a, ca = a.mean(0), np.cov(a, rowvar=False)
    mu_b, cb = b.mean(0), np.cov(b, rowvar=False)
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)))
    eig_ref = np.sum((mu_a - mu_b) ** 2) + np.trace(ca) + np.trace(cb) - 2 * tr
    np.testing.assert_allclose(ours, eig_ref, rtol=1e-6)
    assert abs(metrics.fid_from_activations(a, a)) < 1e-6


def test_fid_singular_product_and_rank_warning():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(10, 16)), rng.normal(size=(10, 16))  # fewer samples than dims
    with pytest.warns(UserWarning, match="rank-deficient"):
        mu1, s1 = metrics.compute_statistics(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mu2, s2 = metrics.compute_statistics(b)
        value = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value)
    with pytest.raises(ValueError, match="same feature layer"):
        metrics.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_reference_stats_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    pool, spatial = rng.normal(size=(50, 8)), rng.normal(size=(50, 6))
    images = rng.integers(0, 256, size=(50, 4, 4, 3), dtype=np.uint8)
    path = str(tmp_path / "ref.npz")
    metrics.save_reference_stats(path, {"pool": pool, "spatial": spatial}, images=images)
    with np.load(path) as z:  # the ADM evaluator's keys
        assert {"mu", "sigma", "mu_s", "sigma_s", "arr_0"} <= set(z.files)
        np.testing.assert_array_equal(z["arr_0"], images)
        np.testing.assert_allclose(z["sigma"], np.cov(pool, rowvar=False))
    stats = metrics.load_reference_stats(path)
    np.testing.assert_allclose(stats["mu"], pool.mean(0))
    np.testing.assert_allclose(stats["sigma_s"], np.cov(spatial, rowvar=False))
    np.testing.assert_allclose(stats["activations"], pool.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="save_reference_stats"):
        metrics.load_reference_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "bad.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an ADM-style"):
        metrics.load_reference_stats(str(tmp_path / "bad.npz"))


def test_fid_cli_on_two_statistics_files(tmp_path, capsys):
    rng = np.random.default_rng(3)
    a, b = _random_feats(rng, 60, 8), _random_feats(rng, 70, 8, shift=0.5)
    metrics.save_reference_stats(str(tmp_path / "a.npz"), a)
    metrics.save_reference_stats(str(tmp_path / "b.npz"), b)
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"fid"}
    np.testing.assert_allclose(result["fid"], _reference_fid(a, b), rtol=1e-6)


def test_fid_cli_on_images_with_stand_in_features(tmp_path, capsys, monkeypatch):
    """The CLI's plumbing (file layouts, stored stats vs activations, JSON) with a stand-in network."""
    from vqgen.evaluation import inception

    def fake_extract(params, images, mesh=None):
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        return {"pool": x[:, :12], "spatial": x[:, 12:20], "logits_unbiased": x[:, :10] / 50.0}

    monkeypatch.setattr(inception, "load_inception_params", lambda path: {})
    monkeypatch.setattr(inception, "extract", fake_extract)
    rng = np.random.default_rng(7)
    samples = rng.integers(0, 256, size=(40, 4, 4, 3), dtype=np.uint8)
    ref = rng.integers(0, 200, size=(48, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", images=samples, labels=np.zeros(40, np.int32))
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    fid.main([str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--batch_size", "16"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    fs, fr = fake_extract(None, samples), fake_extract(None, ref)
    np.testing.assert_allclose(result["fid"], _reference_fid(fs["pool"], fr["pool"]), rtol=1e-6)
    np.testing.assert_allclose(result["sfid"], _reference_fid(fs["spatial"], fr["spatial"]), rtol=1e-6)
    np.testing.assert_allclose(result["inception_score"], metrics.inception_score(fs["logits_unbiased"])[0])
    p, r = metrics.precision_recall(fr["pool"], fs["pool"])
    assert (result["precision"], result["recall"]) == (p, r)
    np.savez(tmp_path / "float.npz", images=samples.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.main([str(tmp_path / "float.npz"), str(tmp_path / "ref.npz")])
    np.savez(tmp_path / "odd.npz", x=samples)
    with pytest.raises(ValueError, match="arr_0"):
        fid.main([str(tmp_path / "odd.npz"), str(tmp_path / "ref.npz")])


def test_psnr_ssim_match_skimage():
    rng = np.random.default_rng(4)
    x = rng.uniform(-1, 1, size=(3, 24, 20, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(scale=0.2, size=x.shape), -1, 1).astype(np.float32)
    ours_psnr = np.asarray(metrics.psnr(x, y))
    ours_ssim = np.asarray(metrics.ssim(x, y))
    for i in range(len(x)):
        ref_p = peak_signal_noise_ratio(x[i], y[i], data_range=2.0)
        ref_s = structural_similarity(
            x[i], y[i], data_range=2.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False,
        )
        np.testing.assert_allclose(ours_psnr[i], ref_p, rtol=1e-4)
        np.testing.assert_allclose(ours_ssim[i], ref_s, atol=1e-4)
    assert ours_ssim.dtype == np.float32 and ours_psnr.shape == (3,)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(x[:, :8, :8], y[:, :8, :8])
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(x, y[:2])


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(40, 16)).astype(np.float32)
    assert metrics.precision_recall(real, real.copy(), k=3, block_size=16) == (1.0, 1.0)
    far = rng.normal(size=(30, 16)).astype(np.float32) + 100.0
    assert metrics.precision_recall(real, far, k=3, block_size=16) == (0.0, 0.0)
    # Half the fake set on the real manifold: precision 1/2, recall stays positive.
    half = np.concatenate([real[:15], far[:15]])
    p, r = metrics.precision_recall(real, half, k=3)
    assert p == 0.5 and 0 < r < 1


def test_inception_score_bounds():
    rng = np.random.default_rng(6)
    # Confident, evenly spread predictions -> IS near the number of classes.
    labels = np.arange(200) % 10
    logits = np.full((200, 10), -20.0)
    logits[np.arange(200), labels] = 20.0
    mean, std = metrics.inception_score(logits, splits=10)
    np.testing.assert_allclose(mean, 10.0, rtol=1e-6)
    # Identical predictions -> IS of 1.
    mean1, _ = metrics.inception_score(np.tile(rng.normal(size=(1, 10)), (50, 1)), splits=5)
    np.testing.assert_allclose(mean1, 1.0, rtol=1e-9)


def test_codebook_stats_accumulates_batches():
    batches = [np.array([0, 1, 1]), np.array([[1, 3], [3, 3]])]
    stats = metrics.codebook_stats(iter(batches), codebook_size=8)
    p = np.array([1, 3, 3]) / 7
    np.testing.assert_allclose(stats["usage"], 3 / 8)
    np.testing.assert_allclose(stats["entropy"], -np.sum(p * np.log(p)))
    np.testing.assert_allclose(stats["perplexity"], np.exp(stats["entropy"]))
    with pytest.raises(ValueError, match="codebook size"):
        metrics.codebook_stats(np.array([9]), codebook_size=8)


def test_bad_images_are_named():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        metrics.check_images(np.full((2, 8, 8, 3), 5.0, np.float32))
    with pytest.raises(ValueError, match="dtype int32"):
        metrics.check_images(np.zeros((2, 8, 8, 3), np.int32))
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        metrics.check_images(np.zeros((8, 8, 3), np.uint8))
