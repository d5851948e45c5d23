"""Tests of vqgen.modules: RoPE tables, norms, SwiGLU widths, attention with a KV cache."""
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.modules import (
    Attention,
    RMSNorm,
    SwiGLU,
    TransformerBlock,
    apply_rope,
    attention_mask,
    init_cache,
    rope_1d_table,
    rope_2d_table,
    swiglu_hidden_dim,
)


def _randomize(params, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(nn.meta.unbox(params))
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def test_rope_2d_table_matches_llamagen_formula():
    h, w, hd, base, prefix = 3, 5, 16, 10000.0, 2
    cos, sin = rope_2d_table((h, w), hd, base, prefix_len=prefix)
    assert cos.shape == sin.shape == (prefix + h * w, hd // 2)
    # Prefix rows are all-zero in LlamaGen's table (cos = sin = 0).
    np.testing.assert_array_equal(cos[:prefix], 0.0)
    np.testing.assert_array_equal(sin[:prefix], 0.0)
    quarter = hd // 4
    for n in range(h * w):
        row, col = divmod(n, w)
        for pair in range(hd // 2):
            k = pair % quarter
            freq = base ** (-(2 * k) / (hd // 2))
            angle = (row if pair < quarter else col) * freq
            assert cos[prefix + n, pair] == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[prefix + n, pair] == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_scores_depend_only_on_relative_grid_offset():
    hd, grid = 8, (4, 4)
    cos, sin = rope_2d_table(grid, hd)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, hd))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, hd))

    def score(pq, pk):
        rq = apply_rope(q, cos[pq : pq + 1], sin[pq : pq + 1])
        rk = apply_rope(k, cos[pk : pk + 1], sin[pk : pk + 1])
        return float(jnp.sum(rq * rk))

    idx = lambda r, c: r * grid[1] + c  # noqa: E731
    # Same (drow, dcol) = (1, 2) at different absolute places gives the same score.
    assert score(idx(0, 0), idx(1, 2)) == pytest.approx(score(idx(2, 1), idx(3, 3)), abs=1e-5)
    # A different offset gives a different score.
    assert abs(score(idx(0, 0), idx(1, 2)) - score(idx(0, 0), idx(2, 1))) > 1e-4
    # Rotation preserves the norm.
    r = apply_rope(q, cos[5:6], sin[5:6])
    np.testing.assert_allclose(jnp.linalg.norm(r), jnp.linalg.norm(q), rtol=1e-6)


def test_rope_prefix_modes_and_1d_table():
    cos, sin = rope_1d_table(6, 8, prefix_len=1, prefix="identity")
    np.testing.assert_array_equal(cos[0], 1.0)
    np.testing.assert_array_equal(sin[0], 0.0)
    np.testing.assert_allclose(cos[1 + 3, 1], math.cos(3 * 10000 ** (-2 / 8)), rtol=1e-6)
    x = jnp.ones((1, 1, 1, 8))
    zc, zs = rope_2d_table((2, 2), 8, prefix_len=1)
    np.testing.assert_array_equal(apply_rope(x, zc[:1], zs[:1]), 0.0)  # LlamaGen zeroes prefix q/k
    with pytest.raises(ValueError, match="multiple of 4"):
        rope_2d_table((2, 2), 6)
    with pytest.raises(ValueError, match="prefix mode"):
        rope_1d_table(4, 8, prefix="bogus")


def test_swiglu_hidden_widths_follow_llamagen_rule():
    # int(2 * 4 * d / 3) rounded up to a multiple of 256, worked out by hand.
    assert swiglu_hidden_dim(768) == 2048  # 2048
    assert swiglu_hidden_dim(1024) == 2816  # 2730 -> 2816
    assert swiglu_hidden_dim(1280) == 3584  # 3413 -> 3584
    assert swiglu_hidden_dim(1536) == 4096  # 4096
    assert swiglu_hidden_dim(3200) == 8704  # 8533 -> 8704
    assert swiglu_hidden_dim(768, ffn_dim_multiplier=1.5) == 3072  # 3072


def test_rmsnorm_and_swiglu_match_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 3, 16))
    norm = RMSNorm()
    p = jax.jit(lambda k: _randomize(norm.init(k, x), jax.random.key(2)))(jax.random.key(1))
    xn = np.asarray(x, np.float64)
    scale = np.asarray(p["params"]["scale"], np.float64)
    want = xn / np.sqrt(np.mean(xn**2, -1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(jax.jit(norm.apply)(p, x), want, rtol=1e-5, atol=1e-6)

    ffn = SwiGLU(hidden_dim=24)
    fp = jax.jit(lambda k: ffn.init(k, x)["params"])(jax.random.key(3))
    w1, w2, w3 = (np.asarray(nn.meta.unbox(fp)[n]["kernel"], np.float64) for n in ("w1", "w2", "w3"))
    a = xn @ w1
    want = ((a / (1 + np.exp(-a))) * (xn @ w3)) @ w2
    np.testing.assert_allclose(jax.jit(lambda p: ffn.apply({"params": p}, x))(fp), want, rtol=1e-5, atol=1e-6)


def test_attention_mask():
    m = np.asarray(attention_mask(2, 5, 2, causal=True))
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    m = np.asarray(attention_mask(2, 5, 1, causal=False))
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


def test_block_cached_chunks_equal_full_pass_and_gqa_equals_repeated_mha():
    b, s, d, heads, kv = 2, 7, 32, 4, 2
    x = jax.random.normal(jax.random.key(0), (b, s, d))
    cos, sin = rope_1d_table(s, d // heads)
    block = TransformerBlock(num_heads=heads, num_kv_heads=kv, qk_norm=True, hidden_dim=48)
    params = jax.jit(lambda k: _randomize(block.init(k, x, cos, sin)["params"], jax.random.key(2)))(
        jax.random.key(1)
    )
    full, none_cache = jax.jit(lambda p: block.apply({"params": p}, x, cos, sin))(params)
    assert none_cache is None

    @jax.jit
    def cached(p):
        cache = init_cache(b, s + 1, kv, d // heads)
        # Prefill three positions, then one position per step with a traced position.
        o, cache = block.apply({"params": p}, x[:, :3], cos[:3], sin[:3], cache=cache, pos=0)

        def step(pos, carry):
            outs, cache = carry
            xs = jax.lax.dynamic_slice_in_dim(x, pos, 1, axis=1)
            c, sn = (jax.lax.dynamic_slice_in_dim(jnp.asarray(t), pos, 1) for t in (cos, sin))
            o, cache = block.apply({"params": p}, xs, c, sn, cache=cache, pos=pos)
            return jax.lax.dynamic_update_slice_in_dim(outs, o, pos, axis=1), cache

        outs = jnp.zeros_like(x).at[:, :3].set(o)
        return jax.lax.fori_loop(3, s, step, (outs, cache))[0]

    chex.assert_trees_all_close(cached(params), full, atol=1e-5, rtol=1e-5)

    # GQA with kv heads repeated per group equals plain multi-head attention.
    mha = Attention(num_heads=heads)
    attn_p = params["attention"]
    group = heads // kv
    mha_p = {
        "wq": attn_p["wq"],
        "wo": attn_p["wo"],
        "wk": {"kernel": jnp.repeat(attn_p["wk"]["kernel"], group, axis=1)},
        "wv": {"kernel": jnp.repeat(attn_p["wv"]["kernel"], group, axis=1)},
    }
    gqa = Attention(num_heads=heads, num_kv_heads=kv)
    gqa_p = {k: attn_p[k] for k in ("wq", "wk", "wv", "wo")}
    run = jax.jit(lambda mp, gp: (mha.apply({"params": mp}, x, cos, sin)[0], gqa.apply({"params": gp}, x, cos, sin)[0]))
    chex.assert_trees_all_close(*run(mha_p, gqa_p), atol=1e-5)


def test_logical_axes_on_every_parameter_and_dtypes():
    x = jnp.ones((2, 4, 32), jnp.bfloat16)
    cos, sin = rope_1d_table(4, 8)
    block = TransformerBlock(num_heads=4, num_kv_heads=2, qk_norm=True, dtype=jnp.bfloat16)
    variables = jax.jit(lambda k: block.init(k, x, cos, sin))(jax.random.key(0))
    specs = nn.get_partition_spec(variables)["params"]
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]
    named = {"/".join(str(k.key) for k in path): tuple(spec) for path, spec in flat}
    assert named["attention/wq/kernel"] == ("embed", "heads", "kv")
    assert named["attention/wo/kernel"] == ("heads", "kv", "embed")
    assert named["attention/q_norm/scale"] == ("kv",)
    assert named["feed_forward/w1/kernel"] == ("embed", "mlp")
    assert named["feed_forward/w2/kernel"] == ("mlp", "embed")
    assert named["attention_norm/scale"] == ("embed",)
    assert all(len(v) > 0 for v in named.values()), named
    params = nn.meta.unbox(variables["params"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out, _ = jax.jit(lambda p: block.apply({"params": p}, x, cos, sin))(params)
    assert out.dtype == jnp.bfloat16


def test_bad_head_counts():
    x = jnp.ones((1, 2, 12))
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(num_heads=3, num_kv_heads=2).init(jax.random.key(0), x)
