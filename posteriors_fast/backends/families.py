"""Kernel families and whether each is usable on this machine.

A family is a way of implementing hot ops: ``"eager"`` (pure torch, always),
``"triton"`` (CUDA), ``"cpp"`` (the extension built from ``csrc/``, CPU) and
``"torch_compile"``. Each check takes the device type an op would run on
(None: any device the family serves) and returns ``(ok, reason)``; ``reason``
says what is missing and how to get it, so the same text serves
:func:`explain` and the error raised when a user asks for an unavailable
family explicitly.
"""

import functools
import importlib.util
import shutil
from typing import Callable, Dict, Optional, Tuple

import torch

from posteriors_fast import _library


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    # find_spec, not import: triton is imported only where a kernel runs.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked installation
        return False


def triton_available(device_type: Optional[str] = None) -> Tuple[bool, str]:
    if not _triton_importable():
        return False, "triton is not installed (pip install 'posteriors_fast[triton]')"
    if not torch.cuda.is_available():
        return False, "no CUDA device (the Triton kernels run on CUDA)"
    return True, ""


def cpp_available(device_type: Optional[str] = None) -> Tuple[bool, str]:
    return _library.load_extension()


def torch_compile_available(device_type: Optional[str] = None) -> Tuple[bool, str]:
    """Inductor generates C++ for the CPU (needs a compiler) and Triton for
    CUDA (needs triton): what is needed depends on the device."""
    if device_type == "cuda":
        if not _triton_importable():
            return False, "torch.compile on CUDA generates Triton kernels, and triton is not installed"
        return True, ""
    if not any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang")):
        return False, "no C/C++ compiler on PATH (torch.compile's CPU code generation needs one)"
    return True, ""


def eager_available(device_type: Optional[str] = None) -> Tuple[bool, str]:
    return True, ""


#: family -> availability check, called with the device type.
AVAILABILITY: Dict[str, Callable[[Optional[str]], Tuple[bool, str]]] = {
    "eager": eager_available,
    "triton": triton_available,
    "cpp": cpp_available,
    "torch_compile": torch_compile_available,
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested kernel family cannot run here."""


def require(family: str) -> None:
    """Raise :class:`BackendUnavailableError` naming what to install or build
    when ``family`` is not available on this machine."""
    ok, why = AVAILABILITY[family]()
    if not ok:
        raise BackendUnavailableError(
            f"backend='compiled:{family}' was requested but the {family} kernels are "
            f"not available here: {why}. Use backend='compiled' to fall back automatically."
        )
