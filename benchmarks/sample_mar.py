"""MAR-B sampling with the KL-16 decode: images/s at batch 8 for 64 and 256 iterations, peak memory.

The models are those of ``configs/generators/mar.py:B`` in float32 with random weights (the speed
of a sampler does not depend on what the weights learnt): MAR-B (207.9M parameters: encoder and
decoder of 12 blocks of width 768, a 6-block diffusion head of width 1024) over the 16x16x16
latents of MAR's KL-16 VAE (66.5M). One image is :func:`vqgen.generators.mar.sample` (the cosine
schedule of ``num_iter`` iterations in one compiled loop, each running the transformer over the
guided batch and the 100-step diffusion sampler on the tokens it reveals) followed by the VAE's
decode of the latents divided by 0.2325, with the README's MAR-B settings: linear CFG 2.9,
temperature 1.0, 100 diffusion steps.

Reported per setting: images/s, seconds per image, the first (compiling) call, the share of the
time spent in the VAE decode, and the process's peak resident memory. Nothing asserted.
``--quick`` times one call (after the compiling one) of one image with 8 iterations of 10
diffusion steps, a smoke run of a few minutes; the full run takes three calls of each iteration
count at batch 8. On a 2-core CPU the full run is long: every iteration runs MAR-B's 24 blocks
over all 256 tokens and the 64 buffer tokens of the guided batch (about 150 GFLOP per image per
iteration), so 64 iterations at batch 8 take about 20 minutes per call in float32. Prints JSON and
writes ``benchmarks/results/sample_mar[_quick].json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from vqgen import config_lib
from vqgen.generators import mar
from vqgen.train import builders
from vqgen.train import generator as generator_lib
from vqgen.train import tokenizer as tokenizer_lib

RESULTS = Path(__file__).resolve().parent / "results"


def build(variant: str = "B"):
    """``(config, MAR, params, VAE module, VAE variables)`` in float32 with random weights."""
    config = config_lib.load_config("generators/mar", variant)
    with config.unlocked():
        config.tokenizer.dtype = "float32"
        config.generator.dtype = "float32"
    _, model = generator_lib.build_model(config)
    params = jax.jit(lambda k: nn.meta.unbox(mar.init_params(model, k)))(jax.random.key(0))
    vae = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    init = jax.jit(lambda k: nn.meta.unbox(tokenizer_lib.init_variables(
        k, model=vae, example=builders.example_shape(config))))
    return config, model, params, vae, init(jax.random.key(1))


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def run(quick: bool = False, *, variant: str = "B", batch: int | None = None, iterations=None) -> dict:
    """Times sampling + decoding at each iteration count; nothing is asserted."""
    reps = 1 if quick else 3
    batch = int(batch or (1 if quick else 8))
    iterations = tuple(iterations or ((8,) if quick else (64, 256)))
    config, model, params, vae, variables = build(variant)
    spec = builders.token_spec(config)
    steps = 10 if quick else int(config.sample.diffusion_steps)

    @jax.jit
    def decode(variables, latents):  # [B, 16, 16, 16] scaled -> [B, 256, 256, 3]
        return jnp.clip(vae.apply(variables, latents / spec.latent_scale, method="decode"), -1.0, 1.0)

    labels = jnp.arange(batch, dtype=jnp.int32) * 7 % int(config.data.num_classes)
    rows = []
    for num_iter in iterations:
        opts = mar.sampler_options(dict(config.sample), num_iter=num_iter, diffusion_steps=steps)

        def latents_only(opts=opts):
            return mar.sample(model, params, labels, jax.random.key(3), opts)

        def images(opts=opts):
            return decode(variables, latents_only(opts))

        t_img = common.time_fn(images, warmup=1, reps=reps)
        t_lat = common.time_fn(latents_only, warmup=0, reps=reps)  # compiled by the call above
        r = {"variant": variant, "batch": batch, "num_iter": num_iter, "diffusion_steps": steps,
             "cfg_scale": opts.cfg_scale, "cfg_schedule": opts.cfg_schedule, "seconds": t_img["median_s"],
             "first_call_s": t_img["first_call_s"], "images_per_s": batch / t_img["median_s"],
             "seconds_per_image": t_img["median_s"] / batch,
             "decode_share": max(0.0, 1.0 - t_lat["median_s"] / t_img["median_s"]),
             "peak_rss_mib": common.peak_rss_mib()}
        rows.append(r)
        print(json.dumps(r), flush=True)
    rss = common.peak_rss_mib()
    table = [common.row(
        "sample_mar", f"MAR-{variant} + KL-16 decode, batch {r['batch']}, {r['num_iter']} iterations x "
                      f"{r['diffusion_steps']} diffusion steps, linear cfg {r['cfg_scale']}",
        throughput=r["images_per_s"], unit="images/s", step_s=r["seconds_per_image"], peak_rss_mib=rss,
        note=f"{spec.seq_len} latent tokens; decode {100 * r['decode_share']:.0f}% of the time") for r in rows]
    return {"benchmark": "sample_mar", "quick": quick, "variant": variant, "tokens": spec.seq_len,
            "latent_dim": spec.latent_dim, "mar_params": _count(params), "vae_params": _count(variables["params"]),
            "results": rows, "peak_rss_mib": rss, "table": table, "step_s_meaning": "seconds per image"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed call: batch 1, 8 iterations of 10 diffusion steps")
    parser.add_argument("--variant", default="B", help="a variant of configs/generators/mar.py")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 8, 1 with --quick)")
    parser.add_argument("--iterations", default=None, help="comma-separated iteration counts (default 64,256)")
    args = parser.parse_args()
    iterations = tuple(int(i) for i in args.iterations.split(",")) if args.iterations else None
    result = run(args.quick, variant=args.variant, batch=args.batch, iterations=iterations)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("sample_mar_quick.json" if args.quick else "sample_mar.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["results"], indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
