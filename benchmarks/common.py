"""Shared measuring tools of the benchmark harness (``python benchmarks/run.py``).

- :func:`matmul_peak`: this machine's float32 matmul throughput (jitted ``n x n`` matmul, best
  of a few repetitions, GFLOP/s): the denominator of every model FLOPs utilisation (MFU).
- :func:`copy_bandwidth`: streaming memory bandwidth (donated in-place ``x + 1``: bytes read +
  written per second; ``sum(x)``: bytes read per second).
- :func:`time_fn`: warm-up calls, then the median (and min) of timed calls, each blocked with
  ``jax.block_until_ready``.
- :func:`compiled_stats`: XLA's ``cost_analysis()`` FLOPs and ``memory_analysis()`` bytes of a
  compiled executable, where the backend provides them.
- :func:`peak_rss_mib`: the process's resident-memory high-water mark (``ru_maxrss``).
- :func:`machine_info`: machine name, jax version, device kind and count, load average.

Nothing here asserts anything about a timing. The harness measures the matmul peak and the
bandwidth once and hands them to each benchmark process through the environment variable
:data:`PEAKS_ENV`, so every module divides by the same peak.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

PEAKS_ENV = "VQGEN_BENCH_PEAKS"
_CACHE: dict[str, dict] = {}


def _peaks_from_env() -> dict:
    raw = os.environ.get(PEAKS_ENV)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{PEAKS_ENV} holds invalid JSON ({e}); unset it to measure the peaks again.") from e


def best_time(fn: Callable[[], Any], reps: int) -> float:
    """Best wall time (s) of ``reps`` calls of ``fn``; ``fn``'s result is blocked on."""
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, reps: int = 3) -> dict:
    """Times ``fn()`` (its result blocked with ``jax.block_until_ready``).

    Runs ``warmup`` untimed calls (compilation happens there), then ``reps`` timed calls.
    Returns ``{"median_s", "min_s", "reps", "first_call_s"}`` (``first_call_s``: the first
    warm-up call, compile included; None without warm-up).
    """
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times), "first_call_s": first}


def matmul_peak(n: int = 4096, reps: int = 3) -> dict:
    """float32 ``n x n`` jitted matmul: ``{"n", "seconds", "gflops"}`` (best of ``reps``).

    Returns the harness's measurement (from :data:`PEAKS_ENV`) or this process's earlier one
    when there is one, so a process measures it at most once.
    """
    env = _peaks_from_env().get("matmul_peak")
    if env:
        return env
    if "matmul_peak" not in _CACHE:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()
        t = best_time(lambda: f(a, b), reps)
        _CACHE["matmul_peak"] = {"n": n, "seconds": t, "gflops": 2 * n**3 / t / 1e9, "dtype": "float32"}
    return _CACHE["matmul_peak"]


def copy_bandwidth(mib: int = 256, reps: int = 5) -> dict:
    """Streaming bandwidth over a float32 array of ``mib`` MiB.

    ``gb_per_s``: in-place ``x + 1`` with the input donated (bytes read + written per second; a
    fresh output buffer would mostly time page faults). ``read_gb_per_s``: ``sum(x)`` (read
    only). Like :func:`matmul_peak`, measured at most once per process.
    """
    env = _peaks_from_env().get("copy_bandwidth")
    if env:
        return env
    if "copy_bandwidth" not in _CACHE:
        x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
        nbytes = x.nbytes
        inc = jax.jit(lambda v: v + 1.0, donate_argnums=0)
        state = {"x": inc(x)}

        def once():
            state["x"] = inc(state["x"])
            return state["x"]

        once().block_until_ready()
        t = best_time(once, reps)
        total = jax.jit(jnp.sum)
        total(state["x"]).block_until_ready()
        t_read = best_time(lambda: total(state["x"]), reps)
        _CACHE["copy_bandwidth"] = {"mib": mib, "seconds": t, "gb_per_s": 2 * nbytes / t / 1e9,
                                    "read_gb_per_s": nbytes / t_read / 1e9}
        del state
    return _CACHE["copy_bandwidth"]


def peak_rss_mib() -> float:
    """This process's peak resident memory so far in MiB (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def compiled_stats(compiled) -> dict:
    """FLOPs and memory of a compiled executable (``jax.jit(f).lower(...).compile()``).

    ``xla_flops``: ``cost_analysis()["flops"]`` (None where the backend gives none);
    ``memory_mib``: ``memory_analysis()``'s argument, output, temp and alias sizes and
    ``total`` = arguments + outputs + temps - aliased (buffers donated into outputs), in MiB.
    """
    out: dict[str, Any] = {"xla_flops": None, "memory_mib": None}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            out["xla_flops"] = float(cost["flops"])
    except Exception:  # noqa: BLE001 - some backends do not implement it
        pass
    try:
        m = compiled.memory_analysis()
        if m is not None:
            mib = 2.0**20
            mem = {"arguments": m.argument_size_in_bytes / mib, "outputs": m.output_size_in_bytes / mib,
                   "temps": m.temp_size_in_bytes / mib, "aliased": m.alias_size_in_bytes / mib}
            mem["total"] = mem["arguments"] + mem["outputs"] + mem["temps"] - mem["aliased"]
            peak = getattr(m, "peak_memory_in_bytes", 0)
            if peak:
                mem["peak"] = peak / mib
            out["memory_mib"] = mem
    except Exception:  # noqa: BLE001
        pass
    return out


def sanitize_name(name: str) -> str:
    """A file-name-safe machine name: letters, digits, ``-`` and ``_`` only."""
    clean = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
    return clean or "machine"


def machine_info(name: str | None = None) -> dict:
    """Where the numbers come from: machine name, jax version, devices, CPU count, load."""
    devices = jax.devices()
    return {
        "name": sanitize_name(name or platform.node()),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def row(benchmark: str, case: str, *, throughput: float | None, unit: str, step_s: float | None = None,
        peak_rss_mib: float | None = None, compiled_mib: float | None = None, mfu: float | None = None,
        cache_speedup: float | None = None, note: str = "") -> dict:
    """One line of the harness's Markdown table; every benchmark returns a list of these as ``"table"``."""
    return {"benchmark": benchmark, "case": case, "throughput": throughput, "unit": unit, "step_s": step_s,
            "peak_rss_mib": peak_rss_mib, "compiled_mib": compiled_mib, "mfu": mfu,
            "cache_speedup": cache_speedup, "note": note}
