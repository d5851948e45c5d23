"""Evaluation metrics computed the way the papers of this field report them.

* Fréchet distance (FID, sFID, rFID, judge FID): float64 NumPy/SciPy, the formula of pytorch-fid
  and of the ADM evaluator, including their handling of a near-singular covariance product.
* Inception Score: ``exp(E_x KL(p(y|x) || p(y)))`` averaged over splits (improved-GAN / ADM).
* Improved precision and recall (Kynkäänniemi et al. 2019) with ``k = 3`` nearest-neighbour
  manifolds, as in the ADM evaluator, with the pairwise distances computed block by block under
  ``jax.jit``.
* Reference statistics in the ADM evaluator's ``.npz`` layout: ``mu``, ``sigma`` (pool_3) and
  ``mu_s``, ``sigma_s`` (spatial ``mixed_6/conv``), images as ``arr_0``.
* PSNR and SSIM (Gaussian window 11, sigma 1.5, population covariance, as
  ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``).
* Codebook usage, code entropy and perplexity over a whole evaluation set.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

from vqgen import fileio

# ----------------------------------------------------------------------------------------------
# Image checks shared by every metric that reads images.


def check_images(images: Any, name: str = "images", channels: Sequence[int] | None = None) -> np.ndarray | jax.Array:
    """Validates an image batch: uint8 in [0, 255] or float in [-1, 1], shape ``[N, H, W, C]``.

    Returns the input unchanged; raises ``ValueError`` with one sentence naming the problem.
    """
    shape = np.shape(images)
    if len(shape) != 4:
        raise ValueError(
            f"{name} must have shape [N, H, W, C] (channels last), got shape {tuple(shape)}; "
            "add a batch axis or move channels last."
        )
    if channels is not None and shape[-1] not in channels:
        raise ValueError(
            f"{name} has {shape[-1]} channels but {tuple(channels)} are supported; pass "
            "channels-last RGB (or grayscale) images."
        )
    dtype = np.dtype(images.dtype)
    if dtype == np.uint8:
        return images
    if not np.issubdtype(dtype, np.floating) and dtype != jnp.bfloat16:
        raise ValueError(
            f"{name} have dtype {dtype}; pass uint8 images in [0, 255] or float images in [-1, 1]."
        )
    try:
        arr = np.asarray(images, np.float32)
    except jax.errors.TracerArrayConversionError:  # values are unknown under jit: shape/dtype only
        return images
    if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < -1.0 - 1e-3 or arr.max() > 1.0 + 1e-3):
        raise ValueError(
            f"float {name} must lie in [-1, 1] (found values in [{np.nanmin(arr):.3g}, "
            f"{np.nanmax(arr):.3g}]); rescale them with x / 127.5 - 1 or pass uint8."
        )
    return images


def to_unit_range(images: Any) -> jax.Array:
    """uint8 ``[0, 255]`` or float ``[-1, 1]`` images -> float32 in ``[-1, 1]``."""
    if np.dtype(images.dtype) == np.uint8:
        return jnp.asarray(images, jnp.float32) / 127.5 - 1.0
    return jnp.asarray(images, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Reconstruction metrics.


def _pair(x: Any, y: Any) -> tuple[jax.Array, jax.Array]:
    if np.shape(x) != np.shape(y):
        raise ValueError(f"images have shapes {np.shape(x)} and {np.shape(y)}; pass two batches of the same shape.")
    if len(np.shape(x)) != 4:
        raise ValueError(f"images must have shape [B, H, W, C], got {np.shape(x)}; add a batch axis.")
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def psnr(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, float32 ``[B]`` (``inf`` where the images are equal).

    Args:
      x, y: ``[B, H, W, C]`` images on the same scale (``[-1, 1]`` by default).
      data_range: the maximum minus the minimum possible value (2 for ``[-1, 1]``, 255 for uint8).
    """
    x, y = _pair(x, y)
    mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))  # [B]
    return 10.0 * jnp.log10(jnp.float32(data_range) ** 2 / mse)


def _gaussian_taps(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """The normalised 1-D Gaussian of ``scipy.ndimage`` (radius ``int(truncate * sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return (w / w.sum()).astype(np.float32)


def _valid_filter(x: jax.Array, taps: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering over axes 1 and 2 of ``[B, H, W, C]`` by shifted sums."""
    k = len(taps)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(float(t) * x[:, i : i + h] for i, t in enumerate(taps))  # [B, h, W, C]
    return sum(float(t) * rows[:, :, i : i + w] for i, t in enumerate(taps))  # [B, h, w, C]


def ssim(x: jax.Array, y: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Structural similarity per image, float32 ``[B]``.

    Gaussian window of 11 taps (sigma 1.5), K1 = 0.01, K2 = 0.03, population covariance, the
    mean over the interior where the window fits and over channels: the value of
    ``skimage.metrics.structural_similarity(x, y, data_range=..., channel_axis=-1,
    gaussian_weights=True, use_sample_covariance=False)`` for each image.
    """
    x, y = _pair(x, y)
    taps = _gaussian_taps()
    if min(x.shape[1], x.shape[2]) < len(taps):
        raise ValueError(
            f"SSIM needs images of at least {len(taps)}x{len(taps)} pixels, got "
            f"{x.shape[1]}x{x.shape[2]}; evaluate SSIM on larger images."
        )
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ux = _valid_filter(x, taps)  # [B, h, w, C]
    uy = _valid_filter(y, taps)
    vx = _valid_filter(x * x, taps) - ux * ux
    vy = _valid_filter(y * y, taps) - uy * uy
    vxy = _valid_filter(x * y, taps) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # [B, h, w, C]
    return jnp.mean(s, axis=(1, 2, 3))


# ----------------------------------------------------------------------------------------------
# Fréchet distance and statistics.


def compute_statistics(activations: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov(rowvar=False)``, unbiased) of ``[N, D]`` activations, float64.

    Warns when ``N <= D``: the covariance is then rank-deficient and the Fréchet distance is a
    biased, unstable estimate (the papers use 50,000 samples for 2048-d Inception features).
    """
    acts = np.asarray(activations, np.float64)
    if acts.ndim != 2:
        raise ValueError(f"activations must have shape [N, D], got {acts.shape}; flatten each sample's features.")
    n, d = acts.shape
    if n < 2:
        raise ValueError(f"statistics need at least 2 samples, got {n}; evaluate more samples.")
    if n <= d:
        warnings.warn(
            f"only {n} samples for {d}-dimensional features: the covariance is rank-deficient and "
            "the Fréchet distance estimate is unreliable; use more samples than feature dimensions.",
            stacklevel=2,
        )
    return acts.mean(axis=0), np.cov(acts, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between two Gaussians, float64, as pytorch-fid / the ADM evaluator.

    ``||mu1 - mu2||² + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2))``. When the matrix
    square root of the product is not finite (a near-singular product), ``eps * I`` is added to
    both covariances and the root recomputed; a complex root is accepted only if the imaginary
    part of its diagonal is within 1e-3 of zero, and its real part is used.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances {sigma1.shape} "
            f"and {sigma2.shape}; compute both from the same feature layer."
        )
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"the covariance product is singular; adding {eps} to the diagonal of both covariances.",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"the matrix square root has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}; "
                "the statistics are degenerate (too few samples or constant features)."
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_activations(acts1: Any, acts2: Any) -> float:
    """Fréchet distance between the Gaussians fitted to two ``[N, D]`` activation sets."""
    return frechet_distance(*compute_statistics(acts1), *compute_statistics(acts2))


def sfid(spatial1: Any, spatial2: Any) -> float:
    """sFID: the Fréchet distance on spatial features (ADM: ``mixed_6/conv``, 7 channels, 17x17)."""
    return fid_from_activations(spatial1, spatial2)


def rfid(original_acts: Any, reconstruction_acts: Any) -> float:
    """rFID of a tokenizer: FID between Inception activations of inputs and reconstructions."""
    return fid_from_activations(original_acts, reconstruction_acts)


# ----------------------------------------------------------------------------------------------
# Inception Score.


def inception_score(logits: Any, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` consecutive splits, in float64.

    Args:
      logits: ``[N, K]`` class logits. The ADM evaluator and torch-fidelity use Inception's
        unbiased logits (``pool_3 @ W``, without the bias): pass ``features['logits_unbiased']``.
      splits: number of equal consecutive splits (10 in the improved-GAN code).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [N, K], got {logits.shape}.")
    n = logits.shape[0]
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} splits; pass more samples or fewer splits.")
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))  # log softmax [N, K]
    scores = []
    for i in range(splits):
        part = logp[i * n // splits : (i + 1) * n // splits]
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0, keepdims=True))  # [1, K]
        kl = np.sum(p * (part - log_py), axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------
# Improved precision and recall.


@functools.partial(jax.jit, static_argnames=("k",))
def _knn_radii_block(rows: jax.Array, feats: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    d = _sq_distances(rows, feats)  # [R, N]
    d = jnp.where(valid[None, :], d, jnp.inf)
    return -jax.lax.top_k(-d, k + 1)[0][:, k]  # [R]: k-th neighbour besides the point itself


@jax.jit
def _inside_block(rows: jax.Array, feats: jax.Array, radii: jax.Array) -> jax.Array:
    d = _sq_distances(rows, feats)  # [R, N]
    return jnp.any(d <= radii[None, :], axis=1)  # [R]


def _sq_distances(u: jax.Array, v: jax.Array) -> jax.Array:
    """Pairwise squared Euclidean distances ``max(|u|² - 2 u·v + |v|², 0)``, float32."""
    nu = jnp.sum(u * u, axis=1)[:, None]
    nv = jnp.sum(v * v, axis=1)[None, :]
    uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(nu - 2.0 * uv + nv, 0.0)


def _blocks(x: np.ndarray, block: int):
    n = len(x)
    size = min(block, n)
    for start in range(0, n, size):
        rows = x[start : start + size]
        pad = size - len(rows)
        yield start, len(rows), np.pad(rows, ((0, pad), (0, 0)))


def manifold_radii(features: Any, k: int = 3, block_size: int = 1024) -> np.ndarray:
    """Squared distance of each feature to its k-th nearest neighbour in the same set, ``[N]``."""
    feats = np.asarray(features, np.float32)
    if len(feats) <= k:
        raise ValueError(f"{len(feats)} feature vectors are too few for k={k} nearest neighbours; pass more than {k}.")
    valid = jnp.ones((len(feats),), bool)
    dev = jnp.asarray(feats)
    out = np.zeros((len(feats),), np.float32)
    for start, n, rows in _blocks(feats, block_size):
        out[start : start + n] = np.asarray(_knn_radii_block(jnp.asarray(rows), dev, valid, k))[:n]
    return out


def _fraction_inside(points: np.ndarray, ref: np.ndarray, ref_radii: np.ndarray, block_size: int) -> float:
    ref_dev, radii_dev = jnp.asarray(ref), jnp.asarray(ref_radii)
    inside = np.zeros((len(points),), bool)
    for start, n, rows in _blocks(points, block_size):
        inside[start : start + n] = np.asarray(_inside_block(jnp.asarray(rows), ref_dev, radii_dev))[:n]
    return float(inside.mean())


def precision_recall(real_feats: Any, fake_feats: Any, k: int = 3, block_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (ADM evaluator): ``(precision, recall)``.

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour. Precision is the fraction of fake samples inside the real manifold,
    recall the fraction of real samples inside the fake manifold. Distances are squared Euclidean,
    in float32 (the ADM evaluator uses float16 when finite), computed in blocks of ``block_size``
    rows under ``jax.jit``.
    """
    real = np.asarray(real_feats, np.float32)
    fake = np.asarray(fake_feats, np.float32)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"features must be [N, D] with the same D, got {real.shape} and {fake.shape}; "
            "extract both from the same layer."
        )
    real_radii = manifold_radii(real, k, block_size)
    fake_radii = manifold_radii(fake, k, block_size)
    precision = _fraction_inside(fake, real, real_radii, block_size)
    recall = _fraction_inside(real, fake, fake_radii, block_size)
    return precision, recall


# ----------------------------------------------------------------------------------------------
# Reference statistics in the ADM evaluator's .npz layout.

ACTIVATIONS_KEY = "activations"  # pool_3 activations [N, 2048] (an addition; ADM ignores it)
SPATIAL_ACTIVATIONS_KEY = "activations_s"  # spatial activations [N, 2023] (likewise)


def save_reference_stats(path: str, acts: Any, images: Any | None = None, save_activations: bool = True) -> None:
    """Writes ``mu``, ``sigma`` (and ``mu_s``, ``sigma_s``) in the ADM evaluator's ``.npz`` layout.

    Args:
      path: destination ``.npz`` file.
      acts: pool_3 activations ``[N, 2048]``, a ``(pool, spatial)`` pair as the ADM evaluator's
        ``read_activations`` returns, or a dict with ``'pool'`` and optionally ``'spatial'`` as
        ``InceptionV3FID`` returns.
      images: optional uint8 ``[N, H, W, 3]`` images stored as ``arr_0``, which makes the file a
        complete ADM reference batch (its evaluator reads images from ``arr_0``).
      save_activations: also store the activations (``activations``, ``activations_s``) so that
        precision/recall can be computed from the file alone; the ADM evaluator ignores them.
    """
    if isinstance(acts, Mapping):
        pool, spatial = acts["pool"], acts.get("spatial")
    elif isinstance(acts, (tuple, list)):
        pool, spatial = acts[0], (acts[1] if len(acts) > 1 else None)
    else:
        pool, spatial = acts, None
    out: dict[str, np.ndarray] = {}
    out["mu"], out["sigma"] = compute_statistics(pool)
    if save_activations:
        out[ACTIVATIONS_KEY] = np.asarray(pool, np.float32)
    if spatial is not None:
        out["mu_s"], out["sigma_s"] = compute_statistics(spatial)
        if save_activations:
            out[SPATIAL_ACTIVATIONS_KEY] = np.asarray(spatial, np.float32)
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"reference images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}.")
        out["arr_0"] = images
    fileio.save_npz(path, **out)


def load_reference_stats(path: str) -> dict[str, np.ndarray]:
    """Reads a statistics file in the ADM layout: ``mu``, ``sigma`` and whichever of ``mu_s``,
    ``sigma_s``, ``activations``, ``activations_s`` are present (images in ``arr_0`` are not read)."""
    if not fileio.exists(path):
        raise FileNotFoundError(f"reference statistics file {path} not found; write one with save_reference_stats.")
    with fileio.open_npz(path) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(
                f"{path} holds {sorted(z.files)} but no 'mu'/'sigma'; it is not an ADM-style statistics file."
            )
        keys = ("mu", "sigma", "mu_s", "sigma_s", ACTIVATIONS_KEY, SPATIAL_ACTIVATIONS_KEY)
        return {k: np.asarray(z[k]) for k in keys if k in z.files}


# ----------------------------------------------------------------------------------------------
# Codebook usage over a whole evaluation set.


class CodebookAccumulator:
    """Accumulates a code histogram across batches (NumPy, on the host).

    ``update(indices)`` with int code ids of any shape; ``result()`` gives ``usage`` (fraction of
    the codebook hit at least once), ``entropy`` (nats, of the code histogram) and ``perplexity``
    (``exp(entropy)``).
    """

    def __init__(self, codebook_size: int):
        if codebook_size <= 0:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}.")
        self.codebook_size = int(codebook_size)
        self.counts = np.zeros((self.codebook_size,), np.int64)

    def update(self, indices: Any) -> None:
        """Adds the code ids of one batch (a tuple of per-scale maps is flattened too)."""
        parts = indices if isinstance(indices, (tuple, list)) else (indices,)
        for part in parts:
            flat = np.asarray(part).reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= self.codebook_size):
                raise ValueError(
                    f"code ids range over [{flat.min()}, {flat.max()}] but codebook_size is "
                    f"{self.codebook_size}; pass the quantizer's codebook size."
                )
            self.counts += np.bincount(flat.astype(np.int64), minlength=self.codebook_size)

    def result(self) -> dict[str, float]:
        """``{'usage', 'entropy', 'perplexity'}`` of everything seen so far."""
        total = self.counts.sum()
        if total == 0:
            return {"usage": 0.0, "entropy": 0.0, "perplexity": 1.0}
        p = self.counts[self.counts > 0] / total
        ent = float(-np.sum(p * np.log(p)))
        return {"usage": float(np.mean(self.counts > 0)), "entropy": ent, "perplexity": math.exp(ent)}


def codebook_stats(indices: Any, codebook_size: int) -> dict[str, float]:
    """Codebook ``usage``, code ``entropy`` (nats) and ``perplexity`` over all given indices.

    ``indices`` is an array of code ids, or an iterable of per-batch arrays (a generator works).
    """
    acc = CodebookAccumulator(codebook_size)
    if isinstance(indices, (np.ndarray, jax.Array)):
        acc.update(indices)
    else:
        for batch in indices:
            acc.update(batch)
    return acc.result()
