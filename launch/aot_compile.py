"""Ahead-of-time compilation of a train step for a device topology you may not have.

    # a v5e-16 pod slice, from any CPU machine with libtpu installed (pip install 'jax[tpu]'):
    python launch/aot_compile.py --config=configs/tokenizers/llamagen_vq16.py --topology=v5e-16
    python launch/aot_compile.py --config=configs/generators/llamagen.py:XL --target=generator \\
        --topology=v5p-128 --mesh_shape=-1,4,1
    # simulated CPU devices (no libtpu needed):
    python launch/aot_compile.py --config=configs/quickstart.py --topology=cpu:8 --mesh_shape=2,4,1

It builds the same jitted, sharded, donated step the trainers run (``TokenizerTrainer`` or
``GeneratorTrainer.compiled_step``), lowers it on abstract inputs (``jax.ShapeDtypeStruct`` with
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
        raise RuntimeError(
            f"cannot build the TPU topology {topology!r} ({e}); install the TPU compiler with "
            "pip install 'jax[tpu]' (libtpu) on this machine, or use --topology=cpu:N.") from e
    return list(desc.devices)


# The trainers guard their step with chex.assert_max_traces, whose counter is global to the
# process; one AOT call lowers once, but a process may compile for several topologies.
_MAX_TRACES = 1_000_000


def _abstract(tree: Any, shardings: Any) -> Any:
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _tokenizer_step(config, mesh):
    """(jitted step, abstract args) of ``TokenizerTrainer.train_step`` on ``mesh``."""
    import jax
    import jax.numpy as jnp

    from vqgen import parallel
    from vqgen.train.tokenizer import TokenizerTrainer

    trainer = TokenizerTrainer(config, workdir="/nonexistent", mesh=mesh)
    key = jax.random.key(0)  # outside the mesh: compile-only devices cannot hold arrays
    with parallel.mesh_context(mesh, trainer.rules):
        boxed = jax.eval_shape(trainer.init_state, key)
        shardings = parallel.logical_to_sharding(boxed, mesh, trainer.rules)
    state = _abstract(parallel.unbox(boxed), shardings)
    step = trainer.compiled_step(shardings, max_traces=_MAX_TRACES)
    batch_shape = tuple(trainer._dummy(int(config.tokenizer_train.batch_size)).shape)
    batch = {"image": jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=parallel.batch_sharding(mesh, len(batch_shape))),
             "label": jax.ShapeDtypeStruct(batch_shape[:1], jnp.int32, sharding=parallel.batch_sharding(mesh, 1))}
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    lp = None
    if trainer.perceptual is not None:
        lp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), trainer.perceptual[1])
    return step, (state, batch, rng, lp), trainer.rules


class _TokenizerShape:
    """What ``GeneratorTrainer`` reads from a tokenizer, from the config alone (no checkpoint)."""

    def __init__(self, config):
        from vqgen.train.generator import _vocab_from_config

        self.vocab_size = _vocab_from_config(config)


def _generator_step(config, mesh):
    """(jitted step, abstract args) of ``GeneratorTrainer.train_step`` on ``mesh`` (no tokenizer checkpoint)."""
    import jax
    import jax.numpy as jnp

    from vqgen import parallel
    from vqgen.train import common
    from vqgen.train import generator as gen

    ds = 2 ** (len(config.tokenizer.ch_mult) - 1)
    grid = (config.data.image_size // ds, config.data.image_size // ds)
    gt = config.generator_train
    parallel.check_batch_size(gt.batch_size, mesh)
    # GeneratorTrainer.__init__ restores the tokenizer from a workdir; AOT needs only the parts
    # the step uses, built here the same way from the config.
    trainer = gen.GeneratorTrainer.__new__(gen.GeneratorTrainer)
    trainer.config, trainer.mesh, trainer.workdir = config, mesh, "/nonexistent"
    trainer.rules = parallel.rules_from_config(config.logical_rules)
    trainer.tokenizer = _TokenizerShape(config)
    trainer.family = gen.family_module(config.generator.arch)
    trainer.num_classes = int(config.data.num_classes)
    trainer.grid = grid
    trainer.model = trainer.family.build(gen._plain(config.generator), vocab_size=trainer.tokenizer.vocab_size,
                                         num_classes=trainer.num_classes, grid=grid)
    trainer.tx = common.make_optimizer(
        lr=gt.lr, num_steps=gt.num_steps, warmup_steps=gt.warmup_steps, schedule=gt.schedule,
        weight_decay=gt.weight_decay, b1=gt.b1, b2=gt.b2, grad_clip=gt.grad_clip)
    key = jax.random.key(0)  # outside the mesh: compile-only devices cannot hold arrays
    with parallel.mesh_context(mesh, trainer.rules):
        boxed = jax.eval_shape(trainer.init_state, key)
        shardings = parallel.logical_to_sharding(boxed, mesh, trainer.rules)
    state = _abstract(parallel.unbox(boxed), shardings)
    step = trainer.compiled_step(shardings, max_traces=_MAX_TRACES)
    b = int(gt.batch_size)
    seq = math_prod(grid)
    batch = {"tokens": jax.ShapeDtypeStruct((b, seq), jnp.int32, sharding=parallel.batch_sharding(mesh, 2)),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=parallel.batch_sharding(mesh, 1))}
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)
    return step, (state, batch, rng), trainer.rules


def compile_step(config, target: str, devices: list, mesh_shape=None) -> dict[str, Any]:
    """Lowers and compiles the ``target`` ('tokenizer' or 'generator') train step of ``config`` for
    ``devices`` (compile-only TPU devices or CPU devices); returns the memory/FLOP report."""
    from vqgen import parallel

    if target not in ("tokenizer", "generator"):
        raise ValueError(f"unknown --target={target!r}; use 'tokenizer' or 'generator'.")
    if target not in config:
        raise ValueError(f"the config has no {target!r} section; pick --target={'generator' if target == 'tokenizer' else 'tokenizer'}.")
    shape = tuple(mesh_shape) if mesh_shape else tuple(config.mesh_shape)
    mesh = parallel.create_mesh(shape, devices=devices)
    t0 = time.perf_counter()
    build = _tokenizer_step if target == "tokenizer" else _generator_step
    step, args, rules = build(config, mesh)
    with parallel.mesh_context(mesh, rules):
        lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    report: dict[str, Any] = {
        "target": target, "platform": devices[0].platform, "device_kind": getattr(devices[0], "device_kind", ""),
        "num_devices": len(devices), "mesh": dict(mesh.shape), "lower_seconds": round(t1 - t0, 2),
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

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (path[:variant]).", lock_config=True)
    target_flag = flags.DEFINE_enum("target", "tokenizer", ["tokenizer", "generator"], "Which train step to compile.")
    topo_flag = flags.DEFINE_string("topology", "cpu:8", "v5e-16, v5p-64, v4-32, v5e:4x4, ... or cpu:N.")
    slices_flag = flags.DEFINE_integer("num_slices", 1, "TPU slices (multislice).")
    mesh_flag = flags.DEFINE_list("mesh_shape", None, "('data','fsdp','tensor') sizes; default: the config's.")
    batch_flag = flags.DEFINE_integer("batch_size", None, "Override the global batch of the compiled step.")

    def run(_):
        config = config_flag.value
        if config is None:
            raise app.UsageError("--config is required, e.g. --config=configs/tokenizers/llamagen_vq16.py.")
        if batch_flag.value:
            section = "tokenizer_train" if target_flag.value == "tokenizer" else "generator_train"
            config[section].batch_size = batch_flag.value
        devices = topology_devices(topo_flag.value, slices_flag.value)
        mesh_shape = [int(x) for x in mesh_flag.value] if mesh_flag.value else None
        _print_report(compile_step(config, target_flag.value, devices, mesh_shape))

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
