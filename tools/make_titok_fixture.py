"""Makes ``tests/fixtures/titok/titok_tiny.npz``: golden outputs of the official TiTok code (tiny, random weights).

    git clone https://github.com/bytedance/1d-tokenizer /tmp/1d-tokenizer
    pip install --target /tmp/titokdeps omegaconf          # the one package the official model needs here
    PYTHONPATH=/tmp/titokdeps python tools/make_titok_fixture.py --titok-repo /tmp/1d-tokenizer

Two models of ``modeling/titok.py`` ``TiTok`` are built on CPU in float32 and run in eval mode:

``two_stage`` (the layout of the released TiTok-L-32 / B-64 / S-128: ``finetune_decoder=True``,
  ``is_legacy=True``, l2-normalised codes): 64x64 images, 16x16 patches (a 4x4 grid), an encoder
  of width 128 (2 heads) and a decoder of width 192 (3 heads), 2 blocks each, 8 latent tokens of
  a 32 x 6 codebook, the proxy-code head (1024 MaskGIT codes) and a MaskGIT VQGAN pixel decoder
  with 32 filters, multipliers (1, 1, 2, 2, 4) and 1 res block over 32-dim codes.
``single_stage`` (the layout of the released VQ8k models: ``is_legacy=False``, no l2 norm): 32x32
  images, 8x8 patches, width 64 with 4 heads (not the official 64-wide heads), an encoder of 2
  blocks and a decoder of 1, 16 latent tokens of a 64 x 8 codebook, the decoder predicting pixels.

The official ``TiTokEncoder`` / ``TiTokDecoder`` take their width, depth and heads from a table
of the three paper sizes, and ``TiTok`` builds MaskGIT's full-size pixel decoder. To run them
small, each model is built at the "small" size and the sized layers are then replaced by layers
of the tiny size made from the official classes (``ResidualAttentionBlock``, the MaskGIT
``Decoder`` and ``VectorQuantizer`` of ``modeling/modules/maskgit_vqgan.py``) and ``nn.Conv2d`` /
``nn.Linear`` / ``nn.LayerNorm``, as the official ``__init__`` lays them out; the forward passes
are the official ones. The script checks that the rebuilt models have exactly the official
state-dict keys (the encoder and decoder blocks up to the tiny depth).

The weights are not stored: the ``.npz`` holds a manifest of every state-dict entry, and each
parameter is ``standard_normal(shape) * scale + offset`` drawn in manifest order from
``numpy.random.RandomState(seed)``, with per-key scales so that every parameter matters
(non-trivial LayerNorm/GroupNorm affines and biases, peaked proxy-code logits). The test
(``tests/test_convert_titok.py``) rebuilds the state dicts, checks each tensor's checksum and
converts them.

Outputs per model (official layouts: NCHW images in [0, 1], latents ``[B, C, 1, N]``):
``{m}/image``, ``{m}/z`` (the encoder's latents before quantization), ``{m}/tokens``
(``min_encoding_indices`` as ``[B, N]``), ``{m}/quantized`` (the quantizer's output),
``{m}/recon`` (``TiTok.decode(quantized)``, unclamped; ``decode_tokens(tokens)`` is checked to
agree with it) and, for ``two_stage``, ``{m}/logits`` (the decoder's proxy-code logits
``[B, 1024, g, g]``). The tokens are checked not to change under a relative 1e-4 perturbation of
``z``. The manifest also lists the keys and shapes of the released models (built on the meta
device from ``configs/infer/TiTok/titok_{l32,b64,s128,bl64_vq8k,bl64_vae_c16}.yaml``), which the
test compares with the converter's key manifest.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import types

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "titok", "titok_tiny.npz")

CONFIG = dict(
    batch=2,
    two_stage=dict(image_size=64, patch_size=16, enc=dict(width=128, depth=2, heads=2),
                   dec=dict(width=192, depth=2, heads=3), num_latent_tokens=8, token_size=6, codebook_size=32,
                   use_l2_norm=True, finetune_decoder=True, is_legacy=True,
                   pixel_decoder=dict(hidden_channels=32, channel_mult=[1, 1, 2, 2, 4], num_res_blocks=1,
                                      z_channels=32)),
    single_stage=dict(image_size=32, patch_size=8, enc=dict(width=64, depth=2, heads=4),
                      dec=dict(width=64, depth=1, heads=4), num_latent_tokens=16, token_size=8, codebook_size=64,
                      use_l2_norm=False, finetune_decoder=False, is_legacy=False),
)
RELEASED = ("titok_l32", "titok_b64", "titok_s128", "titok_bl64_vq8k", "titok_bl64_vae_c16")
PROXY_CODES = 1024  # the official legacy decoder head predicts MaskGIT's 1024 codes


def _import_official(repo: str):
    """The official ``modeling`` package of the checkout. ``huggingface_hub`` (a Hub mixin class)
    and ``accelerate`` (a gather used only by clustering VQ in training) are stubbed when they
    are not installed, and ``modeling/modules/__init__.py`` (which imports the training losses and
    torchvision) is not run."""
    if not os.path.isfile(os.path.join(repo, "modeling", "titok.py")):
        sys.exit(f"error: {repo} is not a bytedance/1d-tokenizer checkout (no modeling/titok.py); pass --titok-repo.")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        class PyTorchModelHubMixin:
            def __init_subclass__(cls, **kwargs):
                super().__init_subclass__()

        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = PyTorchModelHubMixin
        sys.modules["huggingface_hub"] = stub
    try:
        import accelerate.utils.operations  # noqa: F401
    except ImportError:
        names = ("accelerate", "accelerate.utils", "accelerate.utils.operations")
        mods = {name: types.ModuleType(name) for name in names}
        mods["accelerate.utils.operations"].gather = lambda x: x
        sys.modules.update(mods)
    repo = os.path.abspath(repo)
    sys.path.insert(0, repo)
    import modeling  # noqa: F401,E402  (the official package)

    modules = types.ModuleType("modeling.modules")
    modules.__path__ = [os.path.join(repo, "modeling", "modules")]
    sys.modules["modeling.modules"] = modules
    from modeling import titok  # noqa: E402

    return titok


def _official_config(c: dict):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "model": {"vq_model": {
            "codebook_size": c["codebook_size"], "token_size": c["token_size"], "use_l2_norm": c["use_l2_norm"],
            "commitment_cost": 0.25, "vit_enc_model_size": "small", "vit_dec_model_size": "small",
            "vit_enc_patch_size": c["patch_size"], "vit_dec_patch_size": c["patch_size"],
            "num_latent_tokens": c["num_latent_tokens"], "finetune_decoder": c["finetune_decoder"],
            "is_legacy": c["is_legacy"]}},
        "dataset": {"preprocessing": {"crop_size": c["image_size"]}},
    })


def _shrink_vit(vit, width: int, depth: int, heads: int, tokens: int) -> None:
    """Gives an official TiTokEncoder/TiTokDecoder the tiny width, depth and heads."""
    import torch
    from torch import nn
    from modeling.modules.blocks import ResidualAttentionBlock

    vit.width, vit.num_layers, vit.num_heads = width, depth, heads
    g = vit.grid_size
    vit.class_embedding = nn.Parameter(torch.zeros(1, width))
    vit.positional_embedding = nn.Parameter(torch.zeros(g * g + 1, width))
    vit.latent_token_positional_embedding = nn.Parameter(torch.zeros(tokens, width))
    vit.ln_pre, vit.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
    vit.transformer = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio=4.0) for _ in range(depth)])


def build_tiny(titok, c: dict):
    """The official TiTok with the sizes of ``c`` (see the module docstring)."""
    import torch
    from omegaconf import OmegaConf
    from torch import nn
    from modeling.modules.maskgit_vqgan import Decoder as PixelDecoder
    from modeling.modules.maskgit_vqgan import VectorQuantizer as PixelQuantizer

    model = titok.TiTok(_official_config(c))
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    enc, dec, p, n = model.encoder, model.decoder, c["patch_size"], c["num_latent_tokens"]
    we, wd = c["enc"]["width"], c["dec"]["width"]
    _shrink_vit(enc, we, c["enc"]["depth"], c["enc"]["heads"], n)
    enc.patch_embed = nn.Conv2d(3, we, kernel_size=p, stride=p, bias=True)
    enc.conv_out = nn.Conv2d(we, c["token_size"], kernel_size=1, bias=True)
    _shrink_vit(dec, wd, c["dec"]["depth"], c["dec"]["heads"], n)
    dec.decoder_embed = nn.Linear(c["token_size"], wd, bias=True)
    dec.mask_token = nn.Parameter(torch.zeros(1, 1, wd))
    if c["is_legacy"]:
        dec.ffn[0] = nn.Conv2d(wd, 2 * wd, 1, padding=0, bias=True)
        dec.ffn[2] = nn.Conv2d(2 * wd, PROXY_CODES, 1, padding=0, bias=True)
    else:
        dec.ffn[0] = nn.Conv2d(wd, p * p * 3, 1, padding=0, bias=True)
    model.latent_tokens = nn.Parameter(torch.zeros(n, we))
    if c["finetune_decoder"]:
        pc = c["pixel_decoder"]
        conf = OmegaConf.create({"channel_mult": pc["channel_mult"], "num_resolutions": len(pc["channel_mult"]),
                                 "dropout": 0.0, "hidden_channels": pc["hidden_channels"], "num_channels": 3,
                                 "num_res_blocks": pc["num_res_blocks"], "resolution": c["image_size"],
                                 "z_channels": pc["z_channels"]})
        model.pixel_decoder = PixelDecoder(conf)
        model.pixel_quantize = PixelQuantizer(num_embeddings=PROXY_CODES, embedding_dim=pc["z_channels"],
                                              commitment_cost=0.25)
    # The rebuilt encoder/decoder have exactly the official keys (blocks up to the tiny depth).
    state = model.state_dict()

    def vit_keys(keys, part, depth):
        out = set()
        for k in keys:
            if not k.startswith(part + "."):
                continue
            bits = k.split(".")
            if bits[1] == "transformer" and int(bits[2]) >= depth:
                continue
            out.add(k)
        return out

    for part in ("encoder", "decoder"):
        depth = c["enc" if part == "encoder" else "dec"]["depth"]
        if vit_keys(state, part, depth) != vit_keys(reference, part, depth):
            sys.exit(f"error: the tiny {part} does not have the official keys; the checkout's layout has changed.")
    others = {k for k in reference if not k.startswith(("encoder.", "decoder.", "pixel_decoder."))}
    if others != {k for k in state if not k.startswith(("encoder.", "decoder.", "pixel_decoder."))}:
        sys.exit("error: the tiny TiTok does not have the official top-level keys; the checkout's layout has changed.")
    return model.float().eval()


def _draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a parameter."""
    parts = key.split(".")
    if any(part.startswith(("ln_", "norm")) for part in parts):  # LayerNorm / GroupNorm affines
        return (0.2, 1.0) if key.endswith(".weight") else (0.1, 0.0)
    if key.endswith(("class_embedding", "positional_embedding", "mask_token")) or key == "latent_tokens":
        return 0.5, 0.0
    if key in ("quantize.embedding.weight", "pixel_quantize.embedding.weight"):
        return 1.0, 0.0
    if key.endswith(("bias", "in_proj_bias")):
        return 0.1, 0.0
    if len(shape) >= 2:  # Linear [out, in], conv [O, I, kh, kw], in_proj_weight [3D, D]
        gain = {"decoder.ffn.2.weight": 3.0, "pixel_decoder.conv_out.weight": 0.35}.get(key, 1.0)
        return gain / math.sqrt(math.prod(shape[1:])), 0.0
    raise ValueError(f"no draw rule for {key} {shape}")


def randomise(module, rs: np.random.RandomState) -> dict:
    """Overwrites every parameter of ``module`` in state-dict order; returns its manifest entry."""
    import torch

    params = dict(module.named_parameters())
    entries, buffers = [], []
    for key, value in module.state_dict().items():
        shape = tuple(value.shape)
        if key not in params:
            buffers.append(key)
            continue
        scale, offset = _draw(key, shape)
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        with torch.no_grad():
            params[key].copy_(torch.from_numpy(w))
        entries.append([key, list(shape), scale, offset, float(np.sum(w, dtype=np.float64))])
    if buffers:
        sys.exit(f"error: unexpected buffers {buffers}; the fixture stores parameters only.")
    return {"params": entries}


def _images(rs: np.random.RandomState, batch: int, size: int) -> np.ndarray:
    """Smooth images in [0, 1] (the official range): a few random sinusoids per channel."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    image = np.zeros((batch, 3, size, size))
    for b in range(batch):
        for c in range(3):
            fy, fx, phase = rs.uniform(0.5, 3.0), rs.uniform(0.5, 3.0), rs.uniform(0, 2 * np.pi)
            image[b, c] = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    image += np.linspace(-0.5, 0.5, batch)[:, None, None, None]
    image = 0.5 + 0.5 * (0.6 * image + 0.1 * rs.uniform(-1, 1, image.shape))
    return image.clip(0, 1).astype(np.float32)


def run_model(model, image: np.ndarray, legacy: bool) -> dict[str, np.ndarray]:
    import torch

    x = torch.from_numpy(image)
    with torch.no_grad():
        z = model.encoder(pixel_values=x, latent_tokens=model.latent_tokens)  # [B, token_size, 1, N]
        quantized, result = model.encode(x)
        tokens = result["min_encoding_indices"]  # [B, 1, N]
        recon = model.decode(quantized)
        decoded = model.decode_tokens(tokens)
        if float((decoded - recon).abs().max()) > 1e-5:
            sys.exit("error: decode_tokens(tokens) and decode(quantized) disagree; the checkout behaves unexpectedly.")
        margin = 1e-4
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            noisy = z * (1 + margin * torch.randn(z.shape, generator=gen))
            if not torch.equal(model.quantize(noisy)[1]["min_encoding_indices"], tokens):
                sys.exit("error: the tokens change under a 1e-4 perturbation of z; pick another --seed.")
        out = {"image": image, "z": z.numpy(), "tokens": tokens[:, 0].numpy().astype(np.int32),
               "quantized": quantized.numpy(), "recon": recon.numpy()}
        if legacy:
            out["logits"] = model.decoder(quantized).numpy()
    return out


def released_manifests(titok, repo: str) -> dict[str, list]:
    """Keys and shapes of the released models as the official configs build them (meta device)."""
    import torch
    from omegaconf import OmegaConf

    out = {}
    for name in RELEASED:
        config = OmegaConf.load(os.path.join(repo, "configs", "infer", "TiTok", f"{name}.yaml"))
        with torch.device("meta"):
            model = titok.TiTok(config)
        out[name] = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--titok-repo", required=True, help="a checkout of bytedance/1d-tokenizer")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    titok = _import_official(args.titok_repo)
    torch.manual_seed(args.seed)
    rs = np.random.RandomState(args.seed)
    manifest = {"seed": args.seed, "config": CONFIG, "models": {}}
    models = {}
    for name in ("two_stage", "single_stage"):
        models[name] = build_tiny(titok, CONFIG[name])
        manifest["models"][name] = randomise(models[name], rs)
    arrays = {}
    for name, model in models.items():
        c = CONFIG[name]
        image = _images(rs, CONFIG["batch"], c["image_size"])
        arrays.update({f"{name}/{k}": v for k, v in run_model(model, image, c["is_legacy"]).items()})
    manifest["released"] = released_manifests(titok, args.titok_repo)

    arrays["manifest"] = np.asarray(json.dumps(manifest))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    summary = ", ".join(
        f"{name}: {len(np.unique(arrays[f'{name}/tokens']))} distinct of {arrays[f'{name}/tokens'].size} tokens, "
        f"recon in [{arrays[f'{name}/recon'].min():.2f}, {arrays[f'{name}/recon'].max():.2f}]" for name in models)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB): {summary}")


if __name__ == "__main__":
    main()
