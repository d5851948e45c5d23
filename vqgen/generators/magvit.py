"""MAGVIT's masked video transformer: MaskGIT over a ``[t, h, w]`` token grid, trained on a mix
of tasks with COMMIT-style condition tokens, sampled class-conditionally or for a task.

The network is :class:`vqgen.generators.maskgit.MaskGITTransformer` over ``L = t * h * w``
tokens (row-major over ``t, h, w``), with the same parameters, vocabulary layout (codes, classes,
mask token, optional null class) and sampler; :class:`MAGVITTransformer` only adds the static
training fields ``tasks``, ``grid``, ``num_frames`` and ``cond_frames``.

Training (:func:`loss_fn`). Per example a task is drawn uniformly from ``model.tasks``
(:data:`vqgen.generators.magvit_tasks.TASKS`); its condition region ``c`` on the token grid is
:func:`~vqgen.generators.magvit_tasks.condition_masks` (static, one row per task). A schedule
mask ``s`` is drawn over ALL ``L`` positions as in MaskGIT/MAGVIT (:func:`maskgit.random_mask`),
and the input is MAGVIT's COMMIT input ``m(z) =`` :func:`~vqgen.generators.magvit_tasks.
commit_inputs` ``(z, z~, c, s, [MASK])``: the condition token ``z~`` where masked inside the
condition, ``[MASK]`` where masked outside it, the target ``z`` elsewhere.

The condition tokens ``z~`` are the tokens of the *condition video* (the given frames/pixels, the
rest filled in), which only the tokenizer can compute. ``loss_fn`` sees token batches only, so:

- if the batch has ``'condition_tokens'`` int32 ``[B, len(tasks), L]`` (row ``j``: the tokens of
  the condition video of task ``tasks[j]``; any value for ``'class'``), they are used: full
  COMMIT, and the loss covers every schedule-masked position (MAGVIT's ``mask+refine``: masked
  targets and condition tokens to refine);
- otherwise (what the generator phase of :mod:`vqgen.train.generator` feeds today: the token cache
  holds only the real clip's tokens) ``z~`` is approximated by ``z``. Then ``m(z)`` shows the
  real tokens in the whole condition region and ``[MASK]`` at the schedule-masked positions
  outside it: MaskGIT *editing* training. The loss covers the masked positions outside the
  condition only (inside it the input already is the target).

The approximation is exact where the condition region's tokens of the real clip equal those of
the condition video: for ``frame_prediction`` with a *causal* tokenizer and ``cond_frames`` a
multiple of its temporal factor (token frame ``j`` depends on input frames ``< ft (j + 1)``
only) -- the moving-MNIST config is set up that way. For a non-causal tokenizer, or spatial
tasks, the condition tokens at sampling time differ from what training showed.

Sampling. :func:`sample` is MaskGIT's sampler over the video grid (class-conditional
generation, MAGVIT's ``CG``). :func:`sample_task` decodes with the condition region FIXED to the
given condition tokens (:func:`maskgit.sample`'s editing path) -- consistent with the editing
training above; COMMIT's decoding, which re-feeds ``z~`` at re-masked condition positions and
so refines the condition region, is not implemented.

Deviations from MAGVIT (google-research/magvit ``maskgvt_train_lib``): condition tokens
approximated by targets unless the batch carries them (above); no segment embedding marking
condition tokens (the network is MaskGIT's, unchanged, so MaskGIT checkpoints and code apply);
no task prompt token (the task shows only through which positions are given); tasks drawn
uniformly; the loss is MaskGIT's label-smoothed cross entropy over the codebook logits on masked
positions rather than ``mask+refine+recons`` over all positions.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vqgen.generators import magvit_tasks, mask_schedules, maskgit

VIDEO = True  # the token grid is (t, h, w) (the generator protocol, vqgen/generators/__init__.py)
TASKS = magvit_tasks.TASKS


class MAGVITTransformer(maskgit.MaskGITTransformer):
    """:class:`~vqgen.generators.maskgit.MaskGITTransformer` over a video token grid.

    Same call, parameters and vocabulary as the parent (``seq_len = t * h * w``). Extra static
    fields, read by :func:`loss_fn` and :func:`task_known_mask` only:

    - ``grid``: ``(t, h, w)`` token grid;
    - ``tasks``: training tasks (names of :data:`magvit_tasks.TASKS`);
    - ``num_frames``: frames of the clips the tokenizer encodes (``t`` divides it);
    - ``cond_frames``: given frames of ``frame_prediction``/``frame_interpolation`` in training.
    """

    grid: tuple[int, int, int] = (4, 8, 8)
    tasks: tuple[str, ...] = ("class", "frame_prediction")
    num_frames: int = 16
    cond_frames: int = 1

    @property
    def temporal_factor(self) -> int:
        """Frames per token frame, ``num_frames / t``."""
        return self.num_frames // self.grid[0]


def task_masks(tasks: tuple[str, ...], grid: tuple[int, int, int], num_frames: int, cond_frames: int) -> np.ndarray:
    """bool ``[len(tasks), t*h*w]``: row ``j`` is True on the condition region of ``tasks[j]``."""
    t, h, w = grid
    video_shape = (num_frames, 4 * h, 4 * w)  # pixel sizes only shape the pixel mask, unused here
    rows = [magvit_tasks.condition_masks(task, video_shape, grid, cond_frames)[1].reshape(-1) for task in tasks]
    return np.stack(rows)


def task_known_mask(model: MAGVITTransformer, task: str, batch_size: int, cond_frames: int | None = None) -> jax.Array:
    """``known_mask`` bool ``[B, L]`` of ``task`` on ``model``'s grid (``cond_frames`` defaults to the model's)."""
    cf = model.cond_frames if cond_frames is None else int(cond_frames)
    row = task_masks((task,), model.grid, model.num_frames, cf)[0]  # [L]
    return jnp.broadcast_to(jnp.asarray(row)[None], (batch_size, row.size))


# ------------------------------------------------------------------------------ family API


def build(cfg: dict, *, vocab_size: int, num_classes: int, grid: tuple[int, ...]) -> MAGVITTransformer:
    """``config.generator`` (plain dict) -> :class:`MAGVITTransformer` over the ``(t, h, w)`` grid.

    Keys: those of :func:`vqgen.generators.maskgit.build` plus ``tasks`` (tuple of task names),
    ``num_frames`` (clip length) and ``cond_frames``; ``arch`` is ignored.
    """
    kw = {k: v for k, v in dict(cfg).items() if k != "arch"}
    if len(tuple(grid)) != 3:
        raise ValueError(
            f"the magvit generator models a video token grid (t, h, w), got grid {tuple(grid)}; "
            "use a video tokenizer (tokenizer.arch='magvit') or the 'maskgit' generator for images."
        )
    grid = tuple(int(g) for g in grid)
    tasks = tuple(kw.pop("tasks", ("class",)))
    if not tasks:
        raise ValueError("generator.tasks is empty; list at least one task, e.g. ('class', 'frame_prediction').")
    for task in tasks:
        magvit_tasks.check_task(task)
    num_frames = int(kw.pop("num_frames", 16))
    cond_frames = int(kw.pop("cond_frames", 1))
    if num_frames % grid[0]:
        raise ValueError(
            f"generator.num_frames={num_frames} is not a multiple of the {grid[0]} token frames; set it to the "
            "tokenizer's clip length (tokenizer.num_frames)."
        )
    for task in tasks:  # validates cond_frames against the clip length
        magvit_tasks.validate_condition(task, num_frames, num_frames, cond_frames)
    dtype_name = kw.pop("dtype", "float32")
    if dtype_name not in maskgit.DTYPES:
        raise ValueError(f"generator dtype {dtype_name!r} is unknown; use one of {sorted(maskgit.DTYPES)}.")
    fields = {f.name for f in dataclasses.fields(MAGVITTransformer)} - {"parent", "name", "grid", "seq_len"}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise ValueError(f"unknown magvit generator keys {unknown}; valid keys are {sorted(fields - {'dtype'})}.")
    mask_schedules.check_schedule(kw.get("mask_schedule", "cosine"))
    return MAGVITTransformer(
        codebook_size=int(vocab_size), num_classes=int(num_classes), seq_len=math.prod(grid), grid=grid,
        tasks=tasks, num_frames=num_frames, cond_frames=cond_frames, dtype=maskgit.DTYPES[dtype_name], **kw,
    )


def init_params(model: MAGVITTransformer, rng: jax.Array) -> Any:
    """Initialised (``nn.Partitioned``-boxed) parameters of ``model``."""
    return maskgit.init_params(model, rng)


def training_inputs(model: MAGVITTransformer, batch: dict, rng: jax.Array):
    """What :func:`loss_fn` feeds the model: ``(targets [B, L], inputs [B, L], labels [B],
    weights float32 [B, L], task ids [B], mask ratio [B], dropout rng)``."""
    tokens = batch["tokens"].astype(jnp.int32)
    tokens = tokens.reshape(tokens.shape[0], -1)  # [B, L]
    b, length = tokens.shape
    if length != model.seq_len:
        raise ValueError(
            f"token batch has {length} tokens per clip but the model's grid {model.grid} has {model.seq_len}; "
            "rebuild the token cache with this tokenizer."
        )
    labels = batch["label"] if "label" in batch else batch["labels"]
    task_rng, mask_rng, label_rng, dropout_rng = jax.random.split(rng, 4)
    task_ids = jax.random.randint(task_rng, (b,), 0, len(model.tasks))  # [B]
    table = jnp.asarray(task_masks(model.tasks, model.grid, model.num_frames, model.cond_frames))  # [NT, L]
    cond = table[task_ids]  # [B, L] bool
    sched, ratio = maskgit.random_mask(model.mask_schedule, tokens, mask_rng)  # [B, L], [B]
    if "condition_tokens" in batch:
        ctok = batch["condition_tokens"].astype(jnp.int32)  # [B, NT, L]
        if ctok.shape != (b, len(model.tasks), length):
            raise ValueError(
                f"condition_tokens have shape {tuple(ctok.shape)}, expected {(b, len(model.tasks), length)} "
                "([batch, tasks, tokens], one row per entry of generator.tasks)."
            )
        ctok = jnp.take_along_axis(ctok, task_ids[:, None, None], axis=1)[:, 0]  # [B, L]
        weights = sched.astype(jnp.float32)  # [B, L] mask + refine
    else:
        ctok = tokens
        weights = jnp.logical_and(sched, ~cond).astype(jnp.float32)  # [B, L] masked and unknown
    inputs = magvit_tasks.commit_inputs(tokens, ctok, cond, sched, model.mask_token_id)  # [B, L]
    labels = maskgit.drop_labels(model, labels.astype(jnp.int32), label_rng)  # [B]
    return tokens, inputs, labels, weights, task_ids, ratio, dropout_rng


def loss_fn(model: MAGVITTransformer, params: Any, batch: dict, rng: jax.Array, train: bool = True):
    """Multi-task masked-token loss of ``batch = {'tokens' int32 [B, L], 'label' int32 [B]}``
    (optionally ``'condition_tokens' [B, len(tasks), L]``; see the module docstring).

    Returns the float32 label-smoothed cross entropy over the codebook logits averaged over the
    weighted positions, and metrics ``{'loss', 'accuracy', 'mask_ratio', 'task_<name>'}`` (the
    last: fraction of the batch drawn for each task).
    """
    tokens, inputs, labels, weights, task_ids, ratio, dropout_rng = training_inputs(model, batch, rng)
    logits = model.apply({"params": params}, inputs, labels, train=train, rngs={"dropout": dropout_rng})  # [B, L, V]
    k = model.codebook_size
    logits = logits[..., :k].astype(jnp.float32)  # [B, L, K]
    targets = jax.nn.one_hot(tokens, k, dtype=jnp.float32)  # [B, L, K]
    if model.label_smoothing > 0:
        targets = targets * (1.0 - model.label_smoothing) + model.label_smoothing / k
    ce = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)  # [B, L]
    denom = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(ce * weights) / denom
    accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == tokens).astype(jnp.float32) * weights) / denom
    metrics = {"loss": loss, "accuracy": accuracy, "mask_ratio": jnp.mean(ratio)}
    for j, task in enumerate(model.tasks):
        metrics[f"task_{task}"] = jnp.mean((task_ids == j).astype(jnp.float32))
    return loss, metrics


# ----------------------------------------------------------------------------------- sampler


@dataclasses.dataclass(frozen=True)
class SamplerOptions(maskgit.SamplerOptions):
    """Static, hashable options: MaskGIT's decoding options plus the task to sample.

    - the fields of :class:`vqgen.generators.maskgit.SamplerOptions` (steps, temperatures,
      guidance, mask schedule);
    - ``task``: one of :data:`magvit_tasks.TASKS`; ``'class'`` is plain generation;
    - ``cond_frames``: given frames of ``frame_prediction``/``frame_interpolation``.
    """

    task: str = "class"
    cond_frames: int = 1

    def __post_init__(self):
        super().__post_init__()
        magvit_tasks.check_task(self.task)
        if int(self.cond_frames) < 1:
            raise ValueError(f"cond_frames={self.cond_frames} must be at least 1 (frames given to the task).")
        object.__setattr__(self, "cond_frames", int(self.cond_frames))


def sampler_options(cfg: dict, **overrides: Any) -> SamplerOptions:
    """``config.sample`` (plain dict) -> :class:`SamplerOptions`; a key MAGVIT does not read is an error."""
    return SamplerOptions.from_dict(cfg, "magvit", **overrides)


def _decode_opts(opts: Any) -> maskgit.SamplerOptions:
    if isinstance(opts, maskgit.SamplerOptions):
        return opts
    raise ValueError(f"opts must be a magvit.SamplerOptions, got {type(opts).__name__}; build it with sampler_options.")


def sample(model: MAGVITTransformer, params: Any, labels: Any, rng: jax.Array, opts: Any = SamplerOptions(), *,
           return_history: bool = False):
    """Class-conditional generation: int32 ``[B, L]`` code ids (``L = t*h*w``) for ``labels [B]``.

    MaskGIT decoding over the whole grid (:func:`vqgen.generators.maskgit.sample`). A conditional
    ``opts.task`` needs a condition clip: use :func:`sample_task` (``vqgen.load_generator(...).sample``
    with ``condition=`` does).
    """
    if isinstance(opts, SamplerOptions) and opts.task != "class":
        raise ValueError(
            f"sample.task={opts.task!r} needs a condition clip, which class-conditional sampling does not have; "
            "pass condition clips (vqgen.load_generator(workdir).sample(labels, rng, condition=clips)) or set sample.task='class'."
        )
    return maskgit.sample(model, params, labels, rng, _decode_opts(opts), return_history=return_history)


def condition_inputs(model: MAGVITTransformer, opts: SamplerOptions, clips: Any) -> tuple[np.ndarray, np.ndarray]:
    """The condition of ``opts.task`` for ``clips [N, T, H, W, C]`` in [-1, 1]: ``(known_mask bool
    [N, L], condition video float32 [N, T, H, W, C])``; tokenize the video with the tokenizer and
    pass both to :func:`sample_task`. Raises ``ValueError`` on a clip of the wrong length."""
    if np.ndim(clips) != 5:
        raise ValueError(f"condition clips must be [N, T, H, W, C], got shape {np.shape(clips)}.")
    magvit_tasks.validate_condition(opts.task, int(np.shape(clips)[1]), model.num_frames, opts.cond_frames)
    known, video = magvit_tasks.task_condition(opts.task, jnp.asarray(clips, jnp.float32), model.grid,
                                               cond_frames=opts.cond_frames)
    return np.asarray(known), np.asarray(video)


def sample_task(model: MAGVITTransformer, params: Any, labels: Any, rng: jax.Array, opts: Any,
                condition_tokens: Any, known_mask: Any, *, return_history: bool = False):
    """Conditional generation: int32 ``[B, L]`` code ids that keep ``condition_tokens`` where
    ``known_mask`` (both ``[B, L]``; :func:`task_known_mask` gives a task's mask) and decode the
    rest with MaskGIT's schedule over the unknown positions (``maskgit.sample``'s editing path;
    known tokens are never changed). ``labels [B]``: class ids, or ``model.null_class`` for none
    (CFG models). Raises ``ValueError`` on shapes that do not match the model's grid.
    """
    want = (int(np.shape(labels)[0]) if np.ndim(labels) == 1 else -1, model.seq_len)
    for name, arr in (("condition_tokens", condition_tokens), ("known_mask", known_mask)):
        shape = tuple(np.shape(arr))
        if len(shape) > 2:
            shape = shape[:1] + (int(np.prod(shape[1:])),)
        if shape != want:
            raise ValueError(
                f"{name} has shape {tuple(np.shape(arr))} but the model's grid {model.grid} needs "
                f"[{want[0]}, {model.seq_len}] (or [{want[0]}, {', '.join(map(str, model.grid))}]); tokenize a clip of "
                f"{model.num_frames} frames with the workdir's tokenizer."
            )
    b = want[0]
    condition_tokens = jnp.asarray(condition_tokens, jnp.int32).reshape(b, -1)  # [B, L]
    known_mask = jnp.asarray(known_mask, bool).reshape(b, -1)  # [B, L]
    return maskgit.sample(model, params, labels, rng, _decode_opts(opts), known_tokens=condition_tokens,
                          known_mask=known_mask, return_history=return_history)
