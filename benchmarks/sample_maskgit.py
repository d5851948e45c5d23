"""MaskGIT parallel decoding (8 and 16 steps) against GPT raster decoding on the same token grid.

Both generators model a 16x16 grid of a 1,024-code tokenizer (MaskGIT's) with 1,000 classes,
at the same width and depth (256 wide, 4 layers, 4 heads, float32; random weights — the speed of
a sampler does not depend on what the weights learnt), batch 8:

- MaskGIT (:func:`vqgen.generators.maskgit.sample`): T full bidirectional passes over 257
  positions, T = 8 and 16 (cosine schedule, choice temperature 4.5).
- GPT (:func:`vqgen.generators.gpt.sample`): 256 one-token decoding steps with the KV cache;
  and, for the cache ratio, the no-cache sampler (:func:`gpt.sample_without_cache`, every step
  a full causal pass over the padded sequence; a few steps give its per-token rate).

Reported: images/s and wall seconds per image of each, and MaskGIT's speed-up over GPT. Token
sampling only (the tokenizer's decoder is the same for both and is left out). Nothing asserted.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from vqgen.generators import gpt, maskgit

GRID = (16, 16)
CODEBOOK = 1024
CLASSES = 1000


def build_models(width: int = 256, depth: int = 4, heads: int = 4, mlp: int = 1024, grid=GRID):
    """(MaskGIT transformer, GPT) of equal width/depth over ``grid`` tokens, with random params."""
    mg = maskgit.build(dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp, dropout=0.0,
                            class_dropout_prob=0.0), vocab_size=CODEBOOK, num_classes=CLASSES, grid=grid)
    gp = gpt.build(dict(width=width, depth=depth, num_heads=heads, token_dropout_prob=0.0, resid_dropout_prob=0.0,
                        ffn_dropout_prob=0.0), vocab_size=CODEBOOK, num_classes=CLASSES, grid=grid)
    mg_params = jax.jit(lambda k: nn.meta.unbox(maskgit.init_params(mg, k)))(jax.random.key(0))
    gp_params = jax.jit(lambda k: nn.meta.unbox(gpt.init_params(gp, k)))(jax.random.key(1))
    # GPT's output head starts at zero (uniform logits); a random one makes sampling typical.
    gp_params["output"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(2), gp_params["output"]["kernel"].shape)
    return mg, mg_params, gp, gp_params


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def run(quick: bool = False, *, batch: int = 8, steps=(8, 16), grid=GRID, width: int = 256, depth: int = 4,
        no_cache_steps: int | None = None) -> dict:
    """MaskGIT at each of ``steps`` and GPT (cache and no cache) at ``batch``; nothing is asserted."""
    reps = 1 if quick else 3
    no_cache_steps = no_cache_steps or (4 if quick else 16)
    mg, mg_params, gp, gp_params = build_models(width=width, depth=depth, heads=4, mlp=4 * width, grid=grid)
    labels = jnp.arange(batch, dtype=jnp.int32) % CLASSES
    tokens = grid[0] * grid[1]
    rows = []
    for t in steps:
        opts = maskgit.SamplerOptions(num_steps=t)
        tm = common.time_fn(lambda: maskgit.sample(mg, mg_params, labels, jax.random.key(3), opts), warmup=1, reps=reps)
        rows.append({"sampler": "maskgit", "steps": t, "batch": batch, "seconds": tm["median_s"],
                     "first_call_s": tm["first_call_s"], "images_per_s": batch / tm["median_s"],
                     "seconds_per_image": tm["median_s"] / batch})
        print(json.dumps(rows[-1]), flush=True)
    cfg = gpt.SamplerConfig()
    tm = common.time_fn(lambda: gpt.sample(gp, gp_params, labels, jax.random.key(3), cfg), warmup=1, reps=reps)
    gpt_row = {"sampler": "gpt_kv_cache", "steps": tokens, "batch": batch, "seconds": tm["median_s"],
               "first_call_s": tm["first_call_s"], "images_per_s": batch / tm["median_s"],
               "seconds_per_image": tm["median_s"] / batch, "tokens_per_s": batch * tokens / tm["median_s"]}
    rows.append(gpt_row)
    print(json.dumps(gpt_row), flush=True)
    nc = functools.partial(gpt.sample_without_cache, gp, config=cfg, num_steps=no_cache_steps)
    tm = common.time_fn(lambda: nc(gp_params, labels, jax.random.key(3)), warmup=1, reps=reps)
    nc_tok_s = batch * no_cache_steps / tm["median_s"]
    nc_row = {"sampler": "gpt_no_cache", "steps_timed": no_cache_steps, "batch": batch, "seconds": tm["median_s"],
              "tokens_per_s": nc_tok_s, "images_per_s": nc_tok_s / tokens, "seconds_per_image": tokens / nc_tok_s,
              "cache_speedup": gpt_row["tokens_per_s"] / nc_tok_s}
    rows.append(nc_row)
    print(json.dumps(nc_row), flush=True)
    for r in rows:
        if r["sampler"] == "maskgit":
            r["speedup_over_gpt_kv_cache"] = gpt_row["seconds_per_image"] / r["seconds_per_image"]
    rss = common.peak_rss_mib()
    table = []
    for r in rows:
        if r["sampler"] == "maskgit":
            case, note = f"maskgit {r['steps']} steps, batch {batch}", f"{r['speedup_over_gpt_kv_cache']:.1f}x GPT"
        elif r["sampler"] == "gpt_kv_cache":
            case, note = f"gpt KV cache {tokens} steps, batch {batch}", f"{r['tokens_per_s']:.0f} tokens/s"
        else:
            case, note = f"gpt no cache, batch {batch}", f"{no_cache_steps} steps timed"
        table.append(common.row(
            "sample_maskgit", case, throughput=r["images_per_s"], unit="images/s", step_s=r["seconds_per_image"],
            peak_rss_mib=rss, cache_speedup=r.get("cache_speedup"), note=note))
    return {
        "benchmark": "sample_maskgit", "quick": quick, "grid": list(grid), "codebook_size": CODEBOOK,
        "num_classes": CLASSES, "width": width, "depth": depth, "maskgit_params": _count(mg_params),
        "gpt_params": _count(gp_params), "results": rows, "peak_rss_mib": rss, "table": table,
        "step_s_meaning": "seconds per image",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repetition")
    args = parser.parse_args()
    print(json.dumps(run(args.quick)["table"], indent=1))


if __name__ == "__main__":
    main()
