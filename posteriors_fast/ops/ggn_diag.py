"""``ggn_diag``: the diagonal of ``Jᵀ H J`` from J (d, P) and ``H J`` (d, P),
column by column, without forming the (P, P) matrix."""

import torch

from posteriors_fast.backends import implementation, register
from posteriors_fast.backends.compile_policy import GuardedCompile


def ggn_diag_eager(jac: torch.Tensor, hess_jac: torch.Tensor) -> torch.Tensor:
    """``diag_i = Σ_j jac[j, i] · hess_jac[j, i]``: (P,).

    A product and a column sum: ``torch.einsum("jp,jp->p", ...)`` becomes P
    tiny products instead (``benchmarks/bench_ggn_diag.py``: over 30x slower
    at d×P = 640×4890).
    """
    return (jac * hess_jac).sum(0)


register(
    "ggn_diag",
    "eager",
    ggn_diag_eager,
    doc="diag(JᵀHJ) from J and HJ, never forming P×P",
)


#: Below this many entries of J the eager product's (d, P) temporary fits in
#: the last-level cache and the fused graph gains nothing; above it the fused
#: multiply-sum, which never writes the temporary, wins
#: (``benchmarks/bench_ggn_diag.py``: d×P = 640×4890 eager faster,
#: 640×20000 compiled about 1.7x faster).
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
