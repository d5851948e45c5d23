"""Tests of Open-MAGVIT2's factorised GPT: cached decoding against the teacher-forced pass for both
heads, the compile-once sampler, greedy guided sampling against a teacher-forced reference, the
loss, the options, the sizes and the sharded step."""
import functools
import json
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqgen import parallel
from vqgen.generators import gpt_factorized as fg
from vqgen.generators.gpt_factorized import FactorizedGPT, SamplerOptions
from vqgen.quantizers.lfq import join_factorized_ids, split_factorized_ids

TINY = dict(num_classes=5, grid=(3, 4), factorized_bits=(3, 4), width=32, depth=2, factorized_depth=2, num_heads=4)
FIXTURE = Path(__file__).parent / "fixtures" / "open_magvit2_ar" / "open_magvit2_ar_tiny.npz"


def tiny(**kw) -> FactorizedGPT:
    return FactorizedGPT(**{**TINY, **kw})


@functools.lru_cache(maxsize=None)
def random_params(model: FactorizedGPT, seed: int = 0):
    """Random params of the right shapes made with NumPy: every leaf random (the real init has zero
    heads, which would make every logit 0), norm scales around 1."""
    rs = np.random.RandomState(seed)
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(fg.abstract_params(model)))
    leaves = []
    for path, x in flat[0]:
        noise = rs.standard_normal(x.shape).astype(np.float32)
        leaves.append(jnp.asarray(1.0 + 0.2 * noise if str(path[-1].key) == "scale" else 0.3 * noise, x.dtype))
    return jax.tree.unflatten(flat[1], leaves)


@functools.lru_cache(maxsize=None)
def full_forward(model: FactorizedGPT):
    return jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))


@pytest.mark.parametrize("kw", [{}, dict(num_kv_heads=2, bit_order="msb", factorized_bits=(5, 2))])
def test_cached_decoding_equals_teacher_forced(kw):
    model = tiny(**kw)
    params = random_params(model)
    labels = jnp.array([0, 3, 5], jnp.int32)  # 5: the null class
    tokens = jax.random.randint(jax.random.key(1), (3, model.block_size), 0, model.vocab_size)
    full_pre, full_post = full_forward(model)(params, tokens, labels)
    v0, v1 = model.sub_vocab_sizes
    chex.assert_shape((full_pre, full_post), ((3, model.block_size, v0), (3, model.block_size, v1)))
    assert float(jnp.std(full_pre)) > 0.1 and float(jnp.std(full_post)) > 0.1

    @jax.jit
    def cached(p, tokens, labels):
        pre, _ = split_factorized_ids(tokens, model.num_bits, model.factorized_bits, model.bit_order)
        cache = fg.init_cache(model, tokens.shape[0])
        h, cache = model.apply({"params": p}, labels, cache, method=FactorizedGPT.prefill)  # [B, 1, D]

        def heads(h, t):
            fcache = fg.init_factorized_cache(model, tokens.shape[0])
            a, fcache = model.apply({"params": p}, h, fcache, method=FactorizedGPT.head_pre)
            b, _ = model.apply({"params": p}, pre[:, t][:, None], fcache, method=FactorizedGPT.head_post)
            return a, b

        def body(t, carry):
            out_a, out_b, cache = carry
            h, cache = model.apply({"params": p}, tokens[:, t - 1][:, None], cache, t, method=FactorizedGPT.step)
            a, b = heads(h, t)
            return out_a.at[:, t].set(a), out_b.at[:, t].set(b), cache

        a, b = heads(h, 0)
        out_a = jnp.zeros_like(full_pre).at[:, 0].set(a)
        out_b = jnp.zeros_like(full_post).at[:, 0].set(b)
        return jax.lax.fori_loop(1, model.block_size, body, (out_a, out_b, cache))[:2]

    got_pre, got_post = cached(params, tokens, labels)
    chex.assert_trees_all_close(got_pre, full_pre, atol=1e-4, rtol=1e-4)
    chex.assert_trees_all_close(got_post, full_post, atol=1e-4, rtol=1e-4)


def test_sampler_compiles_once_and_runs_one_lax_loop():
    model = tiny()
    params = random_params(model)
    opts = SamplerOptions(temperature=1.2, top_k=5, post_top_p=0.9, cfg_scale=1.5, post_cfg_scale=2.0)
    traced = chex.assert_max_traces(fg.sample_tokens, n=1)
    jitted = jax.jit(traced, static_argnames=("model", "opts"))
    a = jitted(model, params, jnp.array([0, 1]), jax.random.key(0), opts)
    b = jitted(model, params, jnp.array([2, 4]), jax.random.key(1), opts)
    chex.assert_shape(a, (2, model.block_size))
    assert a.dtype == jnp.int32 and not np.array_equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < model.vocab_size
    # One loop over the tokens after the first (a fori_loop with static bounds is a scan): no per-token
    # Python unrolling.
    jaxpr = str(jax.make_jaxpr(functools.partial(fg.sample_tokens, model, opts=opts))(
        params, jnp.array([0, 1]), jax.random.key(0)))
    assert jaxpr.count("scan[") == 1 and f"length={model.block_size - 1}" in jaxpr


def _greedy_reference(model, params, labels, scales):
    """Greedy guided decoding by teacher-forced passes: sub-id 0 of token t from the logits at t,
    then sub-id 1 from the logits at t once sub-id 0 is in place (they read nothing else of t)."""
    fwd = full_forward(model)
    b, n = len(labels), model.block_size
    pre = np.zeros((b, n), np.int32)
    post = np.zeros((b, n), np.int32)
    null = np.full((b,), model.num_classes, np.int32)

    def guided(i, t):
        tokens = join_factorized_ids((jnp.asarray(pre), jnp.asarray(post)), model.num_bits, model.factorized_bits,
                                     model.bit_order)
        c = np.asarray(fwd(params, tokens, jnp.asarray(labels))[i], np.float64)[:, t]
        u = np.asarray(fwd(params, tokens, jnp.asarray(null))[i], np.float64)[:, t]
        return u + scales[i] * (c - u)

    for t in range(n):
        pre[:, t] = np.argmax(guided(0, t), -1)
        post[:, t] = np.argmax(guided(1, t), -1)
    return np.asarray(join_factorized_ids((pre, post), model.num_bits, model.factorized_bits, model.bit_order))


def test_greedy_guided_sampling_equals_teacher_forced_reference():
    model = tiny()
    params = random_params(model)
    labels = np.array([1, 4], np.int32)
    for scales in ((1.0, 1.0), (2.0, 1.5), (1.0, 3.0)):
        want = _greedy_reference(model, params, labels, scales)
        opts = SamplerOptions(top_k=1, cfg_scale=scales[0], post_cfg_scale=scales[1])
        got = fg.sample(model, params, labels, jax.random.key(0), opts)
        np.testing.assert_array_equal(np.asarray(got), want)
    # Guidance changes the greedy draws, so the comparison above tests it.
    assert not np.array_equal(_greedy_reference(model, params, labels, (1.0, 1.0)),
                              _greedy_reference(model, params, labels, (2.0, 1.5)))
    # top_p=0 is greedy too, whatever the key.
    got = fg.sample(model, params, labels, jax.random.key(7), SamplerOptions(top_p=0.0, post_top_k=1))
    np.testing.assert_array_equal(np.asarray(got), _greedy_reference(model, params, labels, (1.0, 1.0)))


def test_loss_fn_sums_both_heads():
    model = tiny(token_dropout_prob=0.0, resid_dropout_prob=0.0, ffn_dropout_prob=0.0)
    params = random_params(model)
    tokens = jax.random.randint(jax.random.key(3), (2, model.block_size), 0, model.vocab_size)
    batch = {"tokens": tokens, "label": jnp.array([1, 2])}
    loss, metrics = jax.jit(functools.partial(fg.loss_fn, model, train=False))(params, batch, jax.random.key(0))
    lp, lq = full_forward(model)(params, tokens, batch["label"])
    pre, post = split_factorized_ids(tokens, 7, (3, 4), "lsb")
    want_pre = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(lp)), np.asarray(pre)[..., None], -1))
    want_post = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(lq)), np.asarray(post)[..., None], -1))
    np.testing.assert_allclose(metrics["loss_pre"], want_pre, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_post"], want_post, rtol=1e-5)
    np.testing.assert_allclose(loss, want_pre + want_post, rtol=1e-5)
    both = (np.argmax(lp, -1) == np.asarray(pre)) & (np.argmax(lq, -1) == np.asarray(post))
    np.testing.assert_allclose(metrics["accuracy"], both.mean(), rtol=1e-6)
    assert all(v.dtype == jnp.float32 for v in metrics.values())
    # Zero heads (the official initialisation) predict uniform sub-ids: log(2^3) + log(2^4).
    zero = dict(params, head_0={"kernel": jnp.zeros((32, 8))}, head_1={"kernel": jnp.zeros((32, 16))})
    loss0, _ = fg.loss_fn(model, zero, batch, jax.random.key(0), train=False)
    assert float(loss0) == pytest.approx(np.log(8) + np.log(16), rel=1e-6)
    # Training mode: class, token, residual and FFN dropout draw from the key.
    model_d = tiny()
    a, _ = fg.loss_fn(model_d, params, batch, jax.random.key(0))
    b, _ = fg.loss_fn(model_d, params, batch, jax.random.key(1))
    assert float(a) != float(b)


def test_official_init_and_dtypes():
    model = tiny(dtype=jnp.bfloat16)
    params = jax.jit(lambda k: nn.meta.unbox(fg.init_params(model, k)))(jax.random.key(0, impl="rbg"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert not np.any(np.asarray(params["head_0"]["kernel"])) and not np.any(np.asarray(params["head_1"]["kernel"]))
    assert params["class_emb"]["embedding_table"].shape == (6, 32)  # 5 classes and the null row
    assert params["pre_emb"]["embedding"].shape == (8, 32) and params["post_emb"]["embedding"].shape == (16, 32)
    assert sorted(k for k in params if "blocks" in k) == [
        "factorized_blocks_0", "factorized_blocks_1", "spatial_blocks_0", "spatial_blocks_1"]
    tokens, labels = jnp.zeros((2, 12), jnp.int32), jnp.array([0, 1])
    (lp, lq), inter = jax.jit(lambda p: model.apply({"params": p}, tokens, labels, capture_intermediates=True))(params)
    assert lp.dtype == jnp.float32 and lq.dtype == jnp.float32
    inter = inter["intermediates"]
    assert inter["spatial_blocks_0"]["__call__"][0][0].dtype == jnp.bfloat16
    assert inter["factorized_blocks_1"]["feed_forward"]["w1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["head_1"]["__call__"][0].dtype == jnp.bfloat16
    assert fg.init_cache(model, 2)[0]["k"].dtype == jnp.bfloat16


@pytest.mark.parametrize("name", ["B", "L", "XL"])
def test_variant_parameter_counts_equal_official(name):
    """The official module's counts at the released sizes, computed by tools/make_open_magvit2_ar_fixture.py."""
    with np.load(FIXTURE) as f:
        official = json.loads(str(f["manifest"]))["released"][name]["num_params"]
    model = fg.gpt_variant(name, num_classes=1000, grid=(16, 16), factorized_bits=(6, 12))
    assert fg.count_params(model) == official


def test_sharded_train_step_equals_single_device():
    model = tiny(width=64, num_heads=4)
    params = random_params(model)
    batch = {"tokens": jax.random.randint(jax.random.key(1), (8, model.block_size), 0, model.vocab_size),
             "label": jnp.arange(8, dtype=jnp.int32) % model.num_classes}
    tx = optax.sgd(0.1, momentum=0.9)

    def step(params, opt_state, batch, rng):
        (loss, _), grads = jax.value_and_grad(functools.partial(fg.loss_fn, model), has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    rng = jax.random.key(2)  # dropout on: masks must not depend on the sharding
    ref_params, _, ref_loss, ref_grads = jax.jit(step)(params, tx.init(params), batch, rng)
    mesh = parallel.create_mesh((2, 4, 1))
    rules = parallel.DEFAULT_RULES
    with parallel.mesh_context(mesh, rules):
        p_shard = parallel.logical_to_sharding(fg.abstract_params(model), mesh, rules)
        assert p_shard["post_emb"]["embedding"].spec[1] == "fsdp"  # embed over fsdp
        sharded = jax.device_put(params, p_shard)
        sharded_batch = parallel.shard_batch(batch, mesh)
        new_params, _, loss, grads = jax.jit(step, out_shardings=(p_shard, None, None, p_shard))(
            sharded, tx.init(sharded), sharded_batch, rng)
    assert new_params["factorized_blocks_0"]["attention"]["wq"]["kernel"].sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # Sharded reductions sum in another order: float32 rounding of gradients up to ~1.
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(new_params, ref_params, atol=1e-5, rtol=1e-5)


def test_sampler_options():
    opts = fg.sampler_options({"temperature": 1.1, "post_temperature": 1.0, "cfg_scale": 1.75,
                               "post_cfg_scale": 1.85, "per_class": 50, "batch_size": 8, "use_ema": False})
    assert opts.sub(0) == (1.1, 0, 1.0, 1.75) and opts.sub(1) == (1.0, 0, 1.0, 1.85) and opts.uses_cfg
    same = SamplerOptions(temperature=0.9, top_k=7, top_p=0.8, cfg_scale=2.0)
    assert same.sub(1) == same.sub(0)  # post_* default to the first sub-id's options
    assert SamplerOptions(post_cfg_scale=3.0).uses_cfg and not SamplerOptions().uses_cfg
    hash(opts)
    with pytest.raises(ValueError, match="sample.num_steps is not an option of the 'gpt_factorized' generator"):
        fg.sampler_options({"num_steps": 8})
    with pytest.raises(ValueError, match="top_p=1.5 is outside"):
        SamplerOptions(post_top_p=1.5)
    with pytest.raises(ValueError, match="top_k=-1 is negative"):
        SamplerOptions(post_top_k=-1)


def test_bad_inputs():
    model = tiny()
    params = random_params(model)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\) \(or 5 for the unconditional null class\)"):
        fg.sample(model, params, np.array([0, 9]), jax.random.key(0))
    with pytest.raises(ValueError, match="labels must be a 1-D array"):
        fg.sample(model, params, np.zeros((2, 1), np.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="need the null class"):
        fg.sample(tiny(class_dropout_prob=0.0), params, np.array([0]), jax.random.key(0),
                  SamplerOptions(post_cfg_scale=2.0))
    with pytest.raises(ValueError, match="tokens have length 13 > block_size 12"):
        model.apply({"params": params}, jnp.zeros((1, 13), jnp.int32), jnp.zeros((1,), jnp.int32))
    cfg = dict(width=32, depth=1, factorized_depth=1, num_heads=4, factorized_bits=(6, 12))
    with pytest.raises(ValueError, match=r"cut 18-bit ids \(262144 codes\) but the tokenizer has 1024 codes"):
        fg.build(cfg, vocab_size=1024, num_classes=10, grid=(4, 4))
    with pytest.raises(ValueError, match="unknown gpt_factorized config keys \\['depht'\\]"):
        fg.build({"depht": 2}, vocab_size=2**18, num_classes=10, grid=(4, 4))
    with pytest.raises(ValueError, match="must be two positive bit counts"):
        fg.abstract_params(tiny(factorized_bits=(3, 2, 2)))
    with pytest.raises(ValueError, match="bit_order='big' is unknown"):
        fg.abstract_params(tiny(bit_order="big"))


@pytest.mark.slow  # a conv tokenizer and the generator trained end to end (~1 min of CPU, as quickstart:lfq)
def test_trains_and_samples_over_lfq_tokens(tmp_path):
    """The factorised GPT as a zoo variant: the tiny quickstart:lfq tokenizer (4-bit LFQ in
    Open-MAGVIT2's bit order, 16x16 tokens), then the generator over 2+2-bit sub-ids, then samples."""
    import ml_collections
    import tiny_config

    import vqgen
    from vqgen import config_lib
    from vqgen.train import builders
    from vqgen.train import run as run_lib

    config = tiny_config.get_config("lfq")
    with config.unlocked():
        config.generator = ml_collections.ConfigDict(dict(
            arch="gpt_factorized", width=32, depth=1, factorized_depth=1, num_heads=2, num_kv_heads=2,
            factorized_bits=(2, 2), bit_order=config.tokenizer.quantizer.bit_order, class_dropout_prob=0.1,
            token_dropout_prob=0.0, resid_dropout_prob=0.0, ffn_dropout_prob=0.0, dtype="float32"))
        config.sample = config_lib.sample_config("gpt_factorized", per_class=2, batch_size=20, cfg_scale=1.5,
                                                 post_cfg_scale=2.0, post_temperature=0.9)
    assert builders.token_spec(config).vocab_size == 16
    for mode in ("train_tokenizer", "train_generator", "sample"):
        assert run_lib.run(config, str(tmp_path), mode) == 0
    report = json.load(open(tmp_path / "report.json"))["generator"]
    model = fg.build(dict(config.generator), vocab_size=16, num_classes=10, grid=(16, 16))
    assert report["steps"] == 4 and report["params"] == fg.count_params(model)
    gen = vqgen.load_generator(str(tmp_path))
    tokens = np.asarray(gen.sample_tokens([3, 7], jax.random.key(0), post_top_k=1))
    assert tokens.shape == (2, 16, 16) and tokens.min() >= 0 and tokens.max() < 16
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        assert f["images"].shape == (20, 32, 32, 1) and f["images"].dtype == np.uint8
        assert sorted(set(f["labels"].tolist())) == list(range(10))
