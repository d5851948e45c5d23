"""Decode weight dtypes of GPT sampling (``sample.weight_dtype``): the int8 round trip, float32
bit for bit, the logit error of bfloat16 and int8 weights against float32, top-1 agreement, the
bytes a decoding step reads, and the one-sentence errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.generators import gpt
from vqgen.generators.gpt import GPT, SamplerConfig
from vqgen.modules import weight_quant

# Two blocks, grouped-query attention with QK-norm, and a head wider than one column chunk.
TINY = dict(vocab_size=1100, num_classes=5, grid=(3, 4), width=64, depth=2, num_heads=4, num_kv_heads=2,
            qk_norm=True)
# Quantised matrices on the path to a logit: wq, wk, wv, wo, w1, w3, w2 per block, and the head.
NUM_MATRICES = 7 * TINY["depth"] + 1
# Largest relative weight change of each dtype: bfloat16 rounds to 8 significant bits (relative
# error <= 2^-9 of the weight); int8 rounds to a step of max|w| / 127 per output channel.
WEIGHT_EPS = {"bfloat16": 2.0**-9, "int8": 1.0 / 127}


@functools.lru_cache(maxsize=None)
def model_and_params():
    model = GPT(**TINY)
    rs = np.random.RandomState(0)
    flat, tree = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(gpt.abstract_params(model)))
    leaves = []
    for path, x in flat:
        noise = rs.standard_normal(x.shape).astype(np.float32)
        is_scale = str(path[-1].key) == "scale"
        leaves.append(jnp.asarray(1.0 + 0.2 * noise if is_scale else 0.3 * noise, x.dtype))
    return model, jax.tree.unflatten(tree, leaves)


def module_cached_logits(model, params, tokens, labels):
    """The sampler's path before decode weights existed: prefill + one cached decode per token,
    through the modules' own matmuls."""
    @jax.jit
    def run(p, tokens, labels):
        cache = gpt.init_cache(model, tokens.shape[0])
        first, cache = model.apply({"params": p}, labels, cache, method=GPT.prefill)

        def body(t, carry):
            out, cache = carry
            logits, cache = model.apply({"params": p}, tokens[:, t - 1][:, None], cache, t, method=GPT.decode)
            return out.at[:, t].set(logits[:, 0]), cache

        out = jnp.zeros(tokens.shape + (model.vocab_size,)).at[:, 0].set(first)
        return jax.lax.fori_loop(1, model.block_size, body, (out, cache))[0]

    return run(params, tokens, labels)


def teacher_forced(model, params, tokens, labels, weight_dtype, chunk_columns=None):
    dparams = gpt.decode_params(params, weight_dtype, chunk_columns=chunk_columns)
    with weight_quant.decode_matmuls():
        return jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))(dparams, tokens, labels)


def inputs(batch):
    model, _ = model_and_params()
    tokens = jax.random.randint(jax.random.key(1), (batch, model.block_size), 0, model.vocab_size)
    return tokens, jnp.arange(batch, dtype=jnp.int32) % model.num_classes


@pytest.mark.parametrize("shape,in_axes", [((64, 96), 1), ((64, 4, 16), 1), ((4, 16, 64), 2)])
def test_int8_round_trip_within_half_a_scale(shape, in_axes):
    w = 0.3 * jax.random.normal(jax.random.key(0), shape)
    w = w.at[..., 0].set(0.0)  # an all-zero output channel gets scale 1 and zeros
    q, scale = weight_quant.quantize_int8(w, in_axes)
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == shape[in_axes:]
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) <= 127
    err = jnp.abs(weight_quant.dequantize_int8(q, scale) - w)
    np.testing.assert_array_less(np.asarray(err), np.broadcast_to(np.asarray(scale) / 2 * (1 + 1e-6) + 1e-12, shape))
    # Each channel's largest weight is exactly +-127 steps: the scale is absmax / 127.
    np.testing.assert_allclose(np.asarray(scale)[..., 1:], np.max(np.abs(np.asarray(w)), axis=tuple(range(in_axes)))[..., 1:] / 127,
                               rtol=1e-6)
    # The decode kernel of the same weights holds the same numbers, whatever its chunks.
    dk = weight_quant.to_decode_kernel(w, in_axes, "int8", chunk_columns=24)
    assert len(dk.chunks) > 1
    np.testing.assert_array_equal(dk.dense(), weight_quant.dequantize_int8(q, scale))


def test_float32_decode_weights_are_bit_identical():
    model, params = model_and_params()
    tokens, labels = inputs(2)
    # Teacher-forced through whole decode kernels: the modules' numbers bit for bit.
    full = jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))(params, tokens, labels)
    np.testing.assert_array_equal(teacher_forced(model, params, tokens, labels, "float32"), full)
    # The sampler's path at batch 1, where the kernels are split into column chunks, and at batch 2.
    assert len(gpt.decode_params(params, chunk_columns=512)["output"]["kernel"].chunks) == 3
    for batch in (1, 2):
        np.testing.assert_array_equal(gpt.cached_logits(model, params, tokens[:batch], labels[:batch]),
                                      module_cached_logits(model, params, tokens[:batch], labels[:batch]))


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "int8"])
def test_logit_error_bounded_against_float32(weight_dtype):
    """A first-order error budget: each of the NUM_MATRICES quantised matrices changes its output
    by at most its relative weight error (WEIGHT_EPS, taken against the largest weight of an
    output channel, which over-counts for the typical weight) and the changes add, so
    ``max|logit_q - logit_f32| <= NUM_MATRICES * eps * max|logit_f32|``. The measured error on
    these random weights is 4-6x below it (printed)."""
    model, params = model_and_params()
    tokens, labels = inputs(2)
    ref = jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))(params, tokens, labels)  # [B, L, V]
    bound = NUM_MATRICES * WEIGHT_EPS[weight_dtype] * float(jnp.max(jnp.abs(ref)))
    tf = teacher_forced(model, params, tokens, labels, weight_dtype)
    cached = gpt.cached_logits(model, params, tokens[:1], labels[:1], weight_dtype)  # batch 1: chunked kernels
    err_tf = float(jnp.max(jnp.abs(tf - ref)))
    err_cached = float(jnp.max(jnp.abs(cached - ref[:1])))
    print(f"{weight_dtype}: max |dlogit| teacher-forced {err_tf:.4f}, cached {err_cached:.4f}, bound {bound:.4f}, "
          f"max |logit| {float(jnp.max(jnp.abs(ref))):.3f}")
    assert 0 < err_tf <= bound and 0 < err_cached <= bound
    # The sampler's cached path reads the same quantised weights as the teacher-forced pass.
    np.testing.assert_allclose(cached, tf[:1], atol=1e-4, rtol=1e-4)

    # Top-1 agreement with float32 given the same prefix: a fraction, and certain wherever the
    # float32 margin between the best two logits exceeds twice that position's logit error.
    agree = np.asarray(jnp.argmax(tf, -1) == jnp.argmax(ref, -1))
    top2 = jax.lax.top_k(ref, 2)[0]
    margin = np.asarray(top2[..., 0] - top2[..., 1])
    pos_err = np.asarray(jnp.max(jnp.abs(tf - ref), -1))
    assert agree[margin > 2 * pos_err].all()
    assert 0.0 <= float(agree.mean()) <= 1.0


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "int8"])
def test_top1_sampling_agreement_is_a_fraction(weight_dtype):
    model, params = model_and_params()
    labels = np.array([1, 3], np.int32)
    ref = np.asarray(gpt.sample(model, params, labels, jax.random.key(0), SamplerConfig(top_k=1)))
    got = np.asarray(gpt.sample(model, params, labels, jax.random.key(0), SamplerConfig(top_k=1, weight_dtype=weight_dtype)))
    assert got.shape == ref.shape and got.dtype == np.int32
    agreement = float(np.mean(got == ref))
    print(f"{weight_dtype}: top-1 token agreement with float32 {agreement:.3f}")
    assert 0.0 <= agreement <= 1.0
    # Pre-converted decode weights sample the same tokens as converting inside the call.
    pre = gpt.decode_params(params, weight_dtype, chunk_columns=None)
    np.testing.assert_array_equal(
        gpt.sample(model, pre, labels, jax.random.key(0), SamplerConfig(top_k=1, weight_dtype=weight_dtype)), got)


def test_decode_step_reads_fewer_weight_bytes():
    """The compiled decoding step's arguments shrink by the kernel bytes: 1/2 for bfloat16, 1/4
    (plus one float32 scale per output) for int8; embeddings, norms and the cache are unchanged."""
    model, params = model_and_params()
    cache = gpt.init_cache(model, 1)
    feed = jnp.zeros((1, 1), jnp.int32)

    def step(p, feed, cache):
        with weight_quant.decode_matmuls():
            return model.apply({"params": p}, feed, cache, 3, method=GPT.decode)

    kernels, args = {}, {}
    for dt in weight_quant.WEIGHT_DTYPES:
        dparams = gpt.decode_params(params, dt)
        kernels[dt] = weight_quant.weight_bytes(dparams)
        compiled = jax.jit(step).lower(dparams, feed, cache).compile()
        args[dt] = compiled.memory_analysis().argument_size_in_bytes
    f32 = kernels["float32"]
    n_out = sum(int(np.prod(k.shape[2 if path[-2].key == "wo" else 1:]))
                for path, k in jax.tree_util.tree_flatten_with_path(params)[0] if path[-1].key == "kernel")
    assert kernels["bfloat16"] * 2 == f32
    assert kernels["int8"] == f32 // 4 + 4 * n_out
    for dt in ("bfloat16", "int8"):
        assert args["float32"] - args[dt] == f32 - kernels[dt]


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"sample.weight_dtype='fp8' is not a decode weight dtype; use one of"):
        SamplerConfig(weight_dtype="fp8")
    with pytest.raises(ValueError, match="sample.weight_dtype='int4' is not a decode weight dtype"):
        gpt.sampler_options({"weight_dtype": "int4"})
    assert gpt.sampler_options({"weight_dtype": "int8", "per_class": 2}).weight_dtype == "int8"
    with pytest.raises(ValueError, match="weight_dtype=None is not a decode weight dtype"):
        weight_quant.decode_params({}, None)

    # The training config path: decode dtypes are refused, each in one sentence.
    grid = dict(vocab_size=16, num_classes=3, grid=(2, 2))
    with pytest.raises(ValueError, match=r"generator.param_dtype='int8' cannot train \(int8 is a decode-time"):
        gpt.build({"arch": "gpt", "param_dtype": "int8"}, **grid)
    with pytest.raises(ValueError, match=r"generator.dtype='int8' cannot train"):
        gpt.build({"arch": "gpt", "dtype": "int8"}, **grid)
    with pytest.raises(ValueError, match="generator.param_dtype='bfloat16' would train bfloat16-stored weights"):
        gpt.build({"arch": "gpt", "param_dtype": "bfloat16"}, **grid)
    with pytest.raises(ValueError, match=r"generator.weight_dtype='int8' is a sampling option.*set sample.weight_dtype"):
        gpt.build({"arch": "gpt", "weight_dtype": "int8"}, **grid)
    assert gpt.build({"arch": "gpt", "dtype": "bfloat16", "depth": 1, "width": 32, "num_heads": 2}, **grid).dtype == jnp.bfloat16

    model, params = model_and_params()
    tokens, labels = inputs(2)
    with pytest.raises(ValueError, match="loss_fn got decode weights"):
        gpt.loss_fn(model, gpt.decode_params(params, "bfloat16"), {"tokens": tokens, "labels": labels},
                    jax.random.key(0))
    with pytest.raises(ValueError, match=r"already int8 decode weights, but weight_dtype='bfloat16' was asked for"):
        gpt.sample(model, gpt.decode_params(params, "int8"), labels, jax.random.key(0),
                   SamplerConfig(weight_dtype="bfloat16"))
