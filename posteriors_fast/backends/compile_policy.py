"""When ``backend="compiled"`` compiles a computation with ``torch.compile``.

Graphs that run the user's own function (per-sample Jacobians, the samplers'
gradients) are milliseconds of small kernels whose cost is framework
overhead, which ``torch.compile`` removes, but compiling one costs seconds. A
run of a few hundred calls never earns that back; a long run does. So the
default policy, ``"auto"``, is the ski-rental rule: a computation runs
eagerly, and the time it spends is added up per (user function, input
signature), until that time reaches ``budget`` times the estimated cost of
compiling it; then it is compiled. Whatever the length of the run, the time
spent compiling is then at most about ``1/budget`` times the eager time
already spent (plus the compiled calls, which are faster), so no run is more
than about ``1 + 1/budget`` times slower than eager because of compilation
(twice, for the default ``budget=1``), while long runs reach the compiled
steady state.

The estimate of a compile's cost comes from the compiles measured before:
the last cost of the same graph (same kind, same function code, same
signature; a warm on-disk inductor cache makes it cheaper), else the median
of the kind's, else :data:`DEFAULT_COMPILE_S`. Estimates are kept in
``compile_costs.json`` in the cache directory (``POSTERIORS_FAST_CACHE_DIR``,
default ``~/.cache/posteriors_fast``; ``off`` keeps them in memory only), so
a new process starts from what earlier ones measured; a graph whose compile
failed is remembered there too and not compiled again with the same torch.

The policy is a knob (:func:`set_compile_policy`, or the environment):

* ``POSTERIORS_FAST_COMPILE``: ``auto`` (default), ``never`` (eager for these
  graphs; the native kernels still run) or ``always`` (compile on first call);
* ``POSTERIORS_FAST_COMPILE_BUDGET``: the ``budget`` of ``auto`` (default 1.0;
  larger compiles later, so the bound tightens to ``1 + 1/budget``);
* ``POSTERIORS_FAST_COMPILE_AFTER=n``: compile on the n-th call instead.

Each (function, signature) gets its own, separately named copy of the
computation's code object, compiled static (``dynamic=False``) for its
shapes, batch size included: dynamo's caches hold one entry per copy (no
shared recompilation limit, no guard chain that grows with the number of
functions), a new batch size earns its own compile by the same rule (the
ragged last batch of an epoch stays eager), and a function rebuilt on every
call (a fresh lambda) never accrues anything. A failed compile is logged once
and that entry runs eagerly from then on. Nothing is compiled at import.
"""

import hashlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
from optree import tree_flatten, tree_leaves

logger = logging.getLogger("posteriors_fast")

#: Compile cost assumed for a kind of graph nothing has been measured for
#: (the order of a first compile of a per-sample Jacobian graph on 2 CPU cores:
#: the compile_s column of ``python -m benchmarks --only sample_jacobian``).
DEFAULT_COMPILE_S = 5.0
#: At most this many compiled entries per computation; beyond, eager.
MAX_COMPILED = 64
MODES = ("auto", "after", "never", "always")

_FAILED = object()

# What this process has compiled under the policy (see stats()).
_STATS = {"compiles": 0, "failed": 0, "compile_s": 0.0}


def stats() -> Dict[str, float]:
    """What the policy has compiled in this process: ``compiles`` (graphs
    compiled), ``failed`` (compiles that failed and fell back to eager) and
    ``compile_s`` (seconds they took beyond an eager call)."""
    return dict(_STATS)


@dataclass
class Policy:
    """The rule of :class:`TieredCompile` (see the module docstring)."""

    mode: str = "auto"
    budget: float = 1.0
    after: int = 3

    def should_compile(self, calls: int, eager_s: float, estimate_s: float) -> bool:
        """Whether the next call compiles, after ``calls`` eager calls that
        took ``eager_s`` in all, for a compile estimated at ``estimate_s``."""
        if self.mode == "never":
            return False
        if self.mode == "always":
            return True
        if self.mode == "after":
            return calls + 1 >= self.after
        return eager_s >= self.budget * estimate_s


def _policy_from_environment() -> Policy:
    mode = os.environ.get("POSTERIORS_FAST_COMPILE", "auto").strip().lower() or "auto"
    after = os.environ.get("POSTERIORS_FAST_COMPILE_AFTER")
    budget = os.environ.get("POSTERIORS_FAST_COMPILE_BUDGET")
    policy = Policy()
    try:
        if mode not in ("auto", "never", "always"):
            raise ValueError(f"POSTERIORS_FAST_COMPILE={mode!r} is not one of auto, never, always")
        policy.mode = mode
        if budget:
            policy.budget = _positive(float(budget), "POSTERIORS_FAST_COMPILE_BUDGET")
        if after:
            policy.mode, policy.after = "after", max(1, int(after))
    except ValueError as err:
        logger.warning("posteriors_fast: %s; using the default compile policy", err)
        return Policy()
    return policy


def _positive(value: float, name: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


_POLICY = _policy_from_environment()


def get_compile_policy() -> Policy:
    """The policy in force (a copy)."""
    return Policy(_POLICY.mode, _POLICY.budget, _POLICY.after)


def set_compile_policy(
    mode: Optional[str] = None, *, budget: Optional[float] = None, after: Optional[int] = None
) -> Policy:
    """Set when ``backend="compiled"`` compiles the graphs that run user code.

    Args:
        mode: ``"auto"`` (compile once the eager time spent reaches ``budget``
            times the estimated compile cost), ``"after"`` (on the ``after``-th
            call), ``"never"`` or ``"always"``; None keeps the current one.
        budget: For ``"auto"``: a finite number > 0.
        after: For ``"after"``: a positive integer (``mode`` defaults to
            ``"after"`` when only this is given).

    Returns:
        The policy before the call, to restore it with
        ``set_compile_policy(**dataclasses.asdict(previous))``.
    """
    previous = get_compile_policy()
    if mode is None and after is not None:
        mode = "after"
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a compile policy; valid ones are {', '.join(map(repr, MODES))}")
    if budget is not None:
        _positive(float(budget), "budget")
    if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 1):
        raise ValueError(f"after must be a positive integer, got {after!r}")
    _POLICY.mode = mode or _POLICY.mode
    _POLICY.budget = float(budget) if budget is not None else _POLICY.budget
    _POLICY.after = after if after is not None else _POLICY.after
    return previous


def describe() -> str:
    """The policy in force, in words (for :func:`posteriors_fast.backends.explain`)."""
    policy = _POLICY
    if policy.mode == "auto":
        where = BOOK.path or "memory only (POSTERIORS_FAST_CACHE_DIR=off)"
        text = (
            f"auto: compile once the eager time spent reaches {policy.budget:g}x the estimated "
            f"compile cost (estimates: {where})"
        )
    elif policy.mode == "after":
        text = f"after: compile on call {policy.after} with one function and input signature"
    else:
        text = {"never": "never: always eager", "always": "always: compile on the first call"}[policy.mode]
    return text + f"; {_STATS['compiles']} compiled in this process"


def _cache_path() -> Optional[str]:
    root = os.environ.get("POSTERIORS_FAST_CACHE_DIR")
    if root is not None and root.strip().lower() in ("off", "0", "none", ""):
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "posteriors_fast")
    return os.path.join(root, "compile_costs.json")


@dataclass
class CostBook:
    """Measured compile costs: per graph key the last one, per kind the
    recent ones, and the graphs whose compile failed; loaded from and saved
    to ``path`` (None: memory only). A file written by another torch version
    is ignored (its costs and failures need not hold for this one)."""

    path: Optional[str] = None
    graphs: Dict[str, float] = field(default_factory=dict)
    kinds: Dict[str, List[float]] = field(default_factory=dict)
    failures: Dict[str, float] = field(default_factory=dict)
    _loaded: bool = False
    _medians: Dict[str, float] = field(default_factory=dict)

    def _read(self) -> Dict:
        if self.path is None or not os.path.exists(self.path):
            return {}
        try:
            with open(self.path) as handle:
                data = json.load(handle)
            if not isinstance(data, dict) or data.get("torch") != torch.__version__:
                return {}
            return {
                "graphs": {str(k): float(v) for k, v in data.get("graphs", {}).items()},
                "kinds": {str(k): [float(c) for c in v] for k, v in data.get("kinds", {}).items()},
                "failures": {str(k): float(v) for k, v in data.get("failures", {}).items()},
            }
        except (OSError, ValueError, TypeError, AttributeError) as err:
            logger.debug("posteriors_fast: ignoring unreadable compile-cost file %s (%s)", self.path, err)
            return {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        data = self._read()
        for key, value in data.get("graphs", {}).items():
            self.graphs.setdefault(key, value)
        for kind, costs in data.get("kinds", {}).items():
            self.kinds[kind] = (costs + self.kinds.get(kind, []))[-16:]
        for key, value in data.get("failures", {}).items():
            self.failures.setdefault(key, value)
        self._medians.clear()

    def estimate(self, key: str, kind: str) -> float:
        """Seconds a compile of graph ``key`` (of ``kind``) is expected to take."""
        self._load()
        if key in self.graphs:
            return self.graphs[key]
        if kind not in self._medians:
            costs = self.kinds.get(kind)
            self._medians[kind] = statistics.median(costs) if costs else DEFAULT_COMPILE_S
        return self._medians[kind]

    def failed(self, key: str) -> bool:
        """Whether compiling graph ``key`` failed before (here or in an
        earlier process with this torch)."""
        self._load()
        return key in self.failures

    def record(self, key: str, kind: str, seconds: float) -> None:
        self._load()
        self.graphs[key] = seconds
        self.kinds[kind] = (self.kinds.get(kind, []) + [seconds])[-16:]
        self._medians.pop(kind, None)
        self._save()

    def record_failure(self, key: str, kind: str, seconds: float) -> None:
        """A failed compile: never retried for this graph, and its time
        counts as a cost of the kind."""
        self._load()
        self.failures[key] = seconds
        self.record(key, kind, seconds)

    def _save(self) -> None:
        if self.path is None:
            return
        # Merge with what other processes wrote since this one loaded.
        on_disk = self._read()
        graphs = {**on_disk.get("graphs", {}), **self.graphs}
        failures = {**on_disk.get("failures", {}), **self.failures}
        for table in (graphs, failures):  # bounded: oldest first (dicts keep insertion order)
            for old in list(table)[: max(0, len(table) - 512)]:
                del table[old]
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump(
                    {"torch": torch.__version__, "graphs": graphs, "kinds": self.kinds, "failures": failures}, handle
                )
            os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old or the new file
        except OSError as err:
            logger.debug("posteriors_fast: compile costs not saved to %s (%s)", self.path, err)


BOOK = CostBook(_cache_path())


def _fresh_copy(fn: Callable, index: int) -> Callable:
    """``fn`` with its own code object, named apart: dynamo keeps its cache on
    the code object and its record of which sizes changed between calls
    (automatic dynamic shapes) under the code's file, line and name."""
    name = f"{fn.__name__}__tier{index}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def shape_signature(params: Any, batch: Any) -> Tuple:
    """What fixes a compiled graph of ``f(params, batch)``: both tree
    structures, and each leaf's shape, dtype and device (a non-tensor leaf by
    its type)."""
    return signature_and_grad(params, batch)[0]


def signature_and_grad(params: Any, batch: Any) -> Tuple[Tuple, bool]:
    """``(shape_signature(params, batch), whether any tensor leaf of either
    requires grad)`` from one pass over the leaves."""
    p_leaves, p_spec = tree_flatten(params)
    b_leaves, b_spec = tree_flatten(batch)
    grad = False
    p_parts = []
    for x in p_leaves:
        grad = grad or x.requires_grad
        p_parts.append((x.shape, x.dtype, x.device))
    b_parts = []
    for x in b_leaves:
        if isinstance(x, torch.Tensor):
            grad = grad or x.requires_grad
            b_parts.append((x.shape, x.dtype, x.device))
        else:
            b_parts.append(type(x))
    return (p_spec, tuple(p_parts), b_spec, tuple(b_parts)), grad


def _code_identity(owner: object) -> str:
    """The user function's code, for the cost book: the same source in a new
    process has the same identity (an object id would not)."""
    fn = getattr(owner, "func", owner)  # functools.partial
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    digest = hashlib.sha1(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]
    return f"{code.co_filename}:{code.co_firstlineno}:{code.co_qualname}:{digest}"


def _autograd_must_see(args) -> bool:
    """Whether the result must carry an autograd graph back to a tensor of
    ``args``: the compiled graph does not record one through its own reverse
    passes, so such calls stay eager."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves(args))


@dataclass
class _Entry:
    key: str
    calls: int = 0
    eager_s: float = 0.0
    compiled: Any = None  # the compiled callable, or _FAILED


class TieredCompile:
    """``tiered(owner, signature, *args)`` runs ``fn(*args)`` eagerly or
    compiled, as the policy decides for this ``owner`` (the user function,
    held weakly) and ``signature`` (anything hashable that fixes the shapes);
    always eagerly while autograd must see through the result.

    ``eager``, when given, is what runs on the eager calls instead of ``fn``: a
    computation with the same result that is faster uncompiled (plain autograd
    rather than the ``torch.func`` transforms a graph needs, for example).
    ``kind`` names the kind of graph for the cost estimates.
    """

    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self, fn: Callable, name: str, eager: Optional[Callable] = None, kind: Optional[str] = None):
        self._traced = fn
        self._fn = fn if eager is None else eager
        self._name = name
        self.kind = kind or fn.__name__
        self._entries: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._compiled = 0
        self.policy = _POLICY
        self.book = BOOK

    def _compile(self) -> Callable:
        self._compiled += 1
        return torch.compile(_fresh_copy(self._traced, self._compiled), dynamic=False)

    def _entry(self, owner: object, signature: Hashable) -> Optional[_Entry]:
        try:
            per_owner = self._entries.get(owner)
            if per_owner is None:
                per_owner = self._entries[owner] = {}
        except TypeError:  # no weak references to this callable: stay eager
            return None
        entry = per_owner.get(signature)
        if entry is None:
            key = f"{self.kind}|{_code_identity(owner)}|{signature!r}"
            entry = per_owner[signature] = _Entry(key)
        return entry

    def __call__(self, owner: object, signature: Hashable, *args, needs_grad: Optional[bool] = None):
        """``needs_grad``: whether any tensor of ``args`` requires grad, when
        the caller knows (:func:`signature_and_grad`); else ``args`` are scanned."""
        if torch.is_grad_enabled() and (_autograd_must_see(args) if needs_grad is None else needs_grad):
            return self._fn(*args)
        entry = self._entry(owner, signature)
        if entry is None or entry.compiled is _FAILED:
            return self._fn(*args)
        if entry.calls == 0 and self.book.failed(entry.key):  # failed in an earlier process
            entry.compiled = _FAILED
            return self._fn(*args)
        if entry.compiled is not None:
            return entry.compiled(*args)
        estimate = self.book.estimate(entry.key, self.kind)
        if self._compiled >= MAX_COMPILED or not self.policy.should_compile(entry.calls, entry.eager_s, estimate):
            start = self.clock()
            out = self._fn(*args)
            entry.eager_s += self.clock() - start
            entry.calls += 1
            return out
        # The cost counts building the compiled callable too: the first
        # torch.compile of a process imports dynamo and inductor (seconds).
        start = self.clock()
        try:
            compiled = self._compile()
            out = compiled(*args)
        except Exception as err:
            # The user's own error (a bad batch, say) fails eagerly too and
            # propagates from here, unchanged; otherwise the compile failed.
            spent = self.clock() - start
            result = self._fn(*args)
            entry.compiled = _FAILED
            self.book.record_failure(entry.key, self.kind, spent)
            _STATS["failed"] += 1
            _STATS["compile_s"] += spent
            logger.warning(
                "posteriors_fast: torch.compile of %s failed (%s: %s); running it eagerly",
                self._name,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
            return result
        # The first compiled call compiles: what it took beyond an eager call.
        typical = entry.eager_s / entry.calls if entry.calls else 0.0
        cost = max(0.0, self.clock() - start - typical)
        self.book.record(entry.key, self.kind, cost)
        _STATS["compiles"] += 1
        _STATS["compile_s"] += cost
        entry.compiled = compiled
        return out


class GuardedCompile(TieredCompile):
    """A fixed computation (no user code inside, e.g. the CG step) compiled
    by the same policy, keyed on its arguments' shapes: ``guarded(*args)``.
    A failing compile falls back to eager with one warning, so a machine that
    cannot compile (no triton on CUDA, a broken compiler) loses speed, never
    the result."""

    def __init__(self, fn: Callable, name: str, **options) -> None:
        super().__init__(fn, name, kind=fn.__name__)
        self._options = options

    def _compile(self) -> Callable:
        self._compiled += 1
        return torch.compile(_fresh_copy(self._traced, self._compiled), **self._options)

    def __call__(self, *args):
        # With dynamic shapes one graph serves every size: key on what the
        # graph specialises (dtypes, devices, ranks, a float's zero-ness).
        dynamic = self._options.get("dynamic") is True

        def part(a):
            if isinstance(a, torch.Tensor):
                return (a.dtype, a.device, a.dim()) if dynamic else (a.shape, a.dtype, a.device)
            return ("float", a != 0) if isinstance(a, float) else a

        return TieredCompile.__call__(self, self._fn, tuple(part(a) for a in args), *args)
