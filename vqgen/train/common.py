"""What the tokenizer and generator trainers share: optimisers, sharded init, EMA, the loop.

The loop is the same for every phase: a jitted, donated ``step(state, batch, rng, *frozen)``, a
grain iterator, an Orbax :class:`~vqgen.checkpoint.Checkpointer`, scalars fetched to the host
every ``log_every`` steps, a progress bar with rate and ETA, a checkpoint on SIGTERM or Ctrl-C, and a clear
error on a non-finite loss.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboardX import SummaryWriter, record_writer
from tqdm.auto import tqdm

from vqgen import fileio, parallel
from vqgen.checkpoint import Checkpointer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def make_optimizer(*, lr: float, num_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.95,
                   grad_clip: float = 0.0, min_lr_ratio: float = 0.1) -> optax.GradientTransformation:
    """AdamW with linear warmup and a cosine (or constant) schedule, and global-norm clipping."""
    warmup_steps = min(int(warmup_steps), max(int(num_steps) - 1, 0))
    if schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup_steps else lr, peak_value=lr, warmup_steps=warmup_steps,
            decay_steps=max(int(num_steps), warmup_steps + 1), end_value=lr * min_lr_ratio)
    elif schedule == "constant":
        sched = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
            [warmup_steps]) if warmup_steps else optax.constant_schedule(lr)
    else:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; use 'cosine' or 'constant'.")
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
    parts.append(optax.adamw(sched, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*parts)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """``ema <- decay * ema + (1 - decay) * params`` leaf by leaf (float32 math)."""
    return jax.tree.map(lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(e.dtype), ema, params)


def sharded_init(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh, rules) -> tuple[Any, Any]:
    """Initialises a (boxed) state directly into its shardings; returns ``(state, shardings)``.

    ``init_fn(rng)`` returns a pytree whose parameters may be ``nn.Partitioned``-boxed; the
    result is unboxed, placed by the logical rules, and never materialised on the host.
    """
    with parallel.mesh_context(mesh, rules):
        abstract = jax.eval_shape(init_fn, rng)
        shardings = parallel.logical_to_sharding(abstract, mesh, rules)
        state = jax.jit(lambda r: parallel.unbox(init_fn(r)), out_shardings=shardings)(rng)
    return state, shardings


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def count_params(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(parallel.unbox(tree))))


class PreemptionGuard:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks after each step
    (then: save, exit 0); a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        def handler(signum, frame):
            del frame
            name = signal.Signals(signum).name
            if signum == signal.SIGINT and self.requested:
                raise KeyboardInterrupt("second Ctrl-C: stopping without a checkpoint")
            self.requested = name
            logging.warning("%s received: saving a checkpoint after this step and stopping%s.", name,
                            " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")

        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. inside some notebook runners)
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False


class Preempted(Exception):
    """Raised after a checkpoint was written because SIGTERM or Ctrl-C arrived; the CLI exits 0."""


class _ObjectRecordWriter:
    """A TensorBoard event file on an object store (``gs://``, ``s3://``, ...), through the path
    layer: the events are buffered and the whole object is rewritten on each flush."""

    def __init__(self, path: str):
        self.path, self._buffer, self.closed = path, bytearray(), False

    def write(self, data: bytes) -> None:
        self._buffer += data

    def flush(self) -> None:
        fileio.path(self.path).write_bytes(bytes(self._buffer))

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _ObjectRecordWriterFactory:
    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        fileio.makedirs(path)


for _scheme in ("gs", "s3", "az", "hf"):  # tensorboardX's own gs:// writer needs google-cloud-storage credentials
    record_writer.register_writer_factory(_scheme, _ObjectRecordWriterFactory())


class MetricWriter:
    """TensorBoard scalars and images on process 0, plus a JSON-lines log beside them.

    Local or remote (``gs://...``) alike. A local ``metrics.jsonl`` is appended line by line; on an
    object store, which cannot append, the log is rewritten whole at :meth:`flush` (the loop
    flushes before each checkpoint, so a killed run never lacks a step its checkpoint holds).
    """

    FLUSH_SECONDS = 30.0

    def __init__(self, logdir: str | None, start_step: int = 0):
        """``start_step``: the step a resumed run starts from; what an earlier run logged after it
        (steps it trained but did not checkpoint, replayed now) is dropped from both logs."""
        self.logdir = str(logdir) if (logdir and parallel.is_main_process()) else None
        self._tb = None
        self._remote = bool(self.logdir) and fileio.is_remote(self.logdir)
        self._lines: list[str] = []
        self._last_flush = time.monotonic()
        if self.logdir:
            fileio.makedirs(self.logdir)
            self._truncate_jsonl(int(start_step))
            self._tb = SummaryWriter(self.logdir, flush_secs=30, purge_step=int(start_step) + 1 if start_step else None)

    @property
    def jsonl_path(self) -> str:
        return fileio.join(self.logdir, "metrics.jsonl")

    def _truncate_jsonl(self, start_step: int) -> None:
        path = self.jsonl_path
        if not fileio.exists(path):
            return
        lines = fileio.read_text(path).splitlines(keepends=True)
        keep = [line if line.endswith("\n") else line + "\n" for line in lines
                if line.strip() and _logged_step(line) <= start_step]
        if self._remote:
            self._lines = keep
        if keep != lines:
            fileio.write_text(path, "".join(keep))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.logdir:
            return
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), step)
        line = json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n"
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
                self.flush()
        else:
            with open(self.jsonl_path, "a") as f:
                f.write(line)

    def image(self, step: int, tag: str, image_hwc_uint8: np.ndarray) -> None:
        if self._tb is not None:
            self._tb.add_image(tag, image_hwc_uint8, step, dataformats="HWC")

    def flush(self) -> None:
        """Writes what is buffered (the remote log and TensorBoard events)."""
        if not self.logdir:
            return
        if self._remote:
            fileio.write_text(self.jsonl_path, "".join(self._lines))
        if self._tb is not None:
            self._tb.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self.logdir:
            self.flush()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except ValueError:  # a line cut short by a kill while it was appended
        return 1 << 62


class NonFiniteLoss(FloatingPointError):
    """A step produced a non-finite loss; no checkpoint was written after it."""


def check_finite(step: int, metrics: dict[str, float]) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(float(v))]
    if bad:
        raise NonFiniteLoss(
            f"non-finite {', '.join(bad)} at step {step}; lower the learning rate or enable "
            "gradient clipping, and resume from the last checkpoint.")


@jax.jit
def _first_bad_step(first_bad: jax.Array, metrics: dict, step: jax.Array) -> jax.Array:
    """``step`` if this is the first step whose metrics are not all finite, else ``first_bad``
    (-1 while every step so far was finite); runs on device, so the loop never waits for it."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]))
    return jnp.where((first_bad < 0) & ~finite, step, first_bad)


def image_grid(images: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Tiles ``[N, H, W, C]`` uint8 (or [-1,1] float) images into one ``[rows*H, cols*W, C]``."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    n, h, w, c = images.shape
    rows = rows or int(math.ceil(math.sqrt(n)))
    cols = int(math.ceil(n / rows))
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = images[i]
    return grid


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255]."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_png(path: str, image_hwc_uint8: np.ndarray) -> None:
    """A uint8 ``[H, W, C]`` image as a PNG at ``path`` (local or remote), written atomically."""
    fileio.save_png(path, image_hwc_uint8)


@dataclasses.dataclass
class LoopConfig:
    num_steps: int
    log_every: int = 50
    save_every: int = 500
    image_every: int = 0
    desc: str = "train"


def run_loop(*, step_fn: Callable, state: Any, data_iter: Iterator, put_batch: Callable[[Any], Any],
             rng: jax.Array, frozen: tuple, checkpointer, loop: LoopConfig, writer: MetricWriter,
             on_images: Callable[[int, Any], None] | None = None, start_step: int = 0,
             first_batch: Any = None, fix_hint: str = "lower the learning rate or enable gradient clipping") -> Any:
    """Runs ``step_fn`` from ``start_step`` to ``loop.num_steps`` with logging and checkpoints.

    ``step_fn(state, batch, rng, *frozen) -> (state, metrics)`` must fold the step into ``rng``
    itself, so a resumed run sees the same keys. ``first_batch``: the batch already taken from
    ``data_iter`` (to check it before compiling), used for the first step. Raises
    :class:`Preempted` after saving when SIGTERM or Ctrl-C arrives, and :class:`NonFiniteLoss`
    when a step's metrics are not finite: every step is checked on device and the flag is read
    before each checkpoint, so no checkpoint is written after a bad step (``fix_hint`` says what
    to change before resuming from the last good one).
    """
    show = parallel.is_main_process()
    bar = tqdm(total=loop.num_steps, initial=start_step, desc=loop.desc, disable=not show,
               dynamic_ncols=True, mininterval=2.0)
    t_last, step_last = time.perf_counter(), start_step
    first_bad = jnp.asarray(-1, jnp.int32)

    def stop_if_not_finite(done: int) -> None:
        bad = int(jax.device_get(first_bad))
        if bad < 0:
            return
        checkpointer.wait()
        bar.close()
        writer.flush()
        last = checkpointer.latest_step()
        where = (f"the last good checkpoint, step {last} in {checkpointer.directory}, is left intact: {fix_hint}, then "
                 f"run the same command to resume from step {last}" if last is not None else
                 f"there is no checkpoint yet: {fix_hint} and run the same command again")
        raise NonFiniteLoss(f"non-finite loss at step {bad} (found by step {done}); {where}.")

    with PreemptionGuard() as guard:
        for step in range(start_step, loop.num_steps):
            raw = first_batch if (step == start_step and first_batch is not None) else next(data_iter)
            state, metrics = step_fn(state, put_batch(raw), rng, *frozen)
            done = step + 1
            first_bad = _first_bad_step(first_bad, metrics, jnp.asarray(done, jnp.int32))
            if done % loop.log_every == 0 or done == loop.num_steps:
                stop_if_not_finite(done)
                pending = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                pending["steps_per_sec"] = (done - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                writer.scalars(done, pending)
                shown = [k for k in ("loss", "l1", "accuracy", "q/usage", "d_loss") if k in pending][:4]
                bar.set_postfix({k: f"{pending[k]:.4g}" for k in shown}, refresh=False)
            if on_images is not None and loop.image_every and done % loop.image_every == 0:
                on_images(done, state)
            bar.update(1)
            final = done == loop.num_steps or bool(guard.requested)
            if checkpointer.should_save(done, force=final):
                stop_if_not_finite(done)
                writer.flush()  # the log holds every step the checkpoint holds
                checkpointer.save(done, state, data_iter, force=final)
            if guard.requested:
                checkpointer.wait()
                bar.close()
                raise Preempted(f"stopped at step {done} after {guard.requested}; the checkpoint is saved: "
                                "resume with the same command.")
    bar.close()
    checkpointer.wait()
    return state


# ---------------------------------------------------------------------------------- phases


@dataclasses.dataclass(frozen=True)
class Phase:
    """One model to train, built from the config alone (no workdir, no weights, no devices).

    ``vqgen.train.tokenizer.build(config)`` and ``vqgen.train.generator.build(config)`` return
    one; :func:`train_phase` trains any of them, and ``launch/aot_compile.py``,
    ``--mode=summary``, the benchmarks and the tests compile the very same step with
    :func:`compile_phase`.

    Attributes:
      name: ``'tokenizer'`` or ``'generator'``; checkpoints go to ``<workdir>/checkpoints/<name>``.
      init: ``rng -> state`` with ``nn.Partitioned``-boxed parameters (jit/eval_shape it).
      step: the pure step ``(state, batch, rng, *frozen) -> (state, metrics)``; every model,
        optimiser and loss setting it uses is bound in as a static argument. It folds the step
        counter into ``rng`` itself, so a resumed run sees the same keys.
      batch: the global batch, abstract (``jax.ShapeDtypeStruct`` per key).
      frozen: abstract frozen inputs passed after the rng (the LPIPS weights of the tokenizer
        phase), never closed over; ``load_frozen()`` gives their values.
      load_frozen: returns the frozen inputs' values (reads weight files; called by the driver).
      loop: loop settings (steps, logging, checkpoint and image intervals).
      fingerprint: JSON of exactly the config sections that determine the state's structure;
        a checkpoint written under another fingerprint is refused.
      init_seed / step_seed: seeds of the initial parameters and of the per-step keys.
      keep: how many checkpoints to keep.
    """

    name: str
    init: Callable[[jax.Array], Any]
    step: Callable[..., tuple[Any, dict]]
    batch: dict[str, jax.ShapeDtypeStruct]
    loop: LoopConfig
    fingerprint: dict
    init_seed: int
    step_seed: int
    keep: int = 2
    frozen: tuple = ()
    load_frozen: Callable[[], tuple] = tuple

    def ckpt_dir(self, workdir: str) -> str:
        return fileio.join(workdir, "checkpoints", self.name)

    def checkpointer(self, workdir: str) -> Checkpointer:
        return Checkpointer(self.ckpt_dir(workdir), save_every=self.loop.save_every, keep=self.keep,
                            fingerprint=self.fingerprint)


def abstract_sharded(init_fn: Callable[[jax.Array], Any], seed: int, mesh, rules) -> tuple[Any, Any]:
    """``(abstract tree with shardings, shardings)`` of what ``init_fn(rng)`` returns (unboxed),
    placed by the logical rules on ``mesh``; nothing is allocated. Restore targets and AOT inputs."""
    key = jax.random.key(seed)  # made outside the mesh: compile-only devices hold no arrays
    with parallel.mesh_context(mesh, rules):
        boxed = jax.eval_shape(init_fn, key)
        shardings = parallel.logical_to_sharding(boxed, mesh, rules)
    tree = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        parallel.unbox(boxed), shardings)
    return tree, shardings


def abstract_state(phase: Phase, mesh, rules) -> tuple[Any, Any]:
    """``(abstract state with shardings, shardings)`` of ``phase`` on ``mesh``; nothing is allocated."""
    return abstract_sharded(phase.init, phase.init_seed, mesh, rules)


def step_args(phase: Phase, mesh, state: Any) -> tuple:
    """Abstract ``(state, batch, rng, *frozen)`` of the phase's step on ``mesh`` (for ``lower``)."""
    rep = replicated(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh, len(v.shape)))
             for k, v in phase.batch.items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), phase.frozen)
    return (state, batch, rng, *frozen)


def compile_phase(phase: Phase, mesh, shardings: Any, max_traces: int | None = 1):
    """The phase's step jitted with explicit shardings and donation of the state.

    ``max_traces`` guards against recompiles: tracing the returned function more often raises
    ``AssertionError`` (the count belongs to this compiled step alone); None turns it off.
    """
    rep = replicated(mesh)
    batch_sh = {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in phase.batch.items()}
    frozen_sh = tuple(jax.tree.map(lambda _: rep, f) for f in phase.frozen)
    fn = phase.step if max_traces is None else _trace_guard(phase.step, max_traces, phase.name)
    return jax.jit(fn, in_shardings=(shardings, batch_sh, rep, *frozen_sh), out_shardings=(shardings, rep),
                   donate_argnums=0)


def _trace_guard(fn: Callable, limit: int, name: str) -> Callable:
    """``fn`` that raises once it has been traced more than ``limit`` times (its body runs only
    while jit traces it)."""
    traces = 0

    def traced(*args):
        nonlocal traces
        traces += 1
        if traces > limit:
            raise AssertionError(f"the {name} step was traced {traces} times (limit {limit}): an input changed "
                                 "shape, dtype or sharding between steps.")
        return fn(*args)

    return traced


def create_state(phase: Phase, mesh, rules) -> tuple[Any, Any]:
    """A freshly initialised, sharded state of ``phase`` and its shardings."""
    return sharded_init(phase.init, jax.random.key(phase.init_seed), mesh, rules)


def restore_or_create(phase: Phase, ckpt: Checkpointer, mesh, rules, data_iter=None) -> tuple[Any, Any, int]:
    """``(state, shardings, step)``: the latest checkpoint when there is one, else a new state."""
    if ckpt.latest_step() is not None:
        ckpt.check_compatible()  # before anything is allocated
    state, shardings = create_state(phase, mesh, rules)
    if ckpt.latest_step() is None:
        return state, shardings, 0
    state = ckpt.restore(state, data_iter)
    return state, shardings, int(jax.device_get(state.step))


def put_batch(batch: dict, mesh, keys) -> dict:
    """The host batch's ``keys`` as global arrays sharded over the mesh's batch axes."""
    return parallel.shard_batch({k: batch[k] for k in keys}, mesh)


def check_batch(phase: Phase, batch: dict) -> None:
    """Raises ``ValueError`` (one sentence) when a host batch does not have the shapes and kinds
    the phase's step was built for (this process's share of the global batch); checked on the first
    batch, before the step compiles."""
    count = jax.process_count()
    for key, want in phase.batch.items():
        if key not in batch:
            raise ValueError(f"the {phase.name} data gives no {key!r}; its batches hold {sorted(batch)}.")
        got = np.asarray(batch[key])
        shape = (want.shape[0] // count,) + tuple(want.shape[1:])
        if tuple(got.shape) != shape:
            raise ValueError(f"the {phase.name} data gives {key!r} of shape {tuple(got.shape)} per batch but the "
                             f"config builds the {phase.name} for {shape}; make data.image_size, data.channels and "
                             "the batch size match the data.")
        if np.issubdtype(want.dtype, np.integer) != np.issubdtype(got.dtype, np.integer):
            raise ValueError(f"the {phase.name} data gives {key!r} as {got.dtype}, not {np.dtype(want.dtype)}.")
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            raise ValueError(f"the {phase.name} data gives non-finite values in {key!r}; check the data source.")


def train_phase(phase: Phase, *, workdir: str, mesh, rules, data_iter: Iterator,
                on_images: Callable[[MetricWriter, int, Any], None] | None = None) -> Any:
    """Trains ``phase`` to ``phase.loop.num_steps`` in ``workdir``, resuming from its last checkpoint.

    The one driver of every phase: restore or initialise the sharded state, check the first
    batch, compile the step, run :func:`run_loop` with the phase's frozen inputs, TensorBoard
    under ``<workdir>/tb/<name>``, checkpoints under ``<workdir>/checkpoints/<name>`` (local or
    remote). Says where it writes and the step it starts from. Returns the final state.
    """
    ckpt = phase.checkpointer(workdir)
    try:
        state, shardings, start = restore_or_create(phase, ckpt, mesh, rules, data_iter)
        total = phase.loop.num_steps
        if start >= total:
            say(f"{phase.name}: already trained to step {start} in {ckpt.directory}")
            return state
        first = next(data_iter)
        check_batch(phase, first)
        say(f"{phase.name}: {'resuming from step ' + str(start) if start else 'training from step 0'} "
            f"to {total}; checkpoints in {ckpt.directory}")
        writer = MetricWriter(fileio.join(workdir, "tb", phase.name), start_step=start)
        frozen = tuple(phase.load_frozen())
        keys = tuple(phase.batch)
        section = f"{phase.name}_train"
        try:
            with parallel.mesh_context(mesh, rules):
                state = run_loop(
                    step_fn=compile_phase(phase, mesh, shardings), state=state, data_iter=data_iter,
                    put_batch=lambda b: put_batch(b, mesh, keys), rng=jax.random.key(phase.step_seed),
                    frozen=frozen, checkpointer=ckpt, loop=phase.loop, writer=writer, start_step=start,
                    first_batch=first, fix_hint=f"lower {section}.lr or set {section}.grad_clip",
                    on_images=None if on_images is None else (lambda step, st: on_images(writer, step, st)))
        finally:
            writer.close()
    finally:
        ckpt.close()
    return state


# ------------------------------------------------------------------------------ host side


def say(message: str) -> None:
    """One line for the user on process 0 (where a run writes, what it resumes, where outputs went)."""
    if parallel.is_main_process():
        print(message, flush=True)


def map_batches(fn: Callable[..., Any], arrays: tuple[np.ndarray, ...] | np.ndarray, batch_size: int,
                desc: str | None = None) -> Any:
    """Applies ``fn`` to fixed-size batches of ``arrays`` and concatenates the results.

    The last batch is padded by repeating its last row, so ``fn`` compiles for one shape only,
    and the padded rows are cut from the result. ``fn`` gets one positional argument per array
    and returns an array or a tuple of arrays; ``desc`` shows a progress bar with that label.
    """
    single = isinstance(arrays, np.ndarray) or not isinstance(arrays, (tuple, list))
    arrays = (arrays,) if single else tuple(arrays)
    n = len(arrays[0])
    if n == 0:
        raise ValueError("map_batches got no examples; check the data source and max_examples.")
    outs: list = []
    starts = range(0, n, batch_size)
    for i in tqdm(starts, desc=desc, disable=not (desc and parallel.is_main_process()), leave=False):
        chunk = [np.asarray(a[i:i + batch_size]) for a in arrays]
        m = len(chunk[0])
        if m < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - m, axis=0)]) for c in chunk]
        out = fn(*chunk)
        outs.append(tuple(np.asarray(o)[:m] for o in out) if isinstance(out, tuple) else np.asarray(out)[:m])
    if isinstance(outs[0], tuple):
        return tuple(np.concatenate(parts) for parts in zip(*outs))
    return np.concatenate(outs)


def update_report(workdir: str, section: str, values: dict[str, Any]) -> dict:
    """Merges ``values`` under ``section`` into ``workdir/report.json`` (process 0 writes, atomically)."""
    path = fileio.join(workdir, "report.json")
    report = fileio.read_json(path) if fileio.exists(path) else {}
    report[section] = values
    if parallel.is_main_process():
        fileio.write_json(path, report)
    return report
