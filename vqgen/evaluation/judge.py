"""A digit judge for the embedded MNIST digits, where no Inception weights exist.

A small CNN classifier trained on ``vqgen.data.embedded.load_mnist('train')`` and evaluated on
the held-out ``'test'`` split. It gives these numbers for class-conditional samples:

* ``judge_accuracy``: the fraction of samples the judge assigns to the class they were asked for;
* ``judge_fid``: the Fréchet distance between the samples' judge features (the penultimate,
  128-d layer, taken before its ReLU so that no feature is constant and the covariance is
  full-rank) and those of the embedded test digits;
* ``judge_precision`` / ``judge_recall``: improved precision and recall (k = 3) of the samples
  against the test digits in the same feature space: precision is the share of samples that
  look like some real digit, recall the share of real digits that some sample looks like, so a
  generator that draws one perfect digit per class scores high accuracy and precision but low
  recall.

:func:`real_reference_metrics` gives the same figures for real training digits drawn with the
samples' labels, the reference a generator's numbers are read against.

``load_or_train_judge(cache_dir)`` trains it once (seconds on a CPU) and caches its parameters
and held-out accuracy in ``cache_dir/digit_judge_seed<seed>.npz``. Where the environment names a
folder in ``VQGEN_JUDGE_CACHE``, a judge missing from ``cache_dir`` is first looked for there (and
copied into ``cache_dir``), and a newly trained one is kept there too, so that many workdirs share
one training.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from vqgen import fileio
from vqgen.data import embedded
from vqgen.evaluation import metrics

FEATURE_DIM = 128
_VERSION = 1  # bump when the architecture or training recipe changes: stale caches retrain
_EPOCHS = 6
_BATCH = 32
_LR = 2e-3


class DigitCNN(nn.Module):
    """conv5x5/2(32) -> conv3x3/2(64) -> dense(128) = features -> ReLU -> dense(10).

    Strided convolutions instead of max pools: the same accuracy, 3x faster to train on a CPU.
    """

    num_classes: int = embedded.NUM_CLASSES
    dropout: float = 0.25
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        def conv(features, kernel, name):
            return nn.Conv(
                features, (kernel, kernel), strides=(2, 2), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("height", "width", "conv_in", "conv_out")
                ),
            )

        def dense(features, axes, name):
            return nn.Dense(
                features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            )

        x = x.astype(self.dtype)
        x = nn.relu(conv(32, 5, "conv1")(x))  # [B, 16, 16, 32]
        x = nn.relu(conv(64, 3, "conv2")(x))  # [B, 8, 8, 64]
        x = x.reshape(x.shape[0], -1)  # [B, 4096]
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        feats = dense(FEATURE_DIM, ("embed", "mlp"), "fc1")(x)  # [B, 128], before the ReLU
        logits = dense(self.num_classes, ("mlp", "vocab"), "fc2")(
            nn.Dropout(self.dropout, deterministic=not train)(nn.relu(feats))
        )  # [B, 10]
        return logits.astype(jnp.float32), feats.astype(jnp.float32)


def _check_digits(images: Any) -> jax.Array:
    """Validates ``[N, 32, 32, 1]`` uint8 / [-1, 1] float digits and maps them to float [-1, 1]."""
    metrics.check_images(images, "digit images", channels=(1,))
    if tuple(np.shape(images)[1:3]) != (embedded.IMAGE_SIZE, embedded.IMAGE_SIZE):
        raise ValueError(
            f"digit images must be {embedded.IMAGE_SIZE}x{embedded.IMAGE_SIZE}, got "
            f"{np.shape(images)[1]}x{np.shape(images)[2]}; pass [N, 32, 32, 1] images like the embedded MNIST."
        )
    return metrics.to_unit_range(images)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: DigitCNN, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.apply({"params": params}, x)


@dataclasses.dataclass
class Judge:
    """A trained digit classifier: ``predict``, ``features`` and its held-out ``accuracy``."""

    params: Any
    accuracy: float
    model: DigitCNN = dataclasses.field(default_factory=DigitCNN)
    batch_size: int = 500
    _reference: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)

    def reference_features(self) -> np.ndarray:
        """Features of the embedded test digits (computed once), the judge-FID reference."""
        if self._reference is None:
            self._reference = self.features(embedded.load_mnist("test")[0])
        return self._reference

    def _run(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        x = _check_digits(images)
        logits, feats = [], []
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start : start + self.batch_size]
            pad = self.batch_size - chunk.shape[0]  # one compiled shape for every batch
            lg, ft = _apply(self.model, self.params, jnp.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0))))
            logits.append(np.asarray(lg)[: chunk.shape[0]])
            feats.append(np.asarray(ft)[: chunk.shape[0]])
        return np.concatenate(logits), np.concatenate(feats)

    def predict(self, images: Any) -> np.ndarray:
        """Class ids ``int32 [N]`` of uint8 ``[N, 32, 32, 1]`` or float ``[-1, 1]`` digits."""
        return self._run(images)[0].argmax(axis=-1).astype(np.int32)

    def features(self, images: Any) -> np.ndarray:
        """Penultimate-layer features ``float32 [N, 128]`` (before the ReLU)."""
        return self._run(images)[1]


def _augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random shifts of up to 2 pixels (the digits sit in a 2-pixel black border)."""
    out = np.empty_like(x)
    shifts = rng.integers(-2, 3, size=(len(x), 2))
    for i, (dy, dx) in enumerate(shifts):
        out[i] = np.roll(x[i], (dy, dx), axis=(0, 1))
    return out


def train_judge(seed: int = 0, epochs: int = _EPOCHS) -> Judge:
    """Trains the digit judge on the embedded train split; reports accuracy on the test split."""
    x_train, y_train = embedded.load_mnist("train")
    x_test, y_test = embedded.load_mnist("test")
    model = DigitCNN()
    key = jax.random.key(seed)
    params = nn.meta.unbox(model.init(key, jnp.zeros((1, 32, 32, 1), jnp.float32))["params"])
    steps_per_epoch = len(x_train) // _BATCH
    schedule = optax.cosine_decay_schedule(_LR, epochs * steps_per_epoch)
    tx = optax.adam(schedule)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y, rng):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    start = time.time()
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        xs = _augment(x_train[order], rng)
        for i in range(steps_per_epoch):
            sl = slice(i * _BATCH, (i + 1) * _BATCH)
            x = xs[sl].astype(np.float32) / 127.5 - 1.0
            rng_step = jax.random.fold_in(key, epoch * steps_per_epoch + i)
            params, opt_state, _ = step(params, opt_state, x, y_train[order][sl], rng_step)
    judge = Judge(params=params, accuracy=0.0, model=model)
    judge.accuracy = float(np.mean(judge.predict(x_test) == y_test))
    logging.info("digit judge trained in %.1fs: held-out accuracy %.4f", time.time() - start, judge.accuracy)
    return judge


def _cache_path(cache_dir: str, seed: int) -> str:
    return fileio.join(cache_dir, f"digit_judge_seed{seed}.npz")


SHARED_CACHE_ENV = "VQGEN_JUDGE_CACHE"


def _load_cached(path: str) -> Judge | None:
    """The judge cached at ``path``, or None when it is absent, stale or unreadable."""
    if not fileio.exists(path):
        return None
    try:
        z = fileio.load_npz(path)
    except (OSError, ValueError):  # cut short: trained again
        return None
    if int(z.get("__version__", -1)) != _VERSION:
        return None
    flat = {k: np.asarray(v) for k, v in z.items() if not k.startswith("__")}
    return Judge(params=traverse_util.unflatten_dict(flat, sep="/"), accuracy=float(z["__accuracy__"]))


def _save(path: str, judge: Judge) -> None:
    flat = traverse_util.flatten_dict(judge.params, sep="/")
    fileio.save_npz(path, __version__=_VERSION, __accuracy__=judge.accuracy,
                    **{k: np.asarray(v) for k, v in flat.items()})


def load_or_train_judge(cache_dir: str, seed: int = 0) -> Judge:
    """The digit judge, loaded from ``cache_dir`` (local or remote), else from the folder named by
    ``$VQGEN_JUDGE_CACHE`` when set, else trained; cached in both (atomically) where absent, stale
    or unreadable.

    Its held-out accuracy on the embedded test digits is in ``Judge.accuracy``.
    """
    path = _cache_path(cache_dir, seed)
    judge = _load_cached(path)
    if judge is not None:
        return judge
    shared = os.environ.get(SHARED_CACHE_ENV)
    shared_path = _cache_path(shared, seed) if shared else None
    judge = _load_cached(shared_path) if shared_path else None
    if judge is None:
        judge = train_judge(seed)
        if shared_path:
            _save(shared_path, judge)
    _save(path, judge)
    return judge


PR_NEIGHBOURS = 3  # k of improved precision and recall


def judge_metrics(judge: Judge, images: Any, labels: Any) -> dict[str, float]:
    """``{'judge_accuracy', 'judge_fid', 'judge_precision', 'judge_recall'}`` of class-conditional
    digit samples, the last three against the embedded test digits in the judge's feature space.

    Args:
      judge: from ``load_or_train_judge``.
      images: samples, uint8 ``[N, 32, 32, 1]`` or float in ``[-1, 1]``.
      labels: int ``[N]``, the class each sample was generated for.
    """
    labels = np.asarray(labels)
    if labels.shape != (np.shape(images)[0],):
        raise ValueError(
            f"labels have shape {labels.shape} for {np.shape(images)[0]} images; pass one class id per image."
        )
    logits, feats = judge._run(images)
    ref = judge.reference_features()
    precision, recall = metrics.precision_recall(ref, feats, k=PR_NEIGHBOURS)
    return {
        "judge_accuracy": float(np.mean(logits.argmax(-1) == labels)),
        "judge_fid": metrics.fid_from_activations(feats, ref),
        "judge_precision": precision,
        "judge_recall": recall,
    }


def real_reference_metrics(judge: Judge, labels: Any, seed: int = 0) -> dict[str, float]:
    """:func:`judge_metrics` of real training digits, one drawn (without replacement, by ``seed``)
    for each entry of ``labels``: what a generator that drew the training set itself would score
    with as many samples of the same classes. Keys carry a ``judge_real_`` prefix."""
    labels = np.asarray(labels).astype(np.int64)
    x_train, y_train = embedded.load_mnist("train")
    rng = np.random.default_rng(seed)
    pick = np.empty(labels.shape, np.int64)
    for c in np.unique(labels):
        wanted = np.flatnonzero(labels == c)
        pool = np.flatnonzero(y_train == c)
        if len(pool) == 0:
            raise ValueError(f"class {c} has no training digit; labels must be digits 0..9.")
        pick[wanted] = rng.choice(pool, size=len(wanted), replace=len(wanted) > len(pool))
    real = judge_metrics(judge, x_train[pick], labels)
    return {k.replace("judge_", "judge_real_", 1): v for k, v in real.items()}
