"""Laplace approximations."""

from posteriors_fast.laplace import (
    dense_fisher,
    dense_ggn,
    dense_hessian,
    diag_fisher,
    diag_ggn,
    lowrank_fisher,
    lowrank_ggn,
)

__all__ = [
    "dense_fisher",
    "dense_ggn",
    "dense_hessian",
    "diag_fisher",
    "diag_ggn",
    "lowrank_fisher",
    "lowrank_ggn",
]
