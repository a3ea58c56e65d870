"""``new_matrix``: the uninitialised output of an update that returns a new
dense precision or covariance (a P×P matrix every step).

Eager torch allocates it with ``torch.empty``. On the CPU the compiled backend
takes it from the C++ extension's block pool (``posteriors_fast::new_matrix``):
a block freed by the previous step's state is handed out again instead of
fresh pages, which cost a page fault per 4 KiB on first touch. That is what
malloc hands out for blocks above its mmap threshold (32 MB at most) and
whenever its heap was trimmed (``benchmarks/bench_new_matrix.py``: a 95 MB
matrix, P = 4890, allocated and written about 3x faster from the pool; a
4.4 MB one, P = 1045, that malloc keeps reusing, about 0.7x). Blocks idle in
the pool are capped (``POSTERIORS_FAST_POOL_MB``, default 512; 0 disables
pooling).
"""

from typing import Sequence

import torch

from posteriors_fast import _library
from posteriors_fast.backends import decline, implementation, register


def new_matrix_eager(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """``torch.empty(shape)`` with ``like``'s dtype and device."""
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


def new_matrix_cpp(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A pooled block (contiguous, ``like``'s dtype) on the CPU. ``like`` only
    gives the dtype: detached, so a fresh buffer never joins an autograd graph
    (an in-place differentiable write into it still records its own node)."""
    return _library.OPS.new_matrix(list(shape), like.detach())


register("new_matrix", "eager", new_matrix_eager, doc="uninitialised output matrix of an update (torch.empty)")
register("new_matrix", "cpp", new_matrix_cpp, devices=("cpu",))
decline("new_matrix", "triton", "not needed: CUDA's caching allocator already reuses freed blocks")
decline("new_matrix", "torch_compile", "an allocation has nothing to compile")


def new_matrix(shape: Sequence[int], like: torch.Tensor, *, backend: str) -> torch.Tensor:
    """Dispatching entry point; ``backend`` must already be resolved."""
    return implementation("new_matrix", backend, like.device.type)(shape, like)


def pool_idle_bytes(release: bool = False) -> int:
    """Bytes idle in the CPU block pool (0 without the extension); with
    ``release``, free them first."""
    if not _library.load_extension()[0]:
        return 0
    return int(_library.OPS.pool_idle_bytes(release))
