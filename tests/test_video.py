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
magvit_config = config_lib.load_config_module("generators/magvit")

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
    opts = mv.sampler_options(config_lib.sample_config("magvit", num_steps=4, cfg_scale=1.0, task="frame_prediction",
                                                       cond_frames=4).to_dict())
    assert opts.task == "frame_prediction" and opts.cond_frames == 4 and opts.num_steps == 4
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
    with pytest.raises(ValueError, match="needs a condition clip"):
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

# Every phase of the video family through the one command line, on a tiny variant of
# configs/generators/magvit.py (16x16 clips of 4 frames -> 2x8x8 tokens of a 16-code FSQ).
TINY_OVERRIDES = [
    "--config.tokenizer.ch=4", "--config.tokenizer.ch_mult=(1,2)", "--config.tokenizer.temporal_downsample=(True,)",
    "--config.tokenizer.z_channels=8", "--config.tokenizer.embed_dim=2", "--config.tokenizer.norm_groups=2",
    "--config.tokenizer.num_frames=4", "--config.tokenizer.quantizer.levels=(4,4)",
    "--config.data.image_size=16", "--config.data.eval_examples=8",
    "--config.generator.width=16", "--config.generator.depth=1", "--config.generator.num_heads=2",
    "--config.generator.mlp_dim=32", "--config.generator.num_frames=4", "--config.generator.cond_frames=2",
    "--config.tokenizer_train.num_steps=1", "--config.tokenizer_train.batch_size=8",
    "--config.tokenizer_train.save_every=1", "--config.tokenizer_train.log_every=1",
    "--config.tokenizer_train.warmup_steps=0",
    "--config.generator_train.num_steps=2", "--config.generator_train.batch_size=8",
    "--config.generator_train.save_every=2", "--config.generator_train.log_every=1",
    "--config.generator_train.warmup_steps=0",
    "--config.sample.num_steps=2", "--config.sample.cond_frames=2", "--config.sample.batch_size=8",
    "--config.video.eval_clips=3", "--config.video.cache_clips=8",
]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_every_video_phase_through_the_one_command_line(tmp_path):
    """tokenizer -> generator -> frame-prediction samples -> PSNR against the baselines, with
    ``python -m vqgen.main --config=configs/generators/magvit.py`` (about 2 minutes here)."""
    import subprocess

    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "vqgen.main", "--config=configs/generators/magvit.py", f"--workdir={workdir}",
           *TINY_OVERRIDES]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    assert set(report) >= {"tokenizer", "generator", "sampling", "video"}
    assert report["tokenizer"]["steps"] == 1 and np.isfinite(report["tokenizer"]["psnr"])
    assert report["generator"]["steps"] == 2
    v = report["video"]
    assert v["num_clips"] == 3 and v["cond_frames"] == 2 and v["predicted_frames"] == "3-4"
    for key in ("psnr_prediction", "psnr_copy_last_frame", "psnr_zeros", "psnr_tokenizer_all_frames"):
        assert np.isfinite(v[key]), key
    assert len(v["psnr_prediction_per_frame"]) == 2
    with np.load(workdir / "samples" / "samples.npz") as f:
        images, truth = f["images"], f["ground_truth"]
        assert images.dtype == np.uint8 and images.shape == truth.shape == (3, 4, 16, 16, 1)
        assert str(f["task"]) == "frame_prediction"
    assert (workdir / "samples" / "grid.png").stat().st_size > 0
    assert "workdir:" in out.stdout and "samples:" in out.stdout and "report in" in out.stdout


def test_condition_clips_of_the_wrong_length_are_one_clear_error():
    model, _ = _model()
    opts = mv.sampler_options(config_lib.sample_config("magvit", task="frame_prediction", cond_frames=4).to_dict())
    clips = np.zeros((2, 8, 16, 16, 1), np.float32)
    known, video = mv.condition_inputs(model, opts, clips)
    assert known.shape == (2, L) and video.shape == clips.shape
    np.testing.assert_array_equal(known[0], FIRST_FRAME)
    with pytest.raises(ValueError, match="frames"):
        mv.condition_inputs(model, opts, clips[:, :3])
    with pytest.raises(ValueError, match=r"\[N, T, H, W, C\]"):
        mv.condition_inputs(model, opts, clips[:, 0])


@pytest.mark.slow
def test_moving_mnist_frame_prediction_beats_copy_last(tmp_path):
    """The acceptance run (about 12 minutes on the shared 2-core CPU): tokenizer, generator,
    frame prediction from 4 frames on 32 held-out clips, against the baselines."""
    from vqgen.train import run as run_lib

    config = magvit_config.get_config("moving_mnist")
    assert run_lib.run(config, str(tmp_path), "all") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    tok, v = report["tokenizer"], report["video"]
    assert v["num_clips"] >= 32 and v["cond_frames"] == 4
    # the tokenizer reconstructs better than a black clip and uses more than a handful of codes
    assert tok["psnr"] > v["psnr_zeros"] + 2.0, (tok, v)
    assert tok["codebook_perplexity"] > 10.0, tok
    # the prediction beats both baselines on the predicted frames 5..16
    assert v["psnr_prediction"] > v["psnr_copy_last_frame"], v
    assert v["psnr_prediction"] > v["psnr_zeros"], v
