"""Registry of hot-op implementations and the ``"compiled"`` selection policy.

Each op module registers its implementations here at import time, one per
*family*: ``"eager"`` (pure torch, always present) and, where they exist and help,
``"triton"`` (CUDA), ``"cpp"`` (the extension in ``csrc/``, CPU) and
``"torch_compile"``. A family can be unavailable on this machine (no CUDA, triton
not installed, extension not built); its ``available`` callable says why.

``backend="eager"`` always runs the eager family. ``backend="compiled"`` runs the
first available family in :data:`COMPILED_PREFERENCE` that is registered for the
device, else the eager family, logged once per (op, device).
``backend="compiled:<family>"`` runs that family wherever the op has it for the
device and eager torch elsewhere (the family itself was checked to be available
when the backend name was validated).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import torch
from optree import tree_leaves

from posteriors_fast.backends import compile_policy
from posteriors_fast.backends.families import AVAILABILITY
from posteriors_fast.backends.selection import BACKENDS, _validate

logger = logging.getLogger("posteriors_fast")

#: The note of the CUDA kernels chosen without a GPU run to measure them.
UNMEASURED_ON_CUDA = (
    "unmeasured: no GPU has compared it with the eager cuBLAS/torch code yet (benchmarks/gpu_check.sh does)"
)

#: Order in which the compiled policy tries the faster families.
COMPILED_PREFERENCE = ("triton", "cpp", "torch_compile")
FAMILIES = ("eager",) + COMPILED_PREFERENCE


@dataclass
class _Impl:
    fn: Callable
    devices: Tuple[str, ...]
    available: Callable[[str], Tuple[bool, str]]
    note: str = ""


@dataclass
class _Op:
    doc: str
    impls: Dict[str, _Impl] = field(default_factory=dict)
    declined: Dict[str, str] = field(default_factory=dict)  # family -> why not

    def has_faster(self, backend: str, device_type: str) -> bool:
        """Whether a faster family than eager is registered for the device
        under ``backend`` (available or not): then running eager is a
        fallback, not the op's design."""
        families = COMPILED_PREFERENCE if backend == "compiled" else (backend.split(":", 1)[-1],)
        return any(f in self.impls and device_type in self.impls[f].devices for f in families)


_OPS: Dict[str, _Op] = {}
_CACHE: Dict[Tuple[str, str, str], Tuple[Callable, str, str]] = {}
#: Public functions that take ``backend=`` but have no hot op to dispatch:
#: name -> why both backends run the same code.
_NEUTRAL: Dict[str, str] = {}


def register(
    op: str,
    family: str,
    fn: Callable,
    *,
    doc: str = "",
    devices: Tuple[str, ...] = ("cpu", "cuda"),
    available: Callable[[str], Tuple[bool, str]] | None = None,
    note: str = "",
) -> Callable:
    """Register ``fn`` as the ``family`` implementation of hot op ``op``.

    Args:
        op: Op name, the same everywhere (``ops/<op>.py``, tests, benchmarks).
        family: One of :data:`FAMILIES`.
        fn: The implementation; all families of one op share a signature.
        doc: One line describing the op (taken from the first registration).
        devices: Device types the implementation runs on.
        available: ``available(device_type) -> (ok, reason)``; ``reason`` says
            what is missing. Defaults to the family's own check
            (:data:`posteriors_fast.backends.families.AVAILABILITY`).
        note: Shown by :func:`explain` when this implementation is chosen
            (e.g. that the choice has not been measured on that device).

    Returns:
        ``fn`` unchanged, so this can be used as a decorator helper.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    entry = _OPS.setdefault(op, _Op(doc=doc))
    entry.doc = entry.doc or doc
    entry.impls[family] = _Impl(fn, tuple(devices), available or AVAILABILITY[family], note)
    for key in [k for k in _CACHE if k[0] == op]:
        del _CACHE[key]
    return fn


def neutral(name: str, why: str) -> None:
    """Record that the public function ``name`` accepts ``backend=`` but runs
    the same code under every backend, and why (shown by :func:`explain`)."""
    _NEUTRAL[name] = why


def decline(op: str, family: str, reason: str) -> None:
    """Record that ``op`` deliberately has no ``family`` implementation and why
    (shown by :func:`explain` instead of "not implemented")."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    _OPS.setdefault(op, _Op(doc="")).declined[family] = reason


def _choose(op: str, backend: str, device_type: str) -> Tuple[Callable, str, str]:
    if op not in _OPS:
        raise KeyError(f"no hot op named {op!r}; known ops: {sorted(_OPS)}")
    impls = _OPS[op].impls
    eager = impls["eager"]
    if backend == "eager":
        return eager.fn, "eager", "pure torch, as requested"
    families = COMPILED_PREFERENCE
    if backend.startswith("compiled:"):
        families = (backend.split(":", 1)[1],)
    missing = []
    for family in families:
        impl = impls.get(family)
        if impl is None:
            why = _OPS[op].declined.get(family, "not implemented for this op")
            missing.append(f"{family}: {why}")
            continue
        if device_type not in impl.devices:
            why = _OPS[op].declined.get(family, f"not for {device_type}")
            missing.append(f"{family}: {why}")
            continue
        ok, why = impl.available(device_type)
        if ok:
            reason = f"best available compiled family on {device_type}"
            return impl.fn, family, f"{reason}; {impl.note}" if impl.note else reason
        missing.append(f"{family}: {why}")
    reasons = {m.split(": ", 1)[1] for m in missing}
    if len(missing) > 1 and len(reasons) == 1:  # one reason for every family
        missing = [f"{'/'.join(f for f in families)}: {reasons.pop()}"]
    reason = "fell back to eager torch (" + "; ".join(missing) + ")"
    return eager.fn, "eager", reason


def device_type_of(tree: Any) -> str:
    """The device type (``"cpu"``, ``"cuda"``) of the first tensor leaf of
    ``tree``, the device an op dispatches on; ``"cpu"`` without tensors."""
    return next((x.device.type for x in tree_leaves(tree) if isinstance(x, torch.Tensor)), "cpu")


def implementation(op: str, backend: str, device_type: str) -> Callable:
    """The callable that runs ``op`` for ``backend`` on ``device_type``.

    The choice is cached; a fallback of the compiled policy is logged once.
    """
    key = (op, backend, device_type)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _choose(op, backend, device_type)
        _CACHE[key] = hit
        if backend != "eager" and hit[1] == "eager" and _OPS[op].has_faster(backend, device_type):
            # WARNING, once per (op, backend, device): a user who asked for a
            # compiled backend sees that this op runs eager torch, and why.
            logger.warning("posteriors_fast: %s on %s under backend=%r: %s", op, device_type, backend, hit[2])
    return hit[0]


def report(op: str, backend: str, device_type: str) -> Tuple[str, str]:
    """``(family, reason)`` for what :func:`implementation` would pick."""
    _, family, reason = _choose(op, backend, device_type)
    return family, reason


def explain(device: str | None = None, backend: str | None = None) -> str:
    """Human-readable table: for every hot op, what runs here and why.

    Args:
        device: ``"cpu"`` or ``"cuda"``; defaults to CUDA when available.
        backend: Backend to explain; defaults to both ``"eager"`` and ``"compiled"``.

    Returns:
        The table as a string (also handy to ``print``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = BACKENDS if backend is None else (_validate(backend, "backend"),)
    lines = [f"posteriors_fast hot ops on device={device}:"]
    for op in sorted(_OPS):
        lines.append(f"  {op}: {_OPS[op].doc}")
        for b in backends:
            family, reason = report(op, b, device)
            lines.append(f"    backend={b!r:<11} -> {family:<13} {reason}")
    if _NEUTRAL:
        lines.append("functions whose backend= selects nothing (every backend runs the same torch code):")
        lines.extend(f"  {name}: {why}" for name, why in sorted(_NEUTRAL.items()))
    lines.append(f"torch.compile of the graphs that run your functions: {compile_policy.describe()}")
    return "\n".join(lines)
