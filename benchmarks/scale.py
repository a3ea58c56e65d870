"""``python -m benchmarks.scale``: the methods at 10⁶–10⁷ parameters.

Three model families (``benchmarks/models.py``: a tanh MLP, a small CNN on
32×32×3 images, a small causal transformer LM), each at P ≈ 10⁶ and 10⁷.
Every row runs in a fresh Python process: one warm-up call, then timed calls
(median), then one call while a thread samples the resident set size
(/proc/self/statm, every 2 ms) with glibc's mmap threshold fixed
(``mallopt``) so that freed blocks leave the RSS (docs/environment.md);
``peak_mb`` is the highest RSS during that call less the RSS just before it,
i.e. what one step holds beyond the model, the batch and the state it
started from.

Besides the methods, two rows time the parts no diagonal-plus-low-rank method
can skip: ``jacobian`` (the per-sample Jacobian of the batch, built within the
Jacobian memory budget and discarded) and ``gram`` (one Gram product of a
(P, N + rank) panel, 2·P·(N+rank)² FLOPs). Each method row reports its time
over ``jacobian`` (``x_jac``); the low-rank EKF rows also over
``jacobian + gram`` (``x_jac_gram``); the rows that posteriors 0.0.5 can run
(its diagonal methods, at P ≈ 10⁶) its time over ours (``x_ref``).

These rows are in ``python -m benchmarks --full`` (the ``scale`` group), not
in the default run.
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

#: (model, N) pairs, rank of the low-rank methods, and the ops per pair.
RANK = 20
SETTINGS = [
    ("mlp-1M", 64),
    ("cnn-1M", 64),
    ("transformer-1M", 64),
    ("mlp-10M", 64),
    ("cnn-10M", 64),
    ("transformer-10M", 64),
]
#: The memory test of the issue: P = 10⁷, N = 256, diagonal methods.
LARGE_BATCH = [("mlp-10M", 256, "ekf.diag_fisher"), ("mlp-10M", 256, "laplace.diag_fisher")]

METHODS = (
    "jacobian",
    "gram",
    "ekf.diag_fisher",
    "laplace.diag_fisher",
    "laplace.diag_ggn",
    "sgmcmc.sghmc",
    "ekf.lowrank_fisher",
    "laplace.lowrank_fisher",
    "laplace.lowrank_ggn",
)
#: Methods also run with backend="compiled", whose native kernels differ
#: from eager torch at this size (the low-rank fold, ops.lowrank_truncate).
COMPILED = ("ekf.lowrank_fisher", "laplace.lowrank_fisher", "laplace.lowrank_ggn")
#: Methods posteriors 0.0.5 has, run at P ≈ 10⁶ only.
REFERENCE = ("ekf.diag_fisher", "laplace.diag_fisher", "laplace.diag_ggn")
#: The GGN of a language model has N·T·vocab output rows (2·10⁶ at N = 64):
#: not a workload for a GGN method.
NO_GGN = ("transformer",)
ROW_TIMEOUT_S = 900


@dataclass
class Row:
    op: str
    model: str
    provider: str
    n: int
    rank: int = RANK


def rows_for(sizes=("1M", "10M"), large_batch=True, reference=True):
    out = []
    for model, n in SETTINGS:
        if model.split("-")[1] not in sizes:
            continue
        for op in METHODS:
            if "ggn" in op and model.split("-")[0] in NO_GGN:
                continue
            out.append(Row(op, model, "eager", n))
            if op in COMPILED:
                out.append(Row(op, model, "compiled", n))
        if reference and model.endswith("-1M"):
            for op in REFERENCE:
                if "ggn" in op and model.split("-")[0] in NO_GGN:
                    continue
                out.append(Row(op, model, "posteriors", n))
    if large_batch and "10M" in sizes:
        out += [Row(op, model, "eager", n) for model, n, op in LARGE_BATCH]
    return out


# --------------------------------------------------------------------------
# The child: one row.


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakSampler(threading.Thread):
    def __init__(self, period=0.002):
        super().__init__(daemon=True)
        self.period, self.peak, self._halt = period, _rss_bytes(), threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period)

    def stop(self):
        self._halt.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def _step(row: Row, model):
    """A closure running one call of the row's op."""
    import torch

    params, batch = model.params, model.make_batch(row.n)
    if row.provider == "posteriors":
        import optree

        sys.modules.setdefault("optree.integration", optree.integrations)
        sys.modules.setdefault("optree.integration.torch", optree.integrations.torch)
        import posteriors as lib

        extra = {}
    else:
        import posteriors_fast as lib

        extra = {"backend": row.provider}
    if row.op == "jacobian":
        from posteriors_fast._internal.jacobian_chunks import LogDensityChunks

        def step():
            for _ in LogDensityChunks(
                model.log_likelihood, params, batch, per_sample=False, what="log_likelihood", backend=row.provider
            ):
                pass

        return step
    if row.op == "gram":
        panel = torch.randn(model.size, row.n + row.rank)
        return lambda: panel.T @ panel
    if row.op == "sgmcmc.sghmc":
        transform = lib.sgmcmc.sghmc.build(model.log_likelihood, lr=1e-6, **extra)
    elif row.op == "ekf.diag_fisher":
        transform = lib.ekf.diag_fisher.build(model.log_likelihood, lr=1e-3, **extra)
    elif row.op == "laplace.diag_fisher":
        transform = lib.laplace.diag_fisher.build(model.log_likelihood, **extra)
    elif row.op == "laplace.diag_ggn":
        transform = lib.laplace.diag_ggn.build(model.ggn_forward, model.outer_log_likelihood, **extra)
    elif row.op == "ekf.lowrank_fisher":
        transform = lib.ekf.lowrank_fisher.build(model.log_likelihood, lr=1e-3, rank=row.rank, **extra)
    elif row.op == "laplace.lowrank_fisher":
        transform = lib.laplace.lowrank_fisher.build(model.log_likelihood, rank=row.rank, **extra)
    elif row.op == "laplace.lowrank_ggn":
        transform = lib.laplace.lowrank_ggn.build(model.ggn_forward, model.outer_log_likelihood, rank=row.rank, **extra)
    else:
        raise ValueError(f"unknown op {row.op!r}")
    state = transform.init(params)
    return lambda: transform.update(state, batch)


def run_row(row: Row, budget_s: float = 20.0, max_reps: int = 5, min_reps: int = 3) -> dict:
    """Time one row in this process (the child's job)."""
    import torch

    from benchmarks import models

    torch.manual_seed(0)
    model = models.build(row.model)
    out = {**asdict(row), "P": model.size, "status": "ok"}
    with torch.no_grad() if row.op in ("gram",) else _nothing():
        try:
            step = _step(row, model)
        except AttributeError as exc:  # a method this checkout does not have
            return {**out, "status": f"missing: {exc}"}
        started = time.perf_counter()
        step()
        out["first_ms"] = (time.perf_counter() - started) * 1e3
        times, spent = [], 0.0
        while len(times) < min_reps or (spent < budget_s and len(times) < max_reps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
            spent += times[-1]
        # Memory: one more call with glibc's mmap threshold fixed, so that
        # freed blocks leave the RSS (timing with it would add page faults
        # on every large allocation that the default allocator avoids).
        out["mmap_threshold_fixed"] = _fix_mmap_threshold()
        base = _rss_bytes()
        sampler = _PeakSampler()
        sampler.start()
        step()
        peak = sampler.stop()
    times.sort()
    out["median_ms"] = times[len(times) // 2] * 1e3
    out["reps"] = len(times)
    out["peak_mb"] = (peak - base) / 2**20
    out["rss_mb"] = peak / 2**20
    return out


def _fix_mmap_threshold(size: int = 65536) -> bool:
    """``mallopt(M_MMAP_THRESHOLD, size)`` in this process (glibc only)."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, size))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------
# The parent: a fresh process per row, the ratios, the report.


def measure(rows, threads: int, log=print, budget_s: float = 20.0, min_reps: int = 3):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    results = []
    for index, row in enumerate(rows, 1):
        log(f"[{index}/{len(rows)}] {row.op} ({row.provider}) {row.model} N={row.n} ...", end=" ", flush=True)
        cmd = [sys.executable, "-m", "benchmarks.scale", "--child", json.dumps(asdict(row))]
        cmd += ["--budget", str(budget_s), "--reps", str(min_reps)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=ROW_TIMEOUT_S, cwd=root)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode != 0 or not lines:
                tail = (run.stderr.strip().splitlines() or ["no output"])[-1]
                result = {**asdict(row), "status": f"failed (exit {run.returncode}): {tail[:160]}"}
            else:
                result = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            result = {**asdict(row), "status": f"did not finish in {ROW_TIMEOUT_S} s"}
        results.append(result)
        if result["status"] == "ok":
            log(f"P={result['P']:,} {result['median_ms']:.1f} ms, peak +{result['peak_mb']:.0f} MB", flush=True)
        else:
            log(result["status"], flush=True)
    _ratios(results)
    return results


def _ratios(results):
    def find(op, model, n, provider="eager"):
        for r in results:
            if (r["op"], r["model"], r["n"], r["provider"]) == (op, model, n, provider) and r["status"] == "ok":
                return r["median_ms"]
        return math.nan

    for r in results:
        r.setdefault("median_ms", math.nan)
        jac = find("jacobian", r["model"], r["n"])
        gram = find("gram", r["model"], r["n"])
        r["x_jac"] = r["median_ms"] / jac
        r["x_jac_gram"] = r["median_ms"] / (jac + gram) if "lowrank" in r["op"] else math.nan
        if r["provider"] == "eager" and r["op"] in REFERENCE:
            r["x_ref"] = find(r["op"], r["model"], r["n"], "posteriors") / r["median_ms"]
        else:
            r["x_ref"] = math.nan


def _fmt(value, spec):
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(results) -> str:
    lines = [
        "| op | provider | model | P | N | time/step (ms) | peak (MB) | × jacobian "
        "| × (jacobian + gram) | reference / ours |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['op']} | {r['provider']} | {r['model']} | | {r['n']} | {r['status']} | | | | |")
            continue
        lines.append(
            f"| {r['op']} | {r['provider']} | {r['model']} | {r['P']:,} | {r['n']} | {r['median_ms']:.1f} | "
            f"{r['peak_mb']:.0f} | {_fmt(r['x_jac'], '.2f')} | {_fmt(r['x_jac_gram'], '.2f')} | "
            f"{_fmt(r['x_ref'], '.2f')} |"
        )
    return "\n".join(lines)


def write(results, out_dir: str, env: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    keys = sorted({k for r in results for k in r})
    with open(os.path.join(out_dir, "scale.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results)
    with open(os.path.join(out_dir, "scale.json"), "w") as f:
        json.dump({"environment": env, "rows": results}, f, indent=1, default=str)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M", help="which model sizes: 1M, 10M or both (comma-separated)")
    parser.add_argument("--only", default=None, help="run only rows whose op or model contains this text (comma: any)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed calls per row (at least 3)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--reps", type=int, default=3, help="timed calls per row at least (after one warm-up)")
    parser.add_argument("--skip", default=None, help="leave out rows whose op or model contains this text (comma: any)")
    parser.add_argument("--no-reference", action="store_true", help="skip the posteriors 0.0.5 rows")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_row(Row(**json.loads(args.child)), budget_s=args.budget, min_reps=args.reps)))
        return 0
    from benchmarks import models, report

    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    rows = rows_for(sizes, reference=not args.no_reference)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        keep = [r for r in rows if any(w in r.op or w in r.model for w in wanted)]
        # The ratios need their denominators.
        pairs = {(r.model, r.n) for r in keep}
        rows = [r for r in rows if r in keep or (r.op in ("jacobian", "gram") and (r.model, r.n) in pairs)]
    if args.skip:
        unwanted = [w.strip() for w in args.skip.split(",") if w.strip()]
        rows = [r for r in rows if not any(w in r.op or w in r.model for w in unwanted)]
    threads = args.threads or os.cpu_count() or 1
    env = report.environment("cpu")
    print(
        f"posteriors_fast scale benchmarks: torch {env['torch']}, {threads} threads, commit {env['commit'][:10]}, "
        f"rank {RANK}, Jacobian budget {os.environ.get('POSTERIORS_FAST_JACOBIAN_MB', '1024')} MiB"
    )
    for name, (family, shape) in models.SHAPES.items():
        if name.split("-")[1] in sizes:
            print(f"  {name}: {family} {shape}, P = {models.num_params(name):,}")
    results = measure(rows, threads, budget_s=args.budget, min_reps=args.reps)
    print()
    print(markdown(results))
    write(results, args.out, env)
    print(f"\nwrote {args.out}/scale.csv, scale.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
