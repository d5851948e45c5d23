"""Adversarial losses and discriminators against NumPy formulas and finite differences."""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.losses import adversarial as adv


def _np_params(module, *inputs, seed=0, scale=0.2):
    """Random parameters made on the host from the abstract init (no compiled random initialisers)."""
    abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(scale=scale, size=a.shape), a.dtype), abstract)


def _logits(seed, shape=(4, 3, 3, 1)):
    return np.random.default_rng(seed).normal(scale=1.5, size=shape).astype(np.float32)


def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0)


def test_gan_losses_match_numpy():
    real, fake = _logits(0).astype(np.float64), _logits(1).astype(np.float64)
    cases = [
        (adv.hinge_d_loss(real, fake), 0.5 * (np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean())),
        (adv.hinge_g_loss(fake), -fake.mean()),
        (adv.non_saturating_d_loss(real, fake),
         0.5 * (-np.log(1 / (1 + np.exp(-real))).mean() - np.log(1 - 1 / (1 + np.exp(-fake))).mean())),
        (adv.non_saturating_g_loss(fake), -np.log(1 / (1 + np.exp(-fake))).mean()),
    ]
    for ours, ref in cases:
        assert ours.shape == () and ours.dtype == jnp.float32
        np.testing.assert_allclose(float(ours), ref, rtol=1e-5)
    # bf16 logits still give float32 losses
    assert adv.hinge_d_loss(jnp.asarray(real, jnp.bfloat16), jnp.asarray(fake, jnp.bfloat16)).dtype == jnp.float32
    assert np.isclose(float(adv.non_saturating_g_loss(np.float32([100.0]))), _softplus(-100.0))


def test_lecam_matches_numpy_and_ema():
    real, fake = _logits(2), _logits(3)
    ema_real, ema_fake = 0.3, -0.2
    ref = np.mean(np.maximum(0, real - ema_fake) ** 2) + np.mean(np.maximum(0, ema_real - fake) ** 2)
    ours = adv.lecam_loss(real, fake, jnp.float32(ema_real), jnp.float32(ema_fake))
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(float(ours), ref, rtol=1e-5)
    # the anchors are constants: no gradient flows into them
    g = jax.grad(adv.lecam_loss, argnums=(2, 3))(real, fake, jnp.float32(ema_real), jnp.float32(ema_fake))
    assert float(g[0]) == 0.0 and float(g[1]) == 0.0

    new_real, new_fake = jax.jit(adv.lecam_update_ema, static_argnames="decay")(
        jnp.float32(ema_real), jnp.float32(ema_fake), real, fake, decay=0.9)
    np.testing.assert_allclose(float(new_real), 0.9 * ema_real + 0.1 * real.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(new_fake), 0.9 * ema_fake + 0.1 * fake.mean(), rtol=1e-6)


def test_r1_penalty_matches_finite_differences():
    with jax.enable_x64(True):
        disc = adv.PatchGANDiscriminator(ch=8, n_layers=1, dtype=jnp.float64, param_dtype=jnp.float64)
        real = np.random.default_rng(0).uniform(-1, 1, size=(2, 8, 8, 2))
        params = _np_params(disc, real, scale=0.3)

        def disc_apply(p, x):
            return disc.apply({"params": p}, x)

        ours = float(jax.jit(adv.r1_penalty, static_argnums=0)(disc_apply, params, jnp.asarray(real)))

        # central differences of each sample's summed logits with respect to each input value
        eps = 1e-5
        n = real[0].size
        eye = np.eye(n).reshape((n,) + real.shape[1:])
        f = jax.jit(lambda x: jnp.sum(disc_apply(params, x), axis=(1, 2, 3)))
        ref_norms = []
        for b in range(real.shape[0]):
            plus = f(jnp.asarray(real[b][None] + eps * eye))
            minus = f(jnp.asarray(real[b][None] - eps * eye))
            grad = (np.asarray(plus) - np.asarray(minus)) / (2 * eps)  # [n]
            ref_norms.append(np.sum(grad**2))
        ref = float(np.mean(ref_norms))
    assert ref > 0
    np.testing.assert_allclose(ours, ref, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Adaptive weight on a tiny "decoder" whose last layer is a Dense, against float64 NumPy
# central differences of the two losses with respect to that layer.

RNG = np.random.default_rng(7)
Z = RNG.normal(size=(5, 3))
TARGET = RNG.uniform(-1, 1, size=(5, 4))
W1, B1 = RNG.normal(size=(3, 6)) * 0.7, RNG.normal(size=(6,)) * 0.1
DW, DB = RNG.normal(size=(4, 2)), RNG.normal(size=(2,))  # a fixed tiny discriminator


def _decoder_np(kernel, bias):
    h = np.tanh(Z @ W1 + B1)
    return h @ kernel + bias  # the last layer


def _rec_np(kernel, bias):
    out = _decoder_np(kernel, bias)
    return np.mean(np.abs(out - TARGET)) + np.mean((out - TARGET) ** 2)


def _gan_np(kernel, bias):
    logits = np.tanh(_decoder_np(kernel, bias)) @ DW + DB
    return -np.mean(logits)


def _fd_grad(fn, kernel, bias, eps=1e-6):
    grads = []
    for which in (0, 1):
        base = (kernel, bias)[which]
        g = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += eps
            down[idx] -= eps
            args_up = (up, bias) if which == 0 else (kernel, up)
            args_down = (down, bias) if which == 0 else (kernel, down)
            g[idx] = (fn(*args_up) - fn(*args_down)) / (2 * eps)
        grads.append(g)
    return grads


class TinyDecoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        h = jnp.tanh(nn.Dense(6, name="hidden")(z))
        return nn.Dense(4, name="last")(h)


def test_adaptive_weight_matches_finite_differences():
    model = TinyDecoder()
    params = {}
    params["hidden"] = {"kernel": jnp.asarray(W1, jnp.float32), "bias": jnp.asarray(B1, jnp.float32)}
    kernel = RNG.normal(size=(6, 4)) * 0.5
    bias = RNG.normal(size=(4,)) * 0.1
    params["last"] = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    z, target = jnp.asarray(Z, jnp.float32), jnp.asarray(TARGET, jnp.float32)

    def rec_loss(last):
        out = model.apply({"params": {**params, "last": last}}, z)
        return jnp.mean(jnp.abs(out - target)) + jnp.mean((out - target) ** 2)

    def gan_loss(last):
        out = model.apply({"params": {**params, "last": last}}, z)
        logits = jnp.tanh(out) @ jnp.asarray(DW, jnp.float32) + jnp.asarray(DB, jnp.float32)
        return adv.hinge_g_loss(logits)

    weight = jax.jit(lambda last: adv.adaptive_weight(jax.grad(rec_loss)(last), jax.grad(gan_loss)(last)))(
        params["last"])

    rec_fd = _fd_grad(_rec_np, kernel, bias)
    gan_fd = _fd_grad(_gan_np, kernel, bias)
    rec_norm = np.sqrt(sum(np.sum(g**2) for g in rec_fd))
    gan_norm = np.sqrt(sum(np.sum(g**2) for g in gan_fd))
    ref = rec_norm / (gan_norm + 1e-4)
    assert weight.dtype == jnp.float32 and weight.shape == ()
    np.testing.assert_allclose(float(weight), ref, rtol=1e-4)

    # clipping and stop-gradient
    tiny = jax.tree.map(lambda g: 0.0 * g, params["last"])
    big = jax.tree.map(lambda g: 1e3 * jnp.ones_like(g), params["last"])
    assert float(adv.adaptive_weight(big, tiny)) == pytest.approx(1e4)
    assert float(adv.adaptive_weight(tiny, big)) == 0.0
    g = jax.grad(lambda s: adv.adaptive_weight(jax.tree.map(lambda x: s * x, big), big))(1.0)
    assert float(g) == 0.0


def test_gan_start_factor():
    f = jax.jit(adv.gan_start_factor)
    got = [float(f(step, 3)) for step in range(6)]
    assert got == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert f(jnp.int32(0), 0).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Discriminators: shapes, dtypes, logical axes, bad input.


def _all_intermediate_dtypes(inter):
    return {leaf.dtype for leaf in jax.tree.leaves(inter)}


def test_patchgan_shapes_dtypes_and_axes():
    disc = adv.PatchGANDiscriminator(ch=8, n_layers=3, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = jnp.zeros((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(disc.init, jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["conv_1"]["kernel"]) == (None, None, "conv_in", "conv_out")
    assert {p.dtype for p in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
    params = _np_params(disc, x)
    assert "bias" not in params["conv_1"] and "bias" in params["conv_0"]  # normalised convs have no bias
    logits, state = jax.jit(partial(disc.apply, capture_intermediates=True))({"params": params}, x)
    assert logits.shape == (2, 2, 2, 1) and logits.dtype == jnp.float32  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    conv_dtypes = _all_intermediate_dtypes(state["intermediates"]["conv_1"])
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}
    # taming's layout: a 256x256 image gives a 30x30 patch map; parameter count of NLayerDiscriminator
    big = jax.eval_shape(adv.PatchGANDiscriminator().init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    n_params = sum(p.size for p in jax.tree.leaves(nn.unbox(big)))
    expected = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 2 * 128) + (128 * 256 * 16 + 2 * 256) \
        + (256 * 512 * 16 + 2 * 512) + (512 * 16 + 1)
    assert n_params == expected
    out = jax.eval_shape(lambda v: adv.PatchGANDiscriminator().apply(v, jnp.zeros((1, 256, 256, 3))), big)
    assert out.shape == (1, 30, 30, 1)
    with pytest.raises(ValueError, match="use 'group' or 'none'"):
        jax.eval_shape(adv.PatchGANDiscriminator(norm="batch").init, jax.random.key(0), x)


def test_patchgan_no_norm_has_biases():
    disc = adv.PatchGANDiscriminator(ch=4, n_layers=2, norm="none")
    params = nn.unbox(jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, 16, 16, 1))))["params"]
    assert all("bias" in params[f"conv_{i}"] for i in range(3)) and not any(k.startswith("norm") for k in params)


def test_stylegan_shapes_dtypes():
    disc = adv.StyleGANDiscriminator(ch=8, ch_mult=(1, 2), image_size=16, dtype=jnp.bfloat16)
    x = jnp.zeros((3, 16, 16, 3))
    abstract = nn.unbox(jax.eval_shape(disc.init, jax.random.key(1), x))["params"]
    assert {p.dtype for p in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    params = _np_params(disc, x)
    assert params["dense_0"]["kernel"].shape == (4 * 4 * 16, 16)  # 16 -> 8 -> 4, 8 * 2 filters
    logits, state = jax.jit(partial(disc.apply, capture_intermediates=True))({"params": params}, x)
    assert logits.shape == (3, 1) and logits.dtype == jnp.float32
    assert _all_intermediate_dtypes(state["intermediates"]["block_0"]) == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="built for 16x16"):
        jax.eval_shape(disc.apply, {"params": params}, jnp.zeros((1, 32, 32, 3)))


def test_blur_downsample_matches_numpy():
    x = np.random.default_rng(0).normal(size=(1, 6, 6, 2)).astype(np.float32)
    taps = np.array([1, 3, 3, 1]) / 8.0
    k = np.outer(taps, taps)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((1, 3, 3, 2))
    for i in range(3):
        for j in range(3):
            ref[0, i, j] = np.einsum("hwc,hw->c", padded[0, 2 * i:2 * i + 4, 2 * j:2 * j + 4], k)
    np.testing.assert_allclose(np.asarray(adv.blur_downsample(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-6)
