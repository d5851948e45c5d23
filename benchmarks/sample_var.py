"""VAR-d16 next-scale sampling with the VQ-VAE decode: images/s at batch 1 and 8.

The models are those of ``configs/generators/var.py:d16`` in float32 with random weights (the
speed of a sampler does not depend on what the weights learnt): VAR-d16 (310.3M parameters,
width 1024, 16 blocks) over VAR's 256 px scales 1..16 (680 tokens, 4,096 codes) and the VQ-VAE
(108.9M). One image is :func:`vqgen.generators.var.sample` (ten scales in one compiled loop
with the KV cache, classifier-free guidance on a doubled batch) followed by the VQ-VAE's
``decode_indices`` (the quantizer's f_hat, then the conv decoder), with VAR's FID settings:
its ``cfg=1.5`` (``cfg_scale=2.5`` here), top-k 900, top-p 0.96.

Reported per batch: images/s, seconds per image, the first (compiling) call, and the share of
the time spent in the VQ-VAE decode. Nothing asserted. ``--quick`` times one call per batch.

With ``--official-repo=PATH`` (a checkout of FoundationVision/VAR) or ``VQGEN_VAR_REPO`` set and
torch installed, the official PyTorch code is timed in the same process, alternating with
vqgen: its ``build_vae_var`` models of the same size with random weights, float32, all CPU
threads, ``autoregressive_infer_cfg(cfg=1.5, top_k=900, top_p=0.96)`` (sampling and decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from vqgen import config_lib
from vqgen.generators import var
from vqgen.train import builders
from vqgen.train import generator as generator_lib
from vqgen.train import tokenizer as tokenizer_lib

OPTIONS = dict(cfg_scale=2.5, top_k=900, top_p=0.96, temperature=1.0)


def build(variant: str = "d16"):
    """``(config, VAR, params, tokenizer module, tokenizer variables)`` in float32, random weights."""
    config = config_lib.load_config("generators/var", variant)
    config.unlock()
    config.tokenizer.dtype = "float32"
    config.generator.dtype = "float32"
    config.lock()
    _, model = generator_lib.build_model(config)
    params = jax.jit(lambda k: nn.meta.unbox(var.init_params(model, k)))(jax.random.key(0))
    tok = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    init = jax.jit(lambda k: nn.meta.unbox(tokenizer_lib.init_variables(
        k, model=tok, example=builders.example_shape(config))))
    variables = init(jax.random.key(1))
    return config, model, params, tok, variables


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def official_sampler(repo: str, variant: str):
    """``fn(batch) -> images`` of the official VAR code in ``repo`` (random weights, float32), or
    None where torch or the checkout is missing."""
    try:
        import torch
    except ImportError:
        return None
    if not os.path.isfile(os.path.join(repo, "models", "var.py")):
        return None
    sys.path.insert(0, repo)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:  # the official models use its mixin only as a base class (hub up/download)
        hub = types.ModuleType("huggingface_hub")
        hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {"__init_subclass__": classmethod(lambda c, **k: None)})
        sys.modules["huggingface_hub"] = hub
    from models import build_vae_var  # noqa: E402  (the official package)

    torch.manual_seed(0)
    vae, model = build_vae_var(device="cpu", depth=int(variant[1:]), flash_if_available=False,
                               fused_if_available=False)
    with torch.no_grad():  # build_vae_var leaves the VQ-VAE's weights uninitialised
        for p in vae.parameters():
            p.normal_(0.0, 0.02)
    model.eval()

    def fn(batch: int):
        labels = torch.arange(batch) * 7 % 1000
        return model.autoregressive_infer_cfg(B=batch, label_B=labels, g_seed=0, cfg=1.5, top_k=900, top_p=0.96)

    return fn


def _time_torch(fn, reps: int) -> dict:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "first_call_s": first}


def run(quick: bool = False, *, variant: str = "d16", batches=(1, 8), official_repo: str | None = None) -> dict:
    """Times sampling + decoding at each batch size (and the official code's where a checkout
    is given); nothing is asserted."""
    reps = 1 if quick else 3
    official_repo = official_repo or os.environ.get("VQGEN_VAR_REPO")
    official = official_sampler(official_repo, variant) if official_repo else None
    config, model, params, tok, variables = build(variant)
    spec = builders.token_spec(config)
    codec = var.quantizer_codec(tok.quantizer)
    vq = variables["params"]["quantizer"]
    opts = var.sampler_options(dict(OPTIONS))

    @jax.jit
    def decode(variables, tokens):  # [B, L] -> [B, 256, 256, 3]
        maps = builders.split_pyramid(tokens, spec.scales)
        return jnp.clip(tok.apply(variables, maps, method="decode_indices"), -1.0, 1.0)

    rows = []
    for batch in batches:
        labels = jnp.arange(batch, dtype=jnp.int32) * 7 % int(config.data.num_classes)

        def tokens_only(labels=labels):
            return var.sample(model, params, labels, jax.random.key(3), opts, vq_params=vq, codec=codec)

        def images(labels=labels):
            return decode(variables, tokens_only(labels))

        t_img = common.time_fn(images, warmup=1, reps=reps)
        t_tok = common.time_fn(tokens_only, warmup=1, reps=reps)
        r = {"variant": variant, "batch": batch, "seconds": t_img["median_s"], "first_call_s": t_img["first_call_s"],
             "images_per_s": batch / t_img["median_s"], "seconds_per_image": t_img["median_s"] / batch,
             "token_seconds": t_tok["median_s"], "decode_share": max(0.0, 1.0 - t_tok["median_s"] / t_img["median_s"]),
             "options": OPTIONS}
        if official is not None:
            t_off = _time_torch(lambda b=batch: official(b), reps)
            r.update(official_seconds=t_off["median_s"], official_first_call_s=t_off["first_call_s"],
                     official_images_per_s=batch / t_off["median_s"], speedup_over_official=t_off["median_s"] / r["seconds"])
        rows.append(r)
        print(json.dumps(r), flush=True)
    rss = common.peak_rss_mib()
    table = [common.row(
        "sample_var", f"VAR-{variant} + VQ-VAE decode, batch {r['batch']}, cfg 1.5 (VAR's), top-k 900, top-p 0.96",
        throughput=r["images_per_s"], unit="images/s", step_s=r["seconds_per_image"], peak_rss_mib=rss,
        note=f"{len(spec.scales)} scales; decode {100 * r['decode_share']:.0f}% of the time"
             + (f"; official PyTorch {r['official_images_per_s']:.3g} images/s ({r['speedup_over_official']:.2f}x)"
                if "official_seconds" in r else "")) for r in rows]
    return {
        "benchmark": "sample_var", "quick": quick, "variant": variant, "scales": list(spec.scales),
        "tokens": spec.seq_len, "codebook_size": spec.vocab_size, "var_params": _count(params),
        "vqvae_params": _count(variables["params"]), "results": rows, "peak_rss_mib": rss, "table": table,
        "step_s_meaning": "seconds per image",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repetition per batch")
    parser.add_argument("--variant", default="d16", help="a variant of configs/generators/var.py")
    parser.add_argument("--official-repo", default=None, help="a FoundationVision/VAR checkout to time beside")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    result = run(args.quick, variant=args.variant, batches=batches, official_repo=args.official_repo)
    print(json.dumps(result["results"], indent=1))


if __name__ == "__main__":
    main()
