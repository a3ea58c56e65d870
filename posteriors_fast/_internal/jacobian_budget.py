"""The memory budget of per-sample Jacobians: how many samples' rows are
held at once (``POSTERIORS_FAST_JACOBIAN_MB``, default 1024 MiB, read at
import; :func:`set_budget_mb` in code), and the slicing of a batch into
blocks of samples. :mod:`posteriors_fast._internal.jacobian_chunks` builds
the Jacobian block by block; :mod:`posteriors_fast.ops.sample_jacobian`
bounds its vmap chunks by the same budget.
"""

import math
import os
from typing import Any, List, Tuple

import torch
from optree import tree_map

#: The environment variable that sets the budget, in MiB.
ENV = "POSTERIORS_FAST_JACOBIAN_MB"
#: 1 GiB: a (256, 10⁶) float32 Jacobian fits whole; at P = 10⁷ it is built
#: 26 samples at a time.
DEFAULT_MB = 1024.0


def _read_env() -> float:
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_MB
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV} must be a number of MiB > 0, got {raw!r}") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{ENV} must be a finite number of MiB > 0, got {raw!r}")
    return value


_budget_mb = _read_env()


def budget_bytes() -> int:
    """The current budget for one block of per-sample Jacobian rows, in bytes."""
    return int(_budget_mb * 2**20)


def set_budget_mb(mb: float) -> float:
    """Set the budget (MiB, > 0); returns the previous value."""
    global _budget_mb
    value = float(mb)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"the Jacobian budget must be a finite number of MiB > 0, got {mb!r}")
    previous, _budget_mb = _budget_mb, value
    return previous


def samples_per_chunk(n: int, rows_per_sample: int, size: int, itemsize: int) -> int:
    """How many of ``n`` samples, each with ``rows_per_sample`` Jacobian rows
    of ``size`` entries of ``itemsize`` bytes, fit in the budget (at least 1)."""
    per_sample = max(1, rows_per_sample * size * itemsize)
    return max(1, min(n, budget_bytes() // per_sample))


def sample_slices(n: int, per_chunk: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n)`` in chunks of at most
    ``per_chunk`` samples, as equal as possible (fewer distinct shapes for the
    compiled graphs)."""
    if n <= per_chunk:
        return [(0, n)]
    count = -(-n // per_chunk)
    bounds = [round(i * n / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def take(batch: Any, start: int, stop: int, n: int) -> Any:
    """The samples ``start:stop`` of a batch: every tensor leaf with leading
    dimension ``n`` is sliced; other leaves pass through."""

    def cut(leaf):
        if isinstance(leaf, torch.Tensor) and leaf.ndim > 0 and leaf.shape[0] == n:
            return leaf[start:stop]
        return leaf

    return tree_map(cut, batch)
