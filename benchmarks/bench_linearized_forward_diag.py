"""linearized_forward_diag with a diagonal posterior sd of 0.1."""

import torch

from benchmarks.config import MODELS
from benchmarks.workloads import batch, forward, library, mlp_params, num_params


def _forward_with_aux(params, x):
    return forward(params, x), torch.tensor([])


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    x, _ = (t.to(device) for t in batch(case.model, case.n))
    sd = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    return lambda: lib.linearized_forward_diag(_forward_with_aux, params, x, sd, **kwargs)


def flops(case) -> float:
    """Nominal: 2·N·C²·P for the per-sample J Σ Jᵀ."""
    return 2 * case.n * MODELS[case.model][-1] ** 2 * num_params(case.model)
