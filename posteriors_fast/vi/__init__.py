"""Variational inference."""

from posteriors_fast.vi import dense, diag

__all__ = ["diag", "dense"]
