"""VAR through the one trainer: a multi-scale tokenizer and the next-scale generator trained,
loaded through the public API and sampled (tiny config), the generator phase's loss against the
family's own, and the sentences for a family that does not fit its tokenizer."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config
import vqgen
from vqgen import parallel
from vqgen.generators import var
from vqgen.train import builders
from vqgen.train import generator as generator_lib
from vqgen.train import run as run_lib
from vqgen.train import tokenizer as tokenizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALES = (1, 2, 4, 8)
L = sum(s * s for s in SCALES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("var")
    config = tiny_config.get_config("var")
    for mode in ("train_tokenizer", "train_generator", "sample"):
        assert run_lib.run(config, str(path), mode) == 0
    return path


def test_token_spec_of_a_pyramid():
    spec = builders.token_spec(tiny_config.get_config("var"))
    assert spec.scales == SCALES and spec.grid == (8, 8) and spec.seq_len == L and spec.token_shape == (L,)
    assert spec.code_dim == 4 and spec.vocab_size == 32
    flat = builders.token_spec(tiny_config.get_config("gpt"))
    assert flat.scales is None and flat.token_shape == flat.grid
    maps = tuple(jnp.arange(2 * s * s).reshape(2, s, s) for s in SCALES)
    back = builders.split_pyramid(builders.flat_indices(maps), SCALES)
    assert all(np.array_equal(a, b) for a, b in zip(maps, back))


def test_trained_workdir_through_the_public_api(workdir):
    tok = vqgen.load_tokenizer(str(workdir))
    config = tiny_config.get_config("var")
    images = tokenizer_lib.eval_images(config, "test", 6)["image"]
    tokens = tok.encode(images)
    assert tokens.shape == (6, L) and tokens.dtype == np.int32 and 0 <= tokens.min() and tokens.max() < 32
    # the pyramid is the quantizer's maps joined: the last 64 ids are the 8x8 map of the full-size scale
    frozen = tokenizer_lib.load_frozen_tokenizer(config, str(workdir))
    _, ids = frozen.reconstruct(images)
    np.testing.assert_array_equal(ids, tokens)
    recon = tok.decode(tokens)
    assert recon.shape == (6, 32, 32, 1) and recon.dtype == np.uint8
    # the full prefix is the full decode; coarser prefixes differ from it
    full = frozen.decode(tokens)
    np.testing.assert_allclose(frozen.decode_scales(tokens, len(SCALES)), full, atol=1e-5)
    assert np.abs(frozen.decode_scales(tokens, 1) - full).max() > 1e-3
    with pytest.raises(ValueError, match=r"num_scales=5 must lie in \[1, 4\]"):
        frozen.decode_scales(tokens, 5)

    gen = vqgen.load_generator(str(workdir))
    codes = gen.sample_tokens([0, 1, 2], jax.random.key(3), top_k=8)
    assert codes.shape == (3, L) and codes.max() < 32
    np.testing.assert_array_equal(codes, gen.sample_tokens([0, 1, 2], jax.random.key(3), top_k=8))
    assert gen.sample([4, 5], jax.random.key(0)).shape == (2, 32, 32, 1)

    report = json.load(open(os.path.join(workdir, "report.json")))
    by_scale = report["tokenizer"]["psnr_by_scale"]
    assert len(by_scale) == len(SCALES) and by_scale[-1] == pytest.approx(report["tokenizer"]["psnr"], abs=1e-3)
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
        assert f["images"].shape == (20, 32, 32, 1)


def test_generator_phase_step_is_the_family_loss_with_the_quantizer_as_frozen_input(workdir):
    """The phase computes VAR's teacher-forcing input from the frozen quantizer params inside the
    step: its loss equals ``var.loss_fn`` on an explicitly built ``x_input``."""
    config = tiny_config.get_config("var")
    phase = generator_lib.build(config)
    (vq_abstract,) = phase.frozen
    tok = tokenizer_lib.load_frozen_tokenizer(config, str(workdir))
    vq = tok.params["quantizer"]
    assert jax.tree.map(lambda a: a.shape, vq) == jax.tree.map(lambda a: a.shape, vq_abstract)
    with pytest.raises(ValueError, match="reads the tokenizer's quantizer"):
        phase.load_frozen()
    state = parallel.unbox(phase.init(jax.random.key(0)))
    images = tokenizer_lib.eval_images(config, "train", 8)
    tokens = jnp.asarray(tok.encode(images["image"]))
    batch = {"tokens": tokens, "label": jnp.asarray(images["label"], jnp.int32)}
    _, metrics = phase.step(state, batch, jax.random.key(1), vq)
    family, model = generator_lib.build_model(config)
    codec = var.quantizer_codec(tok.model.quantizer)
    x_input = var.teacher_forcing_input(tokens, vq, codec)
    rng = jax.random.fold_in(jax.random.key(1), 0)
    loss, _ = var.loss_fn(model, state.params, {**batch, "x_input": x_input}, rng)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)


def test_a_family_that_does_not_fit_its_tokenizer_is_one_sentence():
    gpt_over_pyramid = tiny_config.get_config("var")
    gpt_over_pyramid.unlock()
    gpt_over_pyramid.generator = tiny_config.get_config("gpt").generator
    with pytest.raises(ValueError, match=r"gives a token pyramid over scales \(1, 2, 4, 8\).*use generator.arch='var'"):
        generator_lib.build_model(gpt_over_pyramid)
    var_over_grid = tiny_config.get_config("gpt")
    var_over_grid.unlock()
    var_over_grid.generator = tiny_config.get_config("var").generator
    with pytest.raises(ValueError, match=r"use tokenizer.quantizer.type='msrq'"):
        generator_lib.build_model(var_over_grid)
    other_scales = tiny_config.get_config("var")
    other_scales.unlock()
    other_scales.generator.scales = (1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"generator.scales=\(1, 2, 3, 8\) differs from the tokenizer's \(1, 2, 4, 8\)"):
        generator_lib.build_model(other_scales)


def test_cli_scale_list_not_ending_at_the_grid(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.path.join(ROOT, "tests"))
    out = subprocess.run([sys.executable, "-m", "vqgen.main", "--config=tests/tiny_config.py:var",
                          f"--workdir={tmp_path / 'w'}", "--config.tokenizer.quantizer.scales=(1,2,4)"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    err = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "end at 4 but the feature map (the token grid) is 8x8; make the last scale 8" in err[0]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w" / "config.json").exists()
