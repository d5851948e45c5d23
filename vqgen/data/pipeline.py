"""grain pipelines over the sources of ``vqgen.data.sources``: shard, shuffle, augment, batch.

Transforms are top-level classes so that grain's multiprocess workers can pickle them.
"""
from __future__ import annotations

import math
from typing import Any

import grain
import numpy as np
from PIL import Image

# Random resized crop: a square of side U{ceil(CROP_MIN_FRACTION * S), ..., S} is cut at a random
# position and resized back to S x S (bilinear).
CROP_MIN_FRACTION = 0.875


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 ``[..., C]`` in [0, 255] -> float32 in [-1, 1]."""
    return np.asarray(image, np.float32) / np.float32(127.5) - np.float32(1.0)


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 ``[F, h, w, C]`` frames to ``[F, size, size, C]``."""
    channels = frames.shape[-1]
    out = []
    for frame in frames:
        pil = Image.fromarray(frame[..., 0] if channels == 1 else frame)
        x = np.asarray(pil.resize((size, size), resample=Image.Resampling.BILINEAR))
        out.append(x[..., None] if channels == 1 else x)
    return np.stack(out)  # [F, size, size, C]


class Augment(grain.transforms.RandomMap):
    """Random resized crop and/or horizontal flip of a uint8 record (image ``[H, W, C]`` or video ``[T, H, W, C]``).

    The crop keeps a square of side between ``CROP_MIN_FRACTION`` and 1 of the image side at a
    random position and resizes it back (bilinear); a video gets the same crop and flip in every
    frame. The random draws come from grain's per-element generator, so they are deterministic
    given the pipeline seed and the element's position.
    """

    def __init__(self, random_crop: bool, random_flip: bool):
        self.random_crop = bool(random_crop)
        self.random_flip = bool(random_flip)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]
        frames = image if image.ndim == 4 else image[None]  # [F, H, W, C]
        h, w = frames.shape[1:3]
        if self.random_crop:
            size = min(h, w)
            side = int(rng.integers(math.ceil(CROP_MIN_FRACTION * size), size + 1))
            top = int(rng.integers(0, h - side + 1))
            left = int(rng.integers(0, w - side + 1))
            frames = frames[:, top : top + side, left : left + side]  # [F, side, side, C]
            if side != h or side != w:
                frames = _resize_frames(frames, size)  # [F, size, size, C]
        if self.random_flip and rng.random() < 0.5:
            frames = frames[:, :, ::-1]  # [F, H, W, C]
        image = np.ascontiguousarray(frames if image.ndim == 4 else frames[0])
        return {**element, "image": image}


class ToFloat(grain.transforms.Map):
    """Maps a batch's uint8 images to float32 in [-1, 1] and labels to int32."""

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        return {
            "image": to_float(element["image"]),  # [B, H, W, C] or [B, T, H, W, C]
            "label": np.asarray(element["label"], np.int32),  # [B]
        }


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # imported lazily: the data pipeline itself does not need JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count}); "
            f"pass the values of jax.process_index() and jax.process_count()."
        )
    return int(process_index), int(process_count)


def make_pipeline(
    source,
    *,
    global_batch_size: int,
    seed: int,
    train: bool,
    random_crop: bool = False,
    random_flip: bool = False,
    drop_remainder: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
    worker_count: int = 0,
) -> grain.DatasetIterator:
    """Returns this process's batch iterator over ``source`` (see the ``vqgen.data`` docstring).

    Args:
      source: a random-access source (``make_source``).
      global_batch_size: batch over all processes; each yields ``global_batch_size // process_count``.
      seed: seeds shuffling and augmentation (``train=True``); the stream depends on nothing else.
      train: ``True``: shuffled, repeated ``num_epochs`` times (``None``: forever), augmented.
        ``False``: source order, ``num_epochs`` passes (``None``: one), no augmentation.
      random_crop / random_flip: augmentations (``train=True`` only); see ``Augment``.
      drop_remainder: drop the last incomplete batch.
      process_index / process_count: this host's slice ``source[process_index::process_count]``
        (default: ``jax.process_index()`` / ``jax.process_count()``).
      num_threads / prefetch_buffer_size: grain's ``ReadOptions`` for this process.
      worker_count: > 0 moves reading and augmentation into that many worker processes
        (``mp_prefetch``; needs a ``__main__`` guard in the program).

    Returns:
      a ``grain.DatasetIterator`` of ``{'image': float32 [-1, 1] [B_local, H, W, C] (video
      [B_local, T, H, W, C]), 'label': int32 [B_local]}`` whose ``get_state()`` (a JSON-able dict)
      and ``set_state()`` resume the stream exactly.
    """
    process_index, process_count = _process_index_and_count(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} is not a positive multiple of the process count "
            f"{process_count}; choose a batch size divisible by {process_count}."
        )
    local_batch = global_batch_size // process_count
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or a positive integer, got {num_epochs!r}.")

    ds = grain.MapDataset.source(source)
    if process_count > 1:
        ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise ValueError(
            f"{source!r} has {len(source)} examples, too few for {process_count} processes; use a larger split."
        )
    if train:
        ds = ds.seed(seed).shuffle().repeat(num_epochs)
        if random_crop or random_flip:
            ds = ds.random_map(Augment(random_crop, random_flip))
    else:
        if drop_remainder and len(ds) < local_batch:
            raise ValueError(
                f"{source!r} gives this process {len(ds)} examples, fewer than its batch of {local_batch}, "
                f"so drop_remainder=True leaves nothing; use a smaller batch or drop_remainder=False."
            )
        if num_epochs is not None and num_epochs > 1:
            ds = ds.repeat(num_epochs)
    ds = ds.batch(local_batch, drop_remainder=drop_remainder).map(ToFloat())
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    if worker_count > 0:
        from absl import flags  # grain's workers read absl flags; a plain script never parses them

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def eval_arrays(source, max_examples: int | None = None) -> dict[str, np.ndarray]:
    """The first ``max_examples`` records of ``source`` (all if ``None``) as arrays.

    Returns ``{'image': float32 [-1, 1] [N, H, W, C] (video [N, T, H, W, C]), 'label': int32 [N]}``.
    """
    n = len(source) if max_examples is None else min(int(max_examples), len(source))
    if n < 1:
        raise ValueError(f"{source!r} has no examples to evaluate on (max_examples={max_examples!r}).")
    records = [source[i] for i in range(n)]
    return {
        "image": to_float(np.stack([r["image"] for r in records])),  # [N, ...]
        "label": np.asarray([r["label"] for r in records], np.int32),  # [N]
    }
