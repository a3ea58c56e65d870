"""``cg_step``: the vector work of one conjugate-gradient iteration for the
operator ``A + damping·I`` on flat real vectors, given ``ap = A p``
(undamped) and ``gamma = r·r``:

$$ α = \\frac{γ}{pᵀ(Ap) + δ\\,pᵀp},\\quad x ← x + α p,\\quad
r ← r - α (Ap + δ p),\\quad γ' = rᵀr,\\quad p ← r + \\frac{γ'}{γ} p, $$

written in place into x, r and p; the new γ' is returned (0-d). The eager
formulas make seven passes over memory in about ten torch calls; the C++
kernel (``csrc/cpu/cg_step.cpp``) and the Triton kernel
(``kernels/triton/cg_step.py``) make the three passes the data dependencies
allow. :func:`solve` runs the whole CG loop, with this step wherever it
applies (real float32/float64, no preconditioner, no autograd) and with the
general loop (preconditioned, complex or differentiated) otherwise.

The user's operator is applied to flat vectors (the pytree wrapping happens
once, in ``utils.cg``); the one host synchronisation per iteration is the
convergence test.
"""

import importlib
from typing import Callable, Dict, Optional, Tuple

import torch

from posteriors_fast import _library
from posteriors_fast.backends import UNMEASURED_ON_CUDA, decline, implementation, register
from posteriors_fast.backends.compile_policy import GuardedCompile


def cg_step_eager(x, r, p, ap, gamma, damping: float) -> torch.Tensor:
    """The step's formulas in torch."""
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


register("cg_step", "eager", cg_step_eager, doc="one CG iteration's vector updates, in place (x, r, p)")


def cg_step_cpp(x, r, p, ap, gamma, damping: float) -> torch.Tensor:
    """The C++ kernel (``csrc/cpu/cg_step.cpp``): three passes, parallel."""
    return _library.OPS.cg_step_(x, r, p, ap, gamma, float(damping))


def cg_step_triton(x, r, p, ap, gamma, damping: float) -> torch.Tensor:
    """The Triton kernels (``kernels/triton/cg_step.py``), imported on first use."""
    kernels = importlib.import_module("posteriors_fast.kernels.triton.cg_step")
    return kernels.cg_step_triton(x, r, p, ap, gamma, float(damping))


# One graph for all sizes (dynamic=True) so CG on a new problem size does not
# recompile; damping is specialised (0 or not), at most two graphs per dtype.
_compiled_step = GuardedCompile(cg_step_eager, "the CG step", dynamic=True, fullgraph=True)


def cg_step_torch_compile(x, r, p, ap, gamma, damping: float) -> torch.Tensor:
    """The eager formulas fused by ``torch.compile`` (eager if that fails)."""
    return _compiled_step(x, r, p, ap, gamma, float(damping))


register("cg_step", "cpp", cg_step_cpp, devices=("cpu",))
register("cg_step", "triton", cg_step_triton, devices=("cuda",), note=UNMEASURED_ON_CUDA)
# benchmarks/bench_cg_step.py: torch.compile of the step on the CPU runs at
# 0.5x eager at P = 10⁴ (call overhead) and 1.0x at P = 10⁷, where the C++
# step runs at 2.8x and 1.3x; so the compiled policy never picks it there.
register("cg_step", "torch_compile", cg_step_torch_compile, devices=("cuda",))
decline("cg_step", "torch_compile", "not on the CPU: slower than eager at P = 10⁴ (call overhead)")


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


def _solve_general(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    x0: torch.Tensor,
    maxiter: int,
    damping: float,
    tol: float,
    atol: float,
    precond: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> Tuple[torch.Tensor, Dict]:
    """Textbook preconditioned CG (z₀ = M r₀ is the first direction), for
    any dtype, with autograd through the iterations when anything records a
    graph. Convergence is tested on ‖r‖²."""

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


def _fused_ok(b: torch.Tensor, x0: torch.Tensor, precond) -> bool:
    grad = torch.is_grad_enabled() and (b.requires_grad or x0.requires_grad)
    return precond is None and b.dtype in (torch.float32, torch.float64) and not grad


def solve(matvec, b, x0, maxiter, damping, tol, atol, precond, *, backend: str) -> Tuple[torch.Tensor, Dict]:
    """Solve ``(A + damping·I) x = b`` (see :func:`posteriors_fast.utils.cg`);
    ``backend`` must already be resolved.

    The step runs in place on private copies, so ``b`` and ``x0`` are never
    written. The operator is checked once, on its first product: one that
    records a graph or changes dtype or shape sends the solve to the general
    loop.
    """
    if not _fused_ok(b, x0, precond):
        return _solve_general(matvec, b, x0, maxiter, damping, tol, atol, precond)
    x = x0.detach().clone().contiguous()
    ax = matvec(x)
    if ax.requires_grad or ax.dtype != b.dtype or ax.shape != b.shape:
        return _solve_general(matvec, b, x0, maxiter, damping, tol, atol, precond)
    step = implementation("cg_step", backend, b.device.type)
    threshold = _threshold(b, tol, atol)
    r = (b - ax).contiguous()
    if damping != 0:
        r.sub_(x, alpha=damping)
    p = r.clone()
    gamma = torch.dot(r, r)
    k = 0
    while k < maxiter and bool(gamma > threshold):
        gamma = step(x, r, p, matvec(p).contiguous(), gamma, float(damping))
        k += 1
    return x, {"error": gamma, "converged": gamma <= threshold, "niter": k}
