"""Scoring video completion: MAGVIT's frame prediction against simple baselines.

Frame prediction (MAGVIT's FP task): held-out clips are cut to their first ``cond_frames``
frames, the generator completes the rest, and the predicted frames ``cond_frames + 1 .. T`` are
compared with the ground truth by PSNR, against

- ``copy_last``: every predicted frame is the last given frame (the acceptance baseline);
- ``zeros``: black frames (on moving MNIST, a low bar that a blurry or empty guess also beats);
- ``tokenizer``: the tokenizer's reconstruction of the real clip (what perfect tokens would give).
"""
from __future__ import annotations

import numpy as np

from vqgen.evaluation import metrics as em

MAX_PSNR = 100.0  # dB; identical frames (a digit that does not move) would give +inf


def per_frame_psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PSNR per frame ``[N, T]`` of clips ``[N, T, H, W, C]`` in [-1, 1], capped at :data:`MAX_PSNR`."""
    n, t = x.shape[:2]
    flat = lambda a: np.asarray(a, np.float32).reshape((n * t,) + a.shape[2:])  # noqa: E731
    return np.minimum(np.asarray(em.psnr(flat(x), flat(y))), MAX_PSNR).reshape(n, t)


def frame_prediction_metrics(prediction: np.ndarray, truth: np.ndarray, cond_frames: int,
                             reconstruction: np.ndarray | None = None) -> dict:
    """PSNRs of predicted frames ``cond_frames + 1 .. T`` of float clips ``[N, T, H, W, C]`` in [-1, 1].

    Means over clips and predicted frames of per-frame PSNR in dB: the prediction, the
    copy-last-frame and black-frame baselines, and (given ``reconstruction``, the tokenizer's
    reconstruction of ``truth``) what perfect tokens would score; plus per-frame curves.
    """
    if prediction.shape != truth.shape or prediction.ndim != 5:
        raise ValueError(f"prediction {prediction.shape} and ground truth {truth.shape} must be clips [N, T, H, W, C] "
                         "of one shape.")
    frames = truth.shape[1]
    if not 1 <= cond_frames < frames:
        raise ValueError(f"cond_frames={cond_frames} leaves no frame to predict in clips of {frames} frames.")
    future = slice(cond_frames, frames)
    copy_last = np.repeat(truth[:, cond_frames - 1:cond_frames], frames - cond_frames, axis=1)
    p_pred = per_frame_psnr(prediction[:, future], truth[:, future])  # [N, T - cf]
    p_copy = per_frame_psnr(copy_last, truth[:, future])
    p_zero = per_frame_psnr(np.full_like(truth[:, future], -1.0), truth[:, future])
    out = {
        "task": "frame_prediction",
        "cond_frames": int(cond_frames),
        "num_clips": int(len(truth)),
        "predicted_frames": f"{cond_frames + 1}-{frames}",
        "psnr_prediction": float(np.mean(p_pred)),
        "psnr_copy_last_frame": float(np.mean(p_copy)),
        "psnr_zeros": float(np.mean(p_zero)),
        "psnr_prediction_per_frame": [float(v) for v in np.mean(p_pred, axis=0)],
        "psnr_copy_last_frame_per_frame": [float(v) for v in np.mean(p_copy, axis=0)],
        "prediction_beats_copy_last": bool(np.mean(p_pred) > np.mean(p_copy)),
    }
    if reconstruction is not None:
        p_rec = per_frame_psnr(reconstruction, truth)  # [N, T]
        out["psnr_tokenizer_predicted_frames"] = float(np.mean(p_rec[:, future]))
        out["psnr_tokenizer_all_frames"] = float(np.mean(p_rec))
    return out
