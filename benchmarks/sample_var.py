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

``--dtypes=float32,bfloat16`` (the default) times both compute dtypes: ``bfloat16`` runs the
transformer's and the VQ-VAE's matmuls and convolutions on bfloat16 inputs with float32
parameters, float32 accumulation, float32 normalisation statistics and float32 logits (the
models' ``dtype`` setting, as VAR's own sampling runs under autocast). Each bfloat16 row says how
far it is from float32: the share of the 680 tokens that greedy sampling (top-k 1, CFG as above,
same class and key) draws identically, and the largest logit difference of one teacher-forced
pass over the float32 model's greedy tokens, relative to the largest float32 logit.

With ``--official-repo=PATH`` (a checkout of FoundationVision/VAR) or ``VQGEN_VAR_REPO`` set and
torch installed, the official PyTorch code is timed in the same process, alternating with
vqgen: its ``build_vae_var`` models of the same size with random weights, float32, all CPU
threads, ``autoregressive_infer_cfg(cfg=1.5, top_k=900, top_p=0.96)`` (sampling and decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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


def build(variant: str = "d16", dtype: str = "float32"):
    """``(config, VAR, params, tokenizer module, tokenizer variables)`` computing in ``dtype``
    (float32 parameters either way), random weights (the same for every dtype)."""
    config = config_lib.load_config("generators/var", variant)
    config.unlock()
    config.tokenizer.dtype = dtype
    config.generator.dtype = dtype
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


def _precision_vs_float32(reference, candidate) -> dict:
    """Greedy-token agreement and the relative teacher-forced logit error of ``candidate``
    (a :func:`build` tuple in another dtype) against the float32 ``reference`` tuple."""
    greedy = var.sampler_options(dict(OPTIONS, top_k=1, top_p=1.0))
    labels = jnp.asarray([207], jnp.int32)
    tokens, logits = [], []
    for config, model, params, tok, variables in (reference, candidate):
        vq, codec = variables["params"]["quantizer"], var.quantizer_codec(tok.quantizer)
        tokens.append(var.sample(model, params, labels, jax.random.key(5), greedy, vq_params=vq, codec=codec))
    config, model, params, tok, variables = reference
    codec = var.quantizer_codec(tok.quantizer)
    inputs = jax.jit(var.teacher_forcing_input, static_argnames="codec")(
        tokens[0], variables["params"]["quantizer"], codec=codec)  # [1, L - 1, Cvae] float32
    for config, model, params, tok, variables in (reference, candidate):
        logits.append(jax.jit(lambda p, x, model=model: model.apply({"params": p}, x, labels).astype(jnp.float32))(
            params, inputs))
    scale = float(jnp.max(jnp.abs(logits[0])))
    return {"greedy_token_agreement": float(jnp.mean(tokens[0] == tokens[1])),
            "logit_max_abs_error_relative": float(jnp.max(jnp.abs(logits[1] - logits[0]))) / scale}


def run(quick: bool = False, *, variant: str = "d16", batches=(1, 8), official_repo: str | None = None,
        dtypes=("float32", "bfloat16")) -> dict:
    """Times sampling + decoding at each batch size and compute dtype (and the official code's,
    float32, where a checkout is given); nothing is asserted."""
    reps = 1 if quick else 3
    official_repo = official_repo or os.environ.get("VQGEN_VAR_REPO")
    official = official_sampler(official_repo, variant) if official_repo else None
    built = {dtype: build(variant, dtype) for dtype in dtypes}
    rows = []
    for dtype in dtypes:
        precision = (_precision_vs_float32(built["float32"], built[dtype])
                     if dtype != "float32" and "float32" in built else {})
        rows += _time_dtype(built[dtype], variant, dtype, precision, batches, reps,
                            official if dtype == dtypes[0] else None)
    config, model, params, tok, variables = built[dtypes[0]]
    spec = builders.token_spec(config)
    rss = common.peak_rss_mib()
    table = [common.row(
        "sample_var", f"VAR-{variant} + VQ-VAE decode, {r['dtype']}, batch {r['batch']}, cfg 1.5 (VAR's), top-k 900, "
                      "top-p 0.96",
        throughput=r["images_per_s"], unit="images/s", step_s=r["seconds_per_image"], peak_rss_mib=rss,
        note=f"{len(spec.scales)} scales; decode {100 * r['decode_share']:.0f}% of the time"
             + (f"; greedy tokens {100 * r['greedy_token_agreement']:.1f}% as float32, logit error "
                f"{r['logit_max_abs_error_relative']:.1e} of the largest" if "greedy_token_agreement" in r else "")
             + (f"; official PyTorch float32 {r['official_images_per_s']:.3g} images/s ({r['speedup_over_official']:.2f}x)"
                if "official_seconds" in r else "")) for r in rows]
    return {
        "benchmark": "sample_var", "quick": quick, "variant": variant, "scales": list(spec.scales),
        "tokens": spec.seq_len, "codebook_size": spec.vocab_size, "var_params": _count(params),
        "vqvae_params": _count(variables["params"]), "results": rows, "peak_rss_mib": rss, "table": table,
        "step_s_meaning": "seconds per image",
    }


def _time_dtype(built, variant: str, dtype: str, precision: dict, batches, reps: int, official) -> list[dict]:
    config, model, params, tok, variables = built
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
        r = {"variant": variant, "dtype": dtype, "batch": batch,
             "seconds": t_img["median_s"], "first_call_s": t_img["first_call_s"],
             "images_per_s": batch / t_img["median_s"], "seconds_per_image": t_img["median_s"] / batch,
             "token_seconds": t_tok["median_s"], "decode_share": max(0.0, 1.0 - t_tok["median_s"] / t_img["median_s"]),
             "options": OPTIONS, **precision}
        if official is not None:
            t_off = common.time_fn(lambda b=batch: official(b), warmup=1, reps=reps)
            r.update(official_seconds=t_off["median_s"], official_first_call_s=t_off["first_call_s"],
                     official_images_per_s=batch / t_off["median_s"], speedup_over_official=t_off["median_s"] / r["seconds"])
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timed repetition per batch")
    parser.add_argument("--variant", default="d16", help="a variant of configs/generators/var.py")
    parser.add_argument("--official-repo", default=None, help="a FoundationVision/VAR checkout to time beside")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    result = run(args.quick, variant=args.variant, batches=batches, official_repo=args.official_repo, dtypes=dtypes)
    print(json.dumps(result["results"], indent=1))


if __name__ == "__main__":
    main()
