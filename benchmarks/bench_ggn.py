"""ggn and diag_ggn of forward (tanh MLP logits) and cross-entropy, normalised."""

from functools import partial

import torch

from benchmarks.config import MODELS
from benchmarks.workloads import batch, forward, library, mlp_params, num_params


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    x, y = (t.to(device) for t in batch(case.model, case.n))
    fn = lib.ggn if case.op == "ggn" else lib.diag_ggn
    curvature = fn(
        partial(forward, x=x), partial(torch.nn.functional.cross_entropy, target=y), normalize=True, **kwargs
    )
    return lambda: curvature(params)


def flops(case) -> float:
    """Nominal: ggn d·P² (upper half of JᵀHJ, d = N·C); diag_ggn 2·d·P."""
    d = case.n * MODELS[case.model][-1]
    p = num_params(case.model)
    return d * p * p if case.op == "ggn" else 2 * d * p
