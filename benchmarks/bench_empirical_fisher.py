"""empirical_fisher of per_samplify(log_likelihood), normalised, with aux."""

from benchmarks.workloads import batch, library, log_likelihood, mlp_params, num_params


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    data = tuple(t.to(device) for t in batch(case.model, case.n))
    fisher = lib.empirical_fisher(lib.per_samplify(log_likelihood), has_aux=True, normalize=True, **kwargs)
    return lambda: fisher(params, data)


def flops(case) -> float:
    """Nominal: N·P² (one symmetric rank-N product)."""
    return case.n * num_params(case.model) ** 2
