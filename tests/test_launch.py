"""Launcher answers: ``slurm_gpu.sh --help`` prints its usage, and an AOT compile that does not fit
the chip ends in one sentence with the memory needed, the memory there is and a mesh that fits.

A real out-of-memory compile needs libtpu and many CPU minutes (the llamagen:XL generator on a
v5e-16); here the compiler's error is simulated with the exact text libtpu raises."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# libtpu's two phrasings of an out-of-memory compile (the first as raised by jax 0.10.2's libtpu).
TEMPORARIES = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (18.30G) "
               "exceeds available HBM (15.75G).")
USED_OF = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 18.30G "
           "of 15.75G hbm. Exceeded hbm capacity by 2.55G.\n\nTotal hbm usage >= 18.55G:\n    reserved 258.00M")


def _aot():
    spec = importlib.util.spec_from_file_location("_test_launch_aot", os.path.join(ROOT, "launch", "aot_compile.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slurm_help_prints_usage_and_runs_nothing(tmp_path):
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
    (tmp_path / "srun").write_text("#!/bin/sh\necho srun-was-called\nexit 7\n")
    (tmp_path / "srun").chmod(0o755)
    for flag in ("--help", "-h"):
        res = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sh"), flag], env=env,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "srun-was-called" not in res.stdout
        assert res.stdout.startswith("SLURM batch script") and "sbatch --nodes=4 launch/slurm_gpu.sh" in res.stdout
        assert "#SBATCH" not in res.stdout and "VQGEN_DRY_RUN" in res.stdout


@pytest.mark.parametrize("message", [TEMPORARIES, USED_OF], ids=["temporaries", "used-of"])
def test_out_of_memory_is_read_from_the_compiler_error(message):
    aot = _aot()
    needed, capacity, sentence = aot.out_of_memory(RuntimeError(message))
    assert needed / 2**30 == pytest.approx(18.30) and capacity / 2**30 == pytest.approx(15.75)
    assert sentence.startswith("RESOURCE_EXHAUSTED")
    assert aot.out_of_memory(RuntimeError("INTERNAL: something else")) is None


def _does_not_fit(aot, mesh):
    needed, capacity, detail = aot.out_of_memory(RuntimeError(TEMPORARIES))
    return aot.DoesNotFit("generator", mesh, needed, capacity, detail)


def test_does_not_fit_names_the_mesh_that_fits():
    aot = _aot()
    config = tiny_config.get_config()
    tried = []

    def compile_fn(config, target, devices, mesh_shape):
        tried.append(tuple(mesh_shape))
        return {"memory_per_device": {"peak_estimate_bytes": int(12.4 * 2**30)}}

    error = _does_not_fit(aot, {"data": 16, "fsdp": 1, "tensor": 1})
    sentence = aot.does_not_fit_sentence(error, config, "generator", list(range(16)), None, "v5e-16",
                                         compile_fn=compile_fn)
    assert tried == [(1, -1, 1)]
    assert sentence == ("the generator train step needs 18.30 GiB per chip but the chip has 15.75 GiB on v5e-16 with "
                        "the mesh data=16,fsdp=1,tensor=1; it fits with --mesh_shape=1,-1,1 (peak 12.40 GiB): pass that "
                        "here and --config.mesh_shape='(1,-1,1)' to the run.")

    def still_too_big(config, target, devices, mesh_shape):
        raise _does_not_fit(aot, {"data": 1, "fsdp": 16, "tensor": 1})

    sentence = aot.does_not_fit_sentence(error, config, "generator", list(range(16)), None, "v5e-16",
                                         compile_fn=still_too_big)
    assert sentence.endswith("and 18.30 GiB per chip with --mesh_shape=1,-1,1; lower the batch (--batch_size) or "
                             "compile for a larger topology.")
    fsdp = _does_not_fit(aot, {"data": 1, "fsdp": 16, "tensor": 1})
    sentence = aot.does_not_fit_sentence(fsdp, config, "generator", list(range(16)), [1, -1, 1], "v5e-16",
                                         compile_fn=compile_fn)
    assert tried == [(1, -1, 1)] and "lower the batch (--batch_size)" in sentence  # nothing compiled again


def test_aot_command_line_answers_does_not_fit_in_one_sentence(tmp_path):
    """The script's own flag handling: the compiler's error (simulated where the step is compiled) ends in
    one ``error:`` line and exit code 2, with no traceback."""
    script = tmp_path / "run_aot.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
        sys.path.insert(0, {ROOT!r})
        import importlib.util, jax
        spec = importlib.util.spec_from_file_location("aot", os.path.join({ROOT!r}, "launch", "aot_compile.py"))
        aot = importlib.util.module_from_spec(spec); spec.loader.exec_module(aot)

        def out_of_memory(lowered, compiler_options=None):
            raise RuntimeError({TEMPORARIES!r})

        aot.compile_lowered = out_of_memory
        aot.main(sys.argv)
    """))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(script), "--config=tests/tiny_config.py", "--target=generator",
                          "--topology=cpu:8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the generator train step needs 18.30 GiB per chip but the chip has 15.75 GiB on cpu:8 "
                      "with the mesh data=8,fsdp=1,tensor=1, and 18.30 GiB per chip with --mesh_shape=1,-1,1; lower "
                      "the batch (--batch_size) or compile for a larger topology."], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
