"""The FID InceptionV3 in Flax: the network of the TF graph ``classify_image_graph_def.pb``
(2015-12-05) used by the ADM evaluator, as pytorch-fid and torch-fidelity port it.

It differs from torchvision's InceptionV3 in the FID-specific blocks: average pools that do not
count padding (Mixed_5*, Mixed_6b-e, Mixed_7b), a max pool in the last block's pool branch
(Mixed_7c), 1008 output classes, and TF1's bilinear resize to 299x299 (``align_corners=False``,
half-pixel offsets absent) followed by ``(x - 128) / 128``.

Outputs (``InceptionV3FID.__call__``) for images in ``[0, 255]`` (any size, 3 channels):

* ``pool``: pool_3, ``[B, 2048]`` (FID, precision/recall);
* ``logits_unbiased``: ``pool @ W``, ``[B, 1008]`` (Inception Score as ADM and torch-fidelity);
* ``logits``: ``pool @ W + b``, ``[B, 1008]``;
* ``spatial``: ``mixed_6/conv`` (Mixed_6d's 1x1 branch after BN and ReLU), first 7 channels,
  ``[B, 17 * 17 * 7]`` flattened channels-last as the ADM evaluator does (sFID).

Weights come from a file the user supplies: convert pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` (the same file as torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``) with ``python -m vqgen.convert.inception SRC DST``.
Batch statistics of the frozen network are stored as parameters (``bn/mean``, ``bn/var``) so one
tree holds it all.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vqgen import fileio, parallel
from vqgen.evaluation import metrics

INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3
CONVERT_HINT = (
    "convert pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth) with `python -m vqgen.convert.inception SRC DST` "
    "and pass DST"
)

Dtype = Any
Pad = Sequence[tuple[int, int]]


def resize_bilinear_tf1(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """TF1 ``resize_bilinear(align_corners=False)`` of ``[B, H, W, C]`` to ``[B, size, size, C]``.

    Source coordinate ``i * (in / out)`` (no half-pixel offset), neighbours ``floor`` and
    ``min(floor + 1, in - 1)``, linear weights; coordinates are computed in float32 as in
    torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``.
    """

    def axis_weights(n_in: int):
        scale = np.float32(n_in / size)
        src = np.arange(size, dtype=np.float32) * scale  # [size]
        lo = np.floor(src).astype(np.int32)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)

    y_lo, y_hi, dy = axis_weights(x.shape[1])
    x_lo, x_hi, dx = axis_weights(x.shape[2])
    dx = jnp.asarray(dx, x.dtype)[None, None, :, None]
    dy = jnp.asarray(dy, x.dtype)[None, :, None, None]
    top, bottom = x[:, y_lo], x[:, y_hi]  # [B, size, W, C]
    top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * dx  # [B, size, size, C]
    bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * dx
    return top + (bottom - top) * dy


class FrozenBatchNorm(nn.Module):
    """Inference batch norm with its statistics as parameters: ``(x - mean) / sqrt(var + eps)``."""

    eps: float = BN_EPS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]

        def p(name, init):
            return self.param(name, nn.with_logical_partitioning(init, ("conv_out",)), (c,), self.param_dtype)

        scale, bias = p("scale", nn.initializers.ones), p("bias", nn.initializers.zeros)
        mean, var = p("mean", nn.initializers.zeros), p("var", nn.initializers.ones)
        mul = (scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + self.eps)).astype(self.dtype)
        return (x - mean.astype(self.dtype)) * mul + bias.astype(self.dtype)


class BasicConv(nn.Module):
    """Conv (no bias) -> frozen batch norm (eps 1e-3) -> ReLU, with PyTorch-style explicit padding."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.stride, self.stride),
            padding=((self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("height", "width", "conv_in", "conv_out")
            ),
            name="conv",
        )(x)  # [B, H', W', features]
        x = FrozenBatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, padded zeros not counted (TF's average pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x: jax.Array, stride: int = 2, pad: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    def conv(self, name: str, features: int, kernel=(1, 1), stride: int = 1, padding=(0, 0)) -> BasicConv:
        return BasicConv(
            features, tuple(kernel), stride, tuple(padding), dtype=self.dtype,
            param_dtype=self.param_dtype, precision=self.precision, name=name,
        )


class InceptionA(_Block):
    """Mixed_5b/c/d: 1x1, 5x5, double 3x3 and average-pool branches."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(self.conv("branch5x5_1", 48)(x))
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
        b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)  # [B, 35, 35, 224 + pool_features]


class InceptionB(_Block):
    """Mixed_6a: grid reduction 35 -> 17."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, (3, 3), stride=2)(x)
        bd = self.conv("branch3x3dbl_1", 64)(x)
        bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
        bd = self.conv("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)  # [B, 17, 17, 768]


class InceptionC(_Block):
    """Mixed_6b-e: factorised 7x7 branches."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1  # [B, 17, 17, 768], [B, 17, 17, 192]


class InceptionD(_Block):
    """Mixed_7a: grid reduction 17 -> 8."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, (3, 3), stride=2)(self.conv("branch3x3_1", 192)(x))
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)  # [B, 8, 8, 1280]


class InceptionE(_Block):
    """Mixed_7b (average pool branch) and Mixed_7c (max pool branch: the TF graph's quirk)."""

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3 = jnp.concatenate(
            [self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
             self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)  # [B, 8, 8, 768]
        bd = self.conv("branch3x3dbl_1", 448)(x)
        bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
        bd = jnp.concatenate(
            [self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
             self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)  # [B, 8, 8, 768]
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool_branch else _avg_pool_same(x)
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)  # [B, 8, 8, 2048]


class InceptionV3FID(nn.Module):
    """The FID InceptionV3. Call on images with values in ``[0, 255]`` (float), ``[B, H, W, 3]``.

    Returns a dict with ``pool`` ``[B, 2048]``, ``logits`` and ``logits_unbiased`` ``[B, 1008]``
    and ``spatial`` ``[B, 2023]`` (float32). ``precision`` defaults to HIGHEST so that TPUs do
    not run the convolutions in bfloat16 passes; FID is sensitive to it.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

        def conv(name, features, kernel=(1, 1), stride=1, padding=(0, 0)):
            return BasicConv(features, kernel, stride, padding, name=name, **kw)

        x = resize_bilinear_tf1(images.astype(jnp.float32))  # [B, 299, 299, 3]
        x = ((x - 128.0) / 128.0).astype(self.dtype)
        x = conv("Conv2d_1a_3x3", 32, (3, 3), stride=2)(x)  # [B, 149, 149, 32]
        x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)  # [B, 147, 147, 32]
        x = conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)  # [B, 147, 147, 64]
        x = _max_pool(x)  # [B, 73, 73, 64]
        x = conv("Conv2d_3b_1x1", 80)(x)  # [B, 73, 73, 80]
        x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)  # [B, 71, 71, 192]
        x = _max_pool(x)  # [B, 35, 35, 192]
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)  # [B, 35, 35, 256]
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)  # [B, 35, 35, 288]
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)  # [B, 35, 35, 288]
        x = InceptionB(name="Mixed_6a", **kw)(x)  # [B, 17, 17, 768]
        x, _ = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x, _ = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x, spatial = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)  # TF "mixed_6/conv"
        x, _ = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)  # [B, 17, 17, 768]
        x = InceptionD(name="Mixed_7a", **kw)(x)  # [B, 8, 8, 1280]
        x = InceptionE(max_pool_branch=False, name="Mixed_7b", **kw)(x)  # [B, 8, 8, 2048]
        x = InceptionE(max_pool_branch=True, name="Mixed_7c", **kw)(x)  # [B, 8, 8, 2048]
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]
        kernel = self.param(
            "fc_kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
            (POOL_DIM, NUM_CLASSES), self.param_dtype,
        )
        bias = self.param(
            "fc_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (NUM_CLASSES,), self.param_dtype
        )
        unbiased = jnp.matmul(pool, kernel.astype(jnp.float32), precision=self.precision)  # [B, 1008]
        spatial = spatial[..., :SPATIAL_CHANNELS].astype(jnp.float32)  # [B, 17, 17, 7]
        return {
            "pool": pool,
            "logits_unbiased": unbiased,
            "logits": unbiased + bias.astype(jnp.float32),
            "spatial": spatial.reshape(spatial.shape[0], -1),  # [B, 2023], channels fastest
        }


# ----------------------------------------------------------------------------------------------
# Parameters: the expected tree, loading, checking.


@functools.lru_cache(maxsize=None)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """``{'Mixed_5b/branch1x1/conv/kernel': shape, ...}`` of the FID InceptionV3's parameters."""
    abstract = jax.eval_shape(
        lambda: InceptionV3FID().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))
    )
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]), sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def check_params(flat: dict[str, Any], source: str = "the parameters") -> None:
    """Raises ``ValueError`` unless ``flat`` (``'a/b/c' -> array``) is exactly the FID InceptionV3."""
    want = expected_shapes()
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise ValueError(
            f"{source} are not the FID InceptionV3 ({len(missing)} expected parameters missing, e.g. "
            f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}); {CONVERT_HINT}."
        )
    for k, shape in want.items():
        if tuple(np.shape(flat[k])) != shape:
            hint = (
                " (1000 classes: torchvision's ImageNet InceptionV3, not the FID one)"
                if k.startswith("fc") and 1000 in np.shape(flat[k]) else ""
            )
            raise ValueError(
                f"{source} have {k} of shape {tuple(np.shape(flat[k]))} instead of {shape}{hint}; "
                f"{CONVERT_HINT}."
            )


def save_params(path: str, params: Any) -> None:
    """Writes a params tree as an ``.npz`` of ``'a/b/c'`` keys (the format ``load_inception_params`` reads)."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
    check_params(flat)
    fileio.save_npz(path, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_inception_params(path: str) -> dict[str, Any]:
    """Loads the converted FID InceptionV3 parameters (``.npz``) as a Flax params tree.

    A ``.pth`` file is refused with the command that converts it. Raises
    ``FileNotFoundError`` naming the converter when the file is missing and ``ValueError`` when it
    holds another network.
    """
    path = os.fspath(fileio.path(path))
    if not fileio.exists(path):
        raise FileNotFoundError(f"Inception weights file {path} not found; {CONVERT_HINT}.")
    if path.endswith((".pth", ".pt")):  # converting needs torch, which evaluation never imports
        raise ValueError(f"{path} is a PyTorch weights file; convert it once with "
                         f"`python -m vqgen.convert.inception {path} inception.npz` and pass the .npz.")
    try:
        flat = fileio.load_npz(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not an .npz weights file ({e}); {CONVERT_HINT}.") from None
    check_params(flat, source=f"the weights in {path}")
    return traverse_util.unflatten_dict(flat, sep="/")


# ----------------------------------------------------------------------------------------------
# Jitted, batch-sharded feature extraction.


def _prepare(images: Any) -> tuple[np.ndarray | jax.Array, bool]:
    metrics.check_images(images, "images for Inception", channels=(1, 3))
    return images, np.dtype(images.dtype) == np.uint8


@functools.lru_cache(maxsize=16)
def _extract_fn(mesh: Any, dtype: Any, uint8: bool, channels: int):
    model = InceptionV3FID(dtype=dtype)

    def fn(params, images):
        x = images.astype(jnp.float32)
        if not uint8:
            x = (x + 1.0) * 127.5  # [-1, 1] -> [0, 255], not rounded
        if channels == 1:
            x = jnp.repeat(x, 3, axis=-1)  # grayscale -> RGB
        return model.apply({"params": params}, x)

    if mesh is None:
        return jax.jit(fn)
    batch = parallel.batch_sharding(mesh, 4)
    out = parallel.batch_sharding(mesh, 2)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(fn, in_shardings=(replicated, batch), out_shardings=out)


def extract(params: Any, images: Any, mesh: Any = None, dtype: Any = jnp.float32) -> dict[str, np.ndarray]:
    """Inception features of one batch, as NumPy float32 arrays (see ``InceptionV3FID``).

    Args:
      params: the params tree from ``load_inception_params``.
      images: ``[N, H, W, 3]`` (or 1 channel, repeated to RGB) uint8 in ``[0, 255]`` or float in
        ``[-1, 1]`` (mapped to ``[0, 255]`` without rounding; pass uint8 for the papers' numbers).
      mesh: a device mesh; the batch is padded to a multiple of its data-parallel size and split
        over its ``('data', 'fsdp')`` axes, the weights replicated. ``None``: default device.
      dtype: compute dtype (float32 for reported numbers).
    """
    images, uint8 = _prepare(images)
    n = images.shape[0]
    fn = _extract_fn(mesh, jnp.dtype(dtype), uint8, int(images.shape[-1]))
    if mesh is not None:
        size = parallel.data_parallel_size(mesh)
        pad = (-n) % size
        images = np.asarray(images)
        if pad:
            images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
        with jax.set_mesh(mesh):
            feats = fn(params, jax.device_put(images, parallel.batch_sharding(mesh, 4)))
    else:
        feats = fn(params, images)
    return {k: np.asarray(v)[:n] for k, v in feats.items()}
