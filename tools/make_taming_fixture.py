"""Makes ``tests/fixtures/taming/taming_tiny.npz``: golden outputs of the official taming-transformers
VQGAN code (tiny, random weights).

    git clone https://github.com/CompVis/taming-transformers /tmp/taming
    python tools/make_taming_fixture.py --taming-repo /tmp/taming

The model is ``taming.models.vqgan.VQModel``'s autoencoder, assembled as its ``__init__`` does
(``Encoder(**ddconfig)``, ``Decoder(**ddconfig)``, ``VectorQuantizer2(n_embed, embed_dim,
beta=0.25)``, 1x1 ``quant_conv`` / ``post_quant_conv``) from the checkout's
``taming/modules/diffusionmodules/model.py`` and ``taming/modules/vqvae/quantize.py`` (importing
``VQModel`` itself needs PyTorch Lightning and the repository's ``main.py``), with the released
f16 ``ddconfig`` at a tiny width: ``ch=32``, ``ch_mult=(1, 1, 2, 2, 4)``, two res blocks,
``z_channels=32``, 64 codes of width 16, ``resolution=64`` and ``attn_resolutions=(8, 4)`` (attention
at the two lowest levels; the releases have it at the lowest only), so a 64x64 image has a 4x4
token grid. It runs on CPU in float32, and ``encode``/``decode`` are computed as ``VQModel``'s
methods compute them.

The weights are not stored: the ``.npz`` holds a manifest of every state-dict entry, each drawn as
``standard_normal(shape) * scale + offset`` in manifest order from
``numpy.random.RandomState(seed)`` (non-trivial GroupNorm affines and biases, an unnormalised
codebook), which the test rebuilds and checks against stored checksums.

Outputs (NCHW): ``image`` (inputs in [-1, 1]), ``f`` (``quant_conv(encoder(x))``), ``tokens``
``[B, h, w]``, ``quant``, ``recon`` (``decoder(post_quant_conv(quant))``) and ``decoded`` (the
tokens' ``get_codebook_entry`` decoded, as ``Net2NetTransformer.decode_to_img`` does); ``margin``
is the relative perturbation of ``f`` (1e-4) under which the tokens were checked not to change.
The manifest also lists the autoencoder keys and shapes of the released
``vqgan_imagenet_f16_1024`` and ``vqgan_imagenet_f16_16384`` ddconfigs (built on PyTorch's meta
device).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "taming", "taming_tiny.npz")

DDCONFIG = dict(double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=(1, 1, 2, 2, 4),
                num_res_blocks=2, attn_resolutions=(8, 4), dropout=0.0)
CONFIG = dict(batch=2, n_embed=64, embed_dim=16, ddconfig=DDCONFIG)
# configs/imagenet_vqgan.yaml and the released f16 models' configs.
RELEASED_DDCONFIG = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                         ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
RELEASED = {"vqgan_imagenet_f16_1024": dict(n_embed=1024, embed_dim=256),
            "vqgan_imagenet_f16_16384": dict(n_embed=16384, embed_dim=256)}


def _import_official(repo: str):
    if not os.path.isfile(os.path.join(repo, "taming", "modules", "diffusionmodules", "model.py")):
        sys.exit(f"error: {repo} is not a CompVis/taming-transformers checkout; pass --taming-repo.")
    sys.path.insert(0, os.path.abspath(repo))
    from taming.modules.diffusionmodules import model  # noqa: E402  (the official code)
    from taming.modules.vqvae import quantize  # noqa: E402

    return model, quantize


def build(model_lib, quantize_lib, ddconfig: dict, n_embed: int, embed_dim: int):
    """The autoencoder of ``VQModel(ddconfig, lossconfig, n_embed, embed_dim)`` (its state-dict layout)."""
    import torch

    net = torch.nn.Module()
    net.encoder = model_lib.Encoder(**ddconfig)
    net.decoder = model_lib.Decoder(**ddconfig)
    net.quantize = quantize_lib.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
    net.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
    net.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
    return net


def _draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    if key == "quantize.embedding.weight":
        return 1.0, 0.0
    if len(shape) == 4:  # conv weight [O, I, kh, kw]
        gain = 0.35 if key == "decoder.conv_out.weight" else 1.0
        return gain / math.sqrt(shape[1] * shape[2] * shape[3]), 0.0
    if ".norm" in key:
        return 0.2, (1.0 if key.endswith(".weight") else 0.0)
    return 0.05, 0.0  # conv biases


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taming-repo", required=True, help="a checkout of CompVis/taming-transformers")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    model_lib, quantize_lib = _import_official(args.taming_repo)
    torch.manual_seed(args.seed)
    net = build(model_lib, quantize_lib, DDCONFIG, CONFIG["n_embed"], CONFIG["embed_dim"]).float().eval()

    rs = np.random.RandomState(args.seed)
    entries = []
    params = dict(net.named_parameters())
    for key, value in net.state_dict().items():
        if key not in params:
            sys.exit(f"error: unexpected buffer {key}")
        scale, offset = _draw(key, tuple(value.shape))
        w = (rs.standard_normal(tuple(value.shape)) * scale + offset).astype(np.float32)
        with torch.no_grad():
            params[key].copy_(torch.from_numpy(w))
        entries.append([key, list(value.shape), scale, offset, float(np.sum(w, dtype=np.float64))])

    batch, size, margin = CONFIG["batch"], DDCONFIG["resolution"], 1e-4
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    image = np.zeros((batch, 3, size, size))
    for b in range(batch):
        for c in range(3):
            fy, fx, phase = rs.uniform(0.5, 3.0), rs.uniform(0.5, 3.0), rs.uniform(0, 2 * np.pi)
            image[b, c] = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    image += np.linspace(-0.5, 0.5, batch)[:, None, None, None]
    image = (0.6 * image + 0.1 * rs.uniform(-1, 1, image.shape)).clip(-1, 1).astype(np.float32)

    x = torch.from_numpy(image)
    with torch.no_grad():
        f = net.quant_conv(net.encoder(x))  # VQModel.encode
        quant, _, (_, _, indices) = net.quantize(f)
        b, _, h, w = quant.shape
        tokens = indices.view(b, h, w)
        recon = net.decoder(net.post_quant_conv(quant))  # VQModel.decode
        code = net.quantize.get_codebook_entry(tokens.reshape(-1), (b, h, w, CONFIG["embed_dim"]))
        decoded = net.decoder(net.post_quant_conv(code))  # as Net2NetTransformer.decode_to_img
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):  # the tokens must not sit on a tie
            noisy = f * (1 + margin * torch.randn(f.shape, generator=gen))
            if not torch.equal(net.quantize(noisy)[2][2].view(b, h, w), tokens):
                sys.exit(f"error: the tokens change under a {margin} perturbation; pick another --seed.")

    released = {}
    with torch.device("meta"):
        for name, sizes in RELEASED.items():
            full = build(model_lib, quantize_lib, RELEASED_DDCONFIG, sizes["n_embed"], sizes["embed_dim"])
            released[name] = [[k, list(v.shape)] for k, v in full.state_dict().items()]
    manifest = {"seed": args.seed, "config": CONFIG, "params": entries, "released": released}
    arrays = dict(manifest=np.asarray(json.dumps(manifest)), image=image, f=f.numpy(),
                  tokens=tokens.numpy().astype(np.int32), quant=quant.numpy(), recon=recon.numpy(),
                  decoded=decoded.numpy(), margin=np.float32(margin))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB): tokens {tuple(tokens.shape)} with "
          f"{len(np.unique(tokens.numpy()))} distinct codes, recon in [{recon.min():.2f}, {recon.max():.2f}]")


if __name__ == "__main__":
    main()
