"""Tests of the MAGVIT 3D-VQ video tokenizer, 3D conv blocks, 2D->3D inflation and the COMMIT tasks.

Every model is initialised and applied inside one jitted function per test to keep compiles few.
"""
import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.generators import magvit_tasks as mt
from vqgen.modules.conv import conv
from vqgen.modules.conv3d import ResBlock3D, conv3d
from vqgen.quantizers.fsq import FiniteScalarQuantizer
from vqgen.quantizers.vq import VectorQuantizer
from vqgen.tokenizers import magvit
from vqgen.tokenizers.vqgan import VQGAN


def _video(seed, shape):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def _params(module, *args, seed=0, **kwargs):
    """Random parameters for ``module`` filled in NumPy (no jitted init: XLA:CPU compiles random
    draws of conv-kernel shapes slowly), plus the boxed abstract tree for its logical names."""
    abstract = jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']"):
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
        elif name.endswith("['scale']"):
            return (1.0 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        else:
            std = 0.1 if name.endswith("['bias']") else 1.0
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract)), abstract


def _tiny(**overrides):
    kw = dict(in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,), z_channels=8,
              embed_dim=8, num_frames=4, resolution=8, norm_groups=4)
    return magvit.MAGVIT(quantizer=VectorQuantizer(codebook_size=16), **{**kw, **overrides})


# ------------------------------------------------------------------------------ tokenizer

def test_moving_mnist_variant_shapes_decode_indices_and_jit():
    qname, qkw = magvit.QUANTIZERS["moving_mnist"]
    assert qname == "FiniteScalarQuantizer"
    model = magvit.build("moving_mnist", FiniteScalarQuantizer(**qkw))
    x = _video(0, (2, 16, 32, 32, 1))
    params, abstract = _params(model, x)

    @jax.jit
    def run(params, x):
        x_rec, out = model.apply({"params": params}, x)
        return x_rec, out, model.apply({"params": params}, out.indices, method="decode_indices")

    x_rec, out, from_idx = run(params, x)
    assert x_rec.shape == x.shape and x_rec.dtype == jnp.float32
    assert out.indices.shape == (2, 4, 8, 8) and out.indices.dtype == jnp.int32
    assert model.token_shape() == (4, 8, 8)
    assert out.quantized.shape == (2, 4, 8, 8, 4)  # 1x1x1 quant_conv to the 4 FSQ channels
    # x_rec = decode(encode(x).quantized); the straight-through quantized equals the codes.
    np.testing.assert_allclose(from_idx, x_rec, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(x_rec))) and float(jnp.std(x_rec)) > 0
    kernel = params
    for k in magvit.LAST_LAYER:
        kernel = kernel[k]
    assert kernel.shape == (3, 3, 3, 16, 1)  # input width ch * ch_mult[0] = 16
    assert abstract["encoder"]["conv_in"]["kernel"].names == ("time", "height", "width", "conv_in", "conv_out")
    assert abstract["decoder"]["mid_block_1"]["norm1"]["scale"].names == ("conv_out",)


def test_causal_tokenizer_is_block_causal_and_noncausal_is_not():
    x = _video(2, (1, 4, 8, 8, 1))
    future = x.copy()
    future[:, 2:] = _video(3, (1, 2, 8, 8, 1))  # change frames 2, 3 only
    both = np.concatenate([x, future])  # [2, 4, 8, 8, 1]
    causal, centred = _tiny(causal=True), _tiny(causal=False)
    params, _ = _params(causal, both)  # same parameter tree for both

    @jax.jit
    def run(params):
        return [m.apply({"params": params}, both) for m in (causal, centred)]

    (c_rec, c_out), (n_rec, _) = run(params)
    # Temporal factor 2: token frame 0 covers input frames 0, 1; outputs 0, 1 come from it.
    np.testing.assert_array_equal(c_out.indices[0, :1], c_out.indices[1, :1])
    np.testing.assert_allclose(c_rec[0, :2], c_rec[1, :2], atol=1e-6)
    assert not np.allclose(c_rec[0, 2:], c_rec[1, 2:], atol=1e-4)
    # The centred (MAGVIT v1) model leaks the future into the past frames.
    assert not np.allclose(n_rec[0, :2], n_rec[1, :2], atol=1e-4)


def test_causal_conv_and_resblock_are_strictly_causal():
    x = _video(4, (1, 6, 4, 4, 8))
    future = x.copy()
    future[:, 3:] += 1.0  # perturb frames 3..5
    both = np.concatenate([x, future])
    layers = [conv3d(8, 3, causal=True), ResBlock3D(16, causal=True, norm_groups=4),
              conv3d(8, 3, causal=False), ResBlock3D(16, causal=False, norm_groups=4)]
    params = [_params(layer, both)[0] for layer in layers]

    @jax.jit
    def run(params):
        return [layer.apply({"params": p}, both) for layer, p in zip(layers, params)]

    res = run(params)
    for y in res[:2]:  # causal: frames 0..2 untouched
        np.testing.assert_allclose(y[0, :3], y[1, :3], atol=1e-6)
        assert not np.allclose(y[0, 3:], y[1, 3:], atol=1e-4)
    for y in res[2:]:  # centred: frame 2 sees frame 3
        assert not np.allclose(y[0, 2], y[1, 2], atol=1e-4)


def test_bf16_activations_with_f32_params():
    model = _tiny(dtype=jnp.bfloat16, param_dtype=jnp.float32, causal=True)
    x = _video(5, (1, 4, 8, 8, 1))
    params, _ = _params(model, x)
    x_rec, out = jax.jit(model.apply)({"params": params}, x)
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    assert x_rec.dtype == jnp.bfloat16
    assert out.loss.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(x_rec.astype(jnp.float32))))


def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="frame count divisible by 2"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 7, 8, 8, 1)))
    with pytest.raises(ValueError, match="one bool per downsampling"):
        jax.eval_shape(_tiny(temporal_downsample=(True, False)).init, jax.random.key(0), jnp.zeros((1, 4, 8, 8, 1)))
    with pytest.raises(ValueError, match="unknown; use one of"):
        magvit.build("XL", VectorQuantizer(codebook_size=4))


def test_variant_table_matches_magvit_configs():
    b, l = magvit.VARIANTS["B"], magvit.VARIANTS["L"]
    assert (b["ch"], l["ch"]) == (64, 128)
    for v in (b, l):
        assert v["ch_mult"] == (1, 2, 2, 4) and v["temporal_downsample"] == (True, True, False)
        assert v["embed_dim"] == 256 and v["num_res_blocks"] == 2
    assert magvit.build("B", VectorQuantizer(codebook_size=1024)).token_shape() == (4, 16, 16)


# ------------------------------------------------------------------------------ inflation

@pytest.mark.parametrize("causal", [False, True])
def test_central_inflation_of_one_conv_equals_2d_conv_per_frame(causal):
    x = _video(6, (2, 5, 6, 6, 3))  # arbitrary (not constant) frames
    c2, c3 = conv(4, 3), conv3d(4, 3, causal=causal)
    p2, _ = _params(c2, x[:, 0])
    _, abstract3 = _params(c3, x)
    init3 = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), nn.meta.unbox(abstract3))
    p3, report = magvit.inflate_2d_params(p2, init3, mode="central", causal=causal)
    assert report["inflated"] == ["kernel"] and report["copied"] == ["bias"] and not report["kept"]
    tap = 2 if causal else 1
    np.testing.assert_array_equal(np.delete(np.asarray(p3["kernel"]), tap, axis=0), 0.0)
    y3 = c3.apply({"params": p3}, x)
    y2 = jax.vmap(lambda f: c2.apply({"params": p2}, f), in_axes=1, out_axes=1)(x)
    np.testing.assert_allclose(y3, y2, atol=1e-5)


def test_average_inflation_equals_2d_conv_on_static_video_away_from_the_ends():
    frame = _video(7, (1, 6, 6, 3))
    x = np.repeat(frame[:, None], 5, axis=1)  # 5 identical frames
    c2, c3 = conv(4, 3), conv3d(4, 3)
    p2, _ = _params(c2, frame)
    p3, _ = magvit.inflate_2d_params(p2, jax.eval_shape(c3.init, jax.random.key(1), x)["params"], mode="average")
    y3 = c3.apply({"params": p3}, x)
    y2 = c2.apply({"params": p2}, frame)
    for t in range(1, 4):
        np.testing.assert_allclose(y3[:, t], y2, atol=1e-5)
    assert not np.allclose(y3[:, 0], y2, atol=1e-3)  # zero time padding removes a tap at the ends


@pytest.mark.parametrize("causal", [False, True])
def test_inflated_magvit_reproduces_2d_vqgan_on_static_video(causal):
    """A MAGVIT inflated from a MaskGIT-style VQGAN of the same layout equals it frame by frame."""
    arch = dict(in_channels=1, ch=8, ch_mult=(1, 1), num_res_blocks=1, z_channels=8, embed_dim=8, norm_groups=4)
    vq = VectorQuantizer(codebook_size=16)
    m2 = VQGAN(quantizer=vq, style="maskgit", use_quant_conv=False, resolution=8, **arch)
    m3 = magvit.MAGVIT(quantizer=vq, temporal_downsample=(True,), causal=causal, num_frames=4, resolution=8, **arch)
    frame = _video(8, (2, 8, 8, 1))
    video = np.repeat(frame[:, None], 4, axis=1)  # [2, 4, 8, 8, 1], static
    p2, abstract2 = _params(m2, frame)
    _, abstract3 = _params(m3, video)
    _, report = magvit.inflate_2d_params(abstract2, abstract3, causal=causal)  # dry run
    assert not report["kept"] and not report["unused_2d"] and report["inflated"]
    init3 = jax.tree.map(lambda a: np.full(a.shape, np.nan, a.dtype), nn.meta.unbox(abstract3))
    p3, _ = magvit.inflate_2d_params(p2, init3, causal=causal)

    @jax.jit
    def run(p2, p3):
        return m2.apply({"params": p2}, frame), m3.apply({"params": p3}, video)

    (r2, o2), (r3, o3) = run(p2, p3)
    for t in range(4):
        np.testing.assert_allclose(r3[:, t], r2, atol=2e-4)
    for t in range(2):
        np.testing.assert_array_equal(o3.indices[:, t], o2.indices)


def test_inflation_bad_mode_and_abstract_uninflatable():
    with pytest.raises(ValueError, match="'central' or 'average'"):
        magvit.inflate_2d_params({}, {}, mode="mean")
    abstract = {"extra": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 2, 2), jnp.float32)}}
    with pytest.raises(ValueError, match="pass initialised 3D params"):
        magvit.inflate_2d_params({"other": np.zeros(2)}, abstract)


# ------------------------------------------------------------------------------ tasks / COMMIT

T, H, W = 8, 16, 16
LATENT = (4, 4, 4)  # temporal factor 2, spatial factor 4


def _expected_token_mask(task, cond_frames):
    """Token-level condition regions written out coordinate by coordinate."""
    out = np.zeros(LATENT, bool)
    k = math.ceil(cond_frames / 2)
    for t, i, j in itertools.product(*map(range, LATENT)):
        centre = 1 <= i < 3 and 1 <= j < 3
        out[t, i, j] = {
            "class": False,
            "frame_prediction": t < k,
            "frame_interpolation": t < k or t >= LATENT[0] - k,
            "central_inpainting": not centre,
            "central_outpainting": centre,
            "horizontal_outpainting": 1 <= i < 3,
            "vertical_outpainting": 1 <= j < 3,
        }[task]
    return out


@pytest.mark.parametrize("task", mt.TASKS)
@pytest.mark.parametrize("cond_frames", [1, 3])
def test_task_masks(task, cond_frames):
    video = _video(9, (2, T, H, W, 1))
    known, cond = mt.task_condition(task, video, LATENT, cond_frames=cond_frames)
    expected = _expected_token_mask(task, cond_frames)
    assert known.shape == (2, math.prod(LATENT)) and known.dtype == jnp.bool_
    np.testing.assert_array_equal(known[0].reshape(LATENT), expected)
    np.testing.assert_array_equal(known[1], known[0])
    # A token is in the condition iff any pixel of its (2, 4, 4) block is given.
    pix, tok = mt.condition_masks(task, (T, H, W), LATENT, cond_frames)
    blocks = pix.reshape(4, 2, 4, 4, 4, 4).any(axis=(1, 3, 5))
    np.testing.assert_array_equal(blocks, tok)
    # Given pixels are passed through unchanged.
    sel = np.broadcast_to(pix[None, ..., None], video.shape)
    np.testing.assert_array_equal(np.asarray(cond)[sel], np.asarray(video)[sel])
    assert cond.shape == video.shape


def test_condition_fills():
    video = _video(10, (1, T, H, W, 1))
    _, fp = mt.task_condition("frame_prediction", video, LATENT, cond_frames=3)
    for t in range(3, T):
        np.testing.assert_array_equal(fp[:, t], video[:, 2])
    _, fi = mt.task_condition("frame_interpolation", video, LATENT, cond_frames=1)
    for t in range(1, T - 1):
        np.testing.assert_allclose(fi[:, t], video[:, 0] + (video[:, T - 1] - video[:, 0]) * t / (T - 1), atol=1e-6)
    _, ipc = mt.task_condition("central_inpainting", video, LATENT)
    np.testing.assert_array_equal(ipc[:, :, 4:12, 4:12], 0.0)
    _, opc = mt.task_condition("central_outpainting", video, LATENT)
    np.testing.assert_array_equal(opc[:, :, 0, 0], video[:, :, 4, 4])
    np.testing.assert_array_equal(opc[:, :, 15, 7], video[:, :, 11, 7])
    _, opc0 = mt.task_condition("central_outpainting", video, LATENT, padding="constant")
    np.testing.assert_array_equal(opc0[:, :, :4], 0.0)


def test_commit_inputs_follows_the_three_cases():
    rng = np.random.default_rng(0)
    b, l, mask_id = 3, 40, 99
    z = rng.integers(0, 50, (b, l))
    z_cond = rng.integers(50, 90, (b, l))
    cond = rng.random((b, l)) < 0.4
    sched = rng.random((b, l)) < 0.5
    got = np.asarray(mt.commit_inputs(jnp.asarray(z), jnp.asarray(z_cond), jnp.asarray(cond), jnp.asarray(sched), mask_id))
    for i, j in itertools.product(range(b), range(l)):
        if sched[i, j] and cond[i, j]:
            assert got[i, j] == z_cond[i, j]
        elif sched[i, j]:
            assert got[i, j] == mask_id
        else:
            assert got[i, j] == z[i, j]
    assert got.dtype == np.int32
    # Decoding starts with every position masked: condition tokens in the region, [MASK] outside.
    start = mt.commit_inputs(z, z_cond, cond, np.ones_like(cond), mask_id)
    np.testing.assert_array_equal(start, np.where(cond, z_cond, mask_id))
    np.testing.assert_array_equal(mt.commit_segment_ids(cond, sched), (cond & sched).astype(np.int32))
    np.testing.assert_array_equal(mt.commit_loss_weights(cond, sched), np.ones((b, l)))
    np.testing.assert_array_equal(mt.commit_loss_weights(cond, sched, "mask+refine"), sched.astype(np.float32))


def test_task_errors():
    with pytest.raises(ValueError, match="has 12 frames but the video tokenizer encodes clips of 16 frames"):
        mt.validate_condition("frame_prediction", 12, 16)
    with pytest.raises(ValueError, match="frame_prediction, frame_interpolation, central_inpainting"):
        mt.validate_condition("inpainting", 16, 16)
    with pytest.raises(ValueError, match="1 <= cond_frames < 16"):
        mt.validate_condition("frame_prediction", 16, 16, cond_frames=16)
    with pytest.raises(ValueError, match="2 \\* cond_frames < 8"):
        mt.task_condition("frame_interpolation", jnp.zeros((1, 8, 16, 16, 1)), LATENT, cond_frames=4)
    with pytest.raises(ValueError, match="padding 'interpolate' does not apply"):
        mt.task_condition("frame_prediction", jnp.zeros((1, 8, 16, 16, 1)), LATENT, padding="interpolate")
    with pytest.raises(ValueError, match="does not divide the clip length"):
        mt.task_condition("class", jnp.zeros((1, 8, 16, 16, 1)), (3, 4, 4))


@pytest.mark.parametrize("kernel, strides, causal", [
    (3, 1, False), (3, 1, True), ((3, 3, 3), (1, 2, 2), True), ((3, 3, 3), (2, 2, 2), True), (1, 1, False)])
def test_conv3d_as_shifted_2d_convs_equals_a_3d_conv(kernel, strides, causal):
    """The time-shifted 2D path (and the strided 3D path) compute flax's 3D ``nn.Conv``."""
    x = _video(11, (2, 6, 6, 6, 3))
    c3 = conv3d(5, kernel, strides=strides, causal=causal)
    params, abstract = _params(c3, x)
    assert abstract["kernel"].names == ("time", "height", "width", "conv_in", "conv_out")
    ref = nn.Conv(5, c3.kernel_size, strides=c3.strides, padding=list(c3.padding))

    @jax.jit
    def run(p):
        return c3.apply({"params": p}, x), ref.apply({"params": p}, x)

    got, want = run(params)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
