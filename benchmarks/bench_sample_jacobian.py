"""``sample_jacobian``: the (N, P) per-sample Jacobian of a batch
log-likelihood evaluated one sample at a time (the tanh MLP with
cross-entropy of the suite).

Baseline ``jacrev(per_samplify(f))``: what posteriors 0.0.5 differentiates (the
vmapped batch function as a whole, O(N²·P)). ``eager`` is the op's vmap of one
reverse pass per sample (O(N·P)); ``compiled`` the same in one graph through
the compile policy (warm-up compiles it; ``compile_s`` reports the cost).
"""

import torch

from benchmarks.workloads import batch, log_likelihood, mlp_params, num_params
from posteriors_fast.ops import sample_jacobian
from posteriors_fast.utils import per_samplify

PROVIDERS = ("jacrev(per_samplify)", "eager", "compiled")
BASELINE = "jacrev(per_samplify)"


def setup(case, provider, device):
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    data = tuple(t.to(device) for t in batch(case.model, case.n))
    if provider == BASELINE:
        per_sample = per_samplify(log_likelihood)
        return lambda: torch.func.jacrev(per_sample, has_aux=True)(params, data)
    return lambda: sample_jacobian.sample_jacobian(log_likelihood, params, data, True, backend=provider)


def flops(case) -> float:
    """Nominal: forward and reverse pass per sample, about 6·N·P."""
    return 6.0 * case.n * num_params(case.model)
