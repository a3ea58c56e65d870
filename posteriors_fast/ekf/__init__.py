"""Extended Kalman filters."""

from posteriors_fast.ekf import dense_fisher

__all__ = ["dense_fisher"]
