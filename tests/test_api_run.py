"""The public API the notebooks use besides loading: ``vqgen.run`` (a phase of the command line
from Python), ``vqgen.load_images`` (a config's data as the tokenizers read it) and
``Generator.edit_tokens`` (MaskGIT editing), on a tiny MaskGIT workdir."""
import json

import jax
import numpy as np
import pytest

import tiny_config
import vqgen
from vqgen.train import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MaskGIT workdir trained through ``vqgen.run``, with the report of each phase."""
    path = tmp_path_factory.mktemp("api_run")
    config = tiny_config.get_config("maskgit")
    reports = {mode: vqgen.run(config, str(path), mode=mode) for mode in ("train_tokenizer", "train_generator")}
    return path, config, reports


def test_run_trains_each_phase_and_returns_the_report(trained):
    path, config, reports = trained
    assert reports["train_tokenizer"]["tokenizer"]["steps"] == config.tokenizer_train.num_steps
    assert "generator" not in reports["train_tokenizer"]
    assert reports["train_generator"]["generator"]["steps"] == config.generator_train.num_steps
    assert reports["train_generator"] == json.loads((path / "report.json").read_text())
    # running it again resumes: nothing is retrained, the report stays
    assert vqgen.run(config, str(path), mode="train_generator")["generator"] == reports["train_generator"]["generator"]


def test_run_by_name_summary_and_bad_mode(tmp_path):
    counts = vqgen.run("quickstart:maskgit", str(tmp_path), mode="summary")
    assert set(counts) == {"tokenizer_params", "generator_params"} and min(counts.values()) > 0
    assert not list(tmp_path.iterdir())  # summary writes nothing
    with pytest.raises(ValueError, match="unknown --mode='sampel'"):
        vqgen.run("quickstart", str(tmp_path), mode="sampel")


def test_load_images_are_the_tokenizers_input():
    config = tiny_config.get_config()
    images, labels = vqgen.load_images(config, "test", 12)
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32, 1)
    assert labels.dtype == np.int32 and labels.shape == (12,) and labels.max() < 10
    held_out = tokenizer_lib.eval_images(config, "test", 12)
    np.testing.assert_array_equal(images.astype(np.float32) / 127.5 - 1.0, held_out["image"])
    np.testing.assert_array_equal(labels, held_out["label"])
    assert vqgen.load_images("quickstart", "train", 3)[0].shape == (3, 32, 32, 1)
    with pytest.raises(ValueError, match="split='val' is not a split"):
        vqgen.load_images(config, "val", 3)


def test_edit_tokens_keeps_the_given_region(trained):
    path, config, _ = trained
    gen = vqgen.load_generator(str(path))
    images, labels = vqgen.load_images(config, "test", 4)
    tokens = gen.tokenizer.encode(images)  # [4, h, w]
    keep = np.zeros(tokens.shape, bool)
    keep[:, :, : tokens.shape[2] // 2] = True  # the left half is given, the right half is generated
    key = jax.random.key(3)
    edited = gen.edit_tokens(tokens, keep, labels, key, num_steps=4)
    assert edited.shape == tokens.shape and edited.dtype == np.int32
    np.testing.assert_array_equal(edited[keep], tokens[keep])
    assert edited.min() >= 0 and edited.max() < gen.spec.vocab_size
    np.testing.assert_array_equal(edited, gen.edit_tokens(tokens, keep, labels, key, num_steps=4))
    # nothing given: exactly class-conditional sampling with the same key and options
    np.testing.assert_array_equal(gen.edit_tokens(tokens, np.zeros_like(keep), labels, key, num_steps=4),
                                  gen.sample_tokens(labels, key, num_steps=4))
    # everything given: the tokens themselves
    np.testing.assert_array_equal(gen.edit_tokens(tokens, np.ones_like(keep), labels, key, num_steps=4), tokens)
    assert gen.tokenizer.decode(edited).shape == images.shape
    with pytest.raises(ValueError, match="must both have shape"):
        gen.edit_tokens(tokens[:, :2], keep[:, :2], labels, key)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\)"):
        gen.edit_tokens(tokens, keep, labels + 10, key)
