"""``separable_jacobian``: the per-sample output Jacobian (N, C, P) of the
suite's tanh MLP, verified sample-separable by one batch vector-Jacobian
product (what ``linearized_forward_diag`` and the Laplace GGN methods use).

Baseline ``jacrev`` of the batch forward (O(N²·C·P)); ``eager`` and
``compiled`` run the op (one reverse pass per sample and output, plus the check).
"""

import torch
from optree.integrations.torch import tree_ravel

from benchmarks.config import MODELS
from benchmarks.workloads import batch, forward, mlp_params, num_params
from posteriors_fast.ops import separable_jacobian


def _forward(params, batch_):
    return forward(params, batch_[0]), torch.tensor([])


PROVIDERS = ("jacrev(forward)", "eager", "compiled")
BASELINE = "jacrev(forward)"


def setup(case, provider, device):
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    data = tuple(t.to(device) for t in batch(case.model, case.n))
    z = _forward(params, data)[0]
    if provider == BASELINE:
        flat, unravel = tree_ravel(params)
        return lambda: torch.func.jacrev(lambda fp: _forward(unravel(fp), data)[0])(flat)

    def run():
        with torch.no_grad():
            jac = separable_jacobian.separable_output_jacobian(_forward, params, data, z, backend=provider)
        if jac is None:
            raise RuntimeError("the forward was not found sample-separable")
        return jac

    return run


def flops(case) -> float:
    """Nominal: a reverse pass per sample and output, about 4·N·C·P."""
    return 4.0 * case.n * MODELS[case.model][-1] * num_params(case.model)
