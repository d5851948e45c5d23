"""vqgen command line.

    python -m vqgen.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m vqgen.main --config=configs/generators/llamagen.py:B --workdir=gs://... --mode=train_generator

``--mode`` is one of train_tokenizer, train_generator, sample, evaluate, summary, or all (the
config's default). Running the same command again resumes from the last checkpoint.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = ("train_tokenizer", "train_generator", "sample", "evaluate", "summary", "all")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...).")
_MODE = flags.DEFINE_enum("mode", None, MODES, "What to run; defaults to the config's `mode` or 'all'.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (multi-host); also VQGEN_DISTRIBUTED=1.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; pass options as --flag=value.")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/quickstart.py.")
    mode = _MODE.value or config.get("mode", "all")
    if mode != "summary" and not _WORKDIR.value:
        raise app.UsageError("--workdir is required, e.g. --workdir=runs/quickstart.")
    from vqgen import parallel

    distributed = _DISTRIBUTED.value if _DISTRIBUTED.value is not None else None
    if distributed is None and config.get("distributed", False):
        distributed = True
    parallel.maybe_initialize_distributed(distributed)
    from vqgen.train import run as run_lib

    sys.exit(run_lib.run(config, _WORKDIR.value, mode))


def run():
    """Console-script entry point (``vqgen --config=... --workdir=...``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    app.run(main)


if __name__ == "__main__":
    run()
