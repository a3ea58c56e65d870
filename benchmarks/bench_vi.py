"""vi.diag update (one sample, Adam)."""

import torchopt

from benchmarks.workloads import batch, library, log_likelihood, mlp_params, num_params


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    data = tuple(t.to(device) for t in batch(case.model, case.n))
    transform = lib.vi.diag.build(log_likelihood, torchopt.adam(1e-3), init_log_sds=-3.0)
    state = transform.init(params)
    return lambda: transform.update(state, data)


def flops(case) -> float:
    """Nominal: 6·N·P (a forward and a backward pass of the MLP)."""
    return 6 * case.n * num_params(case.model)
