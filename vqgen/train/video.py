"""Video runs: train a MAGVIT tokenizer and generator, then score frame prediction.

    python -m vqgen.train.video --config=configs/generators/magvit.py --workdir=runs/magvit_mnist

trains the video tokenizer (:func:`vqgen.train.run.train_tokenizer`), the masked video
transformer (:func:`vqgen.train.generator.train_generator`) and runs
:func:`evaluate_frame_prediction`; running it again resumes from the workdir's checkpoints (and
re-evaluates). ``--mode`` picks one phase: ``train_tokenizer``, ``train_generator``,
``evaluate`` or ``all`` (default).

Frame prediction (MAGVIT's FP task): held-out clips of the data source's ``test`` split are cut
to their first ``cond_frames`` frames, the missing frames are filled by repeating the last given
one (MAGVIT's padding), the condition clip is tokenized, and the generator decodes the tokens
outside the condition region (:func:`vqgen.generators.magvit.sample_task`). The decoded clip's
frames ``cond_frames + 1 .. T`` are compared with the ground truth by PSNR, against

- ``copy_last``: every predicted frame is the last given frame (the acceptance baseline);
- ``zeros``: black frames (on moving MNIST, a low bar that a blurry or empty guess also beats);
- ``tokenizer``: the tokenizer's reconstruction of the real clip (what perfect tokens would give).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from vqgen import parallel


MAX_PSNR = 100.0  # dB; identical frames (a digit that does not move) would give +inf


def _per_frame_psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PSNR per frame ``[N, T]`` of clips ``[N, T, H, W, C]`` in [-1, 1], capped at :data:`MAX_PSNR`."""
    from vqgen.evaluation import metrics as em

    n, t = x.shape[:2]
    flat = lambda a: np.asarray(a, np.float32).reshape((n * t,) + a.shape[2:])  # noqa: E731
    return np.minimum(np.asarray(em.psnr(flat(x), flat(y))), MAX_PSNR).reshape(n, t)


def _batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int) -> np.ndarray:
    """Applies ``fn`` to fixed-size batches of ``arrays`` (padding the last one) and concatenates."""
    n = len(arrays[0])
    out = []
    for i in range(0, n, batch_size):
        chunk = [a[i:i + batch_size] for a in arrays]
        m = len(chunk[0])
        if m < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
        out.append(np.asarray(fn(*chunk))[:m])
    return np.concatenate(out)


def condition_tokens(trainer, clips: np.ndarray, task: str, cond_frames: int, batch_size: int):
    """The condition region and condition tokens of ``task`` for ``clips [N, T, H, W, C]``.

    Returns ``(known_mask bool [N, L], tokens int32 [N, L])``: the task's condition video
    (:func:`vqgen.generators.magvit_tasks.task_condition`) encoded by the workdir's tokenizer.
    Raises ``ValueError`` when the clips do not have the tokenizer's number of frames.
    """
    import jax.numpy as jnp

    from vqgen.generators import magvit_tasks

    frames = int(trainer.tokenizer.model.num_frames)
    if np.ndim(clips) != 5:
        raise ValueError(f"condition clips must be [N, T, H, W, C], got shape {np.shape(clips)}.")
    magvit_tasks.validate_condition(task, int(np.shape(clips)[1]), frames, cond_frames)
    known, video = magvit_tasks.task_condition(task, jnp.asarray(clips, jnp.float32), trainer.grid,
                                               cond_frames=cond_frames)
    tokens = trainer.tokenizer.encode(np.asarray(video), batch_size)  # [N, t, h, w]
    return np.asarray(known), tokens.reshape(len(tokens), -1).astype(np.int32)


def predict_clips(trainer, params: Any, clips: np.ndarray, labels: np.ndarray, *, task: str, cond_frames: int,
                  seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Completes ``clips`` for ``task``: ``(decoded clips float32 [N, T, H, W, C], tokens [N, L])``."""
    import jax.numpy as jnp

    family = trainer.family
    opts = trainer.sampler_options()
    if hasattr(opts, "task"):
        import dataclasses

        opts = dataclasses.replace(opts, task=task, cond_frames=cond_frames)
    known, ctoks = condition_tokens(trainer, clips, task, cond_frames, batch_size)
    calls = iter(range(len(clips)))

    def run(lab, tok, msk):
        i = next(calls)
        with parallel.mesh_context(trainer.mesh, trainer.rules):
            return family.sample_task(trainer.model, params, jnp.asarray(lab, jnp.int32),
                                      jax.random.key(seed * 1000 + i), opts, tok, msk)

    tokens = _batched(run, (np.asarray(labels, np.int32), ctoks, known), batch_size)  # [N, L]
    video = _batched(lambda t: trainer.tokenizer.decode(t.reshape((len(t),) + trainer.grid)), (tokens,), batch_size)
    return video, tokens


def evaluate_frame_prediction(config, workdir: str, num_clips: int | None = None, trainer=None) -> dict:
    """PSNR of frame prediction from the first ``config.sample.cond_frames`` frames on held-out
    clips vs the copy-last-frame and black-frame baselines and the tokenizer's reconstruction.

    Loads the workdir's tokenizer and generator (EMA weights when ``config.sample.use_ema``),
    writes the metrics into ``report.json`` under ``'video'`` and returns them. PSNRs are means
    over clips and predicted frames (``cond_frames + 1 .. T``) of per-frame PSNR in dB.
    """
    from vqgen import data as vdata
    from vqgen.train.generator import GeneratorTrainer
    from vqgen.train.run import update_report

    t_start = time.perf_counter()
    trainer = trainer or GeneratorTrainer(config, workdir)
    if not hasattr(trainer.family, "sample_task"):
        raise ValueError(f"generator arch {config.generator.arch!r} has no conditional sampler; use arch 'magvit'.")
    state = trainer.restore()
    sc = config.sample
    params = state.ema_params if sc.use_ema else state.params
    ve = config.get("video", None)
    num_clips = int(num_clips or (ve.eval_clips if ve is not None else 64))
    batch_size = int(ve.eval_batch_size if ve is not None else sc.batch_size)
    dc = config.data
    frames = int(trainer.tokenizer.model.num_frames)
    source = vdata.make_source(dc.source, "test", image_size=dc.image_size, data_dir=dc.data_dir or None,
                               num_frames=frames, seed=config.seed)
    arrays = vdata.eval_arrays(source, max_examples=num_clips)
    clips, labels = arrays["image"], arrays["label"]
    cf = int(sc.cond_frames)
    pred, _ = predict_clips(trainer, params, clips, labels, task="frame_prediction", cond_frames=cf,
                            seed=config.seed + 11, batch_size=batch_size)
    rec = _batched(lambda x: trainer.tokenizer.decode(trainer.tokenizer.encode(x, len(x))), (clips,), batch_size)
    future = slice(cf, frames)
    copy_last = np.repeat(clips[:, cf - 1:cf], frames - cf, axis=1)  # [N, T - cf, H, W, C]
    zeros = np.full_like(clips[:, future], -1.0)
    p_pred = _per_frame_psnr(pred[:, future], clips[:, future])  # [N, T - cf]
    p_copy = _per_frame_psnr(copy_last, clips[:, future])
    p_zero = _per_frame_psnr(zeros, clips[:, future])
    p_rec = _per_frame_psnr(rec, clips)  # [N, T]
    metrics = {
        "task": "frame_prediction",
        "cond_frames": cf,
        "num_clips": int(len(clips)),
        "predicted_frames": f"{cf + 1}-{frames}",
        "psnr_prediction": float(np.mean(p_pred)),
        "psnr_copy_last_frame": float(np.mean(p_copy)),
        "psnr_zeros": float(np.mean(p_zero)),
        "psnr_tokenizer_predicted_frames": float(np.mean(p_rec[:, future])),
        "psnr_tokenizer_all_frames": float(np.mean(p_rec)),
        "psnr_prediction_per_frame": [float(v) for v in np.mean(p_pred, axis=0)],
        "psnr_copy_last_frame_per_frame": [float(v) for v in np.mean(p_copy, axis=0)],
        "prediction_beats_copy_last": bool(np.mean(p_pred) > np.mean(p_copy)),
        "sampler": {"num_steps": int(sc.num_steps), "temperature": float(sc.temperature),
                    "choice_temperature": float(sc.choice_temperature), "cfg_scale": float(sc.cfg_scale)},
        "seconds": time.perf_counter() - t_start,
    }
    if parallel.is_main_process():
        out_dir = os.path.join(workdir, "samples")
        os.makedirs(out_dir, exist_ok=True)
        from vqgen.train import common

        np.savez(os.path.join(out_dir, "frame_prediction.npz"), prediction=common.to_uint8(pred),
                 ground_truth=common.to_uint8(clips), labels=labels.astype(np.int32))
        k = min(4, len(clips))  # rows: truth / prediction for the first k clips, frames side by side
        rows = np.concatenate([np.stack([clips[i], pred[i]]) for i in range(k)])  # [2k, T, H, W, C]
        strip = rows.reshape((-1,) + rows.shape[2:])  # [2k*T, H, W, C]
        common.save_png(os.path.join(out_dir, "frame_prediction.png"),
                        common.image_grid(common.to_uint8(strip), rows=2 * k))
    update_report(workdir, "video", metrics)
    return metrics


# ------------------------------------------------------------------------------------- CLI

MODES = ("train_tokenizer", "train_generator", "evaluate", "all")


def run(config, workdir: str, mode: str = "all") -> dict:
    """Runs the phases of ``mode`` and returns the report sections they wrote."""
    from vqgen.train import common
    from vqgen.train import run as run_lib
    from vqgen.train.generator import GeneratorTrainer

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {MODES}.")
    run_lib.write_config(config, workdir)
    phases = ("train_tokenizer", "train_generator", "evaluate") if mode == "all" else (mode,)
    out: dict[str, Any] = {}
    try:
        for phase in phases:
            t0 = time.perf_counter()
            if phase == "train_tokenizer":
                out["tokenizer"] = run_lib.train_tokenizer(config, workdir)
            elif phase == "train_generator":
                trainer = GeneratorTrainer(config, workdir)
                trainer.build_token_cache(config.video.cache_clips if "video" in config else None)
                state = trainer.train()
                out["generator"] = {"steps": int(jax.device_get(state.step)), "params": common.count_params(state.params)}
                run_lib.update_report(workdir, "generator", out["generator"])
            else:
                out["video"] = evaluate_frame_prediction(config, workdir)
                print(json.dumps({"video": {k: v for k, v in out["video"].items() if "per_frame" not in k}}),
                      flush=True)
            logging.info("%s took %.1fs", phase, time.perf_counter() - t0)
    except common.Preempted as e:
        logging.warning("%s", e)
        print(str(e), flush=True)
    return out


def main(argv):  # pragma: no cover - exercised through the command line
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass options as --flag=value.")
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/generators/magvit.py.")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required, e.g. --workdir=runs/magvit_mnist.")
    parallel.maybe_initialize_distributed(config.get("distributed", False) or None)
    run(config, flags.FLAGS.workdir, flags.FLAGS.mode)
    sys.exit(0)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory.")
    flags.DEFINE_enum("mode", "all", MODES, "Which phase to run (default: all).")
    app.run(main)
