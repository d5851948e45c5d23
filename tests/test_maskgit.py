"""MaskGIT: mask schedules, the masked-token loss, the parallel-decoding sampler, the family
adapter and the ImageNet config's parameter count."""
import functools
import math
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen import config_lib
from vqgen.generators import mask_schedules as ms
from vqgen.generators import maskgit as mg

K, C, L = 32, 10, 16  # codebook, classes, tokens (4x4 grid)
ALL_SCHEDULES = ("cosine", "linear", "square", "sqrt", "pow3", "pow2.5", "log", "exp", "arccos")

# Schedules written out here by hand (float64), independent of the library's table code.
_GAMMA = {
    "cosine": lambda r, n: math.cos(math.pi / 2 * r),
    "linear": lambda r, n: 1 - r,
    "square": lambda r, n: 1 - r * r,
    "sqrt": lambda r, n: 1 - math.sqrt(r),
    "pow3": lambda r, n: 1 - r**3,
    "pow2.5": lambda r, n: 1 - r**2.5,
    "log": lambda r, n: (-math.log2(r) / math.log2(n)) if r > 0 else 1.0,
    "exp": lambda r, n: 1 - 2 ** (-math.log2(n) * (1 - r)),
    "arccos": lambda r, n: math.acos(r) / (math.pi / 2),
}


def _reference_counts(schedule, steps, n):
    """MaskGIT's decode rule, step by step, with the hand-written schedules above."""
    m, out = n, []
    for t in range(steps):
        if t == steps - 1 or n == 0:
            m = 0
        else:
            ratio = min(max(_GAMMA[schedule]((t + 1) / steps, n), 1e-6), 1.0)
            m = max(1, min(m - 1, math.floor(ratio * n)))
        out.append(m)
    return out


@functools.lru_cache(maxsize=None)
def _model(class_dropout_prob=0.5, dropout=0.0, dtype=jnp.float32):
    """A tiny model (width 32, 2 layers, 16 tokens) and its unboxed params (one jitted init)."""
    model = mg.MaskGITTransformer(
        codebook_size=K, num_classes=C, seq_len=L, width=32, depth=2, num_heads=4, mlp_dim=64,
        dropout=dropout, class_dropout_prob=class_dropout_prob, label_smoothing=0.1, dtype=dtype,
    )
    params = jax.jit(lambda r: nn.meta.unbox(mg.init_params(model, r)))(jax.random.key(0))
    return model, params


@functools.lru_cache(maxsize=None)
def _apply(model):
    """Jitted forward pass ``(params, tokens, labels) -> logits`` of ``model``."""
    return jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))


# ------------------------------------------------------------------------------ schedules


def test_schedule_values_by_hand():
    r = np.array([0.0, 0.25, 0.5, 1.0])
    expected = {
        "cosine": [1.0, math.cos(math.pi / 8), math.sqrt(0.5), 1e-6],
        "linear": [1.0, 0.75, 0.5, 1e-6],
        "square": [1.0, 0.9375, 0.75, 1e-6],
        "sqrt": [1.0, 0.5, 1 - math.sqrt(0.5), 1e-6],
        "pow3": [1.0, 1 - 1 / 64, 0.875, 1e-6],
        "log": [1.0, 2 / 8, 1 / 8, 1e-6],  # N = 256: log2 N = 8
        "exp": [1 - 2**-8, 1 - 2**-6, 1 - 2**-4, 1e-6],
        "arccos": [1.0, math.acos(0.25) / (math.pi / 2), 2 / 3, 1e-6],
    }
    for name, want in expected.items():
        np.testing.assert_allclose(ms.mask_ratio(name, r, 256), want, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(ms.mask_ratio(name, jnp.asarray(r, jnp.float32), 256), want, rtol=1e-5, err_msg=name)
    assert set(ms.SCHEDULES) == {"cosine", "linear", "square", "sqrt", "pow<k>", "log", "exp", "arccos"}


@pytest.mark.parametrize("steps,n", [(1, 16), (8, 16), (16, 16), (8, 256), (12, 64), (8, 5)])
def test_num_masked_matches_maskgit_rule(steps, n):
    for name in ALL_SCHEDULES:
        got = [ms.num_masked(name, t, steps, n) for t in range(steps)]
        assert got == _reference_counts(name, steps, n), name
        assert got[-1] == 0
        # At least one token stays masked before the last step, and none comes back.
        assert all(m >= 1 for m in got[:-1]) and all(a >= b for a, b in zip([n] + got, got))


@pytest.mark.parametrize("bad", ["cosin", "pow", "powx", "pow-2", "pow0", "", "Cosine"])
def test_unknown_schedule_lists_the_valid_ones(bad):
    with pytest.raises(ValueError, match=r"unknown; use one of cosine, linear, square, sqrt, pow<k>, log, exp, arccos"):
        ms.mask_ratio(bad, 0.5, 16)
    with pytest.raises(ValueError, match="unknown"):
        mg.SamplerOptions(mask_schedule=bad)


# ------------------------------------------------------------------------------ the model


def test_vocabulary_layout_and_shapes():
    model, params = _model()
    assert model.mask_token_id == K + C
    assert model.vocab_size == K + C + 2  # codes, classes, mask, null class
    np.testing.assert_array_equal(model.label_token(jnp.array([0, 3, C])), [K, K + 3, K + C + 1])
    assert params["word_embeddings"].shape == (K + C + 2, 32)
    assert params["position_embeddings"].shape == (1 + L, 32)
    assert params["mlm_bias"].shape == (K + C + 2,)
    released = model.clone(class_dropout_prob=0.0)
    assert released.vocab_size == K + C + 1  # exactly the released layout without CFG
    boxed = jax.eval_shape(lambda r: mg.init_params(model, r), jax.random.key(0))
    names = {b.names for b in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))}
    assert ("vocab", "embed") in names and ("embed", "heads", "kv") in names and ("mlp", "embed") in names


def test_tied_head_uses_the_embedding():
    """Perturbing one word-embedding row changes that token's logit through the tied head."""
    model, params = _model()
    tokens = jnp.full((4, L), model.mask_token_id, jnp.int32)
    labels = jnp.array([1, 2, 3, 4])
    base = _apply(model)(params, tokens, labels)
    bumped = dict(params)
    bumped["word_embeddings"] = params["word_embeddings"].at[5].add(1.0)
    out = _apply(model)(bumped, tokens, labels)
    diff = np.abs(np.asarray(out - base)).max(axis=(0, 1))
    assert diff[5] > 10 * np.delete(diff, 5).max()  # row 5 is not an input token: only its logit moves


def test_bfloat16_compute_float32_params():
    model = _model()[0].clone(dtype=jnp.bfloat16)
    params = jax.eval_shape(lambda r: nn.meta.unbox(mg.init_params(model, r)), jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens, labels = jnp.zeros((2, L), jnp.int32), jnp.array([0, 1])
    _, inter = jax.eval_shape(lambda p: model.apply({"params": p}, tokens, labels, capture_intermediates=True,
                                                    mutable=["intermediates"]), params)
    hidden = inter["intermediates"]["layers_1"]["__call__"][0]
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (2, 1 + L, 32)
    logits = jax.eval_shape(lambda p: model.apply({"params": p}, tokens, labels), params)
    assert logits.dtype == jnp.float32 and logits.shape == (2, L, model.vocab_size)
    loss, metrics = jax.eval_shape(lambda p: mg.loss_fn(model, p, {"tokens": tokens, "label": labels},
                                                         jax.random.key(0)), params)
    assert loss.dtype == jnp.float32 and all(m.dtype == jnp.float32 for m in metrics.values())


def test_loss_is_cross_entropy_on_masked_positions_only():
    model, params = _model()
    rng = jax.random.key(7)
    tokens = jax.random.randint(jax.random.key(1), (4, L), 0, K)
    labels = jnp.array([1, 2, 3, 4])
    batch = {"tokens": tokens, "label": labels}
    (loss, metrics), (targets, inputs, dropped, mask, ratio, _) = jax.jit(
        lambda p, b, r: (mg.loss_fn(model, p, b, r), mg.training_inputs(model, b, r)))(params, batch, rng)
    mask, inputs, ratio = np.asarray(mask), np.asarray(inputs), np.asarray(ratio)
    np.testing.assert_array_equal(np.asarray(targets), np.asarray(tokens))
    # Exactly ceil(ratio * L) (at least 1) positions per example, set to the mask token.
    np.testing.assert_array_equal(mask.sum(1), np.clip(np.ceil(ratio * L), 1, L))
    np.testing.assert_array_equal(inputs, np.where(mask, model.mask_token_id, np.asarray(tokens)))
    dropped = np.asarray(dropped)
    assert np.all((dropped == np.asarray(labels)) | (dropped == model.null_class))
    assert (dropped == model.null_class).any()

    # Manual float64 label-smoothed CE over the codebook, averaged over masked positions.
    logits = np.asarray(_apply(model)(params, jnp.asarray(inputs), jnp.asarray(dropped)), np.float64)[..., :K]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    onehot = np.eye(K)[np.asarray(tokens)]
    smooth = 0.9 * onehot + 0.1 / K
    ce = -(smooth * logp).sum(-1)
    np.testing.assert_allclose(float(loss), (ce * mask).sum() / mask.sum(), rtol=1e-5)
    acc = ((logits.argmax(-1) == np.asarray(tokens)) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), acc, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["mask_ratio"]), ratio.mean(), rtol=1e-6)
    # The unmasked CE is different, so the masked-only average above is not a coincidence.
    assert abs((ce * ~mask).sum() / max((~mask).sum(), 1) - float(loss)) > 1e-4


def test_sharded_loss_on_2x4_mesh_equals_unsharded():
    from vqgen import parallel

    model, params = _model()
    batch = {"tokens": jax.random.randint(jax.random.key(1), (8, L), 0, K), "label": jnp.arange(8) % C}
    loss_fn = jax.jit(lambda p, b, r: mg.loss_fn(model, p, b, r)[0])
    want = loss_fn(params, batch, jax.random.key(2))
    mesh = parallel.create_mesh((2, 1, 4))
    with parallel.mesh_context(mesh, parallel.DEFAULT_RULES):
        abstract = jax.eval_shape(lambda r: mg.init_params(model, r), jax.random.key(0))
        shardings = parallel.logical_to_sharding(abstract, mesh, parallel.DEFAULT_RULES)
        sharded = jax.device_put(params, shardings)
        assert sharded["word_embeddings"].sharding.spec[0] == "tensor"  # vocab over the tensor axis
        got = jax.jit(lambda p, b, r: mg.loss_fn(model, p, b, r)[0])(
            sharded, parallel.shard_batch(batch, mesh), jax.random.key(2))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


# ------------------------------------------------------------------------------ the sampler


def test_sampler_counts_follow_every_schedule_and_compile_once():
    model, params = _model()
    labels = jnp.array([0, 3, 5, 9])
    steps = 8
    mg._sample_jit.clear_cache()
    for i, name in enumerate(ALL_SCHEDULES):
        opts = mg.SamplerOptions(num_steps=steps, mask_schedule=name)
        toks, hist = mg.sample(model, params, labels, jax.random.key(i), opts, return_history=True)
        want = [ms.num_masked(name, t, steps, L) for t in range(steps)]
        np.testing.assert_array_equal(np.asarray(hist), np.tile(want, (4, 1)), err_msg=name)
        toks = np.asarray(toks)
        assert toks.dtype == np.int32 and toks.shape == (4, L) and toks.min() >= 0 and toks.max() < K
    assert mg._sample_jit._cache_size() == 1  # every schedule reused one executable


def test_as_many_steps_as_tokens_and_editing_keeps_known_tokens():
    model, params = _model()
    rng = np.random.default_rng(0)
    known_mask = rng.random((4, L)) < 0.4
    known_mask[0] = False  # one example generates from scratch
    known_tokens = rng.integers(0, K, (4, L)).astype(np.int32)
    for name, steps in (("cosine", L), ("exp", L)):  # as many steps as tokens; one compile
        opts = mg.SamplerOptions(num_steps=steps, mask_schedule=name)
        toks, hist = mg.sample(model, params, np.array([1, 2, 3, 4]), jax.random.key(1), opts,
                               known_tokens=known_tokens, known_mask=known_mask, return_history=True)
        toks, hist = np.asarray(toks), np.asarray(hist)
        np.testing.assert_array_equal(toks[known_mask], known_tokens[known_mask])
        assert toks.min() >= 0 and toks.max() < K
        for b in range(4):
            n = int((~known_mask[b]).sum())
            np.testing.assert_array_equal(hist[b], [ms.num_masked(name, t, steps, n) for t in range(steps)])


def test_sampler_body_traces_once():
    model, params = _model()
    opts = mg.SamplerOptions(num_steps=8, choice_temperature=2.0)
    counts = jnp.asarray(ms.scheduled_counts(opts.mask_schedule, 8, L))
    fn = jax.jit(chex.assert_max_traces(mg.sample_tokens, n=1), static_argnames=("model", "opts"))
    a, _ = fn(model, params, jnp.array([0, 1, 2, 3]), jax.random.key(0), opts, None, None, counts)
    b, _ = fn(model, params, jnp.array([7, 2, 5, 5]), jax.random.key(1), opts, None, None, counts)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_cfg_scale_one_equals_no_cfg():
    """Guidance that is on but at scale 1 at every step (empty interval) gives the tokens of the
    sampler without any unconditional pass; a real scale changes them."""
    model, params = _model()
    labels, key = jnp.array([0, 4, 8, 1]), jax.random.key(3)
    plain = mg.sample(model, params, labels, key, mg.SamplerOptions(num_steps=8))
    unit = mg.sample(model, params, labels, key, mg.SamplerOptions(num_steps=8, cfg_scale=5.0, cfg_interval=(0.0, 0.0)))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(unit))
    # Direct check of the guided logits at scale 1 and 3 on the same forward pass.
    tokens = jnp.full((4, L), model.mask_token_id, jnp.int32)
    cond = _apply(model)(params, tokens, labels)
    uncond = _apply(model)(params, tokens, jnp.full_like(labels, model.null_class))
    assert not np.allclose(np.asarray(cond), np.asarray(uncond))
    from vqgen.generators import sampling
    np.testing.assert_array_equal(np.asarray(sampling.guide(cond, uncond, 1.0)), np.asarray(cond))
    np.testing.assert_allclose(np.asarray(sampling.guide(cond, uncond, 3.0)),
                               np.asarray(uncond + 3.0 * (cond - uncond)), rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_one_clear_sentence():
    model, params = _model()
    released, rparams = model.clone(class_dropout_prob=0.0), None  # errors come before any compute
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"num_steps=17 is more than the 16 tokens"):
        mg.sample(model, params, [0], key, mg.SamplerOptions(num_steps=17))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\) \(or 10 for no label\)"):
        mg.sample(model, params, [0, 11], key)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\), got"):
        mg.sample(released, rparams, [10], key)
    with pytest.raises(ValueError, match="needs the null class"):
        mg.sample(released, rparams, [0], key, mg.SamplerOptions(cfg_scale=2.0))
    with pytest.raises(ValueError, match="known_tokens and known_mask go together"):
        mg.sample(model, params, [0], key, known_tokens=np.zeros((1, L), np.int32))
    with pytest.raises(ValueError, match=r"known tokens must be code ids in \[0, 32\)"):
        mg.sample(model, params, [0], key, known_tokens=np.full((1, L), K), known_mask=np.ones((1, L), bool))
    with pytest.raises(ValueError, match="cfg_schedule"):
        mg.SamplerOptions(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="num_steps=0"):
        mg.SamplerOptions(num_steps=0)


# ------------------------------------------------------------------------------ family adapter


def test_family_adapter_from_config_sections():
    gen = config_lib.generator_config("maskgit", width=32, depth=1, num_heads=4, mlp_dim=64).to_dict()
    model = mg.build(gen, vocab_size=K, num_classes=C, grid=(4, 4))
    assert isinstance(model, mg.MaskGITTransformer) and model.seq_len == L and model.dtype == jnp.float32
    assert mg.build({**gen, "dtype": "bfloat16"}, vocab_size=K, num_classes=C, grid=(4, 4)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown maskgit generator keys"):
        mg.build({**gen, "widht": 3}, vocab_size=K, num_classes=C, grid=(4, 4))
    with pytest.raises(ValueError, match="unknown"):
        mg.build({**gen, "mask_schedule": "nope"}, vocab_size=K, num_classes=C, grid=(4, 4))
    sample_cfg = config_lib.sample_config("maskgit", cfg_interval=[0.0, 0.5]).to_dict()
    opts = mg.sampler_options(sample_cfg)
    assert opts == mg.SamplerOptions(num_steps=8, choice_temperature=4.5, cfg_scale=2.0, cfg_interval=(0.0, 0.5))
    hash(opts)


# ------------------------------------------------------------------------------ ImageNet config


def _load_config(arg=None):
    return config_lib.load_config("generators/maskgit", arg)


def test_imagenet_config_parameter_count_matches_paper():
    """Transformer (172.46M) + its VQGAN tokenizer (54.52M) = the paper's 227M, within 2%."""
    from vqgen.train.builders import build_tokenizer

    c = _load_config()
    assert c.data.source == "tfds:imagenet2012" and c.data.image_size == 256
    grid = (16, 16)
    model = mg.build(c.generator.to_dict(), vocab_size=c.tokenizer.quantizer.codebook_size,
                     num_classes=c.data.num_classes, grid=grid)
    assert model.vocab_size == 1024 + 1000 + 1 and model.seq_len == 256
    gen_params = mg.count_params(model)
    tok = build_tokenizer(c.tokenizer, c.data.channels)
    abstract = jax.eval_shape(lambda r: tok.init({"params": r}, jnp.zeros((1, 256, 256, 3))), jax.random.key(0))
    tok_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract["params"])))
    assert abs(gen_params + tok_params - 227e6) / 227e6 < 0.02, (gen_params, tok_params)
    assert abs(gen_params - 172.46e6) < 0.01e6 and abs(tok_params - 54.52e6) < 0.01e6  # the docstring's split
    cfg = _load_config("cfg")
    assert cfg.generator.class_dropout_prob > 0 and cfg.sample.cfg_scale > 1
    with pytest.raises(ValueError, match="unknown MaskGIT variant"):
        _load_config("huge")
