"""Backend names, the global default, and validation of ``backend=`` arguments."""

import contextlib
import contextvars
import os
from typing import Iterator

from posteriors_fast.backends.families import require

BACKENDS = ("eager", "compiled")
#: ``"compiled"`` restricted to one kernel family: the family's implementation
#: of every op that has one, eager torch for the rest; an error when the family
#: is not available here (see :mod:`posteriors_fast.backends.families`).
FAMILY_BACKENDS = ("compiled:triton", "compiled:cpp", "compiled:torch_compile")
ENV_VAR = "POSTERIORS_FAST_BACKEND"

# A ContextVar (not a plain global) so that use_backend() in one thread or task
# does not leak into another.
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("posteriors_fast_backend", default=None)
_global_default: str | None = None


def _validate(name, source: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS + FAMILY_BACKENDS:
        raise ValueError(
            f"{source}={name!r} is not a posteriors_fast backend; "
            f"valid names are {', '.join(repr(b) for b in BACKENDS)} "
            f"(or one kernel family: {', '.join(repr(b) for b in FAMILY_BACKENDS)})"
        )
    if name in FAMILY_BACKENDS:
        require(name.split(":", 1)[1])
    return name


def get_backend() -> str:
    """The backend used when ``backend=None`` is passed.

    Order: the innermost :func:`use_backend` block, then :func:`set_backend`, then
    the ``POSTERIORS_FAST_BACKEND`` environment variable, then ``"eager"``.
    """
    scoped = _current.get()
    if scoped is not None:
        return scoped
    if _global_default is not None:
        return _global_default
    env = os.environ.get(ENV_VAR)
    if env is None or env == "":
        return "eager"
    return _validate(env.strip(), f"environment variable {ENV_VAR}")


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"eager"`` or ``"compiled"``).

    Raises:
        ValueError: ``name`` is not a known backend.
    """
    global _global_default
    _global_default = _validate(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: inside the block ``backend=None`` means ``name``.

    ``build`` resolves its backend when it is called, so a transform built inside
    the block keeps that backend after the block ends.
    """
    token = _current.set(_validate(name, "backend"))
    try:
        yield name
    finally:
        _current.reset(token)


def resolve(backend: str | None) -> str:
    """Validate an explicit ``backend=`` argument or fetch the current default."""
    if backend is None:
        return get_backend()
    return _validate(backend, "backend")
