"""Makes ``tests/fixtures/var/var_tiny.npz``: golden outputs of the official VAR code (tiny, random weights).

    git clone https://github.com/FoundationVision/VAR /tmp/VAR
    python tools/make_var_fixture.py --var-repo /tmp/VAR

The official VQ-VAE (``models/vqvae.py``: its fixed encoder/decoder layout, ``ch=32``, 8 latent
channels, 64 codes, four partially shared Φ, scales 1, 2, 3, 4, so a 64x64 image has a 4x4 grid)
and two VAR transformers over it (``models/var.py``; ``var``: depth 2, width 128, 2 heads,
per-block AdaLN, l2-normalised attention, VAR's defaults; ``var_b``: depth 2, width 64, 2 heads,
shared AdaLN, plain attention) are built on CPU in float32 with flash/fused kernels off and run in
eval mode with ``cond_drop_rate=0`` (VAR's ``forward`` drops labels in every call otherwise).

The weights are not stored: the ``.npz`` holds a manifest of every state-dict entry, and each
parameter is ``standard_normal(shape) * scale + offset`` drawn in manifest order from
``numpy.random.RandomState(seed)`` (a stream numpy keeps frozen), with a per-key scale chosen so
that every parameter matters (AdaLN gammas of order 0.5 instead of VAR's 1e-5 init, non-trivial
GroupNorm affines, attention biases and ``scale_mul``). Buffers (``lvl_1L``,
``attn_bias_for_masking``, ``zero_k_bias``, ``ema_vocab_hit_SV``) are stored as they are. The test
(``tests/test_convert_var.py``) rebuilds the state dicts from the manifest, checks each tensor's
checksum, and converts them. This keeps the fixture well under a megabyte where the VQ-VAE alone
holds 4.4M parameters.

Outputs (official layouts, NCHW images): ``image`` (inputs in [-1, 1]), ``labels``, ``tokens``
(``img_to_idxBl`` joined from the smallest scale), ``f`` (``quant_conv(encoder(image))``),
``f_hat`` (the last ``f_to_idxBl_or_fhat(to_fhat=True)``), ``recon`` (``decoder(post_quant_conv(
f_hat))``, unclamped), ``decoded`` (``idxBl_to_img(tokens, same_shape=True, last_one=True)``),
``var_input`` (``idxBl_to_var_input``), ``logits`` and ``logits_b`` (the teacher-forced
``VAR.forward(labels, var_input)`` of each transformer). ``margin`` is the largest relative
perturbation of ``f`` (1e-4) under which the tokens were checked not to change. The manifest also
lists the keys and shapes of the released sizes (``vae_ch160v4096z32.pth`` and ``var_d16.pth``, as
``build_vae_var`` builds them), which the test compares with the converter's key manifest.
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
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "var", "var_tiny.npz")

CONFIG = dict(
    image_size=64, batch=2, labels=(3, 10),
    vae=dict(ch=32, z_channels=8, vocab_size=64, share_quant_resi=4, patch_nums=(1, 2, 3, 4)),
    var=dict(num_classes=10, depth=2, embed_dim=128, num_heads=2, shared_aln=False, attn_l2_norm=True),
    var_b=dict(num_classes=10, depth=2, embed_dim=64, num_heads=2, shared_aln=True, attn_l2_norm=False),
)


def _import_official(var_repo: str):
    """The official ``models`` package of the checkout (``huggingface_hub``, used there only for a
    Hub mixin class, is stubbed when it is not installed)."""
    if not os.path.isfile(os.path.join(var_repo, "models", "vqvae.py")):
        sys.exit(f"error: {var_repo} is not a FoundationVision/VAR checkout (no models/vqvae.py); pass --var-repo.")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        stub = types.ModuleType("huggingface_hub")
        stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
        sys.modules["huggingface_hub"] = stub
    sys.path.insert(0, os.path.abspath(var_repo))
    import models  # noqa: E402  (the official package)

    return models


def _vae_draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a VQ-VAE parameter."""
    if key == "quantize.embedding.weight":
        return 0.35, 0.0
    if len(shape) == 4:  # conv weight [O, I, kh, kw]
        gain = 0.35 if key == "decoder.conv_out.weight" else 1.0
        return gain / math.sqrt(shape[1] * shape[2] * shape[3]), 0.0
    if ".norm" in key or key.startswith(("encoder.norm_out", "decoder.norm_out")):
        return 0.2, (1.0 if key.endswith(".weight") else 0.0)
    return 0.05, 0.0  # conv biases


def _var_draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a VAR parameter."""
    if key.endswith("scale_mul_1H11"):
        return 0.3, math.log(4.0)
    if key.endswith(("q_bias", "v_bias", ".bias")):
        return 0.1, 0.0
    if key.endswith("ada_gss"):
        return 0.3, 0.0
    if key in ("class_emb.weight", "pos_start", "pos_1LC", "lvl_embed.weight"):
        return 0.5, 0.0
    if len(shape) == 2:  # Linear weight [out, in]
        gain = 0.5 if "ada_lin" in key else 1.0
        return gain / math.sqrt(shape[1]), 0.0
    raise ValueError(f"no draw rule for {key} {shape}")


def randomise(module, draw, rs: np.random.RandomState) -> dict:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--var-repo", required=True, help="a checkout of FoundationVision/VAR")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    models = _import_official(args.var_repo)
    from models.var import VAR  # noqa: E402
    from models.vqvae import VQVAE  # noqa: E402

    torch.manual_seed(args.seed)
    cv = CONFIG["vae"]
    vae = VQVAE(vocab_size=cv["vocab_size"], z_channels=cv["z_channels"], ch=cv["ch"], test_mode=True,
                share_quant_resi=cv["share_quant_resi"], v_patch_nums=cv["patch_nums"]).float().eval()

    def build_var(c):
        return VAR(vae_local=vae, num_classes=c["num_classes"], depth=c["depth"], embed_dim=c["embed_dim"],
                   num_heads=c["num_heads"], drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6,
                   shared_aln=c["shared_aln"], cond_drop_rate=0.0, attn_l2_norm=c["attn_l2_norm"],
                   patch_nums=cv["patch_nums"], flash_if_available=False, fused_if_available=False).float().eval()

    var, var_b = build_var(CONFIG["var"]), build_var(CONFIG["var_b"])
    del models

    rs = np.random.RandomState(args.seed)
    manifest = {"seed": args.seed, "config": CONFIG, "models": {}}
    arrays = {}
    for name, module, draw in (("vae", vae, _vae_draw), ("var", var, _var_draw), ("var_b", var_b, _var_draw)):
        manifest["models"][name], buffers = randomise(module, draw, rs)
        arrays.update({f"buffer/{name}/{k}": v for k, v in buffers.items()})

    size, batch = CONFIG["image_size"], CONFIG["batch"]
    # Smooth images in [-1, 1]: a few random sinusoids per channel.
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    image = np.zeros((batch, 3, size, size))
    for b in range(batch):
        for c in range(3):
            fy, fx, phase = rs.uniform(0.5, 3.0), rs.uniform(0.5, 3.0), rs.uniform(0, 2 * np.pi)
            image[b, c] = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    image += np.linspace(-0.5, 0.5, batch)[:, None, None, None]  # a different mean colour per image
    image = (0.6 * image + 0.1 * rs.uniform(-1, 1, image.shape)).clip(-1, 1).astype(np.float32)
    labels = np.asarray(CONFIG["labels"], np.int64)

    x = torch.from_numpy(image)
    with torch.no_grad():
        f = vae.quant_conv(vae.encoder(x))
        idx_bl = vae.img_to_idxBl(x)
        f_hat = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
        recon = vae.decoder(vae.post_quant_conv(f_hat))
        decoded = vae.idxBl_to_img(idx_bl, same_shape=True, last_one=True)
        var_input = vae.quantize.idxBl_to_var_input(idx_bl)
        label_t = torch.from_numpy(labels)
        logits = var(label_t, var_input)
        logits_b = var_b(label_t, var_input)
        # The tokens must not sit on a tie: they survive a relative perturbation of f far above float32 noise.
        margin = 1e-4
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            noisy = f * (1 + margin * torch.randn(f.shape, generator=gen))
            again = vae.quantize.f_to_idxBl_or_fhat(noisy, to_fhat=False)
            if any(not torch.equal(a, b) for a, b in zip(again, idx_bl)):
                sys.exit("error: the tokens change under a 1e-4 perturbation of f; pick another --seed.")

    # The key layout of the released sizes (vae_ch160v4096z32.pth, var_d16.pth) as build_vae_var makes them.
    from models import build_vae_var  # noqa: E402

    full_vae, full_var = build_vae_var(device="cpu", depth=16, flash_if_available=False, fused_if_available=False)
    manifest["released"] = {name: [[k, list(v.shape)] for k, v in m.state_dict().items()]
                            for name, m in (("vae_ch160v4096z32", full_vae), ("var_d16", full_var))}
    del full_vae, full_var

    tokens = torch.cat(idx_bl, dim=1).numpy().astype(np.int32)
    per_scale = [len(np.unique(t.numpy())) for t in idx_bl]
    arrays.update(
        manifest=np.asarray(json.dumps(manifest)), image=image, labels=labels.astype(np.int32), tokens=tokens,
        f=f.numpy(), f_hat=f_hat.numpy(), recon=recon.numpy(), decoded=decoded.numpy(),
        var_input=var_input.numpy(), logits=logits.numpy(), logits_b=logits_b.numpy(), margin=np.float32(margin))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} kB): tokens {tokens.shape} with "
          f"{per_scale} distinct codes per scale, recon in [{recon.min():.2f}, {recon.max():.2f}], "
          f"logits std {logits.std():.2f} / {logits_b.std():.2f}")


if __name__ == "__main__":
    main()
