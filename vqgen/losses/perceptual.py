"""LPIPS perceptual distance (VGG16 trunk + learned linear heads) in Flax.

The network is the ``lpips`` package's ``LPIPS(net='vgg', version='0.1')``, which taming's VQGAN
loss also uses:

1. scaling layer: ``(x - shift) / scale`` per RGB channel with ``shift = (-0.030, -0.088,
   -0.188)`` and ``scale = (0.458, 0.448, 0.450)``, on images in [-1, 1];
2. torchvision's VGG16 ``features`` trunk (3x3 convolutions, ReLU, 2x2 max-pools), tapped after
   relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (the last max-pool is never used);
3. per tap: unit-normalise every feature vector over channels (``f / (||f|| + 1e-10)``), square
   the difference of the two images' features, weight the channels with the learned 1x1 head
   (non-negative weights, no bias), average over space;
4. sum over the five taps -> one distance per image pair.

The weights are never downloaded: ``python -m vqgen.convert.lpips`` builds them from a
torchvision ``vgg16`` state-dict file the user supplies plus the heads that ship inside the
``lpips`` package, and :func:`load_lpips_params` reads that file. Grayscale images
(``C == 1``) are repeated to three channels before the scaling layer, which is what feeding a
gray image to an RGB network means.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vqgen import fileio

Dtype = Any
Array = jax.Array

# The lpips package's ScalingLayer constants (ImageNet statistics mapped to [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10

# VGG16 ``features``: (name, out channels) per 3x3 conv; "pool" is a 2x2/2 max-pool.
# The taps are the ReLU outputs of the last conv of each of the five stages.
VGG16_STAGES: tuple[tuple[str, ...], ...] = (
    ("conv1_1", "conv1_2"),
    ("conv2_1", "conv2_2"),
    ("conv3_1", "conv3_2", "conv3_3"),
    ("conv4_1", "conv4_2", "conv4_3"),
    ("conv5_1", "conv5_2", "conv5_3"),
)
VGG16_WIDTHS = (64, 128, 256, 512, 512)
HEAD_NAMES = tuple(f"lin{i}" for i in range(len(VGG16_STAGES)))

# Written into the weights file so that a file for another network is recognised.
FILE_FORMAT = "vqgen-lpips-vgg16-v0.1"
FORMAT_KEY = "__format__"
CONVERTER_COMMAND = "python -m vqgen.convert.lpips --vgg16 VGG16_STATE_DICT.pth --out lpips_vgg.npz"


class LPIPS(nn.Module):
    """LPIPS distance with a VGG16 trunk; see the module docstring for the exact computation.

    Parameters: ``conv1_1`` ... ``conv5_3`` (``kernel [3, 3, in, out]``, ``bias [out]``) and the
    heads ``lin0`` ... ``lin4`` (``kernel [1, 1, C, 1]``), as written by
    ``vqgen.convert.lpips``.

    Attributes:
      dtype: compute dtype of the trunk (normalisation, differences and the result are float32).
      param_dtype: storage dtype of freshly initialised parameters.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _features(self, x: Array) -> list[Array]:
        """VGG16 trunk taps for ``x`` ``[N, H, W, 3]`` (already scaled)."""
        taps = []
        h = x.astype(self.dtype)
        in_ch = 3
        for stage, (names, width) in enumerate(zip(VGG16_STAGES, VGG16_WIDTHS)):
            if stage > 0:
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")  # [N, H/2, W/2, C]
            for name in names:
                h = nn.Conv(
                    width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), (None, None, "conv_in" if in_ch > 3 else None, "conv_out")
                    ),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                    name=name,
                )(h)  # [N, H', W', width]
                h = nn.relu(h)
                in_ch = width
            taps.append(h)
        return taps

    @nn.compact
    def __call__(self, x: Array, y: Array) -> Array:
        """Distance between image batches ``x`` and ``y`` ``[B, H, W, C]`` in [-1, 1] -> float32 ``[B]``.

        ``C`` is 3 (RGB) or 1 (repeated to RGB). ``H, W`` of at least 16 keep every tap non-empty.
        """
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {x.shape} and {y.shape}.")
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"LPIPS expects images [B, H, W, 1 or 3], got shape {x.shape}.")
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)  # [B, H, W, 3]
            y = jnp.repeat(y, 3, axis=-1)  # [B, H, W, 3]
        batch = x.shape[0]
        shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
        scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
        both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)  # [2B, H, W, 3]
        both = (both - shift) / scale
        total = jnp.zeros((batch,), jnp.float32)
        for tap, name, width in zip(self._features(both), HEAD_NAMES, VGG16_WIDTHS):
            tap = tap.astype(jnp.float32)  # [2B, h, w, C]
            norm = jnp.sqrt(jnp.sum(jnp.square(tap), axis=-1, keepdims=True))  # [2B, h, w, 1]
            tap = tap / (norm + NORMALIZE_EPS)
            diff = jnp.square(tap[:batch] - tap[batch:])  # [B, h, w, C]
            head = self.param(
                name,
                nn.with_logical_partitioning(nn.initializers.uniform(1.0 / width), (None, None, None, None)),
                (1, 1, width, 1),
                self.param_dtype,
            )
            weighted = jnp.einsum("bhwc,c->bhw", diff, jnp.asarray(head, jnp.float32)[0, 0, :, 0])  # [B, h, w]
            total = total + jnp.mean(weighted, axis=(1, 2))
        return total


def expected_param_shapes() -> dict[str, tuple[int, ...]]:
    """Flat ``"conv1_1/kernel" -> shape`` map of the parameters :class:`LPIPS` expects."""
    shapes: dict[str, tuple[int, ...]] = {}
    in_ch = 3
    for names, width in zip(VGG16_STAGES, VGG16_WIDTHS):
        for name in names:
            shapes[f"{name}/kernel"] = (3, 3, in_ch, width)
            shapes[f"{name}/bias"] = (width,)
            in_ch = width
    for name, width in zip(HEAD_NAMES, VGG16_WIDTHS):
        shapes[name] = (1, 1, width, 1)
    return shapes


def abstract_params() -> dict[str, Any]:
    """The LPIPS parameter tree as float32 ``jax.ShapeDtypeStruct``s (what a step is compiled for)."""
    return unflatten_params({k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in expected_param_shapes().items()})


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """Nested LPIPS params -> flat ``{"conv1_1/kernel": array, "lin0": array, ...}``."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            for sub, arr in value.items():
                flat[f"{key}/{sub}"] = arr
        else:
            flat[key] = value
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of :func:`flatten_params`."""
    params: dict[str, Any] = {}
    for key, arr in flat.items():
        if "/" in key:
            outer, inner = key.split("/", 1)
            params.setdefault(outer, {})[inner] = arr
        else:
            params[key] = arr
    return params


def validate_params(flat: dict[str, np.ndarray], source: str) -> None:
    """Raises ValueError (one sentence naming ``source`` and the fix) if keys or shapes differ."""
    expected = expected_param_shapes()
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(expected) & set(flat) if tuple(flat[k].shape) != expected[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if wrong:
            details.append(
                "wrong shapes " + ", ".join(f"{k} {tuple(flat[k].shape)} != {expected[k]}" for k in wrong[:3])
            )
        raise ValueError(
            f"{source} does not hold LPIPS-VGG16 weights ({'; '.join(details)}); rebuild it with "
            f"`{CONVERTER_COMMAND}`."
        )


def save_lpips_params(params: dict[str, Any], path: str) -> None:
    """Writes LPIPS params (nested or flat) to ``path`` as an ``.npz`` with a format tag."""
    flat = params if any("/" in k for k in params) else flatten_params(params)
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    validate_params(flat, "the converted parameters")
    fileio.save_npz(path, **{FORMAT_KEY: np.asarray(FILE_FORMAT)}, **flat)


def load_lpips_params(path: str) -> dict[str, Any]:
    """Reads the ``.npz`` written by ``python -m vqgen.convert.lpips`` -> float32 params pytree.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: the file is not an LPIPS-VGG16 weights file of this format.
    """
    path = os.fspath(path)
    if not fileio.exists(path) or fileio.path(path).is_dir():
        raise FileNotFoundError(
            f"LPIPS weights file {path!r} does not exist; build it from a torchvision VGG16 state dict "
            f"with `{CONVERTER_COMMAND}`."
        )
    try:
        flat = fileio.load_npz(path)
    except (ValueError, OSError) as err:  # not a zip / npz, or pickled objects
        raise ValueError(
            f"{path!r} is not an .npz file of arrays; build the LPIPS weights with `{CONVERTER_COMMAND}`."
        ) from err
    tag = flat.pop(FORMAT_KEY, None)
    if tag is None or str(tag) != FILE_FORMAT:
        raise ValueError(
            f"{path!r} is not an LPIPS-VGG16 weights file (format tag {None if tag is None else str(tag)!r}, "
            f"expected {FILE_FORMAT!r}); build it with `{CONVERTER_COMMAND}`."
        )
    validate_params(flat, repr(path))
    return unflatten_params({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


_logged_off = False  # the "perceptual loss is off" message is logged once per process

PerceptualFn = Callable[[Any, Array, Array], Array]


def make_perceptual_loss(
    path: str | None,
    dtype: Dtype = jnp.float32,
    config_key: str = "lpips_weights",
) -> tuple[PerceptualFn, dict[str, Any]] | None:
    """Builds the perceptual loss from an LPIPS weights file, or returns None when there is none.

    Args:
      path: the ``.npz`` made by ``python -m vqgen.convert.lpips``; None or "" turns the loss off
        (logged once at WARNING level).
      dtype: compute dtype of the VGG trunk.
      config_key: the config key that holds ``path``, named in the "off" message.

    Returns:
      None, or ``(loss_fn, params)``: ``loss_fn(params, x, y)`` is a pure, jittable function of
      the frozen LPIPS params and two image batches ``[B, H, W, C]`` in [-1, 1] that returns the
      float32 scalar mean LPIPS distance. Pass ``params`` into the jitted step as an explicit
      argument (do not close over it) and treat it as frozen.

    Raises:
      FileNotFoundError / ValueError: as :func:`load_lpips_params`, when ``path`` is given but bad.
    """
    global _logged_off
    if not path:
        if not _logged_off:
            _logged_off = True
            logging.warning(
                "perceptual loss is off: no LPIPS weights file given (set config %s to a file made by "
                "python -m vqgen.convert.lpips)",
                config_key,
            )
        return None
    params = load_lpips_params(path)
    model = LPIPS(dtype=dtype)

    def loss_fn(lpips_params: Any, x: Array, y: Array) -> Array:
        frozen = jax.lax.stop_gradient(lpips_params)
        return jnp.mean(model.apply({"params": frozen}, x, y))

    return loss_fn, params
