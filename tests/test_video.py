"""MAGVIT video generation: the 'magvit' family adapter (multi-task COMMIT inputs, loss, task
sampler), frame-prediction evaluation through the trainers, and the moving-MNIST acceptance run."""
import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgen import config_lib
from vqgen.generators import magvit as mv
from vqgen.generators import maskgit as mg

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "configs", "generators"))

import magvit as magvit_config  # noqa: E402

K, C = 32, 10
GRID = (2, 4, 4)  # t, h, w: L = 32; clips of 8 frames (temporal factor 4)
L = 32
FIRST_FRAME = np.arange(L) < 16  # token frame 0 = the condition of frame prediction from 4 frames


def _cfg(**kw):
    d = dict(arch="magvit", width=32, depth=1, num_heads=2, mlp_dim=64, dropout=0.0, class_dropout_prob=0.5,
             label_smoothing=0.1, mask_schedule="cosine", dtype="float32", tasks=("class", "frame_prediction"),
             num_frames=8, cond_frames=4)
    d.update(kw)
    return d


@functools.lru_cache(maxsize=None)
def _model():
    model = mv.build(_cfg(), vocab_size=K, num_classes=C, grid=GRID)
    params = jax.jit(lambda r: nn.meta.unbox(mv.init_params(model, r)))(jax.random.key(0))
    return model, params


def test_build_shapes_and_vocabulary():
    model, params = _model()
    assert isinstance(model, mg.MaskGITTransformer)
    assert model.seq_len == L and model.grid == GRID and model.temporal_factor == 4
    assert model.mask_token_id == K + C and model.vocab_size == K + C + 2  # codes, classes, mask, null
    assert params["word_embeddings"].shape == (K + C + 2, 32)
    assert params["position_embeddings"].shape == (1 + L, 32)
    tokens = jnp.zeros((3, L), jnp.int32)
    logits = model.apply({"params": params}, tokens, jnp.array([0, 1, C]))
    assert logits.shape == (3, L, K + C + 2) and logits.dtype == jnp.float32
    # same parameter tree as the image MaskGIT with seq_len = t*h*w
    image = mg.MaskGITTransformer(codebook_size=K, num_classes=C, seq_len=L, width=32, depth=1, num_heads=2,
                                  mlp_dim=64, class_dropout_prob=0.5)
    ref = jax.eval_shape(lambda r: nn.meta.unbox(mg.init_params(image, r)), jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, ref) == jax.tree.map(lambda a: a.shape, params)


def test_task_masks_match_condition_regions():
    masks = mv.task_masks(("class", "frame_prediction", "central_outpainting"), GRID, 8, 4)
    np.testing.assert_array_equal(masks[0], np.zeros(L, bool))
    np.testing.assert_array_equal(masks[1], FIRST_FRAME)
    fi = mv.task_masks(("frame_interpolation",), (4, 2, 2), 16, 4)[0]  # first and last token frame
    np.testing.assert_array_equal(fi, np.repeat([True, False, False, True], 4))
    masks = masks[[0, 1, 2, 2]]
    centre = np.zeros(GRID, bool)
    centre[:, 1:3, 1:3] = True
    np.testing.assert_array_equal(masks[3], centre.reshape(-1))


@pytest.mark.parametrize("bad, match", [
    (dict(grid=(4, 4)), "video token grid"),
    (dict(tasks=("class", "teleport")), "unknown"),
    (dict(num_frames=9), "multiple"),
    (dict(cond_frames=8), "cond_frames"),
    (dict(typo_key=1), "unknown magvit generator keys"),
])
def test_build_errors(bad, match):
    grid = bad.pop("grid", GRID)
    with pytest.raises(ValueError, match=match):
        mv.build(_cfg(**bad), vocab_size=K, num_classes=C, grid=grid)


def _batch(b=64, seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens": jnp.asarray(rng.integers(0, K, (b, L)), jnp.int32),
            "label": jnp.asarray(rng.integers(0, C, (b,)), jnp.int32)}


def test_commit_inputs_without_condition_tokens_are_editing_inputs():
    model, _ = _model()
    batch = _batch()
    tokens, inputs, labels, weights, task_ids, _, _ = mv.training_inputs(model, batch, jax.random.key(3))
    tokens, inputs, weights, task_ids = map(np.asarray, (tokens, inputs, weights, task_ids))
    assert set(np.unique(task_ids)) == {0, 1}
    masked = inputs == model.mask_token_id
    for i in range(len(tokens)):
        known = FIRST_FRAME if task_ids[i] == 1 else np.zeros(L, bool)
        np.testing.assert_array_equal(inputs[i][known], tokens[i][known])  # condition region shown
        assert not masked[i][known].any()
        np.testing.assert_array_equal(inputs[i][~masked[i]], tokens[i][~masked[i]])
        np.testing.assert_array_equal(weights[i], masked[i].astype(np.float32))  # loss on masked unknowns
        assert masked[i].sum() >= 1 or known.sum() > 0


def test_commit_inputs_with_condition_tokens():
    model, _ = _model()
    batch = _batch()
    cond = np.asarray(batch["tokens"])[:, None].repeat(2, axis=1)
    cond[:, 1] = (cond[:, 1] + 7) % K  # condition tokens differ from the targets everywhere
    batch["condition_tokens"] = jnp.asarray(cond)
    tokens, inputs, _, weights, task_ids, _, _ = mv.training_inputs(model, batch, jax.random.key(3))
    tokens, inputs, weights, task_ids = map(np.asarray, (tokens, inputs, weights, task_ids))
    n_cond = 0
    for i in range(len(tokens)):
        sched = weights[i] > 0  # mask + refine: every schedule-masked position
        known = FIRST_FRAME if task_ids[i] == 1 else np.zeros(L, bool)
        np.testing.assert_array_equal(inputs[i][sched & known], cond[i, 1][sched & known])
        np.testing.assert_array_equal(inputs[i][sched & ~known], model.mask_token_id)
        np.testing.assert_array_equal(inputs[i][~sched], tokens[i][~sched])
        n_cond += int((sched & known).sum())
    assert n_cond > 0
    with pytest.raises(ValueError, match="condition_tokens have shape"):
        mv.training_inputs(model, {**batch, "condition_tokens": batch["condition_tokens"][:, :1]}, jax.random.key(0))


def test_loss_finite_and_learns_one_batch():
    import optax

    model, params = _model()
    batch = _batch(16)
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, o, r):
        (loss, m), g = jax.value_and_grad(lambda q: mv.loss_fn(model, q, batch, r), has_aux=True)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss, m

    p, o = params, tx.init(params)
    losses = []
    for i in range(30):
        p, o, loss, m = step(p, o, jax.random.key(i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses))
    assert set(m) >= {"loss", "accuracy", "mask_ratio", "task_class", "task_frame_prediction"}
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


def test_sample_task_keeps_known_tokens_and_class_sampling():
    model, params = _model()
    opts = mv.sampler_options(config_lib.sample_config(num_steps=4, cfg_scale=1.0, task="frame_prediction",
                                                       cond_frames=4).to_dict())
    assert opts.task == "frame_prediction" and opts.cond_frames == 4 and opts.decode.num_steps == 4
    b = 3
    known = mv.task_known_mask(model, "frame_prediction", b, cond_frames=4)
    np.testing.assert_array_equal(np.asarray(known[0]), FIRST_FRAME)
    cond = jnp.asarray(np.random.default_rng(1).integers(0, K, (b, L)), jnp.int32)
    out, hist = mv.sample_task(model, params, jnp.arange(b), jax.random.key(0), opts, cond, known,
                               return_history=True)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[:, FIRST_FRAME], np.asarray(cond)[:, FIRST_FRAME])
    assert out.shape == (b, L) and out.min() >= 0 and out.max() < K
    assert np.asarray(hist)[:, -1].tolist() == [0] * b
    # a [B, t, h, w] condition is accepted too; wrong sizes are one clear error
    out2 = mv.sample_task(model, params, jnp.arange(b), jax.random.key(0), opts, cond.reshape((b,) + GRID), known)
    np.testing.assert_array_equal(np.asarray(out2), out)
    with pytest.raises(ValueError, match="grid"):
        mv.sample_task(model, params, jnp.arange(b), jax.random.key(0), opts, cond[:, :16], known[:, :16])
    with pytest.raises(ValueError, match="sample_task"):
        mv.sample(model, params, jnp.arange(b), jax.random.key(0), opts)
    import dataclasses

    gen = mv.sample(model, params, jnp.arange(b), jax.random.key(0), dataclasses.replace(opts, task="class"))
    assert np.asarray(gen).shape == (b, L) and np.asarray(gen).max() < K
    with pytest.raises(ValueError, match="unknown"):
        mv.SamplerOptions(task="teleport")


def test_configs_build():
    for variant in magvit_config.VARIANTS:
        c = magvit_config.get_config(variant)
        assert c.generator.arch == "magvit" and c.tokenizer.arch == "magvit"
        s = c.data.image_size // 2 ** (len(c.tokenizer.ch_mult) - 1)
        q = c.tokenizer.quantizer
        vocab = int(np.prod(q.levels)) if q.type == "fsq" else int(q.codebook_size)
        model = mv.build(c.generator.to_dict(), vocab_size=vocab,
                         num_classes=c.data.num_classes, grid=(4, s, s))
        assert model.seq_len == 4 * s * s
    b = magvit_config.get_config("B").generator
    assert (b.depth, b.width, b.num_heads, b.mlp_dim) == (12, 768, 12, 3072)
    with pytest.raises(ValueError, match="unknown MAGVIT variant"):
        magvit_config.get_config("XL")


# ------------------------------------------------------------------ trainers on moving MNIST


def _tiny_config():
    c = magvit_config.get_config("moving_mnist")
    c.unlock()
    t = c.tokenizer
    t.ch, t.ch_mult, t.temporal_downsample, t.z_channels, t.embed_dim, t.norm_groups = 4, (1, 2), (True,), 8, 2, 2
    t.num_frames, t.quantizer.levels = 4, (4, 4)  # 16 codes
    c.data.image_size, c.data.eval_examples = 16, 8
    c.generator.update(dict(width=16, depth=1, num_heads=2, mlp_dim=32, num_frames=4, cond_frames=2))
    tt = c.tokenizer_train
    tt.num_steps, tt.batch_size, tt.save_every, tt.log_every, tt.warmup_steps = 1, 8, 1, 1, 0
    gt = c.generator_train
    gt.num_steps, gt.batch_size, gt.save_every, gt.log_every, gt.warmup_steps = 2, 8, 2, 1, 0
    c.sample.num_steps, c.sample.cond_frames = 2, 2
    c.video.eval_clips, c.video.eval_batch_size, c.video.cache_clips = 3, 8, 8
    c.lock()
    return c


@pytest.mark.slow  # ~2.5 min on the shared 2-core CPU: five compiles (tokenizer step/eval, generator, sampler)
def test_one_tokenizer_and_generator_step_then_frame_prediction_eval(tmp_path):
    from vqgen.data import tokens as token_data
    from vqgen.train import run as run_lib
    from vqgen.train import video
    from vqgen.train.generator import GeneratorTrainer

    config, workdir = _tiny_config(), str(tmp_path)
    tok = run_lib.train_tokenizer(config, workdir)
    assert tok["steps"] == 1 and np.isfinite(tok["psnr"])
    trainer = GeneratorTrainer(config, workdir)
    assert trainer.grid == (2, 8, 8)
    # A small token cache made by the real tokenizer (the full split would take minutes here).
    from vqgen import data as vdata

    src = vdata.make_source("moving_mnist", "train", image_size=16, num_frames=4, seed=0)
    arrays = vdata.eval_arrays(src, max_examples=8)
    toks = trainer.tokenizer.encode(arrays["image"], 8).reshape(8, 1, -1)
    token_data.write_token_cache(trainer.cache_path, toks, arrays["label"], trainer.grid, trainer.tokenizer.step)
    state = trainer.train()
    assert int(state.step) == 2
    metrics = video.evaluate_frame_prediction(config, workdir, trainer=trainer)
    assert metrics["num_clips"] == 3 and metrics["cond_frames"] == 2
    for key in ("psnr_prediction", "psnr_copy_last_frame", "psnr_zeros", "psnr_tokenizer_all_frames"):
        assert np.isfinite(metrics[key]), key
    assert len(metrics["psnr_prediction_per_frame"]) == 2
    with open(os.path.join(workdir, "report.json")) as f:
        assert json.load(f)["video"]["psnr_prediction"] == metrics["psnr_prediction"]
    # the prediction keeps the condition: its given frames decode from the condition tokens
    known, ctoks = video.condition_tokens(trainer, arrays["image"][:2], "frame_prediction", 2, 8)
    assert known.shape == (2, 128) and known[:, :64].all() and not known[:, 64:].any()
    with pytest.raises(ValueError, match="frames"):
        video.condition_tokens(trainer, arrays["image"][:2, :3], "frame_prediction", 2, 8)


@pytest.mark.slow
def test_moving_mnist_frame_prediction_beats_copy_last(tmp_path):
    """The acceptance run (about 12 minutes on the shared 2-core CPU): tokenizer, generator,
    frame prediction from 4 frames on 32 held-out clips, against the baselines."""
    from vqgen.train import video

    config = magvit_config.get_config("moving_mnist")
    out = video.run(config, str(tmp_path))
    tok, v = out["tokenizer"], out["video"]
    assert v["num_clips"] >= 32 and v["cond_frames"] == 4
    # the tokenizer reconstructs better than a black clip and uses more than a handful of codes
    assert tok["psnr"] > v["psnr_zeros"] + 2.0, (tok, v)
    assert tok["codebook_perplexity"] > 10.0, tok
    # the prediction beats both baselines on the predicted frames 5..16
    assert v["psnr_prediction"] > v["psnr_copy_last_frame"], v
    assert v["psnr_prediction"] > v["psnr_zeros"], v
