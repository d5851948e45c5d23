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

# Under ``-n N`` the files are handed out whole (xdist's ``loadfile``): each goes to one worker,
# so a module-scoped fixture (a trained workdir) is built once, and the files are handed out in
# the order below, longest first (measured in a full run: summed test seconds per file), so
# that the two workers finish together instead of one waiting on a long file started last.
# A file not listed runs after these, in the usual order; the order changes no result.
LONGEST_FIRST = (
    "test_notebooks.py", "test_train_tokenizer.py", "test_train_var.py", "test_configs.py",
    "test_remote_workdir.py", "test_api.py", "test_train_generator.py", "test_mar.py", "test_var.py",
    "test_video.py", "test_robustness.py", "test_gpt_factorized.py", "test_train_zoo.py",
    "test_convert_open_magvit2_ar.py", "test_convert_var.py", "test_api_run.py", "test_magvit_v2.py",
    "test_vit_tokenizers.py", "test_kl.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # a stable sort keeps the tests of each file together and in their own order
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


def pytest_configure(config):
    # ``-n N`` alone means xdist's ``load`` (test by test); hand out whole files in the order above
    # instead. An explicit ``--dist`` is left alone.
    if getattr(config.option, "dist", "no") == "load" and "--dist" not in " ".join(config.invocation_params.args):
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False
