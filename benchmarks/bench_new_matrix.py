"""``new_matrix``: the (P, P) output of an update, allocated and written once
(``fill_``), then dropped: what a functional update does with its new
precision or covariance every step.

Baseline ``torch.empty`` (fresh pages from malloc when the block is large);
``cpp`` takes the block from the extension's pool, so its pages were touched
before. Between calls an unrelated allocation of the same size is made and
freed (as a reference or model step would), which is what makes malloc hand
out fresh pages.
"""

import torch

from benchmarks.kernels import require
from posteriors_fast.ops import new_matrix

PROVIDERS = ("torch.empty", "cpp")
BASELINE = "torch.empty"


def setup(case, provider, device):
    like = torch.zeros(1, device=device)
    shape = (case.p, case.p)
    if provider == "cpp":
        require("cpp", device)
    make = new_matrix.new_matrix_eager if provider == BASELINE else new_matrix.new_matrix_cpp

    def churn():
        torch.empty(shape, device=device).fill_(1.0)  # an unrelated step's temporary

    return (lambda: make(shape, like).fill_(0.0)), churn


def bytes_moved(case) -> float:
    """One write of the float32 matrix."""
    return 4.0 * case.p * case.p


def flops(case) -> float:
    return 0.0
