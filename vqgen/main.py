"""vqgen command line: every family and phase, images and video.

    python -m vqgen.main --config=quickstart --workdir=runs/quickstart
    python -m vqgen.main --config=quickstart:maskgit --workdir=runs/maskgit
    python -m vqgen.main --config=generators/magvit --workdir=runs/magvit_mnist
    python -m vqgen.main --config=configs/generators/llamagen.py:B --workdir=gs://... --mode=train_generator

``--config`` is a config name (``quickstart``, ``generators/llamagen``, ``llamagen``) or the path
of a config file, with ``:variant``; keys are overridden with ``--config.section.key=value``.
``--mode`` is one of train_tokenizer, train_generator, sample, evaluate, sweep_sampling, summary,
or all (the config's default); ``--mode=sweep_sampling --sweep=cfg_scale=1,1.5,2`` scores the
samples of a trained workdir under each setting (:mod:`vqgen.train.sweep`). Running the same command again resumes from the last checkpoint. Mistakes
end in one sentence on stderr (exit code 2); ``--verbosity=1`` shows the traceback too.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vqgen import config_lib, parallel
from vqgen.checkpoint import IncompatibleCheckpointError
from vqgen.train import common
from vqgen.train import run as run_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config name or file (name_or_path[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
_MODE = flags.DEFINE_enum("mode", None, run_lib.MODES, "What to run; defaults to the config's `mode` or 'all'.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "With --mode=sweep_sampling: KEY=V1,V2,... a sampler option and its values (repeatable).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (multi-host); also VQGEN_DISTRIBUTED=1.")

# Errors that are the user's to fix: shown as one sentence unless --verbosity >= 1.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IncompatibleCheckpointError,
               common.NonFiniteLoss)


def _verbose() -> bool:
    return flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass options as --flag=value.")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=quickstart.")
    mode = _MODE.value or config.get("mode", "all")
    distributed = _DISTRIBUTED.value
    if distributed is None and config.get("distributed", False):
        distributed = True
    try:
        parallel.maybe_initialize_distributed(distributed)
        code = run_lib.run(config, _WORKDIR.value, mode, tuple(_SWEEP.value))
    except USER_ERRORS as e:
        if _verbose():
            raise
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(code)


def run(argv: list[str] | None = None):
    """Console-script entry point (``vqgen --config=... --workdir=...``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    argv = list(sys.argv if argv is None else argv)
    try:
        argv = config_lib.resolve_argv(argv)
    except config_lib.UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
