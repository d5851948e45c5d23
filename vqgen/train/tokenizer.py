"""Tokenizer training: reconstruction + quantizer + perceptual + adversarial losses.

One jitted, donated step updates the tokenizer and the discriminator. The tokenizer's forward
pass runs once; ``jax.vjp`` of ``(nll + quantizer loss, GAN generator loss)`` is pulled back with
the cotangents (1, 0) and (0, 1) to get both gradients, whose norms at the decoder's last layer
give VQGAN's adaptive GAN weight. The discriminator then sees real images and the stop-gradient
reconstructions (hinge or non-saturating loss, LeCam and R1 regularisation).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqgen import parallel
from vqgen.checkpoint import Checkpointer
from vqgen.train import builders, common

QUANTIZER_RNGS = ("dropout", "codebook", "quantizer")


@flax.struct.dataclass
class TokenizerState:
    step: jax.Array
    params: Any
    ema_params: Any
    model_state: Any          # non-parameter collections (EMA codebooks, usage counters)
    opt_state: Any
    disc_params: Any          # None without a discriminator
    disc_opt_state: Any
    lecam: Any                # {"real": scalar, "fake": scalar} running means of D's logits


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The static (hashable) part of the loss, read once from the config."""
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual_weight: float = 0.0
    disc_weight: float = 0.0
    disc_start: int = 0
    gan_loss: str = "hinge"
    adaptive_weight: bool = True
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    r1_weight: float = 0.0
    ema_decay: float = 0.999


def _rngs(key: jax.Array) -> dict[str, jax.Array]:
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(QUANTIZER_RNGS)}


def _get_path(tree: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


class TokenizerTrainer:
    """Builds everything one tokenizer run needs from a config; ``train()`` resumes by itself.

    Args:
      config: the full (locked) run config; reads ``seed``, ``mesh_shape``, ``logical_rules``,
        ``data``, ``tokenizer``, ``tokenizer_train``.
      workdir: run directory (checkpoints under ``checkpoints/tokenizer``).
      mesh: optional mesh; defaults to one made from ``config.mesh_shape``.
    """

    def __init__(self, config, workdir: str, mesh=None):
        self.config = config
        self.workdir = workdir
        tc = config.tokenizer_train
        self.mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
        self.rules = parallel.rules_from_config(config.logical_rules)
        parallel.check_batch_size(tc.batch_size, self.mesh)
        self.channels = int(config.data.channels)
        self.image_size = int(config.data.image_size)
        self.model = builders.build_tokenizer(config.tokenizer, self.channels)
        self.disc = builders.build_discriminator(tc.disc, self.image_size) if tc.disc.weight > 0 else None
        self.loss_cfg = LossConfig(
            l1_weight=tc.l1_weight, l2_weight=tc.l2_weight, perceptual_weight=tc.perceptual_weight,
            disc_weight=tc.disc.weight if self.disc is not None else 0.0, disc_start=tc.disc.start_step,
            gan_loss=tc.disc.loss, adaptive_weight=tc.disc.adaptive_weight,
            lecam_weight=tc.disc.lecam_weight, lecam_decay=tc.disc.lecam_decay,
            r1_weight=tc.disc.r1_weight, ema_decay=tc.ema_decay)
        if self.loss_cfg.gan_loss not in ("hinge", "non_saturating"):
            raise ValueError(f"unknown GAN loss {self.loss_cfg.gan_loss!r}; use 'hinge' or 'non_saturating'.")
        self.tx = common.make_optimizer(
            lr=tc.lr, num_steps=tc.num_steps, warmup_steps=tc.warmup_steps, schedule=tc.schedule,
            weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2, grad_clip=tc.grad_clip)
        self.disc_tx = common.make_optimizer(
            lr=tc.disc.lr, num_steps=tc.num_steps, warmup_steps=0, schedule="constant",
            weight_decay=0.0, b1=tc.b1, b2=tc.b2, grad_clip=tc.grad_clip)
        self.perceptual = None
        if tc.perceptual_weight > 0:
            from vqgen.losses.perceptual import make_perceptual_loss
            self.perceptual = make_perceptual_loss(tc.lpips_path or None, config_key="tokenizer_train.lpips_path")
        self.ckpt_dir = os.path.join(workdir, "checkpoints", "tokenizer")
        self._step_fn = None

    # ----------------------------------------------------------------------------- state
    def _dummy(self, batch: int = 1) -> jax.Array:
        shape = (batch, self.image_size, self.image_size, self.channels)
        if getattr(self.model, "num_frames", None):
            shape = (batch, self.model.num_frames) + shape[1:]
        return jnp.zeros(shape, jnp.float32)

    def init_state(self, rng: jax.Array) -> TokenizerState:
        """A fresh (boxed) state; jit/eval_shape it, never call it eagerly on big models."""
        k_model, k_disc = jax.random.split(rng)
        variables = self.model.init({"params": k_model, **_rngs(k_model)}, self._dummy(), train=False)
        variables = dict(variables)
        params = variables.pop("params")
        disc_params = disc_opt = None
        if self.disc is not None:
            disc_params = self.disc.init(k_disc, self._dummy())["params"]
            disc_opt = self.disc_tx.init(disc_params)
        return TokenizerState(
            step=jnp.zeros((), jnp.int32), params=params, ema_params=params, model_state=variables,
            opt_state=self.tx.init(params), disc_params=disc_params, disc_opt_state=disc_opt,
            lecam={"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)})

    def create_state(self) -> tuple[TokenizerState, Any]:
        rng = jax.random.key(self.config.seed)
        return common.sharded_init(self.init_state, rng, self.mesh, self.rules)

    # ------------------------------------------------------------------------------ step
    def _apply(self, params, model_state, x, rng, train):
        variables = {"params": params, **model_state}
        mutable = (list(model_state.keys()) or False) if train else False
        out = self.model.apply(variables, x, train=train, rngs=_rngs(rng), mutable=mutable)
        if mutable:
            (x_rec, q), new_state = out
            new_state = {**model_state, **new_state}
        else:
            (x_rec, q), new_state = out, model_state
        return x_rec, q, new_state

    def train_step(self, state: TokenizerState, batch, rng, lpips_params):
        lc = self.loss_cfg
        rng = jax.random.fold_in(rng, state.step)
        x = batch["image"]
        x = nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
        disc = self.disc

        def d_apply(dp, img):
            return disc.apply({"params": dp}, img, train=True)

        def forward(params):
            x_rec, q, new_state = self._apply(params, state.model_state, x, rng, train=True)
            x_rec32, x32 = x_rec.astype(jnp.float32), x.astype(jnp.float32)
            l1 = jnp.mean(jnp.abs(x32 - x_rec32))
            l2 = jnp.mean(jnp.square(x32 - x_rec32))
            nll = lc.l1_weight * l1 + lc.l2_weight * l2
            p_loss = jnp.zeros((), jnp.float32)
            if self.perceptual is not None:
                p_loss = self.perceptual[0](lpips_params, x_rec32, x32)
                nll = nll + lc.perceptual_weight * p_loss
            g_loss = jnp.zeros((), jnp.float32)
            if disc is not None:
                logits_fake = d_apply(state.disc_params, x_rec).astype(jnp.float32)
                g_loss = (-jnp.mean(logits_fake) if lc.gan_loss == "hinge"
                          else jnp.mean(jax.nn.softplus(-logits_fake)))
            aux = dict(x_rec=x_rec, q=q, new_state=new_state, l1=l1, l2=l2, p_loss=p_loss, nll=nll)
            return (nll + q.loss, g_loss), aux

        (main_loss, g_loss), vjp_fn, aux = jax.vjp(forward, state.params, has_aux=True)
        (grads,) = vjp_fn((jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)))
        metrics = {"loss": main_loss, "l1": aux["l1"], "l2": aux["l2"], "nll": aux["nll"],
                   "quantizer_loss": aux["q"].loss}
        if self.perceptual is not None:
            metrics["perceptual"] = aux["p_loss"]
        metrics.update({f"q/{k}": v for k, v in aux["q"].metrics.items()})

        disc_params, disc_opt, lecam = state.disc_params, state.disc_opt_state, state.lecam
        if disc is not None:
            from vqgen.losses import adversarial as adv
            from vqgen.tokenizers.vqgan import LAST_LAYER

            (g_grads,) = vjp_fn((jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)))
            factor = adv.gan_start_factor(state.step, lc.disc_start)
            if lc.adaptive_weight:
                d_w = adv.adaptive_weight(_get_path(grads, LAST_LAYER), _get_path(g_grads, LAST_LAYER))
            else:
                d_w = jnp.ones((), jnp.float32)
            w = lc.disc_weight * factor * d_w
            grads = jax.tree.map(lambda a, b: a + w * b, grads, g_grads)
            fake = jax.lax.stop_gradient(aux["x_rec"])

            def d_loss_fn(dp):
                lr_ = d_apply(dp, x).astype(jnp.float32)
                lf_ = d_apply(dp, fake).astype(jnp.float32)
                loss = (adv.hinge_d_loss(lr_, lf_) if lc.gan_loss == "hinge"
                        else adv.non_saturating_d_loss(lr_, lf_))
                extra = {}
                if lc.lecam_weight > 0:
                    lec = adv.lecam_loss(lr_, lf_, lecam["real"], lecam["fake"])
                    loss = loss + lc.lecam_weight * lec
                    extra["lecam"] = lec
                if lc.r1_weight > 0:
                    r1 = adv.r1_penalty(d_apply, dp, x)
                    loss = loss + 0.5 * lc.r1_weight * r1
                    extra["r1"] = r1
                return factor * loss, (loss, lr_, lf_, extra)

            (_, (d_loss, lr_, lf_, extra)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
            d_updates, disc_opt = self.disc_tx.update(d_grads, disc_opt, disc_params)
            disc_params = jax.tree.map(lambda p, u: p + u, disc_params, d_updates)
            new_real, new_fake = adv.lecam_update_ema(lecam["real"], lecam["fake"], lr_, lf_, lc.lecam_decay)
            lecam = {"real": new_real, "fake": new_fake}
            metrics.update({"g_loss": g_loss, "d_loss": d_loss, "d_weight": d_w, "gan_factor": factor,
                            "logits_real": jnp.mean(lr_), "logits_fake": jnp.mean(lf_),
                            **{f"d/{k}": v for k, v in extra.items()}})

        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + u, state.params, updates)
        ema = common.ema_update(state.ema_params, params, lc.ema_decay)
        new_state = TokenizerState(
            step=state.step + 1, params=params, ema_params=ema, model_state=aux["new_state"],
            opt_state=opt_state, disc_params=disc_params, disc_opt_state=disc_opt, lecam=lecam)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return new_state, metrics

    def compiled_step(self, shardings, max_traces: int = 1):
        """The jitted, donated step with explicit shardings; traced at most ``max_traces`` times."""
        batch_sh = {"image": parallel.batch_sharding(self.mesh, 5 if getattr(self.model, "num_frames", None) else 4),
                    "label": parallel.batch_sharding(self.mesh, 1)}
        rep = common.replicated(self.mesh)
        lp_sh = None if self.perceptual is None else jax.tree.map(lambda _: rep, self.perceptual[1])
        fn = chex.assert_max_traces(n=max_traces)(self.train_step)
        return jax.jit(fn, in_shardings=(shardings, batch_sh, rep, lp_sh),
                       out_shardings=(shardings, rep), donate_argnums=0)

    # -------------------------------------------------------------------------- pipeline
    def make_data(self, split: str = "train", train: bool = True):
        from vqgen import data as vdata

        dc = self.config.data
        source = vdata.make_source(dc.source, split, image_size=dc.image_size, data_dir=dc.data_dir or None,
                                   num_frames=getattr(self.model, "num_frames", None) or 16, seed=self.config.seed)
        return source, vdata.make_pipeline(
            source, global_batch_size=self.config.tokenizer_train.batch_size, seed=self.config.seed,
            train=train, random_crop=dc.random_crop, random_flip=dc.random_flip)

    def put_batch(self, batch):
        return parallel.shard_batch({"image": batch["image"], "label": batch["label"]}, self.mesh)

    # ----------------------------------------------------------------------------- train
    def fingerprint(self) -> dict:
        return {"tokenizer": json.loads(self.config.tokenizer.to_json()),
                "channels": self.channels, "image_size": self.image_size,
                "discriminator": json.loads(self.config.tokenizer_train.disc.to_json())
                if self.disc is not None else None}

    def checkpointer(self) -> Checkpointer:
        tc = self.config.tokenizer_train
        return Checkpointer(self.ckpt_dir, save_every=tc.save_every, keep=tc.keep,
                            fingerprint=self.fingerprint())

    def restore_or_create(self, ckpt: Checkpointer, data_iter=None) -> tuple[TokenizerState, Any, int]:
        state, shardings = self.create_state()
        start = 0
        if ckpt.latest_step() is not None:
            state = ckpt.restore(state, data_iter)
            start = int(jax.device_get(state.step))
        return state, shardings, start

    def train(self) -> TokenizerState:
        """Trains to ``tokenizer_train.num_steps`` (resuming from the workdir) and evaluates."""
        tc = self.config.tokenizer_train
        _, data_iter = self.make_data("train", train=True)
        ckpt = self.checkpointer()
        try:
            state, shardings, start = self.restore_or_create(ckpt, data_iter)
            if start < tc.num_steps:
                logging.info("training the tokenizer from step %d to %d", start, tc.num_steps)
                writer = common.MetricWriter(os.path.join(self.workdir, "tb", "tokenizer"))
                step_fn = self.compiled_step(shardings)
                lp = None if self.perceptual is None else self.perceptual[1]
                with parallel.mesh_context(self.mesh, self.rules):
                    state = common.run_loop(
                        step_fn=step_fn, state=state, data_iter=data_iter, put_batch=self.put_batch,
                        rng=jax.random.key(self.config.seed + 1), frozen=(lp,), checkpointer=ckpt,
                        loop=common.LoopConfig(num_steps=tc.num_steps, log_every=tc.log_every,
                                               save_every=tc.save_every, image_every=tc.image_every,
                                               desc="tokenizer"),
                        writer=writer, start_step=start,
                        on_images=lambda step, st: self._log_images(writer, step, st))
                writer.close()
        finally:
            ckpt.close()
        return state

    # -------------------------------------------------------------------------- evaluate
    @functools.cached_property
    def _reconstruct(self):
        def rec(params, model_state, x):
            x_rec, q, _ = self._apply(params, model_state, x, jax.random.key(0), train=False)
            return jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0), q.indices
        return jax.jit(rec)

    def _log_images(self, writer, step, state):
        if not parallel.is_main_process():
            return
        from vqgen import data as vdata
        src, _ = self.make_data("test", train=False)
        x = vdata.eval_arrays(src, max_examples=8)["image"]
        with parallel.mesh_context(self.mesh, self.rules):
            x_rec, _ = self._reconstruct(state.ema_params, state.model_state, jnp.asarray(x))
        pair = np.concatenate([np.asarray(x), np.asarray(x_rec)], axis=0)
        if pair.ndim == 5:
            pair = pair[:, 0]
        writer.image(step, "reconstructions", common.image_grid(pair, rows=2))

    def evaluate(self, state: TokenizerState, max_examples: int | None = None) -> dict[str, float]:
        """PSNR, SSIM and codebook usage of the EMA tokenizer on the held-out split."""
        from vqgen import data as vdata
        from vqgen.evaluation import metrics as em

        src, _ = self.make_data("test", train=False)
        arrays = vdata.eval_arrays(src, max_examples=max_examples or self.config.data.eval_examples)
        images = arrays["image"]
        bs = self.config.tokenizer_train.batch_size
        psnrs, ssims, usage = [], [], None
        codebook_size = quantizer_codebook_size(self.model.quantizer)
        usage = em.CodebookAccumulator(codebook_size) if codebook_size else None
        t0 = time.perf_counter()
        with parallel.mesh_context(self.mesh, self.rules):
            for i in range(0, len(images), bs):
                x = images[i:i + bs]
                n = len(x)
                if n < bs:  # pad the last batch to keep one compiled shape
                    x = np.concatenate([x, np.repeat(x[-1:], bs - n, axis=0)])
                xs = parallel.shard_batch({"image": x}, self.mesh)["image"]
                x_rec, idx = self._reconstruct(state.ema_params, state.model_state, xs)
                x_rec = np.asarray(x_rec)[:n]
                frames = (lambda a: a.reshape((-1,) + a.shape[-3:]))
                psnrs.append(np.asarray(em.psnr(frames(x[:n]), frames(x_rec))))
                ssims.append(np.asarray(em.ssim(frames(x[:n]), frames(x_rec))))
                if usage is not None:
                    for ind in (idx if isinstance(idx, (tuple, list)) else [idx]):
                        usage.update(np.asarray(ind)[:n])
        out = {"psnr": float(np.mean(np.concatenate(psnrs))), "ssim": float(np.mean(np.concatenate(ssims))),
               "eval_images": int(len(images)), "eval_seconds": time.perf_counter() - t0}
        if usage is not None:
            out.update({f"codebook_{k}": float(v) for k, v in usage.result().items()})
        return out


def quantizer_codebook_size(q) -> int | None:
    """Number of codes of a quantizer module, or None where it has no discrete codebook."""
    for attr in ("codebook_size",):
        v = getattr(q, attr, None)
        if isinstance(v, int):
            return v
    levels = getattr(q, "levels", None)
    if levels is not None:
        return int(np.prod(levels))
    return None
