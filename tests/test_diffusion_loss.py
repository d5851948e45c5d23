"""Tests of MAR's per-token diffusion loss: the cosine schedule and its respacing, the forward
noising against its closed form, the head, the loss terms, the compiled sampler, and a head
trained on a 2-D mixture of Gaussians whose samples recover the mixture."""
import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vqgen.generators import diffusion_loss as dl


def tiny_head(**kw) -> dl.DiffusionHead:
    return dl.DiffusionHead(**{**dict(in_channels=3, width=16, depth=2), **kw})


@functools.lru_cache(maxsize=None)
def random_params(head: dl.DiffusionHead, cond_dim: int = 5, seed: int = 0):
    """Params of the right shapes drawn with NumPy (the real init zeroes the output layers)."""
    rs = np.random.RandomState(seed)
    flat, tree = jax.tree_util.tree_flatten(nn.meta.unbox(dl.init_head(head, jax.random.key(0), cond_dim)))
    return jax.tree.unflatten(tree, [jnp.asarray(0.3 * rs.standard_normal(x.shape), jnp.float32) for x in flat])


# ------------------------------------------------------------------------------ the schedule


def test_cosine_schedule_follows_alpha_bar():
    s = dl.schedule(None)
    assert s.num_steps == 1000 and list(s.timesteps) == list(range(1000))
    t = np.arange(1000)
    bar = dl.cosine_alpha_bar((t + 1) / 1000) / dl.cosine_alpha_bar(0.0)
    # Every beta below the 0.999 cap makes alpha_bar(t + 1) / alpha_bar(0) exactly (up to rounding).
    capped = s.betas >= dl.MAX_BETA - 1e-12
    assert capped.sum() == 1 and capped[-1]
    np.testing.assert_allclose(s.alphas_cumprod[:-1], bar[:-1], rtol=1e-9)
    np.testing.assert_allclose(s.alphas_cumprod[-1], s.alphas_cumprod[-2] * (1 - dl.MAX_BETA), rtol=1e-9)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas), rtol=1e-12)


def test_respacing_keeps_mar_steps_and_alpha_bar():
    full, s = dl.schedule(None), dl.schedule(100)
    assert s.num_steps == 100
    assert list(s.timesteps[:8]) == [0, 10, 20, 30, 40, 50, 61, 71] and list(s.timesteps[-2:]) == [989, 999]
    # The respaced chain has the same alpha_bar at the kept steps.
    np.testing.assert_allclose(s.alphas_cumprod, full.alphas_cumprod[s.timesteps], rtol=1e-10)
    assert dl.space_timesteps(1000, "10,15,20")[:3] == [0, 37, 74] and len(dl.space_timesteps(1000, "10,15,20")) == 45
    assert dl.schedule(1).num_steps == 1 and dl.schedule(1000).timesteps.tolist() == list(range(1000))


def test_linear_schedule_and_the_first_step_gain():
    """DDPM's linear betas (1e-4 to 0.02 over 1,000 steps); respacing keeps its alpha_bar; the
    first respaced step's gain on the noise error (posterior_mean_coef1 * sqrt(1/ab - 1)) is what
    the MAR docstring states for both schedules; an unknown schedule is one sentence."""
    s = dl.schedule(None, 1000, "linear")
    np.testing.assert_allclose(s.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-10)
    np.testing.assert_allclose(dl.linear_betas(500), np.linspace(2e-4, 0.04, 500), rtol=1e-12)
    r = dl.schedule(100, 1000, "linear")
    np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[r.timesteps], rtol=1e-10)
    gain = lambda sc: sc.posterior_mean_coef1[-1] * sc.sqrt_recipm1_alphas_cumprod[-1]  # noqa: E731
    assert round(gain(dl.schedule(100)), 0) == 316 and round(gain(dl.schedule(50)), 0) == 632
    assert round(gain(r), 2) == 0.20 and round(gain(dl.schedule(50, 1000, "linear")), 2) == 0.40
    with pytest.raises(ValueError, match=re.escape("noise_schedule='sqrt' is unknown; use one of ['cosine', "
                                                   "'linear'] ('cosine' is MAR's).")):
        dl.schedule(100, 1000, "sqrt")


def test_forward_noising_equals_the_closed_form():
    """q_sample = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps exactly, and running the one-step chain
    x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t gives that distribution (Monte Carlo)."""
    s = dl.schedule(None)
    x0 = jnp.asarray([[1.5, -0.5]], jnp.float32)  # [1, C]
    ts = np.array([0, 1, 99, 500, 900, 999])
    noise = jax.random.normal(jax.random.key(0), (len(ts), 2))
    got = dl.q_sample(s, jnp.repeat(x0, len(ts), 0), jnp.asarray(ts), noise)
    ab = s.alphas_cumprod[ts][:, None]
    np.testing.assert_allclose(got, np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * np.asarray(noise), rtol=1e-6,
                               atol=1e-6)

    n = 20000
    betas = jnp.asarray(s.betas, jnp.float32)

    def step(x, inp):
        beta, key = inp
        x = jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(key, x.shape)
        return x, x[:, 0]

    _, path = jax.jit(lambda k: jax.lax.scan(step, jnp.full((n, 1), 1.5), (betas, jax.random.split(k, 1000))))(
        jax.random.key(1))  # [T, n]
    for t in ts:
        mean, std = float(path[t].mean()), float(path[t].std())
        want_mean, want_std = 1.5 * math.sqrt(s.alphas_cumprod[t]), math.sqrt(1 - s.alphas_cumprod[t])
        assert abs(mean - want_mean) < 4 * want_std / math.sqrt(n) + 1e-6, (t, mean, want_mean)
        assert abs(std - want_std) < 4 * want_std / math.sqrt(2 * n) + 1e-6, (t, std, want_std)


def test_posterior_and_p_mean_variance():
    """The posterior q(x_{t-1} | x_t, x_0) has mean coef1 x0 + coef2 x_t (Bayes on the Gaussians),
    and a head predicting the true noise with v = -1 gives exactly that mean and log variance."""
    s = dl.schedule(None)
    t = jnp.asarray([1, 50, 700])
    x0 = jax.random.normal(jax.random.key(0), (3, 4))
    eps = jax.random.normal(jax.random.key(1), (3, 4))
    xt = dl.q_sample(s, x0, t, eps)
    ab, ab_prev, beta = (np.asarray(a)[np.asarray(t)][:, None] for a in (s.alphas_cumprod, s.alphas_cumprod_prev,
                                                                         s.betas))
    # Product of N(x_{t-1}; sqrt(ab_prev) x0, 1 - ab_prev) and N(x_t; sqrt(1 - beta) x_{t-1}, beta).
    prec = 1 / (1 - ab_prev) + (1 - beta) / beta
    mean = (np.sqrt(ab_prev) * np.asarray(x0) / (1 - ab_prev) + np.sqrt(1 - beta) * np.asarray(xt) / beta) / prec
    got_mean, got_log_var = dl.q_posterior(s, x0, xt, t)
    np.testing.assert_allclose(got_mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.exp(got_log_var), 1 / prec, rtol=1e-4)  # [N, 1], broadcast over C
    pm = dl.p_mean_variance(s, jnp.concatenate([eps, -jnp.ones_like(eps)], -1), xt, t)
    np.testing.assert_allclose(pm["pred_xstart"], x0, atol=2e-4)
    np.testing.assert_allclose(pm["mean"], got_mean, atol=1e-4)
    np.testing.assert_allclose(pm["log_variance"], np.broadcast_to(got_log_var, (3, 4)), atol=1e-6)
    pm = dl.p_mean_variance(s, jnp.concatenate([eps, jnp.ones_like(eps)], -1), xt, t)  # v = 1: beta_t
    np.testing.assert_allclose(pm["log_variance"], np.broadcast_to(np.log(beta), (3, 4)), rtol=1e-6)


# ----------------------------------------------------------------------------- head and loss


def test_head_shapes_init_and_names():
    head = tiny_head()
    params = nn.meta.unbox(dl.init_head(head, jax.random.key(0), 5))
    assert set(params) == {"time_embed", "cond_embed", "input_proj", "res_blocks_0", "res_blocks_1", "final_layer"}
    chex.assert_shape(params["res_blocks_0"]["adaLN_modulation"]["kernel"], (16, 48))
    chex.assert_shape(params["final_layer"]["linear"]["kernel"], (16, 6))
    chex.assert_shape(params["time_embed"]["mlp_0"]["kernel"], (256, 16))
    x, c = jnp.ones((7, 3)), jnp.ones((7, 5))
    out = head.apply({"params": params}, x, jnp.arange(7), c)
    chex.assert_shape(out, (7, 6))
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer, as MAR
    out = head.apply({"params": random_params(head)}, x, jnp.arange(7), c)
    assert out.dtype == jnp.float32 and float(jnp.abs(out[0] - out[1]).max()) > 1e-3  # t changes the output


def test_timestep_embedding_layout():
    emb = dl.timestep_embedding(jnp.asarray([0.0, 3.0]), 8)
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[1], np.concatenate([np.cos(3 * freqs), np.sin(3 * freqs)]), rtol=1e-6)
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])
    chex.assert_shape(dl.timestep_embedding(jnp.zeros(3), 7), (3, 7))


def test_loss_terms_and_frozen_mean():
    """loss = mse + vb per row; vb is the decoder NLL at t = 0 and the KL elsewhere, in bits, and
    its gradient reaches only the variance half of the head's output."""
    s = dl.schedule(None)
    x0 = jax.random.normal(jax.random.key(0), (4, 3))
    noise = jax.random.normal(jax.random.key(1), (4, 3))
    t = jnp.asarray([0, 0, 10, 999])
    xt = dl.q_sample(s, x0, t, noise)
    out = jax.random.normal(jax.random.key(2), (4, 6)) * 0.5
    terms = dl.training_losses(s, out, x0, xt, t, noise)
    np.testing.assert_allclose(terms["mse"], jnp.mean((noise - out[:, :3]) ** 2, -1), rtol=1e-6)
    np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)
    pm = dl.p_mean_variance(s, out, xt, t)
    nll = -dl.discretized_gaussian_log_likelihood(x0, pm["mean"], 0.5 * pm["log_variance"]).mean(-1) / math.log(2)
    true_mean, true_log_var = dl.q_posterior(s, x0, xt, t)
    kl = dl.normal_kl(true_mean, true_log_var, pm["mean"], pm["log_variance"]).mean(-1) / math.log(2)
    np.testing.assert_allclose(terms["vb"], np.where(np.asarray(t) == 0, nll, kl), rtol=1e-5)
    g = jax.grad(lambda o: jnp.sum(dl.training_losses(s, o, x0, xt, t, noise)["vb"]))(out)
    np.testing.assert_array_equal(g[:, :3], 0.0)
    assert float(jnp.abs(g[:, 3:]).max()) > 0


def test_diffusion_loss_masks_and_batch_mul():
    head = tiny_head()
    params = random_params(head)
    target = jax.random.normal(jax.random.key(0), (6, 3))
    z = jax.random.normal(jax.random.key(1), (6, 5))
    mask = jnp.asarray([1, 1, 0, 0, 1, 0], jnp.float32)
    rng = jax.random.key(2)
    loss, metrics = dl.diffusion_loss(head, params, target, z, rng, mask, batch_mul=3)
    # The same draws by hand: tiled rows, one timestep and noise each, masked mean.
    tt, zz, mm = dl.diffusion_batch_mul(3, target, z, mask)
    chex.assert_shape(tt, (18, 3))
    np.testing.assert_array_equal(tt[6:12], target)
    t_key, n_key = jax.random.split(rng)
    t = jax.random.randint(t_key, (18,), 0, 1000)
    terms = dl.loss_terms(head, params, tt, zz, t, jax.random.normal(n_key, (18, 3)))
    np.testing.assert_allclose(loss, float(jnp.sum(terms["loss"] * mm) / jnp.sum(mm)), rtol=1e-6)
    np.testing.assert_allclose(loss, metrics["diffusion_mse"] + metrics["diffusion_vb"], rtol=1e-6)
    # Unmasked rows do not matter.
    changed = target.at[2].set(100.0)
    np.testing.assert_allclose(dl.diffusion_loss(head, params, changed, z, rng, mask, batch_mul=3)[0], loss, rtol=1e-6)


# ----------------------------------------------------------------------------------- sampler


def test_sampler_compiles_once_and_is_deterministic_per_key():
    head = tiny_head()
    params = random_params(head)
    fn = jax.jit(chex.assert_max_traces(dl.p_sample_loop, n=1), static_argnames=("head", "num_steps",
                                                                                 "num_train_steps"))
    z = jax.random.normal(jax.random.key(0), (4, 5))
    a = fn(head, params, z, jax.random.key(1), num_steps=10, temperature=1.0)
    b = fn(head, params, z + 1, jax.random.key(2), num_steps=10, temperature=0.5)
    c = fn(head, params, z, jax.random.key(1), num_steps=10, temperature=1.0)
    chex.assert_shape(a, (4, 3))
    assert np.isfinite(np.asarray(a)).all() and not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)


def test_sampler_step_by_step_and_guidance():
    """The loop equals the reverse chain written out with the respaced tables; cfg_scale 1 with an
    unconditional batch equals no guidance, and other scales use eps_u + s (eps_c - eps_u)."""
    head = tiny_head()
    params = random_params(head)
    s = dl.schedule(5)
    z = jax.random.normal(jax.random.key(0), (2, 5))
    zu = jax.random.normal(jax.random.key(1), (2, 5))
    x0 = jax.random.normal(jax.random.key(2), (2, 3))
    step_noise = jax.random.normal(jax.random.key(3), (5, 2, 3))

    def manual(scale, uncond):
        x = x0
        for k in range(5):
            i = 4 - k
            t = jnp.full((2,), s.timesteps[i])
            out = head.apply({"params": params}, x, t, z)
            if uncond is not None:
                ou = head.apply({"params": params}, x, t, uncond)
                out = out.at[:, :3].set(ou[:, :3] + scale * (out[:, :3] - ou[:, :3]))
            pm = dl.p_mean_variance(s, out, x, jnp.full((2,), i))
            x = pm["mean"] + (i > 0) * jnp.exp(0.5 * pm["log_variance"]) * 0.7 * step_noise[k]
        return x

    run = functools.partial(dl.p_sample_loop, head, params, z, jax.random.key(0), num_steps=5, temperature=0.7,
                            noise=x0, step_noise=step_noise)
    np.testing.assert_allclose(run(), manual(1.0, None), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(cfg_scale=1.0, z_uncond=zu), run(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(cfg_scale=3.0, z_uncond=zu), manual(3.0, zu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [0, -3])
def test_zero_diffusion_steps_is_one_sentence(steps):
    head = tiny_head()
    with pytest.raises(ValueError, match=re.escape(f"diffusion_steps={steps} must be a positive number of diffusion "
                                                   "steps; use e.g. 100")):
        dl.p_sample_loop(head, random_params(head), jnp.zeros((1, 5)), jax.random.key(0), num_steps=steps)
    with pytest.raises(ValueError, match="diffusion_steps=0 must be a positive"):
        dl.schedule(0)
    with pytest.raises(ValueError, match="diffusion_batch_mul=0 must be at least 1"):
        dl.diffusion_batch_mul(0, jnp.zeros((2, 3)))


# ------------------------------------------------------------ a trained head: 2-D Gaussians

MEANS = np.array([[-1.5, 0.0], [1.5, 1.0], [0.5, -1.5]], np.float32)
WEIGHTS = np.array([0.5, 0.3, 0.2])
STD = 0.2
# Tolerances of the mixture recovered from 2,000 samples (measured: weights 0.017, means 0.010,
# spreads 0.011 off; sampling error alone is ~0.011 on a weight and ~0.01 on a mean).
WEIGHT_TOL = 0.04  # absolute, per component
MEAN_TOL = 0.04  # per coordinate
STD_TOL = 0.03  # per coordinate, around 0.2
NEAR = 1.0  # every sample lies within 1.0 (5 sigma) of a mean


def test_trained_head_recovers_a_mixture_of_gaussians():
    """A head (width 32, 3 blocks) trained with MAR's loss (learned sigma, vb term) for 3,000 Adam
    steps of 256 points on an unconditional 2-D mixture of three Gaussians; 2,000 samples of the
    full 1,000-step chain give the mixture's weights, means and spreads.

    The full chain is used because the respaced 100-step chain's first step multiplies the error
    of the predicted noise by sqrt(alpha_bar_989 / alpha_bar_999) ~ 300 (the cosine schedule ends
    at alpha_bar ~ 2e-9): a head trained for seconds sends a share of its 100-step samples far
    off, where MAR's heads, trained for days, do not. The 100-step chain's arithmetic is checked
    step by step above and against the official code in tests/test_convert_mar.py."""
    head = dl.DiffusionHead(in_channels=2, width=32, depth=3)
    params = nn.meta.unbox(dl.init_head(head, jax.random.key(0), 1))
    steps, batch = 3000, 256
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))

    def draw(key, n):
        k1, k2 = jax.random.split(key)
        comp = jax.random.choice(k1, 3, (n,), p=jnp.asarray(WEIGHTS))
        return jnp.asarray(MEANS)[comp] + STD * jax.random.normal(k2, (n, 2))

    @jax.jit
    def train(params, key):
        def body(carry, k):
            p, opt = carry
            dk, lk = jax.random.split(k)
            loss, g = jax.value_and_grad(lambda q: dl.diffusion_loss(head, q, draw(dk, batch), jnp.zeros((batch, 1)),
                                                                     lk)[0])(p)
            upd, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, upd), opt), loss

        (params, _), losses = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(key, steps))
        return params, losses

    params, losses = train(params, jax.random.key(1))
    assert float(losses[-300:].mean()) < 0.5 * float(losses[:30].mean())
    x = np.asarray(dl.sample_jit(head, params, jnp.zeros((2000, 1)), jax.random.key(5), num_steps=1000))
    dist = np.sqrt(((x[:, None] - MEANS[None]) ** 2).sum(-1))  # [n, 3]
    assert dist.min(1).max() < NEAR, dist.min(1).max()
    comp = dist.argmin(1)
    np.testing.assert_allclose(np.bincount(comp, minlength=3) / len(x), WEIGHTS, atol=WEIGHT_TOL)
    for k in range(3):
        pts = x[comp == k]
        np.testing.assert_allclose(pts.mean(0), MEANS[k], atol=MEAN_TOL)
        np.testing.assert_allclose(pts.std(0), STD, atol=STD_TOL)
