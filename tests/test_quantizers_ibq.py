"""IndexBackpropQuantizer against a float64 NumPy reference of the official IBQ formula.

The official quantizer (TencentARC/SEED-Voken ``IndexPropagationQuantize``) computes, with
``logits = z · Cᵀ``, ``soft = softmax(logits)`` and ``hard = one_hot(argmax logits)``,
``quantized = (hard - sg(soft) + soft) @ C``. Its forward value is ``C[index]``; its backward
pass gives the codebook ``hardᵀ · g`` directly (``g = dL/dquantized``) plus the softmax path
through the logits, and gives ``z`` only the softmax path. The reference below writes those
gradients out by hand, so it does not share any code with the module.
"""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.quantizers.ibq import IndexBackpropQuantizer

K, D = 16, 8


def np_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def np_softmax_vjp(p, dp):
    """Cotangent of the logits of ``p = softmax(logits)`` (last axis) given ``dp``."""
    return p * (dp - np.sum(p * dp, axis=-1, keepdims=True))


def np_ibq_reference(z, c, w, beta, ent_weight=0.0, gamma=1.0, tau=1.0, eps=0.0):
    """Official IBQ in float64: forward values and d/dz, d/dC of ``sum(q * w) + loss``.

    ``loss = mean((q - z)²) + mean((sg(C[i]) - z)²) + beta * mean((C[i] - sg(z))²)
    + ent_weight * (per_sample_entropy - gamma * codebook_entropy)`` of ``softmax(logits / tau)``
    with ``codebook_entropy = -Σ p̄ log(p̄ + eps)`` (``eps = 0``: the exact entropy).
    """
    z = np.asarray(z, np.float64)
    c = np.asarray(c, np.float64)
    w = np.asarray(w, np.float64).reshape(-1, c.shape[1])
    flat = z.reshape(-1, c.shape[1])  # [N, D]
    n, d = flat.shape
    logits = flat @ c.T  # [N, K]
    soft = np_softmax(logits)
    idx = logits.argmax(axis=1)
    hard = np.eye(c.shape[0])[idx]  # [N, K]
    q = hard @ c  # forward value of (hard - sg(soft) + soft) @ C

    mse = lambda a: np.mean(a**2)
    double_quant = mse(q - flat)
    commitment = mse(c[idx] - flat)
    codebook = mse(c[idx] - flat)
    loss = double_quant + commitment + beta * codebook

    # Backward. g: cotangent of q from sum(q * w) and the double-quant term.
    g = w + 2.0 * (q - flat) / (n * d)  # [N, D]
    dz = -2.0 * (q - flat) / (n * d) + 2.0 * (flat - c[idx]) / (n * d)
    dc = hard.T @ g  # the matmul's coefficient has the value of hard
    np.add.at(dc, idx, beta * 2.0 * (c[idx] - flat) / (n * d))
    dlogits = np_softmax_vjp(soft, g @ c.T)  # the soft path: d coefficient = g · Cᵀ

    metrics = {}
    if ent_weight > 0:
        p = np_softmax(logits / tau)
        log_p = np.log(p)
        per_sample = np.mean(-np.sum(p * log_p, axis=1))
        avg = p.mean(axis=0)
        cb = -np.sum(avg * np.log(avg + eps))
        loss += ent_weight * (per_sample - gamma * cb)
        dp = ent_weight * (-(log_p + 1.0) / n + gamma * (np.log(avg + eps) + avg / (avg + eps)) / n)
        dlogits = dlogits + np_softmax_vjp(p, dp) / tau
        metrics = {"per_sample_entropy": per_sample, "codebook_entropy": cb}
    dz = dz + dlogits @ c
    dc = dc + dlogits.T @ flat
    return {
        "quantized": q.reshape(z.shape), "indices": idx.reshape(z.shape[:-1]), "loss": loss,
        "dz": dz.reshape(z.shape), "dc": dc, "metrics": metrics,
    }


def _inputs(seed=0, shape=(2, 3, 4, D), code_scale=0.5):
    kz, kc, kw = jax.random.split(jax.random.key(seed), 3)
    z = jax.random.normal(kz, shape, jnp.float32)
    # A codebook spread enough that the softmax is far from uniform: every gradient term matters.
    c = jax.random.normal(kc, (K, shape[-1]), jnp.float32) * code_scale
    w = jax.random.normal(kw, shape, jnp.float32)
    return z, c, w


def _module_value_and_grads(q, z, c, w):
    def loss_fn(z, c):
        out = q.apply({"params": {"codebook": c}}, z, train=True)
        return jnp.sum(out.quantized * w) + out.loss, out

    (_, out), (dz, dc) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(z, c)
    return out, dz, dc


CASES = {
    "plain": dict(beta=0.25),
    "beta_entropy": dict(beta=0.4, entropy_loss_weight=0.1, codebook_entropy_weight=0.7, entropy_temperature=0.5),
    "entropy_eps": dict(
        beta=0.4, entropy_loss_weight=0.1, codebook_entropy_weight=0.7, entropy_temperature=0.5, entropy_eps=1e-5
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ibq_forward_and_gradients_match_official_formula(case):
    kw = CASES[case]
    q = IndexBackpropQuantizer(K, **kw)
    z, c, w = _inputs()
    out, dz, dc = _module_value_and_grads(q, z, c, w)
    ref = np_ibq_reference(
        z, c, w, kw["beta"], kw.get("entropy_loss_weight", 0.0), kw.get("codebook_entropy_weight", 1.0),
        kw.get("entropy_temperature", 1.0), kw.get("entropy_eps", 0.0),
    )
    np.testing.assert_array_equal(np.asarray(out.indices), ref["indices"])
    # The forward value is exactly the selected code, bit for bit.
    np.testing.assert_array_equal(np.asarray(out.quantized), np.asarray(c)[ref["indices"]])
    np.testing.assert_allclose(out.loss, ref["loss"], rtol=1e-5, atol=1e-6)
    for name, want in ref["metrics"].items():
        np.testing.assert_allclose(out.metrics[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(dz), ref["dz"], rtol=1e-5, atol=1e-5, err_msg="d/dz")
    np.testing.assert_allclose(np.asarray(dc), ref["dc"], rtol=1e-5, atol=1e-5, err_msg="d/dcodebook")


def test_ibq_equals_literal_one_hot_formula():
    """Same gradients as the official expression written with a materialised [N, K] one-hot."""
    beta = 0.3
    z, c, w = _inputs(seed=3, shape=(5, 7, D), code_scale=1.0)

    def literal(z, c):
        flat = z.reshape(-1, D)
        logits = flat @ c.T
        soft = jax.nn.softmax(logits, axis=-1)
        hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), K)
        qf = (hard - jax.lax.stop_gradient(soft) + soft) @ c
        q2 = hard @ c
        loss = (jnp.mean((qf - flat) ** 2) + jnp.mean((jax.lax.stop_gradient(q2) - flat) ** 2)
                + beta * jnp.mean((q2 - jax.lax.stop_gradient(flat)) ** 2))
        return jnp.sum(qf.reshape(z.shape) * w) + loss

    want = jax.jit(jax.grad(literal, argnums=(0, 1)))(z, c)
    _, dz, dc = _module_value_and_grads(IndexBackpropQuantizer(K, beta=beta), z, c, w)
    chex.assert_trees_all_close((dz, dc), want, rtol=1e-5, atol=1e-5)


def test_unselected_codes_get_only_the_softmax_path():
    """With ``g = dL/dq`` and no loss term, a code nobody picked gets ``Σ_n dlogits[n, k] z_n``.

    The old ``C[i] + soft @ C - sg(soft @ C)`` form gave it an extra ``Σ_n soft[n, k] g_n``.
    """
    z, c, w = _inputs(seed=5)
    q = IndexBackpropQuantizer(K, beta=0.0)

    def loss_fn(c):
        out = q.apply({"params": {"codebook": c}}, z)
        return jnp.sum(out.quantized * w), out.indices

    dc, idx = jax.jit(jax.grad(loss_fn, has_aux=True))(c)
    flat = np.asarray(z, np.float64).reshape(-1, D)
    cc = np.asarray(c, np.float64)
    soft = np_softmax(flat @ cc.T)
    dlogits = np_softmax_vjp(soft, np.asarray(w, np.float64).reshape(-1, D) @ cc.T)
    unused = np.setdiff1d(np.arange(K), np.asarray(idx))
    assert len(unused) > 0
    np.testing.assert_allclose(np.asarray(dc)[unused], (dlogits.T @ flat)[unused], rtol=1e-5, atol=1e-5)


def test_default_init_codebook_trains_every_code():
    q = IndexBackpropQuantizer(K)
    z, _, w = _inputs(seed=7)
    params = nn.meta.unbox(jax.jit(q.init)(jax.random.key(0), z))["params"]
    dc = jax.grad(lambda c: jnp.sum(q.apply({"params": {"codebook": c}}, z).quantized * w))(params["codebook"])
    assert np.all(np.any(np.asarray(dc) != 0, axis=-1))
