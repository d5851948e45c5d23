"""TiTok converter: converted tokenizers against the official bytedance/1d-tokenizer code's outputs.

The fixture (``tests/fixtures/titok/titok_tiny.npz``, made by ``tools/make_titok_fixture.py`` from
a bytedance/1d-tokenizer checkout) holds the outputs of two official ``TiTok`` models and a
manifest from which their random state dicts are rebuilt exactly (``numpy.random.RandomState``
draws, checked against stored checksums): ``two_stage``, the layout of the released TiTok-L-32 /
B-64 / S-128 (legacy token layout, l2-normalised codes, proxy-code head through a small MaskGIT
VQGAN decoder; 64x64 images, 16x16 patches, encoder width 128, decoder width 192, 8 tokens), and
``single_stage``, the layout of the released VQ8k models (pixel head, Euclidean lookup; 32x32
images, 8x8 patches, width 64 with 4 heads, 16 tokens). Official images are NCHW in [0, 1].
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the converter reads PyTorch files (CI installs torch==2.13.0 CPU)")

import vqgen  # noqa: E402
from vqgen import config_lib, parallel  # noqa: E402
from vqgen.api import load_config_from_workdir  # noqa: E402
from vqgen.convert import titok as convert_titok  # noqa: E402
from vqgen.convert import workdir as convert_workdir  # noqa: E402
from vqgen.train import builders  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "titok" / "titok_tiny.npz"
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
# Parameter counts of the released models (the official modules' counts, as vit.py records them).
RELEASED_COUNTS = {"titok_l32": 641_054_735, "titok_b64": 204_814_095, "titok_s128": 83_674_639,
                   "titok_bl64_vq8k": 390_016_148}


def _tokens_last(x: np.ndarray) -> np.ndarray:
    """Official latents ``[B, C, 1, N]`` -> ``[B, N, C]``."""
    return np.ascontiguousarray(x[:, :, 0, :].transpose(0, 2, 1))


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
    """The official state dicts (NumPy) of ``two_stage`` and ``single_stage``, rebuilt from the manifest."""
    rs = np.random.RandomState(fx["manifest"]["seed"])
    out = {}
    for name, entry in fx["manifest"]["models"].items():
        state = {}
        for key, shape, scale, offset, checksum in entry["params"]:
            w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
            assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{name}: {key} differs"
            state[key] = w
        out[name] = state
    return out


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name, value in tensors.items():
        raw = np.asarray(value, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.fixture(scope="module")
def files(states, tmp_path_factory) -> dict[str, Path]:
    """``two_stage`` as a ``torch.save`` file (tokenizer_titok_l32.bin), ``single_stage`` as the hub's
    ``model.safetensors``."""
    root = tmp_path_factory.mktemp("titok_files")
    bin_path = root / "tokenizer_titok_tiny.bin"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in states["two_stage"].items()}, bin_path)
    st_path = root / "model.safetensors"
    _write_safetensors(st_path, states["single_stage"])
    return {"two_stage": bin_path, "single_stage": st_path}


CONVERT_KW = {"two_stage": dict(dtype="float32"),
              "single_stage": dict(enc_heads=4, dec_heads=4, dtype="float32")}  # 16-wide heads: not the default


@pytest.fixture(scope="module")
def converted(states) -> dict[str, convert_titok.Converted]:
    return {name: convert_titok.convert(states[name], **CONVERT_KW[name]) for name in states}


def _outputs(conv: convert_titok.Converted, fx: dict, name: str) -> dict[str, np.ndarray]:
    """The TiTok the converted config builds, on the fixture's images: one jitted pass for every output."""
    config = conv.config
    model = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    example = builders.example_shape(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + example))["params"]
    params = convert_workdir.match_tree(conv.tokenizer_params, parallel.unbox(abstract), name)
    proxy = conv.info.decoder_head == "proxy_codes"

    def latents(m, x):  # the encoder's output before quantization (the network reads [0, 1] images)
        return m.encoder((x + 1.0) / 2.0, m.latent_tokens)

    @jax.jit
    def run(p, x, tokens):
        variables = {"params": p}
        recon, q = model.apply(variables, x)
        out = {"z": model.apply(variables, x, method=latents), "tokens": q.indices, "quantized": q.quantized,
               "recon": recon, "decoded": model.apply(variables, tokens, method="decode_indices")}
        if proxy:
            out["logits"] = model.apply(variables, q.quantized, method="proxy_logits")
        return out

    x = 2.0 * _nhwc(fx[f"{name}/image"]) - 1.0  # vqgen's [-1, 1] images
    out = run(params, jnp.asarray(x), jnp.asarray(fx[f"{name}/tokens"]))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def outputs(converted, fx) -> dict[str, dict[str, np.ndarray]]:
    return {name: _outputs(conv, fx, name) for name, conv in converted.items()}


def _one_device_env() -> dict[str, str]:
    """The environment of a user's command line: one CPU device (the tests simulate eight)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags}


@pytest.fixture(scope="module")
def workdir(files, tmp_path_factory) -> Path:
    """The two-stage model converted through the command line (on one device; the tests load it on eight)."""
    out = tmp_path_factory.mktemp("titok_workdir") / "wd"
    cmd = [sys.executable, "-m", "vqgen.convert.titok", str(files["two_stage"]), "--out", str(out), "--dtype",
           "float32"]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}: TiTok tokenizer (encoder 128x2, decoder 192x2, 8 tokens of a 32 x 6 codebook" in proc.stdout
    return out


# --------------------------------------------------------------------------------- golden outputs


def test_inferred_sizes_and_config(converted):
    two, one = converted["two_stage"], converted["single_stage"]
    i = two.info
    assert (i.image_size, i.patch_size, i.num_latent_tokens, i.token_size, i.codebook_size) == (64, 16, 8, 6, 32)
    assert (i.enc_width, i.enc_depth, i.enc_heads, i.enc_mlp_dim) == (128, 2, 2, 512)
    assert (i.dec_width, i.dec_depth, i.dec_heads, i.dec_mlp_dim) == (192, 2, 3, 768)
    assert (i.decoder_head, i.l2_normalize, i.proxy_codebook_size, i.proxy_code_dim) == ("proxy_codes", True, 1024, 32)
    assert (i.pixel_decoder_ch, i.pixel_decoder_ch_mult, i.pixel_decoder_num_res_blocks) == (32, (1, 1, 2, 2, 4), 1)
    tok = two.config.tokenizer
    assert tok.arch == "titok" and tok.legacy_token_layout and tok.pixel_range == "unit"
    assert (tok.proxy_code_dim, tok.pixel_decoder_ch, tok.pixel_decoder_num_res_blocks) == (32, 32, 1)
    assert "proxy_codebook_size" not in tok and "pixel_decoder_ch_mult" not in tok  # the official values
    assert tok.quantizer.l2_normalize and tok.quantizer.codebook_size == 32 and tok.dtype == "float32"
    assert (two.config.data.image_size, two.config.data.channels) == (64, 3)
    i = one.info
    assert (i.image_size, i.patch_size, i.num_latent_tokens, i.token_size, i.codebook_size) == (32, 8, 16, 8, 64)
    assert (i.enc_depth, i.dec_depth, i.enc_heads, i.dec_heads) == (2, 1, 4, 4)
    assert (i.decoder_head, i.l2_normalize) == ("pixels", False)
    assert not one.config.tokenizer.legacy_token_layout and one.config.tokenizer.pixel_range == "unit"
    assert not one.config.tokenizer.quantizer.l2_normalize


@pytest.mark.parametrize("name", ["two_stage", "single_stage"])
def test_latents_tokens_and_reconstruction_match_official(outputs, fx, name):
    out = outputs[name]
    np.testing.assert_allclose(out["z"], _tokens_last(fx[f"{name}/z"]), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(out["tokens"], fx[f"{name}/tokens"])
    np.testing.assert_allclose(out["quantized"], _tokens_last(fx[f"{name}/quantized"]), atol=ATOL, rtol=0)
    recon = _nhwc(fx[f"{name}/recon"])  # [0, 1] images; vqgen returns 2 y - 1
    np.testing.assert_allclose((out["recon"] + 1.0) / 2.0, recon, atol=ATOL, rtol=0)
    np.testing.assert_allclose((out["decoded"] + 1.0) / 2.0, recon, atol=ATOL, rtol=0)
    if name == "two_stage":
        np.testing.assert_allclose(out["logits"], _nhwc(fx[f"{name}/logits"]), atol=ATOL, rtol=0)


def test_released_key_layout(fx):
    """The converter's manifest equals the keys and shapes of the released models (from the official
    code), and they convert to the paper configs with ``pixel_range="unit"``."""
    variants = {"titok_l32": "L-32", "titok_b64": "B-64", "titok_s128": "S-128", "titok_bl64_vq8k": "BL-64-VQ"}
    for name, variant in variants.items():
        keys = fx["manifest"]["released"][name]
        fake = {k: np.broadcast_to(np.float32(0), shape) for k, shape in keys}
        info = convert_titok.inspect_titok(fake, name)
        assert info.variant == variant and info.image_size == 256 and info.patch_size == 16
        assert info.l2_normalize == (variant != "BL-64-VQ")
        manifest = convert_titok.titok_manifest(info)
        assert manifest == {k: tuple(s) for k, s in keys}
        assert sum(int(np.prod(s)) for s in manifest.values()) == RELEASED_COUNTS[name]
        config = convert_titok.make_config(info)
        want = config_lib.load_config("tokenizers/titok", variant)
        with want.unlocked():
            want.tokenizer.pixel_range = "unit"
        assert config.to_json() == want.to_json()


# ------------------------------------------------------------------------------------- workdir


def test_workdir_loads_through_the_api(workdir, fx):
    config = load_config_from_workdir(str(workdir))
    assert config.tokenizer.pixel_range == "unit" and config.tokenizer.pixel_decoder_ch == 32
    with config.unlocked():
        config.tokenizer_train.batch_size = 8  # encoding batch only; not part of the architecture
    tok = vqgen.load_tokenizer(str(workdir), config=config)
    x = 2.0 * _nhwc(fx["two_stage/image"]) - 1.0
    np.testing.assert_array_equal(tok.encode(x), fx["two_stage/tokens"])
    decoded = np.asarray(tok._frozen.decode(fx["two_stage/tokens"]))  # floats clipped to vqgen's [-1, 1]
    want = np.clip(_nhwc(fx["two_stage/recon"]), 0.0, 1.0)  # the official demo's clamp to [0, 1]
    np.testing.assert_allclose((decoded + 1.0) / 2.0, want, atol=ATOL, rtol=0)
    assert tok.decode(fx["two_stage/tokens"]).dtype == np.uint8


def test_reads_the_hubs_safetensors(states, files):
    read = convert_workdir.load_state_dict(str(files["single_stage"]), convert_titok.WRAPPERS)
    assert read.keys() == states["single_stage"].keys()
    assert all(np.array_equal(read[k], states["single_stage"][k]) for k in read)


# ----------------------------------------------------------------------------------- bad input


def _without(state, *prefixes):
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize("case,match", [
    ("llamagen", r"^x\.bin is a convolutional VQGAN state dict \(encoder\.conv_in, no latent tokens\), not a TiTok "
                 r"tokenizer; convert it with the converter of its family \(vqgen\.convert\.llamagen, "
                 r"vqgen\.convert\.taming\)\.$"),
    ("generator", r"^x\.bin is a TiTok generator \(MaskGIT-style transformer\) state dict, not the tokenizer; pass "
                  r"the tokenizer file"),
    ("vae", r"^x\.bin is a TiTok VAE state dict \(continuous tokens: its encoder emits 32 channels of mean and "
            r"log-variance and it has no codebook\), which vqgen's TiTok does not express; convert a VQ TiTok"),
    ("tatitok", r"^x\.bin is a TA-TiTok state dict \(a text-conditioned decoder\), which vqgen's TiTok does not "
                r"express"),
    ("stage1", r"^x\.bin is a stage-1 TiTok state dict \(proxy-code logits without the MaskGIT VQGAN decoder of "
               r"stage 2\), which decodes no pixels; convert the released stage-2 tokenizer\.$"),
    ("missing", r"^x\.bin is not a TiTok tokenizer state dict: missing 1 key "
                r"\(pixel_decoder\.up\.3\.block\.0\.nin_shortcut\.weight\)\.$"),
    ("extra", r"^x\.bin is not a TiTok tokenizer state dict: unexpected 1 key \(decoder\.extra\)\.$"),
    ("shape", r"^x\.bin is not a TiTok tokenizer state dict: wrong shapes decoder\.latent_token_positional_embedding "
              r"\(7, 192\) \(expected \(8, 192\)\)\.$"),
    ("heads", r"^--enc-heads 3 does not divide the encoder width 128 of x\.bin; pass the head count"),
    ("width", r"^x\.bin has encoder width 96, which is not a multiple of the official 64-wide heads, and the file "
              r"does not store the head count; pass it with --enc-heads\.$"),
    ("empty", r"^x\.bin is not a TiTok tokenizer state dict: it lacks latent_tokens"),
])
def test_bad_state_dicts_are_refused_in_one_sentence(states, fx, case, match):
    state, kwargs = dict(states["two_stage"]), {}
    if case == "llamagen":  # LlamaGen's VQ-16 keys
        state = {"encoder.conv_in.weight": np.zeros((128, 3, 3, 3), np.float32),
                 "encoder.conv_blocks.0.res.0.conv1.weight": np.zeros((128, 128, 3, 3), np.float32),
                 "decoder.conv_blocks.0.res.0.conv1.weight": np.zeros((512, 512, 3, 3), np.float32),
                 "quantize.embedding.weight": np.zeros((16384, 8), np.float32)}
    elif case == "generator":
        state = {"model.embeddings.word_embeddings.weight": np.zeros((5122, 64), np.float32),
                 "lm_head.weight": np.zeros((4096, 64), np.float32)}
    elif case == "vae":
        state = {k: np.broadcast_to(np.float32(0), s) for k, s in fx["manifest"]["released"]["titok_bl64_vae_c16"]}
    elif case == "tatitok":
        state["decoder.text_guidance_proj.weight"] = np.zeros((192, 768), np.float32)
    elif case == "stage1":
        state = _without(state, "pixel_decoder.", "pixel_quantize.")
    elif case == "missing":
        state = _without(state, "pixel_decoder.up.3.block.0.nin_shortcut.weight")
    elif case == "extra":
        state["decoder.extra"] = np.zeros(3, np.float32)
    elif case == "shape":
        state["decoder.latent_token_positional_embedding"] = state["decoder.latent_token_positional_embedding"][:7]
    elif case == "heads":
        kwargs["enc_heads"] = 3
    elif case == "width":  # a width that is no multiple of 64 has no default head count
        state = dict(states["single_stage"], latent_tokens=np.zeros((16, 96), np.float32))
    elif case == "empty":
        state = {"conv.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(convert_workdir.ConversionError, match=match) as info:
        convert_titok.convert(state, name="x.bin", **kwargs)
    assert str(info.value).count(". ") == 0  # one sentence


def test_truncated_file_is_refused_and_nothing_written(files, tmp_path):
    data = files["two_stage"].read_bytes()
    cut = tmp_path / "tokenizer_titok_l32.bin"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "wd"
    with pytest.raises(convert_workdir.ConversionError,
                       match=r"cannot be read with torch\.load\(weights_only=True\), it is truncated or not a PyTorch "
                             r"file \(.*\); download it again or pass the weights file itself\.$") as info:
        convert_titok.convert_file(str(cut), str(out))
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_refuses_a_workdir_holding_another_model(workdir, files, tmp_path):
    shutil.copytree(workdir, tmp_path / "wd")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    config = (tmp_path / "wd" / "config.json").read_text()
    with pytest.raises(convert_workdir.ConversionError,
                       match=r"checkpoints/tokenizer already holds a checkpoint; pass a new --out \(converted weights "
                             r"never overwrite a run\)\.$"):
        convert_titok.convert_file(str(files["single_stage"]), str(tmp_path / "wd"), **CONVERT_KW["single_stage"])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "wd" / "config.json").read_text() == config


def test_command_line_error_is_one_line(tmp_path):
    path = tmp_path / "vq_ds16_c2i.pt"  # a LlamaGen VQ-16 file
    torch.save({"model": {"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3),
                          "quantize.embedding.weight": torch.zeros(16384, 8)}}, path)
    cmd = [sys.executable, "-m", "vqgen.convert.titok", str(path), "--out", str(tmp_path / "wd")]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: vq_ds16_c2i.pt is a convolutional VQGAN state dict (encoder.conv_in, no latent tokens), not a TiTok "
        "tokenizer; convert it with the converter of its family (vqgen.convert.llamagen, vqgen.convert.taming).")
    assert not (tmp_path / "wd").exists()
