"""The generator phase: a generator family trained over a frozen tokenizer's tokens (or a KL
tokenizer's latents, or the images themselves: the family's ``INPUT_KIND``), and sampling.

1. :func:`build` turns a config into a :class:`~vqgen.train.common.Phase` whose step is the
   pure :func:`train_step` with the family's loss (``config.generator.arch`` picks the family of
   :data:`vqgen.generators.FAMILIES`); the token grid and vocabulary come from
   :func:`vqgen.train.builders.token_spec`, so no tokenizer weights are needed to build, compile
   or count it.
2. :func:`build_token_cache` encodes the training split once with the workdir's frozen tokenizer
   into ``tokens/train.npz`` (with ``flip_augment`` the mirrored images too, as LlamaGen does);
   it is rebuilt when the tokenizer checkpoint changes. A KL tokenizer's posteriors (mean and
   log-variance) go to ``tokens/latents.npz`` instead, and every batch draws its latents from
   them (MAR's cached training). A family over pixels reads the image pipeline directly.
3. :func:`load_generator` restores the trained weights as a :class:`TrainedGenerator`, which
   samples token ids (class-conditional, or a family's conditional tasks from condition clips)
   and decodes them through the tokenizer.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from vqgen import fileio, generators, parallel
from vqgen.checkpoint import Checkpointer
from vqgen.data import tokens as token_data
from vqgen.train import builders, common
from vqgen.train import tokenizer as tokenizer_lib

NAME = "generator"


@flax.struct.dataclass
class GeneratorState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def _plain(cfg) -> dict:
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def build_model(config, spec: builders.TokenSpec | None = None) -> tuple[ModuleType, nn.Module]:
    """``(family module, model)`` of ``config.generator`` over the config's input spec (token ids,
    a KL tokenizer's latents or the images, as the family's ``INPUT_KIND`` says)."""
    arch = config.generator.arch
    family = generators.family(arch)
    kind = generators.input_kind(family)
    spec = spec or builders.input_spec(config)
    num_classes = int(config.data.num_classes)
    if kind == "pixels":
        return family, family.build(_plain(config.generator), num_classes=num_classes,
                                    image_size=tuple(spec.example[:-1]), channels=int(spec.example[-1]))
    if kind == "latents":
        if spec.kind != "latents":
            raise ValueError(
                f"generator.arch={arch!r} models the continuous latents of a KL tokenizer but tokenizer.arch="
                f"{config.tokenizer.arch!r} gives discrete code ids; use tokenizer.arch='kl' (e.g. the tokenizer "
                "section of configs/tokenizers/kl16.py) or a generator over tokens such as 'gpt'.")
        return family, family.build(_plain(config.generator), num_classes=num_classes, grid=tuple(spec.grid),
                                    latent_dim=int(spec.latent_dim))
    if spec.kind == "latents":
        raise ValueError(
            f"generator.arch={arch!r} models discrete token ids but tokenizer.arch={config.tokenizer.arch!r} gives "
            "continuous latents; use generator.arch='mar', or a tokenizer with a quantizer (e.g. arch='vqgan').")
    if spec.vocab_size is None:
        raise ValueError("the generator needs a tokenizer with a discrete codebook (quantizer type vq, lfq, fsq, ibq, "
                         "rq or msrq).")
    if family.VIDEO != spec.video:
        kind = "video" if spec.video else "image"
        raise ValueError(
            f"generator.arch={arch!r} models {'video' if family.VIDEO else 'image'} tokens but "
            f"tokenizer.arch={config.tokenizer.arch!r} is an {kind} tokenizer; use "
            f"{'magvit' if spec.video else 'gpt or maskgit'} as the generator.")
    pyramid = generators.token_pyramid(family)
    if pyramid != (spec.scales is not None):
        raise ValueError(
            f"generator.arch={arch!r} models a multi-scale token pyramid but the tokenizer's quantizer "
            f"({config.tokenizer.quantizer.type!r}) gives one token map; use tokenizer.quantizer.type='msrq'."
            if pyramid else
            f"the tokenizer's multi-scale quantizer gives a token pyramid over scales {spec.scales}, which "
            f"generator.arch={arch!r} does not model; use generator.arch='var'.")
    extra = dict(scales=spec.scales, code_dim=spec.code_dim) if pyramid else {}
    model = family.build(_plain(config.generator), vocab_size=spec.vocab_size,
                         num_classes=int(config.data.num_classes), grid=spec.grid, **extra)
    return family, model


def quantizer_inputs(config, family: ModuleType) -> tuple[Any, Any]:
    """``(codec, abstract quantizer params)`` of the config's tokenizer, for a family that reads its
    quantizer (``USES_QUANTIZER``); shapes only, no weights are read."""
    model = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    variables = jax.eval_shape(functools.partial(tokenizer_lib.init_variables, model=model,
                                                 example=builders.example_shape(config)), jax.random.key(0))
    return family.quantizer_codec(model.quantizer), nn.meta.unbox(variables["params"]["quantizer"])


def train_step(state: GeneratorState, batch: dict, rng: jax.Array, *frozen: Any, loss_fn: Callable,
               tx: optax.GradientTransformation, ema_decay: float) -> tuple[GeneratorState, dict]:
    """One update with ``loss_fn(params, batch, rng, *frozen) -> (loss, metrics)`` (the family's
    loss; ``frozen`` is the tokenizer's quantizer params for a family that reads them, else empty)."""
    rng = jax.random.fold_in(rng, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng, *frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + u, state.params, updates)
    ema = common.ema_update(state.ema_params, params, ema_decay)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in {"loss": loss, **metrics}.items()}
    return GeneratorState(state.step + 1, params, ema, opt_state), metrics


def init_state(rng: jax.Array, *, init_params: Callable, tx: optax.GradientTransformation) -> GeneratorState:
    params = init_params(rng)
    return GeneratorState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))


def fingerprint(config, spec: builders.TokenSpec) -> dict:
    """What determines the generator's weights: its section, the vocabulary, grid and classes (and
    the latent width or image shape for a family over latents or pixels)."""
    out = {"generator": json.loads(config.generator.to_json()), "vocab_size": spec.vocab_size,
           "grid": list(spec.grid), "num_classes": int(config.data.num_classes)}
    if spec.kind == "latents":
        out["latent_dim"], out["latent_scale"] = int(spec.latent_dim), float(spec.latent_scale)
    elif spec.kind == "pixels":
        out["example"] = list(spec.example)
    return out


def _pixel_loss(params, batch, rng, *, loss_fn):
    """A family over pixels reads ``batch['images']``; the image pipeline gives ``'image'``."""
    return loss_fn(params, {"images": batch["image"], "label": batch["label"]}, rng)


def batch_spec(spec: builders.TokenSpec, batch_size: int) -> dict:
    """The generator step's batch: ``tokens`` int32 ``[B, L]``, ``latents`` float32 ``[B, h, w, C]``
    (scaled) or ``image`` float32 ``[B, H, W, C]`` (handed to a pixel family as ``'images'``),
    with ``label`` int32 ``[B]``."""
    label = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    if spec.kind == "latents":
        return {"latents": jax.ShapeDtypeStruct((batch_size,) + spec.token_shape, jnp.float32), "label": label}
    if spec.kind == "pixels":
        return {"image": jax.ShapeDtypeStruct((batch_size,) + spec.example, jnp.float32), "label": label}
    return {"tokens": jax.ShapeDtypeStruct((batch_size, spec.seq_len), jnp.int32), "label": label}


def _needs_tokenizer() -> tuple:
    raise ValueError("this generator reads the tokenizer's quantizer; train it through generator.train(config, "
                     "workdir), which loads the workdir's tokenizer.")


def build(config) -> common.Phase:
    """The generator phase of ``config`` (reads ``seed``, ``data``, ``tokenizer``, ``generator``,
    ``generator_train``); needs no tokenizer weights. For a family that reads the tokenizer's
    quantizer (VAR), its parameters are the phase's frozen input (abstract here; :func:`train`
    supplies the trained tokenizer's)."""
    gt = config.generator_train
    spec = builders.input_spec(config)
    family, model = build_model(config, spec)
    tx = common.make_optimizer(
        lr=gt.lr, num_steps=gt.num_steps, warmup_steps=gt.warmup_steps, schedule=gt.schedule,
        weight_decay=gt.weight_decay, b1=gt.b1, b2=gt.b2, grad_clip=gt.grad_clip,
        min_lr_ratio=float(gt.min_lr_ratio))
    loss_fn = functools.partial(family.loss_fn, model)
    frozen: tuple = ()
    if generators.uses_quantizer(family):
        codec, vq_abstract = quantizer_inputs(config, family)
        loss_fn = functools.partial(family.loss_fn, model, codec=codec)
        frozen = (vq_abstract,)
    if spec.kind == "pixels":
        loss_fn = functools.partial(_pixel_loss, loss_fn=loss_fn)
    bs = int(gt.batch_size)
    return common.Phase(
        name=NAME,
        init=functools.partial(init_state, init_params=functools.partial(family.init_params, model), tx=tx),
        step=functools.partial(train_step, loss_fn=loss_fn, tx=tx, ema_decay=float(gt.ema_decay)),
        batch=batch_spec(spec, bs),
        loop=common.LoopConfig(num_steps=int(gt.num_steps), log_every=int(gt.log_every), save_every=int(gt.save_every),
                               image_every=int(gt.image_every), desc=NAME),
        fingerprint=fingerprint(config, spec), init_seed=int(config.seed) + 7, step_seed=int(config.seed) + 2,
        keep=int(gt.keep), frozen=frozen, load_frozen=_needs_tokenizer if frozen else tuple)


# ---------------------------------------------------------------------------- tokens


def cache_path(workdir: str, kind: str = "tokens") -> str:
    """The training cache of the workdir's tokenizer: token ids, or a KL tokenizer's posteriors."""
    return fileio.join(workdir, "tokens", "latents.npz" if kind == "latents" else "train.npz")


def build_token_cache(config, workdir: str, tokenizer: tokenizer_lib.FrozenTokenizer,
                      max_examples: int | None = None, path: str | None = None) -> str:
    """Encodes the training split once (and its mirror with ``flip_augment``); cached.

    ``max_examples`` encodes only the first examples of the split (e.g. a few hundred video
    clips, where the whole split takes many CPU minutes through a 3D tokenizer); it defaults to
    ``config.video.cache_clips`` where the config has a ``video`` section. A cache made from the
    same tokenizer step is reused as is, whatever its size.
    """
    path = path or cache_path(workdir, tokenizer.spec.kind)
    if token_data.cache_tokenizer_step(path) == tokenizer.step:
        return path
    if max_examples is None and "video" in config:
        max_examples = int(config.video.cache_clips) or None
    arrays = tokenizer_lib.eval_images(config, "train", max_examples)
    t0 = time.perf_counter()
    views = [arrays["image"]]
    if config.generator_train.flip_augment:
        views.append(arrays["image"][..., ::-1, :])  # mirror the width axis (images and video)
    if tokenizer.spec.kind == "latents":  # the posteriors; the pipeline draws a latent per batch
        moments = [tokenizer.posterior(v, desc="encode") for v in views]
        if parallel.is_main_process():
            token_data.write_latent_cache(path, np.stack([m for m, _ in moments], axis=1),
                                          np.stack([lv for _, lv in moments], axis=1), arrays["label"],
                                          tokenizer.spec.grid, tokenizer.step)
        logging.info("encoded %d examples (%d views) in %.1fs -> %s", len(arrays["label"]), len(views),
                     time.perf_counter() - t0, path)
        return path
    tokens = np.stack([tokenizer.encode(v, desc="tokenise").reshape(len(v), -1) for v in views], axis=1)
    if parallel.is_main_process():
        token_data.write_token_cache(path, tokens, arrays["label"], tokenizer.spec.grid, tokenizer.step)
    logging.info("tokenised %d examples (%d views) in %.1fs -> %s", len(tokens), len(views),
                 time.perf_counter() - t0, path)
    return path


def make_data(config, path: str | None):
    """The shuffled, repeated stream of the generator phase (its state is checkpointed): the token
    or latent cache at ``path``, or for a family over pixels (``path=None``) the images of
    ``config.data``."""
    bs = int(config.generator_train.batch_size)
    if path is None:
        _, it = tokenizer_lib.make_data(config, "train", train=True, batch_size=bs)
        return it
    if token_data.is_latent_cache(path):
        return token_data.make_latent_pipeline(token_data.LatentSource(path), scale=builders.token_spec(config).latent_scale,
                                               global_batch_size=bs, seed=config.seed)
    source = token_data.TokenSource(path)
    return token_data.make_token_pipeline(source, global_batch_size=bs, seed=config.seed)


# --------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class TrainedGenerator:
    """A generator's weights with what samples from them: family, model, options, tokenizer.

    ``tokenizer`` may be None (a workdir without one): then token ids can be sampled but not
    decoded or conditioned on clips. A family over pixels has none and needs none: its samples
    are the images.
    """

    config: Any
    family: ModuleType
    model: nn.Module
    params: Any
    spec: builders.TokenSpec
    tokenizer: tokenizer_lib.FrozenTokenizer | None
    mesh: Any
    rules: Any
    step: int

    def _family_inputs(self) -> dict:
        """What the family's ``sample`` needs besides the model: the tokenizer's quantizer for one
        that reads it (``USES_QUANTIZER``)."""
        if not generators.uses_quantizer(self.family):
            return {}
        tok = self._need_tokenizer(f"sampling the {self.config.generator.arch!r} generator")
        return {"vq_params": tok.params["quantizer"], "codec": self.family.quantizer_codec(tok.model.quantizer)}

    def options(self, **overrides: Any):
        """The family's sampler options: the config's ``sample`` section with ``overrides``."""
        return self.family.sampler_options(_plain(self.config.sample), **overrides)

    def _need_tokenizer(self, what: str) -> tokenizer_lib.FrozenTokenizer:
        if self.tokenizer is None:
            raise ValueError(f"{what} needs the tokenizer, and this workdir has none; train one with "
                             "--mode=train_tokenizer or load a workdir that holds checkpoints/tokenizer.")
        return self.tokenizer

    def sample_tokens(self, labels: Any, rng: jax.Array, *, condition: np.ndarray | None = None,
                      batch_size: int | None = None, **options: Any) -> np.ndarray:
        """int32 token ids ``[N, *spec.token_shape]`` for class ids ``labels [N]`` (for a family over
        latents float32 scaled latent maps ``[N, h, w, C]``; over pixels float32 images in [-1, 1]).

        ``condition``: float clips in [-1, 1] ``[N, T, H, W, C]`` for a conditional task of the
        family (``task=...``, e.g. MAGVIT's frame prediction); their condition region is
        tokenised and kept. Batches of ``batch_size`` (default ``sample.batch_size``) use the keys
        ``fold_in(rng, i)`` for batch ``i``.
        """
        opts = self.options(**options)
        labels = np.asarray(labels, np.int32).reshape(-1)
        bs = int(batch_size or self.config.sample.batch_size)
        task = getattr(opts, "task", "class")
        counter = iter(range(len(labels)))

        def keys():
            return jax.random.fold_in(rng, next(counter))

        if task == "class":
            if condition is not None:
                raise ValueError("condition clips were given but the task is 'class'; pass task='frame_prediction' "
                                 "(or another task of the family) or drop condition.")

            inputs = self._family_inputs()

            def run(lab):
                with parallel.mesh_context(self.mesh, self.rules):
                    return self.family.sample(self.model, self.params, jnp.asarray(lab), keys(), opts, **inputs)

            tokens = common.map_batches(run, labels, bs)
        else:
            if not generators.has_tasks(self.family):
                raise ValueError(f"the {self.config.generator.arch!r} generator samples class-conditionally only; "
                                 "use task='class'.")
            if condition is None:
                raise ValueError(f"task {task!r} needs condition clips: pass condition=[N, T, H, W, C] in [-1, 1].")
            if len(condition) != len(labels):
                raise ValueError(f"got {len(condition)} condition clips for {len(labels)} labels; pass one clip per label.")
            known, video = self.family.condition_inputs(self.model, opts, np.asarray(condition, np.float32))
            ctoks = self._need_tokenizer(f"task {task!r}").encode(video).reshape(len(video), -1)

            def run(lab, tok, msk):
                with parallel.mesh_context(self.mesh, self.rules):
                    return self.family.sample_task(self.model, self.params, jnp.asarray(lab), keys(), opts,
                                                   tok, msk)

            tokens = common.map_batches(run, (labels, ctoks, known), bs)
        dtype = np.int32 if self.spec.kind == "tokens" else np.float32
        return np.asarray(tokens, dtype).reshape((len(labels),) + self.spec.token_shape)

    def decode(self, tokens: np.ndarray) -> np.ndarray:
        """float32 images in [-1, 1] of token ids ``[N, *spec.token_shape]`` (scaled latents for a
        family over latents; a family over pixels samples the images, returned clipped)."""
        if self.spec.kind == "pixels":
            return np.clip(np.asarray(tokens, np.float32), -1.0, 1.0)
        return self._need_tokenizer("decoding tokens to images").decode(tokens)

    def sample_images(self, labels: Any, rng: jax.Array, **options: Any) -> np.ndarray:
        """float32 images in [-1, 1] for class ids ``labels``: sampled, then decoded where needed."""
        return self.decode(self.sample_tokens(labels, rng, **options))


def _restore_params(config, workdir: str, mesh, rules, model, family, spec, use_ema: bool) -> tuple[Any, int]:
    """The generator's (EMA) parameters from the workdir, sharded on ``mesh``; nothing else is read."""
    ckpt = Checkpointer(fileio.join(workdir, "checkpoints", NAME), save_every=1, keep=1,
                        fingerprint=fingerprint(config, spec))
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no generator checkpoint in {ckpt.directory}; run --mode=train_generator first.")
        ckpt.check_compatible()
        target, _ = common.abstract_sharded(functools.partial(family.init_params, model), 0, mesh, rules)
        field = "ema_params" if use_ema else "params"
        restored, meta = ckpt.restore_subset({field: target})
    finally:
        ckpt.close()
    return restored[field], int(meta["step"])


def load_generator(config, workdir: str, mesh=None, *, use_ema: bool | None = None,
                   tokenizer: tokenizer_lib.FrozenTokenizer | None | bool = True) -> TrainedGenerator:
    """The workdir's trained generator (EMA weights unless ``use_ema=False`` or ``sample.use_ema``
    says otherwise) with its tokenizer when the workdir has one (``tokenizer=False``: none)."""
    mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
    rules = parallel.rules_from_config(config.logical_rules)
    spec = builders.input_spec(config)
    family, model = build_model(config, spec)
    use_ema = bool(config.sample.use_ema) if use_ema is None else use_ema
    params, step = _restore_params(config, workdir, mesh, rules, model, family, spec, use_ema)
    if spec.kind == "pixels":
        tokenizer = None
    if tokenizer is True:
        has = fileio.exists(fileio.join(workdir, "checkpoints", tokenizer_lib.NAME))  # local or gs://
        tokenizer = tokenizer_lib.load_frozen_tokenizer(config, workdir, mesh) if has else None
    return TrainedGenerator(config=config, family=family, model=model, params=params, spec=spec,
                            tokenizer=tokenizer or None, mesh=mesh, rules=rules, step=step)


# ----------------------------------------------------------------------------- train


def train(config, workdir: str, mesh=None, tokenizer: tokenizer_lib.FrozenTokenizer | None = None) -> GeneratorState:
    """Trains the generator phase in ``workdir`` (resuming) over the tokens of its tokenizer."""
    mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
    rules = parallel.rules_from_config(config.logical_rules)
    parallel.check_batch_size(config.generator_train.batch_size, mesh)
    phase = build(config)  # before the tokenizer: a bad generator config fails without reading weights
    if builders.generator_kind(config) == "pixels":  # the images themselves: no tokenizer, no cache
        tokenizer, spec = None, builders.pixel_spec(config)
        data_iter = make_data(config, None)
    else:
        tokenizer = tokenizer or tokenizer_lib.load_frozen_tokenizer(config, workdir, mesh)
        spec = tokenizer.spec
        if phase.frozen:  # the family reads the tokenizer's quantizer
            phase = dataclasses.replace(phase, load_frozen=lambda: (tokenizer.params["quantizer"],))
        data_iter = make_data(config, build_token_cache(config, workdir, tokenizer))
    family, model = build_model(config, spec)
    num_classes = int(config.data.num_classes)

    def on_images(writer, step, state):
        gen = TrainedGenerator(config=config, family=family, model=model, params=state.ema_params,
                               spec=spec, tokenizer=tokenizer, mesh=mesh, rules=rules, step=step)
        tokens = gen.sample_tokens(np.arange(num_classes), jax.random.key(step), batch_size=num_classes)
        images = gen.decode(tokens)
        writer.image(step, "samples", common.image_grid(images if images.ndim == 4 else images[:, 0]))

    return common.train_phase(phase, workdir=workdir, mesh=mesh, rules=rules, data_iter=data_iter,
                              on_images=on_images)
