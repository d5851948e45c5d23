"""LookupFreeQuantizer and FiniteScalarQuantizer against brute-force NumPy references."""
import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen import parallel
from vqgen.quantizers.base import usage_metrics
from vqgen.quantizers.fsq import FiniteScalarQuantizer
from vqgen.quantizers.lfq import (
    LookupFreeQuantizer,
    join_factorized_ids,
    sorted_usage_metrics,
    split_factorized_ids,
)

# ---------------------------------------------------------------- NumPy references


def np_entropy(p, axis=-1):
    p = np.asarray(p, np.float64)
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def np_lfq_codes(dim, scale=1.0):
    """[2**dim, dim] code vectors in index order, built from the stated bit weights 2**(D-1-i)."""
    codes = np.empty((2**dim, dim))
    for c in range(2**dim):
        for i in range(dim):
            codes[c, i] = scale if (c // 2 ** (dim - 1 - i)) % 2 else -scale
    return codes


def np_lfq_probs(z, tau, scale=1.0):
    """[T, 2**D] p(c|z) = softmax(-||z - c||^2 / tau) with explicit distances to every code."""
    z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    codes = np_lfq_codes(z.shape[-1], scale)
    logits = -np.sum((z[:, None, :] - codes[None]) ** 2, axis=-1) / tau  # [T, 2**D]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def np_lfq_indices(z):
    z = np.asarray(z, np.float64)
    flat = z.reshape(-1, z.shape[-1])
    ids = [int("".join("1" if v > 0 else "0" for v in row), 2) for row in flat]
    return np.asarray(ids).reshape(z.shape[:-1])


def np_lfq_indices_lsb(z):
    """Open-MAGVIT2 order: channel d has weight 2**d."""
    z = np.asarray(z, np.float64)
    ids = np.zeros(z.shape[:-1], np.int64)
    for d in range(z.shape[-1]):
        ids += np.where(z[..., d] > 0, 2**d, 0)
    return ids


def np_official_lfq_entropies(z, tau, eps, groups=1):
    """Official Open-MAGVIT2 entropy terms over all 2**D codes +-1, in float64.

    ``logits = 2 z . c``; ``p = softmax(logits / tau)``; per-sample ``-sum p log_softmax(logits / tau
    + eps)``; codebook ``-sum pbar log(pbar + eps)``. With ``groups > 1`` the codebook term is
    the sum of that smoothed entropy over each contiguous channel group's marginal.
    """
    z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    dim = z.shape[-1]
    codes = np_lfq_codes(dim)  # any numbering: the entropies do not depend on it
    x = 2.0 * z @ codes.T / tau + eps  # [T, 2**D]
    log_p = x - x.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    per_sample = np.mean(-np.sum(p * log_p, axis=1))
    p_bits = p.reshape((-1,) + (2,) * dim)  # bit axes, channel 0 first
    k = dim // groups
    codebook = 0.0
    for g in range(groups):
        others = tuple(1 + i for i in range(dim) if not g * k <= i < (g + 1) * k)
        avg = p_bits.sum(axis=others).reshape(p.shape[0], 2**k).mean(axis=0)
        codebook += -np.sum(avg * np.log(avg + eps))
    return per_sample, codebook


def np_fsq_bound(z, levels, eps=1e-3):
    levels = np.asarray(levels, np.float64)
    half_l = (levels - 1) * (1 - eps) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    shift = np.tan(offset / half_l)  # as in the official google-research fsq code
    return np.tanh(np.asarray(z, np.float64) + shift) * half_l - offset, half_l, offset, shift


def np_fsq_indices(z, levels):
    bounded, *_ = np_fsq_bound(z, levels)
    digits = np.round(bounded).astype(np.int64) + np.asarray(levels) // 2  # [..., D]
    out = np.zeros(digits.shape[:-1], np.int64)
    place = 1
    for i, level in enumerate(levels):  # first channel least significant
        out += digits[..., i] * place
        place *= level
    return out


def eager_apply(q, z):
    return q.apply({}, z)


def apply(q, z):
    """Jitted call (one compile per quantizer config and shape; eager dispatch is slow on CPU)."""
    return jax.jit(eager_apply, static_argnums=0)(q, z)


def decode(q, idx):
    return jax.jit(lambda idx: q.apply({}, idx, method="decode_indices"))(idx)


QUANTIZERS = {
    "lfq": lambda: LookupFreeQuantizer(dim=6, num_groups=2, entropy_temperature=0.5),
    "fsq": lambda: FiniteScalarQuantizer(levels=(8, 5, 5, 3)),
}

# ---------------------------------------------------------------- both quantizers


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_jit_decode(name, dtype):
    q = QUANTIZERS[name]()
    dim = 6 if name == "lfq" else 4
    z = (jax.random.normal(jax.random.key(0), (2, 3, 4, dim)) * 1.5).astype(dtype)
    eager = eager_apply(q, z)
    jitted = apply(q, z)

    chex.assert_shape(eager.quantized, z.shape)
    chex.assert_type(eager.quantized, dtype)
    chex.assert_shape(eager.indices, z.shape[:-1])
    chex.assert_type(eager.indices, jnp.int32)
    chex.assert_shape(eager.loss, ())
    chex.assert_type(eager.loss, jnp.float32)
    for k, v in eager.metrics.items():
        chex.assert_shape(v, (), custom_message=k)
        chex.assert_type(v, jnp.float32, custom_message=k)
    assert {"usage", "perplexity"} <= set(eager.metrics)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)

    idx = np.asarray(eager.indices)
    assert idx.min() >= 0 and idx.max() < q.codebook_size
    decoded = decode(q, eager.indices)
    chex.assert_shape(decoded, z.shape)
    np.testing.assert_array_equal(np.asarray(decoded.astype(dtype), np.float32), np.asarray(eager.quantized, np.float32))


def test_lfq_straight_through_gradient_is_identity():
    q = LookupFreeQuantizer(dim=5)
    z = jax.random.normal(jax.random.key(1), (3, 4, 5))
    w = jax.random.normal(jax.random.key(2), (3, 4, 5))
    grad = jax.jit(jax.grad(lambda z: jnp.sum(eager_apply(q, z).quantized * w)))(z)
    chex.assert_trees_all_close(grad, w, atol=1e-6)


def test_fsq_straight_through_gradient():
    """The round is straight-through, the tanh bound is differentiated normally.

    So d quantized / dz = bound'(z) / half_width = (1 - tanh(z + shift)^2) * half_l / half_width,
    computed here in NumPy from the formula (not from the implementation).
    """
    levels = (8, 5, 5, 3)
    q = FiniteScalarQuantizer(levels=levels)
    z = jax.random.normal(jax.random.key(3), (6, 4))
    w = jax.random.normal(jax.random.key(4), (6, 4))
    grad = jax.jit(jax.grad(lambda z: jnp.sum(eager_apply(q, z).quantized * w)))(z)
    _, half_l, _, shift = np_fsq_bound(z, levels)
    dbound = (1 - np.tanh(np.asarray(z, np.float64) + shift) ** 2) * half_l
    expected = np.asarray(w) * dbound / (np.asarray(levels) // 2)
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-6)
    # A round without straight-through would give zero gradient; the expected one is far from it.
    assert np.min(np.abs(dbound)) > 0.05


# ---------------------------------------------------------------- LFQ


def test_lfq_indices_follow_bit_order():
    q = LookupFreeQuantizer(dim=7)
    z = jax.random.normal(jax.random.key(5), (4, 9, 7))
    out = apply(q, z)
    np.testing.assert_array_equal(np.asarray(out.indices), np_lfq_indices(z))
    np.testing.assert_array_equal(np.asarray(out.quantized), np.where(np.asarray(z) > 0, 1.0, -1.0))
    # decode_indices(arange) lists the codes in the same order as the brute-force codebook.
    np.testing.assert_array_equal(np.asarray(decode(q, jnp.arange(2**7))), np_lfq_codes(7))


@pytest.mark.parametrize("bit_order", ["msb", "lsb"])
def test_lfq_bit_order_indices_and_decode(bit_order):
    dim = 7
    q = LookupFreeQuantizer(dim=dim, bit_order=bit_order)
    z = jax.random.normal(jax.random.key(15), (4, 9, dim))
    out = apply(q, z)
    want = np_lfq_indices(z) if bit_order == "msb" else np_lfq_indices_lsb(z)
    np.testing.assert_array_equal(np.asarray(out.indices), want)
    np.testing.assert_array_equal(np.asarray(decode(q, out.indices)), np.asarray(out.quantized))
    # Code id c has channel d set iff bit d of c is set ('lsb'), or bit dim-1-d ('msb').
    codes = np.asarray(decode(q, jnp.arange(2**dim)))
    ids = np.arange(2**dim)[:, None]
    shifts = np.arange(dim) if bit_order == "lsb" else np.arange(dim)[::-1]
    np.testing.assert_array_equal(codes, np.where((ids >> shifts) & 1, 1.0, -1.0))
    if bit_order == "lsb":
        assert int(apply(q, jnp.asarray([[1.0] + [-1.0] * (dim - 1)])).indices[0]) == 1


@pytest.mark.parametrize(
    "dim,groups,eps,bit_order",
    [(1, 1, 1e-5, "msb"), (4, 1, 1e-5, "lsb"), (6, 1, 1e-5, "msb"), (6, 1, 1e-2, "lsb"), (6, 2, 1e-3, "lsb"),
     (6, 1, 0.0, "msb")],
)
def test_lfq_entropy_eps_matches_official_formula(dim, groups, eps, bit_order):
    tau, gamma, we, wc = 0.5, 0.7, 0.1, 0.25
    z = jax.random.normal(jax.random.key(20 + dim), (3, 9, dim)) * 0.8
    q = LookupFreeQuantizer(
        dim=dim, num_groups=groups, entropy_temperature=tau, codebook_entropy_weight=gamma,
        entropy_loss_weight=we, commitment_weight=wc, entropy_eps=eps, bit_order=bit_order,
    )
    out = apply(q, z)
    ps, cb = np_official_lfq_entropies(z, tau, eps, groups)
    np.testing.assert_allclose(out.metrics["per_sample_entropy"], ps, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.metrics["codebook_entropy"], cb, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.metrics["entropy_loss"], ps - gamma * cb, rtol=2e-5, atol=1e-6)
    commit = np.mean((np.asarray(z, np.float64) - np.where(np.asarray(z) > 0, 1.0, -1.0)) ** 2)
    np.testing.assert_allclose(out.loss, we * (ps - gamma * cb) + wc * commit, rtol=2e-5, atol=1e-6)
    _, exact_cb = np_official_lfq_entropies(z, tau, 0.0, groups)
    if eps == 0:
        np.testing.assert_allclose(out.metrics["codebook_entropy"], exact_cb, rtol=2e-5)
    elif dim > 1:  # the smoothing is visible above the tolerance, so the test tells them apart
        assert abs(cb - exact_cb) > 2 * (2e-5 * cb + 1e-6)


@pytest.mark.parametrize(
    "dim,tau,scale,zscale",
    [(1, 1.0, 1.0, 1.0), (6, 1.0, 1.0, 0.7), (6, 0.05, 0.5, 0.1), (4, 0.01, 1.0, 1.0)],
)
def test_lfq_entropies_match_brute_force(dim, tau, scale, zscale):
    z = jax.random.normal(jax.random.key(dim), (5, 5, dim)) * zscale  # 25 tokens: chunks get padded
    p = np_lfq_probs(np.asarray(z), tau, scale)
    want_ps = np_entropy(p).mean()
    want_cb = np_entropy(p.mean(axis=0))
    gamma = 0.7
    # A small chunk forces several scan steps plus padding of the last one.
    for chunk in (1 << 22, 3 * 2**dim):
        q = LookupFreeQuantizer(
            dim=dim, entropy_temperature=tau, codebook_scale=scale, codebook_entropy_weight=gamma, codebook_entropy_chunk=chunk
        )
        m = apply(q, z).metrics
        np.testing.assert_allclose(m["per_sample_entropy"], want_ps, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m["codebook_entropy"], want_cb, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m["entropy_loss"], want_ps - gamma * want_cb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim,groups", [(6, 2), (6, 3), (4, 4)])
def test_lfq_grouped_codebook_entropy_is_sum_of_group_entropies(dim, groups):
    tau = 0.5
    z = jax.random.normal(jax.random.key(7), (2, 10, dim))
    q = LookupFreeQuantizer(dim=dim, num_groups=groups, entropy_temperature=tau)
    m = apply(q, z).metrics
    p = np_lfq_probs(np.asarray(z), tau).reshape((-1,) + (2,) * dim)  # bit axes, channel 0 first
    k = dim // groups
    want = 0.0
    for g in range(groups):
        others = tuple(1 + i for i in range(dim) if not g * k <= i < (g + 1) * k)
        marginal = p.sum(axis=others).reshape(p.shape[0], 2**k)  # [T, 2**k]
        want += np_entropy(marginal.mean(axis=0))
    np.testing.assert_allclose(m["codebook_entropy"], want, rtol=1e-4, atol=1e-5)
    # The per-sample term does not depend on the grouping.
    np.testing.assert_allclose(m["per_sample_entropy"], np_entropy(np_lfq_probs(np.asarray(z), tau)).mean(), rtol=1e-4)


def test_lfq_loss_and_gradient_match_dense_reference():
    """loss and d loss / dz equal a dense jnp version with an explicit [T, 2**D] softmax."""
    dim, tau, gamma, we, wc = 4, 0.3, 0.8, 0.1, 0.25
    z = jax.random.normal(jax.random.key(8), (3, 7, dim))
    codes = jnp.asarray(np_lfq_codes(dim), jnp.float32)

    def dense_loss(z):
        flat = z.reshape(-1, dim)
        d = jnp.sum((flat[:, None, :] - codes[None]) ** 2, axis=-1)  # [T, 2**D]
        p = jax.nn.softmax(-d / tau, axis=-1)
        h = lambda p: -jnp.sum(p * jnp.log(p + 1e-30), axis=-1)
        ent = jnp.mean(h(p)) - gamma * h(jnp.mean(p, axis=0))
        commit = jnp.mean((z - jax.lax.stop_gradient(jnp.where(z > 0, 1.0, -1.0))) ** 2)
        return we * ent + wc * commit

    q = LookupFreeQuantizer(
        dim=dim, entropy_temperature=tau, codebook_entropy_weight=gamma, entropy_loss_weight=we,
        commitment_weight=wc, codebook_entropy_chunk=2 * 2**dim,
    )
    loss, grad = jax.jit(jax.value_and_grad(lambda z: eager_apply(q, z).loss))(z)
    want_loss, want_grad = jax.jit(jax.value_and_grad(dense_loss))(z)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def hlo_array_shapes(hlo_text):
    """Every array shape ``[d0, d1, ...]`` written in an HLO module's text (tuples flattened)."""
    return [tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"\b[a-z]+[0-9]*\[([0-9]+(?:,[0-9]+)*)\]", hlo_text)]


def test_hlo_array_shapes_sees_a_dense_table():
    """The shape scan below would see a [tokens, 2**D] table if one were compiled."""
    codes = jnp.asarray(np_lfq_codes(10), jnp.float32)
    dense = jax.jit(lambda z: jax.nn.softmax(z @ codes.T, axis=-1).mean(0)).lower(jnp.zeros((300, 10))).compile()
    assert (300, 1024) in hlo_array_shapes(dense.as_text())


def test_lfq_dim18_runs_in_bounded_memory():
    z = jax.random.normal(jax.random.key(9), (8, 16, 16, 18))
    results = {}
    for groups in (2, 1):
        q = LookupFreeQuantizer(dim=18, num_groups=groups)
        def loss_fn(z, q=q):
            out = eager_apply(q, z)
            return out.loss, out.metrics

        compiled = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).lower(z).compile()
        temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
        # A dense [2048, 2**18] float32 table alone would be 2048 MiB.
        assert temp_mib < 256, (groups, temp_mib)
        # No [tokens, 2**18] array (in any layout) in the compiled forward and backward pass: the
        # largest is the chunk of token-code probabilities (16 tokens x 2**18 codes) or the
        # constant [2**18, 18] table of code bits.
        shapes = hlo_array_shapes(compiled.as_text())
        assert shapes and not [s for s in shapes if 2048 in s and 2**18 in s], groups
        assert max(int(np.prod(s)) for s in shapes) <= max(q.codebook_entropy_chunk, 18 * 2**18), groups
        (loss, metrics), grad = compiled(z)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))
        results[groups] = metrics
    exact, grouped = results[1]["codebook_entropy"], results[2]["codebook_entropy"]
    # Subadditivity: joint entropy <= sum of the two halves' entropies <= 18 log 2.
    assert exact <= grouped + 1e-3 <= 18 * np.log(2) + 1e-3
    np.testing.assert_allclose(results[1]["per_sample_entropy"], results[2]["per_sample_entropy"], rtol=1e-6)
    counts = np.bincount(np_lfq_indices(z).ravel(), minlength=2**18)
    np.testing.assert_allclose(results[1]["usage"], np.mean(counts > 0), rtol=1e-6)


def test_sorted_usage_metrics_equal_histogram_metrics():
    idx = jax.random.randint(jax.random.key(10), (6, 50), 0, 40)
    chex.assert_trees_all_close(jax.jit(sorted_usage_metrics, static_argnums=1)(idx, 64), usage_metrics(idx, 64), rtol=1e-6)


def test_lfq_bad_config_raises():
    z = jnp.zeros((2, 6))
    with pytest.raises(ValueError, match="dim=5"):
        apply(LookupFreeQuantizer(dim=5), z)
    with pytest.raises(ValueError, match="num_groups=4"):
        apply(LookupFreeQuantizer(dim=6, num_groups=4), z)
    with pytest.raises(ValueError, match="num_groups"):
        apply(LookupFreeQuantizer(dim=31), jnp.zeros((2, 31)))
    with pytest.raises(ValueError, match="int32"):
        apply(LookupFreeQuantizer(dim=32, num_groups=2), jnp.zeros((2, 32)))
    with pytest.raises(ValueError, match="bit_order"):
        apply(LookupFreeQuantizer(dim=6, bit_order="little"), z)
    with pytest.raises(ValueError, match="entropy_eps"):
        apply(LookupFreeQuantizer(dim=6, entropy_eps=-1e-5), z)
    # Above 18 bits the exact (ungrouped) codebook entropy is refused, naming the groups that work.
    with pytest.raises(ValueError, match=r"2\*\*20 codes per group.*set num_groups=2 "):
        apply(LookupFreeQuantizer(dim=20), jnp.zeros((2, 20)))
    with pytest.raises(ValueError, match="set num_groups=3 "):
        apply(LookupFreeQuantizer(dim=21, num_groups=1), jnp.zeros((2, 21)))
    assert apply(LookupFreeQuantizer(dim=20, num_groups=2), jnp.ones((2, 20))).indices.shape == (2,)


@pytest.mark.parametrize("bit_order", ["msb", "lsb"])
def test_lfq_factorized_ids_follow_bit_order(bit_order):
    """9+9 factorised ids: Open-MAGVIT2's (indices_pre, indices_post) with 'lsb', the same blocks
    of channels numbered high-bit-first with 'msb'; join inverts split; each block decodes to its channels."""
    z = np.asarray(jax.random.normal(jax.random.key(17), (3, 5, 18)))
    ids = apply(LookupFreeQuantizer(dim=18, num_groups=2, bit_order=bit_order), jnp.asarray(z)).indices
    first, second = jax.jit(lambda i: split_factorized_ids(i, 18, (9, 9), bit_order))(ids)
    if bit_order == "lsb":  # Open-MAGVIT2: pre = sum_{d<9} bit_d 2**d, post = sum_{d>=9} bit_d 2**(d-9)
        bits = (z > 0).astype(np.int64)
        want = (bits[..., :9] @ (2 ** np.arange(9)), bits[..., 9:] @ (2 ** np.arange(9)))
    else:
        want = (np_lfq_indices(z[..., :9]), np_lfq_indices(z[..., 9:]))
    np.testing.assert_array_equal(np.asarray(first), want[0])
    np.testing.assert_array_equal(np.asarray(second), want[1])
    np.testing.assert_array_equal(np.asarray(join_factorized_ids((first, second), 18, (9, 9), bit_order)), ids)
    half = LookupFreeQuantizer(dim=9, bit_order=bit_order)
    np.testing.assert_array_equal(np.asarray(decode(half, first)), np.where(z[..., :9] > 0, 1.0, -1.0))
    np.testing.assert_array_equal(np.asarray(decode(half, second)), np.where(z[..., 9:] > 0, 1.0, -1.0))
    # Unequal blocks too: 18 = 4 + 14.
    parts = split_factorized_ids(ids, 18, (4, 14), bit_order)
    np.testing.assert_array_equal(np.asarray(join_factorized_ids(parts, 18, (4, 14), bit_order)), ids)
    with pytest.raises(ValueError, match="add up to the 18 bits"):
        split_factorized_ids(ids, 18, (9, 8), bit_order)


# ---------------------------------------------------------------- FSQ


def test_fsq_indices_match_mixed_radix_brute_force():
    levels = (8, 5, 5, 3)
    q = FiniteScalarQuantizer(levels=levels)
    z = jax.random.normal(jax.random.key(11), (4, 16, 4)) * 2.0
    out = apply(q, z)
    np.testing.assert_array_equal(np.asarray(out.indices), np_fsq_indices(np.asarray(z), levels))
    bounded, *_ = np_fsq_bound(np.asarray(z), levels)
    np.testing.assert_allclose(out.quantized, np.round(bounded) / (np.asarray(levels) // 2), atol=1e-6)
    assert out.loss == 0.0


@pytest.mark.parametrize("levels", [(8, 5, 5, 3), (2, 4, 7), (3,)])
def test_fsq_every_code_is_reachable(levels):
    q = FiniteScalarQuantizer(levels=levels)
    n = int(np.prod(levels))
    codes = np.asarray(decode(q, jnp.arange(n)))  # [n, D]
    assert len({tuple(c) for c in codes}) == n
    assert codes.min() >= -1 and codes.max() <= 1
    # Invert the bound at a point 0.3 inside each integer's rounding cell, toward the range centre.
    levels_np = np.asarray(levels)
    integers = codes * (levels_np // 2)
    _, half_l, offset, shift = np_fsq_bound(np.zeros(len(levels)), levels)
    target = integers + 0.3 * np.sign(-offset - integers)
    z = np.arctanh((target + offset) / half_l) - shift
    out = apply(q, jnp.asarray(z, jnp.float32))
    np.testing.assert_array_equal(np.asarray(out.indices), np.arange(n))
    np.testing.assert_allclose(out.metrics["usage"], 1.0)


def test_fsq_bad_input_raises():
    with pytest.raises(ValueError, match="len\\(levels\\)=4"):
        apply(FiniteScalarQuantizer(levels=(8, 5, 5, 5)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="below 2"):
        apply(FiniteScalarQuantizer(levels=(8, 1)), jnp.zeros((2, 2)))


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_sharded_batch_matches_single_device(name):
    q = QUANTIZERS[name]()
    dim = 6 if name == "lfq" else 4
    z = np.asarray(jax.random.normal(jax.random.key(12), (8, 4, 4, dim)) * 1.5)
    fn = jax.jit(lambda z: eager_apply(q, z))
    want = fn(jnp.asarray(z))
    mesh = parallel.create_mesh((2, 4, 1))
    with parallel.mesh_context(mesh):
        zs = parallel.shard_batch(z, mesh)
        assert len(zs.sharding.device_set) == 8
        got = fn(zs)
    got = jax.device_get(got)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.quantized, want.quantized)
    chex.assert_trees_all_close(got.loss, want.loss, rtol=1e-5)
    assert set(got.metrics) == set(want.metrics)
    chex.assert_trees_all_close(got.metrics, want.metrics, rtol=1e-5, atol=1e-6)
