"""``python -m benchmarks``: the project's main job.

Runs the workload table of ``benchmarks/config.py`` on the device present (CUDA
if available, else CPU) for the providers posteriors 0.0.5 (when installed),
posteriors_fast eager and compiled; prints progress and a markdown table, and
writes CSV, JSON and a PNG plot to ``--out``.
"""

import argparse
import logging
import math
import os
import shutil
import sys
import time

import torch

from benchmarks import coldstart, report, scale, workflows
from benchmarks.config import CASES, MODELS, PROVIDERS
from benchmarks.harness import BURST, bench_module, measure
from benchmarks.workloads import num_params
from posteriors_fast.backends import compile_policy


def _args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="the small per-call set only, no workflows (about 2 minutes)"
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="every per-call case and workflow, long runs, cold start and the scale group "
        "(python -m benchmarks.scale, the longest part; --skip leaves groups out)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="fresh processes per workflow and provider (default 2; with --full 9 for the short rows, 3 for the long)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument(
        "--only", default=None, help="run only cases whose bench or op contains this text (comma-separated: any)"
    )
    parser.add_argument(
        "--skip",
        default="",
        help="groups of --full to leave out, comma-separated: long-cases (the per-call cases "
        "beyond the default set), workflows, coldstart, scale",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument(
        "--burst",
        type=int,
        default=BURST,
        help="consecutive calls per provider and round (1: strict per-call alternation)",
    )
    return parser.parse_args(argv)


def _moved(module, case, provider, device) -> float:
    """Nominal bytes of one call; the ``copy`` provider moves its own count."""
    if provider == "copy" and hasattr(module, "copy_bytes"):
        return module.copy_bytes(case, device)
    return module.bytes_moved(case)


def _isolate_compile_costs(out: str) -> None:
    """Unless ``POSTERIORS_FAST_CACHE_DIR`` is set, keep the compile-cost
    estimates of this run, and of the processes it starts, under ``out``: a
    benchmark run neither reads nor writes the user's
    ``~/.cache/posteriors_fast``."""
    if os.environ.get("POSTERIORS_FAST_CACHE_DIR"):
        return
    root = os.path.join(os.path.abspath(out), "compile-costs")
    os.environ["POSTERIORS_FAST_CACHE_DIR"] = root
    compile_policy.set_cache_dir(root)


def main(argv=None) -> int:
    args = _args(argv)
    _isolate_compile_costs(args.out)
    # The per-call cases measure the compiled steady state: compile on the
    # third call (the warm-up), not by the ski-rental rule, whose cost the
    # workflow cases time in fresh processes with the default policy.
    compile_policy.set_compile_policy(after=3)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    skip = {g.strip() for g in args.skip.split(",") if g.strip()}
    cases = [c for c in CASES if c.quick or (args.full and "long-cases" not in skip)]
    flows = [name for name, w in workflows.WORKFLOWS.items() if args.full or not w.long]
    if args.quick or "workflows" in skip:
        flows = []
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.bench or w in c.op for w in wanted)]
        flows = [f for f in flows if any(w in f"workflow {f}" for w in wanted)]
    env = report.environment(device)
    env["command"] = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"posteriors_fast benchmarks on {device} ({env['device_name']}), torch {env['torch']}, "
        f"{env['threads']} threads, commit {env['commit'][:10]}; posteriors {env['posteriors']}"
    )
    print(
        "models (tanh MLP input-hidden-classes, P): "
        + ", ".join(f"{k}={'-'.join(map(str, v))} (P={num_params(k)})" for k, v in MODELS.items())
    )
    budget = 6.0 if args.full else 1.5
    rows, started = [], time.perf_counter()
    for index, case in enumerate(cases, 1):
        print(f"[{index}/{len(cases)}] {case.op} {case.model} N={case.n} ...", end=" ", flush=True)
        module = bench_module(case)
        # Kernel benches bring their own providers and baseline (plain torch).
        case_providers = list(getattr(module, "PROVIDERS", providers))
        if hasattr(module, "copy_bytes"):  # the module times a STREAM-sized copy too
            case_providers.append("copy")
        baseline = getattr(module, "BASELINE", "posteriors")
        timings = measure(
            case,
            case_providers,
            device,
            budget_s=budget,
            min_reps=5 if args.full else 3,
            max_reps=getattr(module, "MAX_REPS", 30),
            burst=args.burst,
        )
        reference = timings.get(baseline)
        ref_ok = reference is not None and reference.status == "ok"
        ref_median = reference.median if ref_ok else float("nan")
        ref_switch = reference.switch_median if ref_ok else float("nan")
        flops = module.flops(case)
        reports_bytes = hasattr(module, "bytes_moved")
        summary = []
        for provider, timing in timings.items():
            median = timing.median
            moved_gb = _moved(module, case, provider, device) / 1e9 if reports_bytes else None
            speedup = ref_median / median if timing.status == "ok" else float("nan")
            rows.append(
                {
                    "op": case.op,
                    "model": case.model,
                    "P": case.p or num_params(case.model),
                    "N": case.n,
                    "provider": provider,
                    "status": timing.status,
                    "baseline": baseline,
                    "median_ms": median * 1e3,
                    "p20_ms": timing.quantile(0.2) * 1e3,
                    "p80_ms": timing.quantile(0.8) * 1e3,
                    "speedup": speedup,
                    "after_switch_ms": timing.switch_median * 1e3,
                    "after_switch_speedup": ref_switch / timing.switch_median
                    if timing.status == "ok"
                    else float("nan"),
                    "gflops": flops / median / 1e9 if timing.status == "ok" and median > 0 else float("nan"),
                    "first_call_ms": timing.first_s * 1e3,
                    "compile_s": max(0.0, timing.warm_max_s - median)
                    if provider in ("compiled", "torch_compile") and timing.status == "ok"
                    else float("nan"),
                    "note": timing.note
                    if moved_gb is None or timing.status != "ok"
                    else f"{moved_gb / median:.1f} GB/s of nominal traffic "
                    f"(after switch {moved_gb / timing.switch_median:.1f})",
                }
            )
            if timing.status == "ok":
                switch = rows[-1]["after_switch_speedup"]
                summary.append(
                    f"{provider} {median * 1e3:.3f} ms"
                    + (
                        f" ({speedup:.2f}x; after switch {switch:.2f}x)"
                        if not math.isnan(speedup) and provider != baseline
                        else ""
                    )
                )
            else:
                summary.append(f"{provider} {timing.status}")
        print(", ".join(summary), flush=True)
    flow_rows = []
    if flows:
        rounds = args.rounds or (workflows.full_rounds(flows) if args.full else 2)
        described = rounds if isinstance(rounds, int) else "/".join(str(n) for n in sorted(set(rounds.values()))[::-1])
        print(
            f"\nworkflows (fresh process per run, {described} rounds, providers rotated; "
            "round 1 with empty compile caches, reported apart; medians over the later rounds):",
            flush=True,
        )
        cache = os.path.join(args.out, "workflow-cache")
        shutil.rmtree(cache, ignore_errors=True)
        threads = args.threads or os.cpu_count() or 1
        flow_providers = [p for p in workflows.PROVIDERS if p in providers]
        flow_rows = workflows.measure_workflows(flows, flow_providers, rounds, threads, cache)
    cold_rows = []
    if args.full and not args.only and "coldstart" not in skip:
        print("\ncold start (fresh process per row; cold, then warm on-disk caches):", flush=True)
        cold_rows = coldstart.measure(args.threads or os.cpu_count() or 1)
    scale_rows = []
    if args.full and (not args.only or "scale" in args.only) and "scale" not in skip:
        print("\nscale (10⁶ and 10⁷ parameters; fresh process per row):", flush=True)
        scale_rows = scale.measure(scale.rows_for(), args.threads or os.cpu_count() or 1)
        scale.write(scale_rows, args.out, env)
    print()
    print(report.markdown(rows))
    if flow_rows:
        print()
        print(workflows.markdown(flow_rows))
    if cold_rows:
        print()
        print(coldstart.markdown(cold_rows))
    if scale_rows:
        print()
        print(scale.markdown(scale_rows))
    report.write(rows, env, args.out, flow_rows, cold_rows)
    print(f"\nwrote {args.out}/results.csv, results.json, speedups.png in {time.perf_counter() - started:.0f} s")
    print("FLOP counts are nominal (see each bench module's flops()); GFLOP/s = that count / median time.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
