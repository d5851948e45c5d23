"""MAR through the one trainer: a KL-VAE trained by the tokenizer phase, its posteriors cached,
MAR trained on latents drawn from them, sampled, decoded, judged and loaded through the public API
(tiny config); the generator phase's loss against the family's own; the trainer side of a family
over pixels (a toy family: no tokenizer phase, samples without a decode); and the sentences for a
family that does not fit its tokenizer."""
import dataclasses
import functools
import json
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tiny_config
import vqgen
from vqgen import config_lib, generators, parallel
from vqgen.data import tokens as token_data
from vqgen.generators import mar, sampling
from vqgen.train import builders
from vqgen.train import generator as generator_lib
from vqgen.train import run as run_lib
from vqgen.train import tokenizer as tokenizer_lib

GRID, WIDTH = (8, 8), 4


def _config():
    config = tiny_config.get_config("mar")
    with config.unlocked():
        config.evaluate.judge = False  # the judge's own training is tested with the GPT (test_train_generator.py)
    return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mar")
    assert run_lib.run(_config(), str(path), "all") == 0
    return path


def test_token_spec_of_a_kl_tokenizer():
    config = tiny_config.get_config("mar")
    spec = builders.token_spec(config)
    assert spec.kind == "latents" and spec.grid == GRID and spec.latent_dim == WIDTH and spec.vocab_size is None
    assert spec.token_shape == GRID + (WIDTH,) and spec.seq_len == 64
    assert spec.latent_scale == config.tokenizer.scale_factor
    assert builders.input_spec(config) == spec and builders.generator_kind(config) == "latents"
    assert builders.token_spec(tiny_config.get_config("gpt")).kind == "tokens"


@pytest.mark.slow  # the tiny MAR workdir: ~1-2 min on an idle 2-core CPU, 13 min under load
def test_trained_workdir_through_the_public_api(workdir):
    config = tiny_config.get_config("mar")
    scale = config.tokenizer.scale_factor
    images = tokenizer_lib.eval_images(config, "test", 6)["image"]
    tok = vqgen.load_tokenizer(str(workdir))
    latents = tok.encode(images)
    assert latents.shape == (6,) + GRID + (WIDTH,) and latents.dtype == np.float32
    frozen = tokenizer_lib.load_frozen_tokenizer(config, str(workdir))
    mean, logvar = frozen.posterior(images)
    np.testing.assert_allclose(latents, scale * mean, rtol=1e-5, atol=1e-6)  # encode: the scaled mean
    assert np.all(logvar >= -30) and np.all(logvar <= 20)
    recon = tok.decode(latents)
    assert recon.shape == (6, 32, 32, 1) and recon.dtype == np.uint8
    x_rec, _ = frozen.reconstruct(images)  # the forward pass at train=False decodes the mean
    np.testing.assert_allclose(frozen.decode(latents), x_rec, atol=1e-5)
    with pytest.raises(ValueError, match=r"latents have shape \(6, 8, 8, 3\) but this KL tokenizer's latents are "
                                         r"\[N, 8, 8, 4\]"):
        tok.decode(latents[..., :3])

    gen = vqgen.load_generator(str(workdir))
    z = gen.sample_tokens([0, 1, 2], jax.random.key(3))
    assert z.shape == (3,) + GRID + (WIDTH,) and z.dtype == np.float32 and np.isfinite(z).all()
    np.testing.assert_array_equal(z, gen.sample_tokens([0, 1, 2], jax.random.key(3)))
    assert "num_iter" in gen.option_names and "diffusion_steps" in gen.option_names
    out = gen.sample([4, 5], jax.random.key(0), num_iter=2, diffusion_steps=3)
    assert out.shape == (2, 32, 32, 1) and out.dtype == np.uint8

    report = json.load(open(os.path.join(workdir, "report.json")))
    assert set(report) >= {"tokenizer", "generator", "sampling", "samples"}
    assert np.isfinite(report["tokenizer"]["psnr"]) and report["tokenizer"]["latent_std"] > 0
    assert "codebook_usage" not in report["tokenizer"]
    assert report["sampling"]["options"]["num_iter"] == config.sample.num_iter
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
        assert f["images"].shape == (20, 32, 32, 1) and f["images"].dtype == np.uint8
    # The cache holds the posteriors of the training split (unscaled), one view without flips.
    with np.load(os.path.join(workdir, "tokens", "latents.npz")) as f:
        assert f["mean"].shape[1:] == (1,) + GRID + (WIDTH,) and f["logvar"].shape == f["mean"].shape


def test_latent_batches_are_scaled_posterior_draws():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(1, 2, 2, 3)).astype(np.float32)
    logvar = np.full_like(mean, np.log(0.25))  # std 0.5
    draw = token_data.DrawLatents(scale=0.2)
    z = np.stack([draw.random_map({"mean": mean, "logvar": logvar, "label": 1}, np.random.default_rng(i))["latents"]
                  for i in range(4000)])
    np.testing.assert_allclose(z.mean(0), 0.2 * mean[0], atol=0.01)  # 4000 draws: s.e. 0.1 / 63
    np.testing.assert_allclose(z.std(0), 0.2 * 0.5, rtol=0.06)


@pytest.mark.slow  # the tiny MAR workdir: ~1-2 min on an idle 2-core CPU, 13 min under load
def test_generator_phase_step_is_the_mar_loss(workdir):
    config = tiny_config.get_config("mar")
    phase = generator_lib.build(config)
    assert phase.batch["latents"].shape == (8,) + GRID + (WIDTH,) and phase.batch["latents"].dtype == jnp.float32
    assert phase.frozen == ()
    state = parallel.unbox(phase.init(jax.random.key(0)))
    images = tokenizer_lib.eval_images(config, "train", 8)
    tok = tokenizer_lib.load_frozen_tokenizer(config, str(workdir))
    batch = {"latents": jnp.asarray(tok.encode(images["image"])), "label": jnp.asarray(images["label"], jnp.int32)}
    _, metrics = jax.jit(phase.step)(state, batch, jax.random.key(1))
    _, model = generator_lib.build_model(config)
    loss, _ = jax.jit(functools.partial(mar.loss_fn, model))(state.params, batch,
                                                             jax.random.fold_in(jax.random.key(1), 0))
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)


def test_families_that_do_not_fit_their_tokenizer_are_one_sentence():
    gpt_over_kl = tiny_config.get_config("mar")
    gpt_over_kl.unlock()
    gpt_over_kl.generator = tiny_config.get_config("gpt").generator
    with pytest.raises(ValueError, match=r"models discrete token ids but tokenizer.arch='kl' gives continuous "
                                         r"latents; use generator.arch='mar'"):
        generator_lib.build_model(gpt_over_kl)
    mar_over_vq = tiny_config.get_config("gpt")
    mar_over_vq.unlock()
    mar_over_vq.generator = tiny_config.get_config("mar").generator
    with pytest.raises(ValueError, match=r"models the continuous latents of a KL tokenizer but tokenizer.arch='vqgan' "
                                         r"gives discrete code ids; use tokenizer.arch='kl'"):
        generator_lib.build_model(mar_over_vq)
    kl_with_codebook = tiny_config.get_config("mar")
    kl_with_codebook.unlock()
    kl_with_codebook.tokenizer.quantizer = tiny_config.get_config("gpt").tokenizer.quantizer
    with pytest.raises(ValueError, match="gives continuous latents and has no quantizer; remove the tokenizer.quantizer"):
        builders.token_spec(kl_with_codebook)
    # A MAR built for 16-channel latents refuses a VAE of another width.
    model = mar.build({"encoder_width": 32, "decoder_width": 32, "encoder_heads": 2, "decoder_heads": 2,
                       "encoder_depth": 1, "decoder_depth": 1, "diffloss_width": 32, "diffloss_depth": 1,
                       "buffer_size": 2}, num_classes=10, grid=GRID, latent_dim=16)
    with pytest.raises(ValueError, match="the latents have 4 channels but this MAR model reads 16-channel latents; "
                                         "use a KL tokenizer of embed_dim=16"):
        mar.batch_tokens(model, {"latents": jnp.zeros((2,) + GRID + (WIDTH,))})


@pytest.mark.slow  # the tiny MAR workdir: ~1-2 min on an idle 2-core CPU, 13 min under load
def test_scale_factor_can_change_after_the_vae_is_trained_but_the_generator_refuses_it(workdir):
    config = tiny_config.get_config("mar")
    config.unlock()
    config.tokenizer.scale_factor = 0.5
    config.lock()
    tok = tokenizer_lib.load_frozen_tokenizer(config, str(workdir))  # the VAE's weights do not depend on it
    assert tok.spec.latent_scale == 0.5
    with pytest.raises(Exception, match="latent_scale"):
        generator_lib.load_generator(config, str(workdir))


# ------------------------------------------------------------------ a family over pixels


@dataclasses.dataclass(frozen=True)
class _ToyOptions(sampling.SamplingOptions):
    pass


class _ToyPixels(nn.Module):
    """A per-class mean image: the smallest model of images that a trainer can fit."""

    num_classes: int
    shape: tuple

    @nn.compact
    def __call__(self, labels):
        table = self.param("means", nn.with_logical_partitioning(nn.initializers.zeros, (None, None)),
                           (self.num_classes, int(np.prod(self.shape))))
        return jnp.take(table, labels, axis=0).reshape((-1,) + self.shape)


def _toy_family() -> types.ModuleType:
    fam = types.ModuleType("toy_pixels")
    fam.VIDEO, fam.INPUT_KIND, fam.SamplerOptions = False, "pixels", _ToyOptions

    def build(cfg, *, num_classes, image_size, channels, **_):
        return _ToyPixels(num_classes, tuple(image_size) + (channels,))

    def init_params(model, rng):
        return model.init(rng, jnp.zeros((1,), jnp.int32))["params"]

    def loss_fn(model, params, batch, rng):
        pred = model.apply({"params": nn.meta.unbox(params)}, batch["label"])
        loss = jnp.mean(jnp.square(pred - batch["images"]))
        return loss, {"loss": loss}

    def sample(model, params, labels, rng, opts):
        return jnp.tanh(model.apply({"params": nn.meta.unbox(params)}, labels))

    fam.build, fam.init_params, fam.loss_fn, fam.sample = build, init_params, loss_fn, sample
    fam.sampler_options = lambda cfg, **kw: _ToyOptions.from_dict(cfg, "toy_pixels", **kw)
    return fam


def test_a_family_over_pixels_trains_samples_and_evaluates_without_a_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "toy_pixels", _toy_family())
    monkeypatch.setitem(generators.FAMILIES, "toy_pixels", "toy_pixels")
    c = config_lib.base_config()
    c.generator = ml_collections.ConfigDict(dict(arch="toy_pixels"))
    c.generator_train = config_lib.generator_train_config(num_steps=30, batch_size=16, lr=0.1, warmup_steps=0,
                                                          weight_decay=0.0, ema_decay=0.0, save_every=30)
    c.sample = ml_collections.ConfigDict(dict(**{f.name: f.default for f in dataclasses.fields(_ToyOptions)},
                                              per_class=2, batch_size=20, use_ema=True))
    c.evaluate = config_lib.evaluate_config(judge=False)
    c.data.eval_examples = 16
    c.lock()
    assert builders.input_spec(c).kind == "pixels" and not builders.needs_tokenizer(c)
    phase = generator_lib.build(c)
    assert set(phase.batch) == {"image", "label"} and phase.batch["image"].shape == (16, 32, 32, 1)
    assert run_lib.run(c, str(tmp_path), "all") == 0
    assert not (tmp_path / "checkpoints" / "tokenizer").exists()
    report = json.load(open(tmp_path / "report.json"))
    assert "tokenizer" not in report and report["generator"]["steps"] == 30
    with np.load(tmp_path / "samples" / "samples.npz") as f:
        images = f["images"]
    assert images.shape == (20, 32, 32, 1) and images.std() > 0  # class means, not the zero init
    gen = vqgen.load_generator(str(tmp_path))
    assert gen.tokenizer is None and gen.sample([1, 2], jax.random.key(0)).shape == (2, 32, 32, 1)
    with pytest.raises(ValueError, match="models the images themselves and has no tokenizer to train; run "
                                         "--mode=train_generator"):
        run_lib.run(c, str(tmp_path), "train_tokenizer")
