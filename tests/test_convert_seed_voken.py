"""SeedVoken converter: converted Open-MAGVIT2 and IBQ tokenizers against the official code's outputs.

The fixture (``tests/fixtures/seed_voken/seed_voken_tiny.npz``, made by
``tools/make_seed_voken_fixture.py`` from a TencentARC/SEED-Voken checkout) holds the outputs of
the official Open-MAGVIT2 tokenizer (ch 32, multipliers 1,2,2, one res block, 10-bit LFQ) and IBQ
tokenizer (ch 32, multipliers 1,2,2, one res block, attention at 8x8, 64 codes of width 16) on
32x32 images (8x8 tokens), computed with their EMA weights, and a manifest from which each
Lightning state dict (raw weights, ``model_ema.*`` copies, a discriminator under ``loss.*``) is
rebuilt exactly (checked against stored checksums), plus the key layouts of released sizes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the converter reads PyTorch files (CI installs torch==2.13.0 CPU)")

import vqgen  # noqa: E402
from vqgen import parallel  # noqa: E402
from vqgen.api import load_config_from_workdir  # noqa: E402
from vqgen.convert import seed_voken  # noqa: E402
from vqgen.convert import workdir as convert_workdir  # noqa: E402
from vqgen.quantizers.lfq import split_factorized_ids  # noqa: E402
from vqgen.tokenizers import vqgan  # noqa: E402
from vqgen.train import builders  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "seed_voken" / "seed_voken_tiny.npz"
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("magvit2", "ibq")
CALLS: list = []  # what a pickled object's reduce function would record if the reader called it


def _record(*args):
    CALLS.append(args)


class LightningLike:
    """Stands for the objects Lightning pickles beside the weights (callbacks, hyper-parameters)."""

    def __reduce__(self):
        return _record, ("built",)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _one_device_env() -> dict[str, str]:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags}


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    return data


@pytest.fixture(scope="module")
def states(fx) -> dict[str, dict[str, np.ndarray]]:
    """Each model's full Lightning state dict, drawn in the fixture script's order (one stream)."""
    rs = np.random.RandomState(fx["manifest"]["seed"])
    out = {}
    for family in FAMILIES:
        entry, state = fx["manifest"]["models"][family], {}
        for key, shape, scale, offset, checksum in entry["params"]:
            w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
            assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), key
            state[key] = w
        state.update({k: fx[f"{family}/buffer/{k}"] for k in entry["buffers"]})
        out[family] = state
    return out


def _save_ckpt(state: dict, path: Path) -> Path:
    """``state`` as a Lightning ``.ckpt``: under ``state_dict``, with pickled objects beside it."""
    weights = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "2.2.0", "state_dict": weights,
                "callbacks": {LightningLike: {"best_model_score": torch.tensor(0.5)}},
                "hyper_parameters": LightningLike(), "optimizer_states": [{"state": {}, "param_groups": []}]}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(states, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("seed_voken_files")
    return {family: _save_ckpt(states[family], folder / f"{family}.ckpt") for family in FAMILIES}


@pytest.fixture(scope="module")
def converted(states) -> dict[str, seed_voken.Converted]:
    return {family: seed_voken.convert(states[family], image_size=32, dtype="float32") for family in FAMILIES}


def test_inferred_sizes_and_config(converted):
    m2, ibq = converted["magvit2"], converted["ibq"]
    info, tok = m2.info, m2.config.tokenizer
    assert (info.family, info.ch, info.ch_mult, info.num_res_blocks, info.z_channels) == ("magvit2", 32, (1, 2, 2), 1,
                                                                                          10)
    assert (info.codebook_size, info.has_ema, m2.ema, m2.config_name) == (1024, True, True, "tokenizers/open_magvit2")
    assert (tok.style, tok.use_quant_conv, tok.embed_dim, tuple(tok.attn_resolutions)) == ("magvit2", False, 10, ())
    q = tok.quantizer
    assert (q.type, q.dim, q.bit_order, q.entropy_eps, q.num_groups) == ("lfq", 10, "lsb", 1e-5, 2)
    info, tok = ibq.info, ibq.config.tokenizer
    assert (info.family, info.ch, info.ch_mult, info.attn_levels, info.z_channels, info.embed_dim) == (
        "ibq", 32, (1, 2, 2), (2,), 32, 16)
    assert (info.codebook_size, ibq.config_name, tok.quantizer.type, tok.quantizer.codebook_size) == (
        64, "tokenizers/ibq", "ibq", 64)
    assert tuple(tok.attn_resolutions) == (64,) and tok.use_quant_conv  # level 2 of a 256-resolution config
    assert ibq.config.data.image_size == 32 and tok.dtype == "float32"


def _run(config, params):
    model = builders.build_tokenizer(config.tokenizer, 3)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + builders.example_shape(config)))
    params = convert_workdir.match_tree(params, parallel.unbox(abstract["params"]), "tokenizer")

    def pre_quant(m, x):
        h = m.encoder(x)
        return m.quant_conv(h) if m.use_quant_conv else h

    @jax.jit
    def run(p, x, tokens):
        recon, q = model.apply({"params": p}, x)
        return {"f": model.apply({"params": p}, x, method=pre_quant), "tokens": q.indices, "quant": q.quantized,
                "recon": recon, "decoded": model.apply({"params": p}, tokens, method="decode_indices")}

    return run, params


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_match_official(converted, fx, family):
    """Pre-quantization latents, token ids (Open-MAGVIT2's own order: LFQ with bit_order='lsb'),
    quantized latents, reconstructions and the decoding of the ids, against the official code."""
    run, params = _run(converted[family].config, converted[family].tokenizer_params)
    out = jax.tree.map(np.asarray, run(params, jnp.asarray(_nhwc(fx["image"])), jnp.asarray(fx[f"{family}/tokens"])))
    np.testing.assert_array_equal(out["tokens"], fx[f"{family}/tokens"])
    for key in ("f", "quant", "recon", "decoded"):
        np.testing.assert_allclose(out[key], _nhwc(fx[f"{family}/{key}"]), atol=ATOL, rtol=0, err_msg=key)


def test_factorized_ids_match_official(fx):
    """Open-MAGVIT2's ``token_factorization`` (indices_pre, indices_post) from the converted ids."""
    bits = tuple(fx["manifest"]["config"]["magvit2"]["factorized_bits"])
    parts = split_factorized_ids(jnp.asarray(fx["magvit2/tokens"]), 10, bits, "lsb")
    np.testing.assert_array_equal(np.stack([np.asarray(p) for p in parts]), fx["magvit2/factorized"])


@pytest.mark.parametrize("family", FAMILIES)
def test_no_ema_converts_the_raw_weights(states, converted, family):
    state = states[family]
    raw = seed_voken.convert(state, use_ema=False, image_size=32)
    ema = converted[family].tokenizer_params
    kernel = convert_workdir.oihw_to_hwio
    np.testing.assert_array_equal(raw.tokenizer_params["encoder"]["conv_in"]["kernel"],
                                  kernel(state["encoder.conv_in.weight"]))
    np.testing.assert_array_equal(ema["encoder"]["conv_in"]["kernel"], kernel(state["model_ema.encoderconv_inweight"]))
    assert not raw.ema and not np.allclose(raw.tokenizer_params["encoder"]["conv_in"]["kernel"],
                                           ema["encoder"]["conv_in"]["kernel"])


@pytest.mark.parametrize("family,name", [("magvit2", "imagenet_256_L"), ("magvit2", "imagenet_128_L"),
                                         ("magvit2", "pretrain256_16384"), ("ibq", "imagenet256_16384")])
def test_released_key_layouts(fx, family, name):
    """The official modules' keys at the released sizes (EMA copies included) pass the manifest
    check, and the converted config's parameter count equals the official one."""
    released = fx["manifest"]["released"][family][name]
    layout, cfg = released["keys"], released["config"]
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in layout}
    info = seed_voken.inspect(state, f"{name}.ckpt")
    dd = cfg["ddconfig"]
    assert (info.family, info.ch, info.ch_mult, info.num_res_blocks, info.z_channels, info.embed_dim) == (
        family, dd["ch"], tuple(dd["ch_mult"]), dd["num_res_blocks"], dd["z_channels"], cfg["embed_dim"])
    assert info.codebook_size == cfg["n_embed"] and info.has_ema
    config, _ = seed_voken.make_config(info)
    model = builders.build_tokenizer(config.tokenizer, 3)
    official = sum(int(np.prod(s)) for k, s in layout if not k.startswith("model_ema."))
    assert vqgan.count_params(model, 256, 3) == official


def test_command_line_on_lightning_checkpoints(ckpts, fx, tmp_path):
    """The CLI on a Lightning checkpoint (only the state dict is used, the pickled objects beside it
    are never built), the workdir's tokenizer reproducing the official ids; a second model into the
    same --out is refused with nothing written."""
    out = tmp_path / "wd"
    cmd = [sys.executable, "-m", "vqgen.convert.seed_voken", str(ckpts["magvit2"]), "--out", str(out),
           "--image-size", "32", "--dtype", "float32"]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (
        f"wrote {out}: tokenizer (Open-MAGVIT2 tokenizer f4 with 10-bit LFQ, ch 32, EMA weights) for 32px images "
        "(8x8 tokens), config tokenizers/open_magvit2 with the sizes of the file")
    assert not CALLS
    config = load_config_from_workdir(str(out))
    with config.unlocked():
        config.tokenizer_train.batch_size = 8  # encoding batch only; not part of the architecture
    tok = vqgen.load_tokenizer(str(out), config=config)
    np.testing.assert_array_equal(tok.encode(_nhwc(fx["image"])), fx["magvit2/tokens"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(convert_workdir.ConversionError, match=r"already holds a checkpoint; pass a new --out"):
        seed_voken.convert_files(str(ckpts["ibq"]), str(out), image_size=32)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_ibq_workdir_in_process(ckpts, fx, tmp_path):
    """``convert_files`` (what the CLI runs) for IBQ on one device, read back by ``vqgen.load_tokenizer``."""
    out, mesh = tmp_path / "ibq", parallel.create_mesh((1, 1, 1), jax.devices()[:1])
    converted = seed_voken.convert_files(str(ckpts["ibq"]), str(out), image_size=32, dtype="float32", mesh=mesh)
    assert converted.info.family == "ibq" and not CALLS
    config = load_config_from_workdir(str(out))
    with config.unlocked():
        config.tokenizer_train.batch_size = 8
    tok = vqgen.load_tokenizer(str(out), mesh=mesh, config=config)
    np.testing.assert_array_equal(tok.encode(_nhwc(fx["image"])), fx["ibq/tokens"])


def _without_ema(state):
    return {k: v for k, v in state.items() if not k.startswith("model_ema.")}


@pytest.mark.parametrize("case,match", [
    ("llamagen", r"^vq\.ckpt is a LlamaGen VQ state dict; convert it with python -m vqgen\.convert\.llamagen\.$"),
    ("transformer", r"^vq\.ckpt is an autoregressive transformer checkpoint \(transformer\.\*\), not a tokenizer; "
                    r"pass the tokenizer's checkpoint"),
    ("unknown", r"^vq\.ckpt is neither an Open-MAGVIT2 nor an IBQ tokenizer state dict \(it has 2 keys such as "),
    ("no_ema", r"^vq\.ckpt: this checkpoint holds no EMA weights; pass --no-ema to convert the raw weights\.$"),
    ("no_ema_ibq", r"^vq\.ckpt: this checkpoint holds no EMA weights; pass --no-ema to convert the raw weights "
                   r"\(a taming-transformers VQGAN"),
    ("partial_ema", r"^vq\.ckpt is not a SeedVoken Open-MAGVIT2 tokenizer f4 with 10-bit LFQ state dict: missing 1 "
                    r"key \(model_ema\.decoderconv_outbias\)\.$"),
    ("extra", r"^vq\.ckpt is not a SeedVoken IBQ tokenizer f4 with 64 codes state dict: unexpected 1 key "
              r"\(encoder\.extra\)\.$"),
    ("shape", r"^vq\.ckpt is not a SeedVoken Open-MAGVIT2 tokenizer f4 with 10-bit LFQ state dict: wrong shapes "
              r"decoder\.adaptive\.1\.gamma\.bias \(9,\) \(expected \(64,\)\)\.$"),
])
def test_bad_state_dicts_are_refused_in_one_sentence(states, case, match):
    state = dict(states["ibq" if case in ("no_ema_ibq", "extra") else "magvit2"])
    if case == "llamagen":
        state = {"encoder.conv_blocks.0.res.0.conv1.weight": np.zeros((32, 32, 3, 3), np.float32), **state}
    elif case == "transformer":
        state = {"transformer.tok_embeddings.weight": np.zeros((64, 32)), **{f"first_stage_model.{k}": v
                                                                            for k, v in state.items()}}
    elif case == "unknown":
        state = {"backbone.weight": np.zeros(3), "head.bias": np.zeros(3)}
    elif case in ("no_ema", "no_ema_ibq"):
        state = _without_ema(state)
    elif case == "partial_ema":
        del state["model_ema.decoderconv_outbias"]
    elif case == "extra":
        state["encoder.extra"] = np.zeros(3, np.float32)
    elif case == "shape":
        state["decoder.adaptive.1.gamma.bias"] = np.zeros(9, np.float32)
    with pytest.raises(convert_workdir.ConversionError, match=match) as info:
        seed_voken.convert(state, name="vq.ckpt", image_size=32)
    assert str(info.value).count(". ") == 0  # one sentence


def test_bad_files_are_refused_and_nothing_written(states, ckpts, tmp_path):
    """A truncated file, another family's file and EMA asked of a file without it: one sentence
    each, and the output directory is never created."""
    data = ckpts["magvit2"].read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    _save_ckpt(_without_ema(states["ibq"]), tmp_path / "raw.ckpt")
    torch.save({"state_dict": {"encoder.conv_blocks.0.res.0.conv1.weight": torch.zeros(2, 2, 3, 3),
                               "quantize.embedding.weight": torch.zeros(4, 2)}}, tmp_path / "llamagen.ckpt")
    cases = [("truncated.ckpt", r"it is truncated or not a PyTorch file"),
             ("llamagen.ckpt", r"^llamagen\.ckpt is a LlamaGen VQ state dict"),
             ("raw.ckpt", r"^raw\.ckpt: this checkpoint holds no EMA weights; pass --no-ema")]
    for i, (name, match) in enumerate(cases):
        out = tmp_path / f"wd{i}"
        with pytest.raises(convert_workdir.ConversionError, match=match) as info:
            seed_voken.convert_files(str(tmp_path / name), str(out))
        assert str(info.value).count(". ") == 0 and not out.exists()


def test_command_line_error_is_one_line(states, tmp_path):
    _save_ckpt(_without_ema(states["magvit2"]), tmp_path / "raw.ckpt")
    cmd = [sys.executable, "-m", "vqgen.convert.seed_voken", str(tmp_path / "raw.ckpt"), "--out", str(tmp_path / "wd")]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: raw.ckpt: this checkpoint holds no EMA weights; pass --no-ema to convert the raw weights."]
    assert not (tmp_path / "wd").exists()
