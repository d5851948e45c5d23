"""The benchmark harness: runs every benchmark present and writes one JSON and one Markdown table.

    python benchmarks/run.py [--quick] [--only NAME ...] [--machine NAME] [--compare BASE.json]
    python benchmarks/run.py --compare BASE.json NEW.json     # two earlier results, nothing run

A benchmark is a module ``benchmarks/<name>.py`` with ``run(quick: bool) -> dict`` whose result
holds a ``"table"`` list of :func:`benchmarks.common.row` dicts. The harness first measures this
machine's float32 matmul peak and copy bandwidth (once, shared by every benchmark through the
environment), then runs each module in its own Python process (so its peak resident memory is
its own), showing progress, and writes

- ``benchmarks/results/<machine>.json`` (``<machine>_quick.json`` with ``--quick``): machine
  (name, jax version, device kind and count, CPU count, load average), the peaks, each
  benchmark's full result and wall time;
- ``benchmarks/results/<machine>.md`` (``<machine>_quick.md``): the table of throughput, peak
  memory, model FLOPs utilisation against the measured matmul peak and the KV-cache vs
  no-cache decoding ratio.

``--only`` runs the named benchmarks and merges them into an existing result file of the same
machine and setting. ``--compare BASE.json`` prints, after the run, every row's throughput beside
the row of the same benchmark and case in an earlier result file with their ratio (new / base),
the MFU and peak memory of both, and the two runs' matmul peaks and bandwidths (so a faster host
is not taken for faster code); with a second file it compares the two files and runs nothing.
The comparison is also written as ``<stem>_vs_<base stem>.md``. Timings are recorded, never
asserted.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = HERE / "results"
ORDER = ("quantizers", "train_tokenizer", "sample_gpt", "sample_maskgit", "sample_var")
NOT_BENCHMARKS = {"run", "common", "__init__"}


def discover(directory: Path = HERE) -> list[str]:
    """Benchmark module names in ``directory``: the known ones in :data:`ORDER`, then any other
    ``*.py`` (not ``run``, ``common`` or private), alphabetically."""
    present = sorted(p.stem for p in directory.glob("*.py")
                     if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_"))
    return [n for n in ORDER if n in present] + [n for n in present if n not in ORDER]


def run_module(name: str, quick: bool) -> dict:
    """Imports ``benchmarks.<name>`` and returns its ``run(quick)`` with wall time and peak RSS added."""
    from benchmarks import common

    module = importlib.import_module(f"benchmarks.{name}")
    if not hasattr(module, "run"):
        raise ValueError(
            f"benchmarks/{name}.py has no run(quick) function; add one or move the file out of benchmarks/.")
    t0 = time.perf_counter()
    result = module.run(quick)
    result["wall_s"] = time.perf_counter() - t0
    result["process_peak_rss_mib"] = common.peak_rss_mib()
    return result


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    """The Markdown summary (header lines + one table row per benchmark case) of a harness report."""
    m = report["machine"]
    peak, bw = report["matmul_peak"], report["copy_bandwidth"]
    load = m.get("load_average")
    lines = [
        f"# Benchmarks on `{m['name']}`{' (quick)' if report['quick'] else ''}",
        "",
        f"- date: {m['date']}; total wall time {report['total_wall_s']:.0f} s",
        f"- devices: {m['device_count']} x {m['device_kind']} ({m['backend']}), "
        f"{m['cpu_count']} CPUs, {m['processor']}",
        f"- jax {m['jax']}, python {m['python']}, {m['platform']}",
        f"- float32 matmul peak ({peak['n']}²): {peak['gflops']:.1f} GFLOP/s; copy bandwidth "
        f"{bw['gb_per_s']:.1f} GB/s (read {bw['read_gb_per_s']:.1f} GB/s)",
    ]
    if report.get("only"):
        lines.append(f"- this run measured only {', '.join(report['only'])}; the other rows come from an earlier run")
    if load:
        lines.append(f"- load average at start (1/5/15 min): {', '.join(f'{x:.2f}' for x in load)}")
    lines += [
        "",
        "| benchmark | case | throughput | step / image (s) | peak RSS (MiB) | XLA memory (MiB) | MFU "
        "| KV-cache speed-up | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, res in report["benchmarks"].items():
        if "error" in res:
            lines.append(f"| {name} | failed | – | – | – | – | – | – | {res['error'].splitlines()[-1][:120]} |")
            continue
        for r in res.get("table", []):
            thr = "–" if r["throughput"] is None else f"{_fmt(r['throughput'])} {r['unit']}"
            speed = "–" if r.get("cache_speedup") is None else f"{r['cache_speedup']:.1f}x"
            lines.append(
                f"| {r['benchmark']} | {r['case']} | {thr} | {_fmt(r.get('step_s'))} | {_fmt(r.get('peak_rss_mib'))} "
                f"| {_fmt(r.get('compiled_mib'))} | {_pct(r.get('mfu'))} | {speed} | {r.get('note', '')} |")
    lines.append("")
    return "\n".join(lines)


def _rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["benchmark"], r["case"]): r for res in report.get("benchmarks", {}).values()
            for r in res.get("table", [])}


def _ratio(new, base) -> str:
    return "–" if not new or not base else f"{new / base:.2f}x"


def compare(base: dict, new: dict) -> str:
    """Markdown: every row of ``new`` beside the row of the same benchmark and case of ``base``
    (throughput, their ratio, MFU and peak RSS of both), rows only one side has, and both
    machines' peaks. Pure; nothing is judged."""
    lines = ["# Benchmark comparison", ""]
    for label, rep in (("base", base), ("new", new)):
        m, peak, bw = rep["machine"], rep["matmul_peak"], rep["copy_bandwidth"]
        lines.append(f"- {label}: `{m['name']}`{' (quick)' if rep.get('quick') else ''}, {m['date']}, jax {m['jax']}; "
                     f"matmul peak {peak['gflops']:.1f} GFLOP/s, copy bandwidth {bw['gb_per_s']:.1f} GB/s")
    lines.append(f"- matmul peak new / base: {_ratio(new['matmul_peak']['gflops'], base['matmul_peak']['gflops'])}; "
                 f"copy bandwidth new / base: "
                 f"{_ratio(new['copy_bandwidth']['gb_per_s'], base['copy_bandwidth']['gb_per_s'])}")
    lines += ["", "| benchmark | case | base | new | new / base | MFU base → new | peak RSS base → new (MiB) |",
              "|---|---|---:|---:|---:|---:|---:|"]
    old_rows, new_rows = _rows(base), _rows(new)
    for key, r in new_rows.items():
        b = old_rows.get(key)
        thr = "–" if r["throughput"] is None else f"{_fmt(r['throughput'])} {r['unit']}"
        if b is None:
            lines.append(f"| {key[0]} | {key[1]} | not in base | {thr} | – | – | – |")
            continue
        bthr = "–" if b["throughput"] is None else f"{_fmt(b['throughput'])} {b['unit']}"
        same_unit = b["unit"] == r["unit"]
        lines.append(
            f"| {key[0]} | {key[1]} | {bthr} | {thr} | {_ratio(r['throughput'], b['throughput']) if same_unit else 'units differ'} "
            f"| {_pct(b.get('mfu'))} → {_pct(r.get('mfu'))} | {_fmt(b.get('peak_rss_mib'))} → {_fmt(r.get('peak_rss_mib'))} |")
    for key, b in old_rows.items():
        if key not in new_rows:
            bthr = "–" if b["throughput"] is None else f"{_fmt(b['throughput'])} {b['unit']}"
            lines.append(f"| {key[0]} | {key[1]} | {bthr} | not in new | – | – | – |")
    lines.append("")
    return "\n".join(lines)


def _read_report(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"--compare: {path} does not exist; give a result file written by benchmarks/run.py.") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"--compare: {path} is not JSON ({e.msg} at line {e.lineno}); give a result file written "
                         "by benchmarks/run.py.") from None
    if not isinstance(report, dict) or not {"machine", "matmul_peak", "copy_bandwidth", "benchmarks"} <= set(report):
        raise SystemExit(f"--compare: {path} is not a benchmarks/run.py result file (no machine, peaks and "
                         "benchmarks); give the <machine>.json it wrote.")
    return report


def _write_comparison(base_path: str, new_path: str, base: dict, new: dict) -> str:
    text = compare(base, new)
    out = Path(new_path).with_name(f"{Path(new_path).stem}_vs_{Path(base_path).stem}.md")
    out.write_text(text)
    print(text)
    print(f"wrote {out}", flush=True)
    return text


def _worker(name: str, quick: bool, result_file: str) -> int:
    try:
        result = run_module(name, quick)
    except Exception:  # noqa: BLE001 - reported to the parent, which records it and goes on
        import traceback

        result = {"benchmark": name, "error": traceback.format_exc()}
    Path(result_file).write_text(json.dumps(result, indent=1, default=str))
    return 0 if "error" not in result else 1


def _measure_peaks(quick: bool) -> dict:
    from benchmarks import common

    peak = common.matmul_peak(4096, reps=3 if quick else 5)
    bw = common.copy_bandwidth(256, reps=3 if quick else 10)
    return {"matmul_peak": peak, "copy_bandwidth": bw}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Runs every benchmark in benchmarks/ and writes JSON + Markdown.")
    parser.add_argument("--quick", action="store_true",
                        help="the reduced setting (under 10 minutes on a 2-core CPU)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--machine", help="name of the result files (default: the host name, sanitised)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where the JSON and Markdown go")
    parser.add_argument("--compare", nargs="+", metavar="FILE",
                        help="BASE.json: after the run, each row's ratio to an earlier result file; "
                             "BASE.json NEW.json: compare two result files and run nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.quick, args.result_file)
    if args.compare:
        if len(args.compare) > 2:
            parser.error(f"--compare takes BASE.json, or BASE.json NEW.json; got {len(args.compare)} files.")
        base = _read_report(args.compare[0])
        if len(args.compare) == 2:
            _write_comparison(args.compare[0], args.compare[1], base, _read_report(args.compare[1]))
            return 0

    from benchmarks import common

    names = discover()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; the benchmarks present are {names}.")
        names = [n for n in names if n in args.only]
    t_start = time.perf_counter()
    machine = common.machine_info(args.machine)
    print(f"machine {machine['name']}: {machine['device_count']} x {machine['device_kind']}, jax {machine['jax']}, "
          f"load {machine['load_average']}", flush=True)
    peaks = _measure_peaks(args.quick)
    print(f"float32 matmul peak {peaks['matmul_peak']['gflops']:.1f} GFLOP/s, "
          f"copy bandwidth {peaks['copy_bandwidth']['gb_per_s']:.1f} GB/s", flush=True)
    env = dict(os.environ, **{common.PEAKS_ENV: json.dumps(peaks)})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])

    out_dir = Path(args.out_dir)
    stem = machine["name"] + ("_quick" if args.quick else "")
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    benchmarks: dict[str, dict] = {}
    if args.only and json_path.exists():
        benchmarks = json.loads(json_path.read_text()).get("benchmarks", {})
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name} ...", flush=True)
            result_file = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, str(HERE / "run.py"), "--worker", name, "--result-file", result_file]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd + (["--quick"] if args.quick else []), env=env, cwd=str(ROOT))
            dt = time.perf_counter() - t0
            if os.path.exists(result_file):
                result = json.loads(Path(result_file).read_text())
            else:
                result = {"benchmark": name, "error": f"the benchmark process exited with code {proc.returncode}"}
            result["process_wall_s"] = dt
            benchmarks[name] = result
            status = "FAILED" if "error" in result else "done"
            print(f"[{i}/{len(names)}] {name} {status} in {dt:.0f} s (total {time.perf_counter() - t_start:.0f} s)",
                  flush=True)
            if "error" in result:
                print(result["error"], file=sys.stderr, flush=True)
    report = {"machine": machine, "quick": args.quick, "matmul_peak": peaks["matmul_peak"],
              "copy_bandwidth": peaks["copy_bandwidth"], "total_wall_s": time.perf_counter() - t_start,
              "only": names if args.only else None, "benchmarks": benchmarks}
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(markdown(report))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {report['total_wall_s']:.0f} s", flush=True)
    if args.compare:
        _write_comparison(args.compare[0], str(json_path), base, json.loads(json_path.read_text()))
    return 1 if any("error" in r for r in benchmarks.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
