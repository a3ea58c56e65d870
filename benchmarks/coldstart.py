"""What a new process pays with ``backend="compiled"``: imports, the first
call, and the time until calls run at the compiled steady state, with cold
and with warm on-disk caches (torch inductor's FX graph and AOT autograd
caches).

Each row is a fresh Python process running ``CALLS`` updates of one method on
the suite's S model (tanh MLP, P = 1045, N = 64), timing every call, under
two compile policies:

* ``always``: compile on the first call, the raw cost of a compile;
* ``auto``: the default ski-rental rule, what a user's run gets. Its
  compile-cost estimates come from the ``always`` process just before it
  (one cost file per method, shared by both policies), as a user's second
  process would find them; ``auto`` compiles only once the eager time spent
  reaches that estimate, so a run of ``CALLS`` calls shorter than one compile
  stays eager by design (``compiles`` 0, and its last-quarter time per call
  is the eager speed).

and two states of inductor's caches (one directory per policy):

* ``cold``: empty;
* ``warm``: what the cold process of the same policy left.

``python -m benchmarks.coldstart`` prints the table; ``python -m benchmarks
--full`` includes it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

CALLS = 400
METHODS = ("ekf.dense_fisher", "sgmcmc.sghmc")
POLICIES = ("always", "auto")


def _child(method: str, policy: str, threads: int, launched: float) -> Dict:
    """``launched``: the parent's ``time.time()`` when it started this process,
    so that the import time includes the interpreter's start."""
    import torch

    torch_s = time.time() - launched
    import posteriors_fast as pf
    from posteriors_fast.backends import compile_policy

    import_s = time.time() - launched
    torch.set_num_threads(threads)
    pf.set_backend("compiled")
    compile_policy.set_compile_policy(policy)
    # The estimates this process starts from: the median measured cost per
    # kind of graph in the (shared) cost file, none for a new one.
    book = compile_policy.BOOK
    book.estimate("", "")  # loads the file
    estimates = {kind: statistics.median(costs) for kind, costs in sorted(book.kinds.items()) if costs}
    from benchmarks import workloads

    params, batch = workloads.mlp_params("S"), workloads.batch("S", 64)
    if method == "ekf.dense_fisher":
        transform = pf.ekf.dense_fisher.build(workloads.log_likelihood, lr=1e-3)
    else:
        transform = pf.sgmcmc.sghmc.build(workloads.log_likelihood, lr=1e-3)
    state = transform.init(params)
    times: List[float] = []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        state = transform.update(state, batch)
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times[-CALLS // 4 :])
    slow = [i for i, t in enumerate(times) if t > 2 * steady]
    reached = slow[-1] + 1 if slow else 0  # calls before the steady state
    stats = compile_policy.stats()
    return {
        "method": method,
        "policy": policy,
        "torch_import_s": torch_s,
        "import_s": import_s,
        "first_call_ms": times[0] * 1e3,
        "steady_ms": steady * 1e3,
        "to_steady_s": import_s + sum(times[:reached]),
        "to_steady_calls": reached,
        "total_s": import_s + sum(times),
        "compiles": stats["compiles"],
        "compile_s": stats["compile_s"],
        "estimates_s": estimates,
    }


def measure(threads: int, log=print) -> List[Dict]:
    """Per method: ``always`` then ``auto``, cold then warm, each in a fresh
    process; the two policies share one compile-cost file, each has its own
    inductor cache directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for method in METHODS:
        with tempfile.TemporaryDirectory() as cache:
            for cache_state in ("cold", "warm"):
                for policy in POLICIES:
                    env = dict(
                        os.environ,
                        TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, f"inductor-{policy}"),
                        POSTERIORS_FAST_CACHE_DIR=os.path.join(cache, "posteriors_fast"),
                    )
                    env.pop("POSTERIORS_FAST_COMPILE_AFTER", None)
                    command = [sys.executable, "-m", "benchmarks.coldstart", "--child", method, policy, str(threads)]
                    command.append(repr(time.time()))
                    done = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=600)
                    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
                    if done.returncode != 0 or not lines:
                        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                        row = {"method": method, "policy": policy, "error": tail[:200]}
                    else:
                        row = json.loads(lines[-1])
                    row["cache"] = cache_state
                    rows.append(row)
                    log(_line(row))
    order = {(p, c): i for i, (p, c) in enumerate((p, c) for p in POLICIES for c in ("cold", "warm"))}
    return sorted(rows, key=lambda r: (METHODS.index(r["method"]), order[(r["policy"], r["cache"])]))


def _estimate(row: Dict) -> str:
    """What the process's first compile was estimated to cost when it
    started: the largest per-kind estimate (the graph that gates its
    compile) plus the imports of dynamo and inductor, or the default when it
    knew no graph."""
    from posteriors_fast.backends.compile_policy import IMPORTS_KIND  # not at import: the child times its imports

    estimates = row.get("estimates_s")
    if estimates is None:
        return "—"
    graphs = {k: v for k, v in estimates.items() if k != IMPORTS_KIND}
    if not graphs:
        return "none (5.0 default)"
    return f"{max(graphs.values()) + estimates.get(IMPORTS_KIND, 0.0):.1f}"


def _line(row: Dict) -> str:
    if "error" in row:
        return f"{row['method']} {row['policy']} {row['cache']}: error {row['error']}"
    return (
        f"{row['method']} policy={row['policy']} {row['cache']} cache: start and imports {row['import_s']:.2f} s, "
        f"first call {row['first_call_ms']:.0f} ms, steady {row['steady_ms']:.2f} ms/call reached after "
        f"{row['to_steady_s']:.2f} s ({row['to_steady_calls']} calls), {row['compiles']} compiles "
        f"({row['compile_s']:.2f} s; estimate at start {_estimate(row)} s), {CALLS} calls in {row['total_s']:.2f} s"
    )


def markdown(rows: List[Dict]) -> str:
    """The table, with a note on what each column measures."""
    lines = [
        f"| method | policy | inductor cache | start + imports s | first call ms | last-quarter ms/call "
        f"| to that speed s (calls) | compile estimate at start s | compiles (s) | {CALLS} calls s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['policy']} | {row['cache']} | error: {row['error']} |||||||")
            continue
        lines.append(
            f"| {row['method']} | {row['policy']} | {row['cache']} | {row['import_s']:.2f} | "
            f"{row['first_call_ms']:.0f} | {row['steady_ms']:.2f} | {row['to_steady_s']:.2f} "
            f"({row['to_steady_calls']}) | {_estimate(row)} | {row['compiles']} ({row['compile_s']:.2f}) | "
            f"{row['total_s']:.2f} |"
        )
    lines += [
        "",
        f"Each row: one fresh process, {CALLS} updates. *last-quarter ms/call*: the median of the last "
        f"{CALLS // 4} calls (the compiled speed once a compile happened, else the eager speed); *to that "
        "speed*: start, imports and the calls until none is slower than twice it. `always` compiles on the "
        "first call; `auto` starts from the compile costs the `always` process of the same method measured "
        "(one cost file, shared) and compiles once its eager time reaches them, so a run shorter than a "
        "compile stays eager (0 compiles) by design.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.coldstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", nargs=4, metavar=("METHOD", "POLICY", "THREADS", "LAUNCHED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        method, policy, threads, launched = args.child
        print(json.dumps(_child(method, policy, int(threads), float(launched))))
        return 0
    rows = measure(args.threads or os.cpu_count() or 1)
    print()
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
