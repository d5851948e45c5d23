"""MAGVIT's multi-task conditions and COMMIT masking for masked video generation.

A task says which part of a clip is given. :func:`task_condition` turns a clip into

* ``known_mask`` ``[B, L]`` bool: the condition region on the flattened token grid
  ``(t, h, w)`` (row-major, ``L = t * h * w``), and
* the condition video ``[B, T, H, W, C]``: the given pixels, with the missing frames/pixels
  filled in (replicated, interpolated or zeros, as in google-research/magvit
  ``train_lib/cond_utils.py``). Tokenizing it gives the condition tokens ``z~``.

Tasks (MAGVIT paper abbreviations in brackets; regions use ``[a/4, 3a/4)`` of the frame or of
the token map, so pixel and token regions line up when ``h`` and ``w`` are multiples of 4):

``class`` (CG)
  class-conditional generation; nothing is known (the class label is the condition).
``frame_prediction`` (FP)
  the first ``cond_frames`` frames are known -> the first ``ceil(cond_frames / ft)`` token frames
  (``ft`` = temporal factor ``T / t``). Missing frames repeat the last given frame.
``frame_interpolation`` (FI)
  the first and the last ``cond_frames`` frames are known -> the first and last
  ``ceil(cond_frames / ft)`` token frames. Missing frames are the linear interpolation between the
  last leading and the first trailing given frame.
``central_inpainting`` (IPC)
  everything except the central rectangle is known; the centre is filled with zeros.
``central_outpainting`` (OPC)
  only the central rectangle is known; the border replicates the rectangle's edge pixels.
``horizontal_outpainting`` (OPH)
  the central horizontal band (rows ``[H/4, 3H/4)``, full width) is known; edge padding.
``vertical_outpainting`` (OPV)
  the central vertical band (columns ``[W/4, 3W/4)``, full height) is known; edge padding.

COMMIT (MAGVIT Sec. 3.2, "conditional masked modeling by interior tokens"). With target tokens
``z`` (of the real clip), condition tokens ``z~`` (of the condition video), the condition region
``c`` and per-token scores ``s`` with cut-off ``s*`` from the mask schedule (``schedule_mask =
s <= s*``, drawn over all ``L`` tokens, the condition region included), the input is

    m(z_i) = z~_i      if s_i <= s* and c_i       (masked, in the condition: the condition token)
             [MASK]    if s_i <= s* and not c_i   (masked, outside the condition)
             z_i       if s_i > s*                (not masked: the target token)

and the model is trained to predict ``z`` at every position (MAGVIT's default
``weight_mode='mask+refine+recons'``: refine the condition tokens, predict the masked ones,
reconstruct the rest; :func:`commit_loss_weights`). :func:`commit_inputs` implements ``m``.
Decoding starts from ``m`` with every position masked (condition tokens in the condition region,
``[MASK]`` elsewhere); after each step the tokens that the schedule re-masks are again set by ``m``
(``commit_inputs(current, z~, c, still_masked, mask_id)``), so the condition region is refined
too rather than frozen. A sampler that instead freezes known tokens (MaskGIT editing) can use
``known_mask`` with the condition tokens as the known values.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TASKS: tuple[str, ...] = (
    "class",
    "frame_prediction",
    "frame_interpolation",
    "central_inpainting",
    "central_outpainting",
    "horizontal_outpainting",
    "vertical_outpainting",
)
PAPER_NAMES = {
    "class": "CG",
    "frame_prediction": "FP",
    "frame_interpolation": "FI",
    "central_inpainting": "IPC",
    "central_outpainting": "OPC",
    "horizontal_outpainting": "OPH",
    "vertical_outpainting": "OPV",
}
# MAGVIT's fill for the missing part of the condition video of each task.
DEFAULT_PADDING = {
    "class": "constant",
    "frame_prediction": "edge",
    "frame_interpolation": "interpolate",
    "central_inpainting": "constant",
    "central_outpainting": "edge",
    "horizontal_outpainting": "edge",
    "vertical_outpainting": "edge",
}
PADDINGS = ("constant", "edge", "interpolate")


def check_task(task: str) -> None:
    """Raises a ValueError naming the valid tasks when ``task`` is not one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is unknown; use one of {', '.join(TASKS)}.")


def validate_condition(task: str, num_frames_given: int, num_frames_expected: int, cond_frames: int = 1) -> None:
    """Checks a condition clip before tokenizing it.

    Args:
      task: one of :data:`TASKS`.
      num_frames_given: frames in the condition clip.
      num_frames_expected: frames the video tokenizer encodes (its ``num_frames``).
      cond_frames: given frames for ``frame_prediction`` (at the start) and
        ``frame_interpolation`` (at each end).

    Raises:
      ValueError: unknown task, wrong clip length, or ``cond_frames`` that leaves nothing to
        generate.
    """
    check_task(task)
    if num_frames_given != num_frames_expected:
        raise ValueError(
            f"the condition clip for task {task!r} has {num_frames_given} frames but the video tokenizer encodes "
            f"clips of {num_frames_expected} frames; pass a clip of {num_frames_expected} frames (frames outside "
            "the task's condition are ignored and filled in)."
        )
    t = num_frames_expected
    if task == "frame_prediction" and not 1 <= cond_frames < t:
        raise ValueError(f"frame_prediction needs 1 <= cond_frames < {t} (the clip length), got cond_frames={cond_frames}.")
    if task == "frame_interpolation" and not (cond_frames >= 1 and 2 * cond_frames < t):
        raise ValueError(
            f"frame_interpolation needs cond_frames >= 1 given frames at each end and 2 * cond_frames < {t} "
            f"(the clip length), got cond_frames={cond_frames}."
        )


def _band(n: int) -> slice:
    return slice(n // 4, n * 3 // 4)


def condition_masks(
    task: str,
    video_shape: tuple[int, int, int],
    latent_shape: tuple[int, int, int],
    cond_frames: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Static (NumPy) condition regions of ``task``.

    Args:
      task: one of :data:`TASKS`.
      video_shape: ``(T, H, W)`` of the clip.
      latent_shape: ``(t, h, w)`` of its token grid.
      cond_frames: given frames of ``frame_prediction``/``frame_interpolation``.

    Returns:
      ``pixel_mask`` bool ``[T, H, W]`` and ``token_mask`` bool ``[t, h, w]``; True = given.
    """
    check_task(task)
    T, H, W = video_shape
    t, h, w = latent_shape
    if t < 1 or T % t:
        raise ValueError(f"latent_shape {latent_shape} does not divide the clip length {T}; pass the tokenizer's token grid.")
    validate_condition(task, T, T, cond_frames)
    ft = T // t
    pix = np.zeros((T, H, W), bool)
    tok = np.zeros((t, h, w), bool)
    k = math.ceil(cond_frames / ft)
    if task == "frame_prediction":
        pix[:cond_frames], tok[:k] = True, True
    elif task == "frame_interpolation":
        pix[:cond_frames], pix[T - cond_frames:] = True, True
        tok[:k], tok[t - k:] = True, True
    elif task in ("central_inpainting", "central_outpainting"):
        pix[:, _band(H), _band(W)] = True
        tok[:, _band(h), _band(w)] = True
        if task == "central_inpainting":
            pix, tok = ~pix, ~tok
    elif task == "horizontal_outpainting":
        pix[:, _band(H), :], tok[:, _band(h), :] = True, True
    elif task == "vertical_outpainting":
        pix[:, :, _band(W)], tok[:, :, _band(w)] = True, True
    return pix, tok


def _edge_indices(n: int, band: slice) -> np.ndarray:
    return np.clip(np.arange(n), band.start, band.stop - 1)


def task_condition(
    task: str,
    video: jax.Array,
    latent_shape: tuple[int, int, int],
    *,
    cond_frames: int = 1,
    padding: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The condition region on the token grid and the condition video of ``task`` for ``video``.

    Args:
      task: one of :data:`TASKS`.
      video: ``[B, T, H, W, C]`` clips in [-1, 1].
      latent_shape: ``(t, h, w)``, the video tokenizer's token grid for ``(T, H, W)``.
      cond_frames: given frames for ``frame_prediction`` (first ones) and
        ``frame_interpolation`` (at each end); MAGVIT uses 1.
      padding: how the missing part is filled: ``"constant"`` (zeros), ``"edge"`` (replicate the
        nearest given frame / edge pixel), ``"interpolate"`` (``frame_interpolation`` only); None
        = MAGVIT's choice (:data:`DEFAULT_PADDING`).

    Returns:
      ``known_mask`` bool ``[B, L]`` (True on the condition's token positions, ``L = t*h*w``) and
      the condition video ``[B, T, H, W, C]`` (given pixels unchanged, the rest filled in).
    """
    check_task(task)
    if video.ndim != 5:
        raise ValueError(f"task_condition expects clips [B, T, H, W, C], got shape {tuple(video.shape)}.")
    b, T, H, W, _ = video.shape
    padding = DEFAULT_PADDING[task] if padding is None else padding
    if padding not in PADDINGS or (padding == "interpolate" and task != "frame_interpolation"):
        raise ValueError(
            f"padding {padding!r} does not apply to task {task!r}; use 'constant', 'edge'"
            + (" or 'interpolate'." if task == "frame_interpolation" else ".")
        )
    pix, tok = condition_masks(task, (T, H, W), tuple(latent_shape), cond_frames)
    known = jnp.broadcast_to(jnp.asarray(tok.reshape(1, -1)), (b, tok.size))  # [B, L]
    if task == "class" or padding == "constant":
        return known, jnp.where(jnp.asarray(pix)[None, ..., None], video, jnp.zeros((), video.dtype))
    if task == "frame_prediction":  # edge: repeat the last given frame
        return known, video[:, np.minimum(np.arange(T), cond_frames - 1)]
    if task == "frame_interpolation":
        first, last = video[:, cond_frames - 1], video[:, T - cond_frames]  # [B, H, W, C]
        ts = np.arange(T)
        if padding == "edge":
            idx = np.where(ts < T / 2, np.minimum(ts, cond_frames - 1), np.maximum(ts, T - cond_frames))
            return known, video[:, idx]
        span = T - 2 * cond_frames + 1
        frac = np.clip((ts - (cond_frames - 1)) / span, 0.0, 1.0).astype(np.float32)  # [T]
        frac = jnp.asarray(frac, video.dtype)[None, :, None, None, None]
        middle = first[:, None] + (last - first)[:, None] * frac  # [B, T, H, W, C]
        return known, jnp.where(jnp.asarray(pix)[None, ..., None], video, middle.astype(video.dtype))
    # outpainting with edge padding: gather with indices clipped into the given band
    hi = _edge_indices(H, _band(H)) if task in ("central_outpainting", "horizontal_outpainting") else np.arange(H)
    wi = _edge_indices(W, _band(W)) if task in ("central_outpainting", "vertical_outpainting") else np.arange(W)
    return known, video[:, :, hi][:, :, :, wi]


def commit_inputs(
    target_tokens: jax.Array,
    condition_tokens: jax.Array,
    condition_mask: jax.Array,
    schedule_mask: jax.Array,
    mask_token_id: int,
) -> jax.Array:
    """MAGVIT's COMMIT input ``m(z)`` (module docstring), elementwise over ``[B, L]``.

    Args:
      target_tokens: ``z``, int tokens of the real clip ``[B, L]``.
      condition_tokens: ``z~``, int tokens of the condition video ``[B, L]``.
      condition_mask: ``c``, bool, True in the condition region (``known_mask``); broadcastable.
      schedule_mask: bool, True where the mask schedule masks the token (``s_i <= s*``).
      mask_token_id: id of ``[MASK]``.

    Returns:
      int32 ``[B, L]``: ``z~`` where masked and in the condition, ``[MASK]`` where masked and
      outside it, ``z`` where not masked.
    """
    replace = jnp.where(condition_mask, condition_tokens, mask_token_id)  # [B, L]
    return jnp.where(schedule_mask, replace, target_tokens).astype(jnp.int32)


def commit_segment_ids(condition_mask: jax.Array, schedule_mask: jax.Array) -> jax.Array:
    """1 where ``commit_inputs`` placed a condition token, else 0 (MAGVIT's ``segment_ids``).

    The official code adds a segment embedding for these positions so the transformer can tell
    a condition token from a target token with the same id.
    """
    return jnp.logical_and(condition_mask, schedule_mask).astype(jnp.int32)


def commit_loss_weights(condition_mask: jax.Array, schedule_mask: jax.Array,
                        mode: str = "mask+refine+recons") -> jax.Array:
    """Per-token float32 loss weights ``[B, L]`` of the COMMIT objective.

    ``"mask+refine+recons"`` (MAGVIT's default): every token; ``"mask+refine"``: only positions
    masked by the schedule (``[MASK]`` and condition tokens).
    """
    shape = jnp.broadcast_shapes(jnp.shape(condition_mask), jnp.shape(schedule_mask))
    if mode == "mask+refine+recons":
        return jnp.ones(shape, jnp.float32)
    if mode == "mask+refine":
        return jnp.broadcast_to(schedule_mask, shape).astype(jnp.float32)
    raise ValueError(f"COMMIT weight mode {mode!r} is unknown; use 'mask+refine+recons' or 'mask+refine'.")
