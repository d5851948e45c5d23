"""One path layer for every file vqgen reads or writes: local, ``gs://`` and other fsspec schemes.

Paths are :class:`etils.epath.Path` (the layer Orbax uses for checkpoints), so a workdir or a data
path may be a local folder or a bucket URL (``gs://`` needs ``gcsfs``: ``pip install 'vqgen[gcs]'``)
and every caller treats them alike. Writes are atomic: a local file is written beside its target
and renamed over it; an object store publishes an object only when its upload completes, so there
it is written in place. A reader therefore never sees half a ``config.json``, ``report.json``,
token cache or PNG, whatever killed the writer.
"""
from __future__ import annotations

import io
import json
import os
import uuid
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
    """``p`` as an :class:`epath.Path` (``~`` expanded for local paths)."""
    s = os.fspath(p)
    return epath.Path(s if is_remote(s) else os.path.expanduser(s))


def is_remote(p: PathLike) -> bool:
    """Whether ``p`` is a URL (``gs://``, ``s3://``, ...) rather than a local path."""
    return "://" in os.fspath(p)


def join(base: PathLike, *parts: str) -> str:
    """``base/parts...`` as a string (URL-safe: ``gs://b/run`` + ``x`` -> ``gs://b/run/x``)."""
    return os.fspath(path(base).joinpath(*parts))


def display(p: PathLike) -> str:
    """The path as a user would type it: absolute when local, the URL when remote."""
    s = os.fspath(p)
    return s if is_remote(s) else os.path.abspath(os.path.expanduser(s))


def exists(p: PathLike) -> bool:
    return path(p).exists()


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``p`` atomically, creating the parent folder."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):  # an object appears whole when its upload completes
        target.write_bytes(data)
        return
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    return path(p).read_text()


def write_json(p: PathLike, value: Any) -> None:
    write_text(p, json.dumps(value, indent=2, sort_keys=True))


def read_json(p: PathLike) -> Any:
    return json.loads(read_text(p))


def save_npz(p: PathLike, **arrays: Any) -> None:
    """``np.savez`` to ``p`` (local or remote), atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes(p, buf.getvalue())


def open_npz(p: PathLike, allow_pickle: bool = False) -> Any:
    """``np.load`` of the ``.npz`` at ``p`` (local or remote), to use as a context manager.

    A local file is read lazily, one array at a time, as ``np.load`` does; a remote one is
    fetched whole first.
    """
    if is_remote(p):
        return np.load(io.BytesIO(read_bytes(p)), allow_pickle=allow_pickle)
    return np.load(os.path.expanduser(os.fspath(p)), allow_pickle=allow_pickle)


def load_npz(p: PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``p`` (local or remote) as a dict."""
    with open_npz(p, allow_pickle=allow_pickle) as z:
        return {k: z[k] for k in z.files}


def save_png(p: PathLike, image_hwc_uint8: np.ndarray) -> None:
    """A uint8 ``[H, W, C]`` (C = 1 or 3) image as a PNG at ``p``, atomically."""
    from PIL import Image

    img = np.asarray(image_hwc_uint8)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    write_bytes(p, buf.getvalue())


def mtime(p: PathLike) -> float | None:
    """Modification time of ``p`` in seconds since the epoch, when the filesystem tells it."""
    try:
        return float(path(p).stat().mtime)
    except Exception:  # noqa: BLE001 - not every object store reports one
        return None


def check_access(p: PathLike, what: str) -> None:
    """Raises ``ValueError`` (one sentence) when ``p`` cannot be reached: a URL whose filesystem
    package is missing (``gs://`` without ``gcsfs``), or a store that refuses the request."""
    try:
        path(p).exists()
    except ImportError as e:
        scheme = os.fspath(p).split("://", 1)[0]
        package = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}.get(scheme, e.name or "the fsspec filesystem package")
        raise ValueError(f"{what}={os.fspath(p)} needs the {package} package to reach {scheme}:// paths; "
                         f"install it (pip install {package}{' or pip install vqgen[gcs]' if scheme == 'gs' else ''}).") from e
    except NotImplementedError as e:
        raise ValueError(f"{what}={os.fspath(p)}: {str(e).strip().splitlines()[0]}; use a local path or gs://.") from e
    except OSError as e:
        raise ValueError(f"{what}={os.fspath(p)} cannot be reached ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); check the URL and your "
                         "credentials.") from e


def check_writable_dir(p: PathLike, what: str) -> None:
    """Raises ``ValueError`` (one sentence) unless ``p`` is, or can be made, a folder vqgen can write
    in: not a file, not read-only. Creates the folder; writes and removes one probe file."""
    check_access(p, what)
    d = path(p)
    if d.exists() and not d.is_dir():
        raise ValueError(f"{what}={os.fspath(p)} is a file; pass a directory (it is created when missing).")
    probe = d / f".vqgen-write-test-{uuid.uuid4().hex[:8]}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError as e:  # a parent is a file
        raise ValueError(f"{what}={os.fspath(p)} lies under a file ({e.filename or 'a parent'}); pass a directory path."
                         ) from e
    except OSError as e:
        reason = e.strerror or (str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise ValueError(f"{what}={os.fspath(p)} is not writable ({reason}); pass a directory you can write to.") from e
