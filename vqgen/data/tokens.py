"""Token caches: a dataset pre-tokenised once by a frozen tokenizer, fed to generators by grain.

The cache is one ``.npz`` file in the workdir: ``tokens`` int32 ``[N, V, L]`` (``V`` views: the
image and, with flip augmentation, its horizontal mirror, as LlamaGen pre-tokenises), ``labels``
int32 ``[N]``, the token ``grid`` and the tokenizer step it was made from.
"""
from __future__ import annotations

import os

import grain
import numpy as np


class TokenSource:
    """Random-access source over a token cache: records ``{'tokens': [V, L], 'label': int32}``."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"token cache {path} does not exist; run --mode=train_generator to build it.")
        with np.load(path) as f:
            self.tokens = f["tokens"].astype(np.int32)
            self.labels = f["labels"].astype(np.int32)
            self.grid = tuple(int(g) for g in f["grid"])
        self.path = path

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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, tokens=np.asarray(tokens, np.int32), labels=np.asarray(labels, np.int32),
             grid=np.asarray(grid, np.int32), tokenizer_step=np.int64(tokenizer_step))
    os.replace(tmp, path)


def cache_tokenizer_step(path: str) -> int | None:
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return int(f["tokenizer_step"])


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
