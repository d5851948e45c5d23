"""Makes ``tests/fixtures/mar/diffloss_tiny.npz``, ``mar_tiny.npz`` and ``vae_tiny.npz``: golden
outputs of the official MAR code (LTH14/mar; tiny, random weights).

    git clone https://github.com/LTH14/mar /tmp/mar
    pip install timm==0.9.12        # MAR's pinned version, for its transformer blocks
    python tools/make_mar_fixture.py --mar-repo /tmp/mar

``diffloss_tiny.npz``: the official ``DiffLoss`` (``models/diffloss.py``: its ``SimpleMLPAdaLN``
head and the ``create_diffusion`` schedules of ``diffusion/``) built on CPU in float32 with
4-channel tokens, 6-channel conditions, width 16, 2 residual blocks and a 10-step sampler.

``mar_tiny.npz``: the official ``MAR`` (``models/mar.py`` with timm's ``Block``) at 64px over a
stride-16 VAE of 4 channels (a 4x4 grid of 4-channel tokens), encoder width 32 with 2 blocks and 4
heads, decoder width 24 with 1 block and 2 heads, 5 classes, 2 buffer tokens, a 1-block head of
width 16, ``diffusion_batch_mul=2``, LayerNorm eps 1e-6 (as the released variants), in eval mode (no dropout, no label drop). It holds the
decoder output ``z`` of ``forward_mae_encoder`` + ``forward_mae_decoder`` for given latents, class
embeddings (the last row ``fake_latent``) and a mask with 12 of 16 tokens masked per row, and the
loss of ``forward_loss`` with its timesteps and noise fixed (``t``, ``noise`` over the tiled rows),
and ``sample_tokens`` outputs (``sample_linear``, ``sample_constant``, ``sample_plain``, NCHW) for
given ``orders`` with ``DiffLoss.sample`` replaced by a deterministic function of the conditions,
guidance scale and temperature (see ``stand_in``): the iteration schedule, the tokens predicted
at each iteration, the guidance batch and ramp and the writes are MAR's, the diffusion draws are
not (they are checked in ``diffloss_tiny.npz``).
torchvision, which timm imports for its data transforms only, is replaced by a stub when it does
not import (it does not beside the CPU torch wheel).

``vae_tiny.npz``: the official ``AutoencoderKL`` (``models/vae.py``, LDM's KL-VAE) with
``embed_dim=4`` and ``ch_mult=(1, 2)``, its encoder and decoder rebuilt at filters 32 (GroupNorm's
32 groups need it), one res block per level, 16px images and attention at resolution 8 in the
encoder only (MAR's KL-16 has it at 16 of 256 in the encoder only): the posterior ``mean`` and
``logvar`` of given images (``posterior.mean``, ``posterior.logvar``, NCHW), ``recon``
(``decode(mean)``) and ``recon_sample`` (``decode(mean + std * eps)`` for the stored ``eps``).

The weights are not stored: the ``.npz`` holds a manifest of every state-dict entry, and each
parameter is ``standard_normal(shape) * scale + offset`` drawn in manifest order from
``numpy.random.RandomState(seed)``, with scales chosen so that every parameter matters (MAR zeroes
the AdaLN modulations and the output layer at init; here they are of order one). The test
(``tests/test_convert_mar.py``) rebuilds the state dict, checks each tensor's checksum and
converts it with :mod:`vqgen.convert.mar`.

Outputs, with the inputs they came from:

- ``head_out [N, 8]``: ``net(x, t, c)`` at ``x``, timesteps ``t`` (0 and 999 included), ``c``.
- ``mse``, ``vb``, ``loss [N]``: ``train_diffusion.training_losses(net, target, t, {c}, noise)``,
  and ``masked_loss``: their ``(loss * mask).sum() / mask.sum()`` (``DiffLoss.forward``'s
  reduction).
- ``sample [n, 4]``: ``gen_diffusion.p_sample`` from ``x_T`` down to step 0 with temperature
  0.7 (what ``p_sample_loop`` runs, without its ``.cuda()`` calls); ``sample_cfg``: the same with
  ``net.forward_with_cfg`` at scale 2.5 over the conditional and unconditional conditions. The
  noise each step draws (``torch.randn_like``) is taken from ``step_noise`` /
  ``step_noise_cfg [S, rows, 4]``. ``traj`` / ``traj_cfg [S + 1, n, 4]`` hold every state of the
  two chains from ``x_T`` (random heads send the chains far out, so the test also checks each
  step from the official state before it).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "mar", "diffloss_tiny.npz")
DEFAULT_MAR_OUT = os.path.join(REPO, "tests", "fixtures", "mar", "mar_tiny.npz")
DEFAULT_VAE_OUT = os.path.join(REPO, "tests", "fixtures", "mar", "vae_tiny.npz")

CONFIG = dict(target_channels=4, z_channels=6, width=16, depth=2, num_sampling_steps="10", rows=12, samples=5,
              temperature=0.7, cfg=2.5, seed=0)
MAR_CONFIG = dict(img_size=64, vae_stride=16, patch_size=1, encoder_embed_dim=32, encoder_depth=2,
                  encoder_num_heads=4, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, vae_embed_dim=4,
                  class_num=5, buffer_size=2, diffloss_d=1, diffloss_w=16, num_sampling_steps="10",
                  diffusion_batch_mul=2, mask_ratio_min=0.7)
MAR_INPUTS = dict(batch=3, labels=(1, 4, -1), masked=12, seed=2)  # label -1: the fake latent
VAE_CONFIG = dict(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, encoder_attn_resolutions=(8,),
                  decoder_attn_resolutions=(), resolution=16, in_channels=3, images=2, seed=4)
SAMPLE_RUNS = {  # sample_tokens settings (labels None: MAR's unconditional generation)
    "linear": dict(labels=(1, 4, 0), num_iter=5, cfg=2.0, cfg_schedule="linear", temperature=0.5),
    "constant": dict(labels=(3, 2, 2), num_iter=16, cfg=3.0, cfg_schedule="constant", temperature=0.0),
    "plain": dict(labels=None, num_iter=4, cfg=1.0, cfg_schedule="linear", temperature=1.0),
}


def _import_official(mar_repo: str):
    if not os.path.isfile(os.path.join(mar_repo, "models", "diffloss.py")):
        sys.exit(f"error: {mar_repo} is not an LTH14/mar checkout (no models/diffloss.py); pass --mar-repo.")
    sys.path.insert(0, os.path.abspath(mar_repo))
    from models import diffloss  # noqa: E402  (the official module)

    return diffloss


def _stub_torchvision() -> None:
    """timm imports torchvision for its data pipeline; MAR's blocks do not need it."""
    import enum
    import types

    import torch  # noqa: F401  (before the stub: torch looks for torchvision while it imports)

    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001  (any failure: the PyPI wheel does not load beside CPU torch)
        pass

    class _Any(type):
        def __getattr__(cls, name):
            return cls

        def __call__(cls, *args, **kwargs):
            return cls

    class Anything(metaclass=_Any):
        pass

    class InterpolationMode(enum.Enum):
        NEAREST, BILINEAR, BICUBIC, BOX, HAMMING, LANCZOS = ("nearest", "bilinear", "bicubic", "box", "hamming",
                                                              "lanczos")

    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                 "torchvision.transforms.functional", "torchvision.datasets", "torchvision.models",
                 "torchvision.models.feature_extraction"):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr: Anything
        module.__path__ = []
        sys.modules[name] = module
    sys.modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode


def _draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a parameter: every one of order one in its role."""
    if key.endswith(("in_ln.weight", "norm1.weight", "norm2.weight", "_norm.weight", "z_proj_ln.weight",
                     "norm.weight", "norm_out.weight")):
        return 0.2, 1.0
    if key.endswith(".bias"):
        return 0.1, 0.0
    if len(shape) == 4:  # a conv weight [O, I, kh, kw]: unit gain over its fan-in
        return 1.0 / math.sqrt(shape[1] * shape[2] * shape[3]), 0.0
    if len(shape) != 2 or key == "class_emb.weight":  # tables: class embeddings, positions, fake latent, mask token
        return 0.5, 0.0
    gain = 0.5 if "adaLN_modulation" in key else 1.0
    return gain / math.sqrt(shape[1]), 0.0


def _randomize(module, seed: int):
    """Draws every parameter of ``module`` (manifest order) and returns the manifest."""
    import torch

    rs = np.random.RandomState(seed)
    manifest, state = [], {}
    for key, tensor in module.state_dict().items():
        shape = tuple(tensor.shape)
        scale, offset = _draw(key, shape)
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        manifest.append([key, list(shape), scale, offset, float(np.sum(w, dtype=np.float64))])
        state[key] = torch.from_numpy(w)
    module.load_state_dict(state)
    return manifest


def make_mar(mar_repo: str, out: str) -> None:
    """``mar_tiny.npz`` (see the module docstring)."""
    _stub_torchvision()
    import torch

    sys.path.insert(0, os.path.abspath(mar_repo))
    from models import mar as official  # noqa: E402  (the official module)

    torch.set_grad_enabled(False)
    # LayerNorm eps 1e-6 as mar_base / mar_large / mar_huge build it (MAR's own default is torch's 1e-5).
    norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    model = official.MAR(**MAR_CONFIG, norm_layer=norm).float().eval()
    manifest = _randomize(model, MAR_INPUTS["seed"])
    ins = np.random.RandomState(MAR_INPUTS["seed"] + 1)
    b, c = MAR_INPUTS["batch"], MAR_CONFIG["vae_embed_dim"]
    side = MAR_CONFIG["img_size"] // MAR_CONFIG["vae_stride"]
    latents = ins.standard_normal((b, c, side, side)).astype(np.float32)  # NCHW, as MAR reads them
    length = side * side
    mask = np.zeros((b, length), np.float32)
    for row in range(b):
        mask[row, ins.permutation(length)[: MAR_INPUTS["masked"]]] = 1.0
    mul = MAR_CONFIG["diffusion_batch_mul"]
    t = ins.randint(0, 1000, b * length * mul).astype(np.int64)
    noise = ins.standard_normal((b * length * mul, c)).astype(np.float32)

    T = torch.from_numpy
    labels = torch.tensor([max(v, 0) for v in MAR_INPUTS["labels"]])
    cls = model.class_emb(labels)
    cls[torch.tensor(MAR_INPUTS["labels"]) < 0] = model.fake_latent[0]
    x = model.patchify(T(latents))
    z = model.forward_mae_decoder(model.forward_mae_encoder(x, T(mask), cls), T(mask))
    target = x.reshape(b * length, -1).repeat(mul, 1)
    terms = model.diffloss.train_diffusion.training_losses(model.diffloss.net, target, T(t),
                                                           dict(c=z.reshape(b * length, -1).repeat(mul, 1)),
                                                           noise=T(noise))
    flat_mask = T(mask).reshape(-1).repeat(mul)
    loss = float((terms["loss"] * flat_mask).sum() / flat_mask.sum())

    # sample_tokens with its orders fixed and DiffLoss.sample replaced by a deterministic stand-in
    # that reads the conditions (both halves under guidance), the guidance scale and the
    # temperature, so the iteration bookkeeping (masks, guidance ramp, writes) is what is compared.
    orders = np.stack([ins.permutation(length) for _ in range(b)]).astype(np.int64)
    model.sample_orders = lambda bsz: T(orders)

    def stand_in(zz, temperature, cfg):
        if cfg == 1.0:
            return zz[:, :c] + temperature
        half = zz.shape[0] // 2
        out = zz[:half, :c] + cfg * (zz[:half, c:2 * c] - zz[half:, c:2 * c]) + temperature
        return torch.cat([out, out])

    model.diffloss.sample = stand_in
    real_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # MAR's sampler moves every tensor to the GPU
    samples = {}
    try:
        for name, kw in SAMPLE_RUNS.items():
            labels_gen = None if kw["labels"] is None else torch.tensor(kw["labels"])
            drawn = model.sample_tokens(bsz=b, num_iter=kw["num_iter"], cfg=kw["cfg"], cfg_schedule=kw["cfg_schedule"],
                                        labels=labels_gen, temperature=kw["temperature"])
            samples[f"sample_{name}"] = drawn.numpy()  # [B, C, h, w]
    finally:
        torch.Tensor.cuda = real_cuda
    os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez_compressed(
        out, manifest=json.dumps({"config": MAR_CONFIG, "inputs": MAR_INPUTS, "params": manifest}),
        latents=latents, mask=mask, t=t, noise=noise, tokens=x.numpy(), z=z.numpy(), loss=np.float32(loss),
        row_loss=terms["loss"].numpy(), orders=orders, **samples,
    )
    print(f"wrote {out} ({os.path.getsize(out)} bytes): {sum(int(np.prod(e[1])) for e in manifest)} parameters, "
          f"loss {loss:.6f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mar-repo", required=True, help="a checkout of https://github.com/LTH14/mar")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--mar-out", default=DEFAULT_MAR_OUT)
    parser.add_argument("--vae-out", default=DEFAULT_VAE_OUT)
    parser.add_argument("--only", choices=("diffloss", "mar", "vae"), default=None, help="make one fixture only")
    args = parser.parse_args(argv)
    if args.only in (None, "diffloss"):
        make_diffloss(args.mar_repo, args.out)
    if args.only in (None, "mar"):
        make_mar(args.mar_repo, args.mar_out)
    if args.only in (None, "vae"):
        make_vae(args.mar_repo, args.vae_out)


def make_vae(mar_repo: str, out: str) -> None:
    """``vae_tiny.npz`` (see the module docstring)."""
    import torch

    sys.path.insert(0, os.path.abspath(mar_repo))
    from models import vae as official  # noqa: E402  (the official module)

    torch.set_grad_enabled(False)
    cfg = VAE_CONFIG
    model = official.AutoencoderKL(embed_dim=cfg["embed_dim"], ch_mult=cfg["ch_mult"])
    arch = dict(ch=cfg["ch"], ch_mult=cfg["ch_mult"], num_res_blocks=cfg["num_res_blocks"],
                resolution=cfg["resolution"], z_channels=cfg["embed_dim"], in_channels=cfg["in_channels"],
                out_ch=cfg["in_channels"], dropout=0.0)
    model.encoder = official.Encoder(attn_resolutions=cfg["encoder_attn_resolutions"], double_z=True, **arch)
    model.decoder = official.Decoder(attn_resolutions=cfg["decoder_attn_resolutions"], **arch)
    model = model.float().eval()
    manifest = _randomize(model, cfg["seed"])
    ins = np.random.RandomState(cfg["seed"] + 1)
    n, side = cfg["images"], cfg["resolution"]
    x = np.clip(ins.standard_normal((n, cfg["in_channels"], side, side)) * 0.5, -1, 1).astype(np.float32)  # NCHW
    posterior = model.encode(torch.from_numpy(x))
    mean, logvar = posterior.mean, posterior.logvar
    eps = ins.standard_normal(tuple(mean.shape)).astype(np.float32)
    recon = model.decode(mean)
    recon_sample = model.decode(mean + posterior.std * torch.from_numpy(eps))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    np.savez_compressed(out, manifest=json.dumps({"config": cfg, "params": manifest}), x=x, mean=mean.numpy(),
                        logvar=logvar.numpy(), eps=eps, recon=recon.numpy(), recon_sample=recon_sample.numpy())
    print(f"wrote {out} ({os.path.getsize(out)} bytes): {sum(int(np.prod(e[1])) for e in manifest)} parameters, "
          f"recon max |x| {float(recon.abs().max()):.3g}, logvar in [{float(logvar.min()):.3g}, "
          f"{float(logvar.max()):.3g}]")


def make_diffloss(mar_repo: str, out_path: str) -> None:
    """``diffloss_tiny.npz`` (see the module docstring)."""
    diffloss = _import_official(mar_repo)
    import torch

    torch.set_grad_enabled(False)
    cfg = CONFIG
    model = diffloss.DiffLoss(cfg["target_channels"], cfg["z_channels"], cfg["depth"], cfg["width"],
                              cfg["num_sampling_steps"]).float().eval()
    net = model.net
    manifest = _randomize(net, cfg["seed"])

    c, n, s = cfg["target_channels"], cfg["rows"], cfg["samples"]
    ins = np.random.RandomState(cfg["seed"] + 1)
    x = ins.standard_normal((n, c)).astype(np.float32)
    target = ins.standard_normal((n, c)).astype(np.float32)
    z = ins.standard_normal((n, cfg["z_channels"])).astype(np.float32)
    noise = ins.standard_normal((n, c)).astype(np.float32)
    t = ins.randint(0, 1000, n).astype(np.int64)
    t[:3] = [0, 999, 1]
    mask = (ins.uniform(size=n) < 0.6).astype(np.float32)
    mask[:2] = 1.0
    z_cond = ins.standard_normal((s, cfg["z_channels"])).astype(np.float32)
    z_uncond = ins.standard_normal((s, cfg["z_channels"])).astype(np.float32)
    x_T = ins.standard_normal((s, c)).astype(np.float32)
    steps = model.gen_diffusion.num_timesteps
    step_noise = ins.standard_normal((steps, s, c)).astype(np.float32)
    step_noise_cfg = ins.standard_normal((steps, 2 * s, c)).astype(np.float32)

    T = torch.from_numpy
    head_out = net(T(x), T(t), T(z)).numpy()
    terms = model.train_diffusion.training_losses(net, T(target), T(t), dict(c=T(z)), noise=T(noise))
    loss = terms["loss"]
    masked_loss = float((loss * T(mask)).sum() / T(mask).sum())

    def reverse_chain(fn, img, kwargs, draws):
        """The states ``[S + 1, rows, C]`` from ``x_T`` to the sample."""
        real_randn_like = torch.randn_like
        queue = [T(d) for d in draws]
        torch.randn_like = lambda ref, **kw: queue.pop(0)  # the noise p_sample draws, in order
        states = [img.numpy()]
        try:
            for i in reversed(range(steps)):
                out = model.gen_diffusion.p_sample(fn, img, torch.tensor([i] * img.shape[0]), clip_denoised=False,
                                                   model_kwargs=kwargs, temperature=cfg["temperature"])
                img = out["sample"]
                states.append(img.numpy())
        finally:
            torch.randn_like = real_randn_like
        return np.stack(states)

    traj = reverse_chain(net.forward, T(x_T), dict(c=T(z_cond)), step_noise)
    both = torch.cat([T(x_T), T(x_T)])  # DiffLoss.sample: the same start for both halves
    traj_cfg = reverse_chain(net.forward_with_cfg, both, dict(c=torch.cat([T(z_cond), T(z_uncond)]),
                                                              cfg_scale=cfg["cfg"]), step_noise_cfg)[:, :s]
    sample, sample_cfg = traj[-1], traj_cfg[-1]

    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    np.savez_compressed(
        out_path,
        manifest=json.dumps({"config": cfg, "seed": cfg["seed"], "params": manifest,
                             "timestep_map": [int(v) for v in model.gen_diffusion.timestep_map]}),
        x=x, target=target, z=z, noise=noise, t=t, mask=mask, z_cond=z_cond, z_uncond=z_uncond, x_T=x_T,
        step_noise=step_noise, step_noise_cfg=step_noise_cfg,
        head_out=head_out, mse=terms["mse"].numpy(), vb=terms["vb"].numpy(), loss=loss.numpy(),
        masked_loss=np.float32(masked_loss), sample=sample, sample_cfg=sample_cfg, traj=traj, traj_cfg=traj_cfg,
    )
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes): loss {masked_loss:.6f}, "
          f"sample max |x| {np.abs(sample).max():.3g}, cfg sample max |x| {np.abs(sample_cfg).max():.3g}")


if __name__ == "__main__":
    main()
