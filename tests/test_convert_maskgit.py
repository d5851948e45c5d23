"""MaskGIT converter: converted tokenizers and transformers against the official MaskGIT code's outputs.

The fixture (``tests/fixtures/maskgit/maskgit_tiny.npz``, made by ``tools/make_maskgit_fixture.py``
from a google-research/maskgit checkout) holds the outputs of the official Flax models and a
manifest from which their random parameter trees are rebuilt exactly (``numpy.random.RandomState``
draws, checked against stored checksums): ``tok`` (the released multipliers 1,1,2,2,4 and 2 res
blocks at 32 filters, 64 codes of width 16, 64x64 images, 4x4 tokens), ``tok_b`` (multipliers
1,2,4, 1 res block, 32 codes of width 8, 32x32 images) and ``transformer`` (2 layers, width 64,
4 heads, 64 codes + 10 classes + the mask token, 4x4 grid). The test writes each tree as the
released files are written (``flax.serialization`` msgpack bytes of ``{"params": tree}``). The
manifest also lists the parameter paths and shapes of the released checkpoints.
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
from flax import serialization, traverse_util

import vqgen
from vqgen import config_lib, parallel
from vqgen.api import load_config_from_workdir
from vqgen.convert import maskgit as convert_maskgit
from vqgen.convert import workdir as convert_workdir
from vqgen.generators import maskgit as maskgit_lib
from vqgen.tokenizers import vqgan
from vqgen.train import builders
from vqgen.train import generator as generator_lib

FIXTURE = Path(__file__).parent / "fixtures" / "maskgit" / "maskgit_tiny.npz"
ATOL = 1e-4
REPO = Path(__file__).resolve().parent.parent
FILES = {"tok": "tokenizer_imagenet64_checkpoint", "tok_b": "tokenizer_b_checkpoint",
         "transformer": "maskgit_imagenet64_checkpoint"}


@pytest.fixture(scope="module")
def fx() -> dict:
    with np.load(FIXTURE) as f:
        data = {k: f[k] for k in f.files}
    data["manifest"] = json.loads(str(data["manifest"]))
    return data


@pytest.fixture(scope="module")
def trees(fx) -> dict[str, dict]:
    """The official parameter trees of ``tok``, ``tok_b`` and ``transformer``, rebuilt from the manifest."""
    rs = np.random.RandomState(fx["manifest"]["seed"])
    out = {}
    for name, entries in fx["manifest"]["models"].items():
        flat = {}
        for key, shape, scale, offset, checksum in entries:
            w = (rs.standard_normal(shape) * scale + offset).astype(np.float32)
            assert np.isclose(np.sum(w, dtype=np.float64), checksum, rtol=1e-9, atol=1e-9), f"{name}: {key} differs"
            flat[key] = w
        out[name] = traverse_util.unflatten_dict(flat, sep="/")
    return out


@pytest.fixture(scope="module")
def files(trees, tmp_path_factory) -> dict[str, Path]:
    """The fixture's models as MaskGIT's released files: ``flax.serialization`` bytes of the variables."""
    root = tmp_path_factory.mktemp("maskgit_files")
    paths = {}
    for name, tree in trees.items():
        paths[name] = root / FILES[name]
        paths[name].write_bytes(serialization.msgpack_serialize({"params": tree}))
    return paths


@pytest.fixture(scope="module")
def flats(files) -> dict[str, dict[str, np.ndarray]]:
    return {name: convert_maskgit.read(str(path)) for name, path in files.items()}


@pytest.fixture(scope="module")
def converted(flats) -> convert_maskgit.Converted:
    return convert_maskgit.convert(flats["tok"], flats["transformer"], dtype="float32")


def _tokenizer(config, tokenizer_params):
    model = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    example = builders.example_shape(config)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + example))["params"]
    return model, convert_workdir.match_tree(tokenizer_params, parallel.unbox(abstract), "tokenizer")


def _one_device_env() -> dict[str, str]:
    """The environment of a user's command line: one CPU device (the tests simulate eight)."""
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return {**os.environ, "XLA_FLAGS": flags}


@pytest.fixture(scope="module")
def one_device():
    """A user's machine: one CPU device (the tests simulate eight)."""
    return parallel.create_mesh((1, 1, 1), jax.devices()[:1])


@pytest.fixture(scope="module")
def written(files, one_device, tmp_path_factory) -> tuple[Path, convert_maskgit.Converted]:
    """Both models converted as the command converts them, with a small GAN discriminator in the
    config's tokenizer training section (it is not converted, only initialised for fine-tuning;
    the paper's takes most of the conversion's time on CPU)."""
    out = tmp_path_factory.mktemp("maskgit_workdir") / "wd"
    tok, tr = (str(files[name]) for name in ("tok", "transformer"))
    conv = convert_maskgit.convert(convert_maskgit.read(tok), convert_maskgit.read(tr), dtype="float32",
                                   paths=(tr, tok), tokenizer_name=FILES["tok"], transformer_name=FILES["transformer"])
    with conv.config.unlocked():
        conv.config.tokenizer_train.disc.ch, conv.config.tokenizer_train.disc.ch_mult = 8, (1, 1)
    convert_workdir.write_workdir(conv.config, str(out), tokenizer_params=conv.tokenizer_params,
                                  generator_params=conv.generator_params, mesh=one_device)
    assert convert_maskgit.describe(conv, str(out)) == [
        f"wrote {out}: tokenizer (MaskGIT VQGAN f16 with 64 codes of width 16, 32 filters) and generator (MaskGIT "
        "transformer (2 layers, width 64): 4 heads, 64 codes, 10 classes) for 64px images (4x4 tokens), config "
        "generators/maskgit:paper with the sizes of the files"]
    return out, conv


@pytest.fixture(scope="module")
def workdir(written) -> Path:
    return written[0]


# --------------------------------------------------------------------------- golden outputs


def test_reads_the_released_file_structure(files, trees, flats, tmp_path):
    want = traverse_util.flatten_dict(trees["transformer"], sep="/")
    assert flats["transformer"].keys() == want.keys()
    assert all(np.array_equal(flats["transformer"][k], want[k]) for k in want)
    bare = tmp_path / "bare"  # a parameter tree without the "params" level reads the same
    bare.write_bytes(serialization.msgpack_serialize(trees["tok_b"]))
    assert convert_maskgit.read(str(bare)).keys() == flats["tok_b"].keys()


def test_inferred_sizes_and_config(converted):
    tok, tr, config = converted.tokenizer, converted.transformer, converted.config
    assert (tok.filters, tok.ch_mult, tok.num_res_blocks, tok.embedding_dim, tok.codebook_size) == (
        32, (1, 1, 2, 2, 4), 2, 16, 64)
    assert (tr.depth, tr.width, tr.num_heads, tr.mlp_dim, tr.vocab_size, tr.positions) == (2, 64, 4, 128, 75, 17)
    assert (tr.num_classes, tr.codebook_size, tr.grid) == (10, 64, 4)  # the vocabulary split by the tokenizer's codes
    assert converted.config_name == "generators/maskgit:paper"
    assert (config.data.image_size, config.data.channels, config.data.num_classes) == (64, 3, 10)  # 4x4 grid x 16
    section = config.tokenizer
    assert (section.ch, tuple(section.ch_mult), section.z_channels, section.embed_dim, section.style) == (
        32, (1, 1, 2, 2, 4), 16, 16, "maskgit")
    assert section.quantizer.codebook_size == 64 and not section.use_quant_conv
    gen = config.generator
    assert (gen.depth, gen.width, gen.num_heads, gen.mlp_dim, gen.class_dropout_prob) == (2, 64, 4, 128, 0.0)
    assert gen.dtype == section.dtype == "float32" and config.sample.cfg_scale == 1.0


@pytest.mark.parametrize("name,suffix", [("tok", ""), ("tok_b", "_b")])
def test_tokens_and_reconstruction_match_official(flats, fx, name, suffix):
    """Tokens (``encode_to_indices``), quantized latents, their decoding and ``decode_from_indices``
    of other codes. The official tokenizer reads and writes [0, 1]; the converted one (pixel_range
    "unit") reads vqgen's [-1, 1] images and returns [-1, 1]."""
    image = fx[f"image{suffix}"]
    conv = convert_maskgit.convert(flats[name], None, image_size=image.shape[1], dtype="float32")
    model, params = _tokenizer(conv.config, conv.tokenizer_params)

    @jax.jit
    def run(p, x, codes):
        recon, q = model.apply({"params": p}, x)
        return {"tokens": q.indices, "quant": q.quantized, "recon": recon,
                "decoded": model.apply({"params": p}, codes, method="decode_indices")}

    out = jax.tree.map(np.asarray, run(params, jnp.asarray(image) * 2.0 - 1.0, jnp.asarray(fx[f"codes{suffix}"])))
    np.testing.assert_array_equal(out["tokens"], fx[f"{name}_tokens"])
    out["recon"], out["decoded"] = (out["recon"] + 1.0) / 2.0, (out["decoded"] + 1.0) / 2.0
    for key in ("quant", "recon", "decoded"):
        np.testing.assert_allclose(out[key], fx[f"{name}_{key}"], atol=ATOL, rtol=0, err_msg=key)


def test_released_checkpoints_give_the_paper_configs(fx):
    """The released files' layouts (from the official modules) pass the manifests and give exactly
    ``generators/maskgit:paper`` (256 px) or it at 512 px, with the manifests' parameter counts."""
    released = {name: {k: np.broadcast_to(np.float32(0), s) for k, s in layout}
                for name, layout in fx["manifest"]["released"].items()}
    tok = convert_maskgit.inspect_tokenizer(released["tokenizer"], "tokenizer_imagenet256_checkpoint")
    assert (tok.filters, tok.ch_mult, tok.num_res_blocks, tok.embedding_dim, tok.codebook_size) == (
        128, (1, 1, 2, 2, 4), 2, 256, 1024)
    paper = config_lib.load_config("generators/maskgit:paper")
    trs = {}
    for size in (256, 512):
        tr = trs[size] = convert_maskgit.inspect_transformer(released[f"maskgit_{size}"],
                                                             codebook_size=tok.codebook_size)
        assert (tr.depth, tr.width, tr.num_heads, tr.mlp_dim, tr.num_classes, tr.grid) == (
            24, 768, 16, 3072, 1000, size // 16)
        config, spec = convert_maskgit.make_config(tok, tr)
        assert spec == "generators/maskgit:paper" and config.data.image_size == size
        with config.unlocked():
            config.data.image_size = 256
        assert config.to_json() == paper.to_json()
    alone = convert_maskgit.inspect_transformer(released["maskgit_256"])  # 1000 ImageNet classes by default
    assert (alone.codebook_size, alone.num_classes) == (1024, 1000)
    config, spec = convert_maskgit.make_config(tok, None, paths=("/ckpt/tokenizer_imagenet512_checkpoint",))
    assert spec == "tokenizers/maskgit_vqgan" and config.data.image_size == 512  # the size in the file's name
    config, _ = convert_maskgit.make_config(tok, None)
    assert config.to_json() == config_lib.load_config(spec).to_json()
    model = builders.build_tokenizer(config.tokenizer, 3)
    counted = sum(int(np.prod(s)) for s in convert_maskgit.tokenizer_manifest(tok).values())
    assert vqgan.count_params(model, 256, 3) == counted == 54_515_587
    _, gen = generator_lib.build_model(paper)
    counted = sum(int(np.prod(s)) for s in convert_maskgit.transformer_manifest(trs[256]).values())
    assert maskgit_lib.count_params(gen) == counted == 172_457_193


# ----------------------------------------------------------------------------------- workdir


def _same_tree(loaded, converted) -> bool:
    a = traverse_util.flatten_dict(parallel.unbox(jax.device_get(loaded)), sep="/")
    b = traverse_util.flatten_dict(converted, sep="/")
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), b[k]) for k in b)


def test_workdir_reproduces_the_official_models(written, fx, one_device):
    """The workdir through the public API: the tokenizer's tokens, the converted weights as written,
    the transformer's logits on a partially masked sequence with a class (the mask written ``-1``
    there, ``mask_token_id = K + C`` here; the class position's logits are not returned), and the
    official decoding's schedule (how many positions stay masked after each step; editing with
    known tokens kept)."""
    workdir, conv = written
    config = load_config_from_workdir(str(workdir))
    with config.unlocked():
        config.tokenizer_train.batch_size = 8  # encoding batch only; not part of the architecture
    tok = vqgen.load_tokenizer(str(workdir), mesh=one_device, config=config)
    np.testing.assert_array_equal(tok.encode(fx["image"] * 2.0 - 1.0), fx["tok_tokens"])  # vqgen's [-1, 1] images
    assert _same_tree(tok._frozen.params, conv.tokenizer_params)

    gen = vqgen.load_generator(str(workdir), mesh=one_device, config=config)
    model, params = gen._trained.model, gen._trained.params
    assert gen.tokenizer is not None and _same_tree(params, conv.generator_params)
    k, classes = 64, 10
    assert (model.mask_token_id, model.vocab_size, model.codebook_size) == (k + classes, k + classes + 1, k)
    ids = fx["input_ids"]
    tokens = np.where(ids[:, 1:] == -1, model.mask_token_id, ids[:, 1:])
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(ids[:, 0] - k))
    np.testing.assert_allclose(np.asarray(logits), fx["logits"][:, 1:], atol=ATOL, rtol=0)
    assert np.array_equal(np.argmax(np.asarray(logits)[..., :k], -1), np.argmax(fx["logits"][:, 1:, :k], -1))

    ids = fx["decode_input_ids"]
    known = ids[:, 1:] != -1
    opts = maskgit_lib.SamplerOptions(num_steps=8, choice_temperature=4.5)
    out, history = maskgit_lib.sample(model, params, ids[:, 0] - k, jax.random.key(0), opts,
                                      known_tokens=np.where(known, ids[:, 1:], 0), known_mask=known,
                                      return_history=True)
    out, history = np.asarray(out), np.asarray(history)
    np.testing.assert_array_equal(history[:, :-1], fx["decode_masked"][:, :-1])
    assert (history[:, -1] == 0).all() and (fx["decode_masked"][:, -1] == 1).all()  # its last iteration's samples
    np.testing.assert_array_equal(out[known], ids[:, 1:][known])
    assert out.min() >= 0 and out.max() < k


def test_tokenizer_only_and_generator_only_conversions(files, tmp_path, one_device):
    gen_only = convert_maskgit.convert_files(None, str(files["transformer"]), str(tmp_path / "gen"), num_classes=10,
                                             mesh=one_device)
    assert os.listdir(tmp_path / "gen" / "checkpoints") == ["generator"]
    config = load_config_from_workdir(str(tmp_path / "gen"))
    assert config.tokenizer.quantizer.codebook_size == 64 and config.data.image_size == 64  # the grid x 16
    assert config.generator.dtype == "bfloat16" and gen_only.tokenizer is None  # the config's
    assert vqgen.load_generator(str(tmp_path / "gen"), mesh=one_device).tokenizer is None
    tok_only = convert_maskgit.convert(convert_maskgit.read(str(files["tok"])), None,
                                       paths=(str(files["tok"]),))
    assert "generator" not in tok_only.config and tok_only.config.data.image_size == 64  # the size in the name


def test_refuses_a_workdir_holding_another_model(workdir, files, tmp_path):
    with pytest.raises(convert_workdir.ConversionError, match=r"already holds a checkpoint; pass a new --out"):
        convert_maskgit.convert_files(str(files["tok_b"]), None, str(workdir), image_size=32)
    # a transformer alone into a workdir holding another model's tokenizer (its config says 128 filters, it has 32)
    shutil.copytree(workdir / "checkpoints" / "tokenizer", tmp_path / "checkpoints" / "tokenizer")
    shutil.copy(workdir / "config.json", tmp_path / "config.json")
    with pytest.raises(convert_workdir.ConversionError, match=r"holds a tokenizer that the converted model's config "
                       r"does not describe \(tokenizer\.ch: checkpoint 32 vs config 128.*\); convert the tokenizer "
                       r"and the generator together into a new --out\.$"):
        convert_maskgit.convert_files(None, str(files["transformer"]), str(tmp_path), num_classes=10)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints", "config.json"]  # nothing written
    assert os.listdir(tmp_path / "checkpoints") == ["tokenizer"]
    assert (tmp_path / "config.json").read_text() == (workdir / "config.json").read_text()


# --------------------------------------------------------------------------------- bad input


def _without(flat, *keys):
    return {k: v for k, v in flat.items() if k not in keys}


@pytest.mark.parametrize("case,match", [
    ("transformer_as_tokenizer", r"^tok is a MaskGIT transformer checkpoint, not the tokenizer; pass it as "
                                 r"--transformer\.$"),
    ("tokenizer_as_transformer", r"^tr is a MaskGIT tokenizer checkpoint, not the transformer; pass it as "
                                 r"--tokenizer\.$"),
    ("missing", r"^tok is not a MaskGIT tokenizer \(VQGAN f16 with 64 codes\) checkpoint: missing 1 key "
                r"\(decoder/ResBlock_3/GroupNorm_1/bias\)\.$"),
    ("extra", r"^tr is not a MaskGIT transformer \(2 layers, width 64\) checkpoint: unexpected 1 key "
              r"\(TransformerLayer_0/extra/kernel\)\.$"),
    ("shape", r"^tok is not a MaskGIT tokenizer \(VQGAN f16 with 64 codes\) checkpoint: wrong shapes "
              r"encoder/Conv_1/bias \(9,\) \(expected \(16,\)\)\.$"),
    ("conv_downsample", r"^tok is a MaskGIT tokenizer built with conv_downsample=True \(3 encoder convs\), which "
                        r"vqgen's MaskGIT VQGAN \(average-pool downsampling, as released\) does not build\.$"),
    ("batchnorm", r"^tok is a MaskGIT tokenizer built with norm_type BN \(BatchNorm_0\), which vqgen does not convert; "
                  r"pass one with GroupNorm \(the released vqgan_config\)\.$"),
    ("positions", r"^tr has 16 position embeddings, which is not one class token and a square token grid; vqgen "
                  r"converts MaskGIT's class-conditional transformer\.$"),
    ("pair", r"^tr has 75 vocabulary rows, which leaves no class besides the 74 codes of tok and the mask token; "
             r"pass the tokenizer the transformer was trained with\.$"),
    ("classes", r"^tr has 75 vocabulary rows, which are 64 codes of tok, 10 classes and the mask token, but "
                r"--num-classes is 1000; drop --num-classes\.$"),
    ("alone", r"^tr has 75 vocabulary rows, which leaves no code besides 1000 classes and the mask token; pass "
              r"--num-classes with the number it was trained with\.$"),
    ("config", r"^tr is a MaskGIT transformer \(2 layers, width 64\) with 4 heads but --config generators/maskgit:cfg "
               r"describes 24 layers of width 768 with 16 heads; pass the matching file or config, or drop "
               r"--config\.$"),
    ("tok_config", r"^--config tokenizers/llamagen_vq16 has no MaskGIT-style VQGAN tokenizer, so it cannot describe "
                   r"tok \(VQGAN f16 with 64 codes\); pass a MaskGIT config or drop --config\.$"),
    ("image_size", r"^tr has a 4x4 token grid \(64px with 16x downsampling\) but --image-size 256 was given; drop "
                   r"--image-size\.$"),
    ("other", r"^tok is not a MaskGIT tokenizer checkpoint: it lacks encoder/Conv_0/kernel, "
              r"encoder/ResBlock_0/Conv_0/kernel, quantizer/codebook, decoder/Conv_0/kernel"),
])
def test_bad_checkpoints_are_refused_in_one_sentence(flats, case, match):
    tok, tr = dict(flats["tok"]), dict(flats["transformer"])
    kwargs = dict(tokenizer_name="tok", transformer_name="tr", dtype="float32")
    if case == "transformer_as_tokenizer":
        tok, tr = tr, None
    elif case == "tokenizer_as_transformer":
        tok, tr = None, tok
    elif case == "missing":
        tok = _without(tok, "decoder/ResBlock_3/GroupNorm_1/bias")
    elif case == "extra":
        tr["TransformerLayer_0/extra/kernel"] = np.zeros((3, 3), np.float32)
    elif case == "shape":
        tok["encoder/Conv_1/bias"] = np.zeros(9, np.float32)
    elif case == "conv_downsample":
        tok["encoder/Conv_2/kernel"] = np.zeros((4, 4, 32, 32), np.float32)
    elif case == "batchnorm":
        tok = {k.replace("GroupNorm_", "BatchNorm_"): v for k, v in tok.items()}
    elif case == "positions":
        tr["Embed_0/position_embeddings/embedding"] = tr["Embed_0/position_embeddings/embedding"][:16]
    elif case == "pair":
        tok["quantizer/codebook"] = np.zeros((74, 16), np.float32)
    elif case == "classes":
        kwargs["num_classes"] = 1000
    elif case == "alone":
        tok = None
    elif case == "config":
        tok, kwargs["config"] = None, "generators/maskgit:cfg"
        kwargs["num_classes"] = 10
    elif case == "tok_config":
        tr, kwargs["config"] = None, "tokenizers/llamagen_vq16"
    elif case == "image_size":
        kwargs["image_size"] = 256
    elif case == "other":  # a taming-style (PyTorch-named) tree
        tok, tr = {"encoder/conv_in/weight": np.zeros((32, 3, 3, 3), np.float32)}, None
    with pytest.raises(convert_workdir.ConversionError, match=match) as info:
        convert_maskgit.convert(tok, tr, **kwargs)
    assert str(info.value).count(". ") == 0  # one sentence


def test_unreadable_files_are_refused(files, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass the path of a MaskGIT checkpoint"):
        convert_maskgit.read(str(tmp_path / "missing_checkpoint"))
    data = files["tok_b"].read_bytes()
    (tmp_path / "truncated").write_bytes(data[: len(data) // 2])
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+truncated cannot be read as Flax msgpack bytes "
                       r"\(flax\.serialization\), it is truncated or not a MaskGIT checkpoint \(.*\); download it "
                       r"again or pass the checkpoint file itself\.$"):
        convert_maskgit.read(str(tmp_path / "truncated"))
    (tmp_path / "zipped.pt").write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+zipped\.pt is a PyTorch \(zip\) file, not the Flax "
                       r"msgpack bytes MaskGIT released; convert PyTorch checkpoints with their family's converter"):
        convert_maskgit.read(str(tmp_path / "zipped.pt"))
    (tmp_path / "state").write_bytes(serialization.msgpack_serialize({"step": 3, "opt_state": {"mu": np.zeros(2)}}))
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+state holds no 'params' tree \(top level: "
                       r"\['opt_state', 'step'\]\); pass a MaskGIT checkpoint"):
        convert_maskgit.read(str(tmp_path / "state"))
    (tmp_path / "list").write_bytes(serialization.msgpack_serialize([np.zeros(2)]))
    with pytest.raises(convert_workdir.ConversionError, match=r"^\S+list holds a list rather than a tree of arrays"):
        convert_maskgit.read(str(tmp_path / "list"))


def test_command_line_error_is_one_line(files, tmp_path):
    """The command as a user runs it (one CPU device): a tokenizer file passed as the transformer."""
    out = tmp_path / "wd"
    cmd = [sys.executable, "-m", "vqgen.convert.maskgit", "--tokenizer", str(files["transformer"]), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_one_device_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: maskgit_imagenet64_checkpoint is a MaskGIT transformer checkpoint, not the tokenizer; pass it as "
        "--transformer."]
    assert not out.exists()
