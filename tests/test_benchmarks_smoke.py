"""The benchmark suite's plumbing on tiny shapes (timings are never asserted):
every configured case has a bench module, the harness times interleaved
providers, and the report writes its files."""

import importlib
import json
import os

import pytest

from benchmarks import harness, report
from benchmarks.config import CASES, Case


def test_every_case_has_a_bench_module_with_setup_and_a_work_count():
    # A compute-bound case counts FLOPs; a memory-bound one (new_matrix,
    # normal) may count 0 FLOPs but then must count the bytes it moves.
    for case in CASES:
        module = importlib.import_module(f"benchmarks.bench_{case.bench}")
        assert callable(module.setup), case
        flops = module.flops(case)
        moved = module.bytes_moved(case) if hasattr(module, "bytes_moved") else 0.0
        assert flops >= 0 and (flops > 0 or moved > 0), case


def test_harness_and_report_on_a_tiny_kernel_case(tmp_path):
    case = Case("syrk", "syrk (JᵀJ, P×P)", "-", 8, True, 300)
    module = importlib.import_module("benchmarks.bench_syrk")
    timings = harness.measure(case, list(module.PROVIDERS), "cpu", budget_s=0.05, min_reps=3, max_reps=5)
    assert set(timings) == set(module.PROVIDERS)
    ok = {p: t for p, t in timings.items() if t.status == "ok"}
    assert {"J.T @ J", "eager"} <= set(ok)
    assert all(len(t.samples) >= 3 and t.median > 0 for t in ok.values())
    # Bursts of BURST calls (fewer on a machine so loaded that a call takes
    # over LONG_CALL_S): the first of each is reported apart, after a switch.
    for t in ok.values():
        assert t.burst in (harness.BURST, harness.burst_size(harness.BURST, [2 * harness.LONG_CALL_S]))
        assert len(t.samples) == (t.burst - 1) * len(t.switch_samples) and t.switch_median > 0
    base = timings["J.T @ J"].median
    rows = [
        {
            "op": case.op,
            "model": case.model,
            "P": case.p,
            "N": case.n,
            "provider": p,
            "status": t.status,
            "median_ms": t.median * 1e3,
            "p20_ms": t.quantile(0.2) * 1e3,
            "p80_ms": t.quantile(0.8) * 1e3,
            "speedup": base / t.median if t.status == "ok" else float("nan"),
            "baseline": "J.T @ J",
            "gflops": float("nan"),
            "first_call_ms": t.first_s * 1e3,
            "compile_s": float("nan"),
            "note": t.note,
        }
        for p, t in timings.items()
    ]
    table = report.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "J.T @ J" in table
    report.write(rows, report.environment("cpu"), str(tmp_path))
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["environment"]["device"] == "cpu" and len(data["results"]) == len(rows)


def test_cg_step_bench_restores_its_inputs_between_calls():
    case = Case("cg_step", "cg step (vector updates)", "-", 0, True, 1000)
    module = importlib.import_module("benchmarks.bench_cg_step")
    step, reset = module.setup(case, "eager", "cpu")
    reset()
    first = float(step())
    reset()
    assert float(step()) == pytest.approx(first)


def test_burst_sizes_and_strict_alternation():
    assert harness.burst_size(4, [0.001, 0.002]) == 4
    assert harness.burst_size(4, [0.001, 2 * harness.LONG_CALL_S]) == 2
    assert harness.burst_size(1, [0.001]) == 1
    case = Case("syrk", "syrk (JᵀJ, P×P)", "-", 8, True, 200)
    timings = harness.measure(case, ["eager"], "cpu", budget_s=0.0, min_reps=3, max_reps=3, burst=1)
    # One call per round: every call is a first call, and both views hold them all.
    assert timings["eager"].samples == timings["eager"].switch_samples and len(timings["eager"].samples) == 3


def test_sghmc_copy_baseline_is_stream_sized():
    # STREAM's rule: each array four times the last-level cache, so the copy
    # measures memory, not cache, bandwidth in both timing views.
    module = importlib.import_module("benchmarks.bench_sgmcmc")
    entries = module.stream_entries("cpu")
    assert entries * 4 >= max(4 * module._last_level_cache("cpu"), 128 << 20)
    case = Case("sgmcmc", "sgmcmc.sghmc step (1M params)", "S", 0, True)
    assert module.copy_bytes(case, "cpu") == 8 * entries


def test_a_workflow_runs_every_phase_and_scores_it():
    from benchmarks import workflows

    small = workflows.Workflow("breast_cancer", 8, workflows.SHORT_PHASES, sghmc_steps=40, map_epochs=5, vi_steps=20)
    result = workflows.run(small, "eager")
    assert list(result["phases"]) == list(workflows.SHORT_PHASES)
    for phase, got in result["phases"].items():
        assert "error" not in got, (phase, got)
        assert got["s"] > 0 and 0.0 <= got["acc"] <= 1.0 and got["nll"] > 0, (phase, got)
    # Five epochs of MAP already separate this data set well.
    assert result["phases"]["map"]["acc"] > 0.85
    row = {"workflow": "small", "provider": "eager", "status": "ok", "P": result["P"], "common_s": 1.0}
    row.update(process_s=2.0, cold_process_s=2.0, compile_s=0.0, phases=result["phases"], speedup=1.5, vs_eager=1.0)
    table = workflows.markdown([row])
    assert f"| small | {result['P']} | eager | 1.00 |" in table and "1.50x" in table and "acc" in table


def test_common_phases_leave_out_what_a_provider_failed():
    from benchmarks import workflows

    ok = {"status": "ok", "phases": {"map": {"s": 1.0}, "ekf_dense": {"s": 1.0}}}
    failed = {"status": "ok", "phases": {"map": {"s": 1.0}, "ekf_dense": {"s": float("nan"), "error": "x"}}}
    assert workflows._common_phases([ok, failed]) == ["map"]
    assert workflows._common_phases([ok, ok]) == ["map", "ekf_dense"]


def test_publish_of_the_published_file_itself_regenerates_without_copying(tmp_path, monkeypatch):
    """``python -m benchmarks.publish --results docs/results/full_run.json``:
    source and destination are one file (shutil.copyfile would raise
    SameFileError); the tables are regenerated from it."""
    from benchmarks import publish

    published = tmp_path / "full_run.json"
    published.write_text(json.dumps({"marker": 1}))
    target = tmp_path / "page.md"
    target.write_text("<!-- generated: fake -->\nold\n<!-- end generated -->\n")
    monkeypatch.setattr(publish, "PUBLISHED", str(published))
    monkeypatch.setattr(publish, "TARGETS", (str(target),))
    monkeypatch.setitem(publish.SECTIONS, "fake", lambda data: f"marker {data['marker']}")
    monkeypatch.setattr(publish, "load", lambda path=None: json.loads(published.read_text()))
    assert publish.main(["--results", str(published)]) == 0
    assert target.read_text() == "<!-- generated: fake -->\nmarker 1\n<!-- end generated -->\n"
    assert json.loads(published.read_text()) == {"marker": 1}


def test_kernel_cases_of_one_op_and_n_keep_a_row_per_size():
    """Two syrk cases with the same N and different P: one kernels-table row
    each (keyed on the size too), not the later one overwriting the earlier."""
    from benchmarks import publish

    def row(p, provider, ms):
        return {
            "op": "syrk (JᵀJ, P×P)",
            "model": "-",
            "N": 64,
            "P": p,
            "provider": provider,
            "status": "ok",
            "baseline": "J.T @ J",
            "median_ms": ms,
            "speedup": 2.0 / ms,
        }

    results = [row(1045, "J.T @ J", 2.0), row(1045, "eager", 4.0), row(20000, "J.T @ J", 2.0), row(20000, "eager", 1.0)]
    table = publish.kernels({"results": results})
    assert "| P = 1045, N = 64 | J.T @ J" in table and "eager 0.5x" in table
    assert "| P = 20000, N = 64 | J.T @ J" in table and "eager 2.0x" in table


def test_readme_workflow_summary_sums_the_completed_phases_and_names_the_failed_ones():
    """The README's workflow table: each provider's seconds over the phases it
    completed, compiled against eager over all phases, and the last phase's
    accuracy and NLL per provider ("error" where the reference fails it)."""
    from benchmarks import publish

    def row(provider, map_s, ekf, compile_s=0.0):
        phases = {"map": {"s": map_s, "acc": 0.9, "nll": 0.3}, "ekf_dense": ekf}
        return {
            "workflow": "w",
            "provider": provider,
            "status": "ok",
            "P": 10,
            "phases": phases,
            "compile_s": compile_s,
            "cold_compile_s": 5.0,
        }

    rows = [
        row("posteriors", 1.0, {"error": "LinAlgError"}),
        row("eager", 1.0, {"s": 3.0, "acc": 0.95, "nll": 0.2}),
        row("compiled", 1.0, {"s": 1.0, "acc": 0.95, "nll": 0.21}, compile_s=0.5),
    ]
    table = publish.workflow_summary({"workflows": rows})
    line = table.splitlines()[-1]
    assert line.startswith("| w | 10 | 1.00 s (fails `ekf_dense`) | 4.00 s | 2.00 s | 0.50x the time |")
    assert "0.5 (cold caches: 5.0)" in line and "`ekf_dense`: error · 0.950, 0.200 · 0.950, 0.210" in line
    # A provider that did not finish, and one whose last phase has no finite result.
    rows[0] = {"workflow": "w", "provider": "posteriors", "status": "DNF", "note": "took over 900 s"}
    rows[2]["phases"]["ekf_dense"] = {"s": 1.0, "acc": float("nan"), "nll": 0.2}
    rows[2]["compile_s"] = float("nan")
    line = publish.workflow_summary({"workflows": rows}).splitlines()[-1]
    assert line.startswith("| w | 10 | DNF | 4.00 s | 2.00 s | 0.50x the time | — (cold caches: 5.0) |")
    assert line.endswith("`ekf_dense`: — · 0.950, 0.200 · — |")


def test_failed_workflow_rounds_are_dropped_and_counted(monkeypatch):
    """The medians are over the rounds after the first (round 1, cold caches,
    is reported on its own); a later round whose child fails, or fails a
    common phase, is dropped from them (which stay finite) and counted in the
    row and tables; when every later round failed, round 1 stands in, marked."""
    from benchmarks import workflows

    def child(seconds, error_in=None, status="ok"):
        if status != "ok":
            return {"provider": "x", "status": status, "note": "boom"}
        phases = {p: {"s": seconds, "acc": 0.9, "nll": 0.3} for p in ("map", "ekf_dense")}
        if error_in:
            phases[error_in] = {"s": float("nan"), "error": "RuntimeError: boom"}
        return {"status": "ok", "P": 10, "process_s": 2 * seconds, "compile_s": 0.0, "compiles": 0, "phases": phases}

    script = {
        "eager": [child(9.0), child(3.0, error_in="ekf_dense"), child(2.0), child(4.0)],
        "compiled": [child(5.0), child(0.7), child(0.0, status="error"), child(0.5)],
        "posteriors": [child(1.0), child(0.0, status="error"), child(0.0, status="error"), child(0.0, status="DNF")],
    }
    calls = {p: iter(v) for p, v in script.items()}
    monkeypatch.setattr(workflows, "run_child", lambda name, provider, *a, **k: next(calls[provider]))
    rows = workflows.measure_workflows(
        ["w"], ["eager", "compiled", "posteriors"], 4, 1, "/nonexistent", log=lambda *_: None
    )
    by = {r["provider"]: r for r in rows}
    assert by["eager"]["failed_rounds"] == 1 and by["eager"]["rounds"] == 2
    assert by["eager"]["common_s"] == 2 * 3.0 and by["eager"]["phases"]["ekf_dense"]["s"] == 3.0
    assert by["eager"]["cold_process_s"] == 18.0 and by["compiled"]["cold_process_s"] == 10.0
    assert by["compiled"]["failed_rounds"] == 1 and by["compiled"]["common_s"] == pytest.approx(2 * 0.6)
    assert by["compiled"]["vs_eager"] == pytest.approx(0.2)
    assert by["posteriors"]["cold_only"] and by["posteriors"]["common_s"] == 2.0
    table = workflows.markdown(rows)
    assert "eager (1 of 3 rounds failed, dropped)" in table and "nan" not in table
    assert "posteriors (every later round failed: round 1, cold caches, only)" in table


def test_full_runs_give_the_short_workflows_more_rounds(monkeypatch):
    """``--full`` runs each short workflow 9 times per provider (8 warm
    rounds for the medians) and each long one 3 times."""
    from benchmarks import workflows

    rounds = workflows.full_rounds(["breast_cancer", "sghmc_long"])
    assert rounds == {"breast_cancer": 9, "sghmc_long": 3}
    started = []

    def child(name, provider, *a, **k):
        started.append(name)
        phases = {"map": {"s": 1.0, "acc": 0.9, "nll": 0.3}}
        return {"status": "ok", "P": 10, "process_s": 2.0, "compile_s": 0.0, "compiles": 0, "phases": phases}

    monkeypatch.setattr(workflows, "run_child", child)
    rows = workflows.measure_workflows(list(rounds), ["eager"], rounds, 1, "/nonexistent", log=lambda *_: None)
    assert started.count("breast_cancer") == 9 and started.count("sghmc_long") == 3
    assert [r["rounds"] for r in rows] == [8, 2]


def test_python_m_benchmarks_keeps_compile_costs_under_its_output(tmp_path, monkeypatch):
    from benchmarks import __main__ as bench_main
    from posteriors_fast.backends import compile_policy

    saved = compile_policy.BOOK.path
    try:
        monkeypatch.delenv("POSTERIORS_FAST_CACHE_DIR", raising=False)
        bench_main._isolate_compile_costs(str(tmp_path))
        assert compile_policy.BOOK.path == str(tmp_path / "compile-costs" / "compile_costs.json")
        assert os.environ["POSTERIORS_FAST_CACHE_DIR"] == str(tmp_path / "compile-costs")
        # A directory the user chose is kept.
        monkeypatch.setenv("POSTERIORS_FAST_CACHE_DIR", str(tmp_path / "mine"))
        bench_main._isolate_compile_costs(str(tmp_path / "elsewhere"))
        assert os.environ["POSTERIORS_FAST_CACHE_DIR"] == str(tmp_path / "mine")
    finally:
        compile_policy.set_cache_dir(None if saved is None else os.path.dirname(saved))


def test_scale_models_are_the_advertised_sizes():
    from benchmarks import models

    for name in models.SHAPES:
        target = 1e6 if name.endswith("-1M") else 1e7
        assert abs(models.num_params(name) / target - 1) < 0.1, name


def test_scale_row_runs_and_reports_time_memory_and_ratios():
    from benchmarks import scale

    got = scale.run_row(scale.Row("sgmcmc.sghmc", "mlp-1M", "eager", 4), budget_s=0.0)
    assert got["status"] == "ok" and got["reps"] >= 3 and got["median_ms"] > 0, got
    assert got["P"] == 993_610 and got["peak_mb"] >= 0
    rows = [
        {**got, "op": "jacobian", "median_ms": 10.0},
        {**got, "op": "gram", "median_ms": 5.0},
        {**got, "op": "ekf.lowrank_fisher", "median_ms": 30.0},
        {**got, "op": "ekf.diag_fisher", "median_ms": 20.0},
        {**got, "op": "ekf.diag_fisher", "provider": "posteriors", "median_ms": 60.0},
    ]
    scale._ratios(rows)
    assert rows[2]["x_jac"] == 3.0 and rows[2]["x_jac_gram"] == 2.0
    assert rows[3]["x_ref"] == 3.0
    assert "ekf.lowrank_fisher" in scale.markdown(rows)
