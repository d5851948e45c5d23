"""What each ``--mode`` of the command line does, as importable functions.

Every family and phase goes through here: ``train_tokenizer``, ``train_generator``, ``sample``
(class-conditional samples, or a family's conditional task on held-out clips, e.g. MAGVIT's frame
prediction), ``evaluate`` (the digit judge and FID for images, PSNR against baselines for
frame prediction), ``sweep_sampling`` (samples scored under a grid of sampler settings,
:mod:`vqgen.train.sweep`), ``summary`` and ``all``.
"""
from __future__ import annotations

import json
import math
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from vqgen import data as vdata
from vqgen import fileio, parallel
from vqgen.checkpoint import Checkpointer
from vqgen.evaluation import fid as fid_lib
from vqgen.evaluation import judge as judge_lib
from vqgen.evaluation import video as video_eval
from vqgen.train import builders, common
from vqgen.train import generator as generator_lib
from vqgen.train import sweep as sweep_lib
from vqgen.train import tokenizer as tokenizer_lib

MODES = ("train_tokenizer", "train_generator", "sample", "evaluate", "sweep_sampling", "summary", "all")
ALL = ("train_tokenizer", "train_generator", "sample", "evaluate")


def check_workdir(workdir: str | None, *, write: bool = False) -> None:
    """A clear error for a missing ``--workdir``, one that names a file or cannot be reached
    (``gs://`` without ``gcsfs``); with ``write``, also one that cannot be written (read-only),
    and the folder is created when it is missing."""
    if not workdir:
        raise ValueError("--workdir is required, e.g. --workdir=runs/quickstart.")
    fileio.check_access(workdir, "--workdir")
    p = fileio.path(workdir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--workdir={workdir} is a file; pass a directory (it is created when missing).")
    if write and parallel.is_main_process():
        fileio.check_writable_dir(workdir, "--workdir")


# Keys every training section has, and the smallest value each may take.
_LOOP_MINIMUM = {"num_steps": 1, "batch_size": 1, "log_every": 1, "save_every": 1, "keep": 1}


def check_loop_settings(config, section: str) -> None:
    """One sentence for a training setting no run can use (``num_steps=-5``, ``log_every=0``,
    a learning rate that is not a positive number)."""
    sc = config[section]
    for key, minimum in _LOOP_MINIMUM.items():
        if key in sc and int(sc[key]) < minimum:
            raise ValueError(f"{section}.{key}={sc[key]} must be at least {minimum}; pass "
                             f"--config.{section}.{key}=<a whole number >= {minimum}>.")
    if "lr" in sc and not (math.isfinite(float(sc.lr)) and float(sc.lr) > 0):
        raise ValueError(f"{section}.lr={sc.lr} must be a positive number, e.g. --config.{section}.lr=1e-4.")


def check_data(config) -> None:
    """The training data against the config, before anything is compiled or written: the source's
    class count against ``data.num_classes``, and the first batch's image shape, channels and labels
    against ``data.image_size``, ``data.channels`` and ``data.num_classes``."""
    batch_size = int(config.tokenizer_train.batch_size) if "tokenizer_train" in config else 8
    example = builders.example_shape(config)
    source, _ = tokenizer_lib.make_data(config, "train", train=False, batch_size=1)
    vdata.check_source(source, source_name=str(config.data.source), num_classes=int(config.data.num_classes),
                       channels=int(config.data.channels), image_size=int(config.data.image_size),
                       num_frames=example[0] if len(example) == 4 else None, first=batch_size)


def validate(config, workdir: str, phases: tuple[str, ...]) -> None:
    """Everything that can refuse the run, checked before anything is written: the config of
    every phase to run (its models are built, its loop settings checked), the workdir (a writable
    folder, local or remote), the compatibility of the checkpoints already in it with this config,
    and the training data against the config (first batch, before any compile)."""
    check_workdir(workdir)
    checks = []
    if "train_tokenizer" in phases and not builders.needs_tokenizer(config):
        raise ValueError(f"generator.arch={config.generator.arch!r} models the images themselves and has no tokenizer "
                         "to train; run --mode=train_generator (or --mode=all).")
    if "train_tokenizer" in phases:
        check_loop_settings(config, "tokenizer_train")
        phase = tokenizer_lib.build(config)
        checks.append((phase.ckpt_dir(workdir), lambda c: c.check_compatible(), phase.fingerprint))
    if set(phases) & {"train_generator", "sample", "evaluate"} and "generator" in config:
        if "train_generator" in phases:
            check_loop_settings(config, "generator_train")
        phase = generator_lib.build(config)
        checks.append((phase.ckpt_dir(workdir), lambda c: c.check_compatible(), phase.fingerprint))
        if builders.needs_tokenizer(config):
            checks.append((fileio.join(workdir, "checkpoints", tokenizer_lib.NAME),
                           lambda c: tokenizer_lib.check_architecture(config, c), None))
    for directory, check, fingerprint in checks:
        if fileio.path(directory).is_dir():  # opening a manager creates a missing folder
            ckpt = Checkpointer(directory, save_every=1, keep=1, fingerprint=fingerprint)
            try:
                if ckpt.latest_step() is not None:
                    check(ckpt)
            finally:
                ckpt.close()
    if set(phases) & {"train_tokenizer", "train_generator"}:
        check_data(config)
    check_inputs(config, workdir, phases)
    check_workdir(workdir, write=True)  # last: a refused run leaves no new folder behind


def check_inputs(config, workdir: str, phases: tuple[str, ...]) -> None:
    """Files the run will read that must already exist: the LPIPS weights of a perceptual loss, the
    samples that ``--mode=evaluate`` scores."""
    tc = config.get("tokenizer_train")
    if "train_tokenizer" in phases and tc is not None and tc.perceptual_weight > 0 and tc.lpips_path:
        if not fileio.exists(tc.lpips_path):
            raise FileNotFoundError(
                f"LPIPS weights file {tc.lpips_path!r} (tokenizer_train.lpips_path) does not exist; build it from a "
                "torchvision VGG16 state dict with `python -m vqgen.convert.lpips --vgg16 VGG16_STATE_DICT.pth "
                "--out lpips_vgg.npz`.")
    samples = fileio.join(workdir, "samples", "samples.npz")
    if "evaluate" in phases and "sample" not in phases and not fileio.exists(samples):
        raise FileNotFoundError(f"no samples at {samples}; run --mode=sample first.")


def write_config(config, workdir: str) -> None:
    """Writes ``config.json``; a different earlier one is kept as ``config.<timestamp>.json``."""
    if not parallel.is_main_process():
        return
    path = fileio.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if fileio.exists(path):
        old = fileio.read_text(path)
        if old == text:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(fileio.mtime(path) or time.time()))
        fileio.write_text(fileio.join(workdir, f"config.{stamp}.json"), old)
    fileio.write_text(path, text)


def _report(workdir: str, section: str, metrics: dict) -> None:
    common.update_report(workdir, section, metrics)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list)}
    print(json.dumps({section: shown}), flush=True)


def train_tokenizer(config, workdir: str, mesh=None) -> dict:
    """Trains (or resumes) the tokenizer, then scores its EMA weights on the held-out split."""
    mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
    state = tokenizer_lib.train(config, workdir, mesh)
    metrics = tokenizer_lib.evaluate(config, tokenizer_lib.frozen_from_state(config, state, mesh))
    metrics["steps"] = int(jax.device_get(state.step))
    _report(workdir, "tokenizer", metrics)
    return metrics


def train_generator(config, workdir: str, mesh=None) -> dict:
    """Trains (or resumes) the generator over the tokens of the workdir's tokenizer."""
    state = generator_lib.train(config, workdir, mesh)
    metrics = {"steps": int(jax.device_get(state.step)), "params": common.count_params(state.params)}
    _report(workdir, "generator", metrics)
    return metrics


def _save_samples(workdir: str, arrays: dict[str, np.ndarray], grid: np.ndarray) -> str:
    out_dir = fileio.join(workdir, "samples")
    path = fileio.join(out_dir, "samples.npz")
    if parallel.is_main_process():
        fileio.save_npz(path, **arrays)
        fileio.save_png(fileio.join(out_dir, "grid.png"), grid)
    return path


def _frames_grid(rows: list[np.ndarray]) -> np.ndarray:
    """One row of frames per clip ``[T, H, W, C]`` (uint8)."""
    strip = np.concatenate(rows)  # [R*T, H, W, C]
    return common.image_grid(strip, rows=len(rows))


def sample(config, workdir: str, mesh=None) -> str:
    """Writes ``samples/samples.npz`` and ``samples/grid.png``.

    Class-conditional (``sample.task`` absent or ``'class'``): ``sample.per_class`` samples of
    every class, ``images`` uint8 ``[N, H, W, C]`` (video ``[N, T, H, W, C]``) and ``labels``;
    the grid shows one row per class. A conditional task (MAGVIT's ``frame_prediction``, ...):
    the first ``video.eval_clips`` held-out clips are completed; the file also holds
    ``ground_truth`` and ``cond_frames``, the grid alternates truth and prediction rows.
    """
    gen = generator_lib.load_generator(config, workdir, mesh)
    opts = gen.options()
    task = getattr(opts, "task", "class")
    rng = jax.random.key(config.seed * 1000 + 17)
    t0 = time.perf_counter()
    if task == "class":
        labels = np.repeat(np.arange(int(config.data.num_classes), dtype=np.int32), int(config.sample.per_class))
        images = common.to_uint8(gen.decode(gen.sample_tokens(labels, rng)))
        per_row = min(int(config.sample.per_class), 10)
        picks = [images[labels == c][:per_row] for c in range(int(config.data.num_classes))]
        if images.ndim == 5:  # video: the frames of each class's first sample
            grid = _frames_grid([p[0] for p in picks])
        else:
            grid = common.image_grid(np.concatenate(picks), rows=len(picks))
        arrays = {"images": images, "labels": labels}
    else:
        num = int(config.video.eval_clips) if "video" in config else int(config.data.eval_examples)
        held_out = tokenizer_lib.eval_images(config, "test", num)
        clips, labels = held_out["image"], held_out["label"].astype(np.int32)
        tokens = gen.sample_tokens(labels, rng, condition=clips)
        images = common.to_uint8(gen.decode(tokens))
        truth = common.to_uint8(clips)
        k = min(4, len(clips))
        grid = _frames_grid([row for i in range(k) for row in (truth[i], images[i])])
        arrays = {"images": images, "labels": labels, "ground_truth": truth,
                  "task": np.asarray(task), "cond_frames": np.int32(opts.cond_frames)}
    seconds = time.perf_counter() - t0
    path = _save_samples(workdir, arrays, grid)
    common.update_report(workdir, "sampling", {
        "task": task, "num_samples": int(len(images)), "seconds": seconds,
        "seconds_per_sample": seconds / len(images), "options": {k: v for k, v in vars(opts).items()}})
    common.say(f"samples: {len(images)} written to {path} (grid: {fileio.join(workdir, 'samples', 'grid.png')})")
    return path


def evaluate(config, workdir: str, mesh=None) -> dict:
    """Scores ``samples/samples.npz``: frame-prediction PSNR for video tasks; for images the digit
    judge (on the embedded digits) and FID/IS when Inception weights and statistics are configured."""
    path = fileio.join(workdir, "samples", "samples.npz")
    if not fileio.exists(path):
        raise FileNotFoundError(f"no samples at {path}; run --mode=sample first.")
    arrays = fileio.load_npz(path)
    if "ground_truth" in arrays:
        return _evaluate_video_task(config, workdir, arrays, mesh)
    images, labels = arrays["images"], arrays["labels"]
    ec = config.evaluate
    metrics: dict[str, Any] = {}
    if ec.judge and config.data.source == "mnist" and images.ndim == 4:
        judge = judge_lib.load_or_train_judge(fileio.join(workdir, "judge"), seed=config.seed)
        metrics.update(judge_lib.judge_metrics(judge, images, labels))
        metrics.update(judge_lib.real_reference_metrics(judge, labels, seed=config.seed))
        metrics["judge_test_accuracy"] = float(judge.accuracy)
    if ec.inception_path and ec.reference_stats:
        metrics.update(fid_lib.evaluate_files(path, ec.reference_stats, inception_path=ec.inception_path,
                                              batch_size=ec.batch_size))
    if not metrics:
        logging.warning("no metric applies to these samples: set evaluate.inception_path and evaluate.reference_stats "
                        "for FID/IS.")
    _report(workdir, "samples", metrics)
    return metrics


def _evaluate_video_task(config, workdir: str, arrays: dict, mesh) -> dict:
    task = str(arrays["task"])
    if task != "frame_prediction":
        raise ValueError(f"samples of task {task!r} have no score yet; sample frame_prediction "
                         "(--config.sample.task=frame_prediction) to score it.")
    truth = arrays["ground_truth"].astype(np.float32) / 127.5 - 1.0
    prediction = arrays["images"].astype(np.float32) / 127.5 - 1.0
    tokenizer = tokenizer_lib.load_frozen_tokenizer(config, workdir, mesh)
    reconstruction, _ = tokenizer.reconstruct(truth)
    metrics = video_eval.frame_prediction_metrics(prediction, truth, int(arrays["cond_frames"]), reconstruction)
    _report(workdir, "video", metrics)
    return metrics


def summary(config) -> dict:
    """Prints each model's parameter count (``jax.eval_shape``: nothing is allocated) and, last,
    one JSON line ``{"tokenizer_params": N, "generator_params": M}``."""
    counts = {}
    if "tokenizer" in config and builders.needs_tokenizer(config):
        phase = tokenizer_lib.build(config)
        counts["tokenizer_params"] = common.count_params(jax.eval_shape(phase.init, jax.random.key(0)).params)
        print(f"tokenizer ({config.tokenizer.arch}): {counts['tokenizer_params']:,} parameters")
    if "generator" in config:
        family, model = generator_lib.build_model(config)
        counts["generator_params"] = common.count_params(
            jax.eval_shape(lambda r: family.init_params(model, r), jax.random.key(0)))
        spec = builders.input_spec(config)
        what = {"tokens": f"{spec.seq_len} tokens of {spec.vocab_size} codes",
                "latents": f"{spec.seq_len} latents of {spec.latent_dim} channels",
                "pixels": f"{spec.example[-1]}-channel pixels"}[spec.kind]
        print(f"generator ({config.generator.arch}, {what} on a {'x'.join(map(str, spec.grid))} grid): "
              f"{counts['generator_params']:,} parameters")
    print(json.dumps(counts), flush=True)
    return counts


def run(config, workdir: str | None, mode: str, sweeps: tuple[str, ...] = ()) -> int:
    """Runs ``mode``; returns the process exit code (0 also after a SIGTERM checkpoint).
    ``sweeps``: the ``KEY=V1,V2,...`` settings of ``--mode=sweep_sampling``."""
    if mode not in MODES:
        raise ValueError(f"unknown --mode={mode!r}; use one of {MODES}.")
    if mode == "summary":
        summary(config)
        return 0
    if sweeps and mode != "sweep_sampling":
        raise ValueError(f"--sweep is read by --mode=sweep_sampling only; drop it or pass --mode=sweep_sampling.")
    phases = ALL if mode == "all" else (mode,)
    if mode == "all" and not builders.needs_tokenizer(config):  # a family over pixels: no tokenizer phase
        phases = tuple(p for p in phases if p != "train_tokenizer")
    if mode == "sweep_sampling":
        sweep_lib.check_sweeps(config, sweeps)
    validate(config, workdir, ("sample",) if mode == "sweep_sampling" else phases)
    write_config(config, workdir)
    common.say(f"workdir: {fileio.display(workdir)}")
    mesh = parallel.create_mesh(tuple(config.mesh_shape))
    steps = {"train_tokenizer": train_tokenizer, "train_generator": train_generator, "sample": sample,
             "evaluate": evaluate,
             "sweep_sampling": lambda c, w, m: sweep_lib.sweep_sampling(c, w, sweeps, m)}
    try:
        for phase in phases:
            t0 = time.perf_counter()
            steps[phase](config, workdir, mesh)
            logging.info("%s took %.1fs", phase, time.perf_counter() - t0)
    except common.Preempted as e:
        logging.warning("%s", e)
        print(str(e), flush=True)
        return 0
    common.say(f"done: report in {fileio.join(workdir, 'report.json')}")
    return 0
