"""The Flax FID InceptionV3 against torch-fidelity's FeatureExtractorInceptionV3 (same random weights)."""
import importlib
import os
import sys
import types

import jax
import numpy as np
import pytest

from vqgen import parallel
from vqgen.convert import inception as convert_inception
from vqgen.evaluation import inception

torch = pytest.importorskip("torch", reason="the PyTorch reference needs torch (CI installs torch==2.13.0 CPU)")


def _torch_fidelity_extractor_module(monkeypatch):
    """Imports torch_fidelity/feature_extractor_inceptionv3.py without the package __init__
    (which imports torchvision, unavailable beside the CPU torch wheel)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    for name in list(sys.modules):
        if name == "torch_fidelity" or name.startswith("torch_fidelity."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    for name in list(sys.modules):  # undone by monkeypatch at teardown
        if name.startswith("torch_fidelity."):
            monkeypatch.setitem(sys.modules, name, sys.modules[name])
    return module


def _random_weights_file(module, path, monkeypatch):
    """A state dict with torch-fidelity's key layout and seeded random values, saved to ``path``."""
    torch.save({}, path)
    with monkeypatch.context() as m:  # build the architecture once without loading weights
        m.setattr(module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("conv.weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = 0.5 + torch.rand(value.shape, generator=gen)
        elif key.endswith(("bn.bias", "running_mean")):
            state[key] = 0.1 * torch.randn(value.shape, generator=gen)
        elif key == "fc.weight":
            state[key] = torch.randn(value.shape, generator=gen) / value.shape[1] ** 0.5
        else:
            state[key] = torch.randn(value.shape, generator=gen)
    torch.save(state, path)
    return state


def test_matches_torch_fidelity(tmp_path, monkeypatch):
    module = _torch_fidelity_extractor_module(monkeypatch)
    pth = str(tmp_path / "weights-inception-random.pth")
    _random_weights_file(module, pth, monkeypatch)
    ref_net = module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased", "logits"], feature_extractor_weights_path=pth
    ).eval()
    spatial_ref = {}
    ref_net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: spatial_ref.setdefault("x", out))

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)  # [B, H, W, C]
    with torch.no_grad():
        pool_t, unbiased_t, logits_t = (
            t.numpy() for t in ref_net(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
        )
    spatial_t = spatial_ref["x"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()

    # The converter CLI, then the loader.
    npz = str(tmp_path / "inception_fid.npz")
    convert_inception.main([pth, npz])
    params = inception.load_inception_params(npz)
    mesh = parallel.create_mesh((2, 1, 1), devices=jax.devices()[:2])
    feats = inception.extract(params, images, mesh=mesh)

    def close(ours, ref):
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())

    close(feats["pool"], pool_t)
    close(feats["logits_unbiased"], unbiased_t)
    close(feats["logits"], logits_t)
    close(feats["spatial"], spatial_t)
    assert feats["spatial"].shape == (2, inception.SPATIAL_DIM)
    assert np.abs(pool_t).max() > 1e-2  # the random network did not collapse to zeros


def test_resize_matches_torch_fidelity(monkeypatch):
    module = _torch_fidelity_extractor_module(monkeypatch)
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 3, 13, 21)).astype(np.float32)
    ref = module.interpolate_bilinear_2d_like_tensorflow1x(torch.from_numpy(x), size=(299, 299), align_corners=False)
    ours = inception.resize_bilinear_tf1(np.transpose(x, (0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-6, atol=1e-4)


def test_bad_weights_and_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m vqgen.convert.inception"):
        inception.load_inception_params(str(tmp_path / "missing.npz"))
    # torchvision's ImageNet InceptionV3 has a 1000-way classifier: another architecture.
    shapes = inception.expected_shapes()
    state = {}
    for k, shape in shapes.items():
        parts = k.split("/")
        if k == "fc_kernel":
            state["fc.weight"] = np.zeros((1000, shape[0]), np.float32)
        elif k == "fc_bias":
            state["fc.bias"] = np.zeros((1000,), np.float32)
        elif parts[-1] == "kernel":
            state[".".join(parts[:-1]) + ".weight"] = np.zeros(shape[::-1][:2] + shape[:2], np.float32)
        else:
            name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[parts[-1]]
            state[".".join(parts[:-1] + [name])] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match="torchvision"):
        convert_inception.convert(state)
    with pytest.raises(ValueError, match="lacks"):
        convert_inception.convert({"features.0.weight": np.zeros((3, 3))})
    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="not the FID InceptionV3"):
        inception.load_inception_params(str(tmp_path / "other.npz"))
    with pytest.raises(ValueError, match="channels"):
        inception.extract({}, np.zeros((1, 8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        inception.extract({}, np.full((1, 8, 8, 3), 200.0, np.float32))
