"""Forward + backward throughput of every quantizer at a realistic token count.

Each quantizer runs ``train=True`` on ``z`` of shape ``[8, 16, 16, D]`` (2,048 tokens: a batch of
eight 256-pixel images through a 16x downsampling tokenizer). One jitted step computes
``q.loss + sum(quantized * g)`` (``g`` a fixed random cotangent, standing in for the decoder's
gradient) and its gradient with respect to the quantizer's parameters and ``z``; tokens/s is
``B*H*W / median step time``. MFU is FLOPs per second over the measured matmul peak, with two
FLOP counts recorded for each row:

- ``xla_flops``: XLA's ``cost_analysis()`` of the compiled step. It counts elementwise work as
  well as products, and the body of a loop once, whatever its trip count.
- ``model_flops`` (``vq`` and ``rq``): ``2*N*K*d`` per lookup, the products of every token with
  every code (N tokens, K codes of width d; ``rq`` does 4 lookups). The backward pass adds no
  product: the code choice has no gradient, and the codebook's gradient is a scatter of N rows.

The ``mfu`` column uses ``model_flops`` where there is one and ``xla_flops`` otherwise. The
nearest-code search loops over blocks of codes, so XLA's count of the VQ step sees the products
of one block (plus elementwise work), a small fraction of those done; ``model_flops`` counts exactly the products any exhaustive search must do and
nothing else (no bias column, no re-computed block, no elementwise work). ``mfu_xla`` keeps XLA's
figure beside it. The settings are the published ones where a paper fixes them:

- ``vq``: VectorQuantizer, 16,384 codes of dim 8, l2-normalised (LlamaGen VQ-16).
- ``lfq``: LookupFreeQuantizer, D=18 (262,144 implicit codes), codebook entropy in 2 channel
  groups (Open-MAGVIT2).
- ``fsq``: FiniteScalarQuantizer, levels (8, 8, 8, 5, 5, 5) = 64,000 codes (FSQ paper).
- ``ibq``: IndexBackpropQuantizer, 16,384 codes of dim 256 (IBQ).
- ``rq``: ResidualQuantizer, 4 levels sharing 16,384 codes of dim 256 (RQ-VAE).
- ``msrq``: MultiScaleResidualQuantizer, 4,096 codes of dim 32, VAR's scales 1..16.

``python benchmarks/quantizers.py [--quick]`` prints the rows; the harness collects ``run()``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from vqgen import quantizers as Q

RNG_STREAMS = ("dropout", "codebook", "quantizer")

# name -> (constructor keyword arguments, channels D of z)
SPECS: dict[str, tuple[type, dict, int]] = {
    "vq": (Q.VectorQuantizer, dict(codebook_size=16384, l2_normalize=True), 8),
    "lfq": (Q.LookupFreeQuantizer, dict(dim=18, num_groups=2), 18),
    "fsq": (Q.FiniteScalarQuantizer, dict(levels=(8, 8, 8, 5, 5, 5)), 6),
    "ibq": (Q.IndexBackpropQuantizer, dict(codebook_size=16384), 256),
    "rq": (Q.ResidualQuantizer, dict(num_levels=4, codebook_size=16384, shared_codebook=True), 256),
    "msrq": (Q.MultiScaleResidualQuantizer, dict(codebook_size=4096), 32),
}


def bench_one(name: str, grid: tuple[int, int, int] = (8, 16, 16), reps: int = 5, **overrides) -> dict:
    """Times one quantizer's jitted forward+backward step on ``z [*grid, D]``.

    ``overrides`` replace constructor fields (tests use tiny codebooks; the multi-scale
    quantizer needs ``scales[-1] == grid[-1]``). Returns the measurements as a dict.
    """
    if name not in SPECS:
        raise ValueError(f"unknown quantizer benchmark {name!r}; use one of {sorted(SPECS)}.")
    cls, kw, dim = SPECS[name]
    kw = {**kw, **overrides}
    if name == "lfq":
        dim = kw["dim"]
    if name == "fsq":
        dim = len(kw["levels"])
    q = cls(**kw)
    z = jax.random.normal(jax.random.key(0), (*grid, dim), jnp.float32)  # [B, H, W, D]
    g = jax.random.normal(jax.random.key(1), z.shape, jnp.float32)  # [B, H, W, D] cotangent
    rngs = {s: jax.random.key(i + 2) for i, s in enumerate(RNG_STREAMS)}
    variables = q.init({"params": jax.random.key(7), **rngs}, z, train=False)
    variables = nn.meta.unbox(variables)
    params = variables.get("params", {})
    state = {k: v for k, v in variables.items() if k != "params"}
    mutable = list(state.keys()) or False

    def loss(p, zz):
        out = q.apply({"params": p, **state}, zz, train=True, rngs=rngs, mutable=mutable)
        out = out[0] if mutable else out
        return out.loss + jnp.sum(out.quantized.astype(jnp.float32) * g)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    compiled = step.lower(params, z).compile()
    compile_s = time.perf_counter() - t0
    stats = common.compiled_stats(compiled)
    timing = common.time_fn(functools.partial(compiled, params, z), warmup=1, reps=reps)
    tokens = 1
    for s in grid:
        tokens *= s
    return {
        "model_flops": model_flops(name, kw, tokens, dim),
        "quantizer": name, "class": cls.__name__, "fields": {k: v for k, v in kw.items()}, "z_shape": list(z.shape),
        "tokens": tokens, "compile_s": compile_s, "step_s": timing["median_s"], "step_min_s": timing["min_s"],
        "reps": timing["reps"], "tokens_per_s": tokens / timing["median_s"], "xla_flops": stats["xla_flops"],
        "compiled_memory_mib": stats["memory_mib"], "peak_rss_mib": common.peak_rss_mib(),
    }


def model_flops(name: str, kw: dict, tokens: int, dim: int) -> float | None:
    """``2*N*K*d`` per nearest-code lookup of the ``vq`` and ``rq`` steps (forward and backward);
    None for the other quantizers, whose MFU uses XLA's count."""
    if name == "vq":
        width = kw.get("code_dim") or dim
        return 2.0 * tokens * kw["codebook_size"] * width
    if name == "rq":
        return kw["num_levels"] * 2.0 * tokens * kw["codebook_size"] * dim
    return None


def _mfu(flops: float | None, step_s: float) -> float | None:
    """``flops`` per second over the machine's measured matmul peak."""
    if not flops:
        return None
    return flops / step_s / 1e9 / common.matmul_peak()["gflops"]


def run(quick: bool = False) -> dict:
    """Every quantizer of :data:`SPECS` at ``[8, 16, 16, D]``; nothing is asserted."""
    reps = 2 if quick else 10
    results, table = [], []
    for name in SPECS:
        r = bench_one(name, reps=reps)
        print(json.dumps({k: r[k] for k in ("quantizer", "tokens_per_s", "step_s", "compile_s")}), flush=True)
        r["mfu_xla"] = _mfu(r["xla_flops"], r["step_s"])
        r["mfu_model"] = _mfu(r["model_flops"], r["step_s"])
        r["mfu"] = r["mfu_model"] if r["model_flops"] else r["mfu_xla"]
        r["mfu_flops"] = "model" if r["model_flops"] else "xla"
        results.append(r)
        mem = r["compiled_memory_mib"]
        table.append(common.row(
            "quantizers", f"{name} fwd+bwd {r['z_shape']}", throughput=r["tokens_per_s"], unit="tokens/s",
            step_s=r["step_s"], peak_rss_mib=r["peak_rss_mib"], compiled_mib=mem["total"] if mem else None,
            mfu=r["mfu"], note=r["class"] + (", MFU by 2NKd" if r["model_flops"] else "")))
    return {"benchmark": "quantizers", "quick": quick, "results": results, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    print(json.dumps(run(args.quick)["table"], indent=1))


if __name__ == "__main__":
    main()
