"""The public Python API: trained (or converted) models from a workdir.

    import jax, vqgen

    tok = vqgen.load_tokenizer("runs/quickstart")
    tokens = tok.encode(images)                 # uint8 [N, 32, 32, 1] -> int32 [N, 8, 8]
    recon = tok.decode(tokens)                  # -> uint8 [N, 32, 32, 1]

    gen = vqgen.load_generator("runs/quickstart")
    images = gen.sample([0, 1, 2], jax.random.key(0), cfg_scale=2.0)   # uint8 [3, 32, 32, 1]
    tokens = gen.sample_tokens([7] * 8, jax.random.key(1), top_k=10)  # int32 [8, 8, 8]

Training and the other phases of the command line run from Python too (a notebook, a script):

    config = vqgen.load_config("quickstart")
    config.tokenizer_train.num_steps = 200
    report = vqgen.run(config, "runs/quickstart", mode="train_tokenizer")   # report.json as a dict
    images, labels = vqgen.load_images(config, "test", 16)                  # uint8 [16, 32, 32, 1]

A MaskGIT generator edits token maps: ``gen.edit_tokens(tokens, keep, labels, rng)`` keeps the
tokens where ``keep`` is true and generates the rest (inpainting a region, class editing).

A KL tokenizer (MAR's) gives and takes continuous latents instead of ids: float32
``[N, h, w, C]``, scaled by its ``scale_factor`` as a MAR generator reads them; ``gen.sample_tokens``
of a MAR generator returns such latents.

Images are as in ``samples/samples.npz``: uint8 ``[N, H, W, C]`` (video ``[N, T, H, W, C]``);
float arrays in [-1, 1] are accepted as input too. Options are those of the family's sampler
(``gen.option_names``): temperature, top_k, top_p, cfg_scale, cfg_schedule, cfg_interval, and
for MaskGIT/MAGVIT num_steps, choice_temperature, mask_schedule; MAGVIT's tasks take
``task=...`` with ``condition=clips``. A generator workdir without a tokenizer still loads and
samples tokens. Everything runs on the default devices (a mesh from ``config.mesh_shape``) or on
the ``mesh`` you pass; ``workdir`` may be local or ``gs://``.
"""
from __future__ import annotations

import inspect
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from vqgen import config_lib, fileio, parallel
from vqgen.train import common
from vqgen.train import generator as generator_lib
from vqgen.train import run as run_lib
from vqgen.train import tokenizer as tokenizer_lib

__all__ = ["Generator", "Tokenizer", "load_config_from_workdir", "load_generator", "load_images", "load_tokenizer",
           "run"]


def load_config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to ``<workdir>/config.json`` (locked)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the --workdir of a vqgen run (or a converted model).")
    config = ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))
    config.lock()
    return config


def _tuples(tree: Any) -> Any:
    """JSON lists back to the tuples the configs hold."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree


def _as_float_images(images: Any) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    x = x.astype(np.float32)
    if x.size and (x.min() < -1.0 - 1e-3 or x.max() > 1.0 + 1e-3):
        raise ValueError(f"float images must lie in [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                         "pass uint8 images or scale them to [-1, 1].")
    return x


class Tokenizer:
    """A trained tokenizer: ``encode(images) -> tokens`` and ``decode(tokens) -> images``."""

    def __init__(self, frozen: tokenizer_lib.FrozenTokenizer, config):
        self._frozen = frozen
        self.config = config
        self.spec = frozen.spec  # grid, vocab_size, example shape, scales (a multi-scale pyramid)
        self.step = frozen.step

    def encode(self, images: Any) -> np.ndarray:
        """int32 token ids ``[N, *spec.token_shape]`` of uint8 images ``[N, H, W, C]`` (or floats in
        [-1, 1]): the token grid, or for a multi-scale tokenizer (VAR) the pyramid ``[N, L]``, each
        scale's map flattened row-major, from the smallest scale on."""
        x = _as_float_images(images)
        if tuple(x.shape[1:]) != tuple(self.spec.example):
            raise ValueError(f"images have shape {tuple(x.shape[1:])} per example but this tokenizer reads "
                             f"{tuple(self.spec.example)}; resize them or load a tokenizer of that size.")
        return self._frozen.encode(x)

    def decode(self, tokens: Any) -> np.ndarray:
        """uint8 images ``[N, H, W, C]`` of token ids ``[N, *spec.token_shape]`` (or ``[N, L]``)."""
        t = np.asarray(tokens)
        if self.spec.kind == "latents":  # a KL tokenizer: scaled latent maps [N, h, w, C]
            if t.shape[1:] != self.spec.token_shape:
                raise ValueError(f"latents have shape {t.shape} but this KL tokenizer's latents are "
                                 f"[N, {', '.join(map(str, self.spec.token_shape))}]; pass latents of that shape.")
            return common.to_uint8(self._frozen.decode(t))
        if t.ndim < 2 or int(np.prod(t.shape[1:])) != self.spec.seq_len:
            raise ValueError(f"tokens have shape {t.shape} but this tokenizer's tokens are "
                             f"[N, {', '.join(map(str, self.spec.token_shape))}]; pass ids of that shape.")
        if self.spec.vocab_size and (t.min() < 0 or t.max() >= self.spec.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size}), got [{t.min()}, {t.max()}].")
        return common.to_uint8(self._frozen.decode(t))


class Generator:
    """A trained generator: ``sample(labels, rng, **options) -> images``, ``sample_tokens(...) -> tokens``."""

    def __init__(self, trained: generator_lib.TrainedGenerator):
        self._trained = trained
        self.config = trained.config
        self.spec = trained.spec
        self.step = trained.step
        self.tokenizer = Tokenizer(trained.tokenizer, trained.config) if trained.tokenizer is not None else None

    @property
    def option_names(self) -> tuple[str, ...]:
        """The sampling options of this family (keyword arguments of :meth:`sample`)."""
        return self._trained.family.SamplerOptions.keys()

    def sample_tokens(self, labels: Any, rng: jax.Array, *, condition: Any = None, batch_size: int | None = None,
                      **options: Any) -> np.ndarray:
        """int32 token ids ``[N, *spec.token_shape]`` for class ids ``labels``; ``condition``: uint8/float
        clips for a task."""
        labels = np.asarray(labels, np.int32).reshape(-1)
        num_classes = int(self.config.data.num_classes)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class ids must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
        cond = None if condition is None else _as_float_images(condition)
        return self._trained.sample_tokens(labels, rng, condition=cond, batch_size=batch_size or len(labels) or 1,
                                           **options)

    def sample(self, labels: Any, rng: jax.Array, **options: Any) -> np.ndarray:
        """uint8 images ``[N, H, W, C]`` (video ``[N, T, H, W, C]``) for class ids ``labels``."""
        return common.to_uint8(self._trained.decode(self.sample_tokens(labels, rng, **options)))

    def edit_tokens(self, tokens: Any, keep: Any, labels: Any, rng: jax.Array, *, batch_size: int | None = None,
                    **options: Any) -> np.ndarray:
        """int32 token ids ``[N, *spec.token_shape]`` that keep ``tokens`` where ``keep`` is true and
        generate the other positions for class ids ``labels`` (MaskGIT editing: inpainting a region
        of an encoded image, outpainting, re-drawing an image as another class).

        ``tokens``: ids ``[N, *spec.token_shape]`` (e.g. ``gen.tokenizer.encode(images)``); ``keep``:
        booleans of the same shape; ``options`` and ``batch_size`` as for :meth:`sample_tokens`, whose
        tokens this returns when ``keep`` is all false (same key, same options). The kept tokens are
        never changed; the mask schedule runs over the positions left to generate. Only a family
        whose sampler takes known tokens (MaskGIT) edits; others raise ``ValueError``.
        """
        trained = self._trained
        family = trained.family
        if "known_tokens" not in inspect.signature(family.sample).parameters:
            raise ValueError(f"the {self.config.generator.arch!r} generator cannot edit tokens (it samples whole "
                             "token maps); load a MaskGIT workdir (generator.arch='maskgit') to edit.")
        labels = np.asarray(labels, np.int32).reshape(-1)
        t, k = np.asarray(tokens), np.asarray(keep)
        want = (len(labels),) + tuple(self.spec.token_shape)
        if t.shape != want or k.shape != want:
            raise ValueError(f"tokens {t.shape} and keep {k.shape} must both have shape {want} (one token map per "
                             "label); pass ids from tokenizer.encode and a boolean mask of the same shape.")
        num_classes = int(self.config.data.num_classes)
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"class ids must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}].")
        opts = trained.options(**options)
        counter = iter(range(len(labels)))

        def run(lab, tok, msk):
            with parallel.mesh_context(trained.mesh, trained.rules):
                return family.sample(trained.model, trained.params, lab, jax.random.fold_in(rng, next(counter)),
                                     opts, known_tokens=tok, known_mask=msk)

        flat = (labels, t.reshape(len(labels), -1).astype(np.int32), k.reshape(len(labels), -1).astype(bool))
        out = common.map_batches(run, flat, int(batch_size or len(labels) or 1))
        return np.asarray(out, np.int32).reshape(want)


def load_tokenizer(workdir: str, mesh=None, config=None) -> Tokenizer:
    """The tokenizer trained in (or converted into) ``workdir``: its EMA weights."""
    workdir = fileio.display(workdir)  # Orbax reads absolute paths only
    config = config or load_config_from_workdir(workdir)
    mesh = mesh or _default_mesh(config)
    return Tokenizer(tokenizer_lib.load_frozen_tokenizer(config, workdir, mesh), config)


def load_generator(workdir: str, mesh=None, config=None, *, use_ema: bool | None = None) -> Generator:
    """The generator trained in (or converted into) ``workdir``, with its tokenizer when it has one."""
    workdir = fileio.display(workdir)  # Orbax reads absolute paths only
    config = config or load_config_from_workdir(workdir)
    mesh = mesh or _default_mesh(config)
    return Generator(generator_lib.load_generator(config, workdir, mesh, use_ema=use_ema))


def _default_mesh(config):
    return parallel.create_mesh(tuple(config.mesh_shape))


def run(config: ml_collections.ConfigDict | str, workdir: str, mode: str | None = None) -> dict:
    """Runs a phase of the command line from Python: what ``python -m vqgen.main --config=CONFIG
    --workdir=WORKDIR --mode=MODE`` does, in this process.

    ``config``: a config (``vqgen.load_config(...)``, its values may be changed first) or its name
    (``"quickstart:maskgit"``). ``mode``: ``train_tokenizer``, ``train_generator``, ``sample``,
    ``evaluate``, ``all`` or ``summary`` (default: the config's ``mode``, else ``all``). Running it
    again resumes from the last checkpoint. Returns the workdir's ``report.json`` as a dict (every
    final metric so far); ``summary`` returns the parameter counts and writes nothing. Bad input
    raises ``ValueError`` / ``FileNotFoundError`` with the sentence the command line prints.
    """
    if isinstance(config, str):
        config = config_lib.load_config(config)
    mode = mode or config.get("mode", "all")
    if mode == "summary":
        return run_lib.summary(config)
    workdir = fileio.display(workdir)  # Orbax writes absolute paths only
    run_lib.run(config, workdir, mode)
    path = fileio.join(workdir, "report.json")
    return json.loads(fileio.read_text(path)) if fileio.exists(path) else {}


def load_images(config: ml_collections.ConfigDict | str, split: str = "test",
                num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``num`` examples (all when None) of ``split`` (``train`` or ``test``) of the config's
    data source, as the tokenizers read them: uint8 images ``[N, H, W, C]`` (video ``[N, T, H, W,
    C]``) and int32 labels ``[N]``. ``config`` is a config or its name."""
    if isinstance(config, str):
        config = config_lib.load_config(config)
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not a split vqgen reads; use 'train' or 'test'.")
    arrays = tokenizer_lib.eval_images(config, split, num)
    return common.to_uint8(arrays["image"]), np.asarray(arrays["label"], np.int32)
