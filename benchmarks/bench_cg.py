"""cg with 50 iterations (tol=0, so exactly 50): against the GGN (the reference
with its ggnvp closure, posteriors_fast with a library-built operator, built
inside the timed call) and against a dense SPD matrix."""

from functools import partial

import torch
from optree.integrations.torch import tree_ravel

from benchmarks.workloads import batch, forward, library, mlp_params, num_params

# Damping small enough that no provider converges (or breaks down, r = 0 giving
# NaN) before 50 iterations, checked in setup: a faster "cg(50)" that stopped
# early would be a false win.
ITERS, DAMPING = 50, 1e-4


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    x, y = (t.to(device) for t in batch(case.model, case.n))
    b = {k: torch.randn_like(t) for k, t in params.items()}
    run = partial(lib.cg, b=b, maxiter=ITERS, tol=0.0, damping=DAMPING, **kwargs)

    def solve(operator):
        x, info = run(operator)
        if info["niter"] != ITERS:
            raise RuntimeError(f"cg stopped after {info['niter']} iterations, not {ITERS}")
        return x, info

    fwd, loss = partial(forward, x=x), partial(torch.nn.functional.cross_entropy, target=y)
    if case.op.endswith("ggn operator"):
        if provider == "posteriors":
            return lambda: solve(lambda v: lib.ggnvp(fwd, loss, (params,), (v,), normalize=True)[1])
        from posteriors_fast import operators

        return lambda: solve(operators.ggn_operator(fwd, loss, params, normalize=True))
    flat, unravel = tree_ravel(params)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(flat.numel(), flat.numel(), generator=g).to(device) / flat.numel() ** 0.5
    spd = a @ a.T + torch.eye(flat.numel(), device=device)
    return lambda: solve(lambda v: unravel(spd @ tree_ravel(v)[0]))


def flops(case) -> float:
    """Nominal: 50 products; GGN 8·N·P each, dense 2·P² each."""
    p = num_params(case.model)
    return ITERS * (8 * case.n * p if case.op.endswith("ggn operator") else 2 * p * p)
