"""What the per-op benches share: whether a kernel family can run here."""

from posteriors_fast import _library
from posteriors_fast.backends import families


def require(provider: str, device: str) -> None:
    """Raise ImportError (reported as "unavailable") when ``provider``, a
    kernel family, cannot run on ``device``."""
    if provider == "cpp":
        ok, why = _library.load_extension()
        if not ok or device != "cpu":
            raise ImportError(why or "the C++ kernels run on the CPU")
    elif provider == "triton":
        ok, why = families.triton_available(device)
        if not ok or device != "cuda":
            raise ImportError(why or "the Triton kernels run on CUDA")
