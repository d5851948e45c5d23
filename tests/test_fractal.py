"""Tests of FractalMAR (fractal generative models over pixels): the official sizes and parameter
counts, golden checks against the official code (tests/fixtures/fractal, made by
tools/make_fractal_fixture.py), causality of the pixel head and the AR level, the loss and a
short optimisation, the nested sampler compiled once, a 2x4 mesh, bad input.

The tests that compile a training step (the loss decreasing, the 2x4 mesh) or several samplers
are marked slow: ``pytest -m slow tests/test_fractal.py``."""
import dataclasses
import functools
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqgen import parallel
from vqgen.convert import fractal as convert
from vqgen.generators import fractal
from vqgen.generators import mar as mar_lib

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "fractal")
TOL = 1e-4
C = 5  # classes of the tiny models
# Levels (4, 2, 1): a MAR level over 2x2 patches of 2x2 pixels, a MAR level with the guiding pixel over
# the 4 pixels of a patch, the pixel head. Dropout off (it compiles slowly; the blocks are MAR's).
TINY = dict(img_size_list=(4, 2, 1), embed_dim_list=(16, 8, 8), num_blocks_list=(1, 1, 1), num_heads_list=(2, 2, 2),
            generator_type_list=("mar", "mar", "ar"), num_classes=C, guiding_pixel=True, num_conds=5,
            attn_dropout=0.0, proj_dropout=0.0)
# The official modules counted on the meta device (sum of p.numel() over FractalGen's parameters,
# models/fractalgen.py with the README's --num_conds/--guiding_pixel).
OFFICIAL_COUNTS = {"AR-64": 442_068_224, "MAR-64": 431_995_648, "MAR-B-256": 186_300_224,
                   "MAR-L-256": 437_000_064, "MAR-H-256": 849_586_240}


def tiny(**kw) -> fractal.FractalMAR:
    return fractal.FractalMAR(**{**TINY, **kw})


@functools.lru_cache(maxsize=None)
def random_params(model: fractal.FractalMAR, seed: int = 0):
    """Params of the right shapes drawn with NumPy (order-one values in every tensor)."""
    rs = np.random.RandomState(seed)
    flat, tree = jax.tree_util.tree_flatten(nn.meta.unbox(fractal.abstract_params(model)))
    return jax.tree.unflatten(tree, [jnp.asarray(0.3 * rs.standard_normal(x.shape), x.dtype) for x in flat])


def image_batch(b: int = 8, size: int = 4, channels: int = 3) -> dict:
    """Images of black and white pixels (a distribution a few steps can learn) with labels."""
    x = jnp.where(jax.random.uniform(jax.random.key(0), (b, size, size, channels)) < 0.5, -1.0, 1.0)
    return {"images": x, "label": jnp.arange(b) % (C + 1)}


# ------------------------------------------------------------------------- sizes and counts


@pytest.mark.parametrize("name", [
    "MAR-64", "MAR-B-256",
    pytest.param("AR-64", marks=pytest.mark.slow), pytest.param("MAR-L-256", marks=pytest.mark.slow),
    pytest.param("MAR-H-256", marks=pytest.mark.slow)])
def test_official_sizes_have_the_official_parameter_counts(name):
    model = fractal.fractal_variant(name)
    count = fractal.count_params(model)
    assert count == OFFICIAL_COUNTS[name]
    assert abs(count - fractal.PAPER_PARAMS[name]) / fractal.PAPER_PARAMS[name] < (0.025 if name == "AR-64" else 0.005)


def test_tiny_shapes_and_dtypes():
    model = tiny(dtype=jnp.bfloat16)
    params = nn.meta.unbox(fractal.abstract_params(model))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert params["levels_1"]["pos_embed_learned"].shape == (1 + 5 + 4, 8)  # guiding pixel, 5 conditions, 4 patches
    assert params["levels_0"]["pos_embed_learned"].shape == (5 + 4, 16)  # no guiding pixel at level 0
    assert params["pixel_loss"]["codebooks"].shape == (3, 256, 8)
    assert "guiding_pixel_loss" in params["levels_1"] and "guiding_pixel_loss" not in params["levels_0"]
    gen = fractal.level_module(model, 0)
    outs = jax.eval_shape(lambda p, x: gen.apply({"params": p}, x, jnp.ones((2, 4), bool), [jnp.zeros((2, 16))] * 5),
                          params["levels_0"], jnp.zeros((2, 4, 12)))
    assert len(outs) == 5 and all(o.shape == (2, 4, 16) and o.dtype == jnp.bfloat16 for o in outs)


# ----------------------------------------------------------------------------- golden checks


def _fixture(name: str) -> dict:
    data = dict(np.load(os.path.join(FIXTURES, name)))
    data["manifest"] = json.loads(str(data["manifest"]))
    rs = np.random.RandomState(data["manifest"]["config"]["seed"])
    state = {}
    for key, shape, scale, offset, checksum in data["manifest"]["params"]:
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{key} differs"
        state[key] = w
    data["state"] = state
    return data


@pytest.fixture(scope="module")
def mar_fx() -> dict:
    return _fixture("fractalmar_tiny.npz")


def _official_model(fx, info) -> fractal.FractalMAR:
    return fractal.FractalMAR(**info.fields(), attn_dropout=0.0, proj_dropout=0.0, label_drop_prob=0.0,
                              r_weight=fx["manifest"]["config"]["r_weight"], pixel_mean=fractal.IMAGENET_MEAN,
                              pixel_std=fractal.IMAGENET_STD)


def _full_masks(fx, model) -> list[np.ndarray]:
    """The official per-level masks (rows of the masked patches only) as full masks over every row."""
    full, weight = [], np.ones((fx["images"].shape[0],), bool)
    for l in range(model.num_levels):
        got = fx[f"mask{l}"].astype(bool)
        length = got.shape[1]
        m = np.zeros((weight.size, length), bool)
        m[weight] = got
        full.append(m)
        weight = (weight[:, None] & m).reshape(-1)
    return full


def test_golden_fractalmar_forward_and_loss(mar_fx):
    fx, state = mar_fx, mar_fx["state"]
    info = convert.inspect(state, num_heads_list=fx["manifest"]["config"]["num_heads_list"])
    assert info.img_size_list == (8, 4, 2, 1) and info.num_conds == 5 and info.guiding_pixel
    assert info.generator_type_list[:3] == ("mar", "mar", "mar")
    model = _official_model(fx, info)
    params = jax.tree.map(jnp.asarray, convert.convert_state(state, info))
    assert fractal.count_params(model) == sum(int(np.prod(e[1])) for e in fx["manifest"]["params"])
    chex.assert_trees_all_equal_shapes(params, nn.meta.unbox(fractal.abstract_params(model)))
    x = jnp.asarray(fx["images"]).transpose(0, 2, 3, 1)  # [B, H, W, C], ImageNet-normalised
    labels = jnp.asarray(fx["labels"])
    # Level 0's five conditions for given patches, mask and class embeddings.
    @jax.jit
    def level0(p, x, mask, labels):
        cls = model.apply({"params": p}, labels, method=fractal.FractalMAR.class_embedding)
        return fractal.level_module(model, 0).apply({"params": p["levels_0"]}, mar_lib.patchify(x, 4), mask, [cls] * 5)

    outs = level0(params, x, jnp.asarray(fx["conds0_mask"], bool), labels)
    np.testing.assert_allclose(np.stack(outs), fx["conds0"], atol=TOL, rtol=TOL)
    # The whole training loss with the official masks: each guiding-pixel loss and the pixel loss.
    loss, metrics = jax.jit(lambda p, x, y, m: fractal.forward_loss(model, p, x, y, jax.random.key(0), train=False,
                                                                    masks=m))(params, x, labels, _full_masks(fx, model))
    got = [metrics["guiding_pixel_loss_1"], metrics["guiding_pixel_loss_2"], metrics["pixel_loss"]]
    np.testing.assert_allclose(got, fx["pixel_losses"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(loss, fx["loss"], atol=TOL, rtol=TOL)


def test_golden_pixel_head_logits_and_guided_draws(mar_fx):
    fx, state = mar_fx, mar_fx["state"]
    cfg = fx["manifest"]["config"]
    info = convert.inspect(state, num_heads_list=cfg["num_heads_list"])
    model = _official_model(fx, info)
    params = convert.convert_state(state, info)["pixel_loss"]
    head = fractal.pixel_head_module(model)
    apply = jax.jit(lambda v, c: head.apply({"params": params}, v, c))
    ids = fractal.intensities(model, jnp.asarray(fx["pix_target"]))
    logits = apply(ids, jnp.asarray(fx["pix_cond"]))
    np.testing.assert_allclose(logits, fx["pix_logits"], atol=TOL, rtol=TOL)
    # The official sampler's guided distribution of each channel given the values drawn before it.
    chosen = jnp.asarray(fx["sample_ids"])
    p = chosen.shape[0]
    for ch in range(3):
        feed = jnp.concatenate([chosen, chosen]).at[:, ch:].set(0)  # later values cannot matter (causal)
        lg = apply(feed, jnp.asarray(fx["cfg_cond"]))[:, ch] * cfg["sample_temperature"]
        guided = fractal.guided_logits(lg[:p], lg[p:], cfg["sample_cfg"], cfg["sample_filter"])
        np.testing.assert_allclose(jax.nn.softmax(guided, -1), fx["sample_probs"][ch], atol=TOL, rtol=TOL)
        np.testing.assert_array_equal(np.argmax(guided, -1), fx["sample_ids"][:, ch])


def test_golden_fractalar_forward_and_loss():
    fx = _fixture("fractalar_tiny.npz")
    info = convert.inspect(fx["state"], num_heads_list=fx["manifest"]["config"]["num_heads_list"])
    assert info.generator_type_list[:2] == ("ar", "ar") and info.num_conds == 1
    model = _official_model(fx, info)
    params = jax.tree.map(jnp.asarray, convert.convert_state(fx["state"], info))
    x = jnp.asarray(fx["images"]).transpose(0, 2, 3, 1)
    labels = jnp.asarray(fx["labels"])
    @jax.jit
    def run(p, x, labels):
        cls = model.apply({"params": p}, labels, method=fractal.FractalMAR.class_embedding)
        (cond,) = fractal.level_module(model, 0).apply({"params": p["levels_0"]}, mar_lib.patchify(x, 2), [cls])
        return cond, fractal.forward_loss(model, p, x, labels, jax.random.key(0), train=False)

    cond, (loss, metrics) = run(params, x, labels)
    np.testing.assert_allclose(cond, fx["conds0"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(metrics["pixel_loss"], fx["pixel_loss"], atol=TOL, rtol=TOL)
    np.testing.assert_allclose(loss, fx["loss"], atol=TOL, rtol=TOL)


def test_converter_refuses_other_files(mar_fx):
    state = dict(mar_fx["state"])
    heads = mar_fx["manifest"]["config"]["num_heads_list"]
    with pytest.raises(ValueError, match="not a FractalGen model"):
        convert.inspect({"z_proj.weight": np.zeros((4, 4))})
    with pytest.raises(ValueError, match="pass --num-heads"):
        convert.inspect(state)  # tiny sizes: no released model's heads
    broken = dict(state)
    del broken["next_fractal.generator.blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="lacks 'next_fractal.generator.blocks.0.attn.qkv.weight'"):
        convert.inspect(broken, num_heads_list=heads)
    with pytest.raises(ValueError, match="does not have"):
        convert.inspect({**state, "extra.weight": np.zeros(3)}, num_heads_list=heads)


# ------------------------------------------------------------------------------- causality


def test_pixel_head_channel_depends_only_on_earlier_channels():
    model = tiny()
    params = random_params(model)
    head = fractal.pixel_head_module(model)
    apply = jax.jit(lambda v, c: head.apply({"params": params["pixel_loss"]}, v, c))
    cond = jax.random.normal(jax.random.key(1), (4, 8))
    ids = jax.random.randint(jax.random.key(2), (4, 3), 0, 256)
    base = apply(ids, cond)
    for ch in range(3):
        changed = ids.at[:, ch].set((ids[:, ch] + 77) % 256)
        out = apply(changed, cond)
        np.testing.assert_allclose(out[:, : ch + 1], base[:, : ch + 1], atol=1e-5)  # channels <= ch unaffected
        if ch < 2:
            assert float(jnp.abs(out[:, ch + 1:] - base[:, ch + 1:]).max()) > 1e-3  # later channels read it


@pytest.mark.slow  # eager applies of the AR level, ~10 s
def test_ar_level_is_causal_and_its_cache_equals_the_full_pass():
    model = tiny(generator_type_list=("ar", "ar", "ar"), num_conds=1, guiding_pixel=False,
                 embed_dim_list=(16, 8, 8), num_heads_list=(2, 2, 2))
    params = random_params(model)["levels_0"]
    gen = fractal.level_module(model, 0)
    patches = jax.random.normal(jax.random.key(3), (2, 4, 12))
    cond = jax.random.normal(jax.random.key(4), (2, 16))
    (full,) = gen.apply({"params": params}, patches, [cond])
    (moved,) = gen.apply({"params": params}, patches.at[:, 2].add(1.0), [cond])
    np.testing.assert_allclose(moved[:, :3], full[:, :3], atol=1e-5)  # output t reads patches < t only
    assert float(jnp.abs(moved[:, 3] - full[:, 3]).max()) > 1e-3
    cache = [fractal.init_layer_cache(2, 5, gen.num_heads, gen.head_dim) for _ in range(gen.num_blocks)]
    for t in range(4):
        prev = patches[:, max(t - 1, 0)]
        out, cache = gen.apply({"params": params}, prev, cond, cache, t, method=fractal.ARLevel.step)
        np.testing.assert_allclose(out, full[:, t], atol=1e-5)


def test_neighbour_conditions_are_the_shifted_grid():
    g = jnp.arange(9.0).reshape(1, 9, 1)  # a 3x3 grid of scalars
    middle, top, right, bottom, left = (np.asarray(t).reshape(3, 3) for t in fractal._neighbours(g, 3))
    want = np.arange(9.0).reshape(3, 3)
    np.testing.assert_array_equal(middle, want)
    np.testing.assert_array_equal(top, np.vstack([np.zeros((1, 3)), want[:-1]]))
    np.testing.assert_array_equal(bottom, np.vstack([want[1:], np.zeros((1, 3))]))
    np.testing.assert_array_equal(left, np.hstack([np.zeros((3, 1)), want[:, :-1]]))
    np.testing.assert_array_equal(right, np.hstack([want[:, 1:], np.zeros((3, 1))]))


# ------------------------------------------------------------------------------------ loss


@functools.lru_cache(maxsize=None)
def _grad_fn(model):
    return jax.jit(jax.value_and_grad(lambda p, b, r: fractal.loss_fn(model, p, b, r)[0]))


@pytest.mark.slow  # compiles a training step, ~2 min on the shared 2-core machine
def test_loss_is_finite_and_decreases_on_a_tiny_batch():
    model = tiny()
    params = nn.meta.unbox(fractal.init_params(model, jax.random.key(0)))
    batch = image_batch()
    tx = optax.adam(3e-3)
    opt = tx.init(params)
    grad_fn = _grad_fn(model)
    losses = []
    for i in range(25):
        loss, grads = grad_fn(params, batch, jax.random.key(i % 2))  # two fixed draws of masks and noise
        assert np.isfinite(float(loss))
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(loss))
    # Uniform logits start every cross-entropy at log 256 per term (one guiding pixel + the pixels).
    assert abs(losses[0] - 2 * np.log(256)) < 0.2
    assert np.mean(losses[-4:]) < losses[0] - 1.0, losses


@pytest.mark.slow  # three eager forward passes, ~35 s
def test_only_masked_patches_go_down_a_level():
    model = tiny()
    params = random_params(model)
    batch = image_batch(4)
    x = fractal.to_model_pixels(model, batch["images"])
    m0 = np.array([[1, 0, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 0]], bool)
    m1 = np.random.RandomState(0).rand(16, 4) < 0.5
    m1[:, 0] = True

    def loss(masks):
        return fractal.forward_loss(model, params, x, batch["label"], jax.random.key(0), train=False, masks=masks)

    base, metrics = loss([m0, m1])
    # Level-1 masks of the patches level 0 did not mask (example 0's patches 1 and 2) are never read ...
    other = m1.copy()
    other[[1, 2]] = ~other[[1, 2]]
    other[[1, 2], 0] = True
    np.testing.assert_allclose(loss([m0, other])[0], base, rtol=1e-6)
    # ... while those of a masked patch are.
    other = m1.copy()
    other[0, 1:] = ~other[0, 1:]
    assert abs(float(loss([m0, other])[0]) - float(base)) > 1e-4
    np.testing.assert_allclose(metrics["mask_ratio_0"], m0.mean(), rtol=1e-6)
    # A masked patch's own pixels are never read by its level (the mask token stands in).
    gen = fractal.level_module(model, 0)
    patches = mar_lib.patchify(x, 2)
    conds = [jax.random.normal(jax.random.key(1), (4, 16))] * 5
    a = gen.apply({"params": params["levels_0"]}, patches, jnp.asarray(m0), conds)
    b = gen.apply({"params": params["levels_0"]}, jnp.where(jnp.asarray(m0)[..., None], 5.0, patches), jnp.asarray(m0),
                  conds)
    chex.assert_trees_all_close(a, b, atol=1e-6)


@pytest.mark.slow  # compiles the step twice (1 device, 2x4 mesh), ~1 min
def test_sharded_loss_and_grads_on_2x4_mesh_equal_single_device():
    model = tiny()
    params = random_params(model)
    batch = image_batch()
    rng = jax.random.key(7)
    want_loss, want_grads = _grad_fn(model)(params, batch, rng)
    assert float(jnp.abs(want_grads["levels_1"]["blocks_0"]["qkv"]["kernel"]).max()) > 0
    assert float(jnp.abs(want_grads["levels_1"]["guiding_pixel_loss"]["cond_proj"]["kernel"]).max()) > 0
    mesh = parallel.create_mesh((2, 4, 1))
    rules = parallel.DEFAULT_RULES
    step = jax.value_and_grad(lambda p, b, r: fractal.loss_fn(model, p, b, r)[0])
    with parallel.mesh_context(mesh, rules):
        shardings = parallel.logical_to_sharding(fractal.abstract_params(model), mesh, rules)
        sharded = jax.device_put(params, shardings)
        sbatch = parallel.shard_batch(batch, mesh)
        assert len(sbatch["images"].sharding.device_set) == 8
        loss, grads = jax.jit(step, out_shardings=(None, shardings))(sharded, sbatch, rng)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- the sampler

OPTS = fractal.SamplerOptions(num_iter_list=(3, 4), cfg_scale=3.0, temperature=1.0)


def test_sampler_compiles_once_and_returns_images():
    model = tiny()
    fn = jax.jit(chex.assert_max_traces(fractal._sample_body, n=1), static_argnames=("model", "opts"))
    a = fn(model, random_params(model), jnp.array([0, 1, C]), jax.random.key(0), OPTS)
    b = fn(model, random_params(model, 1), jnp.array([2, 4, 1]), jax.random.key(1), OPTS)
    chex.assert_shape(a, (3, 4, 4, 3))
    assert a.dtype == jnp.float32 and float(jnp.abs(a).max()) <= 1.0 and not np.allclose(a, b)
    # Intensities: every value is k / 255 of an integer k (mapped to [-1, 1]).
    k = (np.asarray(a) + 1.0) / 2.0 * 255.0
    np.testing.assert_allclose(k, np.round(k), atol=2e-3)


@pytest.mark.slow  # compiles two samplers, ~40 s
def test_guidance_off_in_its_interval_equals_no_guidance():
    model = tiny()
    params = random_params(model)
    labels, key = jnp.array([0, 3]), jax.random.key(5)
    plain = fractal.sample(model, params, labels, key, dataclasses.replace(OPTS, cfg_scale=1.0))
    off = fractal.sample(model, params, labels, key, dataclasses.replace(OPTS, cfg_interval=(0.0, 0.0)))
    np.testing.assert_allclose(off, plain, atol=1e-6)


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("sizes,match", [
    ((64, 5, 1), "64 is not split by 5 into patches"),
    ((64, 4, 2), "must end at 1"),
    ((64, 64, 1), "is not split by 64"),
])
def test_a_level_list_that_does_not_divide_names_the_fix(sizes, match):
    with pytest.raises(ValueError, match=match) as e:
        fractal.check_model(fractal.fractal_variant("MAR-64", img_size_list=sizes))
    assert "\n" not in str(e.value)


def test_build_from_config_section_and_its_refusals():
    cfg = dict(arch="fractal", variant="MAR-64", dtype="float32")
    model = fractal.build(cfg, num_classes=10, image_size=(64, 64), channels=1)
    assert model.num_classes == 10 and model.channels == 1 and model.img_size_list == (64, 4, 1)
    with pytest.raises(ValueError, match=r"start the level list at the image size \(e.g. \(32, 4, 1\)"):
        fractal.build(cfg, num_classes=10, image_size=(32, 32), channels=1)
    with pytest.raises(ValueError, match="unknown FractalMAR config keys"):
        fractal.build({**cfg, "depth": 3}, num_classes=10, image_size=(64, 64), channels=1)
    with pytest.raises(ValueError, match="pixel_mean has 3 entries for 1 channels"):
        fractal.build({**cfg, "pixel_mean": fractal.IMAGENET_MEAN}, num_classes=10, image_size=64, channels=1)
    with pytest.raises(ValueError, match="reads batch\\['images'\\]"):
        fractal.loss_fn(model, None, {"tokens": jnp.zeros((2, 4))}, jax.random.key(0))


def test_bad_sampler_options_and_labels():
    with pytest.raises(ValueError, match="top_k=0 and top_p=1.0"):
        fractal.SamplerOptions(top_k=5)
    with pytest.raises(ValueError, match="num_iter_list"):
        fractal.SamplerOptions(num_iter_list=(64, 0))
    with pytest.raises(ValueError, match="must be positive"):
        fractal.SamplerOptions(temperature=0.0)
    with pytest.raises(ValueError, match="not an option of the 'fractal' generator"):
        fractal.sampler_options({"num_iter": 64})
    model = tiny()
    with pytest.raises(ValueError, match="class ids must lie in"):
        fractal.sample(model, random_params(model), np.array([0, C + 1]), jax.random.key(0), OPTS)


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow  # trains, samples and judges a tiny quickstart:fractal, ~2 min on the shared machine
def test_quickstart_fractal_end_to_end_without_a_tokenizer(tmp_path):
    from vqgen import config_lib
    from vqgen.train import run as run_lib

    c = config_lib.load_config("quickstart", "fractal")
    c.unlock()
    g = c.generator
    g.embed_dim_list, g.num_blocks_list, g.num_heads_list = (16, 8, 8), (1, 1, 1), (2, 2, 2)
    gt = c.generator_train
    gt.num_steps, gt.batch_size, gt.save_every, gt.log_every, gt.warmup_steps = 4, 8, 2, 1, 1
    c.data.eval_examples = 16
    c.sample.per_class, c.sample.batch_size, c.sample.num_iter_list = 1, 10, (2, 2)
    c.lock()
    assert "tokenizer" not in c
    assert run_lib.run(c, str(tmp_path), "all") == 0
    with np.load(os.path.join(tmp_path, "samples", "samples.npz")) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (10, 32, 32, 1)
    np.testing.assert_array_equal(labels, np.arange(10))
    report = json.loads(open(os.path.join(tmp_path, "report.json")).read())
    assert 0.0 <= report["samples"]["judge_accuracy"] <= 1.0
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "tokenizer"))
