"""FID / sFID / Inception Score / precision-recall between two ``.npz`` files, on the device mesh.

    python -m vqgen.evaluation.fid SAMPLES REFERENCE [--inception PATH] [--batch_size 200]

Each file is either images (``arr_0``, the ADM layout, or ``images``, vqgen's
``samples/samples.npz``; uint8 ``[N, H, W, 3]``) or statistics (``mu``, ``sigma`` and optionally
``mu_s``, ``sigma_s``, as ``save_reference_stats`` or the ADM evaluator's reference batches
write). As in the ADM evaluator, stored statistics are used for FID when present and images (or
stored activations) for precision/recall. From two statistics files only FID is computed.

The metrics are printed as one JSON line, last: ``{"fid": ..., "sfid": ..., "inception_score":
..., "precision": ..., "recall": ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

import numpy as np

from vqgen import fileio
from vqgen.evaluation import metrics

DEFAULT_INCEPTION = os.environ.get("VQGEN_INCEPTION", "~/.cache/vqgen/inception_fid.npz")


def _load_npz(path: str) -> dict[str, Any]:
    if not fileio.exists(path):
        raise FileNotFoundError(f"{path} not found; pass an .npz of images (arr_0 or images) or statistics (mu, sigma).")
    z = fileio.open_npz(path)
    files = set(z.files)
    out: dict[str, Any] = {"path": path}
    for key in ("arr_0", "images"):
        if key in files:
            images = z[key]
            metrics.check_images(images, f"images ({key}) in {path}", channels=(1, 3))
            if images.dtype != np.uint8:
                raise ValueError(
                    f"images ({key}) in {path} have dtype {images.dtype}; store uint8 [N, H, W, C] in [0, 255]."
                )
            out["images"] = images
            break
    if "mu" in files and "sigma" in files:
        out["stats"] = metrics.load_reference_stats(path)
    if "images" not in out and "stats" not in out:
        raise ValueError(
            f"{path} holds {sorted(files)}; expected images under 'arr_0' or 'images', or statistics 'mu' and 'sigma'."
        )
    return out


def compute_activations(images: np.ndarray, params: Any, batch_size: int, mesh: Any, desc: str) -> dict[str, np.ndarray]:
    """Inception features (pool, spatial, logits_unbiased) of all ``images`` in batches, with a bar."""
    from tqdm.auto import tqdm

    from vqgen.evaluation import inception

    keep = ("pool", "spatial", "logits_unbiased")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in keep}
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", file=sys.stderr):
        feats = inception.extract(params, images[start : start + batch_size], mesh=mesh)
        for k in keep:
            parts[k].append(feats[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_files(
    samples: str, reference: str, inception_path: str = DEFAULT_INCEPTION, batch_size: int = 200, mesh: Any = None
) -> dict[str, float]:
    """The metrics between two ``.npz`` files (see the module docstring); a dict of floats."""
    a, b = _load_npz(samples), _load_npz(reference)
    if "images" not in a and "images" not in b:
        sa, sb = a["stats"], b["stats"]
        return {"fid": metrics.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])}

    from vqgen import parallel
    from vqgen.evaluation import inception

    params = inception.load_inception_params(inception_path)
    mesh = parallel.create_mesh((-1, 1, 1)) if mesh is None else mesh
    if batch_size % parallel.data_parallel_size(mesh):
        batch_size += parallel.data_parallel_size(mesh) - batch_size % parallel.data_parallel_size(mesh)

    def side(f, name):
        acts = compute_activations(f["images"], params, batch_size, mesh, name) if "images" in f else {}
        stats = f.get("stats", {})
        pool = acts.get("pool", stats.get(metrics.ACTIVATIONS_KEY))
        spatial = acts.get("spatial", stats.get(metrics.SPATIAL_ACTIVATIONS_KEY))
        if "mu" in stats:
            mu, sigma = stats["mu"], stats["sigma"]
        else:
            mu, sigma = metrics.compute_statistics(pool)
        if "mu_s" in stats:
            mu_s, sigma_s = stats["mu_s"], stats["sigma_s"]
        elif spatial is not None:
            with warnings.catch_warnings():  # 2023-d spatial features: the pool warning suffices
                warnings.simplefilter("ignore")
                mu_s, sigma_s = metrics.compute_statistics(spatial)
        else:
            mu_s = sigma_s = None
        return {"pool": pool, "logits": acts.get("logits_unbiased"), "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}

    s, r = side(a, "samples"), side(b, "reference")
    out: dict[str, float] = {"fid": metrics.frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"])}
    if s["mu_s"] is not None and r["mu_s"] is not None:
        out["sfid"] = metrics.frechet_distance(s["mu_s"], s["sigma_s"], r["mu_s"], r["sigma_s"])
    if s["logits"] is not None:
        splits = 10 if len(s["logits"]) >= 10 else 1
        out["inception_score"], out["inception_score_std"] = metrics.inception_score(s["logits"], splits=splits)
    if s["pool"] is not None and r["pool"] is not None:
        out["precision"], out["recall"] = metrics.precision_recall(r["pool"], s["pool"], k=3)
    else:
        print("precision/recall skipped: a statistics file without activations has no samples to compare.", file=sys.stderr)
    if "images" in a:
        out["num_samples"] = int(len(a["images"]))
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="FID/sFID/IS/precision-recall between two .npz files.")
    parser.add_argument("samples", help=".npz of samples (arr_0 or images, uint8 NHWC) or statistics (mu, sigma)")
    parser.add_argument("reference", help=".npz reference batch (ADM layout) or statistics file")
    parser.add_argument("--inception", default=DEFAULT_INCEPTION, help="converted FID Inception weights (.npz)")
    parser.add_argument("--batch_size", type=int, default=200, help="images per step (rounded up to the device count)")
    args = parser.parse_args(argv)
    result = evaluate_files(args.samples, args.reference, args.inception, args.batch_size)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
