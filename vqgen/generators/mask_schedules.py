"""Mask schedules of masked generative transformers (MaskGIT, MAGVIT, MUSE).

A schedule ``gamma`` maps ``r`` in [0, 1] -- the fraction of the way through decoding, or a
uniform draw during training -- to the ratio of tokens that are still masked. Every schedule
has ``gamma(0) = 1`` (everything masked) and decreases to (about) 0 at ``r = 1``. As in
google-research/maskgit ``libml/mask_schedule.py`` the ratio is clipped to ``[1e-6, 1]``.

=============  ==========================================  ==============================
name           ``gamma(r)``                                 source
=============  ==========================================  ==============================
``cosine``     ``cos(pi / 2 * r)``                          MaskGIT (its default)
``linear``     ``1 - r``                                    MaskGIT's ``uniform``
``square``     ``1 - r**2``                                 MaskGIT ``pow2``
``sqrt``       ``1 - r**0.5``                               MaskGIT ``pow0.5``
``pow<k>``     ``1 - r**k`` (any k > 0, e.g. ``pow3``)      MaskGIT
``log``        ``-log2(r) / log2(N)``                       MaskGIT
``exp``        ``1 - 2**(-log2(N) * (1 - r))``              MaskGIT
``arccos``     ``arccos(r) / (pi / 2)``                     MUSE / MaskGIT-pytorch
=============  ==========================================  ==============================

``N`` is the number of tokens that can be masked (``num_tokens``); only ``log`` and ``exp``
depend on it. ``uniform`` is accepted as MaskGIT's name for ``linear``.

The decoding count (:func:`num_masked`) is MaskGIT's ``parallel_decode.decode`` rule, computed
in float64 on the host; the sampler in :mod:`vqgen.generators.maskgit` reads the same numbers
from a table built by :func:`scheduled_counts`, so the two agree exactly.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES: tuple[str, ...] = ("cosine", "linear", "square", "sqrt", "pow<k>", "log", "exp", "arccos")

_MIN_RATIO = 1e-6


def _pow_exponent(schedule: str) -> float | None:
    """The exponent ``k`` of ``'pow<k>'``, or None when ``schedule`` is not of that form."""
    if not schedule.startswith("pow"):
        return None
    try:
        k = float(schedule[3:])
    except ValueError:
        return None
    return k if math.isfinite(k) and k > 0 else None


def check_schedule(schedule: str) -> str:
    """Returns ``schedule`` if it names a mask schedule, else raises ValueError listing them."""
    if isinstance(schedule, str) and (
        schedule in SCHEDULES or schedule == "uniform" or _pow_exponent(schedule) is not None
    ):
        return schedule
    raise ValueError(
        f"mask schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)} "
        "(pow<k> with a positive number k, e.g. 'pow3')."
    )


def mask_ratio(schedule: str, r, num_tokens: int | None = None):
    """Ratio of tokens still masked at ``r`` in [0, 1] under ``schedule`` (see module table).

    ``r`` may be a Python/NumPy number or array (computed in float64 with NumPy) or a JAX array
    (computed with ``jax.numpy`` in its dtype, so it works under ``jit``). ``num_tokens`` (N,
    the number of maskable tokens; a number or an array broadcasting with ``r``) is required
    by ``'log'`` and ``'exp'`` only. The result is clipped to ``[1e-6, 1]``.
    """
    check_schedule(schedule)
    use_jax = isinstance(r, jax.Array) or isinstance(num_tokens, jax.Array)
    xp = jnp if use_jax else np
    r = xp.asarray(r, dtype=None if use_jax else np.float64)
    if use_jax and not jnp.issubdtype(r.dtype, jnp.floating):
        r = r.astype(jnp.float32)
    if schedule in ("log", "exp"):
        if num_tokens is None:
            raise ValueError(f"mask schedule {schedule!r} depends on the number of tokens; pass num_tokens=N.")
        log_n = xp.log2(xp.maximum(xp.asarray(num_tokens, r.dtype), 2.0))
    if schedule == "cosine":
        ratio = xp.cos(math.pi / 2.0 * r)
    elif schedule in ("linear", "uniform"):
        ratio = 1.0 - r
    elif schedule == "square":
        ratio = 1.0 - r**2
    elif schedule == "sqrt":
        ratio = 1.0 - xp.sqrt(r)
    elif schedule == "log":
        with np.errstate(divide="ignore"):
            ratio = -xp.log2(r) / log_n  # +inf at r = 0, clipped to 1 below
    elif schedule == "exp":
        ratio = 1.0 - xp.exp2(-log_n * (1.0 - r))
    elif schedule == "arccos":
        ratio = xp.arccos(xp.clip(r, -1.0, 1.0)) / (math.pi / 2.0)
    else:
        ratio = 1.0 - r ** _pow_exponent(schedule)
    return xp.clip(ratio, _MIN_RATIO, 1.0)


def scheduled_counts(schedule: str, total_steps: int, max_tokens: int) -> np.ndarray:
    """int32 table ``[T, max_tokens + 1]``: ``floor(mask_ratio((t + 1) / T, n) * n)`` at ``[t, n]``.

    The schedule's raw target for the number still masked after step ``t`` when ``n`` tokens
    were unknown at the start, in float64 (before :func:`num_masked`'s clamping).
    """
    check_schedule(schedule)
    steps = np.arange(1, total_steps + 1, dtype=np.float64)[:, None] / total_steps  # [T, 1]
    n = np.arange(max_tokens + 1, dtype=np.float64)[None, :]  # [1, N+1]
    counts = np.floor(mask_ratio(schedule, steps, n) * n)  # [T, N+1]
    return counts.astype(np.int32)


def num_masked(schedule: str, step: int, total_steps: int, num_tokens: int) -> int:
    """How many tokens are still masked after decoding step ``step`` (0-based) of ``total_steps``.

    With ``m_{-1} = num_tokens`` (every unknown token masked at the start) and
    ``s_t = floor(mask_ratio(schedule, (t + 1) / T, num_tokens) * num_tokens)``:

    - for ``t < T - 1``: ``m_t = max(1, min(m_{t-1} - 1, s_t))`` -- at least one token is
      decoded per step while more than one is masked, and at least one stays masked for the
      last step (MaskGIT ``parallel_decode``: ``mask_len``);
    - ``m_{T-1} = 0``: the last step decodes everything that is left (MaskGIT returns the
      fully sampled sequence of its last iteration).

    When only one token is left before the last step, ``m_t`` stays 1 (MaskGIT's rule; such a
    step decodes nothing). ``num_tokens == 0`` gives 0 at every step.
    """
    if not 0 <= step < total_steps:
        raise ValueError(f"step={step} is outside [0, {total_steps}); decoding steps count from 0 to total_steps - 1.")
    counts = scheduled_counts(schedule, total_steps, num_tokens)[:, num_tokens]  # [T]
    m = int(num_tokens)
    for t in range(step + 1):
        if t == total_steps - 1 or num_tokens == 0:
            m = 0
        else:
            m = max(1, min(m - 1, int(counts[t])))
    return m
