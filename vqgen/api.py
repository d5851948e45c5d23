"""The public Python API: trained (or converted) models from a workdir.

    import jax, vqgen

    tok = vqgen.load_tokenizer("runs/quickstart")
    tokens = tok.encode(images)                 # uint8 [N, 32, 32, 1] -> int32 [N, 8, 8]
    recon = tok.decode(tokens)                  # -> uint8 [N, 32, 32, 1]

    gen = vqgen.load_generator("runs/quickstart")
    images = gen.sample([0, 1, 2], jax.random.key(0), cfg_scale=2.0)   # uint8 [3, 32, 32, 1]
    tokens = gen.sample_tokens([7] * 8, jax.random.key(1), top_k=10)  # int32 [8, 8, 8]

Images are as in ``samples/samples.npz``: uint8 ``[N, H, W, C]`` (video ``[N, T, H, W, C]``);
float arrays in [-1, 1] are accepted as input too. Options are those of the family's sampler
(``gen.option_names``): temperature, top_k, top_p, cfg_scale, cfg_schedule, cfg_interval, and
for MaskGIT/MAGVIT num_steps, choice_temperature, mask_schedule; MAGVIT's tasks take
``task=...`` with ``condition=clips``. A generator workdir without a tokenizer still loads and
samples tokens. Everything runs on the default devices (a mesh from ``config.mesh_shape``) or on
the ``mesh`` you pass; ``workdir`` may be local or ``gs://``.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from vqgen import parallel
from vqgen.train import common
from vqgen.train import generator as generator_lib
from vqgen.train import tokenizer as tokenizer_lib

__all__ = ["Generator", "Tokenizer", "load_config_from_workdir", "load_generator", "load_tokenizer"]


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


def load_tokenizer(workdir: str, mesh=None, config=None) -> Tokenizer:
    """The tokenizer trained in (or converted into) ``workdir``: its EMA weights."""
    config = config or load_config_from_workdir(workdir)
    mesh = mesh or _default_mesh(config)
    return Tokenizer(tokenizer_lib.load_frozen_tokenizer(config, str(workdir), mesh), config)


def load_generator(workdir: str, mesh=None, config=None, *, use_ema: bool | None = None) -> Generator:
    """The generator trained in (or converted into) ``workdir``, with its tokenizer when it has one."""
    config = config or load_config_from_workdir(workdir)
    mesh = mesh or _default_mesh(config)
    return Generator(generator_lib.load_generator(config, str(workdir), mesh, use_ema=use_ema))


def _default_mesh(config):
    return parallel.create_mesh(tuple(config.mesh_shape))
