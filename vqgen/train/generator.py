"""Generator training over a frozen tokenizer's tokens, sampling, and sample evaluation.

1. The tokenizer (restored from ``checkpoints/tokenizer``) encodes the training split once into a
   token cache in the workdir (``tokens/train.npz``; with ``flip_augment`` the mirrored images
   too, as LlamaGen does). The cache is rebuilt when the tokenizer checkpoint changes.
2. A generator family (``config.generator.arch``: ``gpt`` or ``maskgit``) trains on it with a
   jitted, sharded, donated step, EMA weights, Orbax resume and TensorBoard.
3. ``sample_to_workdir`` decodes ``sample.per_class`` samples per class through the tokenizer
   into ``samples/samples.npz`` and ``samples/grid.png`` (one row per class).
4. ``evaluate_workdir`` scores the samples with the digit judge (accuracy of the conditioning
   class, judge FID) and, when given Inception weights and reference statistics, FID/IS.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from typing import Any

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqgen import parallel
from vqgen.checkpoint import Checkpointer
from vqgen.data import tokens as token_data
from vqgen.train import common
from vqgen.train.tokenizer import TokenizerTrainer, quantizer_codebook_size

FAMILIES = {"gpt": "vqgen.generators.gpt", "maskgit": "vqgen.generators.maskgit", "magvit": "vqgen.generators.magvit"}


@flax.struct.dataclass
class GeneratorState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def family_module(arch: str):
    if arch not in FAMILIES:
        raise ValueError(f"unknown generator arch {arch!r}; choose one of {sorted(FAMILIES)}.")
    return importlib.import_module(FAMILIES[arch])


def _plain(cfg) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


class FrozenTokenizer:
    """The trained tokenizer of a workdir: EMA params, encode to ids, decode ids to images."""

    def __init__(self, config, workdir: str, mesh):
        self.trainer = TokenizerTrainer(config, workdir, mesh=mesh)
        ckpt = self.trainer.checkpointer()
        try:
            if ckpt.latest_step() is None:
                raise FileNotFoundError(
                    f"no tokenizer checkpoint in {self.trainer.ckpt_dir}; run --mode=train_tokenizer "
                    "with this --workdir first (or --mode=all).")
            state, _ = self.trainer.create_state()
            state = ckpt.restore(state)
        finally:
            ckpt.close()
        self.step = int(jax.device_get(state.step))
        self.params = state.ema_params
        self.model_state = state.model_state
        self.model = self.trainer.model
        self.vocab_size = quantizer_codebook_size(self.model.quantizer)
        if self.vocab_size is None:
            raise ValueError("the generator needs a tokenizer with a discrete codebook (vq, lfq, fsq, ibq).")
        self._encode = jax.jit(lambda p, s, x: self.model.apply({"params": p, **s}, x, method="encode").indices)
        self._decode = jax.jit(lambda p, s, i: jnp.clip(
            self.model.apply({"params": p, **s}, i, method="decode_indices").astype(jnp.float32), -1, 1))

    def encode(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size]
            n = len(x)
            if n < batch_size:
                x = np.concatenate([x, np.repeat(x[-1:], batch_size - n, axis=0)])
            out.append(np.asarray(self._encode(self.params, self.model_state, jnp.asarray(x)))[:n])
        return np.concatenate(out)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self._decode(self.params, self.model_state, jnp.asarray(indices)))


class GeneratorTrainer:
    """Builds the generator of ``config.generator`` over the tokens of the workdir's tokenizer."""

    def __init__(self, config, workdir: str, mesh=None, tokenizer: FrozenTokenizer | None = None):
        self.config = config
        self.workdir = workdir
        self.mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
        self.rules = parallel.rules_from_config(config.logical_rules)
        gt = config.generator_train
        parallel.check_batch_size(gt.batch_size, self.mesh)
        self.tokenizer = tokenizer or FrozenTokenizer(config, workdir, self.mesh)
        self.family = family_module(config.generator.arch)
        self.num_classes = int(config.data.num_classes)
        self.cache_path = os.path.join(workdir, "tokens", "train.npz")
        self.grid = self._token_grid()
        self.model = self.family.build(_plain(config.generator), vocab_size=self.tokenizer.vocab_size,
                                       num_classes=self.num_classes, grid=self.grid)
        self.tx = common.make_optimizer(
            lr=gt.lr, num_steps=gt.num_steps, warmup_steps=gt.warmup_steps, schedule=gt.schedule,
            weight_decay=gt.weight_decay, b1=gt.b1, b2=gt.b2, grad_clip=gt.grad_clip)
        self.ckpt_dir = os.path.join(workdir, "checkpoints", "generator")

    def _token_grid(self) -> tuple[int, ...]:
        """Token-map shape of one example: ``(h, w)`` for images, ``(t, h, w)`` for video."""
        dummy = self.tokenizer.trainer._dummy()
        shape = jax.eval_shape(lambda x: self.tokenizer.model.apply(
            {"params": self.tokenizer.params, **self.tokenizer.model_state}, x, method="encode").indices,
            dummy).shape
        return tuple(int(s) for s in shape[1:])

    # ------------------------------------------------------------------------ tokens
    def build_token_cache(self, max_examples: int | None = None) -> str:
        """Encodes the training split once (and its mirror with ``flip_augment``); cached.

        ``max_examples`` encodes only the first examples of the split (e.g. a few hundred video
        clips, where the whole split takes many CPU minutes through a 3D tokenizer). A cache made
        from the same tokenizer step is reused as is, whatever its size.
        """
        if token_data.cache_tokenizer_step(self.cache_path) == self.tokenizer.step:
            return self.cache_path
        from vqgen import data as vdata

        dc = self.config.data
        num_frames = getattr(self.tokenizer.model, "num_frames", None) or 16
        source = vdata.make_source(dc.source, "train", image_size=dc.image_size,
                                   data_dir=dc.data_dir or None, num_frames=int(num_frames), seed=self.config.seed)
        arrays = vdata.eval_arrays(source, max_examples=max_examples or None)
        t0 = time.perf_counter()
        views = [arrays["image"]]
        if self.config.generator_train.flip_augment:
            views.append(arrays["image"][..., ::-1, :])  # mirror the width axis (images and video)
        bs = self.config.generator_train.batch_size
        tokens = np.stack([self.tokenizer.encode(v, bs).reshape(len(v), -1) for v in views], axis=1)
        if parallel.is_main_process():
            token_data.write_token_cache(self.cache_path, tokens, arrays["label"], self.grid, self.tokenizer.step)
        logging.info("tokenised %d images (%d views) in %.1fs -> %s", len(tokens), len(views),
                     time.perf_counter() - t0, self.cache_path)
        return self.cache_path

    # ------------------------------------------------------------------------- state
    def init_state(self, rng: jax.Array) -> GeneratorState:
        params = self.family.init_params(self.model, rng)
        return GeneratorState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                              opt_state=self.tx.init(params))

    def create_state(self):
        return common.sharded_init(self.init_state, jax.random.key(self.config.seed + 7), self.mesh, self.rules)

    def train_step(self, state: GeneratorState, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: self.family.loss_fn(self.model, p, batch, rng), has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        ema = common.ema_update(state.ema_params, params, self.config.generator_train.ema_decay)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in {"loss": loss, **metrics}.items()}
        return GeneratorState(state.step + 1, params, ema, opt_state), metrics

    def compiled_step(self, shardings, max_traces: int = 1):
        rep = common.replicated(self.mesh)
        batch_sh = {"tokens": parallel.batch_sharding(self.mesh, 2), "label": parallel.batch_sharding(self.mesh, 1)}
        fn = chex.assert_max_traces(n=max_traces)(self.train_step)
        return jax.jit(fn, in_shardings=(shardings, batch_sh, rep), out_shardings=(shardings, rep), donate_argnums=0)

    def fingerprint(self) -> dict:
        return {"generator": json.loads(self.config.generator.to_json()), "vocab_size": self.tokenizer.vocab_size,
                "grid": list(self.grid), "num_classes": self.num_classes}

    def checkpointer(self) -> Checkpointer:
        gt = self.config.generator_train
        return Checkpointer(self.ckpt_dir, save_every=gt.save_every, keep=gt.keep, fingerprint=self.fingerprint())

    def put_batch(self, batch):
        return parallel.shard_batch({"tokens": batch["tokens"], "label": batch["label"]}, self.mesh)

    def train(self) -> GeneratorState:
        gt = self.config.generator_train
        source = token_data.TokenSource(self.build_token_cache())
        data_iter = token_data.make_token_pipeline(source, global_batch_size=gt.batch_size, seed=self.config.seed)
        ckpt = self.checkpointer()
        try:
            state, shardings = self.create_state()
            start = 0
            if ckpt.latest_step() is not None:
                state = ckpt.restore(state, data_iter)
                start = int(jax.device_get(state.step))
            if start < gt.num_steps:
                logging.info("training the generator from step %d to %d", start, gt.num_steps)
                writer = common.MetricWriter(os.path.join(self.workdir, "tb", "generator"))
                with parallel.mesh_context(self.mesh, self.rules):
                    state = common.run_loop(
                        step_fn=self.compiled_step(shardings), state=state, data_iter=data_iter,
                        put_batch=self.put_batch, rng=jax.random.key(self.config.seed + 2), frozen=(),
                        checkpointer=ckpt, writer=writer, start_step=start,
                        loop=common.LoopConfig(num_steps=gt.num_steps, log_every=gt.log_every,
                                               save_every=gt.save_every, image_every=gt.image_every,
                                               desc="generator"),
                        on_images=lambda step, st: writer.image(step, "samples", common.image_grid(
                            self.sample_images(st.ema_params, np.arange(self.num_classes), step)[0])))
                writer.close()
        finally:
            ckpt.close()
        return state

    def restore(self) -> GeneratorState:
        ckpt = self.checkpointer()
        try:
            if ckpt.latest_step() is None:
                raise FileNotFoundError(f"no generator checkpoint in {self.ckpt_dir}; run --mode=train_generator first.")
            state, _ = self.create_state()
            return ckpt.restore(state)
        finally:
            ckpt.close()

    # ------------------------------------------------------------------------ sample
    def sampler_options(self):
        return self.family.sampler_options(_plain(self.config.sample))

    def sample_images(self, params, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Samples one image per label: ``(uint8 images [N,H,W,C], token ids [N, ...])``."""
        opts = self.sampler_options()
        with parallel.mesh_context(self.mesh, self.rules):
            toks = self.family.sample(self.model, params, jnp.asarray(labels, jnp.int32),
                                      jax.random.key(seed), opts)
        toks = np.asarray(toks).reshape((len(labels),) + self.grid)
        return common.to_uint8(self.tokenizer.decode(toks)), toks


def token_grid_from_config(config) -> tuple[int, ...]:
    """Token-map shape of one example for the config's tokenizer (``jax.eval_shape``, no weights)."""
    trainer = TokenizerTrainer(config, workdir="/nonexistent")
    dummy = trainer._dummy()

    def indices(rng):
        rngs = {"params": rng, "dropout": rng, "codebook": rng, "quantizer": rng}
        out, _ = trainer.model.init_with_output(rngs, dummy, method="encode")
        return out.indices

    return tuple(int(s) for s in jax.eval_shape(indices, jax.random.key(0)).shape[1:])


def generator_param_count(config) -> int:
    family = family_module(config.generator.arch)
    model = family.build(_plain(config.generator), vocab_size=_vocab_from_config(config),
                         num_classes=config.data.num_classes, grid=token_grid_from_config(config))
    abstract = jax.eval_shape(lambda r: family.init_params(model, r), jax.random.key(0))
    return common.count_params(abstract)


def _vocab_from_config(config) -> int:
    q = config.tokenizer.quantizer
    if "codebook_size" in q:
        return int(q.codebook_size)
    if "levels" in q:
        return int(np.prod(q.levels))
    return 2 ** int(config.tokenizer.embed_dim)


def train_generator(config, workdir: str) -> dict:
    from vqgen.train.run import update_report

    trainer = GeneratorTrainer(config, workdir)
    state = trainer.train()
    metrics = {"steps": int(jax.device_get(state.step)), "params": common.count_params(state.params)}
    update_report(workdir, "generator", metrics)
    return metrics


def sample_to_workdir(config, workdir: str, trainer: GeneratorTrainer | None = None) -> str:
    """Writes ``samples/samples.npz`` (uint8 images, int32 labels) and ``samples/grid.png``."""
    from tqdm.auto import tqdm

    from vqgen.train.run import update_report

    trainer = trainer or GeneratorTrainer(config, workdir)
    state = trainer.restore()
    sc = config.sample
    params = state.ema_params if sc.use_ema else state.params
    labels = np.repeat(np.arange(trainer.num_classes, dtype=np.int32), sc.per_class)
    images, t0 = [], time.perf_counter()
    bs = sc.batch_size
    for i in tqdm(range(0, len(labels), bs), desc="sample", disable=not parallel.is_main_process()):
        lab = labels[i:i + bs]
        n = len(lab)
        if n < bs:
            lab = np.concatenate([lab, np.zeros(bs - n, np.int32)])
        imgs, _ = trainer.sample_images(params, lab, seed=config.seed * 1000 + 17 + i)
        images.append(imgs[:n])
    seconds = time.perf_counter() - t0
    images = np.concatenate(images)
    out_dir = os.path.join(workdir, "samples")
    path = os.path.join(out_dir, "samples.npz")
    if parallel.is_main_process():
        os.makedirs(out_dir, exist_ok=True)
        np.savez(path, images=images, labels=labels)
        per_row = min(sc.per_class, 10)
        rows = np.concatenate([images[labels == c][:per_row] for c in range(trainer.num_classes)])
        common.save_png(os.path.join(out_dir, "grid.png"), common.image_grid(rows, rows=trainer.num_classes))
    update_report(workdir, "sampling", {"num_samples": int(len(images)), "seconds": seconds,
                                        "seconds_per_image": seconds / len(images)})
    return path


def evaluate_workdir(config, workdir: str) -> dict:
    """Scores ``samples/samples.npz`` with the digit judge (and Inception when configured)."""
    from vqgen.train.run import update_report

    path = os.path.join(workdir, "samples", "samples.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no samples at {path}; run --mode=sample first.")
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    ec = config.evaluate
    metrics: dict[str, Any] = {}
    if ec.judge and config.data.source == "mnist":
        from vqgen.evaluation import judge as judge_lib

        judge = judge_lib.load_or_train_judge(os.path.join(workdir, "judge"), seed=config.seed)
        metrics.update(judge_lib.judge_metrics(judge, images, labels))
        metrics["judge_test_accuracy"] = float(judge.accuracy)
    if ec.inception_path and ec.reference_stats:
        from vqgen.evaluation import fid as fid_lib

        metrics.update(fid_lib.evaluate_files(path, ec.reference_stats, inception_path=ec.inception_path,
                                              batch_size=ec.batch_size))
    update_report(workdir, "samples", metrics)
    print(json.dumps({"samples": metrics}), flush=True)
    return metrics
