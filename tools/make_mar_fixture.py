"""Makes ``tests/fixtures/mar/diffloss_tiny.npz``: golden outputs of the official MAR diffusion loss
(tiny, random weights).

    git clone https://github.com/LTH14/mar /tmp/mar
    python tools/make_mar_fixture.py --mar-repo /tmp/mar

The official ``DiffLoss`` (``models/diffloss.py``: its ``SimpleMLPAdaLN`` head and the
``create_diffusion`` schedules of ``diffusion/``) is built on CPU in float32 with 4-channel
tokens, 6-channel conditions, width 16, 2 residual blocks and a 10-step sampler. Nothing else of
the repository is imported (its transformer needs ``timm``).

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
import json
import math
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "mar", "diffloss_tiny.npz")

CONFIG = dict(target_channels=4, z_channels=6, width=16, depth=2, num_sampling_steps="10", rows=12, samples=5,
              temperature=0.7, cfg=2.5, seed=0)


def _import_official(mar_repo: str):
    if not os.path.isfile(os.path.join(mar_repo, "models", "diffloss.py")):
        sys.exit(f"error: {mar_repo} is not an LTH14/mar checkout (no models/diffloss.py); pass --mar-repo.")
    sys.path.insert(0, os.path.abspath(mar_repo))
    from models import diffloss  # noqa: E402  (the official module)

    return diffloss


def _draw(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """``(scale, offset)`` of a head parameter."""
    if key.endswith("in_ln.weight"):
        return 0.2, 1.0
    if key.endswith(".bias"):
        return 0.1, 0.0
    gain = 0.5 if "adaLN_modulation" in key else 1.0
    return gain / math.sqrt(shape[1]), 0.0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mar-repo", required=True, help="a checkout of https://github.com/LTH14/mar")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    diffloss = _import_official(args.mar_repo)
    import torch

    torch.set_grad_enabled(False)
    cfg = CONFIG
    model = diffloss.DiffLoss(cfg["target_channels"], cfg["z_channels"], cfg["depth"], cfg["width"],
                              cfg["num_sampling_steps"]).float().eval()
    net = model.net
    rs = np.random.RandomState(cfg["seed"])
    manifest, state = [], {}
    for key, tensor in net.state_dict().items():
        shape = tuple(tensor.shape)
        scale, offset = _draw(key, shape)
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        manifest.append([key, list(shape), scale, offset, float(np.sum(w, dtype=np.float64))])
        state[key] = torch.from_numpy(w)
    net.load_state_dict(state)

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

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    np.savez_compressed(
        args.out,
        manifest=json.dumps({"config": cfg, "seed": cfg["seed"], "params": manifest,
                             "timestep_map": [int(v) for v in model.gen_diffusion.timestep_map]}),
        x=x, target=target, z=z, noise=noise, t=t, mask=mask, z_cond=z_cond, z_uncond=z_uncond, x_T=x_T,
        step_noise=step_noise, step_noise_cfg=step_noise_cfg,
        head_out=head_out, mse=terms["mse"].numpy(), vb=terms["vb"].numpy(), loss=loss.numpy(),
        masked_loss=np.float32(masked_loss), sample=sample, sample_cfg=sample_cfg, traj=traj, traj_cfg=traj_cfg,
    )
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes): loss {masked_loss:.6f}, "
          f"sample max |x| {np.abs(sample).max():.3g}, cfg sample max |x| {np.abs(sample_cfg).max():.3g}")


if __name__ == "__main__":
    main()
