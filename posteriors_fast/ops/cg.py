"""``cg``: conjugate gradient on one flat vector.

The user's operator is applied to flat vectors (the pytree wrapping happens once,
in ``utils.cg``); the only host synchronisation per iteration is the
convergence test.

Eager torch runs each iteration as ~10 vector ops (7 passes over memory). The
faster families run the vector work of an iteration as one *fused CG step*
(``posteriors_fast::cg_step_``, three passes, see ``_library.py``): the C++
kernel on the CPU, Triton on CUDA, or the same formulas under
``torch.compile``. The fused step serves unpreconditioned real float32/float64
systems without autograd; anything else runs the eager loop.
"""

import functools
import importlib
from typing import Callable, Dict, Optional, Tuple

import torch

from posteriors_fast import _library
from posteriors_fast.backends import decline, implementation, register


def vdot_real(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Real part of ``xᴴy`` for flat vectors (imaginary cross terms dropped:
    every use here is a quadratic form of a Hermitian PD operator)."""
    if x.is_complex() or y.is_complex():
        return torch.dot(x.real, y.real) + torch.dot(x.imag, y.imag)
    return torch.dot(x, y)


def _threshold(b: torch.Tensor, tol: float, atol: float) -> torch.Tensor:
    """Squared-residual level of convergence, max(tol²·‖b‖², atol²), shape (1,)."""
    real = b.real if b.is_complex() else b
    return torch.clamp_min(vdot_real(b, b) * tol**2, atol**2).reshape(1).to(real.dtype)


def cg_eager(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    maxiter: int,
    damping: float,
    tol: float,
    atol: float,
    precond: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> Tuple[torch.Tensor, Dict]:
    """Solve ``(A + damping·I) x = b``; see :func:`posteriors_fast.utils.cg`."""

    def apply(v):
        out = matvec(v)
        return out + damping * v if damping != 0 else out

    threshold = _threshold(b, tol, atol)
    x = x0.clone()
    r = b - apply(x)
    z = r if precond is None else precond(r)
    p = z.clone()
    gamma = vdot_real(r, z)
    k = 0

    def residual(r_, gamma_):
        return gamma_ if precond is None else vdot_real(r_, r_)

    # With autograd recording (b, x0 or the operator carry a graph) the updates
    # must be out of place so that gradients flow through the solve.
    track = torch.is_grad_enabled() and (r.requires_grad or x.requires_grad)
    while k < maxiter and bool(residual(r, gamma) > threshold):
        ap = apply(p)
        alpha = gamma / vdot_real(p, ap)
        if track or ap.requires_grad:
            track = True
            x = x + alpha * p
            r = r - alpha * ap
        else:
            x.addcmul_(alpha, p)
            r.addcmul_(alpha, ap, value=-1)
        z = r if precond is None else precond(r)
        gamma_next = vdot_real(r, z)
        p = z + (gamma_next / gamma) * p if track else p.mul_(gamma_next / gamma).add_(z)
        gamma = gamma_next
        k += 1

    err = residual(r, gamma)
    return x, {"error": err, "converged": err <= threshold, "niter": k}


register(
    "cg",
    "eager",
    cg_eager,
    doc="conjugate gradient iterations on one flat vector",
)


def _fused_ok(b: torch.Tensor, x0: torch.Tensor, precond) -> bool:
    grad = torch.is_grad_enabled() and (b.requires_grad or x0.requires_grad)
    return precond is None and b.dtype in (torch.float32, torch.float64) and not grad


def _cg_fused(step, matvec, b, x0, maxiter, damping, tol, atol, precond):
    """The CG loop of :func:`cg_eager` with the vector work of each iteration
    done by ``step(x, r, p, ap, gamma, damping) -> gamma_new`` (in place).
    The operator is checked once, on its first product: one that records a
    graph or changes dtype or shape sends the solve to the eager loop."""
    if not _fused_ok(b, x0, precond):
        return cg_eager(matvec, b, x0, maxiter, damping, tol, atol, precond)
    x = x0.detach().clone().contiguous()
    ax = matvec(x)
    if ax.requires_grad or ax.dtype != b.dtype or ax.shape != b.shape:
        return cg_eager(matvec, b, x0, maxiter, damping, tol, atol, precond)
    threshold = _threshold(b, tol, atol)
    r = b - ax
    if damping != 0:
        r.sub_(x, alpha=damping)
    p = r.clone()
    gamma = torch.dot(r, r)
    k = 0
    while k < maxiter and bool(gamma > threshold):
        gamma = step(x, r, p, matvec(p).contiguous(), gamma, float(damping))
        k += 1
    return x, {"error": gamma, "converged": gamma <= threshold, "niter": k}


def _step_torch(x, r, p, ap, gamma, damping: float):
    """The fused step's formulas in torch (what ``torch.compile`` fuses)."""
    pap = torch.dot(p, ap)
    if damping != 0:
        pap = pap + damping * torch.dot(p, p)
        ap = ap + damping * p
    alpha = gamma / pap
    x.add_(alpha * p)
    r.sub_(alpha * ap)
    gamma_new = torch.dot(r, r)
    p.mul_(gamma_new / gamma).add_(r)
    return gamma_new


@functools.lru_cache(maxsize=None)
def _compiled_step():
    # One graph for all sizes (dynamic=True) so CG on a new problem size does
    # not recompile; damping is specialised (0 or not), at most two graphs.
    return torch.compile(_step_torch, dynamic=True, fullgraph=True)


def cg_cpp(matvec, b, x0, maxiter, damping, tol, atol, precond):
    """CG with the C++ fused step (``csrc/cpu/cg_step.cpp``)."""
    return _cg_fused(_library.OPS.cg_step_, matvec, b, x0, maxiter, damping, tol, atol, precond)


def cg_triton(matvec, b, x0, maxiter, damping, tol, atol, precond):
    """CG with the Triton fused step (``kernels/triton/cg_step.py``)."""
    step = importlib.import_module("posteriors_fast.kernels.triton.cg_step").cg_step_triton
    return _cg_fused(step, matvec, b, x0, maxiter, damping, tol, atol, precond)


def cg_torch_compile(matvec, b, x0, maxiter, damping, tol, atol, precond):
    """CG with the torch-level fused step compiled by ``torch.compile``."""
    return _cg_fused(_compiled_step(), matvec, b, x0, maxiter, damping, tol, atol, precond)


register("cg", "cpp", cg_cpp, devices=("cpu",))
register("cg", "triton", cg_triton, devices=("cuda",))
# torch.compile of the step on the CPU, same run (benchmarks/bench_cg_step.py,
# float32, 2 threads): 0.5x eager at P = 10⁴ (call overhead), 1.2x at P = 10⁷,
# against 1.7x and 1.3x for the C++ step; so the compiled policy never picks it
# on the CPU (it must not be slower than eager at any size).
register("cg", "torch_compile", cg_torch_compile, devices=("cuda",))
decline("cg", "torch_compile", "not on the CPU: measured 0.5x eager at P = 10⁴ (call overhead)")


def cg(matvec, b, x0, maxiter, damping, tol, atol, precond, *, backend: str):
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("cg", backend, b.device.type)(
        matvec, b, x0, maxiter, damping, tol, atol, precond
    )
