"""laplace.dense_fisher / diag_fisher updates (per_sample False and True),
laplace.diag_ggn update and dense sample(100)."""

import torch
from optree.integrations.torch import tree_ravel

from benchmarks.config import MODELS
from benchmarks.workloads import (
    batch,
    forward,
    library,
    log_likelihood,
    log_likelihood_per_sample,
    mlp_params,
    num_params,
)


def _outer(z, batch_):
    return -torch.nn.functional.cross_entropy(z, batch_[1], reduction="sum")


def _forward(params, batch_):
    return forward(params, batch_[0]), torch.tensor([])


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    data = tuple(t.to(device) for t in batch(case.model, case.n))
    if case.op.startswith("laplace.dense_fisher.update") or case.op.startswith("laplace.diag_fisher.update"):
        per_sample = case.op.endswith("per_sample")
        fn = log_likelihood_per_sample if per_sample else log_likelihood
        method = lib.laplace.dense_fisher if "dense" in case.op else lib.laplace.diag_fisher
        prior = {"init_prec": 1.0} if "dense" in case.op else {"init_prec_diag": 1.0}
        transform = method.build(fn, per_sample=per_sample, **prior, **kwargs)
        state = transform.init(params)
        return lambda: transform.update(state, data)
    if case.op == "laplace.diag_ggn.update":
        transform = lib.laplace.diag_ggn.build(_forward, _outer, init_prec_diag=1.0, **kwargs)
        state = transform.init(params)
        return lambda: transform.update(state, data)
    # sample(100) from the same precision: identity plus one batch's Fisher.
    import posteriors_fast

    fast = posteriors_fast.laplace.dense_fisher
    prec = fast.build(log_likelihood, init_prec=1.0).update(fast.init(params, 1.0), data).prec
    if case.op.endswith("flat params"):
        # The same distribution with the parameters as one 1-d leaf: the only
        # layout in which posteriors 0.0.5's dense sample works (its reshape
        # defect breaks leaves with two or more dimensions).
        params = {"flat": tree_ravel(params)[0]}
    state = lib.laplace.dense_fisher.DenseLaplaceState(params, prec.clone())
    return lambda: lib.laplace.dense_fisher.sample(state, torch.Size([100]))


def flops(case) -> float:
    """Nominal: dense Fisher N·P² (symmetric rank-N update); diag GGN 2·N·C·P;
    sample 2·100·P² (one triangular solve with 100 right-hand sides)."""
    p = num_params(case.model)
    if case.op.startswith("laplace.dense_fisher.update"):
        return case.n * p * p
    if case.op.startswith("laplace.diag_fisher.update"):
        return 2 * case.n * p
    if case.op == "laplace.diag_ggn.update":
        return 2 * case.n * MODELS[case.model][-1] * p
    return 2 * 100 * p * p
