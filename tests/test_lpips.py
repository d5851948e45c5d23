"""LPIPS: converter + Flax network against the lpips package's own PyTorch LPIPS.

The reference is ``lpips.LPIPS(net='vgg')`` from the installed package, run on a random VGG16
trunk with torchvision's key layout and the real linear heads that ship with ``lpips``.
torchvision does not import beside this torch wheel, so the test puts a small stand-in
``torchvision.models`` module in ``sys.modules`` whose ``vgg16()`` builds the torchvision
``features`` layout from ``torch.nn`` layers and loads the random state dict; everything else
(scaling layer, slicing, normalisation, heads, averaging) is the lpips package's code.
"""
from __future__ import annotations

import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the LPIPS reference and the converter need torch")

from vqgen.convert import lpips as convert_lpips  # noqa: E402
from vqgen.losses import perceptual  # noqa: E402

# torchvision's vgg16 "D" configuration: conv widths, "M" = 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _torch_vgg16_features(state_dict):
    """torchvision's ``vgg16().features`` layout built from torch.nn, loaded with ``state_dict``."""
    layers, in_ch = [], 3
    for item in VGG16_CFG:
        if item == "M":
            layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [torch.nn.Conv2d(in_ch, item, kernel_size=3, padding=1), torch.nn.ReLU(inplace=True)]
            in_ch = item
    features = torch.nn.Sequential(*layers)
    features.load_state_dict({k.removeprefix("features."): v for k, v in state_dict.items() if k.startswith("features.")})
    return features


def _random_vgg16_state_dict(seed=0):
    """Random weights with the real torchvision key layout and shapes (He-scaled, so features stay O(1))."""
    gen = torch.Generator().manual_seed(seed)
    state, in_ch, index = {}, 3, 0
    for item in VGG16_CFG:
        if item == "M":
            index += 1
            continue
        std = (2.0 / (9 * in_ch)) ** 0.5
        state[f"features.{index}.weight"] = torch.randn(item, in_ch, 3, 3, generator=gen) * std
        state[f"features.{index}.bias"] = torch.randn(item, generator=gen) * 0.05
        in_ch, index = item, index + 2  # conv + ReLU
    state["classifier.0.weight"] = torch.zeros(8, 8)  # ignored by the converter, present in the real file
    return state


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Runs the converter's command line on a saved random state dict; returns (paths, state dict)."""
    tmp = tmp_path_factory.mktemp("lpips")
    state = _random_vgg16_state_dict()
    vgg_path, out_path = tmp / "vgg16.pth", tmp / "lpips_vgg.npz"
    torch.save(state, vgg_path)
    convert_lpips.main(["--vgg16", str(vgg_path), "--out", str(out_path)])
    return out_path, state


@pytest.fixture()
def reference_lpips(monkeypatch, converted):
    """The lpips package's LPIPS(net='vgg') with the random trunk, via a stand-in torchvision."""
    _, state = converted
    models = types.ModuleType("torchvision.models")
    models.vgg16 = lambda *args, **kwargs: types.SimpleNamespace(features=_torch_vgg16_features(state))
    tv = types.ModuleType("torchvision")
    tv.models = models
    before = set(sys.modules)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)
    import lpips

    net = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, verbose=False).eval()
    yield net
    for name in set(sys.modules) - before:  # forget the lpips modules bound to the stand-in
        if name == "lpips" or name.startswith("lpips."):
            del sys.modules[name]


def test_module_parameters_match_file_layout():
    abstract = jax.eval_shape(perceptual.LPIPS().init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))
    flat = perceptual.flatten_params(nn.unbox(abstract)["params"])
    assert {k: tuple(v.shape) for k, v in flat.items()} == perceptual.expected_param_shapes()
    specs = nn.get_partition_spec(abstract)["params"]
    assert tuple(specs["conv2_1"]["kernel"]) == (None, None, "conv_in", "conv_out")


def test_keys_layout_matches_torchvision():
    state = _random_vgg16_state_dict()
    conv_keys = sorted(int(k.split(".")[1]) for k in state if k.startswith("features.") and k.endswith(".weight"))
    assert tuple(conv_keys) == convert_lpips.VGG16_FEATURE_INDICES


def test_flax_lpips_matches_lpips_package(converted, reference_lpips):
    path, _ = converted
    params = perceptual.load_lpips_params(str(path))
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(3, 64, 64, 3)).astype(np.float32)
    # pairs at different distances: a small perturbation, a larger one, an unrelated image
    y = np.stack([
        np.clip(x[0] + 0.05 * rng.standard_normal(x[0].shape), -1, 1),
        np.clip(x[1] + 0.4 * rng.standard_normal(x[1].shape), -1, 1),
        rng.uniform(-1, 1, size=x[2].shape),
    ]).astype(np.float32)

    # one call: the three pairs, then each image against itself
    left, right = np.concatenate([x, x]), np.concatenate([y, x])
    ours = jax.jit(perceptual.LPIPS().apply)({"params": params}, jnp.asarray(left), jnp.asarray(right))
    assert ours.shape == (6,) and ours.dtype == jnp.float32

    def to_torch(a):
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    with torch.no_grad():
        ref = reference_lpips(to_torch(x), to_torch(y)).reshape(-1).numpy()
    assert np.all(ref > 0) and ref[0] < ref[2]  # the reference is not degenerate
    np.testing.assert_allclose(np.asarray(ours[:3]), ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours[3:]), 0.0, atol=1e-7)


def test_make_perceptual_loss(converted):
    path, _ = converted
    loss_fn, params = perceptual.make_perceptual_loss(str(path))
    # grayscale input: the same distance as the image repeated to RGB
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)), jnp.float32)
    y = x[::-1]

    @jax.jit
    def run(p, a, b):
        value, param_grads = jax.value_and_grad(loss_fn)(p, a, b)
        rgb = perceptual.LPIPS().apply({"params": p}, jnp.repeat(a, 3, -1), jnp.repeat(b, 3, -1))
        return value, param_grads, rgb

    value, param_grads, per_pair = run(params, x, y)
    assert value.shape == () and value.dtype == jnp.float32
    np.testing.assert_allclose(value, jnp.mean(per_pair), rtol=1e-5)
    assert float(value) > 0
    # the LPIPS parameters are frozen: no gradient reaches them
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(param_grads))


def test_perceptual_off_without_file(monkeypatch):
    logged = []
    monkeypatch.setattr(perceptual, "_logged_off", False)
    monkeypatch.setattr(perceptual.logging, "warning", lambda msg, *args: logged.append(msg % args))
    assert perceptual.make_perceptual_loss(None, config_key="loss.lpips_weights") is None
    assert perceptual.make_perceptual_loss("") is None
    assert len(logged) == 1, logged  # once, not per call
    assert "perceptual loss is off" in logged[0] and "loss.lpips_weights" in logged[0]
    assert "python -m vqgen.convert.lpips" in logged[0]


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match=r"nope\.npz.*python -m vqgen\.convert\.lpips"):
        perceptual.load_lpips_params(str(missing))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        perceptual.make_perceptual_loss(str(missing))


def test_wrong_architecture_file_is_a_clear_error(tmp_path, converted):
    path, _ = converted
    good = dict(np.load(path))
    # another network's weights: the conv5 stage is missing and conv1_1 is 5x5
    bad = {k: v for k, v in good.items() if not k.startswith("conv5_")}
    bad["conv1_1/kernel"] = np.zeros((5, 5, 3, 64), np.float32)
    bad_path = tmp_path / "alex.npz"
    np.savez(bad_path, **bad)
    with pytest.raises(ValueError, match=r"does not hold LPIPS-VGG16 weights.*missing.*conv5_1.*wrong shapes"):
        perceptual.load_lpips_params(str(bad_path))
    # a file without the format tag (e.g. some other .npz)
    untagged = tmp_path / "other.npz"
    np.savez(untagged, w=np.zeros(3))
    with pytest.raises(ValueError, match="not an LPIPS-VGG16 weights file"):
        perceptual.load_lpips_params(str(untagged))
    # not an .npz at all
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an .npz file"):
        perceptual.load_lpips_params(str(text))
    # and a torch state dict of another network given to the converter
    with pytest.raises(ValueError, match="vgg16"):
        convert_lpips.convert({"features.0.weight": np.zeros((64, 3, 11, 11))}, {})


def test_converter_layouts():
    state = {k: v.numpy() for k, v in _random_vgg16_state_dict(seed=1).items()}
    heads = {f"lin{i}.model.1.weight": np.random.default_rng(i).uniform(size=(1, w, 1, 1)).astype(np.float32)
             for i, w in enumerate(perceptual.VGG16_WIDTHS)}
    params = convert_lpips.convert(state, heads)
    np.testing.assert_array_equal(params["conv2_1"]["kernel"][1, 2, :, 7], state["features.5.weight"][7, :, 1, 2])
    np.testing.assert_array_equal(params["conv5_3"]["bias"], state["features.28.bias"])
    np.testing.assert_array_equal(params["lin3"][0, 0, :, 0], heads["lin3.model.1.weight"][0, :, 0, 0])
