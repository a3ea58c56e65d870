"""When ``backend="compiled"`` compiles a computation with ``torch.compile``.

Graphs that run the user's own function (per-sample Jacobians, the samplers'
gradients) are milliseconds of small kernels whose cost is framework
overhead, which ``torch.compile`` removes, but compiling one costs seconds. A
run of a few hundred calls never earns that back; a long run does. So the
default policy, ``"auto"``, is the ski-rental rule: a computation runs
eagerly, and the time it spends is added up per (user function, input
signature), until that time reaches ``budget`` times the estimated cost of
compiling it; then it is compiled. When the estimate is accurate, whatever
the length of the run, the time spent compiling is at most about
``1/budget`` times the eager time already spent (plus the compiled calls,
which are faster), so no run is more than about ``1 + 1/budget`` times
slower than eager because of compilation (twice, for the default
``budget=1``), while long runs reach the compiled steady state.

The bound is only as good as the estimate. A compile that takes ``r`` times
its estimate stretches it to ``1 + r/budget`` (reached by a run that stops
right after the compile); the measured cost then replaces the estimate, so
the next run of the same graph is back within ``1 + 1/budget``. An
overestimate only compiles later. Recompiles the policy does not decide
(something outside the signature changed, see below) are not in the bound
at all; the policy demotes such a graph to eager after its first one.

The estimate of a compile's cost comes from the compiles measured before:
the last cost of the same graph (same kind, same function code, same
signature), else the median of what the kind's new graphs cost, else
:data:`DEFAULT_COMPILE_S`. Most of a first compile is inductor generating and
building code, which its on-disk caches keep (``TORCHINDUCTOR_CACHE_DIR``):
a later process compiling the same graph loads it, several times faster. So
a compile also records its cost without that part (inductor's
``fx_codegen_and_compile`` time when its FX-graph cache missed; the whole cost
when the graph was loaded from it), and while the caches are on and in the
same directory (not removed and made again since), that is the graph's
estimate (:mod:`posteriors_fast.backends.inductor_cache`); plus, while this process has
not imported dynamo and inductor, what those imports cost (measured by the
first compile of a process and kept apart, under :data:`IMPORTS_KIND`, so
that a graph compiled after others is not charged for them). Estimates are kept in
``compile_costs.json`` in the cache directory (``POSTERIORS_FAST_CACHE_DIR``,
default ``~/.cache/posteriors_fast``; ``off`` keeps them in memory only), so
a new process starts from what earlier ones measured. A graph whose compile
failed is remembered there too, with the posteriors_fast and torch versions,
and not compiled again with the same versions (logged, and counted in
:func:`stats`); :func:`forget` (or deleting the file) tries such graphs
again. The same directory keeps which of inductor's CPU vector-ISA libraries
loaded on this machine (:mod:`posteriors_fast.backends.inductor_isa`), so a
new process's first compile skips the child processes that check them.

The policy is a knob (:func:`set_compile_policy`, or the environment):

* ``POSTERIORS_FAST_COMPILE``: ``auto`` (default), ``never`` (eager for these
  graphs; the native kernels still run) or ``always`` (compile on first call);
* ``POSTERIORS_FAST_COMPILE_BUDGET``: the ``budget`` of ``auto`` (default 1.0;
  larger compiles later, so the bound tightens to ``1 + 1/budget``);
* ``POSTERIORS_FAST_COMPILE_AFTER=n``: compile on the n-th call instead
  (under ``auto``, the default, or ``after``; an explicit ``never`` or
  ``always`` wins and the variable is ignored with a warning).

Each (function, signature) gets its own, separately named copy of the
computation's code object, compiled static (``dynamic=False``) for its
shapes, batch size included: dynamo's caches hold one entry per copy (no
shared recompilation limit, no guard chain that grows with the number of
functions), a new batch size earns its own compile by the same rule (the
ragged last batch of an epoch stays eager), and a function rebuilt on every
call (a fresh lambda) never accrues anything. The signature holds each
tensor's shape, dtype and device and the value of each bool, int, float,
str or None leaf of the batch (graphs specialise on them). What it cannot
hold (closure variables, globals, module attributes) may still change: a
compiled entry whose code object then gains a second graph has recompiled,
and it runs eagerly from then on (logged once per computation). A compiled
entry with one graph and no graph break is then called through
:mod:`posteriors_fast.backends.direct_call` (its guards checked, dynamo's
transformed code run without the frame hook) while its guards hold. A failed
compile is logged once and that entry runs eagerly from then on; an error
the user's function raises on the compiling call propagates and is no
failure (its compile time is recorded when the graph was built; a trace
that stopped at the error measured only part of a compile, so nothing is).
Nothing is compiled at import.
"""

import hashlib
import importlib.metadata
import logging
import math
import os
import statistics
import sys
import threading
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, List, Optional, Tuple

import torch
from optree import tree_flatten, tree_leaves

from posteriors_fast._internal.json_file import read_json, write_json
from posteriors_fast.backends import inductor_cache
from posteriors_fast.backends.direct_call import cache_entries, direct_caller
from posteriors_fast.backends.inductor_isa import remembered_probe

logger = logging.getLogger("posteriors_fast")

#: Compile cost assumed for a kind of graph nothing has been measured for
#: (the order of a first compile of a per-sample Jacobian graph on 2 CPU cores:
#: the compile_s column of ``python -m benchmarks --only sample_jacobian``).
DEFAULT_COMPILE_S = 5.0
#: At most this many compiled entries per computation; beyond, eager.
MAX_COMPILED = 64
MODES = ("auto", "after", "never", "always")

_FAILED = object()  # the compile failed (here or, remembered, in an earlier process)
_DEMOTED = object()  # the compiled graph recompiled: eager from then on

# What this process has compiled under the policy (see stats()).
_STATS = {"compiles": 0, "failed": 0, "skipped_failed": 0, "recompiles": 0, "compile_s": 0.0}


def stats() -> Dict[str, float]:
    """What the policy has done in this process: ``compiles`` (graphs
    compiled), ``failed`` (compiles that failed here and fell back to eager),
    ``skipped_failed`` (graphs left eager because their compile failed in an
    earlier process, see :func:`forget`), ``recompiles`` (compiled graphs that
    recompiled and were demoted to eager) and ``compile_s`` (seconds the
    compiles took beyond an eager call)."""
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
    """The policy the environment asks for. An explicit
    ``POSTERIORS_FAST_COMPILE=never`` or ``always`` wins over
    ``POSTERIORS_FAST_COMPILE_AFTER`` (which is then ignored, with a warning);
    ``AFTER`` applies under ``auto`` (the default) and ``after``."""
    mode = os.environ.get("POSTERIORS_FAST_COMPILE", "auto").strip().lower() or "auto"
    after = os.environ.get("POSTERIORS_FAST_COMPILE_AFTER")
    budget = os.environ.get("POSTERIORS_FAST_COMPILE_BUDGET")
    policy = Policy()
    try:
        if mode not in MODES:
            raise ValueError(f"POSTERIORS_FAST_COMPILE={mode!r} is not one of {', '.join(MODES)}")
        policy.mode = mode
        if budget:
            policy.budget = _positive(float(budget), "POSTERIORS_FAST_COMPILE_BUDGET")
        if after and mode in ("never", "always"):
            logger.warning(
                "posteriors_fast: POSTERIORS_FAST_COMPILE_AFTER=%s is ignored: POSTERIORS_FAST_COMPILE=%s wins",
                after,
                mode,
            )
        elif after:
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
    text += f"; {_STATS['compiles']} compiled in this process"
    failed = _STATS["failed"] + _STATS["skipped_failed"]
    if failed or _STATS["recompiles"]:
        text += (
            f", {failed} left eager after a failed compile ({_STATS['skipped_failed']} remembered from an "
            f"earlier process; compile_policy.forget() retries them), {_STATS['recompiles']} demoted to "
            "eager after a recompile"
        )
    return text


def _cache_path() -> Optional[str]:
    root = os.environ.get("POSTERIORS_FAST_CACHE_DIR")
    if root is not None and root.strip().lower() in ("off", "0", "none", ""):
        return None
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "posteriors_fast")
    return os.path.join(root, "compile_costs.json")


def _package_version() -> str:
    try:
        return importlib.metadata.version("posteriors_fast")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: What a remembered compile failure is valid for: an upgrade of either
#: package may fix the compile, so it is tried again.
FAILURE_VERSION = f"posteriors_fast {_package_version()}, torch {torch.__version__}"
_MAX_GRAPHS = 512  # entries kept per table of the file, oldest dropped first
_MAX_KIND_COSTS = 16  # recent costs kept per kind


def _cached_table(table: Any) -> Dict[str, List]:
    """The file's ``cached`` table, without the entries that are not
    ``[seconds >= 0, directory, inode]`` (dropped one by one: the rest of the
    file holds)."""
    entries = {}
    for key, value in table.items() if isinstance(table, dict) else ():
        if not (isinstance(value, list) and len(value) == 3 and isinstance(value[1], str)):
            continue
        seconds, directory, inode = value
        if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0 and type(inode) is int:
            entries[str(key)] = [float(seconds), directory, inode]
    return entries


@dataclass
class CostBook:
    """Measured compile costs: per graph key the last one (from scratch,
    when known) and what it costs while inductor's on-disk caches hold it,
    per kind the recent costs of new graphs, and the graphs whose compile
    failed; loaded from and saved
    to ``path`` (None: memory only). A file written by another torch version
    is ignored (its costs need not hold for this one); its failures hold only
    for the same posteriors_fast and torch versions (:data:`FAILURE_VERSION`).
    Safe to share between threads; saves merge with what other processes
    wrote since."""

    path: Optional[str] = None
    graphs: Dict[str, float] = field(default_factory=dict)
    # Per graph key: [what compiling it again costs while inductor's on-disk
    # caches hold it, the inductor cache directory they are in, its inode].
    cached: Dict[str, List] = field(default_factory=dict)
    kinds: Dict[str, List[float]] = field(default_factory=dict)
    failures: Dict[str, float] = field(default_factory=dict)
    _loaded: bool = False
    _medians: Dict[str, float] = field(default_factory=dict)
    # Costs recorded here and not yet merged into the file, per kind; graph
    # keys recorded here since (which win over the file's on a save).
    _unsaved: Dict[str, List[float]] = field(default_factory=dict)
    _recorded: set = field(default_factory=set)
    _lock: Any = field(default_factory=threading.RLock, repr=False, compare=False)

    def _read(self) -> Dict:
        data = {} if self.path is None else read_json(self.path)
        if data.get("torch") != torch.__version__:
            return {}
        try:
            failures = data.get("failures", {}) if data.get("failure_version") == FAILURE_VERSION else {}
            return {
                "graphs": {str(k): float(v) for k, v in data.get("graphs", {}).items()},
                "cached": _cached_table(data.get("cached", {})),
                "kinds": {str(k): [float(c) for c in v] for k, v in data.get("kinds", {}).items()},
                "failures": {str(k): float(v) for k, v in failures.items()},
            }
        except (ValueError, TypeError, AttributeError) as err:
            logger.debug("posteriors_fast: ignoring malformed compile-cost file %s (%s)", self.path, err)
            return {}

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        data = self._read()
        for key, value in data.get("graphs", {}).items():
            self.graphs.setdefault(key, value)
        for key, value in data.get("cached", {}).items():
            self.cached.setdefault(key, value)
        for kind, costs in data.get("kinds", {}).items():
            self.kinds[kind] = (costs + self.kinds.get(kind, []))[-_MAX_KIND_COSTS:]
        for key, value in data.get("failures", {}).items():
            self.failures.setdefault(key, value)
        self._medians.clear()

    def estimate(self, key: Optional[str], kind: str, default: float = DEFAULT_COMPILE_S) -> float:
        """Seconds a compile of graph ``key`` (of ``kind``) is expected to
        take; with ``key`` None, the median of ``kind``'s costs (``default``
        when none is known)."""
        with self._lock:
            self._load()
            if key is not None and key in self.cached and inductor_cache.holds(*self.cached[key][1:]):
                return self.cached[key][0]
            if key is not None and key in self.graphs:
                return self.graphs[key]
            if kind not in self._medians:
                costs = self.kinds.get(kind)
                self._medians[kind] = statistics.median(costs) if costs else default
            return self._medians[kind]

    def failed(self, key: str) -> bool:
        """Whether compiling graph ``key`` failed before (here or in an
        earlier process with the same posteriors_fast and torch)."""
        with self._lock:
            self._load()
            return key in self.failures

    def record(
        self,
        key: Optional[str],
        kind: str,
        seconds: float,
        generated_s: Optional[float] = None,
        cache: Optional[Tuple[str, int]] = None,
    ) -> None:
        """A measured compile cost of graph ``key`` (of ``kind``; None: a
        cost of the kind alone, such as :data:`IMPORTS_KIND`).

        ``generated_s``: of ``seconds``, the time inductor spent generating
        and building code, which its on-disk caches keep in ``cache``
        (directory, inode); None for either: not known. With both, the graph
        is estimated at ``seconds - generated_s`` while that directory holds
        the caches. A compile that generated nothing loaded the graph from
        them: it is neither the graph's cost from scratch nor a cost of a new
        graph of the kind."""
        with self._lock:
            self._load()
            known = key is not None and generated_s is not None and cache is not None
            if known:
                self.cached[key] = [max(0.0, seconds - generated_s), cache[0], cache[1]]
                self._recorded.add(key)
            if not (known and generated_s <= 0):
                self._note(key, kind, seconds)
            self._save()

    def _note(self, key: Optional[str], kind: str, seconds: float) -> None:
        if key is not None:
            self.graphs[key] = seconds
            self._recorded.add(key)
        self.kinds[kind] = (self.kinds.get(kind, []) + [seconds])[-_MAX_KIND_COSTS:]
        self._unsaved.setdefault(kind, []).append(seconds)
        self._medians.pop(kind, None)

    def record_failure(self, key: str, kind: str, seconds: float) -> None:
        """A failed compile: not retried for this graph with these versions
        (:func:`forget` clears it), and its time counts as a cost of the kind."""
        with self._lock:
            self._load()
            self.failures[key] = seconds
            self._note(key, kind, seconds)
            self._save()

    def forget(self, *, costs: bool = False) -> None:
        """Forget the remembered compile failures (so they are tried again),
        and with ``costs=True`` the measured costs too, here and in the file."""
        with self._lock:
            self._load()
            self.failures.clear()
            if costs:
                self.graphs.clear()
                self.cached.clear()
                self.kinds.clear()
                self._unsaved.clear()
                self._recorded.clear()
                self._medians.clear()
            self._save(replace=True)

    def _save(self, replace: bool = False) -> None:
        """Write the book, merged with what other processes wrote since this
        one loaded (``replace``: this book's tables alone)."""
        if self.path is None:
            return
        on_disk = {} if replace else self._read()
        # Per graph: what this process recorded, else what the file holds now
        # (another process may have measured it since this one loaded), else
        # what this process loaded.
        graphs, cached = dict(on_disk.get("graphs", {})), dict(on_disk.get("cached", {}))
        for mine, merged in ((self.graphs, graphs), (self.cached, cached)):
            for key, value in mine.items():
                if key in self._recorded or key not in merged:
                    merged[key] = value
        failures = {**on_disk.get("failures", {}), **self.failures}
        for table in (graphs, cached, failures):  # bounded: oldest first (dicts keep insertion order)
            for old in list(table)[: max(0, len(table) - _MAX_GRAPHS)]:
                del table[old]
        # Per kind: the file's recent costs (other processes' included) plus
        # the ones recorded here since the last save; kinds only one side has
        # are kept.
        kinds = dict(on_disk.get("kinds", {})) if not replace else {}
        for kind, costs in self.kinds.items():
            if kind in kinds:
                kinds[kind] = (kinds[kind] + self._unsaved.get(kind, []))[-_MAX_KIND_COSTS:]
            else:
                kinds[kind] = list(costs)
        payload = {
            "torch": torch.__version__,
            "failure_version": FAILURE_VERSION,
            "graphs": graphs,
            "cached": cached,
            "kinds": kinds,
            "failures": failures,
        }
        if not write_json(self.path, payload):
            return
        self.graphs, self.cached, self.failures = graphs, cached, failures
        self.kinds = kinds
        self._unsaved.clear()
        self._recorded.clear()
        self._medians.clear()


BOOK = CostBook(_cache_path())


#: The kind under which the cost of importing dynamo and inductor (paid by a
#: process's first compile) is kept, apart from the graphs' own costs.
IMPORTS_KIND = "imports of dynamo and inductor"
_COMPILE_STACK = ("torch._dynamo", "torch._inductor.compile_fx")


def _compile_stack_imported() -> bool:
    return all(name in sys.modules for name in _COMPILE_STACK)


def _import_compile_stack() -> None:
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401


def _pending_imports(book: "CostBook") -> float:
    """What this process's first compile adds for importing dynamo and
    inductor (the measured median, 0 before any was measured); 0 once they
    are imported (by a compile, or by the user's own code)."""
    return 0.0 if _compile_stack_imported() else book.estimate(None, IMPORTS_KIND, default=0.0)


def _cache_root() -> Optional[str]:
    """The cache directory in use (None: memory only)."""
    return os.path.dirname(BOOK.path) if BOOK.path else None


def set_cache_dir(root: Optional[str]) -> None:
    """Keep the compile-cost estimates (and remembered failures) in
    ``root/compile_costs.json`` from now on, None for memory only: what
    ``POSTERIORS_FAST_CACHE_DIR`` sets at import. The estimates measured so
    far in this process are dropped; the new file's are loaded when needed."""
    path = None if root is None else os.path.join(root, "compile_costs.json")
    with BOOK._lock:
        BOOK.path = path
        BOOK.graphs.clear()
        BOOK.cached.clear()
        BOOK.kinds.clear()
        BOOK.failures.clear()
        BOOK._unsaved.clear()
        BOOK._recorded.clear()
        BOOK._medians.clear()
        BOOK._loaded = False


def forget(*, costs: bool = False) -> None:
    """Forget the remembered compile failures, in this process and in the
    cost file, so those graphs are compiled again when the policy says so
    (with ``costs=True`` the measured compile costs too). Deleting
    ``compile_costs.json`` in the cache directory does the same for new
    processes."""
    BOOK.forget(costs=costs)
    for tiered in list(_INSTANCES):
        tiered._forget_failures()


def _qualname(code: types.CodeType) -> str:
    return getattr(code, "co_qualname", code.co_name)  # co_qualname: Python >= 3.11


def _fresh_copy(fn: Callable, index: int) -> Callable:
    """``fn`` with its own code object, named apart: dynamo keeps its cache on
    the code object and its record of which sizes changed between calls
    (automatic dynamic shapes) under the code's file, line and name."""
    name = f"{fn.__name__}__tier{index}"
    names = {"co_name": name}
    if hasattr(fn.__code__, "co_qualname"):
        names["co_qualname"] = name
    code = fn.__code__.replace(**names)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


#: Non-tensor leaf types whose values enter the signature: torch.compile
#: specialises on them (``dynamic=False``), so another value is another graph.
_VALUE_TYPES = (bool, int, float, str, type(None))


def shape_signature(params: Any, batch: Any) -> Tuple:
    """What fixes a compiled graph of ``f(params, batch)``: both tree
    structures, each tensor leaf's shape, dtype and device, and each other
    leaf's type (and value, for a bool, int, float, str or None)."""
    return signature_and_grad(params, batch)[0]


def _leaf_part(x: Any) -> Tuple[Any, bool]:
    if isinstance(x, torch.Tensor):
        return (x.shape, x.dtype, x.device), x.requires_grad
    if type(x) in _VALUE_TYPES:
        return (type(x), x), False
    return type(x), False


def signature_and_grad(params: Any, batch: Any) -> Tuple[Tuple, bool]:
    """``(shape_signature(params, batch), whether any tensor leaf of either
    requires grad)`` from one pass over the leaves."""
    p_leaves, p_spec = tree_flatten(params)
    b_leaves, b_spec = tree_flatten(batch)
    grad = False
    p_parts = []
    for x in p_leaves:
        part, needs = _leaf_part(x)
        grad = grad or needs
        p_parts.append(part)
    b_parts = []
    for x in b_leaves:
        part, needs = _leaf_part(x)
        grad = grad or needs
        b_parts.append(part)
    return (p_spec, tuple(p_parts), b_spec, tuple(b_parts)), grad


def _const_digest(value: Any, digest: "hashlib._Hash") -> None:
    """Feed a code constant to ``digest`` without anything that differs
    between processes: nested code objects recursively (their repr holds an
    address), the members of a frozenset in a sorted order (their iteration
    order depends on string hashing, randomised per process)."""
    if isinstance(value, types.CodeType):
        _code_digest(value, digest)
    elif isinstance(value, (tuple, frozenset)):
        parts = []
        for item in value:
            inner = hashlib.sha1()
            _const_digest(item, inner)
            parts.append(inner.hexdigest())
        if isinstance(value, frozenset):
            parts.sort()
        digest.update(f"{type(value).__name__}({','.join(parts)})".encode())
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def _code_digest(code: types.CodeType, digest: "hashlib._Hash") -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars, _qualname(code))).encode())
    for const in code.co_consts:
        _const_digest(const, digest)


def _code_identity(owner: object) -> str:
    """The user function's code, for the cost book: the same source in a new
    process has the same identity (an object id, or the repr of a nested code
    object, would not)."""
    fn = getattr(owner, "func", owner)  # functools.partial
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    digest = hashlib.sha1()
    _code_digest(code, digest)
    return f"{code.co_filename}:{code.co_firstlineno}:{_qualname(code)}:{digest.hexdigest()[:12]}"


def _autograd_must_see(args) -> bool:
    """Whether the result must carry an autograd graph back to a tensor of
    ``args``: the compiled graph does not record one through its own reverse
    passes, so such calls stay eager."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves(args))


def _dynamo_code(compiled: Callable) -> Optional[types.CodeType]:
    """The code object ``torch.compile`` keeps its cache of ``compiled`` on
    (None for anything that is not a ``torch.compile`` of a function)."""
    original = getattr(compiled, "_torchdynamo_orig_callable", None)
    return getattr(original, "__code__", None)


class _DynamoCompiles:
    """How many compiles dynamo has started in this process, counted by a
    start callback registered with the policy's first compile: a compiled
    call during which the count did not move cannot have recompiled, so the
    per-entry count of graphs is looked up only when it moved.
    :meth:`count` is None when the callback is not (or no longer: after
    ``torch._dynamo.reset()``) registered; then every compiled call looks."""

    def __init__(self) -> None:
        self.started = 0
        self._handler = None

    def _callback(self, *_) -> None:
        self.started += 1

    def register(self) -> None:
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:  # a torch without the hook
            return
        if self._callback not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(self._callback)
        self._handler = callback_handler

    def count(self) -> Optional[int]:
        handler = self._handler
        if handler is None or self._callback not in handler.start_callbacks:
            return None
        return self.started


_DYNAMO_COMPILES = _DynamoCompiles()


def _graphs_cached(code: Optional[types.CodeType]) -> Optional[int]:
    """How many compiled graphs dynamo holds for ``code``: one per compile,
    so a growing count after the first is a recompile."""
    entries = cache_entries(code)  # None on a torch without them: recompiles go unseen
    return None if entries is None else len(entries)


@dataclass
class _Entry:
    key: str
    calls: int = 0
    eager_s: float = 0.0
    compiled: Any = None  # the compiled callable, _FAILED or _DEMOTED
    code: Optional[types.CodeType] = None  # where dynamo caches its graphs
    graphs: Optional[int] = None  # how many it held after the compile
    direct: Optional[Callable] = None  # the compiled graph without torch.compile's wrapper (direct_call)


_INSTANCES: "weakref.WeakSet" = weakref.WeakSet()


class TieredCompile:
    """``tiered(owner, signature, *args)`` runs ``fn(*args)`` eagerly or
    compiled, as the policy decides for this ``owner`` (the user function,
    held weakly) and ``signature`` (anything hashable that fixes the shapes);
    always eagerly while autograd must see through the result.

    ``eager``, when given, is what runs on the eager calls instead of ``fn``: a
    computation with the same result that is faster uncompiled (plain autograd
    rather than the ``torch.func`` transforms a graph needs, for example).
    ``kind`` names the kind of graph for the cost estimates.

    A compiled entry that recompiles (something its signature does not show
    changed: a closure variable, a global, a module attribute) runs eagerly
    from then on, with one warning per computation: recompiles are compile
    costs the policy did not decide to pay.
    """

    clock: Callable[[], float] = staticmethod(time.perf_counter)

    def __init__(self, fn: Callable, name: str, eager: Optional[Callable] = None, kind: Optional[str] = None):
        self._traced = fn
        self._fn = fn if eager is None else eager
        self._name = name
        self.kind = kind or fn.__name__
        self._entries: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._compiled = 0
        self._warned: set = set()  # the kinds of warning already logged (once per computation)
        self.policy = _POLICY
        self.book = BOOK
        _INSTANCES.add(self)

    def _compile(self) -> Callable:
        self._compiled += 1
        return torch.compile(_fresh_copy(self._traced, self._compiled), dynamic=False)

    def _for(self, owner: object) -> str:
        """`` for <the user function>`` in messages."""
        return f" for {_describe_owner(owner)}"

    def _forget_failures(self) -> None:
        for per_owner in list(self._entries.values()):
            for signature, entry in list(per_owner.items()):
                if entry.compiled is _FAILED:
                    del per_owner[signature]

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
        if entry is None or entry.compiled is _FAILED or entry.compiled is _DEMOTED:
            return self._fn(*args)
        if entry.calls == 0 and self.book.failed(entry.key):  # failed in an earlier process
            entry.compiled = _FAILED
            _STATS["skipped_failed"] += 1
            self._warn_once(
                "remembered",
                "posteriors_fast: not compiling %s%s: its compile failed in an earlier process "
                "with these versions (%s; remembered in %s). "
                "posteriors_fast.backends.compile_policy.forget() tries again",
                self._name,
                self._for(owner),
                FAILURE_VERSION,
                self.book.path,
            )
            return self._fn(*args)
        if entry.compiled is not None:
            seen = _DYNAMO_COMPILES.count()
            if seen is None:  # dynamo was reset since: its graphs are gone, and the direct caller with them
                entry.direct = None
            elif entry.direct is not None:
                hit, out = entry.direct(args)
                if hit:
                    return out
            out = entry.compiled(*args)
            if (
                entry.graphs is not None
                and (seen is None or _DYNAMO_COMPILES.count() != seen)
                and _graphs_cached(entry.code) != entry.graphs
            ):
                self._demote(entry, owner)
            return out
        # Only auto reads the estimate (the other modes count calls or nothing).
        auto = self.policy.mode == "auto"
        estimate = self.book.estimate(entry.key, self.kind) + _pending_imports(self.book) if auto else 0.0
        if self._compiled >= MAX_COMPILED or not self.policy.should_compile(entry.calls, entry.eager_s, estimate):
            start = self.clock()
            out = self._fn(*args)
            entry.eager_s += self.clock() - start
            entry.calls += 1
            return out
        return self._compile_and_call(entry, owner, args)

    def _compile_and_call(self, entry: _Entry, owner: object, args: Tuple):
        # The graph's cost counts building the compiled callable too; the
        # first compile of a process also imports dynamo and inductor, a cost
        # of the process measured and kept apart (see _pending_imports).
        typical = entry.eager_s / entry.calls if entry.calls else 0.0
        compiled = generated = None
        start = self.clock()
        try:
            if not _compile_stack_imported():
                _import_compile_stack()
                imported = self.clock()
                self.book.record(None, IMPORTS_KIND, imported - start)
                _STATS["compile_s"] += imported - start
                start = imported
            _DYNAMO_COMPILES.register()
            generated = inductor_cache.codegen_state()
            with remembered_probe(_cache_root):
                compiled = self._compile()
                out = compiled(*args)
        except Exception as err:
            spent = self.clock() - start
            code = _dynamo_code(compiled)
            # The user's own error (a bad batch, say) fails eagerly too and
            # propagates from here, unchanged; otherwise the compile failed.
            try:
                result = self._fn(*args)
            except Exception:
                if _graphs_cached(code):
                    # The graph was built and the error came from running it:
                    # the compile is measured and kept.
                    self._keep(entry, compiled, code, max(0.0, spent - typical), generated)
                # Else the trace stopped at the error, a part of a compile
                # (inductor, most of the cost, never ran): no estimate, and
                # the next call with this signature compiles afresh.
                raise
            entry.compiled = _FAILED
            self.book.record_failure(entry.key, self.kind, spent)
            _STATS["failed"] += 1
            _STATS["compile_s"] += spent
            logger.warning(
                "posteriors_fast: torch.compile of %s%s failed (%s: %s); running it eagerly, and not "
                "compiling it again with these versions (remembered in %s; "
                "posteriors_fast.backends.compile_policy.forget() tries again)",
                self._name,
                self._for(owner),
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
                self.book.path or "this process",
            )
            return result
        # The first compiled call compiles: what it took beyond an eager call.
        cost = max(0.0, self.clock() - start - typical)
        self._keep(entry, compiled, _dynamo_code(compiled), cost, generated)
        return out

    def _keep(
        self,
        entry: _Entry,
        compiled: Callable,
        code: Optional[types.CodeType],
        cost: float,
        before: Optional[inductor_cache.State] = None,
    ) -> None:
        """Keep a compiled entry and record its cost; ``before``: inductor's
        code-generation record when the compile started."""
        generated = inductor_cache.generated_since(before)
        where = inductor_cache.location() if generated is not None else None
        self.book.record(entry.key, self.kind, cost, generated if where is not None else None, where)
        _STATS["compiles"] += 1
        _STATS["compile_s"] += cost
        entry.compiled, entry.code, entry.graphs = compiled, code, _graphs_cached(code)
        entry.direct = direct_caller(compiled)

    def _demote(self, entry: _Entry, owner: object) -> None:
        entry.compiled, entry.code, entry.direct = _DEMOTED, None, None
        _STATS["recompiles"] += 1
        self._warn_once(
            "recompile",
            "posteriors_fast: the compiled %s%s recompiled (something its input signature does "
            "not show changed: a closure variable, a global or a module attribute); it runs eagerly "
            "from now on",
            self._name,
            self._for(owner),
        )

    def _warn_once(self, kind: str, message: str, *args) -> None:
        """Log ``message % args`` at WARNING the first time ``kind`` happens here."""
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message, *args)


def _describe_owner(owner: object) -> str:
    fn = getattr(owner, "func", owner)
    code = getattr(fn, "__code__", None)
    if code is None:
        return type(fn).__qualname__
    return f"{_qualname(code)} ({code.co_filename}:{code.co_firstlineno})"


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

    def _for(self, owner: object) -> str:
        return ""  # no user function inside: the name says what it is

    def __call__(self, *args):
        # With dynamic shapes one graph serves every size: key on what the
        # graph specialises (dtypes, devices, ranks, a float's zero-ness).
        dynamic = self._options.get("dynamic") is True

        def part(a):
            if isinstance(a, torch.Tensor):
                return (a.dtype, a.device, a.dim()) if dynamic else (a.shape, a.dtype, a.device)
            return ("float", a != 0) if isinstance(a, float) else a

        return TieredCompile.__call__(self, self._fn, tuple(part(a) for a in args), *args)
