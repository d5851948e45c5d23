"""ResidualQuantizer and MultiScaleResidualQuantizer (VAR): shapes, refinement, resampling, sharding."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vqgen import parallel
from vqgen.quantizers.multiscale import (
    MultiScaleResidualQuantizer,
    area_matrix,
    bicubic_matrix,
    resize_with,
)
from vqgen.quantizers.residual import ResidualQuantizer

K, D = 16, 4

FACTORIES = {
    "rq": lambda: ResidualQuantizer(num_levels=3, codebook_size=K),
    "rq_shared_ema": lambda: ResidualQuantizer(num_levels=3, codebook_size=K, shared_codebook=True, use_ema=True),
    "msrq": lambda: MultiScaleResidualQuantizer(K, scales=(1, 2, 3, 4)),
}


def _z(shape=(2, 4, 4, D), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@functools.lru_cache(maxsize=None)
def _init(name, shape=(2, 4, 4, D)):
    """Variables of ``FACTORIES[name]`` for a float32 ``z`` of ``shape`` (cached: init compiles)."""
    return jax.jit(FACTORIES[name]().init)(jax.random.key(0), _z(shape))


def _zero_code_0(tree):
    """Sets row 0 of every ``codebook`` leaf to the zero vector."""
    tree = nn.meta.unbox(tree)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0].set(0.0) if getattr(path[-1], "key", None) == "codebook" else x, tree
    )


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_dtypes_jit_and_decode(name, dtype):
    q = FACTORIES[name]()
    z = _z().astype(dtype)
    variables = _init(name)
    out = q.apply(variables, z)
    chex.assert_shape(out.quantized, z.shape)
    chex.assert_type(out.quantized, dtype)
    chex.assert_shape(out.loss, ())
    chex.assert_type(out.loss, jnp.float32)
    assert {"usage", "perplexity", "codebook_loss", "commitment_loss"} <= set(out.metrics)
    for v in out.metrics.values():
        chex.assert_shape(v, ())
        chex.assert_type(v, jnp.float32)
    if name == "msrq":
        assert isinstance(out.indices, tuple) and len(out.indices) == 4
        for s, idx in zip((1, 2, 3, 4), out.indices):
            chex.assert_shape(idx, (2, s, s))
            chex.assert_type(idx, jnp.int32)
    else:
        chex.assert_shape(out.indices, z.shape[:-1] + (3,))
        chex.assert_type(out.indices, jnp.int32)
    for idx in jax.tree.leaves(out.indices):
        assert int(idx.min()) >= 0 and int(idx.max()) < K

    if dtype == jnp.float32:  # one compile per quantizer is enough to compare jit and eager
        jitted = jax.jit(lambda v, x: q.apply(v, x))(variables, z)
        chex.assert_trees_all_close(jitted, out, atol=1e-5, rtol=1e-5)

    decoded = q.apply(variables, out.indices, method="decode_indices")
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(decoded.astype(dtype), np.float32), np.asarray(out.quantized, np.float32), atol=tol, rtol=tol
    )


@pytest.mark.parametrize("name", ["rq", "msrq"])
def test_straight_through_gradient(name):
    q = FACTORIES[name]()
    z = _z()
    w = jax.random.normal(jax.random.key(7), z.shape)
    variables = _init(name)
    grad = jax.grad(lambda x: jnp.sum(q.apply(variables, x).quantized * w))(z)
    chex.assert_trees_all_close(grad, w, atol=1e-5)


def _prefix_errors(q, variables, z, indices, num):
    """Mean squared error of decoding only the first k levels/scales (the rest set to the zero code 0)."""
    errors = []
    for k in range(num + 1):
        if isinstance(indices, tuple):
            idx = tuple(i if n < k else jnp.zeros_like(i) for n, i in enumerate(indices))
        else:
            idx = indices.at[..., k:].set(0)
        rec = q.apply(variables, idx, method="decode_indices")
        errors.append(float(jnp.mean(jnp.square(rec - z))))
    return np.asarray(errors)


@pytest.mark.parametrize("name", ["rq", "rq_shared_ema"])
def test_rq_error_does_not_increase_with_levels(name):
    # With the zero vector in every codebook, the greedy step never does worse than adding 0.
    q = FACTORIES[name]()
    z = _z()
    variables = _zero_code_0(_init(name))
    out = q.apply(variables, z)
    errors = _prefix_errors(q, variables, z, out.indices, 3)
    assert np.all(np.diff(errors) <= 1e-6), errors
    assert errors[-1] < 0.9 * errors[0], errors
    np.testing.assert_allclose(errors[-1], float(jnp.mean(jnp.square(out.quantized - z))), rtol=1e-5)


def test_msrq_error_does_not_increase_with_scales():
    # A map that is constant per sample stays constant under area down-sampling and bicubic
    # up-sampling, so with Φ = identity (phi_ratio=0) each scale is a greedy VQ step on the same
    # vector; with the zero code available the error can only go down.
    scales = (1, 2, 3, 4)
    q = MultiScaleResidualQuantizer(K, scales=scales, phi_ratio=0.0)
    v = jax.random.normal(jax.random.key(4), (2, 1, 1, D))
    z = jnp.broadcast_to(v, (2, 4, 4, D))
    variables = _zero_code_0(jax.jit(q.init)(jax.random.key(0), z))
    out = q.apply(variables, z)
    errors = _prefix_errors(q, variables, z, out.indices, len(scales))
    assert np.all(np.diff(errors) <= 1e-6), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_msrq_loss_matches_var_formula():
    # VAR: loss = mean over scales k of mse(f_hat_k, sg z) + beta * mse(sg f_hat_k, z), with f_hat_k
    # the running sum after scale k. With code 0 = 0 (and Φ's zero-initialised bias, Φ(0) = 0)
    # f_hat_k is the decode of the first k maps with the later maps set to code 0.
    q = FACTORIES["msrq"]()
    z = _z()
    variables = _zero_code_0(_init("msrq"))
    out = q.apply(variables, z)
    errors = _prefix_errors(q, variables, z, out.indices, 4)[1:]  # mse(f_hat_k, z), k = 1..4
    np.testing.assert_allclose(out.metrics["codebook_loss"], errors.mean(), rtol=1e-5)
    np.testing.assert_allclose(out.metrics["commitment_loss"], errors.mean(), rtol=1e-5)
    np.testing.assert_allclose(out.loss, 1.25 * errors.mean(), rtol=1e-5)
    np.testing.assert_allclose(errors[-1], float(jnp.mean(jnp.square(out.quantized - z))), rtol=1e-5)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 13])
def test_resampling_matches_torch_interpolate(size):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = np.random.RandomState(size).randn(2, 3, 16, 16).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=(size, size), mode="area").numpy()
    m = area_matrix(size, 16)
    np.testing.assert_allclose(np.einsum("ih,jw,bchw->bcij", m, m, x), ref, atol=1e-5)
    small = np.ascontiguousarray(x[:, :, :size, :size])
    ref = F.interpolate(torch.from_numpy(small), size=(16, 16), mode="bicubic", align_corners=False).numpy()
    m = bicubic_matrix(16, size)
    np.testing.assert_allclose(np.einsum("ih,jw,bchw->bcij", m, m, small), ref, atol=1e-5)
    if size == 3:  # the jnp helper applies the matrices to channels-last maps
        got = resize_with(m, jnp.asarray(small.transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref, atol=1e-5)


def test_msrq_default_var_schedule_and_phi_sharing():
    # Shapes only (jax.eval_shape compiles nothing): the default schedule is VAR's, with 4 Φs.
    q = MultiScaleResidualQuantizer(K)
    z = jax.ShapeDtypeStruct((1, 16, 16, D), jnp.float32)
    variables = jax.eval_shape(q.init, jax.random.key(0), z)
    params = nn.meta.unbox(variables)["params"]
    assert sorted(k for k in params if k.startswith("phi_")) == ["phi_0", "phi_1", "phi_2", "phi_3"]
    chex.assert_shape(params["phi_0"]["conv"]["kernel"], (3, 3, D, D))
    out = jax.eval_shape(q.apply, variables, z)
    assert [i.shape[1:] for i in out.indices] == [(s, s) for s in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)]

    def phi_names(**kw):
        m = MultiScaleResidualQuantizer(K, scales=(1, 2, 3, 4), **kw)
        p = nn.meta.unbox(jax.eval_shape(m.init, jax.random.key(0), _z()))["params"]
        return sorted(k for k in p if k.startswith("phi"))

    assert phi_names(phi_share=1) == ["phi_0"]
    assert phi_names(phi_share=0) == ["phi_0", "phi_1", "phi_2", "phi_3"]
    assert phi_names(phi_share=2) == ["phi_0", "phi_1"]
    assert phi_names(phi_ratio=0.0) == []


def test_bad_input_raises():
    q = MultiScaleResidualQuantizer(K)
    with pytest.raises(ValueError, match="scales"):
        q.init(jax.random.key(0), _z((1, 8, 8, D)))
    rq = FACTORIES["rq"]()
    variables = _init("rq")
    with pytest.raises(ValueError, match="D=4"):
        rq.apply(variables, _z((2, 3)))
    with pytest.raises(ValueError, match="num_levels=3"):
        rq.apply(variables, jnp.zeros((2, 2), jnp.int32), method="decode_indices")


@pytest.mark.parametrize("name", ["rq_shared_ema", "msrq"])
def test_sharded_batch_matches_single_device(name):
    q = FACTORIES[name]()
    z = _z((8, 4, 4, D))
    variables = _init(name)  # parameter shapes do not depend on the batch
    mutable = ["quantizer_state"] if "quantizer_state" in variables else False

    def fn(v, x):
        return q.apply(v, x, train=True, mutable=mutable)

    expected = jax.jit(fn)(variables, z)
    mesh = parallel.create_mesh((2, 4, 1))
    with parallel.mesh_context(mesh):
        replicated = jax.device_put(variables, NamedSharding(mesh, P()))
        z_sharded = parallel.shard_batch(z, mesh)
        got = jax.jit(fn)(replicated, z_sharded)
    exp_out, got_out = (expected[0], got[0]) if mutable else (expected, got)
    chex.assert_trees_all_equal(got_out.indices, exp_out.indices)
    chex.assert_trees_all_close(got_out.quantized, exp_out.quantized, atol=1e-5)
    chex.assert_trees_all_close(got_out.loss, exp_out.loss, rtol=1e-5)
    for key in ("usage", "perplexity"):
        chex.assert_trees_all_close(got_out.metrics[key], exp_out.metrics[key], rtol=1e-5)
    chex.assert_trees_all_close(got_out.metrics, exp_out.metrics, rtol=1e-5, atol=1e-6)
    if mutable:
        chex.assert_trees_all_close(nn.meta.unbox(got[1]), nn.meta.unbox(expected[1]), rtol=1e-5, atol=1e-6)
