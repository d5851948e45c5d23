"""vqgen.data: grain input pipelines (DESIGN.md §3 "Data").

Public API
----------
``make_source(name, split, *, image_size, data_dir=None, num_frames=16, seed=0, resize='center_crop')``
    A grain random-access source (``__len__``, ``__getitem__``, stable ``__repr__``,
    ``num_classes``) of records ``{'image': uint8 [H, W, C] (video [T, H, W, C]), 'label': int32}``:

    * ``mnist`` — the 5,000 embedded digits (``vqgen.data.embedded``), 32x32x1, 4,500 train /
      500 test; another ``image_size`` resizes them bilinearly.
    * ``skimage`` — deterministic crops of the RGB photographs bundled with scikit-image (offline):
      8,192 train crops of six photos, 512 test crops of two held-out photos (chelsea, motorcycle);
      a square of log-uniform side in [image_size, shorter side] resized to image_size; label =
      photo id. ``seed`` fixes the crops.
    * ``moving_mnist`` — videos ``[num_frames, S, S, 1]`` of 1 or 2 digits (train digits for
      ``train``, test digits for ``test``) of size S/2 bouncing inside an S canvas; one video per
      digit of the split, label = class of the first digit; deterministic per (seed, split, index).
    * ``tfds:<name>`` — ``tfds.data_source(name, split=..., data_dir=data_dir)`` (ArrayRecord, no
      TensorFlow); shorter side resized to image_size, center-cropped; ``test`` falls back to
      ``validation``. An unprepared dataset raises ``FileNotFoundError`` saying to run
      ``tfds build <name> --file_format=array_record --data_dir=DIR``.
    * ``folder:<path>`` — images with class = sorted sub-folder name (images loose in the folder
      are class 0 when there are no sub-folders); ``<path>/<split>`` is used when it exists; local or
      remote (``gs://``); RGB, shorter side resized, center-cropped (``resize='refuse'``: images of
      another size are refused). Missing folder: ``FileNotFoundError``; no images: ``ValueError``;
      unreadable files are skipped, counted (``source.num_skipped``) and logged once.

``make_pipeline(source, *, global_batch_size, seed, train, random_crop=False, random_flip=False,
drop_remainder=True, process_index=None, process_count=None, num_epochs=None, num_threads=2,
prefetch_buffer_size=8, worker_count=0)``
    This process's ``grain.DatasetIterator`` of ``{'image': float32 [-1, 1] [B_local, H, W, C]
    (video [B_local, T, H, W, C]), 'label': int32 [B_local]}``, ``B_local = global_batch_size //
    process_count`` (``ValueError`` if not divisible). Built as
    ``MapDataset.source(source)[p::n].seed(seed).shuffle().repeat(num_epochs).random_map(Augment)
    .batch(B_local).map(ToFloat).to_iter_dataset()``: process ``p`` of ``n`` reads a disjoint slice
    taken before shuffling. ``train=True`` shuffles (a new permutation every epoch), repeats forever
    by default and applies the requested augmentations: random resized crop (a square of 87.5–100%
    of the side at a random position, resized back bilinearly) and horizontal flip, both the same
    across the frames of a video. ``train=False``: source order, one pass, no augmentation.
    Deterministic given ``seed``; ``it.get_state()`` is a JSON-able dict and ``it.set_state(state)``
    resumes the exact stream. ``worker_count > 0`` moves reading and augmentation into grain worker
    processes (``mp_prefetch``; the stream and its resumption are the same as with threads; the
    program needs a ``__main__`` guard, and unparsed absl flags are marked parsed for grain).
    With ``train=False, drop_remainder=False`` and several processes, hosts may get different
    numbers of examples (slices of a split whose size is not a multiple of the process count).

``check_source(source, *, source_name, num_classes, channels, image_size, num_frames=None, first=8)``
    One sentence naming the ``data.*`` key when the source does not give what the config describes
    (more classes than ``num_classes``, labels out of range, channels, image size, frames).

``eval_arrays(source, max_examples=None)``
    ``{'image': float32 [-1, 1] [N, ...], 'label': int32 [N]}`` of the first N records.

Checkpointing the iterator with Orbax (orbax-checkpoint 0.12, grain 0.2.18): grain registers its
handler with Orbax's args, so inside a ``CheckpointManager`` use ::

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(iterator)))
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                               data=grain.checkpoint.CheckpointRestore(iterator)))

The handler writes ``process_<i>-of-<n>.json`` per process (index from ``jax.process_index()``)
and restores the state in place into the iterator you pass (a fresh ``make_pipeline`` iterator
built with the same arguments).
"""
from vqgen.data.checks import check_source
from vqgen.data.embedded import load_mnist
from vqgen.data.pipeline import Augment, ToFloat, eval_arrays, make_pipeline, to_float
from vqgen.data.sources import (
    FolderSource,
    MnistSource,
    MovingMnistSource,
    SkimageSource,
    TfdsSource,
    make_source,
)

__all__ = [
    "Augment",
    "check_source",
    "FolderSource",
    "MnistSource",
    "MovingMnistSource",
    "SkimageSource",
    "TfdsSource",
    "ToFloat",
    "eval_arrays",
    "load_mnist",
    "make_pipeline",
    "make_source",
    "to_float",
]
