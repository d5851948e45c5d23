"""Open-MAGVIT2 AR converter: the converted factorised GPT against the official code's outputs.

The fixture (``tests/fixtures/open_magvit2_ar/open_magvit2_ar_tiny.npz``, made by
``tools/make_open_magvit2_ar_fixture.py`` from a TencentARC/SEED-Voken checkout) holds the official
``GPT(token_factorization=True)`` at a tiny size (2 spatial and 2 factorised layers, width 64, 4
heads, 10 classes and the CFG null row, ``factorized_bits=[4, 6]`` over an 8x8 grid): a manifest
from which its random state dict is rebuilt exactly (checked against stored checksums), both
heads' teacher-forced logits, a greedy guided sample of the official KV-cache sampler with its
LFQ codes, and the key layouts of the released B/L/XL. The tokenizer is the tiny official
Open-MAGVIT2 tokenizer of ``tests/fixtures/seed_voken`` (10-bit LFQ, 8x8 tokens of 32x32 images).
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
from vqgen.convert import open_magvit2_ar as om2  # noqa: E402
from vqgen.convert import seed_voken  # noqa: E402
from vqgen.convert import workdir as convert_workdir  # noqa: E402
from vqgen.generators import gpt_factorized as fg  # noqa: E402
from vqgen.quantizers.lfq import join_factorized_ids  # noqa: E402
from vqgen.train import builders  # noqa: E402
from vqgen.train import generator as generator_lib  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "open_magvit2_ar" / "open_magvit2_ar_tiny.npz"
TOKENIZER_FIXTURE = FIXTURES / "seed_voken" / "seed_voken_tiny.npz"
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
TINY = dict(num_heads=4)  # what the tiny file does not say about itself (width 64 is not 64-wide heads)
BITS = (4, 6)
GREEDY = fg.SamplerOptions(top_k=1, cfg_scale=1.5, post_cfg_scale=2.5)  # the fixture's official settings


def _load(path: Path) -> dict:
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    return data


@pytest.fixture(scope="module")
def fx() -> dict:
    return _load(FIXTURE)


def _draw(rs: np.random.RandomState, entries) -> dict[str, np.ndarray]:
    out = {}
    for key, shape, scale, offset, checksum in entries:
        w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
        assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{key} differs"
        out[key] = w
    return out


@pytest.fixture(scope="module")
def ar_state(fx) -> dict[str, np.ndarray]:
    """The official transformer's state dict (the ``GPT`` module's own key names)."""
    return _draw(np.random.RandomState(fx["manifest"]["seed"]), fx["manifest"]["params"])


@pytest.fixture(scope="module")
def tok_states() -> dict[str, dict[str, np.ndarray]]:
    """The seed_voken fixture's Lightning state dicts (``magvit2``, ``ibq``), drawn in its order."""
    tfx = _load(TOKENIZER_FIXTURE)
    rs = np.random.RandomState(tfx["manifest"]["seed"])
    out = {}
    for family in ("magvit2", "ibq"):
        entry = tfx["manifest"]["models"][family]
        out[family] = {**_draw(rs, entry["params"]), **{k: tfx[f"{family}/buffer/{k}"] for k in entry["buffers"]}}
    return out


def _raw_tokenizer(tok_state) -> dict[str, np.ndarray]:
    """The tokenizer as the AR Lightning module holds it: raw encoder/decoder weights, no EMA, no loss."""
    return {k: v for k, v in tok_state.items() if k.startswith(("encoder.", "decoder."))}


def _tensors(state: dict[str, np.ndarray], prefix: str = "") -> dict:
    return {prefix + k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def _ckpt(state: dict, path: Path) -> Path:
    torch.save({"epoch": 299, "global_step": 500_000, "state_dict": state,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4}]}]}, path)
    return path


@pytest.fixture(scope="module")
def files(ar_state, tok_states, tmp_path_factory) -> dict[str, Path]:
    """The files the official code writes: the AR ``Net2NetTransformer`` checkpoint (``transformer.*``
    and the tokenizer it decodes with as ``first_stage_model.*``) and the tokenizer's own checkpoint."""
    root = tmp_path_factory.mktemp("om2_ar_files")
    ar = {**_tensors(ar_state, "transformer."), **_tensors(_raw_tokenizer(tok_states["magvit2"]), "first_stage_model.")}
    ema = {**_tensors({k: 0.5 * v for k, v in ar_state.items()}, "transformer."),
           **{om2.ema_key(k): torch.from_numpy(v) for k, v in ar_state.items()},
           "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(100, dtype=torch.int32)}
    return {"ar": _ckpt(ar, root / "AR_256_B.ckpt"), "ema": _ckpt(ema, root / "ar_ema.ckpt"),
            "tokenizer": _ckpt(_tensors(tok_states["magvit2"]), root / "imagenet_256_L.ckpt"),
            "bare": _ckpt(_tensors(ar_state), root / "gpt.pt")}


@pytest.fixture(scope="module")
def tokenizer(tok_states) -> om2.TokenizerSource:
    return om2._tokenizer_from_state(tok_states["magvit2"], "imagenet_256_L.ckpt", use_ema=True, image_size=32,
                                     dtype="float32")


@pytest.fixture(scope="module")
def converted(ar_state, tokenizer) -> om2.Converted:
    return om2.convert(ar_state, tokenizer, dtype="float32", **TINY)


def _generator(conv):
    _, model = generator_lib.build_model(conv.config)  # the model the written config builds
    params = convert_workdir.match_tree(conv.generator_params, parallel.unbox(fg.abstract_params(model)), "generator")
    return model, params


def _one_device_env() -> dict[str, str]:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags}


# --------------------------------------------------------------------------- golden outputs


def test_inferred_sizes_and_config(converted):
    info, config = converted.info, converted.config
    assert (info.depth, info.factorized_depth, info.width, info.num_heads, info.num_kv_heads, info.hidden_dim) == (
        2, 2, 64, 4, 4, 256)
    assert (info.factorized_bits, info.num_classes, info.null_class, info.has_ema, converted.ema) == (
        BITS, 10, True, False, False)
    assert converted.config_name == "generators/open_magvit2_ar:B"  # the nearest released width
    gen = config.generator
    assert (gen.arch, gen.depth, gen.factorized_depth, gen.width, gen.num_heads, tuple(gen.factorized_bits),
            gen.bit_order, gen.dtype) == ("gpt_factorized", 2, 2, 64, 4, BITS, "lsb", "float32")
    q = config.tokenizer.quantizer
    assert (q.type, q.dim, q.bit_order, config.tokenizer.dtype) == ("lfq", 10, "lsb", "float32")
    assert (config.data.image_size, config.data.num_classes) == (32, 10)
    spec = builders.token_spec(config)
    assert (spec.grid, spec.vocab_size) == ((8, 8), 1024)
    s = config.sample  # the released B's settings
    assert (s.temperature, s.post_temperature, s.cfg_scale, s.post_cfg_scale, s.use_ema) == (1.0, 1.0, 1.9, 2.0, False)


def test_teacher_forced_logits_match_official(converted, fx):
    model, params = _generator(converted)
    tokens = join_factorized_ids((jnp.asarray(fx["pre"]), jnp.asarray(fx["post"])), 10, BITS, "lsb")
    logits_pre, logits_post = jax.jit(lambda p: model.apply({"params": p}, tokens, jnp.asarray(fx["labels"])))(params)
    np.testing.assert_allclose(np.asarray(logits_pre), fx["logits_pre"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logits_post), fx["logits_post"], atol=ATOL, rtol=0)


def test_kv_cache_sampling_matches_official_with_its_bit_order(converted, fx):
    """Greedy guided KV-cache sampling gives the official sampler's sub-ids, joined in Open-MAGVIT2's
    bit order: the vqgen LFQ decodes the ids to the codes the official LFQ gives for the sub-ids."""
    model, params = _generator(converted)
    ids = np.asarray(fg.sample(model, params, fx["sample_labels"], jax.random.key(0), GREEDY))
    official = np.asarray(join_factorized_ids((fx["sample_pre"], fx["sample_post"]), 10, BITS, "lsb"))
    np.testing.assert_array_equal(ids, official)
    np.testing.assert_array_equal(ids % 16, fx["sample_pre"])  # lsb: the first head's sub-id is the low 4 bits
    quantizer = builders.build_quantizer(converted.config.tokenizer.quantizer, jnp.float32)
    codes = quantizer.apply({}, jnp.asarray(ids.reshape(-1, 8, 8)), method="decode_indices")  # [B, 8, 8, 10]
    np.testing.assert_array_equal(np.asarray(codes), np.transpose(fx["sample_codes"], (0, 2, 3, 1)))


# ------------------------------------------------------------------------------ released sizes


def _fake(layout) -> dict[str, np.ndarray]:
    return {k: np.broadcast_to(np.float32(0), shape) for k, shape in layout}


@pytest.mark.parametrize("variant", ["B", "L", "XL"])
def test_released_sizes_give_the_released_configs(fx, variant):
    """Each released key layout (from the official code) passes the manifest with the default heads,
    gives ``generators/open_magvit2_ar:<variant>`` and a model of the official parameter count."""
    released = fx["manifest"]["released"][variant]
    info = om2.inspect(_fake(released["keys"]), f"AR_256_{variant}.ckpt")
    arch = fg.VARIANTS[variant]
    assert (info.depth, info.factorized_depth, info.width, info.num_heads, info.variant) == (
        arch["depth"], arch["factorized_depth"], arch["width"], arch["num_heads"], variant)
    assert (info.factorized_bits, info.num_classes, info.null_class, info.num_kv_heads) == ((6, 12), 1000, True,
                                                                                            info.num_heads)
    base = config_lib.load_config(f"generators/open_magvit2_ar:{variant}")
    config, spec = om2.make_config(info, base)
    assert spec == f"generators/open_magvit2_ar:{variant}"
    assert json.loads(config.to_json()) == json.loads(base.to_json())
    _, model = generator_lib.build_model(config)
    assert fg.count_params(model) == released["num_params"]


# ----------------------------------------------------------------------------------- workdir


@pytest.fixture(scope="module")
def workdir(files, tmp_path_factory) -> Path:
    """The AR checkpoint with its own first_stage_model as the tokenizer, through the command line
    (one device; the tests load it on eight)."""
    out = tmp_path_factory.mktemp("om2_ar_workdir") / "wd"
    cmd = [sys.executable, "-m", "vqgen.convert.open_magvit2_ar", "--ckpt", str(files["ar"]), "--tokenizer",
           str(files["ar"]), "--out", str(out), "--num-heads", "4", "--image-size", "32", "--dtype", "float32"]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (
        f"wrote {out}: generator (Open-MAGVIT2 AR (2+2 layers, width 64): 2 spatial + 2 factorised layers, width 64, "
        "4 heads, sub-ids of 4+6 bits, 10 classes, raw weights) and tokenizer (Open-MAGVIT2 tokenizer f4 with 10-bit "
        "LFQ from the AR checkpoint's first_stage_model, raw weights) for 32px images (8x8 tokens), config "
        "generators/open_magvit2_ar:B with the sizes of the files")
    return out


def test_workdir_samples_through_the_api_and_mode_sample(workdir, fx, tok_states, tmp_path):
    gen = vqgen.load_generator(str(workdir))
    assert gen.tokenizer is not None
    tokens = gen.sample_tokens(fx["sample_labels"], jax.random.key(0), top_k=1, post_top_k=1, cfg_scale=1.5,
                               post_cfg_scale=2.5)
    official = np.asarray(join_factorized_ids((fx["sample_pre"], fx["sample_post"]), 10, BITS, "lsb"))
    np.testing.assert_array_equal(np.asarray(tokens).reshape(len(tokens), -1), official)
    # The tokenizer written is the raw one the AR checkpoint holds.
    raw = seed_voken.convert(tok_states["magvit2"], use_ema=False, image_size=32, dtype="float32")
    got = jax.tree.map(np.asarray, jax.device_get(gen._trained.tokenizer.params))
    jax.tree.map(np.testing.assert_array_equal, got, convert_workdir.match_tree(raw.tokenizer_params, got, "tok"))
    # --mode=sample on the converted workdir (a copy with a small sample section).
    config = load_config_from_workdir(str(workdir))
    with config.unlocked():
        config.sample.per_class, config.sample.batch_size = 1, 10
    shutil.copytree(workdir, tmp_path / "wd")
    vqgen.run(config, str(tmp_path / "wd"), mode="sample")
    with np.load(tmp_path / "wd" / "samples" / "samples.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.sort(labels), np.arange(10))


def test_tokenizer_from_its_checkpoint_or_a_workdir(files, tok_states, tmp_path):
    one_device = parallel.create_mesh((1, 1, 1), jax.devices()[:1])
    # The tokenizer's own checkpoint: its EMA weights.
    conv = om2.convert_files(str(files["bare"]), str(files["tokenizer"]), str(tmp_path / "a"), image_size=32,
                             dtype="float32", mesh=one_device, **TINY)
    ema = seed_voken.convert(tok_states["magvit2"], use_ema=True, image_size=32, dtype="float32")
    jax.tree.map(np.testing.assert_array_equal, conv.tokenizer.params, ema.tokenizer_params)
    assert "EMA weights" in conv.tokenizer.description
    # A workdir holding only the tokenizer: the generator is added to it, or both go to a new one.
    seed_voken.convert_files(str(files["tokenizer"]), str(tmp_path / "tok"), image_size=32, dtype="float32",
                             mesh=one_device)
    om2.convert_files(str(files["ar"]), str(tmp_path / "tok"), str(tmp_path / "tok"), dtype="float32",
                      mesh=one_device, **TINY)
    assert sorted(os.listdir(tmp_path / "tok" / "checkpoints")) == ["generator", "tokenizer"]
    om2.convert_files(str(files["ar"]), str(tmp_path / "tok"), str(tmp_path / "b"), dtype="float32",
                      mesh=one_device, **TINY)
    for name in ("tok", "b"):
        config = load_config_from_workdir(str(tmp_path / name))
        assert config.generator.arch == "gpt_factorized" and config.tokenizer.quantizer.bit_order == "lsb"
    gen = vqgen.load_generator(str(tmp_path / "b"))
    got = jax.tree.map(np.asarray, jax.device_get(gen._trained.tokenizer.params))
    jax.tree.map(np.testing.assert_array_equal, got, convert_workdir.match_tree(ema.tokenizer_params, got, "tok"))


def test_ema_weights_first_then_raw(files, fx, tokenizer):
    state = convert_workdir.load_state_dict(str(files["ema"]), om2.WRAPPERS)
    conv = om2.convert(state, tokenizer, dtype="float32", **TINY)
    assert conv.info.has_ema and conv.ema
    model, params = _generator(conv)
    tokens = join_factorized_ids((jnp.asarray(fx["pre"]), jnp.asarray(fx["post"])), 10, BITS, "lsb")
    logits_pre, _ = model.apply({"params": params}, tokens, jnp.asarray(fx["labels"]))
    np.testing.assert_allclose(np.asarray(logits_pre), fx["logits_pre"], atol=ATOL, rtol=0)
    raw = om2.convert(state, tokenizer, dtype="float32", use_ema=False, **TINY)
    assert not raw.ema
    np.testing.assert_array_equal(raw.generator_params["pre_emb"]["embedding"],
                                  0.5 * conv.generator_params["pre_emb"]["embedding"])


# ------------------------------------------------------------------------------- refusals


def _without(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize("case,match", [
    ("tokenizer", r"is a tokenizer state dict, not the AR transformer; pass it as --tokenizer"),
    ("llamagen", r"is a LlamaGen GPT state dict; convert it with python -m vqgen.convert.llamagen\.$"),
    ("missing", r"is not a SeedVoken Open-MAGVIT2 AR \(2\+2 layers, width 64\) state dict: missing 1 key "
                r"\(factorized_blocks\.1\.ffn_norm\.weight\)\.$"),
    ("rows", r"pre_emb\.weight has 12 rows, not a power of two"),
    ("heads", r"has width 64, which 3 heads do not divide; pass the head count"),
    ("extra", r"holds 1 key\(s\) that are neither the transformer, its EMA nor the tokenizer \(permuter\.table\)"),
])
def test_bad_checkpoints_are_refused_in_one_sentence(ar_state, tok_states, tokenizer, case, match):
    state, kw = dict(ar_state), dict(TINY)
    if case == "tokenizer":
        state = tok_states["magvit2"]
    elif case == "llamagen":
        state = {"tok_embeddings.weight": np.zeros((16, 8), np.float32), "layers.0.attention.wo.weight": np.zeros(1)}
    elif case == "missing":
        state = _without(state, "factorized_blocks.1.ffn_norm.weight")
    elif case == "rows":
        state["pre_emb.weight"] = np.zeros((12, 64), np.float32)
    elif case == "heads":
        kw["num_heads"] = 3
    elif case == "extra":
        state = {**{"transformer." + k: v for k, v in state.items()}, "permuter.table": np.zeros(3, np.float32)}
    with pytest.raises(convert_workdir.ConversionError, match=match):
        om2.convert(state, tokenizer, dtype="float32", **kw)


def test_a_tokenizer_that_does_not_fit_is_refused(ar_state, tok_states, tokenizer):
    def source(**quantizer):
        config = config_lib.load_config("tokenizers/open_magvit2")
        convert_workdir.set_fields(config.tokenizer.quantizer, **quantizer)
        return om2.TokenizerSource(config, None, "test")

    with pytest.raises(convert_workdir.ConversionError, match=r"tok has 18-bit codes but the AR checkpoint cuts "
                       r"10-bit ids into \(4, 6\); pass the tokenizer the AR model was trained with\.$"):
        om2.convert(ar_state, source(bit_order="lsb"), tokenizer_name="tok", **TINY)
    with pytest.raises(convert_workdir.ConversionError, match=r"numbers its codes most significant bit first"):
        om2.convert(ar_state, source(dim=10, bit_order="msb"), tokenizer_name="tok", **TINY)
    with pytest.raises(convert_workdir.ConversionError, match=r"is an IBQ tokenizer, but Open-MAGVIT2's AR models "
                       r"read the ids of an Open-MAGVIT2 \(LFQ\) tokenizer"):
        om2._tokenizer_from_state(tok_states["ibq"], "ibq.ckpt", use_ema=True, image_size=32, dtype="float32")
    bare = {"transformer." + k: v for k, v in ar_state.items()}
    with pytest.raises(convert_workdir.ConversionError, match=r"is an AR checkpoint without its tokenizer"):
        om2._tokenizer_from_state(bare, "ar.ckpt", use_ema=True, image_size=32, dtype="float32")


def test_command_line_error_is_one_line(files, tmp_path):
    cmd = [sys.executable, "-m", "vqgen.convert.open_magvit2_ar", "--ckpt", str(files["tokenizer"]), "--tokenizer",
           str(files["tokenizer"]), "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: imagenet_256_L.ckpt is a tokenizer state dict, not the AR transformer; pass it as --tokenizer and the "
        "AR checkpoint (AR_256_B.ckpt ...) as --ckpt."]
    assert not (tmp_path / "x").exists()
