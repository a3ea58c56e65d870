"""Launch helpers shared by the Triton kernel modules (not an op): the
device of a launch, the CUDA device guard around it, the launch itself
(``torch.library.wrap_triton``, with the fake-tensor rules of the
interpreter) and argument checks with messages naming the argument.
"""

import contextlib
from typing import Optional

import torch
from torch._subclasses.fake_tensor import is_fake


def _is_interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of older/newer triton
        return False
    return isinstance(kernel, InterpretedFunction)


def kernel_device(tensors) -> Optional[torch.device]:
    """The one device of a launch's tensor arguments (``None`` if there are
    none); ``ValueError`` if they are on several. The ops check their own
    arguments first, with messages naming them; this also covers the scratch
    tensors and every launch."""
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"a Triton kernel's tensors must be on one device, got {names}")
    return next(iter(devices), None)


def device_guard(device: Optional[torch.device]):
    """``torch.cuda.device(device)`` for a CUDA device, else a no-op context.

    Triton launches on the current CUDA device, with its current stream,
    whatever device the pointers belong to: tensors on ``cuda:1`` while
    ``cuda:0`` is current would be read by a kernel running on ``cuda:0``.
    The guard costs a device exchange on entry and one on exit, microseconds
    against the tens a Triton launch takes from Python.
    """
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs) -> None:
    """``torch.library.wrap_triton(kernel)[grid](*args, **kwargs)`` on the
    device of the tensor arguments (:func:`device_guard`), except that under
    ``TRITON_INTERPRET=1`` with fake (or meta) tensors nothing is launched.

    Compiled kernels go through ``wrap_triton``'s higher-order op, whose fake
    implementation is a no-op (a mutation changes no metadata). Interpreted
    kernels are returned by ``wrap_triton`` as they are and would read the fake
    tensors' data pointers, so the same no-op is done here for plain fake-tensor
    propagation; inside a graph trace (proxy or functionalization mode) the
    kernel could not be captured, so that raises instead of dropping it. No
    device guard is entered for fake or meta tensors: nothing runs, and a graph
    being traced does not record it (the compiled graph guards its own device).
    """
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
    device = kernel_device(tensors)
    if any(is_fake(t) or t.is_meta for t in tensors):
        if _is_interpreted(kernel):
            modes = (torch._C._TorchDispatchModeKey.PROXY, torch._C._TorchDispatchModeKey.FUNCTIONAL)
            if any(torch._C._get_dispatch_mode(key) is not None for key in modes):
                # A graph being traced would silently lose the kernel.
                raise RuntimeError(
                    "cannot trace an interpreted Triton kernel (TRITON_INTERPRET=1) into a graph: "
                    "aot_dispatch / torch.compile over a Triton op needs CUDA"
                )
            return
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
        return
    with device_guard(device):
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def check_factor(name: str, t: torch.Tensor, shape_doc: str) -> None:
    """The low-rank factor (``a`` of syrk, ``w`` of the downdate): a 2-D
    float32/float64 tensor; ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 2-D tensor of shape {shape_doc}, got {got}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")


def check_like(name: str, t: torch.Tensor, shape, ref: torch.Tensor, ref_name: str) -> None:
    """``t`` has ``shape`` and the dtype and device of ``ref``."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on device {ref.device} (that of {ref_name}), got {t.device}")
