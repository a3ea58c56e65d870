"""``value_grad``: the gradient, value and finiteness witness of a cheap
log posterior (−½Σθ² over 10⁶ float32 entries in 4 leaves): the per-step
gradient of the samplers, where framework overhead and passes over memory
are the cost.

Baseline ``torch.func.grad_and_value`` (posteriors 0.0.5's); ``eager`` plain
autograd with the witness; ``compiled`` one graph (forward, reverse pass and
the witness sums fused) through the compile policy.
"""

import torch
from optree import tree_leaves

from posteriors_fast.ops import value_grad

PROVIDERS = ("grad_and_value", "eager", "compiled")
BASELINE = "grad_and_value"
SHAPES = [(500, 1000), (1000,), (400, 1000), (99000,)]


def _log_post(params, batch):
    return -0.5 * sum((x * x).sum() for x in tree_leaves(params)), torch.tensor([])


def setup(case, provider, device):
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g).to(device) for k, s in zip("abcd", SHAPES)}
    if provider == BASELINE:
        return lambda: torch.func.grad_and_value(_log_post, has_aux=True)(params, None)
    return lambda: value_grad.value_grad(_log_post, params, None, "log_posterior", backend=provider)


def bytes_moved(case) -> float:
    """Nominal float32 traffic: read θ, write the gradient."""
    return 2 * 4.0 * 1_000_000


def flops(case) -> float:
    return 3.0 * 1_000_000
