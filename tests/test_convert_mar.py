"""MAR converted from the official code's weights reproduces its outputs.

The fixtures (``tests/fixtures/mar/``, made by ``tools/make_mar_fixture.py`` from an LTH14/mar
checkout) hold manifests from which the official state dicts are rebuilt exactly
(``numpy.random.RandomState`` draws, checked against stored checksums) and the official outputs:

- ``diffloss_tiny.npz``: a ``SimpleMLPAdaLN`` head (4-channel tokens, 6-channel conditions, width
  16, 2 blocks) at given inputs, the training loss terms at fixed timesteps and noise, and the
  10-step reverse chains (temperature 0.7, with and without guidance) at fixed noise.
- ``mar_tiny.npz``: a MAR (4x4 tokens of 4 channels, encoder 32 wide with 2 blocks, decoder 24
  wide with 1 block, 2 buffer tokens, 5 classes): the decoder output for given latents, labels
  (one "no label") and mask, and ``forward_loss`` at fixed timesteps and noise.
- ``vae_tiny.npz``: LDM's ``AutoencoderKL`` as MAR ships it (filters 32, multipliers (1, 2), 4
  latent channels, encoder attention at resolution 8 of 16): posterior mean and log-variance of
  given images, and the decode of the mean and of a posterior draw at stored noise.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen.convert import mar as convert_mar
from vqgen.generators import diffusion_loss as dl
from vqgen.generators import mar as mar_lib

FIXTURE = Path(__file__).parent / "fixtures" / "mar" / "diffloss_tiny.npz"
MAR_FIXTURE = Path(__file__).parent / "fixtures" / "mar" / "mar_tiny.npz"
TOL = 1e-4


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    return data


@pytest.fixture(scope="module")
def state(fx) -> dict[str, np.ndarray]:
    """The official head's state dict (NumPy), rebuilt from the manifest, under MAR's prefix."""
    rs = np.random.RandomState(fx["manifest"]["seed"])
    out = {}
    for key, shape, scale, offset, checksum in fx["manifest"]["params"]:
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{key} differs"
        out[convert_mar.HEAD_PREFIX + key] = w
    return out


@pytest.fixture(scope="module")
def converted(state):
    info = convert_mar.inspect_head(state)
    return info, info.module(), jax.tree.map(jnp.asarray, convert_mar.convert_head(state, info))


def _close(got, want, tol=TOL):
    """|got - want| <= tol * (1 + |want|) elementwise (relative where the values are large)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.max(np.abs(got - want) / (1.0 + np.abs(want)))
    assert err <= tol, err


def test_sizes_and_schedule_from_the_official_code(fx, converted):
    info, _, _ = converted
    cfg = fx["manifest"]["config"]
    assert (info.in_channels, info.width, info.depth, info.cond_dim) == (
        cfg["target_channels"], cfg["width"], cfg["depth"], cfg["z_channels"])
    assert dl.schedule(int(cfg["num_sampling_steps"])).timesteps.tolist() == fx["manifest"]["timestep_map"]


def test_head_and_loss_terms_match(fx, converted):
    _, head, params = converted
    out = head.apply({"params": params}, fx["x"], jnp.asarray(fx["t"]), fx["z"])
    _close(out, fx["head_out"])
    terms = dl.loss_terms(head, params, fx["target"], fx["z"], jnp.asarray(fx["t"]), fx["noise"])
    for key in ("mse", "vb", "loss"):
        _close(terms[key], fx[key])
    # DiffLoss.forward's masked reduction, through diffusion_loss's own timesteps replaced by the fixture's.
    mask = fx["mask"]
    np.testing.assert_allclose(float(np.sum(np.asarray(terms["loss"]) * mask) / mask.sum()), fx["masked_loss"],
                               rtol=TOL)


@pytest.mark.parametrize("guided", [False, True])
def test_reverse_chain_matches(fx, converted, guided):
    _, head, params = converted
    cfg = fx["manifest"]["config"]
    steps = int(cfg["num_sampling_steps"])
    sched = dl.schedule(steps)
    s = fx["x_T"].shape[0]
    traj = fx["traj_cfg"] if guided else fx["traj"]
    draws = (fx["step_noise_cfg"] if guided else fx["step_noise"])[:, :s]  # the rows that reach the sample
    z_uncond = fx["z_uncond"] if guided else None
    scale = cfg["cfg"] if guided else 1.0
    # Each step from the official state before it (random heads send the chain far out, where a
    # whole-chain comparison would hide the late steps' small terms).
    for k in range(steps):
        i = steps - 1 - k
        t = jnp.full((s,), sched.timesteps[i])
        out = dl.guided_output(head, params, jnp.asarray(traj[k]), t, fx["z_cond"], z_uncond, scale)
        nxt = dl.p_sample_step(sched, out, jnp.asarray(traj[k]), i, draws[k], cfg["temperature"])
        _close(nxt, traj[k + 1])
    # The whole compiled loop.
    sample = dl.p_sample_loop(head, params, jnp.asarray(fx["z_cond"]), jax.random.key(0), num_steps=steps,
                              temperature=cfg["temperature"], cfg_scale=scale, z_uncond=z_uncond,
                              noise=jnp.asarray(fx["x_T"]), step_noise=jnp.asarray(draws))
    _close(sample, traj[-1])


def test_head_manifest_refusals(state):
    missing = {k: v for k, v in state.items() if not k.endswith("res_blocks.1.mlp.2.bias")}
    with pytest.raises(ValueError, match=re.escape("lacks 'diffloss.net.res_blocks.1.mlp.2.bias' of a 2-block head")):
        convert_mar.inspect_head(missing)
    wrong = {**state, "diffloss.net.final_layer.linear.weight": np.zeros((9, 16), np.float32)}
    with pytest.raises(ValueError, match=re.escape("'diffloss.net.final_layer.linear.weight' of shape (9, 16) where")):
        convert_mar.inspect_head(wrong)
    with pytest.raises(ValueError, match="holds no MAR diffusion head under 'diffloss.net.'"):
        convert_mar.inspect_head({"encoder_norm.weight": np.ones(4)})
    extra = {**state, "diffloss.net.res_blocks.0.extra": np.ones(1)}
    with pytest.raises(ValueError, match="has 1 head key MAR's head does not have"):
        convert_mar.inspect_head(extra)


# ------------------------------------------------------------------------------ the transformer


@pytest.fixture(scope="module")
def mar_fx() -> dict:
    with np.load(MAR_FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    rs = np.random.RandomState(data["manifest"]["inputs"]["seed"])
    state = {}
    for key, shape, scale, offset, checksum in data["manifest"]["params"]:
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{key} differs"
        state[key] = w
    data["state"] = state
    return data


def test_mar_forward_and_loss_match(mar_fx):
    cfg, inputs, state = mar_fx["manifest"]["config"], mar_fx["manifest"]["inputs"], mar_fx["state"]
    info = convert_mar.inspect_mar(state, encoder_heads=cfg["encoder_num_heads"],
                                   decoder_heads=cfg["decoder_num_heads"])
    assert (info.grid, info.token_dim, info.buffer_size, info.num_classes) == ((4, 4), 4, 2, 5)
    assert (info.encoder_depth, info.decoder_depth, info.mlp_ratio, info.head.depth) == (2, 1, 4.0, 1)
    model = info.module(diffusion_batch_mul=cfg["diffusion_batch_mul"], mask_ratio_min=cfg["mask_ratio_min"])
    params = jax.tree.map(jnp.asarray, convert_mar.convert_mar(state, info))
    assert mar_lib.count_params(model) == sum(int(np.prod(e[1])) for e in mar_fx["manifest"]["params"])
    # MAR reads NCHW latents; vqgen's tokens come from the NHWC map in the same channel order.
    tokens = mar_lib.patchify(jnp.asarray(mar_fx["latents"].transpose(0, 2, 3, 1)))
    np.testing.assert_array_equal(tokens, mar_fx["tokens"])
    labels = jnp.asarray([v if v >= 0 else model.num_classes for v in inputs["labels"]])
    mask = jnp.asarray(mar_fx["mask"] > 0)
    for keep in (model.max_visible, None):  # training's gathered encoder and the sampler's full one
        z = model.apply({"params": params}, tokens, mask, labels, keep=keep)
        _close(z, mar_fx["z"])
    b, length = mask.shape
    mul = cfg["diffusion_batch_mul"]
    target, cond, rows = dl.diffusion_batch_mul(mul, tokens.reshape(b * length, -1), z.reshape(b * length, -1),
                                                mask.reshape(-1).astype(jnp.float32))
    terms = dl.loss_terms(model.head, params["diffloss"], target, cond, jnp.asarray(mar_fx["t"]), mar_fx["noise"])
    _close(terms["loss"], mar_fx["row_loss"])
    np.testing.assert_allclose(float(jnp.sum(terms["loss"] * rows) / jnp.sum(rows)), mar_fx["loss"], rtol=TOL)


def test_mar_manifest_refusals(mar_fx):
    state = mar_fx["state"]
    with pytest.raises(ValueError, match=re.escape("the MAR file's encoder has width 32, which no released MAR has")):
        convert_mar.inspect_mar(state)
    heads = dict(encoder_heads=4, decoder_heads=2)
    short = {k: v for k, v in state.items() if k != "decoder_blocks.0.attn.proj.bias"}
    with pytest.raises(ValueError, match=re.escape("lacks 'decoder_blocks.0.attn.proj.bias'")):
        convert_mar.inspect_mar(short, **heads)
    with pytest.raises(ValueError, match="is not a MAR transformer"):
        convert_mar.inspect_mar({k: v for k, v in state.items() if k != "z_proj.weight"}, **heads)
    with pytest.raises(ValueError, match=re.escape("has 1 key MAR does not have (first 'ema')")):
        convert_mar.inspect_mar({**state, "ema": np.ones(1)}, **heads)


@pytest.mark.parametrize("run", ["linear", "constant", "plain"])
def test_mar_sampler_iterations_match(mar_fx, run, monkeypatch):
    """MAR's ``sample_tokens`` and vqgen's sampler over the same orders, with the diffusion draw
    replaced on both sides by the same deterministic function of the conditions, guidance scale
    and temperature: the tokens predicted at each iteration, their conditions (the guided batch
    included), MAR's guidance ramp and the writes agree."""
    cfg, state = mar_fx["manifest"]["config"], mar_fx["state"]
    kw = {
        "linear": dict(labels=(1, 4, 0), num_iter=5, cfg=2.0, cfg_schedule="linear", temperature=0.5),
        "constant": dict(labels=(3, 2, 2), num_iter=16, cfg=3.0, cfg_schedule="constant", temperature=0.0),
        "plain": dict(labels=None, num_iter=4, cfg=1.0, cfg_schedule="linear", temperature=1.0),
    }[run]  # tools/make_mar_fixture.py SAMPLE_RUNS
    info = convert_mar.inspect_mar(state, encoder_heads=cfg["encoder_num_heads"],
                                   decoder_heads=cfg["decoder_num_heads"])
    model = info.module()
    params = jax.tree.map(jnp.asarray, convert_mar.convert_mar(state, info))
    c = model.token_dim

    def stand_in(head, params, z, rng, *, num_steps, temperature, cfg_scale=1.0, z_uncond=None,
                 noise_schedule="cosine"):
        assert noise_schedule == model.noise_schedule
        if z_uncond is None:
            return z[:, :c] + temperature
        return z[:, :c] + cfg_scale * (z[:, c:2 * c] - z_uncond[:, c:2 * c]) + temperature

    monkeypatch.setattr(mar_lib.dl, "p_sample_loop", stand_in)
    b = mar_fx["orders"].shape[0]
    labels = jnp.full((b,), model.num_classes) if kw["labels"] is None else jnp.asarray(kw["labels"])
    opts = mar_lib.SamplerOptions(num_iter=kw["num_iter"], cfg_scale=kw["cfg"], cfg_schedule=kw["cfg_schedule"],
                                  temperature=kw["temperature"], diffusion_steps=1)
    fn = jax.jit(mar_lib.sample_tokens, static_argnames=("model", "opts", "return_steps"))  # a fresh cache
    tokens = fn(model, params, labels, jax.random.key(0), opts, False, jnp.asarray(mar_fx["orders"]))
    want = mar_lib.patchify(jnp.asarray(mar_fx[f"sample_{run}"].transpose(0, 2, 3, 1)))
    _close(tokens, want)


# -------------------------------------------------------------------------------- the KL-VAE

VAE_FIXTURE = Path(__file__).parent / "fixtures" / "mar" / "vae_tiny.npz"


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def vae_fx() -> dict:
    with np.load(VAE_FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    rs = np.random.RandomState(data["manifest"]["config"]["seed"])
    state = {}
    for key, shape, scale, offset, checksum in data["manifest"]["params"]:
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{key} differs"
        state[key] = w
    data["state"] = state
    return data


def test_vae_latents_and_reconstructions_match(vae_fx):
    """LDM's AutoencoderKL as MAR ships it: posterior mean and log-variance, the decode of the mean
    and of a posterior draw at the stored noise, all to 1e-4 after conversion."""
    cfg = vae_fx["manifest"]["config"]
    info = convert_mar.inspect_vae(vae_fx["state"])
    assert (info.ch, info.ch_mult, info.num_res_blocks, info.embed_dim) == (32, (1, 2), 1, 4)
    assert (info.encoder_attn_levels, info.decoder_attn_levels) == ((1,), ())  # resolution 8 of 16, encoder only
    model = info.module(resolution=cfg["resolution"])
    params = jax.tree.map(jnp.asarray, convert_mar.convert_vae(vae_fx["state"], info))
    x = jnp.asarray(_nhwc(vae_fx["x"]))
    mean, logvar = model.apply({"params": params}, x, method="posterior")
    _close(mean, _nhwc(vae_fx["mean"]))
    _close(logvar, _nhwc(vae_fx["logvar"]))
    _close(model.apply({"params": params}, mean, method="decode"), _nhwc(vae_fx["recon"]))
    z = mean + jnp.exp(0.5 * logvar) * _nhwc(vae_fx["eps"])
    _close(model.apply({"params": params}, z, method="decode"), _nhwc(vae_fx["recon_sample"]))
    # The tokenizer phase's forward pass at evaluation decodes the mean.
    recon, q = model.apply({"params": params}, x)
    _close(recon, _nhwc(vae_fx["recon"]))
    np.testing.assert_array_equal(q.quantized, mean)


def test_vae_manifest_and_pair_refusals(vae_fx, mar_fx):
    state = vae_fx["state"]
    with pytest.raises(convert_mar.ConversionError, match="is a MAR transformer state dict, not the KL-VAE; pass it "
                                                          "as --mar"):
        convert_mar.inspect_vae(mar_fx["state"])
    with pytest.raises(convert_mar.ConversionError, match=r"is not a KL-VAE state dict: missing 1 key "
                                                          r"\(decoder.up.1.upsample.conv.bias\)"):
        convert_mar.inspect_vae({k: v for k, v in state.items() if k != "decoder.up.1.upsample.conv.bias"})
    # LDM's training-loss entries saved beside the VAE are accepted (not converted).
    assert convert_mar.inspect_vae({**state, "loss.logvar": np.zeros(())}) == convert_mar.inspect_vae(state)
    mar_info = convert_mar.inspect_mar(mar_fx["state"], encoder_heads=4, decoder_heads=2)
    assert convert_mar.check_pair(convert_mar.inspect_vae(state), mar_info) == 1
    wide = dataclasses.replace(convert_mar.inspect_vae(state), embed_dim=16)
    with pytest.raises(convert_mar.ConversionError, match="has 16 latent channels but the MAR file reads 4-channel "
                                                          "tokens, which no patch of 16-channel latents makes; pass "
                                                          "the VAE the MAR was trained with"):
        convert_mar.check_pair(wide, mar_info)


@pytest.mark.slow  # ~40 s on an idle 2-core CPU: it writes, restores and samples a workdir
def test_command_line_writes_a_workdir_of_ema_weights(vae_fx, mar_fx, tmp_path):
    """``python -m vqgen.convert.mar --vae --mar --out``: EMA weights by default, loaded through the
    public API; the VAE's latents and the MAR's decoder output are the official ones."""
    torch = pytest.importorskip("torch", reason="the converter reads PyTorch files (CI installs torch CPU)")
    import vqgen

    as_torch = lambda st: {k: torch.from_numpy(np.array(v)) for k, v in st.items()}  # noqa: E731
    raw = {k: v + 1.0 for k, v in mar_fx["state"].items()}  # the non-EMA weights differ
    torch.save({"model": as_torch(vae_fx["state"])}, tmp_path / "kl.ckpt")
    torch.save({"model": as_torch(raw), "model_ema": as_torch(mar_fx["state"]), "epoch": 3}, tmp_path / "mar.pth")
    torch.save({"model": as_torch(raw)}, tmp_path / "mar_raw.pth")
    out = tmp_path / "wd"
    convert_mar.main(["--vae", str(tmp_path / "kl.ckpt"), "--mar", str(tmp_path / "mar.pth"), "--out", str(out),
                      "--encoder-heads", "4", "--decoder-heads", "2", "--dtype", "float32"])
    config = vqgen.load_config_from_workdir(str(out))
    assert config.generator.arch == "mar" and config.data.image_size == 8 and config.data.num_classes == 5
    tok = vqgen.load_tokenizer(str(out))
    x = _nhwc(vae_fx["x"])[:, :8, :8]  # the converted config reads 8px images (a 4x4 latent grid)
    latents = tok.encode(x)
    info = convert_mar.inspect_vae(vae_fx["state"])
    model = info.module(resolution=8)
    mean, _ = model.apply({"params": jax.tree.map(jnp.asarray, convert_mar.convert_vae(vae_fx["state"], info))},
                          jnp.asarray(x), method="posterior")
    _close(latents, config.tokenizer.scale_factor * np.asarray(mean))
    gen = vqgen.load_generator(str(out))
    got = jax.tree.map(np.asarray, gen._trained.params)
    want = convert_mar.convert_mar(mar_fx["state"], encoder_heads=4, decoder_heads=2)
    np.testing.assert_allclose(got["z_proj"]["kernel"], want["z_proj"]["kernel"])
    assert gen.sample([0, 4], jax.random.key(0), num_iter=2, diffusion_steps=2).shape == (2, 8, 8, 3)
    with pytest.raises(convert_mar.ConversionError, match="holds no EMA weights .* pass --no-ema"):
        convert_mar.convert_files(None, str(tmp_path / "mar_raw.pth"), str(tmp_path / "wd2"), encoder_heads=4,
                                  decoder_heads=2)
    assert not (tmp_path / "wd2").exists()
    with pytest.raises(convert_mar.ConversionError, match=r"checkpoints/generator already holds a checkpoint"):
        convert_mar.convert_files(None, str(tmp_path / "mar.pth"), str(out), encoder_heads=4, decoder_heads=2,
                                  dtype="float32")
