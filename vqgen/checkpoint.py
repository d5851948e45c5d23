"""Orbax checkpoints: the only module of vqgen that imports orbax.

A :class:`Checkpointer` wraps ``ocp.CheckpointManager`` with three items per step:

* ``state``: the train state pytree (restored into an abstract, sharded target, so a checkpoint
  written on one mesh restores onto another);
* ``data``: the grain iterator state, so input resumes exactly where it stopped;
* ``meta``: JSON with a fingerprint of the model configuration, checked on restore so that a
  checkpoint from an incompatible config ends in a clear error instead of a shape crash.

Saves are asynchronous; Orbax writes each step into a temporary directory and renames it when
complete, so a ``kill -9`` at any moment leaves the last finished checkpoint intact.
"""
from __future__ import annotations

import json
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class IncompatibleCheckpointError(ValueError):
    """The checkpoint in a workdir was written by a different model configuration."""


_READ_ERROR_WORDS = ("error reading", "error opening", "unexpected end", "corrupt", "checksum", "not found",
                     "no such file", "failed to decode", "invalid", "truncated", "data_loss", "out_of_range")


def _is_read_error(error: Exception) -> bool:
    """Whether a restore error reads like unreadable files (TensorStore's I/O and decode errors)
    rather than a tree or shape that does not match."""
    if isinstance(error, (json.JSONDecodeError, OSError)):
        return True
    text = str(error).lower()
    return any(w in text for w in _READ_ERROR_WORDS)


def _abstract(tree: Any) -> Any:
    def to_struct(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(to_struct, tree)


class Checkpointer:
    """Saves and restores ``(state, data iterator, meta)`` under ``directory``.

    Args:
      directory: where step folders go (local path or ``gs://``).
      save_every: save interval in steps (``save`` with ``force=True`` ignores it).
      keep: how many recent checkpoints to keep.
      fingerprint: JSON-serialisable description of the model configuration; a restore whose
        stored fingerprint differs raises :class:`IncompatibleCheckpointError`.
      async_save: write in a background thread (the default); call :meth:`wait` before exit.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 3,
                 fingerprint: dict | None = None, async_save: bool = True):
        self.directory = str(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint or {}))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(int(save_every), 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def should_save(self, step: int, *, force: bool = False) -> bool:
        """Whether :meth:`save` at ``step`` would write (the interval, or ``force``; never twice)."""
        if self.manager.latest_step() == int(step):
            return False
        return bool(force) or bool(self.manager.should_save(int(step)))

    def save(self, step: int, state: Any, data_iterator: Any = None, *, force: bool = False,
             extra_meta: dict | None = None) -> bool:
        """Saves at ``step`` when the interval says so (or ``force``); returns whether it did."""
        if self.manager.latest_step() == int(step):
            return False
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({"fingerprint": self.fingerprint, "step": int(step),
                                       **(extra_meta or {})}),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def read_meta(self, step: int | None = None) -> dict:
        """The meta item of ``step``; without one, of the latest step whose meta can be read."""
        if step is not None:
            out = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return dict(out["meta"])
        error: Exception | None = None
        for candidate in reversed(self.all_steps()):
            try:
                return self.read_meta(candidate)
            except (ValueError, KeyError, OSError) as e:  # a truncated meta file: the step before decides
                error = error or e
        if error is not None:
            raise error
        raise FileNotFoundError(f"no checkpoint in {self.directory}.")

    def check_compatible(self, step: int | None = None) -> None:
        meta = self.read_meta(step)
        stored = meta.get("fingerprint", {})
        if stored != self.fingerprint:
            diffs = [
                f"{k}: checkpoint {stored.get(k)!r} vs config {self.fingerprint.get(k)!r}"
                for k in sorted(set(stored) | set(self.fingerprint))
                if stored.get(k) != self.fingerprint.get(k)
            ]
            raise IncompatibleCheckpointError(
                f"the checkpoint in {self.directory} was written by a different model configuration "
                f"({'; '.join(diffs[:3])}); use a new --workdir or restore the original config."
            )

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> Any:
        """Restores into ``abstract_state`` (arrays or ``ShapeDtypeStruct``s with shardings).

        The grain iterator, when given, is set to its saved position in place; a checkpoint saved
        without one (a converted model's, ``vqgen.convert``) leaves it at its start. Without an
        explicit ``step`` the latest one is restored; when it cannot be read (a file truncated or
        lost after it was finalised) but the step before it can, that one is restored and the
        broken step is moved aside as ``<step>.unreadable`` (nothing is deleted).
        """
        if step is not None:
            return self._restore(int(step), abstract_state, data_iterator)
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory} to restore; train first.")
        try:
            return self._restore(steps[-1], abstract_state, data_iterator)
        except IncompatibleCheckpointError:
            raise
        except (ValueError, OSError) as e:  # unreadable: truncated, missing or garbled files
            if len(steps) < 2:
                raise ValueError(f"checkpoint step {steps[-1]} in {self.directory} cannot be read "
                                 f"({str(e).splitlines()[0][:200]}) and there is no earlier one; use a new "
                                 "--workdir.") from e
            latest_error = e
        try:
            state = self._restore(steps[-2], abstract_state, data_iterator)
        except Exception:  # noqa: BLE001 - the earlier step fails too: not a broken file, report the first error
            raise latest_error from None
        aside = self.set_aside(steps[-1])
        logging.warning("checkpoint step %d in %s could not be read (%s); restored step %d instead and moved the "
                        "unreadable one to %s.", steps[-1], self.directory,
                        str(latest_error).splitlines()[0][:200], steps[-2], aside)
        if jax.process_index() == 0:
            print(f"checkpoint step {steps[-1]} in {self.directory} could not be read; resuming from step "
                  f"{steps[-2]} (the unreadable step is kept as {aside})", flush=True)
        return state

    def set_aside(self, step: int) -> str:
        """Renames step folder ``step`` to ``<step>.unreadable[.N]`` (ignored by the manager)."""
        src = epath.Path(self.directory) / str(int(step))
        dst = src.parent / f"{int(step)}.unreadable"
        n = 0
        while dst.exists():
            n += 1
            dst = src.parent / f"{int(step)}.unreadable.{n}"
        src.rename(dst)
        self.manager.reload()
        return str(dst)

    def _restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        try:
            self.check_compatible(step)
        except IncompatibleCheckpointError:
            raise
        except (ValueError, KeyError, OSError) as e:  # the meta file itself is unreadable
            raise ValueError(f"the meta data of checkpoint step {step} in {self.directory} cannot be read ({e})") from e
        items = {"state": ocp.args.StandardRestore(_abstract(abstract_state))}
        if data_iterator is not None:
            if "data" in self.manager.item_metadata(step):
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:  # a checkpoint written without an iterator (a converted model): the data starts afresh
                logging.warning("checkpoint step %d in %s has no data iterator state; the data starts from the "
                                "beginning.", step, self.directory)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (KeyError, TypeError) as e:  # structure mismatch, or an item missing from a broken step
            if _is_read_error(e):
                raise ValueError(f"checkpoint step {step} in {self.directory} is incomplete ({e})") from e
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not match this model's "
                f"train state ({str(e).splitlines()[0][:200]}); use a new --workdir."
            ) from e
        except ValueError as e:
            if _is_read_error(e):
                raise
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not match this model's "
                f"train state ({str(e).splitlines()[0][:200]}); use a new --workdir."
            ) from e
        logging.info("restored checkpoint step %d from %s", step, self.directory)
        return out["state"]

    def restore_subset(self, target: dict, step: int | None = None) -> tuple[dict, dict]:
        """Restores only the top-level fields of the saved state named in ``target`` (a dict of
        abstract subtrees, e.g. ``{'ema_params': ..., 'model_state': ...}``) and returns
        ``(restored dict, meta)``. The fingerprint is not checked here: the caller compares the
        part of ``meta['fingerprint']`` that matters to it (a frozen tokenizer needs its
        architecture, not the discriminator or optimiser it was trained with).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory} to restore; train first.")
        meta = self.read_meta(step)
        target = _abstract(target)
        reader = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(create=False),
            item_handlers={"state": ocp.PyTreeCheckpointHandler()})
        try:
            args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                          partial_restore=True)
            out = reader.restore(step, args=ocp.args.Composite(state=args))
        except (ValueError, KeyError, TypeError) as e:
            raise IncompatibleCheckpointError(
                f"the checkpoint at step {step} in {self.directory} does not hold what this model needs "
                f"({str(e).splitlines()[0][:200]}); use the config it was trained with or a new --workdir."
            ) from e
        finally:
            reader.close()
        logging.info("restored %s of checkpoint step %d from %s", sorted(target), step, self.directory)
        return dict(out["state"]), meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
