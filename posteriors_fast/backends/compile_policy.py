"""Tiered ``torch.compile`` of computations that run the user's own function
(per-sample Jacobians, for example).

Such a computation is a few milliseconds of small kernels whose cost is almost
all framework overhead, which ``torch.compile`` removes, but compiling it costs
seconds. So it runs eagerly until the same user function has been called
:data:`COMPILE_AFTER` times with the same input signature (the hot loop of a
filter or a sampler), and compiled from then on. A one-off call never waits for
a compile, and a function rebuilt on every call (a fresh lambda) is never
compiled, so it cannot cause a recompilation storm.

Each (function, signature) gets its own, separately named copy of the
computation's code object, so dynamo's caches hold one entry per copy: no
shared recompilation limit, no guard chain that grows with the number of
functions, and sizes seen for one signature never make another's dynamic.
A failed compile is logged once and that entry runs eagerly from then on.
"""

import logging
import os
import types
import weakref
from typing import Any, Callable, Hashable, Optional, Tuple

import torch
from optree import tree_flatten, tree_leaves

logger = logging.getLogger("posteriors_fast")

#: Eager calls with the same function and signature before the compiled one.
COMPILE_AFTER = max(1, int(os.environ.get("POSTERIORS_FAST_COMPILE_AFTER", "3")))
#: At most this many compiled entries per computation; beyond, eager.
MAX_COMPILED = 64

_FAILED = object()


def _fresh_copy(fn: Callable, index: int) -> Callable:
    """``fn`` with its own code object, named apart: dynamo keeps its cache on
    the code object and its record of which sizes changed between calls
    (automatic dynamic shapes) under the code's file, line and name."""
    name = f"{fn.__name__}__tier{index}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def shape_signature(params: Any, batch: Any) -> Tuple:
    """What fixes a compiled graph of ``f(params, batch)`` apart from the batch
    size, which may vary (``dynamic=None`` makes it symbolic when it does):
    both tree structures, and each leaf's shape, dtype and device (the
    batch's without its leading dimension; a non-tensor leaf by its type)."""
    p_leaves, p_spec = tree_flatten(params)
    b_leaves, b_spec = tree_flatten(batch)
    return (
        p_spec,
        tuple((x.shape, x.dtype, x.device) for x in p_leaves),
        b_spec,
        tuple((x.shape[1:], x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x) for x in b_leaves),
    )


def _autograd_must_see(args) -> bool:
    """Whether the result must carry an autograd graph back to a tensor of
    ``args``: the compiled graph does not record one through its own reverse
    passes, so such calls stay eager."""
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves(args))


class TieredCompile:
    """``tiered(owner, signature, *args)`` runs ``fn(*args)``: eagerly for the
    first :data:`COMPILE_AFTER` calls with this ``owner`` (the user function,
    held weakly) and ``signature`` (anything hashable that fixes the shapes
    other than dynamic batch sizes), compiled afterwards; always eagerly while
    autograd must see through the result.

    ``eager``, when given, is what runs on the eager calls instead of ``fn``: a
    computation with the same result that is faster uncompiled (plain autograd
    rather than the ``torch.func`` transforms a graph needs, for example).
    """

    def __init__(self, fn: Callable, name: str, eager: Optional[Callable] = None) -> None:
        self._traced = fn
        self._fn = fn if eager is None else eager
        self._name = name
        self._entries: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._compiled = 0

    def _compile(self) -> Callable:
        self._compiled += 1
        # dynamic=None: the first graph is static and a second batch size makes
        # only the dimensions that changed symbolic. dynamic=True would make
        # every size symbolic, which the nested vmap of a multi-output
        # per-sample Jacobian cannot trace in torch 2.13 ("Cannot call sizes()
        # on tensor with symbolic sizes").
        return torch.compile(_fresh_copy(self._traced, self._compiled), dynamic=None)

    def __call__(self, owner: object, signature: Hashable, *args):
        if _autograd_must_see(args):
            return self._fn(*args)
        try:
            per_owner = self._entries.get(owner)
            if per_owner is None:
                per_owner = self._entries[owner] = {}
        except TypeError:  # no weak references to this callable: stay eager
            return self._fn(*args)
        entry = per_owner.get(signature, 0)
        if entry is _FAILED:
            return self._fn(*args)
        if isinstance(entry, int):
            if entry + 1 < COMPILE_AFTER or self._compiled >= MAX_COMPILED:
                per_owner[signature] = entry + 1
                return self._fn(*args)
            entry = per_owner[signature] = self._compile()
        try:
            return entry(*args)
        except Exception as err:
            # The user's own error (a bad batch, say) fails eagerly too and
            # propagates from here, unchanged; otherwise the compile failed.
            result = self._fn(*args)
            per_owner[signature] = _FAILED
            logger.warning(
                "posteriors_fast: torch.compile of %s failed (%s: %s); running it eagerly",
                self._name,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
            return result


class GuardedCompile:
    """``torch.compile(fn, **options)`` built on first use for a fixed
    computation (no user code inside): if compiling or running the compiled
    code raises, one warning is logged and ``fn`` runs eagerly from then on,
    so a machine that cannot compile (no triton on CUDA, a broken compiler)
    loses speed, never the result."""

    def __init__(self, fn: Callable, name: str, **options) -> None:
        self._fn = fn
        self._name = name
        self._options = options
        self._compiled: Optional[Callable] = None
        self._failed = False

    def __call__(self, *args):
        if self._failed:
            return self._fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self._fn, **self._options)
        try:
            return self._compiled(*args)
        except Exception as err:
            self._failed = True
            logger.warning(
                "posteriors_fast: torch.compile of %s failed (%s: %s); running it eagerly",
                self._name,
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
            )
            return self._fn(*args)
