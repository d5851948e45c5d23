"""``--mode=sweep_sampling``: one trained workdir sampled under a grid of sampler settings.

    python -m vqgen.main --config=quickstart:maskgit --workdir=runs/maskgit --mode=sweep_sampling \\
        --sweep=cfg_scale=1,1.5,2 --sweep=choice_temperature=2,4.5

Every combination of the ``--sweep`` values (the other options as the config's ``sample``
section says) samples ``sample.per_class`` images of every class with the same keys, and is
scored as ``--mode=evaluate`` scores samples: on the embedded digits by the digit judge
(accuracy, judge FID, improved precision and recall against the held-out digits), elsewhere by
FID/IS when ``evaluate.inception_path`` and ``evaluate.reference_stats`` are set. One row per
setting goes to ``<workdir>/sweeps/sampling.json`` and the ``sampling_sweep`` section of
``report.json``, with a reference row of real training digits for the judge, and the table is
printed as it fills, the way papers plot FID against the guidance scale.

A value is read with the type of the option's default (``true``/``false`` for flags); a tuple
option takes its items joined by ``:`` (``--sweep=cfg_interval=0:1,0.2:1``).
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vqgen import fileio, generators, parallel
from vqgen.evaluation import fid as fid_lib
from vqgen.evaluation import judge as judge_lib
from vqgen.train import common
from vqgen.train import generator as generator_lib

_SCORED = ("judge_accuracy", "judge_fid", "judge_precision", "judge_recall", "fid", "inception_score")


def _convert(value: str, default: Any, key: str) -> Any:
    text = value.strip()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            items = text.split(":")
            kinds = [type(x) for x in default] if len(default) == len(items) else [float] * len(items)
            return tuple(kind(x) for kind, x in zip(kinds, items))
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(
            type(default), f"{len(default)} numbers joined by ':'" if isinstance(default, tuple) else "a string")
        raise ValueError(f"--sweep={key}=...: {value!r} is not {kind} (the option's default is {default!r}); "
                         "give values of that kind.") from None
    return text


def parse_sweeps(items: Sequence[str], options: Any, family: str) -> dict[str, list]:
    """``['cfg_scale=1,1.5', ...]`` -> ``{'cfg_scale': [1.0, 1.5], ...}`` in the types of the
    family's options ``options`` (a ``SamplerOptions`` instance); one sentence for a key the
    family's sampler does not read, an empty value list or a repeated key."""
    if not items:
        raise ValueError("--mode=sweep_sampling needs at least one --sweep=KEY=V1,V2,... "
                         "(e.g. --sweep=cfg_scale=1,1.5,2).")
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--sweep={item!r} is not KEY=V1,V2,...; write e.g. --sweep=cfg_scale=1,1.5,2.")
        if key not in fields:
            raise ValueError(f"--sweep={key}: the {family!r} sampler has no option {key!r}; sweep one of "
                             f"{sorted(fields)}.")
        if key in grid:
            raise ValueError(f"--sweep={key} is given twice; list all its values in one --sweep={key}=V1,V2,...")
        parts = [v for v in values.split(",") if v.strip()]
        if not parts:
            raise ValueError(f"--sweep={key}= has no values; list at least one, e.g. --sweep={key}=V1,V2.")
        grid[key] = [_convert(v, fields[key], key) for v in parts]
    return grid


def check_sweeps(config, sweeps: Sequence[str]) -> dict[str, list]:
    """:func:`parse_sweeps` against the options of ``config``'s family, before anything is loaded;
    every combination is also built once, so a bad value fails here with its one sentence."""
    family = generators.family(str(config.generator.arch))
    section = config.sample.to_dict()
    base = family.sampler_options(section)
    grid = parse_sweeps(sweeps, base, str(config.generator.arch))
    for values in itertools.product(*grid.values()):
        family.sampler_options(section, **dict(zip(grid, values)))
    return grid


def _scorer(config, workdir: str):
    """``(images, labels) -> metrics`` as ``--mode=evaluate`` scores class-conditional samples."""
    ec = config.evaluate
    if ec.judge and config.data.source == "mnist":
        judge = judge_lib.load_or_train_judge(fileio.join(workdir, "judge"), seed=config.seed)
        return (lambda images, labels: judge_lib.judge_metrics(judge, images, labels)), judge
    if ec.inception_path and ec.reference_stats:
        def fid_of(images, labels):
            path = fileio.join(workdir, "sweeps", "current_samples.npz")
            fileio.save_npz(path, images=images, labels=labels)
            return fid_lib.evaluate_files(path, ec.reference_stats, inception_path=ec.inception_path,
                                          batch_size=ec.batch_size)
        return fid_of, None
    raise ValueError("no metric scores these samples: the digit judge needs data.source=mnist with "
                     "evaluate.judge=True; elsewhere set evaluate.inception_path and evaluate.reference_stats.")


def _table(rows: list[dict], keys: Sequence[str]) -> str:
    cols = list(keys) + [k for k in _SCORED if any(k in r for r in rows)] + ["seconds_per_image"]

    def cell(v):
        return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def sweep_sampling(config, workdir: str, sweeps: Sequence[str], mesh=None) -> list[dict]:
    """Samples and scores the workdir's generator under every combination of ``sweeps``
    (``KEY=V1,V2,...`` strings); returns the rows (the settings, the metrics, seconds per image)."""
    gen = generator_lib.load_generator(config, workdir, mesh)
    grid = parse_sweeps(sweeps, gen.options(), str(config.generator.arch))
    score, judge = _scorer(config, workdir)
    labels = np.repeat(np.arange(int(config.data.num_classes), dtype=np.int32), int(config.sample.per_class))
    rng = jax.random.key(config.seed * 1000 + 17)  # the keys of --mode=sample, for every setting
    keys = list(grid)
    combos = list(itertools.product(*grid.values()))
    common.say(f"sweep: {len(combos)} settings of {keys}, {len(labels)} samples each")
    rows: list[dict] = []
    out = fileio.join(workdir, "sweeps", "sampling.json")
    for i, values in enumerate(combos):
        setting = dict(zip(keys, values))
        gen.options(**setting)  # a bad combination fails here, before sampling
        t0 = time.perf_counter()
        images = common.to_uint8(gen.decode(gen.sample_tokens(labels, rng, **setting)))
        seconds = time.perf_counter() - t0
        row = {k: (list(v) if isinstance(v, tuple) else v) for k, v in setting.items()}
        row.update(score(images, labels))
        row["seconds_per_image"] = seconds / len(labels)
        rows.append(row)
        common.say(f"sweep {i + 1}/{len(combos)}: " + ", ".join(
            f"{k}={(f'{v:.4g}' if isinstance(v, float) else v)}" for k, v in row.items()))
        if parallel.is_main_process():
            fileio.write_json(out, {"rows": rows})  # what is done survives an interruption
    result: dict[str, Any] = {"keys": keys, "num_samples": int(len(labels)), "rows": rows}
    if judge is not None:
        result["real_reference"] = judge_lib.real_reference_metrics(judge, labels, seed=config.seed)
    if parallel.is_main_process():
        fileio.write_json(out, result)
    common.update_report(workdir, "sampling_sweep", result)
    common.say(_table(rows, keys))
    if "real_reference" in result:
        ref = result["real_reference"]
        common.say(f"real training digits: accuracy {ref['judge_real_accuracy']:.4g}, judge FID "
                   f"{ref['judge_real_fid']:.4g}, precision {ref['judge_real_precision']:.4g}, "
                   f"recall {ref['judge_real_recall']:.4g}")
    common.say(f"sweep: {len(rows)} rows in {out}")
    return rows
