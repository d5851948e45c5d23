"""Smoke tests of the benchmark harness: discovery, the Markdown writer, one tiny benchmark.

No timing is asserted anywhere; these check that the harness and its pieces run and that what
they write has the structure the README documents.
"""
import importlib
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import common, run  # noqa: E402

MODULES = ("quantizers", "train_tokenizer", "sample_gpt", "sample_maskgit", "sample_var")


def test_discovery_finds_every_benchmark_in_order(tmp_path):
    assert run.discover()[:5] == list(MODULES)
    for name in ("run", "common", "_private", "zeta", "alpha", "sample_maskgit"):
        (tmp_path / f"{name}.py").write_text("")
    assert run.discover(tmp_path) == ["sample_maskgit", "alpha", "zeta"]


@pytest.mark.parametrize("name", MODULES)
def test_every_benchmark_module_imports_and_has_run(name):
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.run)


def _fake_report():
    peak = {"n": 4096, "seconds": 0.4, "gflops": 343.6, "dtype": "float32"}
    bw = {"mib": 256, "seconds": 0.01, "gb_per_s": 53.7, "read_gb_per_s": 30.0}
    machine = common.machine_info("fake host/1")
    rows = [
        common.row("sample_gpt", "GPT-B sample, batch 8", throughput=167.0, unit="tokens/s", step_s=1.5,
                   peak_rss_mib=2048.0, cache_speedup=74.5, note="KV cache"),
        common.row("train_tokenizer", "quickstart 32px batch 32", throughput=58.8, unit="images/s", step_s=0.544,
                   peak_rss_mib=900.0, compiled_mib=120.5, mfu=0.3728),
    ]
    return {"machine": machine, "quick": True, "matmul_peak": peak, "copy_bandwidth": bw, "total_wall_s": 321.0,
            "benchmarks": {"sample_gpt": {"table": rows[:1]}, "train_tokenizer": {"table": rows[1:]},
                           "quantizers": {"error": "Traceback ...\nValueError: boom"}}}


def test_markdown_table_has_one_line_per_case_and_the_machine():
    report = _fake_report()
    assert report["machine"]["name"] == "fake-host-1"
    md = run.markdown(report)
    lines = md.splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith("| benchmark")]
    assert len(table) == 3
    gpt_line = next(line for line in table if line.startswith("| sample_gpt"))
    assert "167 tokens/s" in gpt_line and "74.5x" in gpt_line
    tok_line = next(line for line in table if line.startswith("| train_tokenizer"))
    assert "37.3%" in tok_line and "120" in tok_line
    assert "ValueError: boom" in next(line for line in table if line.startswith("| quantizers"))
    assert "343.6 GFLOP/s" in md and "fake-host-1" in md and report["machine"]["jax"] in md


def test_peaks_come_from_the_environment_when_the_harness_sets_them(monkeypatch):
    fake = {"matmul_peak": {"n": 8, "seconds": 1.0, "gflops": 1.5}, "copy_bandwidth": {"gb_per_s": 2.0}}
    monkeypatch.setenv(common.PEAKS_ENV, json.dumps(fake))
    assert common.matmul_peak()["gflops"] == 1.5
    assert common.copy_bandwidth()["gb_per_s"] == 2.0
    monkeypatch.setenv(common.PEAKS_ENV, "{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        common.matmul_peak()


def test_time_fn_and_compiled_stats_on_a_tiny_matmul():
    import jax
    import jax.numpy as jnp

    x = jnp.ones((64, 64), jnp.float32)
    compiled = jax.jit(lambda a: a @ a).lower(x).compile()
    timing = common.time_fn(lambda: compiled(x), warmup=1, reps=2)
    assert timing["reps"] == 2 and timing["min_s"] <= timing["median_s"]
    stats = common.compiled_stats(compiled)
    assert stats["xla_flops"] == pytest.approx(2 * 64**3, rel=0.01)  # XLA's own count of one 64^3 matmul
    assert stats["memory_mib"]["arguments"] == pytest.approx(64 * 64 * 4 / 2**20)


def test_one_quantizer_benchmark_with_a_tiny_setting(monkeypatch):
    from benchmarks import quantizers

    monkeypatch.setenv(common.PEAKS_ENV, json.dumps({"matmul_peak": {"gflops": 100.0}}))
    r = quantizers.bench_one("vq", grid=(1, 2, 2), reps=1, codebook_size=16)
    assert r["tokens"] == 4 and r["z_shape"] == [1, 2, 2, 8]
    assert r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
    with pytest.raises(ValueError, match="unknown quantizer benchmark"):
        quantizers.bench_one("nope")


def test_unknown_only_name_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        run.main(["--only", "nope"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_compare_puts_each_row_beside_its_base_with_the_ratio(tmp_path, capsys):
    base = _fake_report()
    new = json.loads(json.dumps(base))
    new["machine"]["name"] = "fake-host-2"
    new["matmul_peak"]["gflops"] *= 2
    new["benchmarks"]["sample_gpt"]["table"][0]["throughput"] = 334.0  # twice the base
    new["benchmarks"]["train_tokenizer"]["table"].append(
        common.row("train_tokenizer", "a new case", throughput=1.0, unit="images/s"))
    del new["benchmarks"]["quantizers"]
    md = run.compare(base, new)
    gpt = next(line for line in md.splitlines() if line.startswith("| sample_gpt"))
    assert "167 tokens/s" in gpt and "334 tokens/s" in gpt and "2.00x" in gpt
    tok = next(line for line in md.splitlines() if line.startswith("| train_tokenizer | quickstart"))
    assert "1.00x" in tok and "37.3% → 37.3%" in tok
    assert "| train_tokenizer | a new case | not in base |" in md
    assert "matmul peak new / base: 2.00x" in md and "fake-host-1" in md and "fake-host-2" in md

    # Through the command line: two files, nothing run, the table printed and written beside NEW.
    b, n = tmp_path / "base.json", tmp_path / "new.json"
    b.write_text(json.dumps(base))
    n.write_text(json.dumps(new))
    assert run.main(["--compare", str(b), str(n)]) == 0
    assert "2.00x" in capsys.readouterr().out
    assert "2.00x" in (tmp_path / "new_vs_base.md").read_text()


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), ("{not json", "is not JSON"),
                                             ('{"a": 1}', "is not a benchmarks/run.py result file")])
def test_compare_bad_file_is_one_sentence(tmp_path, content, needle):
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit, match=needle):
        run.main(["--compare", str(path), str(path)])


def test_vs_llamagen_without_a_checkout_says_so_and_measures_nothing(monkeypatch, tmp_path):
    from benchmarks import vs_llamagen

    pytest.importorskip("torch")
    monkeypatch.delenv(vs_llamagen.REPO_ENV, raising=False)
    result = vs_llamagen.run(True, repo=str(tmp_path))
    assert result["table"] == [] and "no LlamaGen checkout" in result["skipped"]
    with pytest.raises(SystemExit, match="give SIDE official or vqgen"):
        monkeypatch.setattr(sys, "argv", ["vs_llamagen.py", "--one", "both", "0"])
        vs_llamagen.main()
