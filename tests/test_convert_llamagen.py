"""LlamaGen converter: converted VQ tokenizers and GPTs against the official LlamaGen code's outputs.

The fixture (``tests/fixtures/llamagen/llamagen_tiny.npz``, made by
``tools/make_llamagen_fixture.py`` from a FoundationVision/LlamaGen checkout) holds the outputs of
the official models and a manifest from which their random state dicts are rebuilt exactly
(``numpy.random.RandomState`` draws, checked against stored checksums): ``vq16`` (VQ-16's
multipliers at ch 32, 64 codes of width 8, 64x64 images, 4x4 tokens), ``vq8`` (VQ-8's
multipliers, 32x32 images), ``gpt`` (c2i, 2 layers, width 64, 4 heads, 10 classes and the CFG null
row, 4x4 grid) and ``gpt_b`` (grouped-query attention over 2 kv heads, SwiGLU width 128, no null
row). It also lists the state-dict keys and shapes of every released size.
"""
from __future__ import annotations

import argparse
import fractions
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
from vqgen.convert import llamagen as convert_llamagen  # noqa: E402
from vqgen.convert import workdir as convert_workdir  # noqa: E402
from vqgen.generators import gpt as gpt_lib  # noqa: E402
from vqgen.tokenizers import vqgan  # noqa: E402
from vqgen.train import builders  # noqa: E402
from vqgen.train import generator as generator_lib  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "llamagen" / "llamagen_tiny.npz"
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
TINY = dict(image_size=64, num_heads=4, dtype="float32")  # what the tiny files do not say about themselves


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
    """The official state dicts (NumPy) of ``vq16``, ``vq8``, ``gpt`` and ``gpt_b``, rebuilt from the manifest."""
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


def _tensors(state: dict[str, np.ndarray], prefix: str = "") -> dict:
    return {prefix + k: torch.from_numpy(np.array(v)) for k, v in state.items()}


@pytest.fixture(scope="module")
def files(states, tmp_path_factory) -> dict[str, Path]:
    """The fixture's models as the files LlamaGen writes: the GPT as a training checkpoint whose
    ``model`` weights differ from its ``ema`` weights (the fixture's), the VQ as ``{"model"}``."""
    root = tmp_path_factory.mktemp("llamagen_files")
    paths = {name: root / f"{name}.pt" for name in states}
    gpt = states["gpt"]
    torch.save({"model": _tensors({k: 0.5 * v for k, v in gpt.items()}), "ema": _tensors(gpt),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "steps": 5000,
                "args": argparse.Namespace(gpt_model="GPT-B", image_size=64)}, paths["gpt"])
    torch.save({"model": _tensors(states["vq16"]), "steps": 10}, paths["vq16"])
    torch.save(_tensors(states["vq8"]), paths["vq8"])
    torch.save({"model": _tensors(states["gpt_b"])}, paths["gpt_b"])
    return paths


@pytest.fixture(scope="module")
def converted(states) -> convert_llamagen.Converted:
    return convert_llamagen.convert(states["vq16"], states["gpt"], **TINY)


def _tokenizer(config, tokenizer_params):
    model = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    example = builders.example_shape(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + example))["params"]
    return model, convert_workdir.match_tree(tokenizer_params, parallel.unbox(abstract), "tokenizer")


def _generator(conv):
    _, model = generator_lib.build_model(conv.config)  # the model the written config builds
    params = convert_workdir.match_tree(conv.generator_params, parallel.unbox(gpt_lib.abstract_params(model)), "gpt")
    return model, params


def _one_device_env() -> dict[str, str]:
    """The environment of a user's command line: one CPU device (the tests simulate eight)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags}


@pytest.fixture(scope="module")
def workdir(files, tmp_path_factory) -> Path:
    """Both models converted through the command line (on one device; the tests load it on eight)."""
    out = tmp_path_factory.mktemp("llamagen_workdir") / "wd"
    cmd = [sys.executable, "-m", "vqgen.convert.llamagen", "--vq", str(files["vq16"]), "--gpt", str(files["gpt"]),
           "--out", str(out), "--image-size", "64", "--num-heads", "4", "--dtype", "float32"]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (
        f"wrote {out}: tokenizer (LlamaGen VQ-16, ch 32, 64 codes of width 8) and generator (GPT (2 layers, width "
        "64): 2 layers, width 64, 4 heads, 10 classes, its ema weights) for 64px images (4x4 tokens), config "
        "generators/llamagen:B with the sizes of the files")
    return out


# --------------------------------------------------------------------------- golden outputs


def test_inferred_sizes_and_config(converted):
    vq, gpt, config = converted.vq, converted.gpt, converted.config
    assert (vq.ch, vq.ch_mult, vq.num_res_blocks, vq.z_channels, vq.embed_dim, vq.codebook_size) == (
        32, (1, 1, 2, 2, 4), 2, 32, 8, 64)
    assert (gpt.depth, gpt.width, gpt.num_heads, gpt.num_kv_heads, gpt.hidden_dim) == (2, 64, 4, 4, 256)
    assert (gpt.vocab_size, gpt.num_classes, gpt.null_class, gpt.grid) == (64, 10, True, None)
    assert converted.config_name == "generators/llamagen:B"
    assert (config.data.image_size, config.data.channels, config.data.num_classes) == (64, 3, 10)
    tok = config.tokenizer
    assert (tok.ch, tuple(tok.ch_mult), tok.z_channels, tok.embed_dim, tuple(tok.attn_resolutions)) == (
        32, (1, 1, 2, 2, 4), 32, 8, (16,))
    assert tok.quantizer.codebook_size == 64 and tok.quantizer.l2_normalize
    gen = config.generator
    assert (gen.depth, gen.width, gen.num_heads, gen.num_kv_heads, gen.class_dropout_prob) == (2, 64, 4, 4, 0.1)
    assert "multiple_of" not in gen and gen.dtype == tok.dtype == "float32"


@pytest.mark.parametrize("name,image", [("vq16", "image"), ("vq8", "image8")])
def test_tokens_and_reconstruction_match_official(states, fx, name, image):
    """Tokens, quantized latents, reconstructions and decoded tokens; for VQ-16 also the images the
    official code decoded from the GPT's greedy samples (one batch with the image tokens)."""
    conv = convert_llamagen.convert(states[name], None, image_size=fx[image].shape[-1], dtype="float32")
    assert conv.config.tokenizer.ch_mult == ((1, 1, 2, 2, 4) if name == "vq16" else (1, 2, 2, 4))
    model, params = _tokenizer(conv.config, conv.tokenizer_params)
    tokens, want = fx[f"{name}_tokens"], _nhwc(fx[f"{name}_decoded"])
    if name == "vq16":
        tokens = np.concatenate([tokens, fx["sample"].reshape(-1, *tokens.shape[1:])])
        want = np.concatenate([want, _nhwc(fx["sample_images"])])

    @jax.jit
    def run(p, x, tokens):
        recon, q = model.apply({"params": p}, x)
        return {"tokens": q.indices, "quant": q.quantized, "recon": recon,
                "decoded": model.apply({"params": p}, tokens, method="decode_indices")}

    out = jax.tree.map(np.asarray, run(params, jnp.asarray(_nhwc(fx[image])), jnp.asarray(tokens)))
    np.testing.assert_array_equal(out["tokens"], fx[f"{name}_tokens"])
    for key in ("quant", "recon"):
        np.testing.assert_allclose(out[key], _nhwc(fx[f"{name}_{key}"]), atol=ATOL, rtol=0, err_msg=key)
    np.testing.assert_allclose(out["decoded"], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,key,kwargs", [
    ("gpt", "logits", {}),
    ("gpt_b", "logits_b", {"num_classes": 10}),
])
def test_teacher_forced_logits_match_official(states, fx, name, key, kwargs):
    conv = convert_llamagen.convert(None, states[name], **TINY, **kwargs)
    model, params = _generator(conv)
    logits = model.apply({"params": params}, jnp.asarray(fx["tokens"]), jnp.asarray(fx["labels"]))
    np.testing.assert_allclose(np.asarray(logits), fx[key], atol=ATOL, rtol=0)


def test_gqa_and_swiglu_width_are_inferred(states):
    conv = convert_llamagen.convert(None, states["gpt_b"], num_classes=10, **TINY)
    gpt, gen = conv.gpt, conv.config.generator
    assert (gpt.num_heads, gpt.num_kv_heads, gpt.hidden_dim, gpt.null_class) == (4, 2, 128, False)
    assert (gen.num_kv_heads, gen.multiple_of, gen.class_dropout_prob, conv.config.sample.cfg_scale) == (2, 128, 0, 1)
    model, params = _generator(conv)
    assert model.class_dropout_prob == 0 and params["cls_embedding"]["embedding_table"].shape == (10, 64)  # no null row


@pytest.mark.parametrize("cfg_scale,key", [(1.0, "sample"), (2.0, "sample_cfg")])
def test_kv_cache_sampling_matches_official(converted, fx, cfg_scale, key):
    """Greedy (top-k 1) KV-cache sampling from fixed classes gives the official generate()'s tokens."""
    model, params = _generator(converted)
    options = gpt_lib.SamplerConfig(temperature=1.0, top_k=1, cfg_scale=cfg_scale)
    tokens = gpt_lib.sample(model, params, fx["sample_labels"], jax.random.key(0), options)
    np.testing.assert_array_equal(np.asarray(tokens), fx[key])


# ------------------------------------------------------------------------------ released sizes


def _fake(layout) -> dict[str, np.ndarray]:
    return {k: np.broadcast_to(np.float32(0), shape) for k, shape in layout}


@pytest.mark.parametrize("variant", ["B", "L", "XL", "XXL", "3B"])
def test_released_gpt_sizes_give_the_paper_configs(fx, variant):
    """Each released GPT's key layout (from the official code) passes the manifest, gives exactly
    ``generators/llamagen:<variant>`` and a model of the manifest's parameter count."""
    state = _fake(fx["manifest"]["released"][f"GPT-{variant}"])
    gpt = convert_llamagen.inspect_gpt(state, f"c2i_{variant}.pt")
    arch = gpt_lib.VARIANTS[variant]
    assert (gpt.depth, gpt.width, gpt.num_heads, gpt.variant) == (arch["depth"], arch["width"], arch["num_heads"],
                                                                  variant)
    assert (gpt.vocab_size, gpt.num_classes, gpt.null_class, gpt.num_kv_heads) == (16384, 1000, True, gpt.num_heads)
    config, spec = convert_llamagen.make_config(None, gpt)
    assert spec == f"generators/llamagen:{variant}"
    assert config.to_json() == config_lib.load_config(spec).to_json()
    _, model = generator_lib.build_model(config)
    assert gpt_lib.count_params(model) == sum(int(np.prod(s)) for s in convert_llamagen.gpt_manifest(gpt).values())
    at_384, _ = convert_llamagen.make_config(None, gpt, gpt_path=f"/ckpt/c2i_{variant}_384.pt")
    assert at_384.data.image_size == 384  # the size in the released file's name


@pytest.mark.parametrize("name,ch_mult,attn", [("VQ-16", (1, 1, 2, 2, 4), 16), ("VQ-8", (1, 2, 2, 4), 32)])
def test_released_vq_sizes(fx, name, ch_mult, attn):
    vq = convert_llamagen.inspect_vq(_fake(fx["manifest"]["released"][name]), "vq.pt")
    assert (vq.ch, vq.ch_mult, vq.z_channels, vq.embed_dim, vq.codebook_size, vq.name) == (
        128, ch_mult, 256, 8, 16384, name)
    config, spec = convert_llamagen.make_config(vq, None)
    assert spec == "tokenizers/llamagen_vq16" and tuple(config.tokenizer.attn_resolutions) == (attn,)
    model = builders.build_tokenizer(config.tokenizer, 3)
    counted = sum(int(np.prod(s)) for s in convert_llamagen.vq_manifest(vq).values())
    assert vqgan.count_params(model, 256, 3) == counted
    if name == "VQ-16":
        assert counted == 71_883_403
        assert config.to_json() == config_lib.load_config(spec).to_json()
        gpt = convert_llamagen.inspect_gpt(_fake(fx["manifest"]["released"]["GPT-B"]))
        both, _ = convert_llamagen.make_config(vq, gpt)
        assert both.to_json() == config_lib.load_config("generators/llamagen:B").to_json()


# ----------------------------------------------------------------------------------- workdir


def test_workdir_loads_through_the_api(workdir, fx):
    config = load_config_from_workdir(str(workdir))
    with config.unlocked():
        config.tokenizer_train.batch_size = 8  # encoding batch only; not part of the architecture
    tok = vqgen.load_tokenizer(str(workdir), config=config)
    np.testing.assert_array_equal(tok.encode(_nhwc(fx["image"])), fx["vq16_tokens"])
    gen = vqgen.load_generator(str(workdir), config=config)
    assert gen.tokenizer is not None
    tokens = gen.sample_tokens(fx["sample_labels"], jax.random.key(0), top_k=1, cfg_scale=2.0)
    np.testing.assert_array_equal(np.asarray(tokens).reshape(len(tokens), -1), fx["sample_cfg"])
    trained = gen._trained
    logits = trained.model.apply({"params": trained.params}, jnp.asarray(fx["tokens"]), jnp.asarray(fx["labels"]))
    np.testing.assert_allclose(np.asarray(logits), fx["logits"], atol=ATOL, rtol=0)


def test_tokenizer_only_and_generator_only_conversions(files, tmp_path):
    one_device = parallel.create_mesh((1, 1, 1), jax.devices()[:1])
    alone = convert_llamagen.convert_files(str(files["vq8"]), None, str(tmp_path / "vq"), image_size=32,
                                           mesh=one_device)
    assert "generator" not in alone.config and os.listdir(tmp_path / "vq" / "checkpoints") == ["tokenizer"]
    assert alone.config.tokenizer.dtype == "bfloat16"  # the config's
    convert_llamagen.convert_files(None, str(files["gpt_b"]), str(tmp_path / "gen"), num_classes=10, mesh=one_device,
                                   **TINY)
    assert os.listdir(tmp_path / "gen" / "checkpoints") == ["generator"]
    config = load_config_from_workdir(str(tmp_path / "gen"))
    assert config.tokenizer.quantizer.codebook_size == 64 and config.generator.num_kv_heads == 2
    gen = vqgen.load_generator(str(tmp_path / "gen"))
    assert gen.tokenizer is None


def test_refuses_a_workdir_with_checkpoints(workdir, files, tmp_path):
    with pytest.raises(convert_workdir.ConversionError, match=r"already holds a checkpoint; pass a new --out"):
        convert_llamagen.convert_files(str(files["vq16"]), None, str(workdir), image_size=64)
    # a GPT alone into a workdir holding another model's tokenizer (its config says ch 128, the tokenizer has 32)
    shutil.copytree(workdir / "checkpoints" / "tokenizer", tmp_path / "checkpoints" / "tokenizer")
    shutil.copy(workdir / "config.json", tmp_path / "config.json")
    with pytest.raises(convert_workdir.ConversionError, match=r"holds a tokenizer that the converted model's config "
                       r"does not describe \(tokenizer\.ch: checkpoint 32 vs config 128.*\); convert the tokenizer "
                       r"and the generator together into a new --out\.$"):
        convert_llamagen.convert_files(None, str(files["gpt_b"]), str(tmp_path), num_classes=10, **TINY)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]  # nothing written
    assert os.listdir(tmp_path / "checkpoints") == ["tokenizer"]
    assert (tmp_path / "config.json").read_text() == (workdir / "config.json").read_text()


# ------------------------------------------------------------------------------- file formats


def test_reads_training_checkpoints_ema_first(files, states):
    ema, where = convert_llamagen.read(str(files["gpt"]))
    assert where == "ema" and all(np.array_equal(ema[k], states["gpt"][k]) for k in states["gpt"])
    raw, where = convert_llamagen.read(str(files["gpt"]), "model")
    assert where == "model" and np.array_equal(raw["norm.weight"], 0.5 * states["gpt"]["norm.weight"])
    vq, where = convert_llamagen.read(str(files["vq16"]))
    assert where == "model" and vq.keys() == states["vq16"].keys()
    assert convert_llamagen.read(str(files["vq8"]))[1] == ""  # a bare state dict


def test_reads_fsdp_and_ddp_key_layouts(states, tmp_path):
    gpt = states["gpt"]

    def fsdp_key(key):  # FSDP + activation checkpointing wrap each layer
        return key.replace("layers.0.", "layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.")

    torch.save({fsdp_key(k): torch.from_numpy(v) for k, v in gpt.items()}, tmp_path / "consolidated.pth")
    torch.save({"module": _tensors(gpt, "module._orig_mod.")}, tmp_path / "deepspeed.pt")
    for name in ("consolidated.pth", "deepspeed.pt"):
        state, _ = convert_llamagen.read(str(tmp_path / name))
        assert state.keys() == gpt.keys(), name
    torch.save({"_fsdp_wrapped_module._flat_param": torch.zeros(10)}, tmp_path / "sharded.pt")
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+sharded\.pt holds FSDP's flattened parameter "
                       r"shards \(_fsdp_wrapped_module\._flat_param\), which lose the parameter shapes; save it with "
                       r"FSDP's FULL_STATE_DICT \(a consolidated state dict\)\.$"):
        convert_llamagen.read(str(tmp_path / "sharded.pt"))


def test_a_stored_rope_table_gives_the_grid(states):
    """A checkpoint that kept ``freqs_cis`` (an older LlamaGen saved it) says its grid and head width."""
    from vqgen.modules.rope import rope_2d_table

    cos, sin = rope_2d_table((4, 4), 16, 10000.0, prefix_len=1)
    state = {**states["gpt"], "freqs_cis": np.stack([cos, sin], -1)}
    conv = convert_llamagen.convert(None, state, dtype="float32")  # neither --num-heads nor --image-size
    assert (conv.gpt.grid, conv.gpt.num_heads, conv.config.data.image_size) == (4, 4, 64)
    with pytest.raises(convert_workdir.ConversionError, match=r"stores a 4x4 token grid \(64px with 16x downsampling\) "
                       r"but --image-size 256 was given; drop --image-size\.$"):
        convert_llamagen.convert(None, state, image_size=256)


# --------------------------------------------------------------------------------- bad input


def _without(state, *keys):
    return {k: v for k, v in state.items() if k not in keys}


def _var_like() -> dict[str, np.ndarray]:
    return {"class_emb.weight": np.zeros((11, 64), np.float32), "blocks.0.attn.mat_qkv.weight": np.zeros((3, 3))}


@pytest.mark.parametrize("case,match", [
    ("gpt_as_vq", r"^vq\.pt is a LlamaGen GPT state dict, not the VQ tokenizer; pass it as --gpt\.$"),
    ("vq_as_gpt", r"^gpt\.pt is a LlamaGen VQ tokenizer state dict, not the GPT; pass it as --vq\.$"),
    ("var", r"^gpt\.pt is a VAR transformer state dict; convert it with python -m vqgen\.convert\.var\.$"),
    ("var_vae", r"^vq\.pt is a VAR VQ-VAE state dict; convert it with python -m vqgen\.convert\.var\.$"),
    ("taming", r"^vq\.pt is a taming-transformers-style VQGAN state dict \(encoder\.down\.\*\), not LlamaGen's"),
    ("t2i", r"^gpt\.pt is a LlamaGen text-to-image GPT \(its cls_embedding is a caption projection\), which vqgen "
            r"does not convert; pass a class-conditional \(c2i\) GPT\.$"),
    ("missing", r"^vq\.pt is not a LlamaGen VQ-16 state dict: missing 1 key "
                r"\(decoder\.conv_blocks\.0\.attn\.2\.proj_out\.bias\)\.$"),
    ("extra", r"^gpt\.pt is not a LlamaGen GPT \(2 layers, width 64\) state dict: unexpected 1 key "
              r"\(layers\.0\.attention\.extra\)\.$"),
    ("shape", r"^vq\.pt is not a LlamaGen VQ-16 state dict: wrong shapes quant_conv\.bias \(9,\) "
              r"\(expected \(8,\)\)\.$"),
    ("pair", r"^vq\.pt has 64 codes but gpt\.pt predicts 32; pass the VQ the GPT was trained with\.$"),
    ("heads", r"^gpt\.pt has width 64, which is none of LlamaGen's sizes, and its file does not store the attention "
              r"heads; pass them with --num-heads\.$"),
    ("bad_heads", r"^gpt\.pt has width 64, which 6 heads do not divide; pass the head count"),
    ("classes", r"^gpt\.pt has a class table of 11 rows, which is neither 20 classes nor 20 classes and the CFG "
                r"null row; drop --num-classes or fix it\.$"),
    ("config", r"^gpt\.pt is a GPT \(2 layers, width 64\) state dict \(2 layers of width 64, 4 heads\) but --config "
               r"generators/llamagen:L describes 24 layers of width 1024 with 16 heads; pass the matching file or "
               r"config, or drop --config\.$"),
    ("vq_config", r"^vq\.pt is a LlamaGen VQ-16 state dict \(ch 32, multipliers \(1, 1, 2, 2, 4\), 64 codes\) but "
                  r"--config tokenizers/llamagen_vq16 describes ch 128"),
    ("other", r"^gpt\.pt is not a LlamaGen c2i GPT state dict: it lacks tok_embeddings\.weight"),
    ("decoder", r"^vq\.pt has decoder multipliers \(1, 1, 2, 2, 2\) unlike its encoder's \(1, 1, 2, 2, 4\), which "
                r"vqgen's VQGAN \(one ch_mult for both\) does not build; pass a VQ whose encoder and decoder mirror"),
])
def test_bad_state_dicts_are_refused_in_one_sentence(states, case, match):
    vq, gpt = dict(states["vq16"]), dict(states["gpt"])
    kwargs = dict(vq_name="vq.pt", gpt_name="gpt.pt", **TINY)
    if case == "gpt_as_vq":
        vq, gpt = gpt, None
    elif case == "vq_as_gpt":
        vq, gpt = None, vq
    elif case == "var":
        vq, gpt = None, _var_like()
    elif case == "var_vae":
        vq, gpt = {**vq, "quantize.quant_resi.qresi_ls.0.weight": np.zeros((8, 8, 3, 3), np.float32)}, None
        vq = {k.replace("conv_blocks.", "down."): v for k, v in vq.items()}
    elif case == "taming":
        vq, gpt = {"encoder.conv_in.weight": np.zeros((32, 3, 3, 3), np.float32),
                   "encoder.down.0.block.0.conv1.weight": np.zeros((32, 32, 3, 3), np.float32),
                   "quantize.embedding.weight": np.zeros((16, 8), np.float32)}, None
    elif case == "t2i":
        gpt = {**_without(gpt, "cls_embedding.embedding_table.weight"),
               "cls_embedding.cap_proj.fc1.weight": np.zeros((64, 32), np.float32)}
    elif case == "missing":
        vq = _without(vq, "decoder.conv_blocks.0.attn.2.proj_out.bias")
    elif case == "extra":
        gpt["layers.0.attention.extra"] = np.zeros(3, np.float32)
    elif case == "shape":
        vq["quant_conv.bias"] = np.zeros(9, np.float32)
    elif case == "pair":
        gpt["tok_embeddings.weight"] = gpt["tok_embeddings.weight"][:32]
        gpt["output.weight"] = gpt["output.weight"][:32]
    elif case == "heads":
        kwargs.pop("num_heads")
    elif case == "bad_heads":
        kwargs["num_heads"] = 6
    elif case == "classes":
        kwargs["num_classes"] = 20
    elif case == "config":
        vq, kwargs["config"] = None, "generators/llamagen:L"
    elif case == "vq_config":
        gpt, kwargs["config"] = None, "tokenizers/llamagen_vq16"
    elif case == "decoder":  # the decoder's first (lowest-resolution) level narrower than the encoder's last
        vq["decoder.conv_blocks.0.res.0.conv1.weight"] = np.zeros((64, 128, 3, 3), np.float32)
        gpt = None
    elif case == "other":
        vq, gpt = None, {"layers.0.attention.wqkv.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(convert_workdir.ConversionError, match=match) as info:
        convert_llamagen.convert(vq, gpt, **kwargs)
    assert str(info.value).count(". ") == 0  # one sentence


def test_unreadable_files_are_refused(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass the path of a \.pth or \.safetensors"):
        convert_llamagen.read(str(tmp_path / "missing.pt"))
    torch.save({"model": {"w": torch.zeros(2)}, "args": fractions.Fraction(1, 3)}, tmp_path / "pickled.pt")
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+pickled\.pt cannot be read with torch\.load\("
                       r"weights_only=True\): it holds a pickled fractions\.Fraction object, and vqgen never unpickles "
                       r"arbitrary objects; pass a file that holds only tensors"):
        convert_llamagen.read(str(tmp_path / "pickled.pt"))
    data = files["vq16"].read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+truncated\.pt cannot be read with torch\.load\("
                       r"weights_only=True\), it is truncated or not a PyTorch file \(.*\); download it again or pass "
                       r"the weights file itself\.$"):
        convert_llamagen.read(str(tmp_path / "truncated.pt"))


def test_command_line_error_is_one_line(files, tmp_path):
    cmd = [sys.executable, "-m", "vqgen.convert.llamagen", "--vq", str(files["gpt"]), "--out", str(tmp_path / "wd")]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: gpt.pt is a LlamaGen GPT state dict, not the VQ tokenizer; pass it as --gpt."]
    assert not (tmp_path / "wd").exists()
