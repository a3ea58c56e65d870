"""``normal``: standard normal noise shaped like a list of tensors (the
SG-MCMC noise draws).

Eager torch draws leaf by leaf with ``torch.randn_like``, exactly as
posteriors 0.0.5 does, so seeded chains match the reference bit for bit. The
C++ family draws all leaves at once from a counter-based generator
(``posteriors_fast::normal_``, Philox + Box-Muller, parallel and vectorised),
seeded from torch's default generator so ``torch.manual_seed`` still makes runs
reproducible; the draws are different numbers from the same distribution.
torch's CPU ``normal_`` is one serial stream
(``benchmarks/bench_normal.py``, 10⁶ float32 draws: the C++ family about 5x
faster on 2 threads).
"""

from typing import List

import torch

from posteriors_fast import _library
from posteriors_fast._internal.native import accepts
from posteriors_fast.backends import decline, implementation, register

_SEED_HIGH = 2**62


def random_seed() -> int:
    """A seed for the C++ generator drawn from torch's default generator, so
    that ``torch.manual_seed`` makes the draws reproducible."""
    return int(torch.randint(_SEED_HIGH, (), dtype=torch.int64))


def normal_eager(leaves: List[torch.Tensor]) -> List[torch.Tensor]:
    """``[torch.randn_like(x) for x in leaves]``: the reference's draws."""
    return [torch.randn_like(x) for x in leaves]


def normal_cpp(leaves: List[torch.Tensor]) -> List[torch.Tensor]:
    """All draws in one buffer from the C++ generator; eager for anything it
    does not take (no leaves, mixed or non-float dtypes)."""
    if not accepts(*leaves, autograd=False):  # only their shapes are used
        return normal_eager(leaves)
    flat = torch.empty(sum(x.numel() for x in leaves), dtype=leaves[0].dtype)
    # Only this function holds ``flat``: no version to advance, nothing to
    # differentiate, so the op goes straight to its CPU kernel past the
    # Python kernels of _library (which cost more than a small draw).
    with torch._C._AutoDispatchBelowADInplaceOrView():
        _library.OPS.normal_(flat, random_seed())
    return [part.view(x.shape) for part, x in zip(flat.split([x.numel() for x in leaves]), leaves)]


register(
    "normal",
    "eager",
    normal_eager,
    doc="standard normal noise like a list of tensors (SG-MCMC)",
)
register("normal", "cpp", normal_cpp, devices=("cpu",))
decline("normal", "triton", "not provided: CUDA's torch.randn is already a parallel Philox generator")
decline(
    "normal",
    "torch_compile",
    "not provided: the C++ generator serves the CPU and torch.randn is already parallel on CUDA",
)


def normal(leaves: List[torch.Tensor], *, backend: str) -> List[torch.Tensor]:
    """Dispatching entry point; ``backend`` must already be resolved."""
    device = leaves[0].device.type if leaves else "cpu"
    return implementation("normal", backend, device)(leaves)
