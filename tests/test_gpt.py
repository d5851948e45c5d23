"""Tests of the LlamaGen GPT: cached decoding, the jitted sampler, CFG, sharded step, sizes."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqgen import parallel
from vqgen.generators import gpt, sampling
from vqgen.generators.gpt import GPT, SamplerConfig

TINY = dict(vocab_size=48, num_classes=5, grid=(3, 4), width=32, depth=2, num_heads=4)


def tiny(**kw) -> GPT:
    return GPT(**{**TINY, **kw})


@functools.lru_cache(maxsize=None)
def random_params(model: GPT, seed: int = 0):
    """Random params of the right shapes, made with NumPy (no compile). The real init has a
    zero output head, which would make every logit 0; here every leaf is random, norm scales
    around 1."""
    rs = np.random.RandomState(seed)
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(gpt.abstract_params(model)))
    leaves = []
    for path, x in flat[0]:
        noise = rs.standard_normal(x.shape).astype(np.float32)
        is_scale = str(path[-1].key) == "scale"
        leaves.append(jnp.asarray(1.0 + 0.2 * noise if is_scale else 0.3 * noise, x.dtype))
    return jax.tree.unflatten(flat[1], leaves)


@functools.lru_cache(maxsize=None)
def full_forward(model: GPT):
    return jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))


def greedy_reference(model, params, labels, cfg_scale_fn=None):
    """Greedy decoding by a Python loop of full forward passes (no cache), optionally with CFG."""
    fwd = full_forward(model)
    b, n = len(labels), model.block_size
    tokens = np.zeros((b, n), np.int32)
    null = np.full((b,), model.num_classes, np.int32)
    for t in range(n):
        logits = np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(labels)), np.float64)[:, t]
        if cfg_scale_fn is not None:
            u = np.asarray(fwd(params, jnp.asarray(tokens), jnp.asarray(null)), np.float64)[:, t]
            s = cfg_scale_fn(t)
            logits = u + s * (logits - u)
        tokens[:, t] = np.argmax(logits, axis=-1)
    return tokens


@pytest.mark.parametrize("kw", [{}, dict(num_kv_heads=2, qk_norm=True)])
def test_cached_decoding_equals_full_forward(kw):
    model = tiny(**kw)
    params = random_params(model)
    labels = jnp.array([0, 3, 4], jnp.int32)
    tokens = jax.random.randint(jax.random.key(1), (3, model.block_size), 0, model.vocab_size)
    full = full_forward(model)(params, tokens, labels)  # [B, L, V]
    chex.assert_shape(full, (3, model.block_size, model.vocab_size))
    assert float(jnp.std(full)) > 0.1  # not the zero-initialised head

    @jax.jit
    def cached(p, tokens, labels):
        cache = gpt.init_cache(model, tokens.shape[0])
        first, cache = model.apply({"params": p}, labels, cache, method=GPT.prefill)  # [B, V]

        def body(t, carry):
            out, cache = carry
            logits, cache = model.apply({"params": p}, tokens[:, t - 1][:, None], cache, t, method=GPT.decode)
            return out.at[:, t].set(logits[:, 0]), cache

        out = jnp.zeros_like(full).at[:, 0].set(first)
        return jax.lax.fori_loop(1, model.block_size, body, (out, cache))[0]

    chex.assert_trees_all_close(cached(params, tokens, labels), full, atol=1e-4, rtol=1e-4)


def test_sampler_compiles_once_and_runs_one_lax_loop():
    model = tiny()
    params = random_params(model)
    config = SamplerConfig()
    traced = chex.assert_max_traces(gpt.sample_tokens, n=1)
    jitted = jax.jit(traced, static_argnames=("model", "config"))
    a = jitted(model, params, jnp.array([0, 1]), jax.random.key(0), config)
    b = jitted(model, params, jnp.array([2, 4]), jax.random.key(1), config)
    chex.assert_shape(a, (2, model.block_size))
    assert a.dtype == jnp.int32 and not np.array_equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < model.vocab_size

    # The library's own jitted sampler: one executable for two calls with new labels and keys.
    cache_before = gpt._sample_jit._cache_size()
    gpt.sample(model, params, np.array([0, 1]), jax.random.key(2), config)
    gpt.sample(model, params, np.array([3, 3]), jax.random.key(3), config)
    assert gpt._sample_jit._cache_size() == cache_before + 1

    # One while loop, and a program whose size does not grow with the number of tokens.
    def program(m):
        fn = functools.partial(gpt.sample_tokens, m, config=config)
        args = (nn.meta.unbox(gpt.abstract_params(m)), jnp.array([0, 1]), jax.random.key(0))
        return str(jax.make_jaxpr(fn)(*args)), jax.jit(fn).lower(*args).as_text()

    (small, small_hlo), (big, big_hlo) = program(model), program(tiny(grid=(6, 8)))  # 12 vs 48 tokens
    assert "stablehlo.while" in small_hlo  # fori_loop with static bounds is a scan, lowered to while
    assert len(small.splitlines()) == len(big.splitlines())
    assert len(small_hlo.splitlines()) == len(big_hlo.splitlines())


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_copies_no_kv_cache(batch):
    """The compiled sampler updates each layer's cache in place: no op in the program copies a
    whole cache buffer (at batch 1 a ``[1, KV, T, hd]`` cache once cost four copies per layer and
    step on XLA's CPU backend)."""
    model = tiny()
    cache_shape = gpt.init_cache(model, batch)[0]["k"].shape
    compiled = gpt._sample_jit.lower(model, nn.meta.unbox(gpt.abstract_params(model)),
                                     jax.ShapeDtypeStruct((batch,), jnp.int32), jax.random.key(0),
                                     SamplerConfig()).compile()
    dims = ",".join(map(str, cache_shape))
    copies = [line for line in compiled.as_text().splitlines()
              if " copy(" in line and f"[{dims}]" in line]
    assert "while" in compiled.as_text() and not copies, copies[:4]


def test_top_k_1_and_top_p_0_equal_greedy_argmax():
    model = tiny()
    params = random_params(model)
    labels = np.array([1, 4], np.int32)
    want = greedy_reference(model, params, labels)
    for config in (SamplerConfig(top_k=1), SamplerConfig(top_p=0.0)):
        a = gpt.sample(model, params, labels, jax.random.key(0), config)
        b = gpt.sample(model, params, labels, jax.random.key(7), config)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, want)


def test_cached_sampler_equals_no_cache_sampler():
    model = tiny()
    params = random_params(model)
    labels = jnp.array([0, 2, 4], jnp.int32)
    config = SamplerConfig(temperature=1.3, top_k=20, top_p=0.9)
    a = gpt.sample(model, params, labels, jax.random.key(5), config)
    b = gpt.sample_without_cache(model, params, labels, jax.random.key(5), config)
    np.testing.assert_array_equal(a, b)


def test_cfg_schedules_and_interval_match_reference():
    model = tiny()
    params = random_params(model)
    labels = np.array([0, 3], np.int32)
    n = model.block_size
    s = 4.0
    # CFG switched off by an empty interval equals sampling without CFG (stochastic, same key).
    off = gpt.sample(model, params, labels, jax.random.key(3), SamplerConfig(cfg_scale=s, cfg_interval=(0.0, 0.0)))
    plain = gpt.sample(model, params, labels, jax.random.key(3), SamplerConfig())
    np.testing.assert_array_equal(off, plain)

    cases = [
        (SamplerConfig(top_k=1, cfg_scale=s), lambda t: s),
        (
            SamplerConfig(top_k=1, cfg_scale=s, cfg_schedule="linear", cfg_interval=(0.25, 0.75)),
            lambda t: 1 + (s - 1) * t / (n - 1) if 0.25 <= t / n < 0.75 else 1.0,
        ),
    ]
    outs = []
    for config, scale_fn in cases:
        got = gpt.sample(model, params, labels, jax.random.key(0), config)
        np.testing.assert_array_equal(got, greedy_reference(model, params, labels, scale_fn))
        outs.append(np.asarray(got))
    assert not np.array_equal(outs[0], greedy_reference(model, params, labels))  # guidance changes samples


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(np.asarray(sampling.top_k_filter(logits, 2))).sum() == 2
    assert np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.7))).sum() == 2  # 0.5 < 0.7 <= 0.8
    assert np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.5))).sum() == 1
    assert np.isfinite(np.asarray(sampling.top_p_filter(logits, 0.0))).sum() == 1
    np.testing.assert_array_equal(sampling.top_p_filter(logits, 1.0), logits)
    assert float(sampling.cfg_scale_at(0, 10, 3.0, "linear")) == 1.0
    assert float(sampling.cfg_scale_at(9, 10, 3.0, "linear")) == 3.0
    assert float(sampling.cfg_scale_at(5, 10, 3.0, "constant", (0.0, 0.5))) == 1.0
    c, u = jnp.array([1.0, 2.0]), jnp.array([0.5, -1.0])
    np.testing.assert_array_equal(sampling.guide(c, u, 1.0), c)


def test_large_top_k_keeps_exactly_the_logits_lax_top_k_keeps():
    """Above k = 16 the k-th value comes from a bisection over order keys, not lax.top_k: the same
    logits survive, ties with the k-th kept, -inf and signed zeros included."""
    rs = np.random.RandomState(0)
    filt = jax.jit(sampling.top_k_filter, static_argnums=1)
    for trial, scale in enumerate([1e-3, 1.0, 1e4, 1.0]):
        x = (rs.standard_normal((3, 300)) * scale).astype(np.float32)
        if trial == 3:  # ties, masked entries, a row of +0 and a row with -0
            x = np.round(x, 1)
            x[:, :60] = -np.inf
            x[1], x[2, :40] = 0.0, -0.0
        for k in (17, 150, 299):
            kth = np.sort(x, axis=-1)[:, ::-1][:, k - 1:k]
            np.testing.assert_array_equal(filt(jnp.asarray(x), k), np.where(x < kth, -np.inf, x))
            np.testing.assert_array_equal(filt(jnp.asarray(x), k),
                                          jnp.where(x < jax.lax.top_k(x, k)[0][:, -1:], -jnp.inf, x))


def test_loss_fn_and_class_dropout():
    model = tiny(token_dropout_prob=0.0, resid_dropout_prob=0.0, ffn_dropout_prob=0.0)
    params = dict(random_params(model), output={"kernel": jnp.zeros((32, 48))})
    batch = {"tokens": jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % 48, "labels": jnp.array([1, 2])}
    loss, metrics = jax.jit(functools.partial(gpt.loss_fn, model, train=False))(params, batch, jax.random.key(0))
    # A zero head (as LlamaGen initialises it) predicts a uniform distribution.
    assert float(loss) == pytest.approx(np.log(model.vocab_size), rel=1e-6)
    assert set(metrics) == {"loss", "accuracy"} and 0.0 <= float(metrics["accuracy"]) <= 1.0

    # class_dropout_prob=1 in training replaces every label with the null class.
    model1 = tiny(class_dropout_prob=1.0, token_dropout_prob=0.0, resid_dropout_prob=0.0, ffn_dropout_prob=0.0)
    p = random_params(model1)
    dropped, null = jax.jit(
        lambda p: (
            model1.apply({"params": p}, batch["tokens"], batch["labels"], train=True, rngs={"dropout": jax.random.key(1)}),
            model1.apply({"params": p}, batch["tokens"], jnp.full((2,), 5)),
        )
    )(p)
    chex.assert_trees_all_close(dropped, null, atol=1e-6)


def test_sharded_train_step_equals_single_device():
    model = tiny(width=64, num_heads=4)
    params = random_params(model)
    batch = {
        "tokens": jax.random.randint(jax.random.key(1), (8, model.block_size), 0, model.vocab_size),
        "labels": jnp.arange(8, dtype=jnp.int32) % model.num_classes,
    }
    tx = optax.sgd(0.1, momentum=0.9)

    def step(params, opt_state, batch, rng):
        (loss, _), grads = jax.value_and_grad(functools.partial(gpt.loss_fn, model), has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    rng = jax.random.key(2)  # dropout on: masks must not depend on the sharding
    ref_params, _, ref_loss, ref_grads = jax.jit(step)(params, tx.init(params), batch, rng)

    mesh = parallel.create_mesh((2, 4, 1))
    rules = parallel.DEFAULT_RULES
    with parallel.mesh_context(mesh, rules):
        p_shard = parallel.logical_to_sharding(gpt.abstract_params(model), mesh, rules)
        assert p_shard["tok_embeddings"]["embedding"].spec[1] == "fsdp"  # embed over fsdp
        sharded_params = jax.device_put(params, p_shard)
        opt_state = tx.init(sharded_params)
        sharded_batch = parallel.shard_batch(batch, mesh)
        new_params, _, loss, grads = jax.jit(step, out_shardings=(p_shard, None, None, p_shard))(
            sharded_params, opt_state, sharded_batch, rng
        )
    assert new_params["layers_0"]["attention"]["wq"]["kernel"].sharding.spec[0] == "fsdp"
    assert len(sharded_batch["tokens"].sharding.device_set) == 8
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-6, rtol=1e-4)
    chex.assert_trees_all_close(new_params, ref_params, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "name,paper", [("B", 111e6), ("L", 343e6), ("XL", 775e6), ("XXL", 1.4e9), ("3B", 3.1e9)]
)
def test_variant_parameter_counts_match_paper(name, paper):
    n = gpt.count_params(gpt.gpt_variant(name, vocab_size=16384, num_classes=1000, grid=(16, 16)))
    assert abs(n - paper) / paper < 0.02, (name, n)


def test_bfloat16_activations_float32_params():
    model = tiny(dtype=jnp.bfloat16)
    params = jax.jit(lambda k: nn.meta.unbox(gpt.init_params(model, k)))(jax.random.key(0, impl="rbg"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert not np.any(np.asarray(params["output"]["kernel"]))  # LlamaGen zero-initialises the head
    tokens, labels = jnp.zeros((2, 12), jnp.int32), jnp.array([0, 1])
    logits, inter = jax.jit(
        lambda p: model.apply({"params": p}, tokens, labels, capture_intermediates=True)
    )(params)
    assert logits.dtype == jnp.float32  # float32 for the loss
    inter = inter["intermediates"]
    assert inter["layers_0"]["__call__"][0][0].dtype == jnp.bfloat16
    assert inter["layers_1"]["feed_forward"]["w1"]["__call__"][0].dtype == jnp.bfloat16
    assert inter["output"]["__call__"][0].dtype == jnp.bfloat16
    assert gpt.init_cache(model, 2)[0]["k"].dtype == jnp.bfloat16


def test_bad_inputs():
    model = tiny()
    params = random_params(model)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 5\)"):
        gpt.sample(model, params, np.array([0, 9]), jax.random.key(0))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        SamplerConfig(top_p=1.5)
    with pytest.raises(ValueError, match="retrain with class_dropout_prob > 0"):
        gpt.sample(tiny(class_dropout_prob=0.0), params, np.array([0]), jax.random.key(0), SamplerConfig(cfg_scale=2.0))
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplerConfig(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplerConfig(cfg_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="block_size"):
        model.apply({"params": params}, jnp.zeros((1, 13), jnp.int32), jnp.zeros((1,), jnp.int32))
    with pytest.raises(ValueError, match="unknown"):
        gpt.gpt_variant("S")
