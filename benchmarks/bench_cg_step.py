"""The vector work of one conjugate-gradient iteration (no matvec: ``ap`` is
given), on flat float32 vectors of length P.

Baseline ``eager``: the op's eager formulas (``cg_step_eager``: three dots,
two axpy-like updates and the direction update, about ten dispatches and seven
passes over memory). ``cpp``: the fused C++ step
(``posteriors_fast::cg_step_``, three passes). ``torch_compile``: the same
formulas compiled by Inductor. Each timed call starts from the same x, r, p
(restored untimed), so every provider does identical arithmetic.
"""

import torch

from benchmarks.kernels import require
from posteriors_fast.ops import cg_step

PROVIDERS = ("eager", "cpp", "torch_compile", "triton")
BASELINE = "eager"
MAX_REPS = 200  # a step at P = 10⁴ takes tens of µs


def _state(case, device):
    g = torch.Generator().manual_seed(0)
    x0, r0, ap = (torch.randn(case.p, generator=g).to(device) for _ in range(3))
    ap = ap.abs() + 1.0
    return x0, r0, ap


def setup(case, provider, device):
    x0, r0, ap = _state(case, device)
    if provider == "copy":
        dst = torch.empty_like(x0)
        return lambda: dst.copy_(x0)
    x, r, p = x0.clone(), r0.clone(), r0.clone()
    gamma = torch.dot(r0, r0)

    def reset():
        x.copy_(x0)
        r.copy_(r0)
        p.copy_(r0)

    if provider in ("cpp", "triton"):
        require(provider, device)
    fn = {
        "eager": cg_step.cg_step_eager,
        "cpp": cg_step.cg_step_cpp,
        "torch_compile": cg_step.cg_step_torch_compile,
        "triton": cg_step.cg_step_triton,
    }[provider]

    def step():
        return fn(x, r, p, ap, gamma, 0.0)

    return step, reset


def bytes_moved(case) -> float:
    """Nominal traffic of the fused step: 11 float32 vector passes
    (p, ap | x, r, p, ap read, x, r written | r, p read, p written)."""
    return 11 * 4.0 * case.p


def copy_bytes(case, device: str = "cpu") -> float:
    """``copy`` copies one vector into a preallocated one: a read and a write."""
    return 2 * 4.0 * case.p


def flops(case) -> float:
    """Nominal 10 floating-point operations per entry."""
    return 10.0 * case.p
