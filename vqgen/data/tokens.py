"""Token caches: a dataset pre-tokenised once by a frozen tokenizer, fed to generators by grain.

The cache is one ``.npz`` file in the workdir: ``tokens`` int32 ``[N, V, L]`` (``V`` views: the
image and, with flip augmentation, its horizontal mirror, as LlamaGen pre-tokenises), ``labels``
int32 ``[N]``, the token ``grid`` and the tokenizer step it was made from.

A KL tokenizer's cache (MAR's cached latents) holds its posteriors instead: ``mean`` and
``logvar`` float32 ``[N, V, h, w, C]`` (unscaled); every batch draws its latents
``scale * (mean + exp(logvar / 2) * eps)`` afresh (:class:`DrawLatents`, ``scale`` the tokenizer
config's ``scale_factor``), as MAR's training does from its cached moments.
"""
from __future__ import annotations

import grain
import numpy as np

from vqgen import fileio


class TokenSource:
    """Random-access source over a token cache (local or remote): records ``{'tokens': [V, L], 'label': int32}``."""

    def __init__(self, path: str):
        if not fileio.exists(path):
            raise FileNotFoundError(f"token cache {path} does not exist; run --mode=train_generator to build it.")
        f = fileio.load_npz(path)
        self.tokens = f["tokens"].astype(np.int32)
        self.labels = f["labels"].astype(np.int32)
        self.grid = tuple(int(g) for g in f["grid"])
        self.path = str(path)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"tokens": self.tokens[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"TokenSource(path={self.path!r}, n={len(self)})"


class PickView(grain.transforms.RandomMap):
    """Chooses one of the pre-tokenised views (original or flipped) at random."""

    def random_map(self, element, rng: np.random.Generator):
        tokens = element["tokens"]
        v = int(rng.integers(tokens.shape[0]))
        return {"tokens": tokens[v], "label": element["label"]}


def write_token_cache(path: str, tokens: np.ndarray, labels: np.ndarray, grid, tokenizer_step: int) -> None:
    """Writes the cache atomically (local or remote): a reader sees the old file or the new one."""
    fileio.save_npz(path, tokens=np.asarray(tokens, np.int32), labels=np.asarray(labels, np.int32),
                    grid=np.asarray(grid, np.int32), tokenizer_step=np.int64(tokenizer_step))


def cache_tokenizer_step(path: str) -> int | None:
    """The tokenizer step the cache at ``path`` was made from; None when there is none or it is unreadable."""
    if not fileio.exists(path):
        return None
    try:
        return int(fileio.load_npz(path)["tokenizer_step"])
    except (OSError, ValueError, KeyError):  # a cache cut short is rebuilt
        return None


def make_token_pipeline(source: TokenSource, *, global_batch_size: int, seed: int,
                        process_index: int | None = None, process_count: int | None = None):
    """Shuffled, repeated, batched token stream; ``get_state``/``set_state`` resume it exactly."""
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch_size % pc:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {pc} processes; "
                         f"use a multiple of {pc}.")
    ds = grain.MapDataset.source(source)[pi::pc].seed(seed).shuffle().repeat(None)
    ds = ds.random_map(PickView()).batch(global_batch_size // pc, drop_remainder=True)
    return ds.to_iter_dataset().__iter__()


# ------------------------------------------------------------------------------- latents


def write_latent_cache(path: str, mean: np.ndarray, logvar: np.ndarray, labels: np.ndarray, grid,
                       tokenizer_step: int) -> None:
    """Writes a KL tokenizer's posteriors ``[N, V, h, w, C]`` atomically (see the module docstring)."""
    fileio.save_npz(path, mean=np.asarray(mean, np.float32), logvar=np.asarray(logvar, np.float32),
                    labels=np.asarray(labels, np.int32), grid=np.asarray(grid, np.int32),
                    tokenizer_step=np.int64(tokenizer_step))


def is_latent_cache(path: str) -> bool:
    """Whether the cache at ``path`` holds latent posteriors (not token ids)."""
    return fileio.exists(path) and "mean" in fileio.load_npz(path)


class LatentSource:
    """Random-access source over a latent cache: records ``{'mean', 'logvar': [V, h, w, C], 'label'}``."""

    def __init__(self, path: str):
        if not fileio.exists(path):
            raise FileNotFoundError(f"latent cache {path} does not exist; run --mode=train_generator to build it.")
        f = fileio.load_npz(path)
        self.mean = f["mean"].astype(np.float32)
        self.logvar = f["logvar"].astype(np.float32)
        self.labels = f["labels"].astype(np.int32)
        self.path = str(path)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return {"mean": self.mean[i], "logvar": self.logvar[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"LatentSource(path={self.path!r}, n={len(self)})"


class DrawLatents(grain.transforms.RandomMap):
    """Picks one view at random and draws ``scale * (mean + exp(logvar / 2) * eps)`` from its posterior."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def random_map(self, element, rng: np.random.Generator):
        v = int(rng.integers(element["mean"].shape[0]))
        mean, logvar = element["mean"][v], element["logvar"][v]
        z = mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape).astype(np.float32)
        return {"latents": (self.scale * z).astype(np.float32), "label": element["label"]}


def make_latent_pipeline(source: LatentSource, *, scale: float, global_batch_size: int, seed: int,
                         process_index: int | None = None, process_count: int | None = None):
    """Shuffled, repeated, batched stream of drawn latents times ``scale``, ``{'latents': float32
    [B, h, w, C], 'label': int32 [B]}``."""
    import jax

    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch_size % pc:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {pc} processes; "
                         f"use a multiple of {pc}.")
    ds = grain.MapDataset.source(source)[pi::pc].seed(seed).shuffle().repeat(None)
    ds = ds.random_map(DrawLatents(scale)).batch(global_batch_size // pc, drop_remainder=True)
    return ds.to_iter_dataset().__iter__()
