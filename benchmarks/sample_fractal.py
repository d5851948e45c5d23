"""FractalMAR-64 pixel-by-pixel sampling: images/s and memory at batch 8 and 64.

The model is ``configs/generators/fractal.py:MAR-64`` (levels 64 -> 4 -> 1, 432.0M parameters) in
float32 with random weights (the speed and memory of a sampler do not depend on what the weights
learnt), sampled with the README's FID settings: linear guidance 6.5 (a doubled batch at every
level), temperature 1.02, filter threshold 1e-4, iterations ``(64, 16)``: 64 iterations of the
32-block level-0 transformer, each running 16 iterations of level 1 over the patches it reveals,
each of those drawing 3 channels per pixel. One compiled program holds all of it
(:func:`vqgen.generators.fractal.sample`).

Reported per batch: the compiled program's memory (``memory_analysis()``: arguments, outputs and
temporaries, the device memory the sampler needs, which the official code is known to blow up at
large batches: fractalgen issue #12), the compile time, and the wall time of one call with
``--num-iter-list`` iterations (default the paper's). Sampling time grows with the product of the
level-0 iterations and the level-1 work per iteration, so ``images_per_s_paper`` scales a run at
fewer level-0 iterations to 64 (the level-1 count is kept); a run at the paper's count is
reported as measured. The process's peak resident memory is reported too. Nothing is asserted.

    python benchmarks/sample_fractal.py --batches 8,64 --num-iter-list 64,16
    python benchmarks/sample_fractal.py --quick          # level-0 iterations 2: a few minutes
"""
from __future__ import annotations

import argparse
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
from vqgen import config_lib
from vqgen.generators import fractal

PAPER_ITERS = (64, 16)


def build(variant: str = "MAR-64"):
    """``(config, model, params)`` of the paper config in float32 with random weights."""
    config = config_lib.load_config("generators/fractal", variant)
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.generator.to_dict().items()}
    cfg["dtype"] = "float32"
    model = fractal.build(cfg, num_classes=int(config.data.num_classes), image_size=int(config.data.image_size),
                          channels=int(config.data.channels))
    params = jax.jit(lambda k: nn.meta.unbox(fractal.init_params(model, k)))(jax.random.key(0))
    return config, model, params


def run(quick: bool = False, *, variant: str = "MAR-64", batches=(8, 64), num_iter_list=None) -> dict:
    """Compiles and times the sampler at each batch size; nothing is asserted."""
    config, model, params = build(variant)
    iters = tuple(num_iter_list or ((2, PAPER_ITERS[1]) if quick else PAPER_ITERS))
    sample = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.sample.to_dict().items()}
    opts = fractal.sampler_options(sample, num_iter_list=iters)
    rows = []
    for batch in batches:
        labels = jnp.arange(batch, dtype=jnp.int32) * 7 % int(config.data.num_classes)
        t0 = time.perf_counter()
        compiled = jax.jit(fractal._sample_body, static_argnames=("model", "opts")).lower(
            model, params, labels, jax.random.key(3), opts).compile()
        compile_s = time.perf_counter() - t0
        stats = common.compiled_stats(compiled)
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(params, labels, jax.random.key(3)))
        seconds = time.perf_counter() - t0
        scale = PAPER_ITERS[0] / iters[0] if iters[1:] == PAPER_ITERS[1:] else None
        r = {"variant": variant, "batch": batch, "num_iter_list": list(iters), "seconds": seconds,
             "images_per_s": batch / seconds, "compile_s": compile_s,
             "images_per_s_paper": (batch / (seconds * scale)) if scale else None,
             "memory_mib": stats["memory_mib"], "peak_rss_mib": common.peak_rss_mib(),
             "finite": bool(jnp.isfinite(out).all()), "options": {"cfg_scale": opts.cfg_scale,
                                                                   "temperature": opts.temperature}}
        rows.append(r)
        print(json.dumps(r), flush=True)
    table = [common.row(
        "sample_fractal", f"FractalMAR-64 batch {r['batch']}, cfg 6.5 linear, iterations {tuple(r['num_iter_list'])}",
        throughput=r["images_per_s"], unit="images/s", step_s=r["seconds"] / r["batch"], peak_rss_mib=r["peak_rss_mib"],
        compiled_mib=(r["memory_mib"] or {}).get("total"),
        note=(f"at the paper's (64, 16): {r['images_per_s_paper']:.3g} images/s (scaled)"
              if r["images_per_s_paper"] and tuple(r["num_iter_list"]) != PAPER_ITERS else "")) for r in rows]
    return {"benchmark": "sample_fractal", "quick": quick, "variant": variant, "params": fractal.count_params(model),
            "machine": common.machine_info(), "results": rows, "table": table,
            "step_s_meaning": "seconds per image"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 level-0 iterations instead of 64")
    parser.add_argument("--variant", default="MAR-64", help="a variant of configs/generators/fractal.py")
    parser.add_argument("--batches", default="8,64", help="comma-separated batch sizes")
    parser.add_argument("--num-iter-list", default=None, help="iterations per level, e.g. 64,16")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    iters = tuple(int(i) for i in args.num_iter_list.split(",")) if args.num_iter_list else None
    result = run(args.quick, variant=args.variant, batches=tuple(int(b) for b in args.batches.split(",")),
                 num_iter_list=iters)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
