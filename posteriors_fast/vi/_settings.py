"""What the variational methods share: the validation of their settings (the
optimizer step itself is :mod:`posteriors_fast._internal.torchopt_step`) and
how a process group enters the negative ELBO."""

import contextlib
import math

import torch
from optree import tree_leaves

from posteriors_fast._internal import checks as _checks


def check_settings(temperature, n_samples) -> None:
    """``temperature`` finite and >= 0; ``n_samples`` a positive integer."""
    t = _checks.scalar_value(temperature, "temperature")
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be finite and >= 0, got {t}")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")


#: The modes of posteriors_fast.distributed the variational methods run in.
MODES = ("data", "chains")


def local_temperature(group, temperature: float, batch) -> float:
    """The weight of log q in this rank's negative ELBO. The data-parallel
    ELBO is Σ_r w_r (log p_r − T log q) with the same draws on every rank: the
    weighted mean (w_r = n_r/N, Σ w_r = 1) keeps T; the sum (w_r = 1) would
    count log q once per rank, so each of the K ranks with samples takes T/K
    of it (an empty shard is not evaluated; K comes from one small all-gather
    of the shard sizes, in this mode only)."""
    if group is None or group.mode == "chains" or group.resolved_reduction("scalar") == "mean":
        return temperature
    n = group.local_rows(batch)
    sizes = group.all_gather(torch.tensor([1 if n is None else n], dtype=torch.int64))
    return temperature / max(1, sum(int(s[0]) > 0 for s in sizes))


def noise(group, params):
    """Context for the step's draws from q: as they are without a group; the
    group's noise stream with one (the same draws on every rank of a
    data-parallel group, seed + rank for ``chains``)."""
    if group is None:
        return contextlib.nullcontext()
    leaves = tree_leaves(params)
    return group.noise(leaves[0].device if leaves else None)
