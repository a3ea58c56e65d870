"""Extended Kalman filters."""

from posteriors_fast.ekf import dense_fisher, diag_fisher, lowrank_fisher

__all__ = ["dense_fisher", "diag_fisher", "lowrank_fisher"]
