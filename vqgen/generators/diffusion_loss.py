"""MAR's per-token diffusion loss (Li et al. 2024, "Autoregressive Image Generation without Vector
Quantization", LTH14/mar ``models/diffloss.py`` and ``diffusion/``): a small MLP denoiser
conditioned on the transformer's output, its Gaussian-diffusion training loss and its respaced
DDPM sampler, all pure and jittable.

A continuous token ``x0 [N, C]`` (one latent patch) is modelled given its condition
``z [N, Cz]`` (the generator's output at that position). Training draws a timestep and noise per
row and regresses the noise; sampling runs the reverse chain from Gaussian noise.

Head (:class:`DiffusionHead`, MAR's ``SimpleMLPAdaLN``), parameter names as MAR's:

- ``time_embed``: sinusoidal embedding of the timestep (256 frequencies, ``[cos | sin]``, max
  period 10,000, :func:`timestep_embedding`), then ``mlp_0`` (``256 -> W``), SiLU, ``mlp_2``
  (``W -> W``).
- ``cond_embed`` (``Cz -> W``) of the condition and ``input_proj`` (``C -> W``) of the noisy token;
  ``y = time_embed(t) + cond_embed(z)`` conditions every block.
- ``depth`` residual blocks ``res_blocks_{i}``: ``shift, scale, gate = adaLN_modulation(silu(y))``
  (``W -> 3W``, in that order), ``x += gate * mlp_2(silu(mlp_0(in_ln(x) * (1 + scale) + shift)))``
  with ``in_ln`` an affine LayerNorm (eps 1e-6).
- ``final_layer``: ``shift, scale = adaLN_modulation(silu(y))`` (``W -> 2W``), LayerNorm without
  affine (eps 1e-6), modulate, ``linear`` (``W -> 2C``): the predicted noise ``eps`` and the
  variance interpolation ``v`` in ``[-1, 1]`` (MAR learns sigma).
- Initialisation: Xavier-uniform kernels and zero biases, ``time_embed`` kernels ``N(0, 0.02)``,
  every ``adaLN_modulation`` and the final ``linear`` zero (so the head starts at the identity
  blocks and a zero output).
- Kernels are ``[in, out]`` (PyTorch's weights transposed); ``adaLN_modulation`` keeps the
  ``[W, 3W]`` / ``[W, 2W]`` layout whose output thirds/halves are the chunks above.

Diffusion (MAR's ``create_diffusion(timestep_respacing=..., noise_schedule="cosine")``): the
cosine schedule ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` discretised into 1,000
betas (each capped at 0.999), the model predicts epsilon with a learned variance range
(``log var = frac * log beta_t + (1 - frac) * log posterior_var_t`` with ``frac = (v + 1) / 2``),
and the loss is MAR's ``LossType.MSE`` with learned sigma: per row,
``mean_c (eps - eps_hat)^2 + vb`` where ``vb`` is the variational-bound term in bits per channel
with the mean prediction frozen (``stop_gradient``): ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} |
x_t))`` for ``t > 0`` and the discretised-Gaussian decoder NLL (bins of 2/255, as the image
diffusion codes it was inherited from) at ``t = 0``. ``x_0`` is never clipped (``clip_denoised``
is False in MAR everywhere). The schedule's tables are computed in float64 on the host and read
in float32, as MAR does.

Respacing (:func:`space_timesteps`): sampling with ``S`` steps keeps ``S`` of the 1,000 training
timesteps, evenly strided with MAR's rounding (100 steps: 0, 10, 20, 30, 40, 50, 61, ..., 989,
999), and the betas are recomputed from ``alpha_bar`` at the kept steps; the head is called with
the ORIGINAL timestep index. The sampler (:func:`p_sample_loop`) is one ``lax.fori_loop`` over the
``S`` steps: ``x <- mean + [i > 0] * exp(log_var / 2) * temperature * noise`` (MAR's
``p_sample`` with temperature). Classifier-free guidance (MAR's ``forward_with_cfg``) runs the
head on the conditional and unconditional conditions at the same ``x`` and uses
``eps = eps_u + s * (eps_c - eps_u)`` with the conditional variance output.

Deviations: none in what is computed. Random numbers come from ``jax.random`` (step ``i`` of the
sampler draws with ``fold_in(key, i)``), so draws differ from PyTorch's; :func:`training_losses`
and :func:`p_sample_loop` accept the noise, timesteps and initial noise explicitly to reproduce a
reference. A 1-step sampler (MAR fails on it) adds no noise, so its variance is never read.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

NUM_TRAIN_STEPS = 1000  # MAR's training diffusion (timestep_respacing="")
DEFAULT_SAMPLING_STEPS = 100  # MAR's num_sampling_steps
FREQUENCY_DIM = 256  # sinusoidal timestep features (DiT / MAR)
MAX_BETA = 0.999
LN_EPS = 1e-6

# ------------------------------------------------------------------------------- schedule


def cosine_alpha_bar(s: np.ndarray | float) -> np.ndarray:
    """The cosine schedule's ``alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2`` for ``s`` in [0, 1]."""
    return np.cos((np.asarray(s, np.float64) + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_steps: int = NUM_TRAIN_STEPS, max_beta: float = MAX_BETA) -> np.ndarray:
    """``num_steps`` float64 betas discretising :func:`cosine_alpha_bar`:
    ``beta_i = min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta)``."""
    check_steps(num_steps, "num_train_steps")
    # Step by step in Python floats, as the schedule is defined (bit-exact to the reference tables).
    bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.asarray([min(1.0 - bar((i + 1) / num_steps) / bar(i / num_steps), max_beta)
                       for i in range(num_steps)], np.float64)


def linear_betas(num_steps: int = NUM_TRAIN_STEPS) -> np.ndarray:
    """DDPM's linear schedule (guided-diffusion's ``"linear"``): ``num_steps`` float64 betas evenly
    from ``1e-4`` to ``0.02``, both scaled by ``1000 / num_steps``."""
    check_steps(num_steps, "num_train_steps")
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)


# noise_schedule -> its betas over the training steps; "cosine" is MAR's.
NOISE_SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


def check_noise_schedule(noise_schedule: Any) -> str:
    """``noise_schedule`` if it names a schedule of :data:`NOISE_SCHEDULES`; else one ``ValueError`` sentence."""
    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise_schedule={noise_schedule!r} is unknown; use one of {sorted(NOISE_SCHEDULES)} "
                         "('cosine' is MAR's).")
    return noise_schedule


def check_steps(num_steps: Any, name: str = "diffusion_steps") -> int:
    """``num_steps`` as an int; raises one ``ValueError`` sentence when it is not a positive integer."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or int(num_steps) < 1:
        raise ValueError(
            f"{name}={num_steps!r} must be a positive number of diffusion steps; use e.g. "
            f"{DEFAULT_SAMPLING_STEPS} for sampling (MAR's default) or {NUM_TRAIN_STEPS} for training.")
    return int(num_steps)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """The training timesteps a respaced sampler keeps, sorted (MAR's ``space_timesteps``).

    ``section_counts`` splits ``[0, num_timesteps)`` into equal sections (the first ones one step
    longer when it does not divide) and keeps that many evenly strided steps in each, rounding
    ``k * (size - 1) / (count - 1)`` accumulated in floating point as the reference does. An int
    or ``"100"`` is one section; ``"10,15,20"`` three.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            raise ValueError(f"timestep respacing {section_counts!r} (DDIM striding) is not supported; "
                             "give a step count such as 100.")
        counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    for c in counts:
        check_steps(c)
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} sampling steps from a section of {size} training steps; use at "
                             f"most {size} steps.")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


class Schedule(NamedTuple):
    """The tables of a (respaced) Gaussian diffusion, float64 NumPy arrays of length ``S``
    (index ``i`` is the ``i``-th kept step; ``timesteps[i]`` its training timestep)."""

    timesteps: np.ndarray  # [S] int32, the training timestep of each step (the head's input)
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    log_betas: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])


def _tables(betas: np.ndarray, timesteps: np.ndarray) -> Schedule:
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    ab = np.cumprod(alphas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    if len(betas) > 1:  # the posterior variance is 0 at the first step: its log is clipped to the second's
        post_log = np.log(np.append(post_var[1], post_var[1:]))
    else:  # one step adds no noise; the value is never used
        post_log = np.log(betas)
    return Schedule(
        timesteps=np.asarray(timesteps, np.int32),
        betas=betas,
        alphas_cumprod=ab,
        alphas_cumprod_prev=ab_prev,
        sqrt_alphas_cumprod=np.sqrt(ab),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ab),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ab - 1.0),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log,
        posterior_mean_coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
        posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
        log_betas=np.log(betas),
    )


@functools.lru_cache(maxsize=32)
def schedule(num_steps: int | None = None, num_train_steps: int = NUM_TRAIN_STEPS,
             noise_schedule: str = "cosine") -> Schedule:
    """The diffusion of ``num_train_steps`` steps under ``noise_schedule`` (MAR's ``"cosine"`` or
    DDPM's ``"linear"``), respaced to ``num_steps`` (None: all of them).

    Raises ``ValueError`` (one sentence) for a step count below 1 or above ``num_train_steps``, or
    an unknown schedule.
    """
    num_train_steps = check_steps(num_train_steps, "num_train_steps")
    betas = NOISE_SCHEDULES[check_noise_schedule(noise_schedule)](num_train_steps)
    if num_steps is None:
        keep = list(range(num_train_steps))
    else:
        num_steps = check_steps(num_steps)
        if num_steps > num_train_steps:
            raise ValueError(f"diffusion_steps={num_steps} is more than the {num_train_steps} training steps; use at "
                             f"most {num_train_steps}.")
        keep = space_timesteps(num_train_steps, num_steps)
    # Betas from alpha_bar at the kept steps; with every step kept this re-derives the training
    # betas through the cumulative product (last-bit differences that the reference has too).
    ab = np.cumprod(1.0 - betas)
    last, new_betas = 1.0, []
    for i in keep:
        new_betas.append(1.0 - ab[i] / last)
        last = ab[i]
    return _tables(np.asarray(new_betas), np.asarray(keep))


def _at(table: np.ndarray, t: jax.Array, like: jax.Array) -> jax.Array:
    """``table[t]`` as float32, broadcast against ``like [N, ...]`` (``t [N]``)."""
    v = jnp.take(jnp.asarray(table, jnp.float32), t.astype(jnp.int32), axis=0)  # [N]
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """A draw of ``q(x_t | x_0)``: ``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` (``t [N]``)."""
    return _at(sched.sqrt_alphas_cumprod, t, x0) * x0 + _at(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior(sched: Schedule, x0: jax.Array, xt: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``."""
    mean = _at(sched.posterior_mean_coef1, t, xt) * x0 + _at(sched.posterior_mean_coef2, t, xt) * xt
    return mean, _at(sched.posterior_log_variance_clipped, t, xt)


def p_mean_variance(sched: Schedule, model_out: jax.Array, xt: jax.Array, t: jax.Array) -> dict[str, jax.Array]:
    """``p(x_{t-1} | x_t)`` from the head's output ``[N, 2C] = [eps | v]`` (learned range, epsilon
    prediction, no clipping): ``{'mean', 'log_variance', 'pred_xstart'}``, each ``[N, C]`` float32."""
    c = xt.shape[-1]
    eps, v = model_out[..., :c], model_out[..., c:]
    min_log = _at(sched.posterior_log_variance_clipped, t, xt)
    max_log = _at(sched.log_betas, t, xt)
    frac = (v + 1.0) / 2.0
    log_var = frac * max_log + (1.0 - frac) * min_log
    pred_x0 = _at(sched.sqrt_recip_alphas_cumprod, t, xt) * xt - _at(sched.sqrt_recipm1_alphas_cumprod, t, xt) * eps
    mean, _ = q_posterior(sched, pred_x0, xt, t)
    return {"mean": mean, "log_variance": log_var, "pred_xstart": pred_x0}


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by the image diffusion codes."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Log-probability (nats) of ``x`` under a Gaussian discretised into bins of width 2/255 on
    [-1, 1], the outermost bins open-ended (elementwise)."""
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def training_losses(sched: Schedule, model_out: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array,
                    noise: jax.Array) -> dict[str, jax.Array]:
    """MAR's per-row loss terms from the head's output ``model_out [N, 2C]`` at ``(x_t, t)``:
    ``{'mse' [N], 'vb' [N], 'loss' [N] = mse + vb}`` (float32; ``vb`` in bits per channel, its
    gradient reaching only the variance output)."""
    model_out = model_out.astype(jnp.float32)
    c = x0.shape[-1]
    eps = model_out[..., :c]
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), model_out[..., c:]], axis=-1)  # [N, 2C]
    out = p_mean_variance(sched, frozen, xt, t)
    true_mean, true_log_var = q_posterior(sched, x0, xt, t)
    axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]), axis=axes) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
    nll = jnp.mean(nll, axis=axes) / math.log(2.0)
    vb = jnp.where(t == 0, nll, kl)  # [N]
    mse = jnp.mean(jnp.square(noise - eps), axis=axes)  # [N]
    return {"mse": mse, "vb": vb, "loss": mse + vb}


# ----------------------------------------------------------------------------------- head


def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_DIM, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features ``[N, dim]`` float32 of (possibly fractional) timesteps ``t [N]``:
    ``[cos(t f_k) | sin(t f_k)]`` with ``f_k = max_period^(-k / half)``, zero-padded when ``dim`` is odd."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
    args = t.astype(jnp.float32)[:, None] * freqs[None]  # [N, half]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)  # [N, 2 half]
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def xavier_uniform(fan_in: int | None = None, fan_out: int | None = None):
    """Xavier/Glorot uniform over a kernel ``[*in, *out]``; the fans default to the first axis and
    the product of the others (pass them for multi-axis kernels)."""

    def init(key, shape, dtype=jnp.float32):
        fi = fan_in if fan_in is not None else shape[0]
        fo = fan_out if fan_out is not None else int(np.prod(shape[1:]))
        bound = math.sqrt(6.0 / (fi + fo))
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


class Dense(nn.Module):
    """Linear ``[..., in] -> [..., features]`` with kernel ``[in, features]`` (logical ``axes``),
    bias ``[features]`` (zero-initialised) and a chosen kernel initialiser."""

    features: int
    axes: tuple[str | None, str | None]
    kernel_init: Callable = xavier_uniform()
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), self.param_dtype)  # [in, out]
        bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.axes[1:]),
                          (self.features,), self.param_dtype)  # [out]
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


def layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nn.Module):
    """Affine LayerNorm (``scale``/``bias`` ``[D]``, logical ``axis``), normalised in float32."""

    eps: float = LN_EPS
    axis: str | None = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)), (d,),
                           self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis,)), (d,),
                          self.param_dtype)
        y = layer_norm(x, self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


_zeros = nn.initializers.zeros


class _TimeEmbed(nn.Module):
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, freq: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        normal = nn.initializers.normal(0.02)
        h = Dense(self.width, (None, "mlp"), normal, name="mlp_0", **kw)(freq)  # [N, W]
        return Dense(self.width, ("mlp", "embed"), normal, name="mlp_2", **kw)(nn.silu(h))  # [N, W]


class _ResBlock(nn.Module):
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        w, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ada = Dense(3 * w, ("embed", "mlp"), _zeros, name="adaLN_modulation", **kw)(nn.silu(y))  # [N, 3W]
        shift, scale, gate = ada[:, :w], ada[:, w: 2 * w], ada[:, 2 * w:]  # [N, W] each
        h = LayerNorm(LN_EPS, "mlp", name="in_ln", **kw)(x) * (1 + scale) + shift  # [N, W]
        h = Dense(w, ("embed", "mlp"), name="mlp_0", **kw)(h)  # [N, W]
        h = Dense(w, ("mlp", "embed"), name="mlp_2", **kw)(nn.silu(h))  # [N, W]
        return x + gate * h


class _FinalLayer(nn.Module):
    width: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        w, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ada = Dense(2 * w, ("embed", "mlp"), _zeros, name="adaLN_modulation", **kw)(nn.silu(y))  # [N, 2W]
        shift, scale = ada[:, :w], ada[:, w:]  # [N, W] each
        h = (layer_norm(x).astype(self.dtype) * (1 + scale) + shift)  # [N, W]
        return Dense(self.out_channels, ("embed", None), _zeros, name="linear", **kw)(h)  # [N, 2C]


class DiffusionHead(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: ``__call__(x [N, C], t [N], c [N, Cz]) -> [N, 2C]`` float32, the
    predicted noise and the variance interpolation of noisy tokens ``x`` at training timesteps
    ``t`` (ints or floats) given conditions ``c`` (see the module docstring)."""

    in_channels: int = 16
    width: int = 1024
    depth: int = 3
    frequency_dim: int = FREQUENCY_DIM
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels  # epsilon and the learned variance range

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        w, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        freq = timestep_embedding(t, self.frequency_dim)  # [N, 256]
        te = _TimeEmbed(w, self.dtype, self.param_dtype, name="time_embed")(freq)  # [N, W]
        y = te + Dense(w, ("embed", "mlp"), name="cond_embed", **kw)(c)  # [N, W]
        h = Dense(w, (None, "mlp"), name="input_proj", **kw)(x)  # [N, W]
        for i in range(self.depth):
            h = _ResBlock(w, name=f"res_blocks_{i}", **kw)(h, y)  # [N, W]
        out = _FinalLayer(w, self.out_channels, name="final_layer", **kw)(h, y)  # [N, 2C]
        return out.astype(jnp.float32)


def init_head(head: DiffusionHead, rng: jax.Array, cond_dim: int) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``head`` for conditions of width ``cond_dim``."""
    x = jnp.zeros((1, head.in_channels), jnp.float32)
    return head.init({"params": rng}, x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, cond_dim), jnp.float32))["params"]


# ------------------------------------------------------------------------------ loss, sampler


def diffusion_batch_mul(mul: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
    """Each array ``[N, ...]`` tiled ``mul`` times along its first axis (``[mul * N, ...]``), as MAR
    repeats every token's target, condition and mask to draw ``mul`` timesteps per token."""
    mul = int(mul)
    if mul < 1:
        raise ValueError(f"diffusion_batch_mul={mul} must be at least 1; MAR trains with 4.")
    return tuple(jnp.tile(a, (mul,) + (1,) * (a.ndim - 1)) for a in arrays)


def loss_terms(head: DiffusionHead, params: Any, target: jax.Array, z: jax.Array, t: jax.Array,
               noise: jax.Array, num_train_steps: int = NUM_TRAIN_STEPS,
               noise_schedule: str = "cosine") -> dict[str, jax.Array]:
    """Per-row loss terms (:func:`training_losses`) at given timesteps ``t [N]`` and ``noise [N, C]``."""
    sched = schedule(None, num_train_steps, noise_schedule)
    target = target.astype(jnp.float32)
    xt = q_sample(sched, target, t, noise.astype(jnp.float32))  # [N, C]
    out = head.apply({"params": params}, xt, t, z)  # [N, 2C]
    return training_losses(sched, out, target, xt, t, noise.astype(jnp.float32))


def diffusion_loss(head: DiffusionHead, params: Any, target: jax.Array, z: jax.Array, rng: jax.Array,
                   mask: jax.Array | None = None, batch_mul: int = 1,
                   num_train_steps: int = NUM_TRAIN_STEPS,
                   noise_schedule: str = "cosine") -> tuple[jax.Array, dict[str, jax.Array]]:
    """MAR's ``DiffLoss.forward``: the diffusion loss of tokens ``target [N, C]`` given ``z [N, Cz]``.

    Rows are tiled ``batch_mul`` times (:func:`diffusion_batch_mul`); each row draws a timestep
    uniformly from ``[0, num_train_steps)`` and Gaussian noise from ``rng``. Returns the float32
    loss (the mean of ``mse + vb`` over rows, weighted by ``mask [N]`` when given) and
    ``{'diffusion_mse', 'diffusion_vb'}`` weighted the same way.
    """
    if mask is None:
        mask = jnp.ones(target.shape[:1], jnp.float32)
    target, z, mask = diffusion_batch_mul(batch_mul, target, z, mask.astype(jnp.float32))
    t_key, n_key = jax.random.split(rng)
    t = jax.random.randint(t_key, target.shape[:1], 0, num_train_steps)  # [N']
    noise = jax.random.normal(n_key, target.shape, jnp.float32)  # [N', C]
    terms = loss_terms(head, params, target, z, t, noise, num_train_steps, noise_schedule)
    denom = jnp.maximum(jnp.sum(mask), 1.0)
    mean = lambda v: jnp.sum(v * mask) / denom  # noqa: E731
    loss = mean(terms["loss"])
    return loss, {"diffusion_mse": mean(terms["mse"]), "diffusion_vb": mean(terms["vb"])}


def guided_output(head: DiffusionHead, params: Any, x: jax.Array, t: jax.Array, z: jax.Array,
                  z_uncond: jax.Array | None = None, cfg_scale: float | jax.Array = 1.0) -> jax.Array:
    """The head's output ``[N, 2C]`` at ``x [N, C]`` and training timesteps ``t [N]``; with
    ``z_uncond`` the noise half is guided, ``eps_u + cfg_scale * (eps_c - eps_u)``, and the variance
    half is the conditional one (MAR's ``forward_with_cfg``, one batch of ``2N`` rows)."""
    if z_uncond is None:
        return head.apply({"params": params}, x, t, z)
    n, c = x.shape[0], x.shape[-1]
    out = head.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([z, z_uncond]))  # [2N, 2C]
    eps = out[n:, :c] + cfg_scale * (out[:n, :c] - out[n:, :c])  # [N, C]
    return jnp.concatenate([eps, out[:n, c:]], axis=-1)


def p_sample_step(sched: Schedule, model_out: jax.Array, x: jax.Array, i: jax.Array | int, noise: jax.Array,
                  temperature: float | jax.Array = 1.0) -> jax.Array:
    """One reverse step at respaced index ``i``: ``mean + [i > 0] exp(log_var / 2) temperature noise``
    (MAR's ``p_sample`` with temperature)."""
    pm = p_mean_variance(sched, model_out, x, jnp.full((x.shape[0],), i, jnp.int32))
    scale = jnp.where(jnp.asarray(i) > 0, jnp.exp(0.5 * pm["log_variance"]) * temperature, 0.0)
    return pm["mean"] + scale * noise


def p_sample_loop(head: DiffusionHead, params: Any, z: jax.Array, rng: jax.Array, *,
                  num_steps: int = DEFAULT_SAMPLING_STEPS, temperature: float | jax.Array = 1.0,
                  cfg_scale: float | jax.Array = 1.0, z_uncond: jax.Array | None = None,
                  noise: jax.Array | None = None, step_noise: jax.Array | None = None,
                  num_train_steps: int = NUM_TRAIN_STEPS, noise_schedule: str = "cosine") -> jax.Array:
    """Tokens ``[N, C]`` float32 drawn by the respaced DDPM sampler given conditions ``z [N, Cz]``.

    One ``lax.fori_loop`` over the ``num_steps`` kept steps, from ``i = num_steps - 1`` down to 0;
    step ``i`` draws its noise with ``fold_in(rng, i)`` (or reads ``step_noise [S, N, C]``, indexed
    by the loop counter), the start is ``noise [N, C]`` or a draw from ``rng``. ``temperature``
    scales the added noise (0: the mean path). With ``z_uncond [N, Cz]`` the head's noise
    prediction is guided, ``eps_u + cfg_scale * (eps_c - eps_u)`` (``cfg_scale`` may be traced).
    ``num_steps`` is static; zero or negative is a ``ValueError`` naming the fix.
    """
    sched = schedule(check_steps(num_steps), num_train_steps, noise_schedule)
    n, c = z.shape[0], head.in_channels
    init_key, loop_key = jax.random.split(rng)
    x = jax.random.normal(init_key, (n, c), jnp.float32) if noise is None else noise.astype(jnp.float32)
    ts = jnp.asarray(sched.timesteps, jnp.int32)  # [S]

    def body(k, x):
        i = sched.num_steps - 1 - k  # respaced index, counting down
        out = guided_output(head, params, x, jnp.full((n,), ts[i]), z, z_uncond, cfg_scale)  # [N, 2C]
        draw = (jax.random.normal(jax.random.fold_in(loop_key, i), x.shape, jnp.float32)
                if step_noise is None else step_noise[k])
        return p_sample_step(sched, out, x, i, draw, temperature)

    return jax.lax.fori_loop(0, sched.num_steps, body, x)


sample_jit = jax.jit(p_sample_loop, static_argnames=("head", "num_steps", "num_train_steps", "noise_schedule"))
