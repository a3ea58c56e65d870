"""Timing: warm-up, providers interleaved round-robin in short bursts, medians
and p20/p80.

The machines are shared and noisy, so providers of one case are timed in
alternation (a spell of load hits all of them), the first call (which includes
compilation) is reported separately, and only same-run ratios are meaningful.

Each provider runs a short burst of consecutive calls per round. The calls
after the first measure the steady state of a loop (the way ``update`` and
``step`` are used, and what ``timeit`` or ``torch.utils.benchmark`` measure);
the first call of each burst runs right after another provider's call, with
caches full of that provider's data, and is reported apart ("after switch").
With one call per burst every call is of that kind.
"""

import importlib
import multiprocessing as mp
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

from benchmarks.config import REFERENCE_LIMIT_S, Case
from posteriors_fast.backends import compile_policy


@dataclass
class Timing:
    provider: str
    status: str = "ok"  # ok | unavailable | DNF | error
    first_s: float = float("nan")
    #: Slowest of the warm-up calls: compiled paths compile during one of them.
    warm_max_s: float = float("nan")
    #: Steady-state calls: every call of a burst but its first.
    samples: List[float] = field(default_factory=list)
    #: First call of each burst, right after another provider's calls.
    switch_samples: List[float] = field(default_factory=list)
    #: Consecutive calls per round (fewer for a slow case, see burst_size).
    burst: int = 0
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def switch_median(self) -> float:
        return statistics.median(self.switch_samples) if self.switch_samples else float("nan")

    def quantile(self, q: float) -> float:
        if len(self.samples) < 2:
            return self.median
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def bench_module(case: Case):
    return importlib.import_module(f"benchmarks.bench_{case.bench}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    """Seconds of one call. ``fn`` may be a pair ``(call, reset)``: ``reset``
    runs untimed first (benches of in-place steps restore their inputs)."""
    if isinstance(fn, tuple):
        fn, reset = fn
        reset()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _probe_child(case: Case, provider: str, device: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    try:
        fn = bench_module(case).setup(case, provider, device)
        queue.put(("ok", _timed(fn, device)))
    except Exception as err:
        queue.put(("error", f"{type(err).__name__}: {err}"[:160]))


def probe_reference(case: Case, device: str, limit: float = REFERENCE_LIMIT_S) -> Tuple[str, str]:
    """Run one reference call in a child process that is killed past ``limit``.

    Returns ``("ok", "")``, ``("DNF", why)`` or ``("error", message)``.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_probe_child, args=(case, "posteriors", device, torch.get_num_threads(), queue))
    start = time.perf_counter()
    child.start()
    child.join(limit + 10)  # + start-up and set-up of the child (~5 s measured)
    if child.is_alive():
        child.kill()
        child.join()
        return "DNF", f"reference did not finish in {limit:.0f} s (killed after {time.perf_counter() - start:.0f} s)"
    if queue.empty():
        return "error", f"reference probe exited with code {child.exitcode}"
    status, value = queue.get()
    if status == "error":
        return "error", value
    if value > limit:
        return "DNF", f"reference took {value:.0f} s > {limit:.0f} s"
    return "ok", ""


#: Consecutive calls per provider and round (``--burst``).
BURST = 4
#: Cases whose slowest provider takes longer than this per call run bursts of
#: two: their cost is not in cache effects, and the rounds stay affordable.
LONG_CALL_S = 0.05


def burst_size(requested: int, warm_s: List[float]) -> int:
    """Calls per burst: ``requested`` (1 keeps pure per-call alternation),
    capped at 2 when the slowest provider's warm call exceeds LONG_CALL_S."""
    if requested <= 1:
        return 1
    return min(requested, 2) if warm_s and max(warm_s) > LONG_CALL_S else requested


def _warm_calls() -> int:
    """Warm-up calls that take a compiled provider past its compile: the
    steady-state cases run with the compile policy's ``after`` mode (see
    ``benchmarks/__main__.py``); the workflow cases time the default policy."""
    policy = compile_policy.get_compile_policy()
    return policy.after if policy.mode == "after" else 1


def measure(
    case: Case,
    providers,
    device: str,
    budget_s: float,
    min_reps: int = 3,
    max_reps: int = 30,
    warmup: int | None = None,
    burst: int = BURST,
) -> Dict[str, Timing]:
    """Time every available provider of ``case``, interleaved round-robin, a
    burst of consecutive calls per provider and round (see the module
    docstring; ``burst=1``: one call each).

    ``warmup`` calls follow the first one untimed; by default enough for the
    library's tiered compile to have compiled (it compiles on the
    policy's ``after``-th call with the same function and shapes), and one for
    the reference. ``min_reps`` and ``max_reps`` count rounds.
    """
    module = bench_module(case)
    timings: Dict[str, Timing] = {}
    fns: Dict[str, Callable] = {}
    last_warm: Dict[str, float] = {}
    for provider in providers:
        timing = timings[provider] = Timing(provider)
        if provider == "posteriors" and getattr(module, "probe_reference", lambda c: False)(case):
            status, why = probe_reference(case, device)
            if status != "ok":
                timing.status, timing.note = status, why
                continue
        try:
            fn = module.setup(case, provider, device)
        except ImportError as err:
            timing.status, timing.note = "unavailable", str(err)
            continue
        if fn is None:
            timing.status, timing.note = "unavailable", "not applicable"
            continue
        try:
            timing.first_s = _timed(fn, device)
            if provider == "posteriors" and timing.first_s > REFERENCE_LIMIT_S:
                timing.status, timing.note = "DNF", f"reference took {timing.first_s:.0f} s > {REFERENCE_LIMIT_S:.0f} s"
                continue
            warm = warmup if warmup is not None else 1 if provider == "posteriors" else _warm_calls()
            warm_calls = [_timed(fn, device) for _ in range(warm)]
            timing.warm_max_s = max([timing.first_s] + warm_calls)
            last_warm[provider] = warm_calls[-1] if warm_calls else timing.first_s
        except Exception as err:  # a failing provider is reported, not fatal
            timing.status, timing.note = "error", f"{type(err).__name__}: {err}"[:160]
            continue
        fns[provider] = fn

    order = list(fns)
    calls = burst_size(burst, [last_warm[p] for p in order])
    for provider in order:
        timings[provider].burst = calls
    spent, reps = 0.0, 0
    while order and reps < max_reps and (reps < min_reps or spent < budget_s):
        for provider in order[reps % len(order) :] + order[: reps % len(order)]:
            timing = timings[provider]
            try:
                times = [_timed(fns[provider], device) for _ in range(calls)]
            except Exception as err:
                timing.status = "error"
                timing.note = f"{type(err).__name__}: {err}"[:160]
                order.remove(provider)
                continue
            timing.switch_samples.append(times[0])
            timing.samples.extend(times[1:] if calls > 1 else times)
            spent += sum(times)
        reps += 1
    return timings
