"""Ahead-of-time compilation of a train step for a device topology you may not have.

    # a v5e-16 pod slice, from any CPU machine with libtpu installed (pip install 'jax[tpu]'):
    python launch/aot_compile.py --config=tokenizers/llamagen_vq16 --topology=v5e-16
    python launch/aot_compile.py --config=generators/llamagen:XL --target=generator \\
        --topology=v5p-128 --mesh_shape=-1,4,1
    # simulated CPU devices (no libtpu needed); every phase of the config:
    python launch/aot_compile.py --config=quickstart --topology=cpu:8 --mesh_shape=2,4,1

It builds the same jitted, sharded, donated step the trainers run (the phase that
``vqgen.train.tokenizer.build`` / ``vqgen.train.generator.build`` make from the config, compiled
by ``vqgen.train.common.compile_phase``; no workdir, no tokenizer checkpoint), lowers it on abstract inputs (``jax.ShapeDtypeStruct`` with
the step's shardings; no parameter is allocated) over a mesh of compile-only devices from
``jax.experimental.topologies.get_topology_desc``, compiles it, and prints the per-device
``memory_analysis()`` and the step's FLOPs; the last line is one JSON object. A config that
does not fit (out of HBM), a mesh that does not fit the topology, or a batch that does not
divide over the data axes fails here, in seconds, instead of after a pod has started.

TPU topologies are ``v5e-N`` / ``v5litepod-N`` / ``v6e-N`` (N chips, 2D) and ``v4-N`` /
``v5p-N`` (N TensorCores = 2 x chips, 3D, megacore), or a raw ``v5e:4x4`` / ``v5:2x2x2`` name.
Compiling for TPU needs the ``libtpu`` package (the compiler lives there), not a TPU.
``cpu:N`` compiles for N host-platform CPU devices (XLA has no compile-only CPU topology).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Chips -> torus shape of single-slice TPU topologies (as Cloud TPU names them).
_TWO_D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_THREE_D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_GENERATIONS = {"v5e": ("v5e", 2), "v5litepod": ("v5e", 2), "v6e": ("v6e", 2), "v4": ("v4", 3), "v5p": ("v5", 3)}


def tpu_topology_kwargs(name: str) -> dict[str, Any]:
    """``'v5e-16'`` (or ``'v5e:4x4'``) -> keyword arguments of ``topologies.get_topology_desc``."""
    m = re.fullmatch(r"(v5e|v5litepod|v6e|v4|v5p)-(\d+)", name)
    if m:
        gen, ndim = _GENERATIONS[m.group(1)]
        n = int(m.group(2))
        chips = n if ndim == 2 else n // 2  # v4-N / v5p-N count TensorCores (2 per chip)
        table = _TWO_D if ndim == 2 else _THREE_D
        if chips not in table:
            raise ValueError(f"unknown TPU slice {name!r}; use one of "
                             f"{[f'{m.group(1)}-{c if ndim == 2 else 2 * c}' for c in table]} or a raw topology like 'v5e:4x4'.")
        dims = table[chips]
    else:
        m = re.fullmatch(r"(v5e|v6e|v4|v5):(\d+(?:x\d+)+)", name)
        if not m:
            raise ValueError(f"cannot read the topology {name!r}; write e.g. v5e-16, v5p-64, v4-32, v5e:4x4 or cpu:8.")
        gen, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        ndim = len(dims)
    megacore = gen in ("v4", "v5")
    bounds = (2, 2, 1) if ndim == 3 or gen in ("v5e", "v6e") else (1, 1, 1)
    if math_prod(dims) < 4:
        bounds = tuple(dims) + (1,) * (3 - len(dims))
    wrap = tuple(d >= 16 if ndim == 2 else (min(dims) >= 4 and d >= 4) for d in dims) + (False,) * (3 - ndim)
    return dict(topology_name=f"{gen}:{'x'.join(map(str, dims))}",
                chip_config_name="megacore" if megacore else "default",
                chips_per_host_bounds=bounds, wrap=wrap)


def math_prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only devices of ``topology`` (TPU), or the first N CPU devices for ``cpu:N``."""
    import jax

    if topology.startswith("cpu:"):
        n = int(topology.split(":", 1)[1])
        devices = jax.devices("cpu")
        if len(devices) < n:
            raise ValueError(
                f"--topology={topology} needs {n} CPU devices but JAX has {len(devices)}; run this script "
                f"directly (it sets XLA_FLAGS=--xla_force_host_platform_device_count={n}) or set that flag yourself.")
        return devices[:n]
    from jax.experimental import topologies

    kwargs = tpu_topology_kwargs(topology)
    try:
        desc = topologies.get_topology_desc(platform="tpu", num_slices=num_slices, **kwargs)
    except RuntimeError as e:
        if "lockfile" in str(e):
            raise RuntimeError(
                f"cannot build the TPU topology {topology!r}: another process on this machine holds libtpu; wait for "
                "it to finish, or set ALLOW_MULTIPLE_LIBTPU_LOAD=1 to compile beside it.") from e
        raise RuntimeError(
            f"cannot build the TPU topology {topology!r} ({str(e).splitlines()[0]}); install the TPU compiler with "
            "pip install 'jax[tpu]' (libtpu) on this machine, or use --topology=cpu:N.") from e
    return list(desc.devices)


class DoesNotFit(Exception):
    """The compiled step needs more device memory than the chip has (XLA's RESOURCE_EXHAUSTED)."""

    def __init__(self, target: str, mesh: dict, needed: float | None, capacity: float | None, detail: str):
        self.target, self.mesh, self.needed, self.capacity, self.detail = target, mesh, needed, capacity, detail
        super().__init__(detail)

    def amounts(self) -> str:
        """``'18.30 GiB per chip but the chip has 15.75 GiB'``, or what the compiler said."""
        if self.needed is not None and self.capacity is not None:
            return f"{self.needed / 2**30:.2f} GiB per chip but the chip has {self.capacity / 2**30:.2f} GiB"
        return f"more memory than the chip has ({self.detail})"


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _bytes(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)\s*([KMGT]?)(?:i?B)?", text.strip())
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def out_of_memory(error: BaseException) -> tuple[float | None, float | None, str] | None:
    """``(bytes needed, bytes available, the compiler's sentence)`` when ``error`` is XLA running
    out of device memory while compiling (RESOURCE_EXHAUSTED), else None."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    first = next((line.strip() for line in text.splitlines() if "memory" in line.lower()), text.splitlines()[0])
    size = r"([\d.]+\s*[KMGT]?(?:i?B)?)"
    for pattern in (  # libtpu's two phrasings
            rf"required for HLO temporaries \({size}\) exceeds available HBM \({size}\)",
            rf"Used\s+{size}\s+of\s+{size}\s+(?:hbm|HBM)"):
        m = re.search(pattern, text)
        if m:
            return _bytes(m.group(1)), _bytes(m.group(2)), first
    return None, None, first[:200]


# XLA options for a compile whose executable is never run on the CPU: the CPU backend's LLVM
# optimisation is the slowest part of compiling a small step there and changes neither the
# partitioning nor the buffer sizes that the report is about (the test suite's cpu:8 checks).
CHECK_ONLY_CPU_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_lowered(lowered, compiler_options: dict | None = None):
    """XLA compiles the lowered step for its devices (the TPU compiler in libtpu for TPU devices)."""
    return lowered.compile(compiler_options) if compiler_options else lowered.compile()


def compile_step(config, target: str, devices: list, mesh_shape=None, compiler_options: dict | None = None
                 ) -> dict[str, Any]:
    """Lowers and compiles the ``target`` ('tokenizer' or 'generator') train step of ``config`` for
    ``devices`` (compile-only TPU devices or CPU devices); returns the memory/FLOP report.
    ``compiler_options`` go to XLA as they are (e.g. :data:`CHECK_ONLY_CPU_OPTIONS`).

    The step is the phase's own (``vqgen.train.tokenizer.build`` / ``vqgen.train.generator.build``),
    compiled by ``vqgen.train.common.compile_phase`` as the trainer does, on abstract inputs.
    """
    from vqgen import parallel
    from vqgen.train import common
    from vqgen.train import generator as generator_lib
    from vqgen.train import tokenizer as tokenizer_lib

    builders = {"tokenizer": tokenizer_lib.build, "generator": generator_lib.build}
    if target not in builders:
        raise ValueError(f"unknown --target={target!r}; use 'tokenizer' or 'generator'.")
    if target not in config:
        raise ValueError(f"the config has no {target!r} section; pick --target={'generator' if target == 'tokenizer' else 'tokenizer'}.")
    shape = tuple(mesh_shape) if mesh_shape else tuple(config.mesh_shape)
    mesh = parallel.create_mesh(shape, devices=devices)
    rules = parallel.rules_from_config(config.logical_rules)
    batch_key = "tokenizer_train" if target == "tokenizer" else "generator_train"
    parallel.check_batch_size(config[batch_key].batch_size, mesh)
    t0 = time.perf_counter()
    phase = builders[target](config)
    state, shardings = common.abstract_state(phase, mesh, rules)
    step = common.compile_phase(phase, mesh, shardings, max_traces=None)
    with parallel.mesh_context(mesh, rules):
        lowered = step.lower(*common.step_args(phase, mesh, state))
    t1 = time.perf_counter()
    try:
        compiled = compile_lowered(lowered, compiler_options)
    except Exception as e:  # noqa: BLE001 - XLA raises its runtime error class for an out-of-memory program
        oom = out_of_memory(e)
        if oom is None:
            raise
        raise DoesNotFit(target, dict(mesh.shape), *oom) from e
    t2 = time.perf_counter()
    report: dict[str, Any] = {
        "target": target, "platform": devices[0].platform, "device_kind": getattr(devices[0], "device_kind", ""),
        "num_devices": len(devices), "mesh": dict(mesh.shape), "global_batch": int(config[batch_key].batch_size),
        "params": common.count_params(state.params), "lower_seconds": round(t1 - t0, 2),
        "compile_seconds": round(t2 - t1, 2)}
    mem = compiled.memory_analysis()
    if mem is not None:
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
        stats = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
        stats["peak_estimate_bytes"] = (stats.get("argument_size_in_bytes", 0) + stats.get("output_size_in_bytes", 0)
                                        - stats.get("alias_size_in_bytes", 0) + stats.get("temp_size_in_bytes", 0))
        report["memory_per_device"] = stats
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        report["flops_per_device"] = float(cost["flops"])
    return report


FSDP_MESH = (1, -1, 1)  # parameters and optimizer state sharded over every chip


def does_not_fit_sentence(error: DoesNotFit, config, target: str, devices: list, mesh_shape, topology: str,
                          compile_fn=None) -> str:
    """One sentence for a step that does not fit: the memory it needs against the chip's, the mesh
    it was compiled for and, when the config's mesh is not already FSDP, whether ``--mesh_shape=1,-1,1``
    fits (compiled to find out) and its peak."""
    compile_fn = compile_fn or compile_step
    mesh = ",".join(f"{k}={v}" for k, v in error.mesh.items())
    head = f"the {target} train step needs {error.amounts()} on {topology} with the mesh {mesh}"
    current = tuple(mesh_shape) if mesh_shape else tuple(config.mesh_shape)
    if error.mesh.get("fsdp", 1) < len(devices) and current != FSDP_MESH:
        try:
            report = compile_fn(config, target, devices, list(FSDP_MESH))
        except DoesNotFit as again:
            return (f"{head}, and {again.amounts().split(' but ')[0]} with --mesh_shape=1,-1,1; lower the batch "
                    "(--batch_size) or compile for a larger topology.")
        peak = report.get("memory_per_device", {}).get("peak_estimate_bytes")
        fits = f" (peak {peak / 2**30:.2f} GiB)" if peak else ""
        return (f"{head}; it fits with --mesh_shape=1,-1,1{fits}: pass that here and "
                "--config.mesh_shape='(1,-1,1)' to the run.")
    return f"{head}; lower the batch (--batch_size), shard over tensor too (e.g. --mesh_shape=1,-1,2) or use a " \
           "larger topology."


def _print_report(report: dict[str, Any]) -> None:
    mem = report.get("memory_per_device", {})
    print(f"{report['target']} train step on {report['num_devices']} x {report['platform']} "
          f"({report['device_kind']}), mesh {report['mesh']}: lowered in {report['lower_seconds']} s, "
          f"compiled in {report['compile_seconds']} s")
    for k, v in mem.items():
        print(f"  {k:32s} " + (f"{v / 2**30:10.3f} GiB" if v >= 2**30 else f"{v / 2**20:10.3f} MiB"))
    if "flops_per_device" in report:
        print(f"  {'flops_per_device':32s} {report['flops_per_device'] / 1e9:10.3f} GFLOP")
    print(json.dumps(report), flush=True)


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from vqgen.config_lib import UserError, resolve_argv

    config_flag = config_flags.DEFINE_config_file("config", None, "Config name or file (name_or_path[:variant]).",
                                                  lock_config=True)
    target_flag = flags.DEFINE_enum("target", "all", ["all", "tokenizer", "generator"],
                                    "Which train step to compile; 'all': every phase the config has.")
    topo_flag = flags.DEFINE_string("topology", "cpu:8", "v5e-16, v5p-64, v4-32, v5e:4x4, ... or cpu:N.")
    slices_flag = flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice).")
    mesh_flag = flags.DEFINE_list("mesh_shape", None, "('data','fsdp','tensor') sizes; default: the config's.")
    batch_flag = flags.DEFINE_integer("batch_size", None, "Override the global batch of the compiled step.")

    def run(_):
        config = config_flag.value
        if config is None:
            raise app.UsageError("--config is required, e.g. --config=configs/tokenizers/llamagen_vq16.py.")
        targets = [t for t in ("tokenizer", "generator") if t in config] if target_flag.value == "all" \
            else [target_flag.value]
        devices = topology_devices(topo_flag.value, slices_flag.value)
        mesh_shape = [int(x) for x in mesh_flag.value] if mesh_flag.value else None
        for target in targets:
            if batch_flag.value:
                config[f"{target}_train"].batch_size = batch_flag.value
            try:
                _print_report(compile_step(config, target, devices, mesh_shape))
            except DoesNotFit as e:
                print(f"error: {does_not_fit_sentence(e, config, target, devices, mesh_shape, topo_flag.value)}",
                      file=sys.stderr, flush=True)
                sys.exit(2)

    try:
        argv = resolve_argv(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app.run(run, argv=argv)


if __name__ == "__main__":
    # Everything runs on the host CPU; TPU topologies are compile-only devices of libtpu's compiler.
    os.environ["JAX_PLATFORMS"] = "cpu"
    n = next((m.group(1) for a in sys.argv if (m := re.fullmatch(r"--topology=cpu:(\d+)", a))), None)
    if n is None and not any(a.startswith("--topology") for a in sys.argv):
        n = "8"  # the default --topology=cpu:8
    if n is not None:  # must happen before JAX starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    main(sys.argv)
