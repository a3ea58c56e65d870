"""Run check functions in R gloo processes on this machine, once per group.

:func:`run_checks` spawns R processes (``torch.multiprocessing``, spawn
start method), joins them into one gloo group over the loopback interface
(``GLOO_SOCKET_IFNAME=lo``, rendezvous through a fresh file, so parallel runs
never share a port), and runs the named check functions of a module in order
in every process: ``check(rank, world) -> result``. After each check the ranks
exchange their status; once any rank fails, the remaining checks are skipped
(the ranks could be out of step). Every wait is bounded: the whole run by
``timeout`` seconds (stragglers are killed), each collective by
``gloo_timeout``.
"""

import datetime
import os
import queue
import tempfile
import time
import traceback
from typing import Dict, List

import pytest
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store: str, module: str, names: List[str], out, gloo_timeout: float) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ.setdefault("POSTERIORS_FAST_CACHE_DIR", "off")
    try:
        import importlib

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=gloo_timeout),
        )
        checks = importlib.import_module(module)
    except BaseException:
        out.put((rank, None, "error", traceback.format_exc()))
        return
    for name in names:
        try:
            result = getattr(checks, name)(rank, world)
            out.put((rank, name, "ok", result))
            ok = True
        except BaseException:
            out.put((rank, name, "error", traceback.format_exc()))
            ok = False
        try:
            statuses: list = [None] * world
            dist.all_gather_object(statuses, ok)
        except BaseException:
            out.put((rank, None, "error", "status exchange failed:\n" + traceback.format_exc()))
            return
        if not all(statuses):
            break
    try:
        dist.destroy_process_group()
    finally:
        out.put((rank, None, "done", None))


class Results:
    """Per-check outcomes of one :func:`run_checks` run."""

    def __init__(self, world: int, names: List[str]):
        self.world = world
        self.names = names
        self.outcomes: Dict[str, Dict[int, tuple]] = {name: {} for name in names}
        self.problems: List[str] = []

    def expect(self, name: str) -> list:
        """Fail with the workers' tracebacks unless ``name`` passed on every
        rank; returns the per-rank results."""
        got = self.outcomes[name]
        errors = [f"rank {r}:\n{payload}" for r, (status, payload) in sorted(got.items()) if status == "error"]
        missing = [r for r in range(self.world) if r not in got]
        if errors or missing:
            text = "\n".join(errors)
            if missing:
                text += f"\nno result from rank(s) {missing}"
            if self.problems:
                text += "\n" + "\n".join(self.problems)
            pytest.fail(f"{name} with {self.world} processes:\n{text}", pytrace=False)
        return [got[r][1] for r in range(self.world)]


def run_checks(module: str, names: List[str], world: int, timeout: float = 150.0, gloo_timeout: float = 30.0):
    """Run ``names`` of ``module`` on ``world`` gloo processes; see the module docstring."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    results = Results(world, names)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(r, world, store, module, names, out, gloo_timeout), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
        done: set = set()
        deadline = time.monotonic() + timeout
        while len(done) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                results.problems.append(
                    f"timed out after {timeout:.0f} s waiting for rank(s) {set(range(world)) - done}"
                )
                break
            try:
                rank, name, status, payload = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    results.problems.append(f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                    break
                continue
            if name is None:
                done.add(rank)
                if status == "error":
                    results.problems.append(f"rank {rank}: {payload}")
            else:
                results.outcomes[name][rank] = (status, payload)
        for p in procs:
            p.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join(5)
    return results
