"""vqgen.evaluation: FID/sFID/IS/precision-recall as the papers report them, reconstruction
metrics, codebook usage, the FID InceptionV3 in Flax and a digit judge for the embedded data.

Heavy pieces (``inception``, ``judge``, ``fid``) are imported on demand: ``from
vqgen.evaluation import inception``.
"""
from vqgen.evaluation.metrics import (
    CodebookAccumulator,
    codebook_stats,
    compute_statistics,
    fid_from_activations,
    frechet_distance,
    inception_score,
    load_reference_stats,
    precision_recall,
    psnr,
    rfid,
    save_reference_stats,
    sfid,
    ssim,
)

__all__ = [
    "CodebookAccumulator",
    "codebook_stats",
    "compute_statistics",
    "fid_from_activations",
    "frechet_distance",
    "inception_score",
    "load_reference_stats",
    "precision_recall",
    "psnr",
    "rfid",
    "save_reference_stats",
    "sfid",
    "ssim",
]
