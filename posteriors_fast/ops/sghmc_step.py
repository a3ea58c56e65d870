"""``sghmc_step``: the elementwise part of an SGHMC update for lists of leaves,

$$ θ' = θ + s\\,m, \\qquad m' = k\\,m + ε\\,g + c\\,ξ, \\quad ξ \\sim N(0, I). $$

Eager torch runs it as ``torch._foreach_*`` passes with ξ from
``torch.randn_like`` leaf by leaf (posteriors 0.0.5's draws, so seeded chains
match the reference). The C++ kernel (``posteriors_fast::sghmc_step``) draws ξ
in registers from the generator of :mod:`~posteriors_fast.ops.normal` and makes
one pass over θ, m, g (``benchmarks/bench_sghmc_step.py``, 10⁶ float32
parameters in 4 leaves: about 4x the eager passes).
"""

from typing import List, Tuple

import torch

from posteriors_fast import _library
from posteriors_fast._internal.native import accepts
from posteriors_fast.backends import decline, implementation, register
from posteriors_fast.ops.normal import normal_eager, random_seed

Leaves = List[torch.Tensor]


def sghmc_step_eager(params: Leaves, momenta: Leaves, grads: Leaves, step, keep, lr, scale) -> Tuple[Leaves, Leaves]:
    """Foreach passes; the reference's noise draws."""
    with torch.no_grad():
        new_params = torch._foreach_add(params, momenta, alpha=step)
        new_momenta = torch._foreach_mul(momenta, keep)
        torch._foreach_add_(new_momenta, grads, alpha=lr)
        torch._foreach_add_(new_momenta, normal_eager(momenta), alpha=scale)
    return new_params, new_momenta


def sghmc_step_cpp(params: Leaves, momenta: Leaves, grads: Leaves, step, keep, lr, scale) -> Tuple[Leaves, Leaves]:
    """One fused C++ pass per leaf; eager torch for anything it does not take
    (no leaves, mixed or non-float dtypes or devices)."""
    if not accepts(*params, *momenta, *grads, autograd=False):  # runs under no_grad
        return sghmc_step_eager(params, momenta, grads, step, keep, lr, scale)
    # Nothing is written and nothing differentiated (no_grad): straight to the
    # CPU kernel, past _library's Python autograd kernel.
    with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
        new_params, new_momenta = _library.OPS.sghmc_step(
            params, momenta, grads, float(step), float(keep), float(lr), float(scale), random_seed()
        )
    return list(new_params), list(new_momenta)


register(
    "sghmc_step",
    "eager",
    sghmc_step_eager,
    doc="θ + s·m and k·m + ε·g + c·ξ for lists of leaves (SGHMC)",
)
register("sghmc_step", "cpp", sghmc_step_cpp, devices=("cpu",))
decline("sghmc_step", "triton", "not provided: on CUDA the foreach kernels and torch.randn already run in parallel")
decline("sghmc_step", "torch_compile", "not provided: the C++ kernel serves the CPU")


def sghmc_step(params, momenta, grads, step, keep, lr, scale, *, backend: str) -> Tuple[Leaves, Leaves]:
    """Dispatching entry point; ``backend`` must already be resolved."""
    device = params[0].device.type if params else "cpu"
    return implementation("sghmc_step", backend, device)(params, momenta, grads, step, keep, lr, scale)
