"""Which arguments the native (C++ / Triton) kernels take; the op modules send
anything else to their eager torch implementation."""

from typing import Optional

import torch

_FLOATS = (torch.float32, torch.float64)


def accepts(*tensors: Optional[torch.Tensor], out: Optional[torch.Tensor] = None, autograd: bool = True) -> bool:
    """True when every given tensor (``None`` skipped, ``out`` included) is
    real float32 or float64, all of one dtype and one device, ``out`` (if any)
    is row-major, and, with ``autograd``, none requires grad while grad mode is
    on (the native ops are not differentiable). False for no tensors at all.
    """
    given = [t for t in (out,) + tensors if t is not None]
    if not given or given[0].dtype not in _FLOATS:
        return False
    if out is not None and out.stride(-1) != 1:
        return False
    first = given[0]
    grad = autograd and torch.is_grad_enabled()
    return all(t.dtype == first.dtype and t.device == first.device and not (grad and t.requires_grad) for t in given)


def cpu_vendor() -> str:
    """The CPU's vendor (``vendor_id`` of /proc/cpuinfo: ``GenuineIntel``,
    ``AuthenticAMD``), or ``""`` where that is not known."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""
