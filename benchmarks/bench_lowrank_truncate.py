"""``lowrank_truncate``: append K = N new columns to a (P, r) precision factor,
truncate back to rank r and take the EKF's Woodbury mean step, P = 10⁶ float32,
r = 20.

Baseline ``panel``: the plain-torch step a user would write (concatenate U and
Rᵀ into the (P, r + K) panel, its Gram, the small eigendecomposition, the
projection, the fold into the diagonal and the Woodbury step). ``eager`` runs
the op's two ATen passes over row chunks; ``cpp`` its second pass in the C++
kernel (``csrc/cpu/lowrank_truncate.cpp``), outputs from the block pool.
"""

import torch

from benchmarks.kernels import require
from posteriors_fast.ops import lowrank_truncate as op

PROVIDERS = ("panel", "eager", "cpp")
BASELINE = "panel"
RANK = 20


def _inputs(case, device):
    g = torch.Generator().manual_seed(0)
    diag = (torch.rand(case.p, generator=g) + 0.5).to(device)
    factor = (torch.randn(case.p, RANK, generator=g) * 0.1).to(device)
    rows = torch.randn(case.n, case.p, generator=g).to(device)
    vector = torch.randn(case.p, generator=g).to(device)
    return diag, factor, rows, vector


def _panel_step(diag, factor, rows, vector, scale):
    panel = torch.cat([factor, rows.mT * scale], 1)
    values, vectors = torch.linalg.eigh((panel.mT @ panel).double())
    new_factor = panel @ vectors[:, -RANK:].flip(-1).to(panel.dtype)
    new_diag = diag + panel.square().sum(1) - new_factor.square().sum(1)
    scaled = new_factor / new_diag[:, None]
    inner = torch.eye(RANK, dtype=torch.float64) + (new_factor.mT @ scaled).double()
    solved = torch.linalg.solve(inner, (scaled.mT @ vector).double()).to(panel.dtype)
    return new_diag, new_factor, (vector - new_factor @ solved) / new_diag


def setup(case, provider, device):
    diag, factor, rows, vector = _inputs(case, device)
    scale = 0.1
    if provider == "panel":
        return lambda: _panel_step(diag, factor, rows, vector, scale)
    if provider == "cpp":
        require("cpp", device)
    fn = op.lowrank_truncate_eager if provider == "eager" else op.lowrank_truncate_cpp
    return lambda: fn(diag, factor, rows, scale, RANK, vector)


def bytes_moved(case) -> float:
    """Nominal float32 traffic: R read twice (the Gram pass and the factor
    pass), U read twice, U_new written once."""
    return 4.0 * case.p * (2 * case.n + 3 * RANK)


def flops(case) -> float:
    """The Gram of the (P, r + K) panel and the (P, r + K)·(r + K, r) projection."""
    width = RANK + case.n
    return 2.0 * case.p * width * width + 2.0 * case.p * width * RANK
