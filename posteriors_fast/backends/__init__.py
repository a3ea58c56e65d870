"""The one place that decides which implementation of a hot op runs.

Two user-facing backends exist:

* ``"eager"``: pure torch, any device.
* ``"compiled"``: a policy, not an implementation. For every hot op it picks the
  best *available* faster implementation (Triton on CUDA, the C++ extension on
  the CPU, ``torch.compile``) and falls back to the eager torch code, with one log
  line per op and device, when none is available.

The global default comes from ``POSTERIORS_FAST_BACKEND`` (else ``"eager"``) and
can be changed with :func:`set_backend` or, for a block, :func:`use_backend`.
Every ``build`` and every utils function with a hot path takes ``backend=``;
``None`` means the global default at the time of the call to ``build`` (or of
the utils function).

:func:`explain` says, per op, what will actually run on this machine and why.
"""

from posteriors_fast.backends.families import BackendUnavailableError
from posteriors_fast.backends.registry import (
    UNMEASURED_ON_CUDA,
    decline,
    device_type_of,
    explain,
    implementation,
    neutral,
    register,
    report,
)
from posteriors_fast.backends.selection import (
    BACKENDS,
    ENV_VAR,
    FAMILY_BACKENDS,
    get_backend,
    resolve,
    set_backend,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "get_backend",
    "set_backend",
    "use_backend",
    "resolve",
    "register",
    "implementation",
    "report",
    "explain",
    "decline",
    "neutral",
    "UNMEASURED_ON_CUDA",
    "device_type_of",
    "BackendUnavailableError",
    "FAMILY_BACKENDS",
]
