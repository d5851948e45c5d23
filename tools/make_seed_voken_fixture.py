"""Makes ``tests/fixtures/seed_voken/seed_voken_tiny.npz``: golden outputs of the official Open-MAGVIT2
and IBQ tokenizers (TencentARC/SEED-Voken, tiny, random weights).

    git clone https://github.com/TencentARC/SEED-Voken /tmp/SEED-Voken
    python tools/make_seed_voken_fixture.py --repo /tmp/SEED-Voken

Needs torch and einops only (what the official modules import); nothing is installed into
vqgen's own requirements. The Lightning modules themselves (``src/Open_MAGVIT2/models/lfqgan.py``
``VQModel``, ``src/IBQ/models/ibqgan.py`` ``IBQ``) are not imported: they need the repository's
``main.py``, PyTorch Lightning and an LPIPS network with pretrained VGG weights. Instead each
tokenizer is assembled from the official ``nn.Module``\\ s in the order the Lightning module's
``__init__`` assigns them, so that its ``state_dict()`` has the checkpoint's key names:

* Open-MAGVIT2: ``encoder`` / ``decoder`` (``modules/diffusionmodules/improved_model.py``), ``loss``,
  ``quantize`` (``modules/vqvae/lookup_free_quantize.py`` ``LFQ``, whose buffers are not saved).
* IBQ: ``encoder`` / ``decoder`` (the taming-style ``modules/diffusionmodules/model.py``), ``loss``,
  ``quantize``, 1x1 ``quant_conv`` / ``post_quant_conv``; as in ``IBQ.__init__``, the EMA is taken
  while ``quantize`` is still ``VectorQuantizer2`` and ``quantize`` is then replaced by
  ``IndexPropagationQuantize`` (the same ``quantize.embedding.weight``).
* ``loss`` stands for the training loss: only its PatchGAN (the official ``NLayerDiscriminator``
  at a tiny width) is built, so ``loss.discriminator.*`` keys and their BatchNorm buffers exist as
  in a real checkpoint (the converter ignores ``loss.*``).
* ``model_ema`` is the official ``LitEma`` of that module, built as the Lightning modules build
  it when ``use_ema`` is set (the released configs set it): a buffer ``model_ema.<name without
  dots>`` per trainable parameter (the discriminator's too), ``model_ema.decay`` and
  ``model_ema.num_updates``.

Sizes: Open-MAGVIT2 with ``ch=32`` (the official GroupNorms have 32 groups), ``ch_mult=(1, 2, 2)``,
one res block, a 10-bit LFQ (``z_channels = embed_dim = 10``, 1024 codes); IBQ with ``ch=32``,
``ch_mult=(1, 2, 2)``, one res block, attention at 8x8 (``resolution=32``), ``z_channels=32``,
64 codes of width 16. Images are 32x32, so both have 8x8 tokens. CPU, float32, eval mode.

The weights are not stored: the ``.npz`` holds a manifest of every floating-point state-dict
entry, each drawn as ``standard_normal(shape) * scale + offset`` in manifest order from
``numpy.random.RandomState(seed)`` (raw parameters first, then the EMA copies, drawn
independently so raw and EMA weights differ), with checksums; the integer/statistics buffers
(``num_batches_tracked``, BatchNorm running statistics, ``model_ema.decay``,
``model_ema.num_updates``) are stored as they are under ``buffer/<key>``.

Outputs (official layouts, NCHW), computed with the EMA weights copied in (``LitEma.copy_to``,
what ``ema_scope`` does in the official reconstruction script): ``image`` (inputs in [-1, 1],
shared), and per model ``<m>/f`` (the quantizer input: ``encoder(x)`` for Open-MAGVIT2,
``quant_conv(encoder(x))`` for IBQ), ``<m>/tokens`` ``[B, h, w]`` (Open-MAGVIT2's ids in its own
order, channel ``i`` = bit ``i``), ``<m>/quant``, ``<m>/recon`` (the decoder on ``quant``) and
``<m>/decoded`` (the tokens through ``quantize.get_codebook_entry`` and the decoder). For
Open-MAGVIT2, ``magvit2/factorized`` ``[2, B, h, w]`` are the ``(indices_pre, indices_post)`` of an
official ``LFQ(token_factorization=True, factorized_bits=[4, 6])`` on the same ``f``. ``margin``:
the tokens were checked not to change under a relative perturbation of ``f`` of that size.

The manifest also lists the key layouts (names and shapes, EMA keys included, ``loss.*``
excluded) of the released tokenizers' configs (``configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L``,
``imagenet_lfqgan_128_L``, ``pretrain_lfqgan_256_16384``; ``configs/IBQ/gpu/imagenet_ibqgan_16384``),
built on PyTorch's meta device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "seed_voken", "seed_voken_tiny.npz")

BATCH, SIZE = 2, 32
MAGVIT2 = dict(ddconfig=dict(double_z=False, z_channels=10, resolution=SIZE, in_channels=3, out_ch=3, ch=32,
                             ch_mult=(1, 2, 2), num_res_blocks=1),
               n_embed=1024, embed_dim=10, factorized_bits=(4, 6))
IBQ = dict(ddconfig=dict(double_z=False, z_channels=32, resolution=SIZE, in_channels=3, out_ch=3, ch=32,
                         ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
           n_embed=64, embed_dim=16)
DISC = dict(input_nc=3, ndf=8, n_layers=1)
# The released tokenizers' ddconfigs (configs/*/gpu/*.yaml).
_OM2_BIG = dict(double_z=False, resolution=128, in_channels=3, out_ch=3, ch=128, num_res_blocks=4)
RELEASED = {
    "magvit2": {
        "imagenet_256_L": dict(ddconfig=dict(_OM2_BIG, z_channels=18, ch_mult=(1, 1, 2, 2, 4)), n_embed=262144,
                               embed_dim=18),
        "imagenet_128_L": dict(ddconfig=dict(_OM2_BIG, z_channels=18, ch_mult=(1, 2, 2, 4)), n_embed=262144,
                               embed_dim=18),
        "pretrain256_16384": dict(ddconfig=dict(_OM2_BIG, z_channels=14, ch_mult=(1, 1, 2, 2, 4)), n_embed=16384,
                                  embed_dim=14),
    },
    "ibq": {
        "imagenet256_16384": dict(ddconfig=dict(double_z=False, z_channels=256, resolution=256, in_channels=3,
                                                out_ch=3, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=4,
                                                attn_resolutions=(16,), dropout=0.0), n_embed=16384, embed_dim=256),
    },
}


class Official:
    """The official modules of a SEED-Voken checkout."""

    def __init__(self, repo: str):
        need = ("src/Open_MAGVIT2/modules/diffusionmodules/improved_model.py", "src/IBQ/modules/vqvae/quantize.py")
        if not all(os.path.isfile(os.path.join(repo, p)) for p in need):
            sys.exit(f"error: {repo} is not a TencentARC/SEED-Voken checkout (no {need[0]}); pass --repo.")
        sys.path.insert(0, os.path.abspath(repo))
        # noqa: E402 below: the official code, importable only once the checkout is on the path.
        from src.IBQ.modules.diffusionmodules import model as ibq_model  # noqa: E402
        from src.IBQ.modules.discriminator.model import NLayerDiscriminator  # noqa: E402
        from src.IBQ.modules.ema import LitEma as IBQEma  # noqa: E402
        from src.IBQ.modules.vqvae import quantize as ibq_quantize  # noqa: E402
        from src.Open_MAGVIT2.modules.diffusionmodules import improved_model  # noqa: E402
        from src.Open_MAGVIT2.modules.ema import LitEma  # noqa: E402
        from src.Open_MAGVIT2.modules.vqvae.lookup_free_quantize import LFQ  # noqa: E402

        self.improved_model, self.LFQ, self.LitEma = improved_model, LFQ, LitEma
        self.ibq_model, self.ibq_quantize, self.IBQEma = ibq_model, ibq_quantize, IBQEma
        self.NLayerDiscriminator = NLayerDiscriminator

    def magvit2(self, cfg: dict, with_loss: bool = True):
        """``lfqgan.VQModel``'s modules in its ``__init__`` order, with ``model_ema``."""
        import torch

        net = torch.nn.Module()
        net.encoder = self.improved_model.Encoder(**cfg["ddconfig"])
        net.decoder = self.improved_model.Decoder(**cfg["ddconfig"])
        if with_loss:
            net.loss = torch.nn.Module()
            net.loss.discriminator = self.NLayerDiscriminator(**DISC)
        net.quantize = self.LFQ(dim=cfg["embed_dim"], codebook_size=cfg["n_embed"], sample_minimization_weight=1.0,
                                batch_maximization_weight=1.0)
        net.model_ema = self.LitEma(net)
        return net

    def ibq(self, cfg: dict, with_loss: bool = True):
        """``ibqgan.IBQ``'s modules in its ``__init__`` order, with ``model_ema``."""
        import torch

        dd = cfg["ddconfig"]
        net = torch.nn.Module()
        net.encoder = self.ibq_model.Encoder(**dd)
        net.decoder = self.ibq_model.Decoder(**dd)
        if with_loss:
            net.loss = torch.nn.Module()
            net.loss.discriminator = self.NLayerDiscriminator(**DISC)
        net.quantize = self.ibq_quantize.VectorQuantizer2(cfg["n_embed"], cfg["embed_dim"], beta=0.25)
        net.quant_conv = torch.nn.Conv2d(dd["z_channels"], cfg["embed_dim"], 1)
        net.post_quant_conv = torch.nn.Conv2d(cfg["embed_dim"], dd["z_channels"], 1)
        ema = self.IBQEma(net)  # VQModel.__init__ takes the EMA here
        net.quantize = self.ibq_quantize.IndexPropagationQuantize(cfg["n_embed"], cfg["embed_dim"], 0.25, True)
        net.model_ema = ema
        return net


def _draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a parameter (named by its module path, not its EMA buffer name)."""
    if key == "quantize.embedding.weight":
        return 1.0, 0.0
    if len(shape) == 4:  # conv weight [O, I, kh, kw]
        gain = 0.35 if key == "decoder.conv_out.weight" else 1.0
        return gain / math.sqrt(shape[1] * shape[2] * shape[3]), 0.0
    if ".adaptive." in key:  # Linear [out, z] of the adaptive GroupNorm: a scale near 1, a bias near 0
        if key.endswith(".weight"):
            return 0.5 / math.sqrt(shape[1]), 0.0
        return 0.2, (1.0 if ".gamma." in key else 0.0)
    if "norm" in key or key.startswith("loss.discriminator.main.") and len(shape) == 1 and key.endswith(".weight"):
        return 0.2, (1.0 if key.endswith(".weight") else 0.0)
    return 0.05, 0.0  # biases


def randomise(net, rs: np.random.RandomState) -> tuple[list, dict]:
    """Draws every parameter, then every EMA copy; returns the manifest entries and the other buffers."""
    import torch

    params = dict(net.named_parameters())
    ema = dict(net.model_ema.named_buffers())
    source = {f"model_ema.{s}": name for name, s in net.model_ema.m_name2s_name.items()}
    state = net.state_dict()
    entries, buffers = [], {}
    for phase in ("raw", "ema"):
        for key, value in state.items():
            shape = tuple(value.shape)
            if phase == "raw" and key in params:
                target, rule = params[key], key
            elif phase == "ema" and key in source:
                target, rule = ema[key.removeprefix("model_ema.")], source[key]
            else:
                if phase == "raw" and key not in source:
                    buffers[key] = value.detach().cpu().numpy()
                continue
            scale, offset = _draw(rule, shape)
            w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
            with torch.no_grad():
                target.copy_(torch.from_numpy(w))
            entries.append([key, list(shape), scale, offset, float(np.sum(w, dtype=np.float64))])
    return entries, buffers


def _images(rs: np.random.RandomState) -> np.ndarray:
    yy, xx = np.meshgrid(np.linspace(0, 1, SIZE), np.linspace(0, 1, SIZE), indexing="ij")
    image = np.zeros((BATCH, 3, SIZE, SIZE))
    for b in range(BATCH):
        for c in range(3):
            fy, fx, phase = rs.uniform(0.5, 3.0), rs.uniform(0.5, 3.0), rs.uniform(0, 2 * np.pi)
            image[b, c] = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    image += np.linspace(-0.5, 0.5, BATCH)[:, None, None, None]
    return (0.6 * image + 0.1 * rs.uniform(-1, 1, image.shape)).clip(-1, 1).astype(np.float32)


def run_magvit2(official: Official, net, x, margin: float) -> dict:
    """``VQModel.encode`` / ``decode`` and ``get_codebook_entry`` (the AR stage's decoding) of Open-MAGVIT2."""
    import torch

    with torch.no_grad():
        f = net.encoder(x)
        (quant, _, indices), _ = net.quantize(f, return_loss_breakdown=True)
        b, c, h, w = quant.shape
        tokens = indices.view(b, h, w)
        recon = net.decoder(quant)
        code = net.quantize.get_codebook_entry(tokens.view(b, h * w), (b, h, w, c), order=None)
        decoded = net.decoder(code)
        fact = official.LFQ(dim=c, codebook_size=2**c, token_factorization=True,
                            factorized_bits=list(MAGVIT2["factorized_bits"])).eval()
        (_, _, (pre, post)), _ = fact(f, return_loss_breakdown=True)
        if float(f.abs().min()) < margin * float(f.abs().max()):
            sys.exit(f"error: an Open-MAGVIT2 latent lies within {margin} of a sign change; pick another --seed.")
    return {"f": f, "tokens": tokens, "quant": quant, "recon": recon, "decoded": decoded,
            "factorized": torch.stack([pre.view(b, h, w), post.view(b, h, w)])}


def run_ibq(net, x, margin: float) -> dict:
    """``VQModel.encode`` / ``decode`` and ``get_codebook_entry`` of IBQ."""
    import torch

    with torch.no_grad():
        f = net.quant_conv(net.encoder(x))
        quant, _, (_, _, indices) = net.quantize(f)
        b, c, h, w = quant.shape
        tokens = indices.view(b, h, w)
        recon = net.decoder(net.post_quant_conv(quant))
        code = net.quantize.get_codebook_entry(tokens.reshape(-1), (b, h, w, c))
        decoded = net.decoder(net.post_quant_conv(code))
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):  # the tokens must not sit on a tie
            noisy = f * (1 + margin * torch.randn(f.shape, generator=gen))
            if not torch.equal(net.quantize(noisy)[2][2].view(b, h, w), tokens):
                sys.exit(f"error: the IBQ tokens change under a {margin} perturbation; pick another --seed.")
    return {"f": f, "tokens": tokens, "quant": quant, "recon": recon, "decoded": decoded}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", required=True, help="a checkout of TencentARC/SEED-Voken")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    official = Official(args.repo)
    torch.manual_seed(args.seed)
    nets = {"magvit2": official.magvit2(MAGVIT2).float().eval(), "ibq": official.ibq(IBQ).float().eval()}
    rs = np.random.RandomState(args.seed)
    manifest = {"seed": args.seed, "batch": BATCH, "size": SIZE, "disc": DISC,
                "config": {"magvit2": MAGVIT2, "ibq": IBQ}, "models": {}, "released": {}}
    arrays = {}
    for name, net in nets.items():
        entries, buffers = randomise(net, rs)
        manifest["models"][name] = {"params": entries, "buffers": sorted(buffers)}
        arrays.update({f"{name}/buffer/{k}": v for k, v in buffers.items()})
    image = _images(rs)
    margin = 1e-4
    x = torch.from_numpy(image)
    for name, net in nets.items():
        net.model_ema.copy_to(net)  # the EMA weights, as ema_scope() uses them
        out = run_magvit2(official, net, x, margin) if name == "magvit2" else run_ibq(net, x, margin)
        for key, value in out.items():
            value = value.numpy()
            arrays[f"{name}/{key}"] = value.astype(np.int32) if key in ("tokens", "factorized") else value
        print(f"{name}: tokens {tuple(out['tokens'].shape)} with {len(np.unique(out['tokens'].numpy()))} distinct "
              f"codes, recon in [{float(out['recon'].min()):.2f}, {float(out['recon'].max()):.2f}]")

    with torch.device("meta"):
        for family, sizes in RELEASED.items():
            manifest["released"][family] = {}
            for name, cfg in sizes.items():
                full = official.magvit2(cfg, with_loss=False) if family == "magvit2" else official.ibq(
                    cfg, with_loss=False)
                manifest["released"][family][name] = {
                    "config": cfg, "keys": [[k, list(v.shape)] for k, v in full.state_dict().items()]}
    arrays.update(manifest=np.asarray(json.dumps(manifest)), image=image, margin=np.float32(margin))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
