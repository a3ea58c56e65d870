"""hvp, fvp and ggnvp at the MLP with cross-entropy."""

from functools import partial

import torch

from benchmarks.workloads import batch, forward, library, log_likelihood_per_sample, mlp_params, num_params


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    data = tuple(t.to(device) for t in batch(case.model, case.n))
    x, y = data
    v = {k: torch.randn_like(t) for k, t in params.items()}
    loss = partial(torch.nn.functional.cross_entropy, target=y)
    if case.op == "hvp":
        return lambda: lib.hvp(lambda p: loss(forward(p, x)), (params,), (v,), **kwargs)
    if case.op == "fvp":
        return lambda: lib.fvp(
            lambda p: log_likelihood_per_sample(p, data)[0], (params,), (v,), normalize=True, **kwargs
        )
    return lambda: lib.ggnvp(partial(forward, x=x), loss, (params,), (v,), normalize=True, **kwargs)


def flops(case) -> float:
    """Nominal: 8·N·P (about four passes of 2·N·P over the MLP)."""
    return 8 * case.n * num_params(case.model)
