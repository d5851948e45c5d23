"""Makes ``tests/fixtures/llamagen/llamagen_tiny.npz``: golden outputs of the official LlamaGen code
(tiny, random weights).

    git clone https://github.com/FoundationVision/LlamaGen /tmp/LlamaGen
    python tools/make_llamagen_fixture.py --llamagen-repo /tmp/LlamaGen

Models, built on CPU in float32 from the checkout's ``autoregressive/models/gpt.py`` and
``tokenizer/tokenizer_image/vq_model.py``:

- ``vq16``: ``VQModel`` with ``VQ_16``'s multipliers (1, 1, 2, 2, 4) but its ``Encoder`` and
  ``Decoder`` rebuilt with ``ch=32`` (``VQModel`` fixes 128), ``z_channels=32``, 64 codes of
  width 8 (l2-normalised lookup, as released); a 64x64 image has a 4x4 token grid.
- ``vq8``: the same with ``VQ_8``'s multipliers (1, 2, 2, 4) on 32x32 images (4x4 tokens).
- ``gpt``: ``Transformer(ModelArgs(...))`` c2i, 2 layers, width 64, 4 heads, vocabulary 64 (the
  VQ's codes), 10 classes plus the CFG null row (``class_dropout_prob=0.1``), ``block_size=16``
  (4x4), ``cls_token_num=1``, every dropout 0.
- ``gpt_b``: grouped-query attention (4 heads over 2 kv heads), ``multiple_of=32`` and
  ``ffn_dim_multiplier=0.75`` (SwiGLU width 128), no null row (``class_dropout_prob=0``).

The weights are not stored: the ``.npz`` holds a manifest of every state-dict entry, and each
parameter is ``standard_normal(shape) * scale + offset`` drawn in manifest order from
``numpy.random.RandomState(seed)``, with a per-key scale chosen so that every parameter matters
(the official zero-initialised ``output`` head and unit norms are replaced too). Buffers
(``quantize.codebook_used``) are stored as they are. The test rebuilds the state dicts from the
manifest and checks each tensor's checksum.

Outputs (official layouts, NCHW images): ``image`` / ``image8`` (inputs in [-1, 1]);
``vq16_f`` (``quant_conv(encoder(x))``), ``vq16_tokens`` ``[B, h, w]``, ``vq16_quant`` (the
quantized latents), ``vq16_recon`` (``VQModel.forward``), ``vq16_decoded``
(``decode_code(tokens)``), and the same for ``vq8``; ``tokens``/``labels`` (teacher-forcing
input) and ``logits`` / ``logits_b`` (the training-mode forward with label dropout switched off,
``[B, 16, V]``); ``sample_labels``, ``sample`` (``generate(...)`` with top-k 1, no guidance),
``sample_cfg`` (the same with ``cfg_scale=2.0``) and ``sample_images`` (``decode_code`` of
``sample`` through ``vq16``). ``margin`` is the relative perturbation of the VQ latents (1e-4)
under which the tokens were checked not to change; ``sample_gap`` / ``sample_cfg_gap`` are the
smallest gaps between the chosen and the runner-up logit over the sampled tokens (each chosen
token is checked to be the argmax of the teacher-forced logits of the sampled sequence).

The manifest also lists the state-dict keys and shapes of every released size (GPT-B, L, XL,
XXL, 3B for c2i with 16384 codes and 1000 classes; VQ-16 and VQ-8 with 16384 codes of width 8),
built on PyTorch's meta device, which the test compares with the converter's key manifest.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "llamagen", "llamagen_tiny.npz")

CONFIG = dict(
    batch=2, labels=(3, 7), sample_labels=(1, 4, 9), cfg_scale=2.0,
    vq16=dict(ch=32, ch_mult=(1, 1, 2, 2, 4), z_channels=32, codebook_size=64, codebook_embed_dim=8, image_size=64),
    vq8=dict(ch=32, ch_mult=(1, 2, 2, 4), z_channels=32, codebook_size=64, codebook_embed_dim=8, image_size=32),
    gpt=dict(dim=64, n_layer=2, n_head=4, n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None,
             vocab_size=64, num_classes=10, class_dropout_prob=0.1, block_size=16, cls_token_num=1),
    gpt_b=dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, multiple_of=32, ffn_dim_multiplier=0.75,
               vocab_size=64, num_classes=10, class_dropout_prob=0.0, block_size=16, cls_token_num=1),
)
# The released sizes: GPT_models names, and the VQ_models names.
RELEASED_GPT = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B")
RELEASED_VQ = ("VQ-16", "VQ-8")


def _import_official(repo: str):
    """The official ``gpt`` / ``generate`` / ``vq_model`` modules of the checkout."""
    if not os.path.isfile(os.path.join(repo, "autoregressive", "models", "gpt.py")):
        sys.exit(f"error: {repo} is not a FoundationVision/LlamaGen checkout (no autoregressive/models/gpt.py); "
                 "pass --llamagen-repo.")
    sys.path.insert(0, os.path.abspath(repo))
    from autoregressive.models import generate, gpt  # noqa: E402  (the official code)
    from tokenizer.tokenizer_image import vq_model  # noqa: E402

    return gpt, generate, vq_model


def _gpt_draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a GPT parameter."""
    if key.endswith(("attention_norm.weight", "ffn_norm.weight")) or key == "norm.weight":
        return 0.2, 1.0
    if key in ("cls_embedding.embedding_table.weight", "tok_embeddings.weight"):
        return 1.0, 0.0
    if len(shape) == 2:  # Linear weight [out, in]
        return 1.0 / math.sqrt(shape[1]), 0.0
    raise ValueError(f"no draw rule for {key} {shape}")


def _vq_draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a VQ parameter."""
    if key == "quantize.embedding.weight":
        return 1.0, 0.0  # not unit vectors: the lookup normalises them
    if len(shape) == 4:  # conv weight [O, I, kh, kw]
        gain = 0.35 if key == "decoder.conv_out.weight" else 1.0
        return gain / math.sqrt(shape[1] * shape[2] * shape[3]), 0.0
    if ".norm" in key:
        return 0.2, (1.0 if key.endswith(".weight") else 0.0)
    return 0.05, 0.0  # conv biases


def randomise(module, draw, rs: np.random.RandomState) -> tuple[dict, dict]:
    """Overwrites every parameter of ``module`` in state-dict order; returns its manifest entry."""
    import torch

    params = dict(module.named_parameters())
    entries, buffers = [], {}
    for key, value in module.state_dict().items():
        shape = tuple(value.shape)
        if key not in params:
            buffers[key] = value.detach().cpu().numpy()
            continue
        scale, offset = draw(key, shape)
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        with torch.no_grad():
            params[key].copy_(torch.from_numpy(w))
        entries.append([key, list(shape), scale, offset, float(np.sum(w, dtype=np.float64))])
    return {"params": entries, "buffers": sorted(buffers)}, buffers


def build_vq(vq_model, c: dict):
    """``VQModel`` with the official ``Encoder``/``Decoder`` at width ``c['ch']``."""
    args = vq_model.ModelArgs(codebook_size=c["codebook_size"], codebook_embed_dim=c["codebook_embed_dim"],
                              encoder_ch_mult=list(c["ch_mult"]), decoder_ch_mult=list(c["ch_mult"]),
                              z_channels=c["z_channels"])
    model = vq_model.VQModel(args)
    model.encoder = vq_model.Encoder(ch=c["ch"], ch_mult=c["ch_mult"], z_channels=c["z_channels"])
    model.decoder = vq_model.Decoder(z_channels=c["z_channels"], ch=c["ch"], ch_mult=c["ch_mult"])
    return model.float().eval()


def build_gpt(gpt, c: dict):
    args = gpt.ModelArgs(
        dim=c["dim"], n_layer=c["n_layer"], n_head=c["n_head"], n_kv_head=c["n_kv_head"], multiple_of=c["multiple_of"],
        ffn_dim_multiplier=c["ffn_dim_multiplier"], vocab_size=c["vocab_size"], num_classes=c["num_classes"],
        class_dropout_prob=c["class_dropout_prob"], block_size=c["block_size"], cls_token_num=c["cls_token_num"],
        token_dropout_p=0.0, attn_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0, drop_path_rate=0.0,
        model_type="c2i")
    return gpt.Transformer(args).float()


def teacher_forced(model, tokens, labels):
    """Logits ``[B, L, V]`` of ``[class, tokens[:, :-1]]`` (the training forward without KV caches;
    dropouts are 0 and label dropout is switched off for the call)."""
    import torch

    for layer in model.layers:  # generate() leaves KV caches on the layers
        layer.attention.kv_cache = None
    keep = model.cls_embedding.dropout_prob
    model.train()
    model.cls_embedding.dropout_prob = 0.0
    try:
        with torch.no_grad():
            logits, _ = model(idx=tokens[:, :-1], cond_idx=labels)
    finally:
        model.cls_embedding.dropout_prob = keep
        model.eval()
    return logits


def _gap(logits, chosen) -> float:
    """Smallest (chosen logit - best other logit); negative when a chosen token is not the argmax."""
    top = np.take_along_axis(logits, chosen[..., None], -1)[..., 0]
    other = logits.copy()
    np.put_along_axis(other, chosen[..., None], -np.inf, -1)
    return float(np.min(top - other.max(-1)))


@contextlib.contextmanager
def _on_meta_device():
    """Builds modules on PyTorch's meta device (shapes only); ``torch.linspace`` (whose ``.item()``
    the GPT calls for its drop-path rates) stays on the CPU."""
    import torch

    linspace = torch.linspace

    def cpu_linspace(*args, **kwargs):
        kwargs["device"] = "cpu"
        return linspace(*args, **kwargs)

    torch.linspace = cpu_linspace
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.linspace = linspace


def released_layouts(gpt, vq_model) -> dict[str, list]:
    """The state-dict keys and shapes of the released sizes."""
    out = {}
    with _on_meta_device():
        for name in RELEASED_GPT:
            model = gpt.GPT_models[name](vocab_size=16384, block_size=256, num_classes=1000, cls_token_num=1,
                                         model_type="c2i")
            out[name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
            del model
        for name in RELEASED_VQ:
            model = vq_model.VQ_models[name](codebook_size=16384, codebook_embed_dim=8)
            out[name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    return out


def _images(rs: np.random.RandomState, batch: int, size: int) -> np.ndarray:
    """Smooth images in [-1, 1]: a few random sinusoids per channel and a mean colour per image."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    image = np.zeros((batch, 3, size, size))
    for b in range(batch):
        for c in range(3):
            fy, fx, phase = rs.uniform(0.5, 3.0), rs.uniform(0.5, 3.0), rs.uniform(0, 2 * np.pi)
            image[b, c] = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    image += np.linspace(-0.5, 0.5, batch)[:, None, None, None]
    return (0.6 * image + 0.1 * rs.uniform(-1, 1, image.shape)).clip(-1, 1).astype(np.float32)


def vq_outputs(name: str, model, image: np.ndarray, margin: float) -> dict[str, np.ndarray]:
    import torch

    x = torch.from_numpy(image)
    with torch.no_grad():
        f = model.quant_conv(model.encoder(x))
        quant, _, (_, _, indices) = model.encode(x)
        b, _, h, w = quant.shape
        tokens = indices.view(b, h, w)
        recon, _ = model(x)
        decoded = model.decode_code(tokens.reshape(-1), quant.shape)
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):  # the tokens must not sit on a tie
            noisy = f * (1 + margin * torch.randn(f.shape, generator=gen))
            again = model.quantize(noisy)[2][2].view(b, h, w)
            if not torch.equal(again, tokens):
                sys.exit(f"error: the {name} tokens change under a {margin} perturbation; pick another --seed.")
    return {f"{name}_f": f.numpy(), f"{name}_tokens": tokens.numpy().astype(np.int32), f"{name}_quant": quant.numpy(),
            f"{name}_recon": recon.numpy(), f"{name}_decoded": decoded.numpy()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llamagen-repo", required=True, help="a checkout of FoundationVision/LlamaGen")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    gpt, generate, vq_model = _import_official(args.llamagen_repo)
    torch.manual_seed(args.seed)
    models = {"vq16": build_vq(vq_model, CONFIG["vq16"]), "vq8": build_vq(vq_model, CONFIG["vq8"]),
              "gpt": build_gpt(gpt, CONFIG["gpt"]), "gpt_b": build_gpt(gpt, CONFIG["gpt_b"])}

    rs = np.random.RandomState(args.seed)
    manifest = {"seed": args.seed, "config": CONFIG, "models": {}}
    arrays = {}
    for name, module in models.items():
        draw = _vq_draw if name.startswith("vq") else _gpt_draw
        manifest["models"][name], buffers = randomise(module, draw, rs)
        arrays.update({f"buffer/{name}/{k}": v for k, v in buffers.items()})

    batch, margin = CONFIG["batch"], 1e-4
    image = _images(rs, batch, CONFIG["vq16"]["image_size"])
    image8 = _images(rs, batch, CONFIG["vq8"]["image_size"])
    arrays.update(image=image, image8=image8, margin=np.float32(margin))
    arrays.update(vq_outputs("vq16", models["vq16"], image, margin))
    arrays.update(vq_outputs("vq8", models["vq8"], image8, margin))

    # Teacher forcing: random tokens, fixed classes.
    cg = CONFIG["gpt"]
    tokens = rs.randint(0, cg["vocab_size"], (batch, cg["block_size"])).astype(np.int64)
    labels = np.asarray(CONFIG["labels"], np.int64)
    arrays.update(tokens=tokens.astype(np.int32), labels=labels.astype(np.int32))
    for name, key in (("gpt", "logits"), ("gpt_b", "logits_b")):
        arrays[key] = teacher_forced(models[name], torch.from_numpy(tokens), torch.from_numpy(labels)).numpy()

    # KV-cache sampling with top-k 1, without and with guidance (official generate()).
    model = models["gpt"].eval()
    cond = torch.tensor(CONFIG["sample_labels"])
    with torch.no_grad():
        sample = generate.generate(model, cond, cg["block_size"], cfg_scale=1.0, temperature=1.0, top_k=1,
                                   top_p=1.0, sample_logits=True)
        sample_cfg = generate.generate(model, cond, cg["block_size"], cfg_scale=CONFIG["cfg_scale"],
                                       temperature=1.0, top_k=1, top_p=1.0, sample_logits=True)
    sample, sample_cfg = sample.long(), sample_cfg.long()
    # Each sampled token is the argmax of the teacher-forced logits of the sampled sequence.
    cond_logits = teacher_forced(model, sample, cond).numpy()
    gap = _gap(cond_logits, sample.numpy())
    c = teacher_forced(model, sample_cfg, cond).numpy()
    u = teacher_forced(model, sample_cfg, torch.full_like(cond, cg["num_classes"])).numpy()
    gap_cfg = _gap(u + (c - u) * CONFIG["cfg_scale"], sample_cfg.numpy())
    if min(gap, gap_cfg) < 1e-3:
        sys.exit(f"error: a sampled token is not a clear argmax (gaps {gap:.2e}, {gap_cfg:.2e}); pick another --seed.")
    if torch.equal(sample, sample_cfg):
        sys.exit("error: guidance does not change the greedy samples; pick another --seed or cfg_scale.")
    h = w = int(math.isqrt(cg["block_size"]))
    with torch.no_grad():
        sample_images = models["vq16"].decode_code(sample.reshape(-1), (len(cond), CONFIG["vq16"]["codebook_embed_dim"],
                                                                         h, w))
    arrays.update(sample_labels=cond.numpy().astype(np.int32), sample=sample.numpy().astype(np.int32),
                  sample_cfg=sample_cfg.numpy().astype(np.int32), sample_images=sample_images.numpy(),
                  sample_gap=np.float32(gap), sample_cfg_gap=np.float32(gap_cfg))

    manifest["released"] = released_layouts(gpt, vq_model)
    arrays["manifest"] = np.asarray(json.dumps(manifest))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    distinct = [len(np.unique(arrays[f"{n}_tokens"])) for n in ("vq16", "vq8")]
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB): {distinct} distinct VQ codes, "
          f"recon in [{arrays['vq16_recon'].min():.2f}, {arrays['vq16_recon'].max():.2f}], logits std "
          f"{arrays['logits'].std():.2f} / {arrays['logits_b'].std():.2f}, sample gaps {gap:.3f} / {gap_cfg:.3f}, "
          f"{len(np.unique(arrays['sample']))} distinct sampled tokens")


if __name__ == "__main__":
    main()
