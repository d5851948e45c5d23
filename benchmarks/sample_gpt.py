"""GPT-B (LlamaGen) sampling and training throughput on the local device.

Measures, for GPT-B at vocab 16384 and 256 tokens (16x16), float32:

- sampling tokens/s at several batch sizes with the KV-cache sampler (``gpt.sample``) and with
  the no-cache baseline that recomputes the full padded sequence every step
  (``gpt.sample_without_cache``; every step costs the same, so a few steps give its rate), and
  the cache speed-up; batch 8 also with CFG (scale 4, doubled batch);
- the train step of the ``generators/llamagen:B`` config's generator phase in float32 (AdamW
  with clipping, dropout, EMA; batch 8, 256 tokens): tokens/s and model FLOPs utilisation against a
  measured float32 4096x4096 matmul peak. Model FLOPs per token are ``6 * N_matmul +
  12 * depth * width * T`` (PaLM's formula: N_matmul excludes the embedding lookups,
  ``T = 256`` the context); XLA's own cost-analysis count is reported beside it;
- the batch-1 memory-bandwidth bound: the bytes of every parameter read per decoded token
  (all but the two embedding tables) divided by a measured copy bandwidth
  (``x + 1`` on a 256 MiB float32 array: bytes read + written per second);
- batch-1 greedy (top-k 1) sampling with each decode weight dtype (``SamplerConfig.weight_dtype``:
  float32, bfloat16, int8 weight-only) and float32 with whole, unchunked kernels (the sampler
  before column chunks): tokens/s of the decoding loop on pre-converted weights (the conversion's
  time is recorded beside it), the weight bytes read per token in that dtype, the bound those
  bytes set at the measured read bandwidth (``sum(x)``) and the fraction of it reached; against
  float32, the largest logit error of the sampler's cached path on float32's greedy tokens
  (relative to the largest float32 logit), the top-1 agreement given the same prefix, and the
  agreement of the freely sampled greedy tokens.

Timings are printed and written, never asserted. ``python benchmarks/sample_gpt.py`` writes
``benchmarks/results/sample_gpt.json``; ``--quick`` (fewer repetitions, batches 1 and 8)
writes ``benchmarks/results/sample_gpt_quick.json``.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from vqgen import config_lib, parallel
from vqgen.generators import gpt
from vqgen.modules import weight_quant
from vqgen.train import common as train_common
from vqgen.train import generator as generator_lib

RESULTS = Path(__file__).resolve().parent / "results"


def _best_time(fn, reps: int) -> float:
    """Best wall time of ``reps`` calls of ``fn`` (which must block until its result is ready)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(n: int = 4096, reps: int = 3) -> dict:
    """float32 ``n x n`` matmul throughput (jitted, best of ``reps``); the harness's shared
    measurement when run from ``benchmarks/run.py`` (:func:`benchmarks.common.matmul_peak`)."""
    return common.matmul_peak(n, reps)


def copy_bandwidth(mib: int = 256, reps: int = 5) -> dict:
    """Streaming bandwidth over a float32 array of ``mib`` MiB (:func:`benchmarks.common.copy_bandwidth`).

    ``gb_per_s``: in-place ``x + 1`` with the input donated (bytes read + written per second; a
    fresh output buffer would mostly time page faults). ``read_gb_per_s``: ``sum(x)`` (read only).
    """
    return common.copy_bandwidth(mib, reps)


def _param_stats(model: gpt.GPT) -> dict:
    shapes = nn.meta.unbox(gpt.abstract_params(model))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    embed = int(np.prod(shapes["tok_embeddings"]["embedding"].shape)) + int(
        np.prod(shapes["cls_embedding"]["embedding_table"].shape)
    )
    return {"params": total, "embedding_params": embed, "matmul_params": total - embed}


def bench_sampling(model, params, batches, reps: int, no_cache_steps: int, cfg_batch: int | None) -> list[dict]:
    out = []
    n = model.block_size
    plain = gpt.SamplerConfig()
    for b in batches:
        labels = jnp.arange(b, dtype=jnp.int32) % model.num_classes
        row = {"batch": b, "tokens_per_sample": n}
        t0 = time.perf_counter()
        gpt.sample(model, params, labels, jax.random.key(0), plain).block_until_ready()
        row["cache_first_call_s"] = time.perf_counter() - t0
        t = _best_time(lambda: gpt.sample(model, params, labels, jax.random.key(1), plain).block_until_ready(), reps)
        row["cache_seconds"] = t
        row["cache_tokens_per_s"] = b * n / t

        fn = functools.partial(gpt.sample_without_cache, model, config=plain, num_steps=no_cache_steps)
        t0 = time.perf_counter()
        fn(params, labels, jax.random.key(0)).block_until_ready()
        row["no_cache_first_call_s"] = time.perf_counter() - t0
        t = _best_time(lambda: fn(params, labels, jax.random.key(1)).block_until_ready(), max(1, reps - 1))
        row["no_cache_steps_timed"] = no_cache_steps
        row["no_cache_tokens_per_s"] = b * no_cache_steps / t
        row["cache_speedup"] = row["cache_tokens_per_s"] / row["no_cache_tokens_per_s"]
        row["peak_rss_mib"] = common.peak_rss_mib()
        out.append(row)
        print(json.dumps(row), flush=True)
    if cfg_batch:
        cfg = gpt.SamplerConfig(cfg_scale=4.0)
        labels = jnp.arange(cfg_batch, dtype=jnp.int32) % model.num_classes
        gpt.sample(model, params, labels, jax.random.key(0), cfg).block_until_ready()
        t = _best_time(lambda: gpt.sample(model, params, labels, jax.random.key(1), cfg).block_until_ready(), reps)
        row = {"batch": cfg_batch, "cfg_scale": 4.0, "cache_seconds": t, "cache_tokens_per_s": cfg_batch * n / t,
               "peak_rss_mib": common.peak_rss_mib()}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def _decode_bytes(dparams) -> int:
    """Bytes read per decoded token at batch 1: every kernel in its decode dtype (int8 scales
    included) and the norm scales; the embedding tables contribute one row and are left out."""
    norms = sum(int(x.nbytes) for path, x in jax.tree_util.tree_flatten_with_path(
        dparams, is_leaf=lambda x: isinstance(x, weight_quant.DecodeKernel))[0]
        if not isinstance(x, weight_quant.DecodeKernel) and path[-1].key == "scale")
    return weight_quant.weight_bytes(dparams) + norms


def bench_weight_dtypes(model, params, bw: dict, reps: int) -> list[dict]:
    """Batch-1 greedy sampling with each decode weight dtype (see the module docstring)."""
    labels = jnp.array([207], jnp.int32)
    n = model.block_size
    convert = jax.jit(gpt.decode_params, static_argnames=("weight_dtype", "chunk_columns"))
    cases = [("float32", None), ("float32", weight_quant.DEFAULT_CHUNK_COLUMNS),
             ("bfloat16", weight_quant.DEFAULT_CHUNK_COLUMNS), ("int8", weight_quant.DEFAULT_CHUNK_COLUMNS)]
    rows, ref_tokens, ref_logits = [], None, None
    for dtype, chunks in cases:
        t0 = time.perf_counter()
        dparams = jax.block_until_ready(convert(params, weight_dtype=dtype, chunk_columns=chunks))
        convert_s = time.perf_counter() - t0
        cfg = gpt.SamplerConfig(top_k=1, weight_dtype=dtype)
        t0 = time.perf_counter()
        tokens = gpt.sample(model, dparams, labels, jax.random.key(0), cfg).block_until_ready()
        first = time.perf_counter() - t0
        t = _best_time(lambda: gpt.sample(model, dparams, labels, jax.random.key(1), cfg).block_until_ready(), reps)
        nbytes = _decode_bytes(dparams)
        bound = bw["read_gb_per_s"] * 1e9 / nbytes
        row = {"batch": 1, "weight_dtype": dtype, "column_chunks": chunks is not None, "chunk_columns": chunks,
               "convert_s": convert_s, "first_call_s": first, "seconds": t, "tokens_per_s": n / t,
               "weight_bytes_per_token": nbytes, "read_bandwidth_bound_tokens_per_s": bound,
               "fraction_of_read_bound": n / t / bound,
               "copy_bandwidth_bound_tokens_per_s": bw["gb_per_s"] * 1e9 / nbytes}
        if chunks is not None:
            if ref_tokens is None:  # float32 with chunks: the reference of the other dtypes
                ref_tokens = tokens
                ref_logits = gpt.cached_logits(model, params, tokens, labels)  # [1, L, V]
            logits = gpt.cached_logits(model, dparams, ref_tokens, labels, dtype)  # [1, L, V]
            err = jnp.abs(logits - ref_logits)
            row.update({
                "max_logit_error": float(jnp.max(err)),
                "max_logit_error_relative": float(jnp.max(err) / jnp.max(jnp.abs(ref_logits))),
                "mean_logit_error": float(jnp.mean(err)),
                "top1_agreement_same_prefix": float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(ref_logits, -1))),
                "greedy_token_agreement": float(jnp.mean(tokens == ref_tokens)),
            })
        else:
            row["greedy_token_agreement_with_chunked"] = None  # filled below
            unchunked_tokens = tokens
        row["peak_rss_mib"] = common.peak_rss_mib()
        rows.append(row)
        del dparams
        print(json.dumps(row), flush=True)
    rows[0]["greedy_token_agreement_with_chunked"] = float(jnp.mean(unchunked_tokens == ref_tokens))
    return rows


def train_config(batch_size: int):
    """``configs/generators/llamagen.py:B`` in float32 at ``batch_size`` on the local devices."""
    config = config_lib.load_config("generators/llamagen", "B")
    config.generator.dtype = "float32"
    config.generator_train.batch_size = batch_size
    config.mesh_shape = (-1, 1, 1)
    return config


def train_step_fn(batch_size: int, model: gpt.GPT) -> tuple:
    """``(run_once, compiled, compile_s)``: one call of ``run_once()`` is one train step of the
    ``generators/llamagen:B`` generator phase (``model`` is its GPT-B, for the batch's shapes) in
    float32 on random tokens, the state carried from call to call."""
    config = train_config(batch_size)
    phase = generator_lib.build(config)
    mesh = parallel.create_mesh(tuple(config.mesh_shape))
    rules = parallel.rules_from_config(config.logical_rules)
    n = model.block_size
    state, shardings = train_common.create_state(phase, mesh, rules)
    batch = train_common.put_batch({
        "tokens": np.asarray(jax.random.randint(jax.random.key(3), (batch_size, n), 0, model.vocab_size)),
        "label": np.arange(batch_size, dtype=np.int32) % model.num_classes}, mesh, phase.batch)
    with parallel.mesh_context(mesh, rules):
        t0 = time.perf_counter()
        compiled = train_common.compile_phase(phase, mesh, shardings).lower(state, batch, jax.random.key(0)).compile()
        compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run_once():
        holder["state"], metrics = compiled(holder["state"], batch, jax.random.key(1))
        return float(metrics["loss"])

    return run_once, compiled, compile_s


def bench_train(model, params, batch_size: int, reps: int, peak_gflops: float, stats: dict) -> dict:
    """The GPT-B train step exactly as vqgen trains it: the generator phase of the LlamaGen-B config
    (AdamW with clipping, dropout, class dropout, EMA), float32, on random tokens."""
    del params  # the phase initialises its own state, as the trainer does
    run_once, compiled, compile_s = train_step_fn(batch_size, model)
    n = model.block_size
    compiled_stats = common.compiled_stats(compiled)
    xla_flops = compiled_stats["xla_flops"] if compiled_stats["xla_flops"] is not None else float("nan")

    run_once()
    t = _best_time(run_once, reps)
    tokens = batch_size * n
    model_flops = tokens * (6 * stats["matmul_params"] + 12 * model.depth * model.width * n)
    return {
        "batch": batch_size,
        "seq_len": n,
        "compile_s": compile_s,
        "step_seconds": t,
        "tokens_per_s": tokens / t,
        "model_flops_per_step": model_flops,
        "xla_flops_per_step": xla_flops,
        "achieved_gflops": model_flops / t / 1e9,
        "mfu": model_flops / t / 1e9 / peak_gflops,
        "xla_flops_utilisation": xla_flops / t / 1e9 / peak_gflops,
        "compiled_memory_mib": compiled_stats["memory_mib"],
        "peak_rss_mib": common.peak_rss_mib(),
    }


def _table(sampling_rows: list[dict], train: dict, dtype_rows: list[dict]) -> list[dict]:
    """The harness's table rows (:func:`benchmarks.common.row`) of this benchmark's results."""
    rows = []
    for r in dtype_rows:
        what = f"{r['weight_dtype']} weights" + ("" if r["column_chunks"] else ", whole kernels")
        note = (f"{r['fraction_of_read_bound']:.0%} of {r['read_bandwidth_bound_tokens_per_s']:.0f} tokens/s "
                f"({r['weight_bytes_per_token'] / 1e6:.0f} MB/token at read bandwidth)")
        if "max_logit_error_relative" in r and r["weight_dtype"] != "float32":
            note += (f"; logit error {r['max_logit_error_relative']:.2%} of max, top-1 agreement "
                     f"{r['top1_agreement_same_prefix']:.1%} (same prefix), {r['greedy_token_agreement']:.1%} (free)")
        elif not r["column_chunks"]:
            note += f"; greedy tokens equal to column-chunked: {r['greedy_token_agreement_with_chunked']:.0%}"
        rows.append(common.row(
            "sample_gpt", f"GPT-B greedy 256 tokens, batch 1, {what}", throughput=r["tokens_per_s"], unit="tokens/s",
            step_s=r["seconds"], peak_rss_mib=r["peak_rss_mib"], note=note))
    for r in sampling_rows:
        cfg = f", CFG {r['cfg_scale']:g}" if "cfg_scale" in r else ""
        rows.append(common.row(
            "sample_gpt", f"GPT-B sample 256 tokens, batch {r['batch']}{cfg}", throughput=r["cache_tokens_per_s"],
            unit="tokens/s", step_s=r["cache_seconds"] / r["batch"], peak_rss_mib=r["peak_rss_mib"],
            cache_speedup=r.get("cache_speedup"),
            note=f"no cache {r['no_cache_tokens_per_s']:.1f} tokens/s" if "no_cache_tokens_per_s" in r else "KV cache"))
    mem = train["compiled_memory_mib"]
    rows.append(common.row(
        "sample_gpt", f"GPT-B train step, batch {train['batch']} x {train['seq_len']}", throughput=train["tokens_per_s"],
        unit="tokens/s", step_s=train["step_seconds"], peak_rss_mib=train["peak_rss_mib"],
        compiled_mib=mem["total"] if mem else None, mfu=train["mfu"], note="vqgen generator phase (AdamW, clip, dropout, EMA), float32; MFU by 6N+12LDT"))
    return rows


def run(quick: bool = False) -> dict:
    """Runs the benchmark and returns its results (nothing is asserted)."""
    model = gpt.gpt_variant("B", vocab_size=16384, num_classes=1000, grid=(16, 16))
    stats = _param_stats(model)
    params = jax.jit(lambda k: nn.meta.unbox(gpt.init_params(model, k)))(jax.random.key(0, impl="rbg"))
    # The real init has a zero output head (uniform logits); make it random so sampling is typical.
    params["output"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(5), params["output"]["kernel"].shape)

    peak = matmul_peak(4096, reps=2 if quick else 5)
    print(json.dumps({"matmul_peak": peak}), flush=True)
    bw = copy_bandwidth(256, reps=3 if quick else 10)
    print(json.dumps({"copy_bandwidth": bw}), flush=True)

    sampling_rows = bench_sampling(
        model,
        params,
        batches=(1, 8) if quick else (1, 8, 32),
        reps=1 if quick else 3,
        no_cache_steps=2 if quick else 8,
        cfg_batch=None if quick else 8,
    )
    dtype_rows = bench_weight_dtypes(model, params, bw, reps=1 if quick else 3)
    train = bench_train(model, params, 8, reps=1 if quick else 3, peak_gflops=peak["gflops"], stats=stats)
    print(json.dumps({"train": train}), flush=True)

    bytes_per_token = stats["matmul_params"] * 4
    bound = bw["gb_per_s"] * 1e9 / bytes_per_token
    b1 = next(r for r in sampling_rows if r["batch"] == 1 and "cfg_scale" not in r)
    b8 = next((r for r in sampling_rows if r["batch"] == 8 and "cfg_scale" not in r), None)
    summary = {
        "sample_b1_tokens_per_s": b1["cache_tokens_per_s"],
        "bandwidth_bound_b1_tokens_per_s": bound,
        "b1_fraction_of_bandwidth_bound": b1["cache_tokens_per_s"] / bound,
        "b8_cache_speedup": b8["cache_speedup"] if b8 else None,
        "b8_tokens_per_s": b8["cache_tokens_per_s"] if b8 else None,
        "train_mfu": train["mfu"],
        "b1_weight_dtypes": {
            ("float32 whole kernels" if not r["column_chunks"] else r["weight_dtype"]): {
                k: r.get(k) for k in ("tokens_per_s", "weight_bytes_per_token", "read_bandwidth_bound_tokens_per_s",
                                      "fraction_of_read_bound", "max_logit_error_relative",
                                      "top1_agreement_same_prefix", "greedy_token_agreement")}
            for r in dtype_rows},
        "targets": {
            "train_mfu": ">= 0.5",
            "b1_fraction_of_bandwidth_bound": ">= 0.5",
            "b1_float32_fraction_of_read_bound": ">= 0.7",
            "b8_cache_speedup": ">= 4",
            "llamagen_pytorch_reference_tokens_per_s": {"train_b8": 270, "sample_b1": 40, "sample_b8": 190, "sample_b8_cfg": 150},
        },
    }
    return {
        "table": _table(sampling_rows, train, dtype_rows),
        "benchmark": "sample_gpt",
        "quick": quick,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.local_devices()],
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "model": {"variant": "B", "vocab_size": 16384, "tokens": 256, "dtype": "float32", **stats},
        "matmul_peak": peak,
        "copy_bandwidth": bw,
        "bytes_read_per_token_b1": bytes_per_token,
        "sampling": sampling_rows,
        "weight_dtypes_b1": dtype_rows,
        "train": train,
        "summary": summary,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and batch sizes")
    args = parser.parse_args()
    result = run(quick=args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("sample_gpt_quick.json" if args.quick else "sample_gpt.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
