"""``python -m benchmarks.distributed --procs R``: the suite's dense and
diagonal workloads on R processes (gloo on this machine, spawned here).

Each case splits one global batch of N samples evenly over the ranks and
times ``update`` on every rank (a barrier before each step; the slowest rank
bounds a step), next to one process on the whole batch with the same
threads per process. It reports, per step: time; time inside collectives
(waiting for the slowest rank included); the same collectives replayed
alone, against the prediction of a latency/bandwidth calibration of this
group (calls·latency + bytes/bandwidth); bytes received per rank on the wire
(ring model, see ``posteriors_fast.distributed.CommStats``) and their ratio
to the state size. For the sharded dense states it also times the first
``sample(100)`` after an update (the distributed factor) and a second one.
Results: a markdown table on stdout, JSON and CSV in ``--out``.
"""

import argparse
import csv
import datetime
import json
import os
import queue
import statistics
import tempfile
import time
from typing import Dict, List

import torch.multiprocessing as mp

#: (method, mode, model, global N): the dense and diagonal workloads of benchmarks/config.py.
CASES = [
    ("ekf.dense_fisher", "data", "S", 64),
    ("ekf.dense_fisher", "sharded", "S", 64),
    ("ekf.dense_fisher", "data", "M", 64),
    ("ekf.dense_fisher", "sharded", "M", 64),
    ("laplace.dense_fisher", "data", "S", 64),
    ("laplace.dense_fisher", "sharded", "S", 64),
    ("laplace.dense_fisher", "data", "M", 256),
    ("laplace.dense_fisher", "sharded", "M", 256),
    ("ekf.diag_fisher", "data", "M", 256),
    ("laplace.diag_ggn", "data", "S", 256),
    ("laplace.diag_ggn", "data", "M", 256),
]
QUICK = {("ekf.dense_fisher", "data", "S"), ("ekf.dense_fisher", "sharded", "S"), ("laplace.diag_ggn", "data", "S")}


def _args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2, help="processes R (gloo, this machine)")
    parser.add_argument("--steps", type=int, default=10, help="timed updates per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="compiled")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quick", action="store_true", help="three small cases (the smoke test)")
    parser.add_argument("--only", default=None, help="cases whose method contains this text")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    return parser.parse_args(argv)


def _build(pf, method, group, backend):
    from benchmarks.workloads import forward, log_likelihood

    if method == "ekf.dense_fisher":
        return pf.ekf.dense_fisher.build(log_likelihood, 1e-3, init_cov=1e-2, backend=backend, process_group=group)
    if method == "ekf.diag_fisher":
        return pf.ekf.diag_fisher.build(log_likelihood, 1e-3, init_sds=0.1, backend=backend, process_group=group)
    if method == "laplace.dense_fisher":
        return pf.laplace.dense_fisher.build(log_likelihood, init_prec=1.0, backend=backend, process_group=group)
    if method == "laplace.diag_ggn":
        import torch

        def fwd(params, batch):
            return forward(params, batch[0]), torch.tensor([])

        def outer(z, batch):
            return -torch.nn.functional.cross_entropy(z, batch[1], reduction="sum")

        return pf.laplace.diag_ggn.build(fwd, outer, init_prec_diag=1.0, backend=backend, process_group=group)
    raise ValueError(method)


def _state_bytes(method: str, p: int, itemsize: int) -> int:
    """The whole state of one process: the P×P matrix and the mean, or the
    mean and one P-vector."""
    return (p * p + p) * itemsize if "dense" in method else 2 * p * itemsize


def _calibrate(group, torch) -> Dict[str, float]:
    """Latency (an all-reduce of one value) and bandwidth (wire bytes of an
    all-reduce of 32 MB per second) of this group."""
    small, big = torch.zeros(1), torch.zeros(8 << 20)
    times = []
    for _ in range(30):
        start = time.perf_counter()
        group.all_reduce_(small)
        times.append(time.perf_counter() - start)
    latency = statistics.median(times[5:])
    times = []
    for _ in range(4):
        start = time.perf_counter()
        group.all_reduce_(big)
        times.append(time.perf_counter() - start)
    wire = 2 * (group.size - 1) / group.size * big.numel() * 4
    return {"latency_s": latency, "bandwidth_Bps": wire / statistics.median(times[1:]) if wire else float("inf")}


def _replay(group, by_op, torch, dist, reps: int = 5) -> float:
    """Seconds for the collectives of one step alone (same ops, calls and
    sizes, no compute in between, so no rank waits for a slower one): what
    the latency/bandwidth model should predict."""
    plan = []
    for op, (calls, payload, _) in by_op.items():
        if op == "all_gather_object" or calls == 0:
            continue
        per_call = payload // calls // (group.size if op == "all_gather" else 1)
        plan.append((op, calls, torch.zeros(max(1, per_call // 4))))
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        for op, calls, buf in plan:
            for _ in range(calls):
                if op == "all_reduce":
                    group.all_reduce_(buf)
                elif op == "all_gather":
                    group.all_gather(buf)
                elif op == "broadcast":
                    group.broadcast_(buf, 0)
                elif op == "reduce":
                    group.reduce_(buf, 0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank, world, store, cases, opts, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("POSTERIORS_FAST_CACHE_DIR", "off")
    import torch
    import torch.distributed as dist

    import posteriors_fast as pf
    from benchmarks.workloads import batch, mlp_params, num_params
    from posteriors_fast import distributed as pfd
    from posteriors_fast.backends import compile_policy

    torch.set_num_threads(opts["threads"])
    compile_policy.set_compile_policy("never")  # user-code graphs stay eager: no compile time in the steps
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    try:
        calibration = _calibrate(pfd.data_parallel(), torch)
        for method, mode, model, n in cases:
            p = num_params(model)
            params = mlp_params(model)
            x, y = batch(model, n)
            a, b = rank * n // world, (rank + 1) * n // world
            group = pfd.sharded() if mode == "sharded" else pfd.data_parallel()
            transform = _build(pf, method, group, opts["backend"])
            state = transform.init(params)
            steps, comm, stats = [], [], []
            for step in range(opts["warmup"] + opts["steps"]):
                dist.barrier()
                before = group.stats.snapshot()
                start = time.perf_counter()
                state = transform.update(state, (x[a:b], y[a:b]), inplace="dense" in method)
                elapsed = time.perf_counter() - start
                after = group.stats.snapshot()
                if step >= opts["warmup"]:
                    steps.append(elapsed)
                    comm.append(after["seconds"] - before["seconds"])
                    stats.append({k: after[k] - before[k] for k in ("calls", "wire_bytes", "payload_bytes")})
                    by_op = {
                        op: tuple(x - y for x, y in zip(v, before["by_op"].get(op, (0, 0, 0))))
                        for op, v in after["by_op"].items()
                    }
            row = {
                "method": method,
                "mode": mode,
                "model": model,
                "P": p,
                "N": n,
                "R": world,
                "rank": rank,
                "update_ms": 1e3 * statistics.median(steps),
                "comm_ms": 1e3 * statistics.median(comm),
                "calls": stats[-1]["calls"],
                "wire_bytes": stats[-1]["wire_bytes"],
                "payload_bytes": stats[-1]["payload_bytes"],
                "state_bytes": _state_bytes(method, p, 4),
                "replay_ms": 1e3 * _replay(group, by_op, torch, dist),
                "latency_s": calibration["latency_s"],
                "bandwidth_Bps": calibration["bandwidth_Bps"],
            }
            if mode == "sharded":
                module = pf.ekf.dense_fisher if method.startswith("ekf") else pf.laplace.dense_fisher
                for label in ("sample_first_ms", "sample_cached_ms"):
                    dist.barrier()
                    before = group.stats.snapshot()
                    start = time.perf_counter()
                    module.sample(state, (100,))
                    row[label] = 1e3 * (time.perf_counter() - start)
                    row[label.replace("_ms", "_wire_bytes")] = (
                        group.stats.snapshot()["wire_bytes"] - before["wire_bytes"]
                    )
            # One process on the whole batch, same threads (rank 0; the others wait).
            dist.barrier()
            if rank == 0:
                single = _build(pf, method, None, opts["backend"])
                one = single.init(mlp_params(model))
                times = []
                for step in range(opts["warmup"] + opts["steps"]):
                    start = time.perf_counter()
                    one = single.update(one, (x, y), inplace="dense" in method)
                    if step >= opts["warmup"]:
                        times.append(time.perf_counter() - start)
                row["one_process_ms"] = 1e3 * statistics.median(times)
            dist.barrier()
            out.put(("row", row))
    except BaseException as err:  # reported by the parent
        import traceback

        out.put(("error", f"rank {rank}: {err}\n{traceback.format_exc()}"))
    finally:
        out.put(("done", rank))
        dist.destroy_process_group()


def run(opts) -> List[Dict]:
    cases = [c for c in CASES if not opts.quick or c[:3] in QUICK]
    if opts.only:
        cases = [c for c in cases if any(term in c[0] for term in opts.only.split(","))]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    settings = {"steps": opts.steps, "warmup": opts.warmup, "backend": opts.backend, "threads": opts.threads}
    rows: List[Dict] = []
    errors: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, opts.procs, store, cases, settings, out), daemon=True)
            for r in range(opts.procs)
        ]
        for proc in procs:
            proc.start()
        done, deadline = set(), time.monotonic() + opts.timeout
        while len(done) < opts.procs and time.monotonic() < deadline:
            try:
                kind, payload = out.get(timeout=1.0)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    errors.append("a worker died")
                    break
                continue
            if kind == "row":
                rows.append(payload)
            elif kind == "error":
                errors.append(payload)
            else:
                done.add(payload)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    if errors or len(done) < opts.procs:
        raise RuntimeError("distributed benchmark failed:\n" + "\n".join(errors or ["timed out"]))
    return _merge(rows)


def _merge(rows: List[Dict]) -> List[Dict]:
    """One row per case: the slowest rank's times, rank 0's bytes and baseline."""
    merged: Dict[tuple, Dict] = {}
    for row in rows:
        key = (row["method"], row["mode"], row["model"], row["N"])
        if key not in merged:
            merged[key] = dict(row)
        else:
            for field in ("update_ms", "comm_ms", "replay_ms", "sample_first_ms", "sample_cached_ms"):
                if field in row:
                    merged[key][field] = max(merged[key][field], row[field])
            if row["rank"] == 0:
                merged[key]["one_process_ms"] = row["one_process_ms"]
    out = []
    for row in merged.values():
        row.pop("rank", None)
        row["wire_over_state"] = row["wire_bytes"] / row["state_bytes"]
        row["comm_model_ms"] = 1e3 * (row["calls"] * row["latency_s"] + row["wire_bytes"] / row["bandwidth_Bps"])
        out.append(row)
    return out


def markdown(rows: List[Dict]) -> str:
    head = (
        "| method | mode | P | N | R | update ms (R procs) | update ms (1 proc) | in collectives ms "
        "| collectives alone ms (model) | wire KB/step | state MB | wire / state | sample(100) ms first / cached |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        sample = f"{r['sample_first_ms']:.1f} / {r['sample_cached_ms']:.1f}" if "sample_first_ms" in r else ""
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['P']} | {r['N']} | {r['R']} | {r['update_ms']:.2f} | "
            f"{r.get('one_process_ms', float('nan')):.2f} | {r['comm_ms']:.2f} | "
            f"{r['replay_ms']:.2f} ({r['comm_model_ms']:.2f}) | "
            f"{r['wire_bytes'] / 1e3:.1f} | {r['state_bytes'] / 1e6:.2f} | {r['wire_over_state']:.2e} | {sample} |"
        )
    return head + "\n".join(lines)


def main(argv=None) -> List[Dict]:
    opts = _args(argv)
    rows = run(opts)
    print(markdown(rows))
    if rows:
        r = rows[0]
        print(
            f"\ncalibration (R = {opts.procs}): latency {1e6 * r['latency_s']:.0f} µs per collective, "
            f"bandwidth {r['bandwidth_Bps'] / 1e9:.2f} GB/s received per rank"
        )
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, f"distributed_R{opts.procs}")
    with open(stem + ".json", "w") as f:
        json.dump({"rows": rows, "options": vars(opts)}, f, indent=1)
    with open(stem + ".csv", "w", newline="") as f:
        fields = sorted({k for r in rows for k in r})
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
