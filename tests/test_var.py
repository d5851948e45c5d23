"""Tests of VAR (next-scale prediction): sizes, the block-causal mask, the teacher-forcing input,
cached scale-by-scale sampling against the teacher-forced forward, CFG, tracing, bad input."""
import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen import generators
from vqgen.generators import var
from vqgen.quantizers.multiscale import (
    MultiScaleResidualQuantizer,
    Phi,
    area_matrix,
    bicubic_matrix,
    phi_assignment,
    resize_with,
)

SCALES = (1, 2, 3, 4)
K, CVAE = 24, 8
TINY = dict(vocab_size=K, num_classes=5, scales=SCALES, vae_dim=CVAE, depth=2, width=32, num_heads=4)


def tiny(**kw) -> var.VAR:
    return var.VAR(**{**TINY, **kw})


@functools.lru_cache(maxsize=None)
def quantizer(phi_share: int = 4) -> tuple[MultiScaleResidualQuantizer, dict]:
    """A tiny VAR quantizer and its variables; Φ biases are made non-zero so Φ is not linear."""
    q = MultiScaleResidualQuantizer(K, scales=SCALES, phi_share=phi_share)
    variables = jax.jit(q.init)(jax.random.key(1), jnp.zeros((1, 4, 4, CVAE)))
    params = nn.meta.unbox(variables["params"])
    rs = np.random.RandomState(phi_share)
    bump = lambda x: x + jnp.asarray(0.1 * rs.standard_normal(x.shape), x.dtype)  # noqa: E731
    params = {k: (v if k == "codebook" else jax.tree.map(bump, v)) for k, v in params.items()}
    return q, {"params": params}


@functools.lru_cache(maxsize=None)
def random_params(model: var.VAR, seed: int = 0):
    """Random params of the right shapes, made with NumPy (no compile): VAR's init has tiny
    gammas and a 0.02-scaled head, which would make every block nearly the identity."""
    rs = np.random.RandomState(seed)
    flat, tree = jax.tree_util.tree_flatten(nn.meta.unbox(var.abstract_params(model)))
    return jax.tree.unflatten(tree, [jnp.asarray(0.3 * rs.standard_normal(x.shape), x.dtype) for x in flat])


@functools.lru_cache(maxsize=None)
def full_forward(model: var.VAR):
    return jax.jit(lambda p, x, y: model.apply({"params": p}, x, y))


_teacher_forcing = jax.jit(var.teacher_forcing_input, static_argnames="codec")


def test_variant_sizes_match_var_model_zoo():
    # VAR's README: VAR-d16 310M, d20 600M, d24 1.0B, d30 2.0B. The counts are also checked against
    # a closed form of VAR's PyTorch modules: per block mat_qkv 3C², q/v biases 2C, per-head scale H,
    # proj C²+C, fc1 4C²+4C, fc2 4C²+C, ada_lin 6C²+6C.
    zoo = {"d16": 310e6, "d20": 600e6, "d24": 1.0e9, "d30": 2.0e9}
    vocab, classes, cvae = 4096, 1000, 32
    seq_len, num_scales = sum(s * s for s in var.VAR_SCALES), len(var.VAR_SCALES)
    for name, paper in zoo.items():
        model = var.var_variant(name)
        d = model.depth
        c = 64 * d
        assert (model.embed_dim, model.heads) == (c, d)
        np.testing.assert_allclose(model.drop_path_rates[-1], 0.1 * d / 24)
        np.testing.assert_allclose(model.drop_path_rates, np.linspace(0, 0.1 * d / 24, d))
        block = 18 * c * c + 14 * c + d
        # word_embed, class_emb, pos_start, pos_1LC, lvl_embed, head_nm, head.
        rest = (cvae * c + c) + (classes + 1) * c + c + seq_len * c + num_scales * c
        rest += (2 * c * c + 2 * c) + (c * vocab + vocab)
        n = var.count_params(model)
        assert n == d * block + rest, name
        # Within 2% of the zoo figure, or equal to it at the zoo's two significant digits
        # (VAR-d24 has 1.033B parameters, listed as 1.0B).
        assert abs(n - paper) / paper <= 0.02 or float(f"{n:.2g}") == paper, (name, n)
    # Every parameter carries logical axis names.
    boxed = var.abstract_params(tiny(shared_aln=True))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)


def test_block_causal_mask_hides_later_scales():
    lay = var.layout(SCALES)
    mask = var.block_causal_mask(SCALES)
    assert mask.shape == (30, 30) and mask[0].sum() == 1 and mask[1:5, :5].all() and not mask[1:5, 5:].any()
    model = tiny()
    params = random_params(model)
    fwd = full_forward(model)
    labels = jnp.array([1, 3])
    x = jax.random.normal(jax.random.key(0), (2, lay.seq_len - 1, CVAE))
    base = np.asarray(fwd(params, x, labels))
    for k in range(1, len(SCALES)):
        # x_input row j is sequence position j + 1; perturb every input of scales >= k.
        perturbed = x.at[:, lay.begins[k] - 1 :].add(1.0)
        got = np.asarray(fwd(params, perturbed, labels))
        np.testing.assert_array_equal(got[:, : lay.begins[k]], base[:, : lay.begins[k]])
        assert np.abs(got[:, lay.begins[k] :] - base[:, lay.begins[k] :]).max() > 1e-3
    # The class conditions every position, the first one included.
    other = np.asarray(fwd(params, x, jnp.array([2, 3])))
    assert np.abs(other[0] - base[0]).min(axis=-1).max() > 0 and np.array_equal(other[1], base[1])


def _reference_inputs(q_variables, maps, phi_share):
    """VAR's idxBl_to_var_input written out with the quantizer's resampling helpers and Φ."""
    params = q_variables["params"]
    codebook = params["codebook"]
    size, num = SCALES[-1], len(SCALES)
    f_hat = jnp.zeros(maps[0].shape[:1] + (size, size, CVAE))
    inputs = []
    for k, s in enumerate(SCALES):
        h = codebook[maps[k]]  # [B, s, s, C]
        if s != size:
            h = resize_with(bicubic_matrix(size, s), h)
        phi = f"phi_{phi_assignment(num, phi_share)[k]}"
        f_hat = f_hat + Phi(0.5).apply({"params": params[phi]}, h)
        if k + 1 < num:
            nxt = SCALES[k + 1]
            small = f_hat if nxt == size else resize_with(area_matrix(nxt, size), f_hat)
            inputs.append(small.reshape(small.shape[0], nxt * nxt, CVAE))
    return jnp.concatenate(inputs, axis=1), f_hat


@pytest.mark.parametrize("phi_share", [4, 1])
def test_teacher_forcing_input_is_vars_cumulative_residual_input(phi_share):
    q, variables = quantizer(phi_share)
    codec = var.ScaleCodec.from_quantizer(q)
    assert codec == var.ScaleCodec(SCALES, phi_share, 0.5)
    z = jax.random.normal(jax.random.key(2), (2, 4, 4, CVAE))
    out = jax.jit(q.apply)(variables, z)
    tokens = var.join_scales(out.indices)
    assert tokens.shape == (2, 30) and all(
        np.array_equal(a, b) for a, b in zip(var.split_scales(tokens, SCALES), out.indices)
    )
    x = _teacher_forcing(tokens, variables["params"], codec)
    want_x, want_f = _reference_inputs(variables, out.indices, phi_share)
    chex.assert_shape(x, (2, 29, CVAE))
    np.testing.assert_allclose(x, want_x, atol=1e-5)
    decoded = jax.jit(functools.partial(q.apply, method="decode_indices"))(variables, out.indices)
    np.testing.assert_allclose(var.f_hat_from_tokens(out.indices, variables["params"], codec), decoded, atol=1e-5)
    np.testing.assert_allclose(want_f, decoded, atol=1e-5)


@pytest.mark.parametrize("unroll", [True, False], ids=["unrolled", "fori_loop"])
@pytest.mark.parametrize(
    "kw,phi_share", [(dict(), 4), (dict(shared_aln=True, attn_l2_norm=False), 1)], ids=["adaln", "shared_aln"]
)
def test_cached_sampling_equals_teacher_forced_forward(kw, phi_share, unroll):
    model = tiny(**kw)
    params = random_params(model)
    q, variables = quantizer(phi_share)
    codec = var.ScaleCodec.from_quantizer(q)
    labels = np.array([0, 4, 2], np.int32)
    opts = var.SamplerOptions(top_k=1)
    tokens, logits, f_hat = var.sample(
        model, params, labels, jax.random.key(0), opts, vq_params=variables["params"], codec=codec, return_logits=True,
        unroll=unroll,
    )
    chex.assert_shape(tokens, (3, 30))
    assert tokens.dtype == jnp.int32
    x = _teacher_forcing(tokens, variables["params"], codec)
    full = np.asarray(full_forward(model)(params, x, jnp.asarray(labels)))
    np.testing.assert_allclose(np.asarray(logits), full, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(tokens, np.argmax(full, axis=-1))
    decoded = q.apply(variables, var.split_scales(tokens, SCALES), method="decode_indices")
    np.testing.assert_allclose(f_hat, decoded, atol=1e-5)
    # Greedy: another key draws the same pyramid.
    again = var.sample(model, params, labels, jax.random.key(9), opts, vq_params=variables["params"], codec=codec,
                       unroll=unroll)
    np.testing.assert_array_equal(again, tokens)


def test_cfg_ramp_is_vars_and_scale_one_is_no_guidance():
    model = tiny()
    params = random_params(model)
    q, variables = quantizer(4)
    codec = var.ScaleCodec.from_quantizer(q)
    vq = variables["params"]
    labels = np.array([1, 3], np.int32)
    run = functools.partial(var.sample, model, params, labels, jax.random.key(0), vq_params=vq, codec=codec,
                            return_logits=True)
    plain_tokens, plain_logits, _ = run(var.SamplerOptions(top_k=1))
    # Guided code path (doubled batch) with the scale 1 at every step: the unguided result.
    tokens, logits, _ = run(var.SamplerOptions(top_k=1, cfg_scale=2.5, cfg_interval=(0.0, 0.0)))
    np.testing.assert_array_equal(tokens, plain_tokens)
    np.testing.assert_allclose(logits, plain_logits, atol=1e-5)
    assert not var.SamplerOptions(cfg_scale=1.0).uses_cfg

    # VAR's cfg=1.5 is cfg_scale=2.5: logits (1 + t) cond - t uncond with t = 1.5 * si / (S - 1).
    assert var.sampler_options({}).cfg_schedule == "linear"
    tokens, logits, _ = run(var.sampler_options({"cfg_scale": 2.5, "top_k": 1}))
    x = _teacher_forcing(tokens, vq, codec)
    fwd = full_forward(model)
    cond = np.asarray(fwd(params, x, jnp.asarray(labels)), np.float64)
    uncond = np.asarray(fwd(params, x, jnp.full((2,), model.num_classes)), np.float64)
    t = 1.5 * var.layout(SCALES).levels / (len(SCALES) - 1)
    want = (1 + t)[None, :, None] * cond - t[None, :, None] * uncond
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(tokens, np.argmax(want, axis=-1))
    assert not np.array_equal(tokens, plain_tokens)


def test_sampler_traces_once_and_runs_one_while_loop():
    model = tiny()
    params = random_params(model)
    q, variables = quantizer(4)
    codec = var.ScaleCodec.from_quantizer(q)
    opts = var.SamplerOptions(top_k=5, top_p=0.9)
    traced = chex.assert_max_traces(var.sample_tokens, n=1)
    jitted = jax.jit(traced, static_argnames=("model", "opts", "codec", "return_logits"))
    a = jitted(model, params, jnp.array([0, 1]), jax.random.key(0), opts, variables["params"], codec)
    b = jitted(model, random_params(model, 1), jnp.array([2, 4]), jax.random.key(1), opts, variables["params"], codec)
    chex.assert_shape(a, (2, 30))
    assert not np.array_equal(a, b) and int(a.min()) >= 0 and int(a.max()) < K

    before = var._sample_jit._cache_size()
    for seed, labels in ((2, [0, 1]), (3, [5, 2])):  # 5 = the null class
        var.sample(model, params, np.array(labels), jax.random.key(seed), opts, vq_params=variables["params"],
                   codec=codec)
    assert var._sample_jit._cache_size() == before + 1

    # With unroll=False: one while loop, and the traced program does not grow with the number of
    # scales. Unrolled (the default): one program with one block per scale.
    def program(scales, unroll=False):
        m = tiny(scales=scales)
        cdc = var.ScaleCodec(scales, phi_ratio=0.0)  # Φ = identity: the codebook alone
        fn = lambda p, y, r, vq: var.sample_tokens(m, p, y, r, opts, vq, cdc, unroll=unroll)  # noqa: E731
        abstract = nn.meta.unbox(var.abstract_params(m))
        args = (abstract, jnp.array([0, 1]), jax.random.key(0), {"codebook": jnp.ones((K, CVAE))})
        return str(jax.make_jaxpr(fn)(*args)), jax.jit(fn).lower(*args).as_text()

    (small, small_hlo), (big, _) = program(SCALES), program((1, 2, 3, 4, 5, 6))
    assert "stablehlo.while" in small_hlo
    assert len(small.splitlines()) == len(big.splitlines())
    (u_small, _), (u_big, _) = program(SCALES, unroll=True), program((1, 2, 3, 4, 5, 6), unroll=True)
    assert len(u_big.splitlines()) > len(u_small.splitlines())


def test_loss_init_and_dtypes():
    model = tiny(depth=3, width=64, num_heads=4)
    params = jax.jit(functools.partial(var.init_params, model))(jax.random.key(0))
    p = nn.meta.unbox(params)
    std = math.sqrt(1 / 64 / 3)
    ada = np.asarray(p["blocks_0"]["ada_lin"]["kernel"])  # [C, 6C]
    np.testing.assert_allclose(ada[:, :128].std(), std * 1e-5, rtol=0.1)
    np.testing.assert_allclose(ada[:, 128:].std(), std * 0.5, rtol=0.1)
    np.testing.assert_allclose(np.asarray(p["head"]["kernel"]).std(), std * 0.02, rtol=0.1)
    np.testing.assert_allclose(np.asarray(p["blocks_1"]["ffn"]["fc2"]["kernel"]).std(), std / math.sqrt(6), rtol=0.1)
    np.testing.assert_allclose(p["blocks_2"]["attn"]["scale_mul"], np.log(4.0), rtol=1e-6)
    assert not np.any(np.asarray(p["blocks_0"]["attn"]["q_bias"])) and not np.any(np.asarray(p["head"]["bias"]))

    q, variables = quantizer(4)
    codec = var.ScaleCodec.from_quantizer(q)
    tokens = jax.random.randint(jax.random.key(3), (4, 30), 0, K)
    x_input = _teacher_forcing(tokens, variables["params"], codec)
    batch = {"tokens": tokens, "label": jnp.array([0, 1, 2, 3]), "x_input": x_input}
    step = jax.jit(jax.value_and_grad(lambda prm, b, r: var.loss_fn(model, prm, b, r), has_aux=True))
    (loss, metrics), grads = step(params, batch, jax.random.key(0))
    # The 0.02-scaled head starts near the uniform distribution.
    np.testing.assert_allclose(loss, np.log(K), atol=0.05)
    assert set(metrics) == {"loss", "accuracy", "loss_last_scale", "accuracy_last_scale"}
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(nn.meta.unbox(grads)))
    # Label dropout and drop path draw from the rng: same key, same loss; another key, another.
    (again, _), _ = step(params, batch, jax.random.key(0))
    (other, _), _ = step(params, batch, jax.random.key(1))
    assert float(again) == float(loss) and float(other) != float(loss)

    # bfloat16 compute: float32 params and logits, bfloat16 activations.
    half = tiny(dtype=jnp.bfloat16)
    x, labels = var._dummy_inputs(half, 2)
    variables = jax.eval_shape(half.init, jax.random.key(0), x, labels)
    assert {v.dtype for v in jax.tree.leaves(nn.meta.unbox(variables))} == {jnp.dtype(jnp.float32)}
    logits, state = jax.eval_shape(
        lambda v: half.apply(v, x, labels, capture_intermediates=True, mutable=["intermediates"]), variables
    )
    assert logits.dtype == jnp.float32
    block_out = state["intermediates"]["blocks_0"]["__call__"][0][0]
    assert block_out.dtype == jnp.bfloat16


def test_build_registry_and_options():
    model = generators.family("var").build(
        {"arch": "var", "depth": 2, "scales": [1, 2, 3, 4], "vae_dim": CVAE, "dtype": "float32"},
        vocab_size=K, num_classes=5, grid=(4, 4),
    )
    assert (model.embed_dim, model.heads, model.seq_len) == (128, 2, 30)
    assert var.VIDEO is False and generators.family("var") is var
    opts = var.sampler_options({"cfg_scale": 2.5, "top_k": 900, "top_p": 0.96, "per_class": 2})
    assert isinstance(opts, var.SamplerOptions) and opts.top_k == 900 and opts.cfg_schedule == "linear"
    hash(opts)
    with pytest.raises(ValueError, match="'var'"):
        var.sampler_options({"num_steps": 8})
    with pytest.raises(ValueError, match="unknown VAR config keys"):
        var.build({"depht": 16}, vocab_size=K, num_classes=5, grid=(16, 16))


def _one_sentence_error(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".") and not re.search(r"[.;:] [A-Z]", msg), msg


def test_bad_input_is_one_clear_sentence():
    model = tiny()
    params = random_params(model)
    q, variables = quantizer(4)
    vq = variables["params"]
    codec = var.ScaleCodec.from_quantizer(q)
    run = functools.partial(var.sample, model, params, rng=jax.random.key(0), vq_params=vq, codec=codec)
    for labels in ([0, 6], [-1, 2]):
        _one_sentence_error(r"class ids must lie in \[0, 5\)", run, np.array(labels))
    _one_sentence_error("top_k=25 is larger than the vocabulary of 24", run, np.array([0]),
                        opts=var.SamplerOptions(top_k=25))
    _one_sentence_error("last scale of .* is 4 but the tokenizer's token grid is", var.build, {"scales": (1, 2, 3, 4)},
                        vocab_size=K, num_classes=5, grid=(8, 8))
    _one_sentence_error("must end with the largest map", var.build, {"scales": (1, 4, 2)}, vocab_size=K,
                        num_classes=5, grid=(2, 2))
    _one_sentence_error("needs the tokenizer quantizer's params", var.sample, model, params, np.array([0]),
                        jax.random.key(0))
    _one_sentence_error(r"lacks \['phi_0'", run, np.array([0]), vq_params={"codebook": vq["codebook"]})
    _one_sentence_error("scales", run, np.array([0]), codec=var.ScaleCodec((1, 2, 4)))
    no_input = {"tokens": jnp.zeros((1, 30), jnp.int32), "label": jnp.zeros((1,), jnp.int32)}
    _one_sentence_error(r"batch\['x_input'\]", var.loss_fn, model, params, no_input, jax.random.key(0))
