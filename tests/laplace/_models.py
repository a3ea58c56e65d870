"""The log densities the Laplace tests share, on the MLP of tests._trees."""

import torch

from .._trees import forward


def log_post(p, batch):
    """Mean log-likelihood of the batch (a scalar), logits as aux."""
    x, y = batch
    z = forward(p, x)
    return -torch.nn.functional.cross_entropy(z, y), z


def log_post_per_sample(p, batch):
    """One log-likelihood per sample, logits as aux."""
    x, y = batch
    z = forward(p, x)
    return -torch.nn.functional.cross_entropy(z, y, reduction="none"), z


def forward_fn(p, batch):
    """The network's outputs for the GGN methods, a tensor aux."""
    return forward(p, batch[0]), batch[0].sum()


def outer(z, batch):
    """The summed log-likelihood of the outputs."""
    return -torch.nn.functional.cross_entropy(z, batch[1], reduction="sum")
