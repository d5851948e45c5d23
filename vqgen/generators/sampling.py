"""Sampling utilities shared by the generators: temperature, top-k / top-p filtering and
classifier-free-guidance schedules. Everything is jit-friendly; options are static Python
numbers and every computation on logits is float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

CFG_SCHEDULES = ("constant", "linear")
# Keys of a ``sample`` config section that the run reads (how many samples, in which batches,
# which weights), not the sampler: every family's section holds them beside its options.
RUN_KEYS = ("per_class", "batch_size", "use_ema")


def check_options(*, temperature: float, top_k: int, top_p: float, cfg_schedule: str,
                  cfg_interval, unit: str = "token") -> tuple[float, float]:
    """Validates the sampling options every sampler shares; returns ``cfg_interval`` as floats.

    Each bad value raises one ``ValueError`` sentence naming it and the fix; ``unit`` names what
    the interval fractions count ("token" for raster AR, "step" for parallel decoding).
    """
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is outside [0, 1]; use 1.0 to turn nucleus sampling off, 0.0 for greedy.")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is negative; use 0 to turn top-k off or a positive count.")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} is negative; use a value > 0, or 0 for greedy.")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule={cfg_schedule!r} is unknown; use one of {CFG_SCHEDULES}.")
    interval = tuple(float(x) for x in cfg_interval)
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(
            f"cfg_interval={cfg_interval} must be (start, end) with 0 <= start <= end <= 1; "
            f"use (0.0, 1.0) to guide every {unit}."
        )
    return interval


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The sampling options every family shares (static and hashable; the key is an argument).

    - ``temperature``: logits are divided by it; 0 means greedy argmax.
    - ``top_k``: keep the k most likely tokens (0 = off); ``top_k=1`` is greedy.
    - ``top_p``: nucleus mass in [0, 1] (1 = off, 0 = greedy).
    - ``cfg_scale``: classifier-free guidance ``cond + (s - 1) * (cond - uncond)``; 1 = off
      (then the unconditional batch is not run at all).
    - ``cfg_schedule``: ``'constant'`` or ``'linear'`` (scale 1 at the first decoding step rising
      to ``cfg_scale`` at the last), see :func:`cfg_scale_at`.
    - ``cfg_interval``: ``(start, end)`` fractions of the decoding steps; step ``t`` of ``T`` is
      guided only when ``start <= t / T < end``.

    A family whose sampler has more options subclasses this dataclass (MaskGIT adds the number of
    steps, the choice temperature and the mask schedule), so one family's options are never read
    by another. :meth:`from_dict` builds the options from a config ``sample`` section and refuses
    a key that the family does not read.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    cfg_interval: tuple[float, float] = (0.0, 1.0)

    # What the CFG interval fractions count, in error messages ("token" or "step").
    _UNIT = "token"

    def __post_init__(self):
        interval = check_options(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            cfg_schedule=self.cfg_schedule, cfg_interval=self.cfg_interval, unit=self._UNIT)
        object.__setattr__(self, "cfg_interval", interval)
        object.__setattr__(self, "top_k", int(self.top_k))

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The option names, i.e. the keys this family reads from a ``sample`` section."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, cfg: Any, family: str = "this", **overrides: Any):
        """Options from a ``sample`` section (a dict; :data:`RUN_KEYS` are skipped) and overrides.

        Raises ``ValueError`` naming the family when a key is not one of its options.
        """
        kw = {k: v for k, v in dict(cfg).items() if k not in RUN_KEYS}
        kw.update(overrides)
        unknown = sorted(set(kw) - set(cls.keys()))
        if unknown:
            raise ValueError(
                f"sample.{unknown[0]} is not an option of the {family!r} generator; remove it (the "
                f"{family!r} sampler reads {sorted(cls.keys())}, and every family reads {list(RUN_KEYS)}).")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()})


_TOP_K_BY_SEARCH = 16  # larger k: the k-th value by bisection, not by lax.top_k


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys of float32 ``x`` whose unsigned order is the floats' order (-inf lowest)."""
    x = x.astype(jnp.float32)
    x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 ties with +0.0, as the float comparison has it
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def kth_largest_key(keys: jax.Array, k: int) -> jax.Array:
    """The order key ``[..., 1]`` of the ``k``-th largest of ``keys [..., V]`` (uint32), exactly:
    the largest ``t`` with at least ``k`` keys ``>= t``, found by bisection over the 32-bit key
    range (32 counting passes over the row, no sort)."""
    lo = jnp.min(keys, axis=-1, keepdims=True)  # count(>= lo) = V >= k
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + (gap >> 1) + (gap & 1)  # ceil of the midpoint, without overflow
        enough = jnp.sum(keys >= mid, axis=-1, keepdims=True, dtype=jnp.int32) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    return jax.lax.fori_loop(0, 32, body, (lo, jnp.maximum(hi, lo)))[0]


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the ``k`` largest logits of the last axis (ties with the k-th kept), others -> -inf.

    ``k == 0`` (or ``k >= vocab``) leaves the logits unchanged. ``k`` is static. For ``k`` above
    16 the k-th value comes from :func:`kth_largest_key` (exact, the same logits kept): on XLA's
    CPU backend ``lax.top_k`` with k = 2000 of 16384 took 32 ms for 8 rows, about as long as a
    GPT-B decoding step, and the bisection a few.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    if k > _TOP_K_BY_SEARCH:
        keys = _order_keys(logits)
        return jnp.where(keys < kth_largest_key(keys, k), -jnp.inf, logits)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability mass
    reaches ``p`` (the most likely token is always kept), others -> -inf.

    ``p >= 1`` leaves the logits unchanged; ``p == 0`` keeps only the most likely token
    (greedy). ``p`` is static.
    """
    if p >= 1.0:
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)  # [..., V] descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)  # [..., V]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [..., V] mass of strictly better tokens
    keep = mass_before < p
    keep = keep.at[..., 0].set(True)
    num_keep = jnp.sum(keep, axis=-1, keepdims=True)  # [..., 1]
    threshold = jnp.take_along_axis(sorted_logits, num_keep - 1, axis=-1)  # [..., 1]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """float32 logits divided by ``temperature`` (when > 0), then top-k, then top-p filtered."""
    logits = logits.astype(jnp.float32)
    if temperature > 0:
        logits = logits / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def sample_logits(
    rng: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Draws int32 ids ``[...]`` from ``logits [..., V]`` after :func:`filter_logits`.

    ``temperature == 0`` is greedy (argmax). With ``top_k == 1`` or ``top_p == 0`` only the
    argmax survives the filter, so sampling is deterministic whatever the key.
    """
    filtered = filter_logits(logits, temperature, top_k, top_p)  # [..., V]
    if temperature == 0:
        return jnp.argmax(filtered, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


def cfg_scale_at(
    step: jax.Array | int,
    num_steps: int,
    scale: float,
    schedule: str = "constant",
    interval: tuple[float, float] = (0.0, 1.0),
) -> jax.Array:
    """Guidance scale (float32 scalar) for decoding step ``step`` of ``num_steps``.

    - ``'constant'``: ``scale`` at every step.
    - ``'linear'``: ``1 + (scale - 1) * step / (num_steps - 1)``, from 1 (no guidance) at the
      first step to ``scale`` at the last (``scale`` when ``num_steps == 1``).

    Outside ``interval = (start, end)``, i.e. unless ``start <= step / num_steps < end``, the
    scale is 1 (conditional logits only).
    """
    step_f = jnp.asarray(step, jnp.float32)
    if schedule == "constant":
        s = jnp.asarray(scale, jnp.float32)
    elif schedule == "linear":
        ramp = step_f / (num_steps - 1) if num_steps > 1 else jnp.float32(1.0)
        s = 1.0 + (scale - 1.0) * ramp
    else:
        raise ValueError(f"cfg_schedule={schedule!r} is unknown; use one of {CFG_SCHEDULES}.")
    frac = step_f / num_steps
    on = (frac >= interval[0]) & (frac < interval[1])
    return jnp.where(on, s, jnp.float32(1.0)).astype(jnp.float32)


def guide(cond_logits: jax.Array, uncond_logits: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance in float32: ``cond + (scale - 1) * (cond - uncond)``.

    Equal to ``uncond + scale * (cond - uncond)``; written this way so that scale 1 returns the
    conditional logits exactly.
    """
    c = cond_logits.astype(jnp.float32)
    u = uncond_logits.astype(jnp.float32)
    return c + (jnp.asarray(scale, jnp.float32) - 1.0) * (c - u)
