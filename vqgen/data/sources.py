"""Random-access data sources: ``mnist``, ``skimage``, ``moving_mnist``, ``tfds:<name>``, ``folder:<path>``.

Every source follows grain's ``RandomAccessDataSource`` protocol (``__len__``, ``__getitem__``)
and has a stable ``__repr__`` (grain uses it to identify the source in multiprocess workers and in
iterator checkpoints). Records are dicts::

    {'image': uint8 [H, W, C]  (video: [T, H, W, C]),  'label': int32 scalar}

Each source also has ``num_classes`` (``None`` when unknown). Sources are cheap to pickle: large
inputs (photographs, TFDS files) are opened lazily in the process that reads them.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from vqgen import fileio
from vqgen.data import embedded

_SPLIT_IDS = {"train": 0, "test": 1}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def _check_split(split: str) -> int:
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'.")
    return _SPLIT_IDS[split]


def _check_image_size(image_size: int) -> int:
    if int(image_size) < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
    return int(image_size)


# ---------------------------------------------------------------------------------------------
# Resizing helpers (PIL; antialiased when shrinking).
# ---------------------------------------------------------------------------------------------
def resize(image: np.ndarray, height: int, width: int, resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Resizes a uint8 ``[H, W, C]`` image (C = 1, 3 or 4) to ``[height, width, C]`` with PIL."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), resample=resample))
    return out[..., None] if channels == 1 else out  # [height, width, C]


def resize_center_crop(image: np.ndarray, size: int, resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """Scales the shorter side of a uint8 ``[H, W, C]`` image to ``size``, then center-crops ``size x size``."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    image = resize(image, nh, nw, resample)  # [nh, nw, C]
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top : top + size, left : left + size]  # [size, size, C]


def _as_hwc_uint8(image: Any) -> np.ndarray:
    """Turns a decoded image (``[H, W]``, ``[H, W, C]``, any numeric dtype) into uint8 ``[H, W, C]``."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.dtype == np.bool_:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating) and image.max(initial=0) <= 1.0:
            image = image * 255.0
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return image


# ---------------------------------------------------------------------------------------------
# mnist
# ---------------------------------------------------------------------------------------------
class MnistSource:
    """The 5,000 embedded MNIST digits (``vqgen.data.embedded``), 32x32x1, split 4,500 / 500.

    ``image_size`` other than 32 resizes the padded 32x32 digits bilinearly (done once, here).
    """

    def __init__(self, split: str = "train", image_size: int = 32):
        _check_split(split)
        self.split = split
        self.image_size = _check_image_size(image_size)
        images, labels = embedded.load_mnist(split)  # [N, 32, 32, 1], [N]
        if self.image_size != embedded.IMAGE_SIZE:
            images = np.stack([resize(x, self.image_size, self.image_size, Image.Resampling.BILINEAR) for x in images])
        self._images = images  # [N, S, S, 1]
        self._labels = labels.astype(np.int32)  # [N]
        self.num_classes = embedded.NUM_CLASSES

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self._images[index], "label": self._labels[index]}

    def __repr__(self) -> str:
        return f"MnistSource(split={self.split!r}, image_size={self.image_size})"


# ---------------------------------------------------------------------------------------------
# skimage
# ---------------------------------------------------------------------------------------------
# The RGB photographs that ship inside the scikit-image wheel (no pooch download needed).
# label = position in this tuple; the last two are held out for the 'test' split.
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "chelsea",
    "motorcycle",
)
SKIMAGE_TEST_PHOTOS = ("chelsea", "motorcycle")
SKIMAGE_NUM_CROPS = {"train": 8192, "test": 512}


@functools.lru_cache(maxsize=None)
def skimage_photo(name: str) -> np.ndarray:
    """Loads one bundled scikit-image photograph as uint8 ``[H, W, 3]`` (cached per process)."""
    import skimage.data  # imported lazily: only this source needs it

    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    image = _as_hwc_uint8(image)
    if image.shape[-1] != 3:
        raise ValueError(f"scikit-image photo {name!r} has {image.shape[-1]} channels; only RGB photos are used.")
    return image


class SkimageSource:
    """Deterministic random crops of the RGB photographs bundled with scikit-image.

    ``train`` crops come from astronaut, coffee, rocket, hubble_deep_field, immunohistochemistry
    and retina; ``test`` crops from chelsea and motorcycle (held-out photos). Crop ``i`` is taken
    from photo ``i mod P`` of the split: a square whose side is drawn log-uniformly between
    ``image_size`` and the photo's shorter side, at a uniform position, resized (antialiased
    bicubic) to ``image_size``. The crop depends only on ``(seed, split, i)``. There are 8,192
    train and 512 test crops; ``label`` is the photo's index in ``SKIMAGE_PHOTOS``.
    """

    def __init__(self, split: str = "train", image_size: int = 32, seed: int = 0, num_crops: int | None = None):
        self._split_id = _check_split(split)
        self.split = split
        self.image_size = _check_image_size(image_size)
        self.seed = int(seed)
        self.num_crops = int(num_crops if num_crops is not None else SKIMAGE_NUM_CROPS[split])
        test = split == "test"
        self.photos = tuple(p for p in SKIMAGE_PHOTOS if (p in SKIMAGE_TEST_PHOTOS) == test)
        self.num_classes = len(SKIMAGE_PHOTOS)

    def __len__(self) -> int:
        return self.num_crops

    def crop_box(self, index: int) -> tuple[str, int, int, int]:
        """Returns ``(photo, top, left, side)`` of crop ``index`` in the (possibly upscaled) photo."""
        if not 0 <= index < self.num_crops:
            raise IndexError(f"crop index {index} out of range for {self!r} of length {self.num_crops}.")
        name = self.photos[index % len(self.photos)]
        h, w = self._photo(name).shape[:2]
        rng = np.random.default_rng([self.seed, self._split_id, index])
        lo, hi = self.image_size, min(h, w)
        side = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) if hi > lo else lo
        side = min(max(side, lo), hi)
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        return name, top, left, side

    def _photo(self, name: str) -> np.ndarray:
        photo = skimage_photo(name)  # [H, W, 3]
        h, w = photo.shape[:2]
        if min(h, w) < self.image_size:  # tiny photos are scaled up so a full crop fits
            scale = self.image_size / min(h, w)
            photo = resize(photo, max(self.image_size, math.ceil(h * scale)), max(self.image_size, math.ceil(w * scale)))
        return photo

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        name, top, left, side = self.crop_box(int(index))
        crop = self._photo(name)[top : top + side, left : left + side]  # [side, side, 3]
        image = resize(crop, self.image_size, self.image_size)  # [S, S, 3]
        return {"image": np.ascontiguousarray(image), "label": np.int32(SKIMAGE_PHOTOS.index(name))}

    def __repr__(self) -> str:
        return (
            f"SkimageSource(split={self.split!r}, image_size={self.image_size}, seed={self.seed}, "
            f"num_crops={self.num_crops})"
        )


# ---------------------------------------------------------------------------------------------
# moving_mnist
# ---------------------------------------------------------------------------------------------
class MovingMnistSource:
    """Videos of 1 or 2 embedded MNIST digits moving in straight lines and bouncing off the walls.

    Video ``i`` of a split starts from digit ``i`` of the embedded MNIST split (``train`` videos
    use train digits, ``test`` videos test digits; ``label`` = that digit's class); with
    probability 1/2 a second, randomly chosen digit of the same split is added. Digits (the 28x28
    MNIST box) are resized to ``digit_size`` (default ``image_size // 2``) and pasted with a
    pixel-wise max onto a black ``image_size`` canvas; each moves from a uniform start position
    with a uniform direction and a speed of ``image_size / 32 * U(1, 2)`` pixels per frame,
    reflecting at the edges, so the whole digit box always stays inside the canvas. Everything
    depends only on ``(seed, split, i)``. Records: ``image`` uint8 ``[T, S, S, 1]``.
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        num_frames: int = 16,
        seed: int = 0,
        digit_size: int | None = None,
    ):
        self._split_id = _check_split(split)
        self.split = split
        self.image_size = _check_image_size(image_size)
        if int(num_frames) < 1:
            raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}.")
        self.num_frames = int(num_frames)
        self.seed = int(seed)
        self.digit_size = int(digit_size) if digit_size is not None else max(1, self.image_size // 2)
        if not 1 <= self.digit_size <= self.image_size:
            raise ValueError(
                f"digit_size={self.digit_size} must be between 1 and image_size={self.image_size}."
            )
        images, labels = embedded.load_mnist(split)  # [N, 32, 32, 1]
        boxes = images[:, 2:30, 2:30]  # [N, 28, 28, 1]: the original MNIST box
        self._digits = np.stack(
            [resize(x, self.digit_size, self.digit_size, Image.Resampling.BILINEAR) for x in boxes]
        )  # [N, d, d, 1]
        self._labels = labels.astype(np.int32)  # [N]
        self.num_classes = embedded.NUM_CLASSES

    def __len__(self) -> int:
        return len(self._labels)

    def plan(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(digit indices [K], top-left positions int [K, T, 2] as (row, col))`` of video ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"video index {index} out of range for {self!r} of length {len(self)}.")
        rng = np.random.default_rng([self.seed, self._split_id, index])
        digits = [index]
        if rng.random() < 0.5:
            digits.append(int(rng.integers(len(self))))
        limit = self.image_size - self.digit_size  # top-left coordinate range [0, limit]
        positions = np.zeros((len(digits), self.num_frames, 2), np.int64)  # [K, T, 2]
        for k in range(len(digits)):
            pos = rng.uniform(0.0, limit, size=2)  # [2]
            angle = rng.uniform(0.0, 2.0 * np.pi)
            speed = self.image_size / 32.0 * rng.uniform(1.0, 2.0)
            vel = speed * np.array([np.sin(angle), np.cos(angle)])  # [2]
            for t in range(self.num_frames):
                positions[k, t] = np.clip(np.round(pos), 0, limit)
                pos = pos + vel
                for a in range(2):  # reflect off the walls
                    if pos[a] < 0:
                        pos[a], vel[a] = -pos[a], -vel[a]
                    elif pos[a] > limit:
                        pos[a], vel[a] = 2 * limit - pos[a], -vel[a]
                pos = np.clip(pos, 0.0, limit)  # only matters when a step exceeds the whole range
        return np.asarray(digits, np.int64), positions

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        digits, positions = self.plan(int(index))
        d = self.digit_size
        video = np.zeros((self.num_frames, self.image_size, self.image_size, 1), np.uint8)  # [T, S, S, 1]
        for k, digit in enumerate(digits):
            for t in range(self.num_frames):
                r, c = positions[k, t]
                window = video[t, r : r + d, c : c + d]  # [d, d, 1]
                np.maximum(window, self._digits[digit], out=window)
        return {"image": video, "label": self._labels[int(index)]}

    def __repr__(self) -> str:
        return (
            f"MovingMnistSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_frames={self.num_frames}, seed={self.seed}, digit_size={self.digit_size})"
        )


# ---------------------------------------------------------------------------------------------
# tfds:<name>
# ---------------------------------------------------------------------------------------------
def _tfds_open_error(name: str, split: str, data_dir: str | None, error: Exception) -> Exception:
    """The real reason ``tfds.data_source`` could not open ``name``, as one sentence: a data dir that
    cannot be reached or does not exist, a dataset not prepared in it, or (a remote data dir holding
    the dataset) an ArrayRecord reader that opens local files only."""
    cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}" if str(error).strip() else \
        type(error).__name__
    if data_dir and fileio.is_remote(data_dir):
        fileio.check_access(data_dir, "data.data_dir")
        if not fileio.exists(data_dir):
            return FileNotFoundError(f"data.data_dir={data_dir} does not exist; pass the TFDS data dir that holds "
                                     f"{name}/ (prepared with `tfds build {name} --file_format=array_record`).")
        if not fileio.exists(fileio.join(data_dir, name.split("/")[0].split(":")[0])):
            return FileNotFoundError(f"data.data_dir={data_dir} has no {name.split(':')[0]}/ folder; prepare it with "
                                     f"`tfds build {name} --file_format=array_record --data_dir=DIR` and copy DIR there.")
        return OSError(f"TFDS found {name} in data.data_dir={data_dir} but could not open split {split!r} ({cause}); "
                       "the ArrayRecord reader opens local files only: mount the bucket (gcsfuse) and pass the "
                       "mounted path as --config.data.data_dir.")
    where = data_dir if data_dir is not None else "the default TFDS data dir"
    if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
        return FileNotFoundError(f"data.data_dir={data_dir} does not exist; pass the TFDS data dir that holds "
                                 f"{name}/ (prepared with `tfds build {name} --file_format=array_record`).")
    return FileNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared as ArrayRecord in {where} ({cause}); prepare "
        f"it with `tfds build {name} --file_format=array_record --data_dir=DIR` and pass --config.data.data_dir=DIR.")


class TfdsSource:
    """Any TFDS dataset prepared as ArrayRecord, read with ``tfds.data_source`` (no TensorFlow).

    Records are mapped to ``{'image', 'label'}``: the shorter side is resized to ``image_size``
    (antialiased bicubic, PIL) and the center square is cropped; grayscale stays 1 channel;
    a dataset without ``label`` gets label 0. Split ``test`` falls back to ``validation`` when the
    dataset has no test split (ImageNet).
    """

    def __init__(self, name: str, split: str = "train", image_size: int = 32, data_dir: str | None = None):
        import tensorflow_datasets as tfds  # imported lazily: slow, and only this source needs it

        self.name = name
        self.image_size = _check_image_size(image_size)
        self.data_dir = data_dir
        self.requested_split = split
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
            self.split = split
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(
                f"TFDS has no dataset named {name!r}; check the spelling in data.source='tfds:<name>'."
            ) from e
        except Exception as e:  # noqa: BLE001 - unprepared data surfaces as several exception types
            fallback = None
            if split == "test":
                try:
                    fallback = tfds.data_source(name, split="validation", data_dir=data_dir, download=False)
                except Exception:  # noqa: BLE001
                    fallback = None
            if fallback is None:
                raise _tfds_open_error(name, split, data_dir, e) from e
            logging.info("TFDS dataset %r has no 'test' split; using 'validation' instead.", name)
            self._source, self.split = fallback, "validation"
        self.num_classes = None
        try:
            label = tfds.builder(name, data_dir=data_dir).info.features["label"]
            self.num_classes = int(label.num_classes)
        except Exception:  # noqa: BLE001 - not every dataset has a class label
            pass

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = self._source[int(index)]
        image = _as_hwc_uint8(record["image"])  # [H, W, C]
        if image.ndim != 3:
            raise ValueError(
                f"TFDS dataset {self.name!r} has images of shape {image.shape}; only [H, W, C] images are supported."
            )
        image = resize_center_crop(image, self.image_size)  # [S, S, C]
        label = np.int32(record["label"]) if "label" in record else np.int32(0)
        return {"image": np.ascontiguousarray(image), "label": label}

    def __repr__(self) -> str:
        return (
            f"TfdsSource(name={self.name!r}, split={self.split!r}, image_size={self.image_size}, "
            f"data_dir={self.data_dir!r})"
        )


# ---------------------------------------------------------------------------------------------
# folder:<path>
# ---------------------------------------------------------------------------------------------
def _is_image_file(path) -> bool:
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _images_under(folder) -> list:
    """Image files under ``folder`` (an epath: local or remote), depth first, sorted by name."""
    files, dirs = [], []
    for child in sorted(folder.iterdir(), key=lambda c: c.name):
        if child.name.startswith("."):
            continue
        (dirs if child.is_dir() else files).append(child)
    out = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    for d in dirs:
        out.extend(_images_under(d))
    return out


def _image_size(path) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header, or None when PIL cannot parse it."""
    try:
        with path.open("rb") as f, Image.open(f) as im:  # parses the header only
            return tuple(im.size)
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None


RESIZE_MODES = ("center_crop", "refuse")


class FolderSource:
    """A folder of images (local or remote: ``gs://...``), class = sub-folder.

    If ``<path>/<split>`` is a folder it is used, else ``<path>`` itself serves every split (then
    held-out metrics are computed on training images; this is logged). Class ids are the sorted
    names of the sub-folders that contain images (searched recursively inside each); when there are
    no such sub-folders, the images directly in the folder are class 0. Files with an image
    extension whose header PIL cannot parse are skipped, counted (``num_skipped``) and logged once;
    an image that fails later, while decoding, is replaced by the next readable one and logged.
    Images are converted to RGB. ``resize='center_crop'`` (the default) resizes the shorter side
    to ``image_size`` (antialiased bicubic) and center-crops, so images of any sizes mix (their
    sizes are logged once); ``resize='refuse'`` accepts only ``image_size x image_size`` images and
    names the first that is not.
    """

    def __init__(self, path: str, split: str = "train", image_size: int = 32, resize: str = "center_crop"):
        _check_split(split)
        if resize not in RESIZE_MODES:
            raise ValueError(f"data.resize={resize!r} is unknown; use one of {RESIZE_MODES}.")
        self.path = str(path)
        self.split = split
        self.image_size = _check_image_size(image_size)
        self.resize = resize
        root = fileio.path(path)
        fileio.check_access(self.path, "data.source=folder")
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.path!r} does not exist (or is not a folder); pass an existing folder "
                f"as data.source='folder:<path>'."
            )
        if (root / split).is_dir():
            root = root / split
        else:
            logging.warning(
                "Image folder %s has no %r sub-folder; using all its images for the %r split.", root, split, split
            )
        self.root = str(root)
        children = sorted(root.iterdir(), key=lambda c: c.name)
        class_dirs = [d for d in children if not d.name.startswith(".") and d.is_dir()]
        per_class = [(d.name, _images_under(d)) for d in class_dirs]
        per_class = [(name, files) for name, files in per_class if files]
        loose = [f for f in children if _is_image_file(f)]
        if per_class:
            if loose:
                logging.warning(
                    "Image folder %s has class sub-folders; ignoring the %d images directly inside it.",
                    root,
                    len(loose),
                )
            self.class_names = tuple(name for name, _ in per_class)
            candidates = [(f, i) for i, (_, files) in enumerate(per_class) for f in files]
        else:
            self.class_names = (root.name,)
            candidates = [(f, 0) for f in loose]
        if not candidates:
            raise ValueError(
                f"image folder {self.root!r} contains no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                f"put images in it or in one sub-folder per class."
            )
        readable, unreadable, sizes = [], [], {}
        for f, c in candidates:
            size = _image_size(f)
            if size is None:
                unreadable.append((f, c))
            else:
                readable.append((f, c))
                sizes.setdefault(size, f)
        self.num_skipped = len(unreadable)
        if unreadable:
            logging.warning(
                "Skipped %d unreadable image file(s) in %s (for example %s).", len(unreadable), root, unreadable[0][0]
            )
        if not readable:
            raise ValueError(
                f"image folder {self.root!r} contains no readable images ({self.num_skipped} unreadable files); "
                f"replace the corrupt files."
            )
        self.image_sizes = tuple(sorted(sizes))  # distinct (width, height)
        wrong = [(wh, f) for wh, f in sorted(sizes.items()) if wh != (self.image_size, self.image_size)]
        if wrong and resize == "refuse":
            (w, h), example = wrong[0]
            raise ValueError(
                f"image folder {self.root!r} has images of {len(sizes)} size(s), e.g. {example.name} is {w}x{h}, and "
                f"data.resize='refuse' accepts only {self.image_size}x{self.image_size}; resize the images or pass "
                "--config.data.resize=center_crop."
            )
        if len(sizes) > 1:
            logging.warning("Image folder %s has images of %d sizes (e.g. %s); each is resized and center-cropped to "
                            "%dx%d (data.resize='center_crop').", root, len(sizes),
                            ", ".join(f"{w}x{h}" for w, h in list(sizes)[:3]), self.image_size, self.image_size)
        self._files = tuple(str(f) for f, _ in readable)
        self._labels = np.asarray([c for _, c in readable], np.int32)  # [N]
        self.num_classes = len(self.class_names)
        self.num_failed_reads = 0

    def __len__(self) -> int:
        return len(self._files)

    def _load(self, index: int) -> np.ndarray:
        with fileio.path(self._files[index]).open("rb") as f, Image.open(f) as im:
            return resize_center_crop(np.asarray(im.convert("RGB")), self.image_size)  # [S, S, 3]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        for attempt in range(len(self._files)):
            j = (index + attempt) % len(self._files)
            try:
                image = self._load(j)
            except Exception as e:  # noqa: BLE001 - a file may be truncated behind a valid header
                self.num_failed_reads += 1
                logging.log_first_n(
                    logging.WARNING,
                    "Could not decode image %s (%s); using the next image instead (failures so far: %d).",
                    5,
                    self._files[j],
                    e,
                    self.num_failed_reads,
                )
                continue
            return {"image": np.ascontiguousarray(image), "label": self._labels[j]}
        raise ValueError(f"no image in {self.root!r} could be decoded; replace the corrupt files.")

    def __repr__(self) -> str:
        return f"FolderSource(path={self.path!r}, split={self.split!r}, image_size={self.image_size})"


# ---------------------------------------------------------------------------------------------
# make_source
# ---------------------------------------------------------------------------------------------
SOURCE_NAMES = ("mnist", "skimage", "moving_mnist", "tfds:<name>", "folder:<path>")


def make_source(
    name: str,
    split: str,
    *,
    image_size: int,
    data_dir: str | None = None,
    num_frames: int = 16,
    seed: int = 0,
    resize: str = "center_crop",
):
    """Builds the random-access source named ``name`` for ``split`` (see the module docstring).

    Args:
      name: ``mnist``, ``skimage``, ``moving_mnist``, ``tfds:<name>`` or ``folder:<path>``.
      split: ``train`` or ``test`` (``tfds:`` passes any TFDS split string through).
      image_size: side of the square images (video frames) the records have.
      data_dir: TFDS data dir for ``tfds:`` (``None``: TFDS's default); ignored otherwise.
      num_frames: frames per video for ``moving_mnist``; ignored otherwise.
      seed: fixes the content of the synthetic sources (``skimage`` crops, ``moving_mnist`` motion).
      resize: ``folder:`` images of another size than ``image_size``: ``'center_crop'`` (resize the
        shorter side, crop the center) or ``'refuse'`` (a one-sentence error naming one).
    """
    if name == "mnist":
        return MnistSource(split, image_size=image_size)
    if name == "skimage":
        return SkimageSource(split, image_size=image_size, seed=seed)
    if name == "moving_mnist":
        return MovingMnistSource(split, image_size=image_size, num_frames=num_frames, seed=seed)
    if name.startswith("tfds:") and name[len("tfds:"):]:
        return TfdsSource(name[len("tfds:"):], split, image_size=image_size, data_dir=data_dir)
    if name.startswith("folder:") and name[len("folder:"):]:
        return FolderSource(name[len("folder:"):], split, image_size=image_size, resize=resize)
    raise ValueError(f"unknown data source {name!r}; use one of {', '.join(SOURCE_NAMES)}.")
