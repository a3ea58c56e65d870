"""The log densities the Laplace tests share, on the MLP of tests._trees."""

import torch

from .._trees import forward
from ..methods import log_likelihood as log_post  # noqa: F401  (batch mean, logits as aux)
from ..methods import log_likelihood_per_sample as log_post_per_sample  # noqa: F401  (one value per sample)


def forward_fn(p, batch):
    """The network's outputs for the GGN methods, a tensor aux."""
    return forward(p, batch[0]), batch[0].sum()


def outer(z, batch):
    """The summed log-likelihood of the outputs."""
    return -torch.nn.functional.cross_entropy(z, batch[1], reduction="sum")
