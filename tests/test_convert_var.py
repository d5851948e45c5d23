"""VAR converter: converted VQ-VAE and transformers against the official VAR code's outputs.

The fixture (``tests/fixtures/var/var_tiny.npz``, made by ``tools/make_var_fixture.py`` from a
FoundationVision/VAR checkout) holds the outputs of the official models and a manifest from which
their random state dicts are rebuilt exactly (``numpy.random.RandomState`` draws, checked against
stored checksums): a VQ-VAE (ch 32, 64 codes of width 8, scales 1,2,3,4, 64x64 images) and two
transformers over it (``var``: depth 2, width 128, per-block AdaLN, l2-normalised attention;
``var_b``: width 64, shared AdaLN, plain attention).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the converter reads PyTorch files (CI installs torch==2.13.0 CPU)")

import vqgen  # noqa: E402
from vqgen import config_lib, parallel  # noqa: E402
from vqgen.api import load_config_from_workdir  # noqa: E402
from vqgen.convert import var as convert_var  # noqa: E402
from vqgen.convert import workdir as convert_workdir  # noqa: E402
from vqgen.generators import var as var_lib  # noqa: E402
from vqgen.tokenizers import vqgan  # noqa: E402
from vqgen.train import builders, common  # noqa: E402
from vqgen.train import generator as generator_lib  # noqa: E402
from vqgen.train import tokenizer as tokenizer_lib  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "var" / "var_tiny.npz"
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    return data


@pytest.fixture(scope="module")
def states(fx) -> dict[str, dict[str, np.ndarray]]:
    """The official state dicts (NumPy) of ``vae``, ``var`` and ``var_b``, rebuilt from the manifest."""
    rs = np.random.RandomState(fx["manifest"]["seed"])
    out = {}
    for name, entry in fx["manifest"]["models"].items():
        state = {}
        for key, shape, scale, offset, checksum in entry["params"]:
            w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
            assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{name}: {key} differs"
            state[key] = w
        for key in entry["buffers"]:
            state[key] = fx[f"buffer/{name}/{key}"]
        out[name] = state
    return out


def _save_pth(state: dict[str, np.ndarray], path: Path) -> Path:
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def files(states, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("var_files")
    return {name: _save_pth(state, root / f"{name}.pth") for name, state in states.items()}


@pytest.fixture(scope="module")
def converted(states) -> convert_var.Converted:
    return convert_var.convert(states["vae"], states["var"], dtype="float32")


@pytest.fixture(scope="module")
def tokenizer_outputs(converted, fx) -> dict[str, np.ndarray]:
    """The VQGAN built from the converted config on the fixture: one jitted pass for every output."""
    config = converted.config
    model = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    example = builders.example_shape(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + example))["params"]
    params = convert_workdir.match_tree(converted.tokenizer_params, parallel.unbox(abstract), "tokenizer")
    codec = var_lib.quantizer_codec(model.quantizer)

    @jax.jit
    def run(p, x, tokens):
        recon, q = model.apply({"params": p}, x)
        maps = builders.split_pyramid(tokens, converted.scales)
        return {"tokens": builders.flat_indices(q.indices), "f_hat": q.quantized, "recon": recon,
                "decoded": jnp.clip(model.apply({"params": p}, maps, method="decode_indices"), -1, 1),
                "var_input": var_lib.teacher_forcing_input(tokens, p["quantizer"], codec)}

    out = run(params, jnp.asarray(_nhwc(fx["image"])), jnp.asarray(fx["tokens"]))
    return {k: np.asarray(v) for k, v in out.items()}


def _one_device_env() -> dict[str, str]:
    """The environment of a user's command line: one CPU device (the tests simulate eight)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags}


@pytest.fixture(scope="module")
def workdir(files, tmp_path_factory) -> Path:
    """Both models converted through the command line (on one device; the tests load it on eight)."""
    out = tmp_path_factory.mktemp("var_workdir") / "wd"
    cmd = [sys.executable, "-m", "vqgen.convert.var", "--vae", str(files["vae"]), "--var", str(files["var"]),
           "--out", str(out), "--dtype", "float32"]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}" in proc.stdout
    return out


# --------------------------------------------------------------------------- golden outputs


def test_inferred_sizes_and_config(converted):
    vae, var, config = converted.vae, converted.var, converted.config
    assert (vae.ch, vae.ch_mult, vae.num_res_blocks, vae.z_channels, vae.vocab_size) == (32, (1, 1, 2, 2, 4), 2, 8, 64)
    assert (vae.phi_style, vae.phi_count, vae.quant_conv_kernel) == ("partial", 4, 3)
    assert (var.depth, var.width, var.num_heads, var.num_classes, var.scales) == (2, 128, 2, 10, (1, 2, 3, 4))
    assert (var.shared_aln, var.attn_l2_norm, var.vocab_size, var.vae_dim) == (False, True, 64, 8)
    assert (config.data.image_size, config.data.channels, config.data.num_classes) == (64, 3, 10)
    assert tuple(config.tokenizer.quantizer.scales) == (1, 2, 3, 4)
    assert (config.tokenizer.quantizer.phi_share, config.tokenizer.quantizer.codebook_size) == (4, 64)
    assert tuple(config.tokenizer.attn_resolutions) == (4,) and config.tokenizer.resolution == 64
    # width 64·depth and depth heads are VAR's ties to depth, which the paper section leaves implicit
    assert config.generator.depth == 2 and "width" not in config.generator and "num_heads" not in config.generator
    assert config.generator.dtype == config.tokenizer.dtype == "float32"
    assert config.sample.top_k == 64 and config.sample.top_p == 0.96  # VAR's top-k 900 capped at the vocabulary


def test_tokens_and_reconstruction_match_official(tokenizer_outputs, fx):
    out = tokenizer_outputs
    np.testing.assert_array_equal(out["tokens"], fx["tokens"])
    np.testing.assert_allclose(out["f_hat"], _nhwc(fx["f_hat"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["recon"], _nhwc(fx["recon"]), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out["decoded"], _nhwc(fx["decoded"]), atol=ATOL, rtol=0)


def test_teacher_forcing_input_matches_official(tokenizer_outputs, fx):
    np.testing.assert_allclose(tokenizer_outputs["var_input"], fx["var_input"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,key", [("var", "logits"), ("var_b", "logits_b")])
def test_teacher_forced_logits_match_official(states, fx, name, key):
    conv = convert_var.convert(states["vae"], states[name], dtype="float32")
    _, model = generator_lib.build_model(conv.config)  # the model the written config builds
    params = convert_workdir.match_tree(conv.generator_params, parallel.unbox(var_lib.abstract_params(model)), name)
    logits = model.apply({"params": params}, jnp.asarray(fx["var_input"]), jnp.asarray(fx["labels"]))
    np.testing.assert_allclose(np.asarray(logits), fx[key], atol=ATOL, rtol=0)


def test_released_key_layout(fx):
    """The converter's manifests equal the keys and shapes of VAR's released sizes (from the official
    code), and the configs they give build models of VAR's parameter counts."""
    released = fx["manifest"]["released"]
    fake = {name: {k: np.broadcast_to(np.float32(0), shape) for k, shape in keys if k != "lvl_1L"}
            for name, keys in released.items()}
    conv = convert_var.convert(fake["vae_ch160v4096z32"], fake["var_d16"])
    vae, var = conv.vae, conv.var
    assert (vae.ch, vae.ch_mult, vae.z_channels, vae.vocab_size, vae.phi_count) == (160, (1, 1, 2, 2, 4), 32, 4096, 4)
    assert (var.depth, var.width, var.num_heads, var.num_classes, var.scales) == (
        16, 1024, 16, 1000, convert_var.VAR_SCALES)
    # the released files convert to exactly the paper config, so --config=generators/var:d16 reads the workdir
    assert conv.config.to_json() == config_lib.load_config("generators/var:d16").to_json()
    vae_alone = convert_var.convert(fake["vae_ch160v4096z32"], None).config
    assert vae_alone.to_json() == config_lib.load_config("tokenizers/var_vqvae").to_json()
    model = builders.build_tokenizer(conv.config.tokenizer, 3)
    n_vae = sum(int(np.prod(s)) for s in convert_var.vae_manifest(vae).values())
    assert n_vae == vqgan.count_params(model, 256, 3) == 108_948_355
    _, gen = generator_lib.build_model(conv.config)
    assert sum(int(np.prod(s)) for s in convert_var.var_manifest(var).values()) == var_lib.count_params(gen)


# ----------------------------------------------------------------------------------- workdir


def test_workdir_loads_through_the_api(workdir, fx):
    config = load_config_from_workdir(str(workdir))
    with config.unlocked():
        config.tokenizer_train.batch_size = 8  # encoding batch only; not part of the architecture
    tok = vqgen.load_tokenizer(str(workdir), config=config)
    np.testing.assert_array_equal(tok.encode(_nhwc(fx["image"])), fx["tokens"])
    gen = vqgen.load_generator(str(workdir), config=config)
    assert gen.tokenizer is not None and gen.spec.scales == (1, 2, 3, 4)
    trained = gen._trained
    logits = trained.model.apply({"params": trained.params}, jnp.asarray(fx["var_input"]), jnp.asarray(fx["labels"]))
    np.testing.assert_allclose(np.asarray(logits), fx["logits"], atol=ATOL, rtol=0)


def test_workdir_resumes_for_fine_tuning(workdir, converted):
    """The converted tokenizer checkpoint restores into the phase's train state with a data iterator
    (which starts afresh), as ``--mode=train_tokenizer`` on the workdir does."""
    config = load_config_from_workdir(str(workdir))
    phase = tokenizer_lib.build(config)
    mesh = parallel.create_mesh(tuple(config.mesh_shape))
    abstract, _ = common.abstract_state(phase, mesh, parallel.rules_from_config(config.logical_rules))
    data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt = phase.checkpointer(str(workdir))
    try:
        state = ckpt.restore(abstract, data_iter)
    finally:
        ckpt.close()
    assert int(state.step) == 0 and next(data_iter) == 0
    want = converted.tokenizer_params
    for path in (("quantizer", "codebook"), ("decoder", "up_4_attn_2", "k", "kernel")):
        np.testing.assert_array_equal(_get(state.params, path), _get(want, path))
        np.testing.assert_array_equal(_get(state.ema_params, path), _get(want, path))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return np.asarray(tree)


def test_tokenizer_only_and_generator_only_conversions(states, files, tmp_path):
    alone = convert_var.convert(states["vae"], None, scales=(1, 2, 3, 4))
    assert alone.generator_params is None and "generator" not in alone.config  # tokenizers/var_vqvae
    assert alone.config.data.image_size == 64 and alone.config.tokenizer.dtype == "bfloat16"
    one_device = parallel.create_mesh((1, 1, 1), jax.devices()[:1])
    convert_var.convert_files(None, str(files["var_b"]), str(tmp_path / "gen"), dtype="float32", mesh=one_device)
    assert os.listdir(tmp_path / "gen" / "checkpoints") == ["generator"]
    config = load_config_from_workdir(str(tmp_path / "gen"))
    assert (config.tokenizer.quantizer.codebook_size, config.tokenizer.z_channels) == (64, 8)  # from the transformer
    assert config.generator.shared_aln and not config.generator.attn_l2_norm and config.generator.width == 64
    gen = vqgen.load_generator(str(tmp_path / "gen"))
    assert gen.tokenizer is None


def test_refuses_a_workdir_with_checkpoints(workdir, files, tmp_path):
    with pytest.raises(convert_workdir.ConversionError, match=r"already holds a checkpoint; pass a new --out"):
        convert_var.convert_files(str(files["vae"]), None, str(workdir), scales=(1, 2, 3, 4))
    # a transformer alone into a workdir holding another tokenizer (its config says ch 160, the tokenizer has 32)
    shutil.copytree(workdir / "checkpoints" / "tokenizer", tmp_path / "checkpoints" / "tokenizer")
    shutil.copy(workdir / "config.json", tmp_path / "config.json")
    with pytest.raises(convert_workdir.ConversionError, match=r"holds a tokenizer that the converted model's config "
                       r"does not describe \(tokenizer\.ch: checkpoint 32 vs config 160.*\); convert the tokenizer "
                       r"and the generator together into a new --out\.$"):
        convert_var.convert_files(None, str(files["var_b"]), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]  # nothing written
    assert os.listdir(tmp_path / "checkpoints") == ["tokenizer"]
    assert (tmp_path / "config.json").read_text() == (workdir / "config.json").read_text()


# ------------------------------------------------------------------------------- file formats


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        if dtype == "BF16":
            raw = torch.from_numpy(np.asarray(value, np.float32)).bfloat16().view(torch.int16).numpy().tobytes()
        else:
            raw = np.asarray(value, "<f4").tobytes()
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_reads_safetensors_and_wrapped_checkpoints(states, tmp_path):
    vae, var = states["vae"], states["var"]
    _write_safetensors(tmp_path / "vae.safetensors", vae)
    read = convert_workdir.load_state_dict(str(tmp_path / "vae.safetensors"), convert_var.VAE_WRAPPERS)
    assert read.keys() == vae.keys() and all(np.array_equal(read[k], vae[k]) for k in vae)
    small = {"w": np.asarray([[1.5, -2.25], [3.0, 0.1]], np.float32)}
    _write_safetensors(tmp_path / "bf16.safetensors", small, "BF16")
    want = torch.from_numpy(small["w"]).bfloat16().float().numpy()
    np.testing.assert_array_equal(convert_workdir.load_state_dict(str(tmp_path / "bf16.safetensors"))["w"], want)
    # VAR's training checkpoint (trainer.py), DDP-prefixed keys
    torch.save({"epoch": 3, "iter": 0, "args": {"depth": 2},
                "trainer": {"config": {"prog_it": 0}, "vae_local": {k: torch.from_numpy(v) for k, v in vae.items()},
                            "var_wo_ddp": {f"module.{k}": torch.from_numpy(v) for k, v in var.items()}}},
               tmp_path / "ar-ckpt-last.pth")
    got_var = convert_workdir.load_state_dict(str(tmp_path / "ar-ckpt-last.pth"), convert_var.VAR_WRAPPERS)
    got_vae = convert_workdir.load_state_dict(str(tmp_path / "ar-ckpt-last.pth"), convert_var.VAE_WRAPPERS)
    assert got_var.keys() == var.keys() and got_vae.keys() == vae.keys()
    assert np.array_equal(got_var["head.weight"], var["head.weight"])


# --------------------------------------------------------------------------------- bad input


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize("case,match", [
    ("var_as_vae", r"^vae\.pth is a VAR transformer state dict \(2 blocks\), not the VQ-VAE; pass it as --var\.$"),
    ("vae_as_var", r"^var\.pth is a VAR VQ-VAE state dict, not the transformer; pass it as --vae\.$"),
    ("depth", r"^var\.pth is a VAR-d2 state dict \(2 blocks\) but --depth 16 was given; pass the d16 file"),
    ("missing", r"^vae\.pth is not a VAR VQ-VAE state dict: missing 1 key "
                r"\(decoder\.up\.3\.block\.1\.conv2\.bias\)\.$"),
    ("extra", r"^var\.pth is not a VAR-d2 transformer state dict: unexpected 1 key \(blocks\.0\.attn\.extra\)\.$"),
    ("shape", r"^vae\.pth is not a VAR VQ-VAE state dict: wrong shapes quant_conv\.bias \(9,\) \(expected \(8,\)\)\.$"),
    ("pair", r"^vae\.pth has 64 codes of width 8 but var\.pth predicts 32 codes of width 8; pass the VQ-VAE"),
    ("scales", r"^var\.pth was trained on the scales 1,2,3,4 \(its lvl_1L\) but --scales 1,2,4 was given"),
    ("no_levels", r"^var\.pth has 4 scales over 30 tokens and no lvl_1L buffer, which is not VAR's 256px schedule; "
                  r"pass its scales with --scales \(1,2,3,4 for example\)\.$"),
    ("vae_scales", r"^vae\.pth was used with 4 scales \(its ema_vocab_hit_SV\) but VAR's 256px schedule has 10; "
                   r"pass the scales with --scales\.$"),
    ("other", r"^vae\.pth is not a VAR VQ-VAE state dict: it lacks .*quantize\.embedding\.weight"),
])
def test_bad_state_dicts_are_refused_in_one_sentence(states, case, match):
    vae, var = dict(states["vae"]), dict(states["var"])
    kwargs = dict(vae_name="vae.pth", var_name="var.pth")
    if case == "var_as_vae":
        vae, var = var, None
    elif case == "vae_as_var":
        vae, var = None, vae
    elif case == "depth":
        kwargs["depth"] = 16
    elif case == "missing":
        vae = _without(vae, "decoder.up.3.block.1.conv2.bias")
    elif case == "extra":
        var["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    elif case == "shape":
        vae["quant_conv.bias"] = np.zeros(9, np.float32)
    elif case == "pair":
        var["head.weight"], var["head.bias"] = var["head.weight"][:32], var["head.bias"][:32]
    elif case == "scales":
        kwargs["scales"] = (1, 2, 4)
    elif case == "no_levels":
        vae, var = None, _without(var, "lvl_1L")
    elif case == "vae_scales":
        var = None
    elif case == "other":  # a plain taming-style VQGAN: separate q/k/v, no multi-scale quantizer
        vae = {"encoder.conv_in.weight": np.zeros((32, 3, 3, 3), np.float32),
               "encoder.mid.attn_1.q.weight": np.zeros((8, 8, 1, 1), np.float32)}
        var = None
    with pytest.raises(convert_workdir.ConversionError, match=match) as info:
        convert_var.convert(vae, var, **kwargs)
    assert str(info.value).count(". ") == 0  # one sentence


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass the path of a \.pth or \.safetensors"):
        convert_workdir.load_state_dict(str(tmp_path / "missing.pth"))
    torch.save({"model": argparse.Namespace(depth=16)}, tmp_path / "pickled.pth")
    with pytest.raises(convert_workdir.ConversionError, match=r"cannot be read with torch\.load\(weights_only=True\)"):
        convert_workdir.load_state_dict(str(tmp_path / "pickled.pth"))
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "opt.pth")
    with pytest.raises(convert_workdir.ConversionError,
                       match=r"holds no state dict \(top level: \['epoch', 'optimizer'\]"):
        convert_workdir.load_state_dict(str(tmp_path / "opt.pth"), convert_var.VAR_WRAPPERS)


def test_command_line_error_is_one_line(files, tmp_path):
    cmd = [sys.executable, "-m", "vqgen.convert.var", "--vae", str(files["var"]), "--out", str(tmp_path / "wd")]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: var.pth is a VAR transformer state dict (2 blocks), not the VQ-VAE; pass it as --var.")
    assert not (tmp_path / "wd").exists()
