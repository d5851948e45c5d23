"""Tests of MAR (masked autoregressive generation over continuous tokens): patches, shapes, the
paper's parameter counts, the static-shape encoder against MAR's token dropping, masking and
ordering invariants, the loss, the compiled sampler and its schedule, a 2x4 mesh, bad input."""
import dataclasses
import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from vqgen import parallel
from vqgen.generators import diffusion_loss as dl
from vqgen.generators import mar

GRID, D, C = (4, 4), 4, 5  # 16 tokens of 4 channels, 5 classes
L = GRID[0] * GRID[1]
TINY = dict(num_classes=C, grid=GRID, token_dim=D, encoder_width=32, encoder_depth=1, encoder_heads=4,
            decoder_width=24, decoder_depth=1, decoder_heads=2, buffer_size=2, diffloss_depth=1, diffloss_width=16,
            diffusion_batch_mul=2, attn_dropout=0.0, proj_dropout=0.0)  # dropout compiles slowly: on where tested


def tiny(**kw) -> mar.MAR:
    return mar.MAR(**{**TINY, **kw})


@functools.lru_cache(maxsize=None)
def random_params(model: mar.MAR, seed: int = 0):
    """Params of the right shapes drawn with NumPy (MAR's init zeroes the head's output layers)."""
    rs = np.random.RandomState(seed)
    flat, tree = jax.tree_util.tree_flatten(nn.meta.unbox(mar.abstract_params(model)))
    return jax.tree.unflatten(tree, [jnp.asarray(0.2 * rs.standard_normal(x.shape), x.dtype) for x in flat])


@functools.lru_cache(maxsize=None)
def forward(model: mar.MAR, keep: int | None = None):
    return jax.jit(lambda p, x, m, y: model.apply({"params": p}, x, m, y, keep=keep))


def tokens(b: int = 3, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (b, L, D))


def latent_batch() -> dict:
    """Eight [4, 4, D] latent maps with labels, "no label" included."""
    return {"latents": jax.random.normal(jax.random.key(0), (8, 4, 4, D)), "label": jnp.arange(8) % (C + 1)}


# ----------------------------------------------------------------------------- patches, shapes


def test_patchify_matches_mar_layout_and_round_trips():
    lat = jax.random.normal(jax.random.key(0), (2, 8, 6, 3))  # [B, H, W, C]
    tok = mar.patchify(lat, 2)
    chex.assert_shape(tok, (2, 12, 12))
    # MAR: NCHW -> [n, c, h, p, w, q] -> [n, h, w, c, p, q] -> [n, h w, c p q].
    nchw = np.asarray(lat).transpose(0, 3, 1, 2)
    want = nchw.reshape(2, 3, 4, 2, 3, 2).transpose(0, 2, 4, 1, 3, 5).reshape(2, 12, 12)
    np.testing.assert_array_equal(tok, want)
    np.testing.assert_array_equal(mar.unpatchify(tok, (4, 3), 2), lat)
    with pytest.raises(ValueError, match="does not split into 4x4 patches"):
        mar.patchify(lat, 4)


def test_shapes_params_and_dtypes():
    model = tiny()
    abstract = nn.meta.unbox(mar.abstract_params(model))
    shapes = jax.tree.map(lambda x: x.shape, abstract)
    assert shapes["encoder_pos_embed_learned"] == (2 + L, 32)
    assert shapes["decoder_pos_embed_learned"] == (2 + L, 24)
    assert shapes["diffusion_pos_embed_learned"] == (L, 24)
    assert shapes["class_emb"] == (C, 32) and shapes["fake_latent"] == (32,) and shapes["mask_token"] == (24,)
    assert shapes["encoder_blocks_0"]["qkv"]["kernel"] == (32, 3, 4, 8)
    assert shapes["decoder_blocks_0"]["proj"]["kernel"] == (2, 12, 24)
    assert shapes["diffloss"]["cond_embed"]["kernel"] == (24, 16)
    assert shapes["diffloss"]["final_layer"]["linear"]["kernel"] == (16, 2 * D)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
    z = forward(model)(random_params(model), tokens(), jnp.ones((3, L), bool), jnp.array([0, 1, C]))
    chex.assert_shape(z, (3, L, 24))
    # bfloat16 compute, float32 storage.
    bf = tiny(dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mar.abstract_params(bf)))
    z = forward(bf)(random_params(bf), tokens(), jnp.ones((3, L), bool), jnp.array([0, 1, C]))
    assert z.dtype == jnp.bfloat16 and bool(jnp.isfinite(z.astype(jnp.float32)).all())


@pytest.mark.parametrize("name", ["B", "L", "H"])
def test_variant_parameter_counts_match_paper(name):
    """MAR-B/L/H over 16x16 tokens of 16 channels with 1000 classes, the head included."""
    n = mar.count_params(mar.mar_variant(name))
    want = {"B": 207_924_768, "L": 478_326_304, "H": 942_403_104}[name]  # the module's own count
    assert n == want, (name, n)
    assert abs(n - mar.PAPER_PARAMS[name]) / mar.PAPER_PARAMS[name] < 0.02


# ----------------------------------------------------------------- encoder, masking, ordering


def _mar_dropping_reference(model, params, x, mask, labels):
    """MAR's forward written as MAR does it: drop the masked tokens from the encoder sequence
    (every row has the same number), run the blocks on what is left, scatter back."""

    def fn(m, x, mask, labels):
        b = x.shape[0]
        buf = m.buffer_size
        h = m.z_proj(x)
        cls = jnp.broadcast_to(m.class_embedding(labels)[:, None], (b, buf, h.shape[-1]))
        h = m.z_proj_ln(jnp.concatenate([cls, h], 1) + m.encoder_pos_embed_learned[None])
        keep = np.concatenate([np.ones((b, buf), bool), ~np.asarray(mask)], 1)
        h = jnp.asarray(np.asarray(h)[keep].reshape(b, -1, h.shape[-1]))  # [B, buf + visible, De]
        for blk in m.encoder_blocks:
            h = blk(h)
        h = m.decoder_embed(m.encoder_norm(h))
        full = np.broadcast_to(np.asarray(m.mask_token), (b, buf + x.shape[1], h.shape[-1])).copy()
        full[keep] = np.asarray(h).reshape(-1, h.shape[-1])
        h = jnp.asarray(full) + m.decoder_pos_embed_learned[None]
        for blk in m.decoder_blocks:
            h = blk(h)
        return m.decoder_norm(h)[:, buf:] + m.diffusion_pos_embed_learned[None]

    return model.apply({"params": params}, x, mask, labels, method=fn)


def test_static_encoder_equals_mar_token_dropping():
    """The gathered encoder (``keep = max_visible`` slots, unused slots masked as keys) and the
    sampler's all-slot encoder both equal MAR's dropping of the masked tokens; masked tokens'
    values are never read."""
    model = tiny()
    params = random_params(model)
    assert model.max_visible == L - math.ceil(L * 0.7) == 4
    x = tokens()
    mask, _, n = mar.random_mask(model, jax.random.key(3), 3)
    # MAR masks the same number per batch: give every row the first row's count.
    orders = mar.random_orders(jax.random.key(4), 3, L)
    mask = jnp.argsort(orders, -1) < int(n[0])
    labels = jnp.array([0, 3, C])
    want = _mar_dropping_reference(model, params, x, mask, labels)
    got = forward(model, model.max_visible)(params, x, mask, labels)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forward(model)(params, x, mask, labels), want, rtol=1e-5, atol=1e-5)
    noisy = jnp.where(mask[..., None], 100.0, x)
    np.testing.assert_allclose(forward(model, model.max_visible)(params, noisy, mask, labels), got, atol=1e-6)


def test_random_mask_follows_the_order_and_truncated_normal():
    model = tiny(grid=(16, 16))
    b = 4096
    mask, orders, n = mar.random_mask(model, jax.random.key(0), b)
    mask, orders, n = np.asarray(mask), np.asarray(orders), np.asarray(n)
    np.testing.assert_array_equal(mask.sum(1), n)
    assert n.min() >= math.ceil(256 * 0.7) and n.max() <= 256
    assert np.all(np.sort(orders, 1) == np.arange(256))  # permutations
    rows = np.arange(8)[:, None]
    assert mask[rows, orders[:8, :150]].all()  # the first n of each order are masked ...
    for i in range(8):
        assert not mask[i, orders[i, n[i]:]].any()  # ... and nothing else
    # ratios ~ N(1, 0.25) truncated to [0.7, 1] (MAR's scipy truncnorm), n = ceil(L * ratio).
    ratio = np.asarray(mar.mask_ratios(jax.random.key(1), b, 0.7))
    ref = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert ratio.min() >= 0.7 - 1e-6 and ratio.max() <= 1.0
    assert abs(ratio.mean() - ref.mean()) < 4 * ref.std() / math.sqrt(b)
    assert scipy.stats.kstest(ratio, ref.cdf).pvalue > 1e-3
    # different positions across examples: the order is random per example
    assert len({tuple(o[:5]) for o in orders[:50]}) == 50


def test_block_dropout_only_in_training():
    """MAR's blocks drop attention probabilities and projections (0.1) with train=True only, and
    a hidden key changes nothing whatever its value."""
    blk = mar.Block(16, 2, attn_dropout=0.1, proj_dropout=0.1)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    keys = jnp.asarray([True, True, False, True, True])[None].repeat(2, 0)

    @jax.jit
    def run(x):
        variables = blk.init(jax.random.key(1), x)
        train = blk.apply(variables, x, keys, train=True, rngs={"dropout": jax.random.key(2)})
        return blk.apply(variables, x, keys), train, blk.apply(variables, x.at[:, 2].set(50.0), keys)

    a, b, hidden = run(x)
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_allclose(hidden[:, [0, 1, 3, 4]], a[:, [0, 1, 3, 4]], atol=1e-5)


def test_labels_drop_to_the_fake_latent():
    model = tiny(label_drop_prob=0.25)
    params = random_params(model)
    labels = jnp.zeros((20000,), jnp.int32)
    dropped = np.asarray(mar.drop_labels(model, labels, jax.random.key(0)))
    assert set(np.unique(dropped)) == {0, C} and abs((dropped == C).mean() - 0.25) < 0.02
    emb = model.apply({"params": params}, jnp.array([1, C]), method=mar.MAR.class_embedding)
    np.testing.assert_array_equal(emb[0], params["class_emb"][1])
    np.testing.assert_array_equal(emb[1], params["fake_latent"])


# ---------------------------------------------------------------------------------- the loss


def test_loss_is_the_diffusion_loss_of_the_masked_tokens():
    model = tiny()
    params = random_params(model)
    batch = latent_batch()
    rng = jax.random.key(7)
    loss, metrics = jax.jit(lambda p, b, r: mar.loss_fn(model, p, b, r))(params, batch, rng)
    # By hand, with the same keys: mask, label drop, transformer, diffusion loss of the masked rows.
    mask_key, label_key, _, diff_key = jax.random.split(rng, 4)
    mask, _, n = mar.random_mask(model, mask_key, 8)
    labels = mar.drop_labels(model, batch["label"], label_key)
    tok = mar.patchify(batch["latents"])
    z = forward(model, model.max_visible)(params, tok, mask, labels)
    want, _ = jax.jit(dl.diffusion_loss, static_argnames=("head", "batch_mul"))(
        model.head, params["diffloss"], tok.reshape(8 * L, D), z.reshape(8 * L, -1), diff_key,
        mask.reshape(-1).astype(jnp.float32), batch_mul=2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["mask_ratio"], float(n.mean()) / L, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["diffusion_mse"] + metrics["diffusion_vb"], rtol=1e-5)
    # A patchified batch is read as it is.
    np.testing.assert_array_equal(mar.batch_tokens(model, {**batch, "latents": tok}), mar.batch_tokens(model, batch))


def test_sharded_train_step_on_2x4_mesh_equals_single_device():
    model = tiny()
    params = random_params(model)
    batch = latent_batch()
    rng = jax.random.key(7)  # orders, ratios, label drop, timesteps, noise: none may depend on the sharding
    step = jax.value_and_grad(lambda p, b, r: mar.loss_fn(model, p, b, r)[0])
    want_loss, want_grads = jax.jit(step)(params, batch, rng)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(want_grads))
    for name in ("encoder_blocks_0", "decoder_blocks_0"):  # the loss reaches both transformers and the head
        assert float(jnp.abs(want_grads[name]["qkv"]["kernel"]).max()) > 0
    assert float(jnp.abs(want_grads["diffloss"]["input_proj"]["kernel"]).max()) > 0
    mesh = parallel.create_mesh((2, 4, 1))
    rules = parallel.DEFAULT_RULES
    with parallel.mesh_context(mesh, rules):
        shardings = parallel.logical_to_sharding(mar.abstract_params(model), mesh, rules)
        assert shardings["encoder_blocks_0"]["fc1"]["kernel"].spec[0] == "fsdp"
        sharded = jax.device_put(params, shardings)
        sbatch = parallel.shard_batch(batch, mesh)
        assert len(sbatch["latents"].sharding.device_set) == 8
        loss, grads = jax.jit(step, out_shardings=(None, shardings))(sharded, sbatch, rng)
    assert grads["encoder_blocks_0"]["fc1"]["kernel"].sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------- the sampler

GUIDED = mar.SamplerOptions(num_iter=5, diffusion_steps=4, cfg_scale=2.0)  # MAR's linear guidance ramp


def test_iteration_counts_follow_mar_cosine_schedule():
    masked, guide = mar.iteration_counts(256, 64)
    assert masked[0] == 256 and masked[-1] == 0 and len(masked) == 65 and len(guide) == 64
    assert np.all(np.diff(masked) < 0)  # at least one token per iteration
    for t in range(63):
        want = max(1, min(masked[t] - 1, math.floor(256 * math.cos(math.pi / 2 * (t + 1) / 64))))
        assert masked[t + 1] == guide[t] == want
    assert guide[-1] == 1  # MAR's last-iteration count for the linear guidance ramp
    assert int(np.max(masked[:-1] - masked[1:])) == 7
    masked, _ = mar.iteration_counts(16, 16)  # as many iterations as tokens: one each
    np.testing.assert_array_equal(masked, np.arange(16, -1, -1))


def test_sampler_compiles_once_and_generates_every_token_once_in_order():
    model = tiny()
    params = random_params(model)
    opts = GUIDED
    fn = jax.jit(chex.assert_max_traces(mar.sample_tokens, n=1), static_argnames=("model", "opts", "return_steps"))
    a, steps_a = fn(model, params, jnp.array([0, 1, C]), jax.random.key(0), opts, True)
    b, _ = fn(model, random_params(model, 1), jnp.array([2, 4, 1]), jax.random.key(1), opts, True)
    chex.assert_shape(a, (3, L, D))
    assert a.dtype == jnp.float32 and np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
    steps_a = np.asarray(steps_a)
    masked, _ = mar.iteration_counts(L, 5)
    assert steps_a.min() == 0 and steps_a.max() == 4  # every token generated, at some iteration
    for t in range(5):
        np.testing.assert_array_equal((steps_a == t).sum(1), masked[t] - masked[t + 1])
    # Tokens are generated along one random order: earlier in the order means a later iteration.
    order_key, _ = jax.random.split(jax.random.key(0))
    orders = np.asarray(mar.random_orders(order_key, 3, L))
    along = np.take_along_axis(steps_a, orders, 1)
    assert np.all(np.diff(along, axis=1) <= 0)
    # The library's jitted sampler: one executable for new labels, keys and params.
    mar.sample(model, params, jnp.array([0, 1, 2]), jax.random.key(3), opts)  # compiles
    before = mar._sample_jit._cache_size()
    out = mar.sample(model, random_params(model, 2), jnp.array([4, C, 0]), jax.random.key(4), opts)
    assert mar._sample_jit._cache_size() == before and np.isfinite(np.asarray(out)).all()


def test_guidance_off_in_its_interval_equals_no_guidance():
    model = tiny()
    params = random_params(model)
    labels, key = jnp.array([0, 3, 1]), jax.random.key(5)
    plain = mar.sample(model, params, labels, key, dataclasses.replace(GUIDED, cfg_scale=1.0))
    off = mar.sample(model, params, labels, key, dataclasses.replace(GUIDED, cfg_interval=(0.0, 0.0)))
    on = mar.sample(model, params, labels, key, GUIDED)
    # Random weights make the chain amplify rounding (values reach 1e4): compare relatively.
    np.testing.assert_allclose(off, plain, rtol=1e-3, atol=1e-3)
    assert float(jnp.max(jnp.abs(on - plain) / (1 + jnp.abs(plain)))) > 1e-2


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_mask_ratio_min_outside_unit_interval_is_one_sentence(value):
    with pytest.raises(ValueError, match=re.escape(f"mask_ratio_min={value} is outside (0, 1]; use a fraction such "
                                                   "as MAR's 0.7.")):
        mar.init_params(tiny(mask_ratio_min=value), jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape(f"mask_ratio_min={value} is outside (0, 1]")):
        mar.build({"mask_ratio_min": value}, num_classes=C, grid=GRID, latent_dim=D)


def test_bad_sampler_options_and_labels():
    with pytest.raises(ValueError, match="diffusion_steps=0 must be a positive number of diffusion steps; use e.g"):
        mar.SamplerOptions(diffusion_steps=0)
    with pytest.raises(ValueError, match="num_iter=0 must be at least 1"):
        mar.SamplerOptions(num_iter=0)
    with pytest.raises(ValueError, match="MAR's tokens are continuous"):
        mar.SamplerOptions(top_k=5)
    with pytest.raises(ValueError, match="sample.choice_temperature is not an option of the 'mar' generator"):
        mar.sampler_options({"choice_temperature": 1.0})
    opts = mar.sampler_options({"num_iter": 4, "cfg_scale": 2.9, "per_class": 3})
    assert opts.num_iter == 4 and opts.cfg_schedule == "linear" and opts.diffusion_steps == 100
    model = tiny()
    with pytest.raises(ValueError, match=re.escape("num_iter=17 must lie in [1, 16]")):
        mar.sample(model, random_params(model), jnp.array([0]), jax.random.key(0), mar.SamplerOptions(num_iter=17))
    with pytest.raises(ValueError, match=re.escape(f"class ids must lie in [0, {C}) (or {C} for no label)")):
        mar.sample(model, random_params(model), jnp.array([C + 1]), jax.random.key(0), mar.SamplerOptions(num_iter=4))


def test_build_from_config_section():
    model = mar.build({"arch": "mar", "variant": "B", "patch_size": 2, "dtype": "bfloat16"}, num_classes=10,
                      grid=(8, 8), latent_dim=16)
    assert model.grid == (4, 4) and model.token_dim == 64 and model.encoder_width == 768
    assert model.diffloss_depth == 6 and model.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"unknown MAR config keys \['depth'\]"):
        mar.build({"depth": 3}, num_classes=10, grid=(8, 8), latent_dim=16)
    assert mar.build({}, num_classes=10, grid=(8, 8), latent_dim=16).noise_schedule == "cosine"
    assert mar.build({"noise_schedule": "linear"}, num_classes=10, grid=(8, 8), latent_dim=16).noise_schedule == "linear"
    with pytest.raises(ValueError, match=re.escape("noise_schedule='sqrt' is unknown; use one of ['cosine', 'linear']")):
        mar.build({"noise_schedule": "sqrt"}, num_classes=10, grid=(8, 8), latent_dim=16)
    with pytest.raises(ValueError, match="patch_size=3 does not divide the tokenizer's latent grid"):
        mar.build({"patch_size": 3}, num_classes=10, grid=(8, 8), latent_dim=16)
    with pytest.raises(ValueError, match="do not make the model's"):
        mar.loss_fn(tiny(), random_params(tiny()), {"latents": jnp.zeros((1, 8, 8, D)), "label": jnp.zeros(1, int)},
                    jax.random.key(0))


def test_noise_schedule_reaches_the_loss_and_the_sampler():
    """The model's noise_schedule is the one its loss noises with and its sampler denoises with."""
    cos, lin = tiny(), tiny(noise_schedule="linear")
    params = random_params(cos)
    batch = {"latents": jax.random.normal(jax.random.key(1), (2, *cos.latent_shape)), "label": jnp.array([0, 1])}
    l_cos = mar.loss_fn(cos, params, batch, jax.random.key(2))[0]
    l_lin = mar.loss_fn(lin, params, batch, jax.random.key(2))[0]
    assert np.isfinite(float(l_lin)) and abs(float(l_cos) - float(l_lin)) > 1e-4
    opts = mar.SamplerOptions(num_iter=2, diffusion_steps=5)
    key, labels = jax.random.key(3), jnp.array([0, 1])
    s_lin = mar.sample(lin, params, labels, key, opts)
    assert s_lin.shape == (2, *lin.latent_shape)
    assert float(jnp.max(jnp.abs(s_lin - mar.sample(cos, params, labels, key, opts)))) > 1e-4
