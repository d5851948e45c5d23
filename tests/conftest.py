"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere, and caches shared by
the whole run.

The suite compiles the same tiny programs many times over: in-process, in the command-line runs
it starts as subprocesses (a run, the run killed and resumed, the notebooks) and on both xdist
workers; and every run that evaluates trains the digit judge. The first process of a run makes a
fresh folder and names it in ``JAX_COMPILATION_CACHE_DIR`` (XLA executables) and
``VQGEN_JUDGE_CACHE`` (the judge), which the workers and every subprocess inherit, so each program
compiles once and the judge trains once per run; the folder is removed when that process exits.
Set the variables yourself to keep the caches between runs (XLA entries are keyed by the program,
the flags and the JAX version).
"""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or "VQGEN_JUDGE_CACHE" not in os.environ:
    _root = tempfile.mkdtemp(prefix="vqgen-tests-cache-")
    atexit.register(shutil.rmtree, _root, ignore_errors=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_root, "xla"))
    os.environ.setdefault("VQGEN_JUDGE_CACHE", os.path.join(_root, "judge"))
# Programs that compile in under half a second are not worth a file; a size limit turns on
# JAX's file lock, so that two processes never read an entry while it is being written.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
