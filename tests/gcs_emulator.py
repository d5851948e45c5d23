"""An in-memory Google Cloud Storage server on the loopback interface, for tests of gs:// workdirs.

Both clients vqgen uses reach it: ``gcsfs`` (through ``etils.epath``; ``STORAGE_EMULATOR_HOST``)
and TensorStore, which Orbax writes arrays with (``TENSORSTORE_GCS_HTTP_URL``). The emulator's
media downloads lack the ``x-goog-generation`` header that TensorStore reads on every GET, so it
is added here.
"""
from __future__ import annotations

import contextlib
import os
import socket

BUCKET = "vqgen-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _add_generation_headers(objects) -> None:
    if getattr(objects.download, "_with_generation", False):
        return
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:  # noqa: BLE001 - not found: the plain handler already answered 404
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    download._with_generation = True
    objects.download = download


@contextlib.contextmanager
def gcs_server():
    """Yields the environment (a dict) under which gs://vqgen-test/ is served from memory here."""
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import create_server

    _add_generation_headers(objects)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GOOGLE_CLOUD_PROJECT": "test"}
    try:
        yield env
    finally:
        server.stop()


def listing(env: dict, prefix: str) -> list[str]:
    """Every object under ``gs://<prefix>`` (paths relative to it), read through gcsfs."""
    import gcsfs

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=env["STORAGE_EMULATOR_HOST"], skip_instance_cache=True)
        root = prefix.removeprefix("gs://").rstrip("/")
        return sorted(p[len(root) + 1:] for p in fs.find(root))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_bytes(env: dict, path: str) -> bytes:
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon", endpoint_url=env["STORAGE_EMULATOR_HOST"], skip_instance_cache=True)
    return fs.cat(path.removeprefix("gs://"))
