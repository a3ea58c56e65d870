"""Calling a compiled graph without the frame hook of ``torch.compile``.

A call of a ``torch.compile``'d function goes through dynamo's Python wrapper,
which installs a frame-evaluation hook, evaluates the guards of each cached
graph of the function's code, runs the transformed code and removes the hook
again. For the small graphs the compile policy serves that is a large share:
the SGHMC gradient of the 2,410-parameter model of the ``sghmc_long``
workflow (``benchmarks/workflows.py``) took 109-117 µs per call through
``torch.compile`` and 86-89 µs by :func:`direct_caller`, back to back on 2 CPU
cores (its kernels alone: 65-68 µs).

:func:`direct_caller` does the same work without the hook, for a function
whose code holds exactly one cached graph and no graph break: it evaluates
that graph's own guard manager on the arguments (dynamo's guards, every one
of them) and, when they hold, runs dynamo's transformed code directly. When
they do not, it says so and the caller goes through ``torch.compile`` as
usual (which then recompiles, and the policy sees it). Anything of the
internals it relies on that is missing (another torch version) makes it
return None: the regular path serves. So does a ``torch.compiler.set_stance``
other than the default, and a call made while dynamo traces.
"""

import functools
import types
from typing import Any, Callable, Optional, Tuple

import torch

#: The result of a call whose guards failed: go through ``torch.compile``.
MISSED: Tuple[bool, Any] = (False, None)


@functools.cache
def _entry_lister() -> Optional[Callable[[types.CodeType], list]]:
    # Looked up once: the import statement alone cost 0.7 µs on every call.
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return None
    return _debug_get_cache_entry_list


def cache_entries(code: Optional[types.CodeType]) -> Optional[list]:
    """dynamo's cache entries (one per compiled graph) for ``code``; None
    for no code, or where this torch does not expose them."""
    lister = _entry_lister()
    return None if code is None or lister is None else lister(code)


def _stance_reader() -> Optional[Callable[[], bool]]:
    """``() -> whether torch.compile runs its graphs as usual`` (no
    ``torch.compiler.set_stance`` in effect that changes that, such as
    ``"force_eager"``), or None where the stance cannot be read."""
    try:
        from torch._dynamo import eval_frame
    except ImportError:
        return None
    stance = getattr(eval_frame, "_stance", None)
    if getattr(stance, "stance", None) is None or not hasattr(stance, "backend"):
        return None

    def usual() -> bool:
        current = eval_frame._stance
        return current.stance == "default" and current.backend is None

    return usual


def _has_graph_break(transformed: types.CodeType) -> bool:
    """Whether dynamo's transformed code continues in a resume function (a
    graph break: the rest of the function must run under the hook to be
    compiled) or calls no compiled graph at all."""
    names = transformed.co_names
    if any("resume" in name for name in names):
        return True
    return not any(name.startswith("__compiled_fn") for name in names)


def direct_caller(compiled: Callable) -> Optional[Callable[[tuple], Tuple[bool, Any]]]:
    """For ``compiled = torch.compile(fn)`` after its first (compiling) call:
    ``call(args) -> (True, fn's result)`` when the guards of its one cached
    graph hold for ``args`` (positional, as ``fn`` takes them), else
    :data:`MISSED`. None when this does not apply: ``fn`` has a closure,
    defaults, ``*args`` or keyword-only arguments, its code holds more or
    fewer than one graph, the graph breaks, or this torch lacks what it needs.
    """
    fn = getattr(compiled, "_torchdynamo_orig_callable", None)
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ or fn.__defaults__ or fn.__kwdefaults__:
        return None
    if code.co_kwonlyargcount or code.co_flags & (0x04 | 0x08):  # *args, **kwargs
        return None
    entries = cache_entries(code)
    if not entries or len(entries) != 1:
        return None
    transformed = getattr(entries[0], "code", None)
    if not isinstance(transformed, types.CodeType) or transformed.co_freevars:
        return None
    if not callable(getattr(getattr(entries[0], "guard_manager", None), "check", None)):
        return None
    names = code.co_varnames[: code.co_argcount]
    if transformed.co_argcount != code.co_argcount or transformed.co_varnames[: code.co_argcount] != names:
        return None
    usual = _stance_reader()
    if usual is None or _has_graph_break(transformed):
        return None
    run = types.FunctionType(transformed, fn.__globals__, code.co_name)
    count = len(names)
    is_compiling = torch.compiler.is_compiling

    def call(args: tuple) -> Tuple[bool, Any]:
        # Inside someone else's trace, or under a stance such as "force_eager",
        # torch.compile's own path decides what runs.
        if len(args) != count or is_compiling() or not usual():
            return MISSED
        # The entry as dynamo holds it now (about 1 µs): gone after a reset, and
        # its guard manager replaced by one that always fails once an object
        # an identity guard names is freed (a new object at the same address
        # would pass the old one).
        current = cache_entries(code)
        if len(current) != 1 or current[0].code is not transformed:
            return MISSED
        try:
            hold = current[0].guard_manager.check(dict(zip(names, args)))
        except Exception:  # a guard that cannot be evaluated here: torch.compile's path decides
            return MISSED
        return (True, run(*args)) if hold else MISSED

    return call
