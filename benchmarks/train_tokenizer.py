"""Tokenizer train-step throughput (images/s), memory and model FLOPs utilisation.

The step measured is the real one: :func:`vqgen.train.tokenizer.build` makes the phase from a run
config and :func:`vqgen.train.common.compile_phase` its jitted, donated step (tokenizer forward, ``jax.vjp`` pulled back twice for the
reconstruction and GAN gradients, discriminator update with its regularisers, AdamW, EMA) from a
run config, and the benchmark times that compiled step on a fixed batch. Cases:

- ``quickstart``: ``configs/quickstart.py`` as it is (32x32 digits, batch 32, PatchGAN).
- ``maskgit_vqgan_256``: ``configs/tokenizers/maskgit_vqgan.py`` (the MaskGIT VQGAN, 54.5M
  parameters, VectorQuantizer with 1,024 codes, StyleGAN discriminator with R1) at 256x256 with
  batch 1 (``--quick``) or 2 on random images. The perceptual (LPIPS) term is OFF: it needs a
  weights file that does not exist on this machine (``perceptual: "off (...)"`` in the JSON); the
  step with it would also run a VGG16 forward and backward on both images.

Model FLOPs are XLA's ``cost_analysis()`` count of the compiled step (every FLOP the step
executes, the discriminator's included); MFU divides the achieved FLOP/s by the harness's
measured float32 matmul peak (:func:`benchmarks.common.matmul_peak`). The first call's time
(compilation included) is reported separately. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from benchmarks import common
from vqgen import config_lib, parallel
from vqgen.train import common as train_common
from vqgen.train import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_config(config, *, name: str, reps: int, warmup: int = 1, images: np.ndarray | None = None,
                 notes: dict | None = None) -> dict:
    """Times the compiled train step of ``config`` (a run config) on one fixed batch.

    ``warmup`` untimed steps run before ``reps`` timed ones (the step is compiled ahead of time,
    so ``warmup=0`` still times no compilation). ``images`` (float32 ``[B, H, W, C]`` in
    [-1, 1]) defaults to a random batch of the config's batch size and image size. Returns the
    measurements as a dict.
    """
    tc = config.tokenizer_train
    phase = tokenizer_lib.build(config)  # the very step the trainer runs, from the config alone
    mesh = parallel.create_mesh(tuple(config.mesh_shape))
    rules = parallel.rules_from_config(config.logical_rules)
    b = int(tc.batch_size)
    if images is None:
        images = np.random.default_rng(0).uniform(-1, 1, phase.batch["image"].shape).astype(np.float32)
    batch = train_common.put_batch({"image": images, "label": np.zeros((b,), np.int32)}, mesh, phase.batch)
    t0 = time.perf_counter()
    state, shardings = train_common.create_state(phase, mesh, rules)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    n_params = train_common.count_params(state.params)
    n_disc = train_common.count_params(state.disc_params) if state.disc_params is not None else 0
    frozen = phase.load_frozen()
    rng = jax.random.key(1)
    with parallel.mesh_context(mesh, rules):
        step = train_common.compile_phase(phase, mesh, shardings)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch, rng, *frozen).compile()
        compile_s = time.perf_counter() - t0
        stats = common.compiled_stats(compiled)
        holder = {"state": state}

        def once():
            holder["state"], metrics = compiled(holder["state"], batch, rng, *frozen)
            holder["loss"] = metrics["loss"]
            return metrics["loss"]

        # The step is compiled ahead of time, so even a first call times no compilation.
        timing = common.time_fn(once, warmup=warmup, reps=reps)
        loss = float(holder["loss"])
    peak = common.matmul_peak()
    flops = stats["xla_flops"]
    step_s = timing["median_s"]
    out = {
        "case": name, "image_size": s, "channels": c, "batch": b, "tokenizer_params": n_params,
        "discriminator_params": n_disc, "perceptual": "on" if lp is not None else "off",
        "init_s": init_s, "compile_s": compile_s, "first_step_s": timing["first_call_s"], "step_s": step_s,
        "step_min_s": timing["min_s"], "reps": timing["reps"], "images_per_s": b / step_s,
        "xla_flops_per_step": flops, "achieved_gflops": flops / step_s / 1e9 if flops else None,
        "mfu": flops / step_s / 1e9 / peak["gflops"] if flops else None, "matmul_peak_gflops": peak["gflops"],
        "compiled_memory_mib": stats["memory_mib"], "peak_rss_mib": common.peak_rss_mib(), "final_loss": loss,
    }
    if notes:
        out.update(notes)
    print(json.dumps({k: out[k] for k in ("case", "batch", "images_per_s", "step_s", "compile_s", "mfu")}), flush=True)
    return out


def quickstart_config():
    """``configs/quickstart.py`` unchanged."""
    return config_lib.load_config("quickstart")


def maskgit_config(batch: int):
    """The MaskGIT VQGAN run config at 256x256 with ``batch`` images and the perceptual term off."""
    c = config_lib.load_config("tokenizers/maskgit_vqgan")
    c.unlock()
    c.tokenizer_train.batch_size = batch
    c.tokenizer_train.perceptual_weight = 0.0
    c.tokenizer_train.lpips_path = ""
    c.lock()
    return c


def run(quick: bool = False) -> dict:
    """Both cases; ``quick`` times one step (no warm-up) at batch 1 for the 256x256 model."""
    results = [bench_config(quickstart_config(), name="quickstart", reps=3 if quick else 10)]
    mg_batch = 1 if quick else 2
    results.append(bench_config(
        maskgit_config(mg_batch), name="maskgit_vqgan_256", reps=1 if quick else 3, warmup=0 if quick else 1,
        notes={"perceptual_note": "off: no LPIPS weights file on this machine (tokenizer_train.perceptual_weight "
                                  "set to 0 from 0.1); the real step adds a VGG16 forward+backward",
               "data_note": "random images (ImageNet is not available here)"}))
    table = []
    for r in results:
        mem = r["compiled_memory_mib"]
        note = f"{r['tokenizer_params'] / 1e6:.2f}M params + {r['discriminator_params'] / 1e6:.2f}M disc"
        if r["perceptual"] == "off" and r["case"] != "quickstart":
            note += ", LPIPS off"
        table.append(common.row(
            "train_tokenizer", f"{r['case']} {r['image_size']}px batch {r['batch']}", throughput=r["images_per_s"],
            unit="images/s", step_s=r["step_s"], peak_rss_mib=r["peak_rss_mib"],
            compiled_mib=mem["total"] if mem else None, mfu=r["mfu"], note=note))
    return {"benchmark": "train_tokenizer", "quick": quick, "results": results, "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and one timed step at 256x256")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=1))


if __name__ == "__main__":
    main()
