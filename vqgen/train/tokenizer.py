"""The tokenizer phase: reconstruction + quantizer + perceptual + adversarial losses.

:func:`build` turns a config into a :class:`~vqgen.train.common.Phase` whose step is the pure,
module-level :func:`train_step`; model, discriminator, optimisers and loss settings are static
arguments bound in with ``functools.partial``, so ahead-of-time compilation, benchmarks and tests
build the same step from the config alone.

The step is three parts:

- :func:`generator_losses`: the tokenizer's forward pass once, returning
  ``(nll + quantizer loss, GAN generator loss)``; ``jax.vjp`` pulls it back with the cotangents
  (1, 0) and (0, 1) to get both gradients, whose norms at the decoder's last layer give VQGAN's
  adaptive GAN weight (the layer is the model's ``last_layer`` parameter path where it names
  one, e.g. TiTok's pixel decoder under proxy codes, else the conv VQGAN's ``LAST_LAYER``);
- :func:`discriminator_loss`: real images against the stop-gradient reconstructions (hinge or
  non-saturating loss, LeCam and R1 regularisation);
- :func:`train_step`: combines them and applies the optimisers and the EMA.

A trained tokenizer is used as a value, :class:`FrozenTokenizer` (EMA weights and model state
only), restored by :func:`load_frozen_tokenizer` and checked against the tokenizer section alone:
changing a discriminator or optimiser key after training does not make a generator refuse it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqgen import data as vdata
from vqgen import fileio, parallel
from vqgen.checkpoint import Checkpointer, IncompatibleCheckpointError
from vqgen.evaluation import metrics as em
from vqgen.losses import adversarial as adv
from vqgen.losses import perceptual
from vqgen.tokenizers import LAST_LAYER
from vqgen.train import builders, common

QUANTIZER_RNGS = ("dropout", "codebook", "quantizer")
NAME = "tokenizer"


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


def apply_tokenizer(model: nn.Module, params: Any, model_state: dict, x: jax.Array, rng: jax.Array,
                    train: bool) -> tuple[jax.Array, Any, dict]:
    """``(reconstruction, QuantizerOutput, new model state)``; the state is updated only when training."""
    variables = {"params": params, **model_state}
    mutable = (list(model_state.keys()) or False) if train else False
    out = model.apply(variables, x, train=train, rngs=_rngs(rng), mutable=mutable)
    if mutable:
        (x_rec, q), new_state = out
        return x_rec, q, {**model_state, **new_state}
    x_rec, q = out
    return x_rec, q, model_state


def _disc_logits(disc: nn.Module, disc_params: Any, images: jax.Array) -> jax.Array:
    return disc.apply({"params": disc_params}, images, train=True).astype(jnp.float32)


def generator_losses(params: Any, state: TokenizerState, x: jax.Array, rng: jax.Array, lpips_params: Any, *,
                     model: nn.Module, disc: nn.Module | None, lc: LossConfig):
    """The tokenizer's side of the loss: ``((nll + quantizer loss, GAN generator loss), aux)``.

    ``nll`` is the weighted L1/L2 reconstruction error plus the LPIPS distance when
    ``lc.perceptual_weight > 0``; the GAN term is the discriminator's verdict on the
    reconstructions (zero without a discriminator). ``aux`` holds the reconstruction, the
    quantizer output, the new model state and the loss terms.
    """
    x_rec, q, new_state = apply_tokenizer(model, params, state.model_state, x, rng, train=True)
    x_rec32, x32 = x_rec.astype(jnp.float32), x.astype(jnp.float32)
    l1 = jnp.mean(jnp.abs(x32 - x_rec32))
    l2 = jnp.mean(jnp.square(x32 - x_rec32))
    nll = lc.l1_weight * l1 + lc.l2_weight * l2
    p_loss = jnp.zeros((), jnp.float32)
    if lc.perceptual_weight > 0:
        p_loss = jnp.mean(perceptual.LPIPS().apply({"params": jax.lax.stop_gradient(lpips_params)}, x_rec32, x32))
        nll = nll + lc.perceptual_weight * p_loss
    g_loss = jnp.zeros((), jnp.float32)
    if disc is not None:
        logits_fake = _disc_logits(disc, state.disc_params, x_rec)
        g_loss = -jnp.mean(logits_fake) if lc.gan_loss == "hinge" else jnp.mean(jax.nn.softplus(-logits_fake))
    aux = dict(x_rec=x_rec, q=q, new_state=new_state, l1=l1, l2=l2, p_loss=p_loss, nll=nll)
    return (nll + q.loss, g_loss), aux


def discriminator_loss(disc_params: Any, real: jax.Array, fake: jax.Array, lecam: dict, factor: jax.Array, *,
                       disc: nn.Module, lc: LossConfig):
    """``(factor * loss, (loss, logits_real, logits_fake, extra terms))`` of the discriminator."""
    logits_real = _disc_logits(disc, disc_params, real)
    logits_fake = _disc_logits(disc, disc_params, fake)
    loss = (adv.hinge_d_loss(logits_real, logits_fake) if lc.gan_loss == "hinge"
            else adv.non_saturating_d_loss(logits_real, logits_fake))
    extra = {}
    if lc.lecam_weight > 0:
        lec = adv.lecam_loss(logits_real, logits_fake, lecam["real"], lecam["fake"])
        loss = loss + lc.lecam_weight * lec
        extra["lecam"] = lec
    if lc.r1_weight > 0:
        r1 = adv.r1_penalty(lambda dp, img: _disc_logits(disc, dp, img), disc_params, real)
        loss = loss + 0.5 * lc.r1_weight * r1
        extra["r1"] = r1
    return factor * loss, (loss, logits_real, logits_fake, extra)


def _apply_updates(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), opt_state


def train_step(state: TokenizerState, batch: dict, rng: jax.Array, lpips_params: Any, *, model: nn.Module,
               disc: nn.Module | None, tx: optax.GradientTransformation,
               disc_tx: optax.GradientTransformation | None, lc: LossConfig) -> tuple[TokenizerState, dict]:
    """One update of the tokenizer (and its discriminator) on ``batch = {'image', 'label'}``."""
    rng = jax.random.fold_in(rng, state.step)
    x = batch["image"]
    x = nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
    forward = functools.partial(generator_losses, state=state, x=x, rng=rng, lpips_params=lpips_params,
                                model=model, disc=disc, lc=lc)
    (main_loss, g_loss), vjp_fn, aux = jax.vjp(forward, state.params, has_aux=True)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    (grads,) = vjp_fn((one, zero))
    metrics = {"loss": main_loss, "l1": aux["l1"], "l2": aux["l2"], "nll": aux["nll"], "quantizer_loss": aux["q"].loss}
    if lc.perceptual_weight > 0:
        metrics["perceptual"] = aux["p_loss"]
    metrics.update({f"q/{k}": v for k, v in aux["q"].metrics.items()})

    disc_params, disc_opt, lecam = state.disc_params, state.disc_opt_state, state.lecam
    if disc is not None:
        (g_grads,) = vjp_fn((zero, one))
        factor = adv.gan_start_factor(state.step, lc.disc_start)
        last = getattr(model, "last_layer", LAST_LAYER)  # the model's own last layer (ViT, TiTok proxy codes)
        d_w = (adv.adaptive_weight(_get_path(grads, last), _get_path(g_grads, last))
               if lc.adaptive_weight else one)
        w = lc.disc_weight * factor * d_w
        grads = jax.tree.map(lambda a, b: a + w * b, grads, g_grads)
        fake = jax.lax.stop_gradient(aux["x_rec"])
        (_, (d_loss, logits_real, logits_fake, extra)), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
            disc_params, x, fake, lecam, factor, disc=disc, lc=lc)
        disc_params, disc_opt = _apply_updates(disc_tx, d_grads, disc_opt, disc_params)
        new_real, new_fake = adv.lecam_update_ema(lecam["real"], lecam["fake"], logits_real, logits_fake,
                                                  lc.lecam_decay)
        lecam = {"real": new_real, "fake": new_fake}
        metrics.update({"g_loss": g_loss, "d_loss": d_loss, "d_weight": d_w, "gan_factor": factor,
                        "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake),
                        **{f"d/{k}": v for k, v in extra.items()}})

    params, opt_state = _apply_updates(tx, grads, state.opt_state, state.params)
    ema = common.ema_update(state.ema_params, params, lc.ema_decay)
    new_state = TokenizerState(
        step=state.step + 1, params=params, ema_params=ema, model_state=aux["new_state"], opt_state=opt_state,
        disc_params=disc_params, disc_opt_state=disc_opt, lecam=lecam)
    return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def init_state(rng: jax.Array, *, model: nn.Module, disc: nn.Module | None, tx: optax.GradientTransformation,
               disc_tx: optax.GradientTransformation | None, example: tuple[int, ...]) -> TokenizerState:
    """A fresh (boxed) state; jit/eval_shape it, never call it eagerly on big models."""
    k_model, k_disc = jax.random.split(rng)
    dummy = jnp.zeros((1,) + tuple(example), jnp.float32)
    variables = dict(model.init({"params": k_model, **_rngs(k_model)}, dummy, train=False))
    params = variables.pop("params")
    disc_params = disc_opt = None
    if disc is not None:
        disc_params = disc.init(k_disc, dummy)["params"]
        disc_opt = disc_tx.init(disc_params)
    zero = jnp.zeros((), jnp.float32)
    return TokenizerState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, model_state=variables,
                          opt_state=tx.init(params), disc_params=disc_params, disc_opt_state=disc_opt,
                          lecam={"real": zero, "fake": zero})


def architecture_fingerprint(config) -> dict:
    """What determines the tokenizer's weights and tokens: its section and the image channels. A KL
    tokenizer's ``scale_factor`` is left out: it scales the latents a generator reads, not the
    VAE's weights (the generator's fingerprint holds it), so it can be set after the VAE is trained."""
    section = json.loads(config.tokenizer.to_json())
    if section.get("arch") == "kl":
        section.pop("scale_factor", None)
    return {"tokenizer": section, "channels": int(config.data.channels)}


def build(config) -> common.Phase:
    """The tokenizer phase of ``config`` (reads ``seed``, ``data``, ``tokenizer``, ``tokenizer_train``)."""
    tc = config.tokenizer_train
    model = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
    example = builders.example_shape(config)
    disc = builders.build_discriminator(tc.disc, int(config.data.image_size)) if tc.disc.weight > 0 else None
    if tc.disc.loss not in ("hinge", "non_saturating"):
        raise ValueError(f"tokenizer_train.disc.loss={tc.disc.loss!r} is unknown; use 'hinge' or 'non_saturating'.")
    use_lpips = tc.perceptual_weight > 0 and bool(tc.lpips_path)
    if tc.perceptual_weight > 0 and not use_lpips:  # logs once that the term is off, and which key turns it on
        perceptual.make_perceptual_loss(None, config_key="tokenizer_train.lpips_path")
    lpips_frozen = (perceptual.abstract_params() if use_lpips else None,)
    lpips_path = tc.lpips_path

    def load_frozen() -> tuple:
        return (perceptual.load_lpips_params(lpips_path) if use_lpips else None,)

    lc = LossConfig(
        l1_weight=tc.l1_weight, l2_weight=tc.l2_weight, perceptual_weight=tc.perceptual_weight if use_lpips else 0.0,
        disc_weight=tc.disc.weight if disc is not None else 0.0, disc_start=tc.disc.start_step,
        gan_loss=tc.disc.loss, adaptive_weight=tc.disc.adaptive_weight, lecam_weight=tc.disc.lecam_weight,
        lecam_decay=tc.disc.lecam_decay, r1_weight=tc.disc.r1_weight, ema_decay=tc.ema_decay)
    tx = common.make_optimizer(
        lr=tc.lr, num_steps=tc.num_steps, warmup_steps=tc.warmup_steps, schedule=tc.schedule,
        weight_decay=tc.weight_decay, b1=tc.b1, b2=tc.b2, grad_clip=tc.grad_clip)
    disc_tx = None if disc is None else common.make_optimizer(
        lr=tc.disc.lr, num_steps=tc.num_steps, warmup_steps=0, schedule="constant", weight_decay=0.0,
        b1=tc.b1, b2=tc.b2, grad_clip=tc.grad_clip)
    bs = int(tc.batch_size)
    disc_arch = None if disc is None else {k: json.loads(tc.disc.to_json())[k] for k in DISC_ARCH_KEYS if k in tc.disc}
    return common.Phase(
        name=NAME,
        init=functools.partial(init_state, model=model, disc=disc, tx=tx, disc_tx=disc_tx, example=example),
        step=functools.partial(train_step, model=model, disc=disc, tx=tx, disc_tx=disc_tx, lc=lc),
        batch={"image": jax.ShapeDtypeStruct((bs,) + example, jnp.float32),
               "label": jax.ShapeDtypeStruct((bs,), jnp.int32)},
        frozen=lpips_frozen, load_frozen=load_frozen,
        loop=common.LoopConfig(num_steps=int(tc.num_steps), log_every=int(tc.log_every), save_every=int(tc.save_every),
                               image_every=int(tc.image_every), desc=NAME),
        fingerprint={**architecture_fingerprint(config), "discriminator": disc_arch},
        init_seed=int(config.seed), step_seed=int(config.seed) + 1, keep=int(tc.keep))


# Keys of tokenizer_train.disc that shape the discriminator's parameters (the rest are loss settings).
DISC_ARCH_KEYS = ("type", "ch", "n_layers", "norm", "ch_mult")


# ------------------------------------------------------------------------------ data


def make_data(config, split: str = "train", train: bool = True, batch_size: int | None = None):
    """``(source, iterator)`` of the tokenizer's input for ``split``."""
    dc = config.data
    example = builders.example_shape(config)
    source = vdata.make_source(dc.source, split, image_size=dc.image_size, data_dir=dc.data_dir or None,
                               num_frames=example[0] if len(example) == 4 else 16, seed=config.seed,
                               resize=dc.get("resize", "center_crop"))
    return source, vdata.make_pipeline(
        source, global_batch_size=batch_size or _batch_size(config), seed=config.seed, train=train,
        random_crop=dc.random_crop, random_flip=dc.random_flip)


def _batch_size(config) -> int:
    """The tokenizer's batch size; a config without a tokenizer (a family over pixels) uses the generator's."""
    section = config.tokenizer_train if "tokenizer_train" in config else config.generator_train
    return int(section.batch_size)


def eval_images(config, split: str = "test", max_examples: int | None = None) -> dict[str, np.ndarray]:
    """The first ``max_examples`` examples of ``split`` as float arrays (``{'image', 'label'}``)."""
    source, _ = make_data(config, split, train=False)
    return vdata.eval_arrays(source, max_examples=max_examples)


# --------------------------------------------------------------------- frozen tokenizer


@dataclasses.dataclass
class FrozenTokenizer:
    """A trained tokenizer as a value: the module, its EMA weights and model state.

    ``encode`` maps float images in [-1, 1] (``[N, H, W, C]``, video ``[N, T, H, W, C]``) to code
    ids ``[N, *spec.token_shape]`` (the grid; the flattened pyramid for a multi-scale tokenizer); ``decode`` maps ids back to float images clipped to [-1, 1]. Both
    run in fixed-size batches (the last one padded) on ``mesh``.

    A KL tokenizer (``spec.kind == 'latents'``) has no ids: ``encode`` gives its posterior means
    times ``spec.latent_scale`` (float32 ``[N, h, w, C]``, what a generator over latents reads),
    ``decode`` divides such latents by the scale and decodes them, and ``posterior`` gives the
    unscaled ``(mean, logvar)``.
    """

    model: nn.Module
    params: Any
    model_state: dict
    step: int
    spec: builders.TokenSpec
    mesh: Any
    rules: Any
    batch_size: int = 32

    def __post_init__(self):
        model, scales = self.model, self.spec.scales

        def decode(p, s, ids):  # ids [B, *token_shape]
            if scales is not None:
                ids = builders.split_pyramid(ids, scales)
            images = model.apply({"params": p, **s}, ids, method="decode_indices")
            return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

        self._encode = jax.jit(lambda p, s, x: builders.flat_indices(
            model.apply({"params": p, **s}, x, method="encode").indices))
        self._decode = jax.jit(decode)
        if self.spec.kind == "latents":
            scale = float(self.spec.latent_scale)

            def decode_latents(p, s, z):  # z [B, h, w, C], scaled
                images = model.apply({"params": p, **s}, z / scale, method="decode")
                return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)

            self._encode = jax.jit(lambda p, s, x: model.apply({"params": p, **s}, x, method="posterior")[0] * scale)
            self._decode = jax.jit(decode_latents)
            self._posterior = jax.jit(lambda p, s, x: model.apply({"params": p, **s}, x, method="posterior"))
        self._reconstruct = jax.jit(lambda p, s, x: _reconstruct(model, p, s, x))
        self._prefix: dict = {}

    def call(self, fn, *batch: np.ndarray) -> Any:
        """``fn(params, model_state, *batch)`` on one batch sharded over the mesh, fetched to the host."""
        with parallel.mesh_context(self.mesh, self.rules):
            return jax.device_get(fn(self.params, self.model_state, *parallel.shard_batch(batch, self.mesh)))

    def _run(self, fn, *arrays, desc=None):
        return common.map_batches(functools.partial(self.call, fn), arrays, self.batch_size, desc=desc)

    def encode(self, images: np.ndarray, desc: str | None = None) -> np.ndarray:
        """int32 code ids ``[N, *spec.token_shape]`` of float images in [-1, 1] (the grid, or the
        flattened pyramid ``[N, L]`` of a multi-scale tokenizer)."""
        out = self._run(self._encode, np.asarray(images, np.float32), desc=desc)
        if self.spec.kind == "latents":
            return np.asarray(out, np.float32)
        ids = out.astype(np.int32)
        return ids.reshape((len(ids),) + self.spec.token_shape)

    def posterior(self, images: np.ndarray, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A KL tokenizer's unscaled posterior ``(mean, logvar)``, float32 ``[N, h, w, C]`` each."""
        if self.spec.kind != "latents":
            raise ValueError("posterior needs a KL tokenizer (tokenizer.arch='kl'); a VQ tokenizer gives code ids.")
        return self._run(self._posterior, np.asarray(images, np.float32), desc=desc)

    def decode(self, indices: np.ndarray) -> np.ndarray:
        """float32 images in [-1, 1] of code ids ``[N, *spec.token_shape]`` (or ``[N, L]``; scaled
        latents ``[N, h, w, C]`` for a KL tokenizer)."""
        if self.spec.kind == "latents":
            z = np.asarray(indices, np.float32)
            if z.shape[1:] != self.spec.token_shape:
                raise ValueError(f"latents of shape {z.shape} are not [N, {', '.join(map(str, self.spec.token_shape))}]"
                                 f"; pass this KL tokenizer's latent maps ({self.spec.latent_dim} channels).")
            return self._run(self._decode, z)
        ids = np.asarray(indices, np.int32)
        if ids.size != len(ids) * self.spec.seq_len:
            raise ValueError(f"token ids of shape {ids.shape} do not hold {self.spec.seq_len} tokens per example; pass "
                             f"[N, {', '.join(map(str, self.spec.token_shape))}] ids of this tokenizer.")
        return self._run(self._decode, ids.reshape((len(ids),) + self.spec.token_shape))

    def decode_scales(self, indices: np.ndarray, num_scales: int) -> np.ndarray:
        """float32 images in [-1, 1] from the first ``num_scales`` scales of token pyramids ``[N, L]``
        (a multi-scale tokenizer's coarse-to-fine reconstructions; ``num_scales = len(scales)`` is
        :meth:`decode`)."""
        scales = self.spec.scales
        if scales is None:
            raise ValueError("decode_scales needs a multi-scale tokenizer (quantizer type 'msrq'); use decode.")
        if not 1 <= num_scales <= len(scales):
            raise ValueError(f"num_scales={num_scales} must lie in [1, {len(scales)}] for scales {scales}.")
        if num_scales not in self._prefix:
            model = self.model

            def partial(p, s, ids):
                maps = builders.split_pyramid(ids, scales)
                variables = {"params": p, **s}
                f_hat = model.apply(variables, maps, method=lambda m, x: m.quantizer.decode_indices(x, num_scales))
                return jnp.clip(model.apply(variables, f_hat, method="decode").astype(jnp.float32), -1.0, 1.0)

            self._prefix[num_scales] = jax.jit(partial)
        ids = np.asarray(indices, np.int32).reshape(len(indices), -1)
        return self._run(self._prefix[num_scales], ids)

    def reconstruct(self, images: np.ndarray) -> tuple[np.ndarray, Any]:
        """``(reconstructions clipped to [-1, 1], code ids)`` of float images (one forward pass)."""
        return self._run(self._reconstruct, np.asarray(images, np.float32))


def _reconstruct(model, params, model_state, x):
    x_rec, q, _ = apply_tokenizer(model, params, model_state, x, jax.random.key(0), train=False)
    return jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0), builders.flat_indices(q.indices)


def inference_batch_size(config) -> int:
    """The frozen tokenizer's batch (encoding the token cache, decoding samples, evaluation):
    ``tokenizer_train.eval_batch_size``, or the training batch where that is 0 or absent. Without
    gradients, optimiser or discriminator a larger batch fits, and far fewer calls tokenise a
    dataset than at the training batch."""
    tc = config.tokenizer_train
    return int(tc.get("eval_batch_size", 0) or tc.batch_size)


def frozen_from_state(config, state: TokenizerState, mesh=None) -> FrozenTokenizer:
    """The EMA tokenizer of a train state (the one just trained)."""
    mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
    return FrozenTokenizer(
        model=builders.build_tokenizer(config.tokenizer, int(config.data.channels)), params=state.ema_params,
        model_state=state.model_state, step=int(jax.device_get(state.step)), spec=builders.token_spec(config),
        mesh=mesh, rules=parallel.rules_from_config(config.logical_rules),
        batch_size=inference_batch_size(config))


def load_frozen_tokenizer(config, workdir: str, mesh=None) -> FrozenTokenizer:
    """The workdir's trained tokenizer: its EMA weights and model state, nothing else.

    Raises ``FileNotFoundError`` when there is no tokenizer checkpoint and
    :class:`~vqgen.checkpoint.IncompatibleCheckpointError` when it was trained with another
    tokenizer architecture (its ``tokenizer`` section or image channels differ).
    """
    mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
    rules = parallel.rules_from_config(config.logical_rules)
    directory = fileio.join(workdir, "checkpoints", NAME)
    ckpt = Checkpointer(directory, save_every=1, keep=1)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(
                f"no tokenizer checkpoint in {directory}; run --mode=train_tokenizer with this --workdir first "
                "(or --mode=all).")
        check_architecture(config, ckpt)
        model = builders.build_tokenizer(config.tokenizer, int(config.data.channels))
        target, _ = common.abstract_sharded(
            functools.partial(init_variables, model=model, example=builders.example_shape(config)), 0, mesh, rules)
        params_target = target.pop("params")
        wanted = {"ema_params": params_target, **({"model_state": target} if target else {})}
        restored, meta = ckpt.restore_subset(wanted)
    finally:
        ckpt.close()
    return FrozenTokenizer(model=model, params=restored["ema_params"], model_state=restored.get("model_state", {}),
                           step=int(meta["step"]), spec=builders.token_spec(config), mesh=mesh, rules=rules,
                           batch_size=inference_batch_size(config))


def check_architecture(config, ckpt: Checkpointer) -> None:
    """Raises :class:`IncompatibleCheckpointError` (one sentence) when the tokenizer checkpoint of
    ``ckpt`` was trained with another tokenizer architecture than ``config``'s."""
    want = architecture_fingerprint(config)
    stored = ckpt.read_meta().get("fingerprint", {})
    diffs = _diff_keys({k: stored.get(k) for k in want}, want)
    if diffs:
        raise IncompatibleCheckpointError(
            f"the tokenizer in {ckpt.directory} was trained with another tokenizer architecture "
            f"({'; '.join(diffs[:3])}); use the config it was trained with, or train a tokenizer for this config "
            "in a new --workdir.")


def init_variables(rng, *, model, example):
    """The tokenizer's variables (boxed) for an example shape; under ``jax.eval_shape`` their shapes."""
    variables = model.init({"params": rng, **_rngs(rng)}, jnp.zeros((1,) + tuple(example), jnp.float32), train=False)
    return dict(variables)


def _diff_keys(stored: dict, want: dict, prefix: str = "") -> list[str]:
    """``'key: checkpoint X vs config Y'`` for every leaf where two nested dicts differ."""
    out = []
    for k in sorted(set(stored) | set(want)):
        a, b = stored.get(k), want.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} vs config {b!r}")
    return out


# ---------------------------------------------------------------------------- evaluate


def evaluate(config, tokenizer: FrozenTokenizer, max_examples: int | None = None) -> dict[str, float]:
    """PSNR, SSIM and codebook usage of the (EMA) tokenizer on the held-out split; for a multi-scale
    tokenizer also ``psnr_by_scale``, the PSNR of the reconstruction from the first 1, 2, ...
    scales."""
    images = eval_images(config, "test", max_examples or config.data.eval_examples)["image"]
    usage = em.CodebookAccumulator(tokenizer.spec.vocab_size) if tokenizer.spec.vocab_size else None
    frames = lambda a: a.reshape((-1,) + a.shape[-3:])  # noqa: E731  video clips -> frames

    def score(x):  # per batch, so no second copy of the split is held
        x_rec, indices = tokenizer.call(tokenizer._reconstruct, x)
        n = len(x)
        return (np.asarray(em.psnr(frames(x), frames(x_rec))).reshape(n, -1),
                np.asarray(em.ssim(frames(x), frames(x_rec))).reshape(n, -1), np.asarray(indices))

    t0 = time.perf_counter()
    psnr, ssim, indices = common.map_batches(score, images, tokenizer.batch_size)
    out = {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)), "eval_images": int(len(images)),
           "eval_seconds": time.perf_counter() - t0}
    if usage is not None:
        usage.update(indices)
        out.update({f"codebook_{k}": float(v) for k, v in usage.result().items()})
    if tokenizer.spec.kind == "latents":  # the scaled latents a generator reads: near unit std is the aim
        scaled = tokenizer.encode(images[:256])  # the posterior means times spec.latent_scale
        out["scaled_latent_std"] = float(np.std(scaled))
        out["latent_std"] = float(np.std(scaled) / tokenizer.spec.latent_scale)  # 1 / a scale_factor to aim for
    if tokenizer.spec.scales is not None:  # coarse to fine: PSNR of the first k scales' reconstruction
        out["psnr_by_scale"] = [
            float(np.mean(em.psnr(images, tokenizer.decode_scales(indices, k))))
            for k in range(1, len(tokenizer.spec.scales) + 1)]
    return out


def log_reconstructions(config, writer: common.MetricWriter, step: int, state: TokenizerState, mesh) -> None:
    """Eight held-out images over their EMA reconstructions, as a TensorBoard image."""
    if not parallel.is_main_process():
        return
    x = eval_images(config, "test", 8)["image"]
    x_rec, _ = frozen_from_state(config, state, mesh).reconstruct(x)
    pair = np.concatenate([x, x_rec], axis=0)
    if pair.ndim == 5:
        pair = pair[:, 0]
    writer.image(step, "reconstructions", common.image_grid(pair, rows=2))


def train(config, workdir: str, mesh=None) -> TokenizerState:
    """Trains the tokenizer phase of ``config`` in ``workdir`` (resuming), returns the final state."""
    mesh = mesh or parallel.create_mesh(tuple(config.mesh_shape))
    parallel.check_batch_size(config.tokenizer_train.batch_size, mesh)
    n = parallel.data_parallel_size(mesh)
    if inference_batch_size(config) % n:
        raise ValueError(f"tokenizer_train.eval_batch_size={inference_batch_size(config)} is not divisible by the {n} "
                         f"devices of the data axes; set it to a multiple of {n} (or 0 for the training batch).")
    phase = build(config)
    _, data_iter = make_data(config, "train", train=True)
    return common.train_phase(
        phase, workdir=workdir, mesh=mesh, rules=parallel.rules_from_config(config.logical_rules),
        data_iter=data_iter, on_images=lambda writer, step, st: log_reconstructions(config, writer, step, st, mesh))
