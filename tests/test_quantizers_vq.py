"""VectorQuantizer and IndexBackpropQuantizer: exact semantics, state updates and sharding."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vqgen import parallel
from vqgen.quantizers.ibq import IndexBackpropQuantizer
from vqgen.quantizers.vq import VectorQuantizer, _score_operands, _scores_are_safe, code_scores, l2_normalize, nearest_code_index, squared_distances

K, D = 16, 8

FACTORIES = {
    "vq": lambda: VectorQuantizer(K),
    "vq_factorised_cosine": lambda: VectorQuantizer(K, code_dim=3, l2_normalize=True),
    "vq_ema_restart_entropy": lambda: VectorQuantizer(
        K, use_ema=True, dead_code_threshold=0.1, entropy_loss_weight=0.1
    ),
    "ibq": lambda: IndexBackpropQuantizer(K, entropy_loss_weight=0.1),
}


def _z(shape=(2, 4, 4, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@functools.lru_cache(maxsize=None)
def _init(name, shape=(2, 4, 4, D)):
    """Variables of ``FACTORIES[name]`` for a float32 ``z`` of ``shape`` (cached: init compiles)."""
    return jax.jit(FACTORIES[name]().init)(jax.random.key(0), _z(shape))


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_jit_and_decode(name, dtype):
    q = FACTORIES[name]()
    z = _z().astype(dtype)
    variables = _init(name)
    out = q.apply(variables, z)
    chex.assert_shape(out.quantized, z.shape)
    chex.assert_type(out.quantized, dtype)
    chex.assert_shape(out.indices, z.shape[:-1])
    chex.assert_type(out.indices, jnp.int32)
    chex.assert_shape(out.loss, ())
    chex.assert_type(out.loss, jnp.float32)
    assert {"usage", "perplexity", "codebook_loss", "commitment_loss"} <= set(out.metrics)
    for v in out.metrics.values():
        chex.assert_shape(v, ())
        chex.assert_type(v, jnp.float32)
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < K

    if dtype == jnp.float32:  # one compile per quantizer is enough to compare jit and eager
        jitted = jax.jit(lambda v, x: q.apply(v, x))(variables, z)
        chex.assert_trees_all_close(jitted, out, atol=1e-5, rtol=1e-5)

    decoded = q.apply(variables, out.indices, method="decode_indices")
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(decoded.astype(dtype), np.float32), np.asarray(out.quantized, np.float32), atol=tol, rtol=tol
    )


def test_vq_straight_through_gradient():
    q = VectorQuantizer(K)
    z = _z()
    w = jax.random.normal(jax.random.key(7), z.shape)
    variables = _init("vq")
    grad = jax.grad(lambda x: jnp.sum(q.apply(variables, x).quantized * w))(z)
    chex.assert_trees_all_close(grad, w, atol=1e-6)


def test_vq_indices_equal_numpy_argmin_and_loss():
    q = VectorQuantizer(K, beta=0.3)
    z = _z()
    variables = _init("vq")
    out = q.apply(variables, z)
    c = np.asarray(nn.meta.unbox(variables)["params"]["codebook"], np.float64)
    zn = np.asarray(z, np.float64).reshape(-1, D)
    dist = ((zn[:, None, :] - c[None]) ** 2).sum(-1)
    idx = dist.argmin(1)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx)
    mse = np.mean((zn - c[idx]) ** 2)
    np.testing.assert_allclose(out.metrics["codebook_loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["commitment_loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(out.loss, mse * 1.3, rtol=1e-5)
    counts = np.bincount(idx, minlength=K)
    p = counts / counts.sum()
    np.testing.assert_allclose(out.metrics["usage"], np.mean(counts > 0), rtol=1e-6)
    np.testing.assert_allclose(
        out.metrics["perplexity"], np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))), rtol=1e-5
    )


def test_vq_cosine_lookup_unit_codes_and_numpy_argmax():
    q = VectorQuantizer(K, l2_normalize=True)
    z = _z() * 3.0
    variables = _init("vq")  # same parameters; only the lookup differs
    codes = q.apply(variables, jnp.arange(K), method="decode_indices")
    np.testing.assert_allclose(np.linalg.norm(np.asarray(codes), axis=-1), 1.0, rtol=1e-5)
    c = np.asarray(nn.meta.unbox(variables)["params"]["codebook"], np.float64)
    zn = np.asarray(z, np.float64).reshape(-1, D)
    cos = (zn / np.linalg.norm(zn, axis=-1, keepdims=True)) @ (c / np.linalg.norm(c, axis=-1, keepdims=True)).T
    np.testing.assert_array_equal(np.asarray(q.apply(variables, z).indices).reshape(-1), cos.argmax(1))


def test_vq_factorised_lookup_is_low_dimensional():
    q = FACTORIES["vq_factorised_cosine"]()
    variables = _init("vq_factorised_cosine")
    params = nn.meta.unbox(variables)["params"]
    chex.assert_shape(params["codebook"], (K, 3))
    chex.assert_shape(params["proj_down"]["kernel"], (D, 3))
    chex.assert_shape(params["proj_up"]["kernel"], (3, D))
    chex.assert_shape(q.apply(variables, jnp.arange(K), method="decode_indices"), (K, D))


def test_vq_loss_zero_on_code_vectors():
    q = VectorQuantizer(K)
    variables = _init("vq")
    codes = q.apply(variables, jnp.arange(K), method="decode_indices")  # [K, D]
    out = q.apply(variables, jnp.concatenate([codes, codes]).reshape(2, 4, 4, D))
    assert float(out.loss) == 0.0
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), np.tile(np.arange(K), 2))


def _clustered_batch(codebook, used, n_per, seed=3):
    """Vectors near the codes ``used`` (so they are assigned to them), ``n_per`` each."""
    rng = np.random.RandomState(seed)
    vecs = np.concatenate([codebook[u][None] + 0.01 * rng.randn(n_per, codebook.shape[1]) for u in used])
    return jnp.asarray(vecs, jnp.float32)


def test_ema_moves_used_codes_toward_assigned_vectors_and_keeps_unused():
    decay, eps = 0.5, 1e-5
    q = VectorQuantizer(8, use_ema=True, ema_decay=decay, ema_epsilon=eps)
    variables = jax.jit(q.init)(jax.random.key(0), _z((4, D)))
    old = np.asarray(nn.meta.unbox(variables)["quantizer_state"]["codebook"], np.float64)
    used = [0, 2, 5]
    z = _clustered_batch(old, used, n_per=3)
    out, state = q.apply(variables, z, train=True, mutable=["quantizer_state"])
    np.testing.assert_array_equal(np.asarray(out.indices), np.repeat(used, 3))
    new = np.asarray(nn.meta.unbox(state)["quantizer_state"]["codebook"], np.float64)
    unused = [k for k in range(8) if k not in used]
    np.testing.assert_array_equal(new[unused], old[unused])
    zn = np.asarray(z, np.float64)
    counts = np.zeros(8)
    for j, u in enumerate(used):
        mean = zn[3 * j : 3 * j + 3].mean(0)
        assert np.linalg.norm(new[u] - mean) < np.linalg.norm(old[u] - mean)
        counts[u] = 3
    # Independent recomputation of the EMA step (counts and sums start at 1 and the codebook).
    ema_count = decay * 1.0 + (1 - decay) * counts
    total = ema_count.sum()
    smoothed = (ema_count + eps) / (total + 8 * eps) * total
    for j, u in enumerate(used):
        ema_sum = decay * old[u] + (1 - decay) * zn[3 * j : 3 * j + 3].sum(0)
        np.testing.assert_allclose(new[u], ema_sum / smoothed[u], rtol=1e-5)
    # Nothing changes without train=True.
    _, state_eval = q.apply(variables, z, train=False, mutable=["quantizer_state"])
    chex.assert_trees_all_equal(nn.meta.unbox(state_eval), nn.meta.unbox({"quantizer_state": variables["quantizer_state"]}))


@pytest.mark.parametrize("use_ema", [True, False])
def test_dead_code_restart_replaces_unused_codes_with_batch_vectors(use_ema):
    q = VectorQuantizer(8, use_ema=use_ema, ema_decay=0.5, dead_code_threshold=0.75)
    variables = jax.jit(q.init)(jax.random.key(0), _z((4, D)))
    old = np.asarray(q.apply(variables, jnp.arange(8), method="decode_indices"), np.float64)
    used = [1, 6]
    z = _clustered_batch(old, used, n_per=4)
    _, state = q.apply(
        variables, z, train=True, mutable=["quantizer_state"], rngs={"codebook": jax.random.key(5)}
    )
    new_vars = {**variables, **state}
    new = np.asarray(q.apply(new_vars, jnp.arange(8), method="decode_indices"), np.float64)
    zn = np.asarray(z, np.float64)
    for k in range(8):
        dist_to_batch = np.abs(zn - new[k][None]).max(-1).min()
        if k in used:
            assert dist_to_batch > 1e-4, f"used code {k} was replaced"
            if not use_ema:
                np.testing.assert_array_equal(new[k], old[k])
        else:
            assert dist_to_batch < 1e-6, f"unused code {k} was not replaced by a batch vector"
    counts = np.asarray(nn.meta.unbox(state)["quantizer_state"]["ema_count"])
    assert np.all(counts >= 0.75)


def test_ibq_gradient_reaches_every_code_but_vq_only_selected():
    z = _z()
    target = jax.random.normal(jax.random.key(9), z.shape)

    def sgd_step(q, name):
        variables = _init(name)
        params = nn.meta.unbox(variables)["params"]

        def loss_fn(p):
            out = q.apply({"params": p}, z, train=True)
            return jnp.mean(jnp.square(out.quantized - target)) + out.loss, out.indices

        grads, idx = jax.grad(loss_fn, has_aux=True)(params)
        new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        changed = np.any(np.asarray(new["codebook"]) != np.asarray(params["codebook"]), axis=-1)
        return changed, np.asarray(idx)

    changed, _ = sgd_step(IndexBackpropQuantizer(K), "ibq")
    assert changed.all(), f"IBQ left codes {np.flatnonzero(~changed)} unchanged"
    changed, idx = sgd_step(VectorQuantizer(K), "vq")
    expected = np.zeros(K, bool)
    expected[np.unique(idx)] = True
    assert len(np.unique(idx)) < K
    np.testing.assert_array_equal(changed, expected)


def test_ibq_loss_matches_official_formula():
    q = IndexBackpropQuantizer(K, beta=0.4)
    z = _z()
    variables = _init("ibq")
    out = q.apply(variables, z)
    c = np.asarray(nn.meta.unbox(variables)["params"]["codebook"], np.float64)
    zn = np.asarray(z, np.float64).reshape(-1, D)
    idx = (zn @ c.T).argmax(1)
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx)
    mse = np.mean((zn - c[idx]) ** 2)
    # Forward values of the three terms coincide: (1 + 1 + beta) * mse.
    np.testing.assert_allclose(out.loss, (2.0 + 0.4) * mse, rtol=1e-5)


def test_wrong_input_dimension_raises():
    q = VectorQuantizer(K)
    with pytest.raises(ValueError, match="D=8"):
        q.apply(_init("vq"), _z((2, 5)))
    ibq = IndexBackpropQuantizer(K)
    variables = _init("ibq")
    with pytest.raises(ValueError, match="D=8"):
        ibq.apply(variables, _z((2, 5)))


@pytest.mark.parametrize("name", ["vq_ema_restart_entropy", "ibq", "vq", "vq_factorised_cosine"])
def test_sharded_batch_matches_single_device(name):
    q = FACTORIES[name]()
    z = _z((8, 4, 4, D))
    variables = _init(name)  # parameter shapes do not depend on the batch
    mutable = ["quantizer_state"] if "quantizer_state" in variables else False

    def fn(v, x):
        return q.apply(v, x, train=True, mutable=mutable, rngs={"codebook": jax.random.key(2)})

    expected = jax.jit(fn)(variables, z)
    mesh = parallel.create_mesh((2, 4, 1))
    with parallel.mesh_context(mesh):
        replicated = jax.device_put(variables, NamedSharding(mesh, P()))
        z_sharded = parallel.shard_batch(z, mesh)
        got = jax.jit(fn)(replicated, z_sharded)
    assert len(z_sharded.sharding.device_set) == 8
    exp_out, got_out = (expected[0], got[0]) if mutable else (expected, got)
    np.testing.assert_array_equal(np.asarray(got_out.indices), np.asarray(exp_out.indices))
    chex.assert_trees_all_close(got_out.quantized, exp_out.quantized, atol=1e-5)
    chex.assert_trees_all_close(got_out.loss, exp_out.loss, rtol=1e-5)
    for key in ("usage", "perplexity"):
        chex.assert_trees_all_close(got_out.metrics[key], exp_out.metrics[key], rtol=1e-5)
    chex.assert_trees_all_close(got_out.metrics, exp_out.metrics, rtol=1e-5, atol=1e-6)
    if mutable:
        chex.assert_trees_all_close(nn.meta.unbox(got[1]), nn.meta.unbox(expected[1]), rtol=1e-5, atol=1e-6)


def _tied_search_inputs(n, k, d, block, seed, cosine):
    """Random rows and codes with exact ties: duplicated codes inside one block and across blocks,
    rows equal to a duplicated code, and a cluster of rows that all pick one block."""
    rng = np.random.RandomState(seed)
    codes = rng.randn(k, d).astype(np.float32)
    dup_pairs = [(1, 2), (3, block + 5), (7, k - 1), (block - 1, block)]  # same block, across blocks, last code
    for a, b in dup_pairs:
        codes[b] = codes[a]
    x = rng.randn(n, d).astype(np.float32)
    for i, (a, _) in enumerate(dup_pairs):
        x[i] = codes[a]  # the nearest code is tied: the first copy must win
    x[len(dup_pairs):len(dup_pairs) + n // 2] = codes[block + 5] + 1e-3 * rng.randn(n // 2, d)  # one block, many rows
    x, codes = jnp.asarray(x), jnp.asarray(codes)
    if cosine:
        x, codes = l2_normalize(x), l2_normalize(codes)
    return x, codes


@pytest.mark.parametrize("n,k,d,block", [(300, 1000, 8, 128), (200, 512, 8, 128), (150, 700, 3, 256), (130, 333, 96, 64)])
@pytest.mark.parametrize("cosine", [False, True])
def test_blocked_search_equals_full_search(n, k, d, block, cosine):
    x, codes = _tied_search_inputs(n, k, d, block, seed=n + k, cosine=cosine)
    search = jax.jit(nearest_code_index, static_argnames="block_size")
    got = np.asarray(search(x, codes, block_size=block))
    full = np.asarray(jnp.argmax(code_scores(x, codes), axis=-1))
    np.testing.assert_array_equal(got, full)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got[:4], [1, 3, 7, block - 1])  # ties go to the first index
    # The same codes as the distance matrix gives (on these inputs no two distances are within rounding).
    np.testing.assert_array_equal(got, np.asarray(jnp.argmin(squared_distances(x, codes), axis=-1)))
    # Any block size gives the same answer, one block included.
    for other in (1, 7, k):
        np.testing.assert_array_equal(np.asarray(search(x, codes, block_size=other)), full)


def test_blocked_search_non_finite_inputs_follow_argmax():
    rng = np.random.RandomState(0)
    x = rng.randn(40, 8).astype(np.float32)
    codes = rng.randn(300, 8).astype(np.float32)
    x[3, 1] = np.nan  # this row's scores are all NaN: index 0
    x[5, 2] = np.inf  # inf scores, and NaN where a code's entry is 0 or of the other sign
    codes[200, 4] = np.nan  # a NaN code wins every other row
    codes[10] = 3e19  # a score too large for float32 sums
    x, codes = jnp.asarray(x), jnp.asarray(codes)
    got = jax.jit(nearest_code_index, static_argnames="block_size")(x, codes, block_size=64)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(code_scores(x, codes), axis=-1)))
    assert int(got[3]) == 0 and int(got[0]) == 200
    huge = jnp.asarray(rng.randn(40, 8).astype(np.float32)) * 1e19  # finite but may overflow: the careful scan
    got = jax.jit(nearest_code_index)(huge, codes.at[200, 4].set(0.0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(code_scores(huge, codes.at[200, 4].set(0.0)), -1)))


@pytest.mark.parametrize("d", [8, 96])
def test_blocked_search_takes_the_fast_path_only_on_safe_inputs(d):
    x = jax.random.normal(jax.random.key(0), (64, d)) * 100.0
    codes = jax.random.normal(jax.random.key(1), (50, d)) * 100.0
    assert bool(_scores_are_safe(*_score_operands(x, codes)))
    assert bool(_scores_are_safe(*_score_operands(l2_normalize(x), l2_normalize(codes))))
    for bad in (x.at[0, 0].set(jnp.nan), x.at[1, 1].set(-jnp.inf), x * 1e34):
        assert not bool(_scores_are_safe(*_score_operands(bad, codes)))
    assert not bool(_scores_are_safe(*_score_operands(x, codes.at[3, 0].set(jnp.nan))))


def test_blocked_search_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size=0"):
        nearest_code_index(jnp.zeros((2, 3)), jnp.zeros((4, 3)), block_size=0)


@pytest.mark.parametrize("l2", [False, True])
def test_vq_loss_and_gradients_equal_full_distance_lookup(l2):
    """The blocked lookup changes nothing downstream: loss, metrics and both gradients equal those
    of a lookup through the full distance matrix (argmin of squared_distances)."""
    k, d = 700, 8
    q = VectorQuantizer(k, l2_normalize=l2, beta=0.3)
    z = _z((4, 8, 8, d), seed=4)
    w = jax.random.normal(jax.random.key(8), z.shape)
    params = nn.meta.unbox(jax.jit(q.init)(jax.random.key(0), z))["params"]

    def reference(p, x):
        codebook = l2_normalize(p["codebook"]) if l2 else p["codebook"]
        flat = (l2_normalize(x) if l2 else x).reshape(-1, d)
        idx = jnp.argmin(squared_distances(flat, codebook), axis=-1)
        codes = jnp.take(codebook, idx, axis=0)
        loss = jnp.mean(jnp.square(jax.lax.stop_gradient(flat) - codes)) + 0.3 * jnp.mean(
            jnp.square(flat - jax.lax.stop_gradient(codes)))
        quantized = (flat + jax.lax.stop_gradient(codes - flat)).reshape(x.shape)
        return loss + jnp.sum(quantized * w), idx

    def module(p, x):
        out = q.apply({"params": p}, x, train=True)
        return out.loss + jnp.sum(out.quantized * w), out.indices.reshape(-1)

    (v_ref, idx_ref), g_ref = jax.jit(jax.value_and_grad(reference, argnums=(0, 1), has_aux=True))(params, z)
    (v_mod, idx_mod), g_mod = jax.jit(jax.value_and_grad(module, argnums=(0, 1), has_aux=True))(params, z)
    np.testing.assert_array_equal(np.asarray(idx_mod), np.asarray(idx_ref))
    np.testing.assert_allclose(float(v_mod), float(v_ref), rtol=1e-6)
    chex.assert_trees_all_close(g_mod, g_ref, rtol=1e-6, atol=1e-7)
