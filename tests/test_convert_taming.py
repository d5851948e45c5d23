"""taming-transformers converter: a converted VQGAN against the official taming code's outputs.

The fixture (``tests/fixtures/taming/taming_tiny.npz``, made by ``tools/make_taming_fixture.py``
from a CompVis/taming-transformers checkout) holds the outputs of the official autoencoder (ch 32,
multipliers 1,1,2,2,4, attention at the two lowest levels, 64 codes of width 16, 64x64 images, 4x4
tokens) and a manifest from which its random state dict is rebuilt exactly (checked against stored
checksums), plus the key layouts of the released f16 models.
"""
from __future__ import annotations

import fractions
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
from vqgen.convert import taming as convert_taming  # noqa: E402
from vqgen.convert import workdir as convert_workdir  # noqa: E402
from vqgen.tokenizers import vqgan  # noqa: E402
from vqgen.train import builders  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "taming" / "taming_tiny.npz"
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
CALLS: list = []  # what a pickled object's reduce function would record if the reader called it


def _record(*args):
    CALLS.append(args)


class LightningLike:
    """Stands for the objects Lightning pickles beside the weights (callbacks, hyper-parameters)."""

    def __reduce__(self):
        return _record, ("built",)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    return data


@pytest.fixture(scope="module")
def state(fx) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(fx["manifest"]["seed"])
    out = {}
    for key, shape, scale, offset, checksum in fx["manifest"]["params"]:
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), key
        out[key] = w
    return out


@pytest.fixture(scope="module")
def ckpt(state, tmp_path_factory) -> Path:
    """The fixture's model as a Lightning ``last.ckpt``: the autoencoder and the training loss's
    weights under ``state_dict``, and pickled objects beside them."""
    path = tmp_path_factory.mktemp("taming_files") / "last.ckpt"
    weights = {k: torch.from_numpy(v) for k, v in state.items()}
    weights.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(8, 3, 4, 4)})
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8", "state_dict": weights,
                "callbacks": {LightningLike: {"best_model_score": torch.tensor(0.5)}},
                "hyper_parameters": LightningLike(), "optimizer_states": [{"state": {}, "param_groups": []}]}, path)
    return path


@pytest.fixture(scope="module")
def converted(state) -> convert_taming.Converted:
    return convert_taming.convert(state, image_size=64, dtype="float32")


def _one_device_env() -> dict[str, str]:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags}


def test_inferred_sizes_and_config(converted):
    info, tok = converted.info, converted.config.tokenizer
    assert (info.ch, info.ch_mult, info.num_res_blocks, info.attn_levels) == (32, (1, 1, 2, 2, 4), 2, (3, 4))
    assert (info.z_channels, info.embed_dim, info.codebook_size, info.in_channels) == (32, 16, 64, 3)
    assert converted.config_name == "tokenizers/llamagen_vq16"
    assert (tok.ch, tuple(tok.ch_mult), tok.z_channels, tok.embed_dim, tuple(tok.attn_resolutions)) == (
        32, (1, 1, 2, 2, 4), 32, 16, (32, 16))  # levels 3 and 4 of a 256-resolution config
    assert tok.quantizer.codebook_size == 64 and not tok.quantizer.l2_normalize
    assert converted.config.data.image_size == 64 and tok.dtype == "float32"


def test_tokens_and_reconstruction_match_official(converted, fx):
    config = converted.config
    model = builders.build_tokenizer(config.tokenizer, 3)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + builders.example_shape(config)))
    params = convert_workdir.match_tree(converted.tokenizer_params, parallel.unbox(abstract["params"]), "tokenizer")

    @jax.jit
    def run(p, x, tokens):
        recon, q = model.apply({"params": p}, x)
        return {"tokens": q.indices, "quant": q.quantized, "recon": recon,
                "decoded": model.apply({"params": p}, tokens, method="decode_indices")}

    out = jax.tree.map(np.asarray, run(params, jnp.asarray(_nhwc(fx["image"])), jnp.asarray(fx["tokens"])))
    np.testing.assert_array_equal(out["tokens"], fx["tokens"])
    for key in ("quant", "recon", "decoded"):
        np.testing.assert_allclose(out[key], _nhwc(fx[key]), atol=ATOL, rtol=0, err_msg=key)


@pytest.mark.parametrize("name,codes", [("vqgan_imagenet_f16_1024", 1024), ("vqgan_imagenet_f16_16384", 16384)])
def test_released_key_layouts(fx, name, codes):
    layout = fx["manifest"]["released"][name]
    info = convert_taming.inspect({k: np.broadcast_to(np.float32(0), s) for k, s in layout}, f"{name}.ckpt")
    assert (info.ch, info.ch_mult, info.attn_levels, info.z_channels, info.embed_dim, info.codebook_size) == (
        128, (1, 1, 2, 2, 4), (4,), 256, 256, codes)
    config, _ = convert_taming.make_config(info)
    assert tuple(config.tokenizer.attn_resolutions) == (16,) and config.data.image_size == 256
    model = builders.build_tokenizer(config.tokenizer, 3)
    assert vqgan.count_params(model, 256, 3) == sum(int(np.prod(s)) for _, s in layout)


def test_lightning_checkpoint_converts_without_building_its_objects(ckpt, fx, tmp_path):
    """The CLI on a Lightning checkpoint: only the state dict is used, the pickled objects beside it
    are never built, and the workdir's tokenizer reproduces the official tokens."""
    out = tmp_path / "wd"
    cmd = [sys.executable, "-m", "vqgen.convert.taming", "--ckpt", str(ckpt), "--out", str(out), "--image-size", "64",
           "--dtype", "float32"]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (
        f"wrote {out}: tokenizer (taming-transformers VQGAN f16 with 64 codes of width 16, ch 32) for 64px images "
        "(4x4 tokens), config tokenizers/llamagen_vq16 with the sizes of the file")
    read = convert_taming.read(str(ckpt))
    assert not CALLS and not any(k.startswith("loss.") for k in convert_taming.convert(read).tokenizer_params)
    config = load_config_from_workdir(str(out))
    with config.unlocked():
        config.tokenizer_train.batch_size = 8  # encoding batch only; not part of the architecture
    tok = vqgen.load_tokenizer(str(out), config=config)
    np.testing.assert_array_equal(tok.encode(_nhwc(fx["image"])), fx["tokens"])
    with pytest.raises(convert_workdir.ConversionError, match=r"already holds a checkpoint; pass a new --out"):
        convert_taming.convert_files(str(ckpt), str(out), image_size=64)


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


@pytest.mark.parametrize("case,match", [
    ("llamagen", r"^vq\.ckpt is a LlamaGen VQ state dict; convert it with python -m vqgen\.convert\.llamagen\.$"),
    ("var", r"^vq\.ckpt is a VAR VQ-VAE state dict; convert it with python -m vqgen\.convert\.var\.$"),
    ("gumbel", r"^vq\.ckpt is a Gumbel-quantized VQGAN \(quantize\.proj, quantize\.embed\), which vqgen does not "
               r"convert\.$"),
    ("kl", r"^vq\.ckpt is an autoencoder without a codebook \(a KL autoencoder\)"),
    ("transformer", r"^vq\.ckpt is a taming-transformers Net2NetTransformer"),
    ("missing", r"^vq\.ckpt is not a taming-transformers VQGAN f16 with 64 codes state dict: missing 1 key "
                r"\(decoder\.up\.4\.attn\.2\.proj_out\.bias\)\.$"),
    ("extra", r"^vq\.ckpt is not a taming-transformers VQGAN f16 with 64 codes state dict: unexpected 1 key "
              r"\(encoder\.extra\)\.$"),
    ("shape", r"^vq\.ckpt is not a taming-transformers VQGAN f16 with 64 codes state dict: wrong shapes "
              r"quant_conv\.bias \(9,\) \(expected \(16,\)\)\.$"),
    ("attention", r"^vq\.ckpt has attention at encoder levels \(3, 4\) but decoder levels \(4,\)"),
    ("config", r"^vq\.ckpt is a taming-transformers VQGAN f16 with 64 codes \(ch 32, multipliers \(1, 1, 2, 2, 4\)\) "
               r"but --config tokenizers/llamagen_vq16 describes ch 128"),
    ("var_config", r"^--config tokenizers/var_vqvae has no taming-style VQGAN tokenizer with a plain VQ"),
])
def test_bad_state_dicts_are_refused_in_one_sentence(state, case, match):
    state, kwargs = dict(state), dict(name="vq.ckpt", image_size=64)
    if case == "llamagen":
        state = {"encoder.conv_blocks.0.res.0.conv1.weight": np.zeros((32, 32, 3, 3), np.float32), **state}
    elif case == "var":
        state = {**state, "quantize.quant_resi.qresi_ls.0.weight": np.zeros((16, 16, 3, 3), np.float32)}
    elif case == "gumbel":
        state = {**_without(state, "quantize.embedding.weight"), "quantize.embed.weight": np.zeros((64, 16)),
                 "quantize.proj.weight": np.zeros((64, 32, 1, 1))}
    elif case == "kl":
        state = _without(state, "quantize.embedding.weight")
    elif case == "transformer":
        state = {"first_stage_model.encoder.conv_in.weight": np.zeros((32, 3, 3, 3)),
                 "transformer.tok_emb.weight": np.zeros((64, 32))}
    elif case == "missing":
        state = _without(state, "decoder.up.4.attn.2.proj_out.bias")
    elif case == "extra":
        state["encoder.extra"] = np.zeros(3, np.float32)
    elif case == "shape":
        state["quant_conv.bias"] = np.zeros(9, np.float32)
    elif case == "attention":
        state = {k: v for k, v in state.items() if not k.startswith("decoder.up.3.attn.")}
    elif case == "config":
        kwargs["config"] = "tokenizers/llamagen_vq16"
    elif case == "var_config":
        kwargs["config"] = "tokenizers/var_vqvae"
    with pytest.raises(convert_workdir.ConversionError, match=match) as info:
        convert_taming.convert(state, **kwargs)
    assert str(info.value).count(". ") == 0  # one sentence


def test_unreadable_files_are_refused(ckpt, tmp_path):
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(2), "hparams": fractions.Fraction(1, 3)}},
               tmp_path / "objects.ckpt")
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+objects\.ckpt holds no state dict"):
        convert_taming.read(str(tmp_path / "objects.ckpt"))
    data = ckpt.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(convert_workdir.ConversionError, match=r"it is truncated or not a PyTorch file"):
        convert_taming.read(str(tmp_path / "truncated.ckpt"))


def test_command_line_error_is_one_line(tmp_path):
    torch.save({"tok_embeddings.weight": torch.zeros(4, 2), "layers.0.attention.wqkv.weight": torch.zeros(6, 2)},
               tmp_path / "gpt.pt")
    cmd = [sys.executable, "-m", "vqgen.convert.taming", "--ckpt", str(tmp_path / "gpt.pt"), "--out",
           str(tmp_path / "wd")]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: gpt.pt is a transformer state dict, not a VQGAN."]
    assert not (tmp_path / "wd").exists()
