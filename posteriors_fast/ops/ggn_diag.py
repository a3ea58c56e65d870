"""``ggn_diag``: the diagonal of ``Jᵀ H J`` from J (d, P) and ``H J`` (d, P),
column by column, without forming the (P, P) matrix."""

import torch

from posteriors_fast.backends import implementation, register
from posteriors_fast.backends.compile_policy import GuardedCompile


def ggn_diag_eager(jac: torch.Tensor, hess_jac: torch.Tensor) -> torch.Tensor:
    """``diag_i = Σ_j jac[j, i] · hess_jac[j, i]``: (P,).

    A product and a column sum: at d = 640, P = 4890 this takes 1 ms where
    ``torch.einsum("jp,jp->p", ...)`` takes 46 ms (it becomes P tiny matmuls).
    """
    return (jac * hess_jac).sum(0)


register(
    "ggn_diag",
    "eager",
    ggn_diag_eager,
    doc="diag(JᵀHJ) from J and HJ, never forming P×P",
)


#: Below this many entries of J the eager product fits in cache and the fused
#: graph gains nothing. Measured, float32, 2 threads, ms eager / compiled, d×P:
#: 320×4890 0.17 / 0.14; 640×4890 0.43 / 0.49; 1280×4890 1.46 / 1.45;
#: 2560×4890 15.2 / 3.4; 640×20000 15.6 / 3.0 (the eager (d, P) temporary no
#: longer fits the 32 MB cache there; the fused multiply-sum never writes it).
COMPILE_MIN_NUMEL = 1 << 23


_compiled = GuardedCompile(ggn_diag_eager, "the GGN diagonal", dynamic=True, fullgraph=True)


def ggn_diag_torch_compile(jac: torch.Tensor, hess_jac: torch.Tensor) -> torch.Tensor:
    """The eager formula fused by ``torch.compile`` for large J, eager below
    :data:`COMPILE_MIN_NUMEL` (and whenever autograd must see the result)."""
    if jac.numel() < COMPILE_MIN_NUMEL or (torch.is_grad_enabled() and (jac.requires_grad or hess_jac.requires_grad)):
        return ggn_diag_eager(jac, hess_jac)
    return _compiled(jac, hess_jac)


register("ggn_diag", "torch_compile", ggn_diag_torch_compile)


def ggn_diag(jac: torch.Tensor, hess_jac: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("ggn_diag", backend, jac.device.type)(jac, hess_jac)
