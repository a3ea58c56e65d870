"""Optional dependencies, imported once and only where they are used."""

import functools
import importlib


@functools.lru_cache(maxsize=None)
def load(name: str):
    """The module ``name``, or None when it does not import."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def torchopt(needed_by: str):
    """The ``torchopt`` module, or an ImportError that says who needs it and
    how to install it (``vi.*`` and ``posteriors_fast.torchopt`` do)."""
    module = load("torchopt")
    if module is None:
        raise ImportError(
            f"{needed_by} needs the torchopt package: pip install torchopt (or pip install 'posteriors_fast[torchopt]')"
        )
    return module


def available(name: str) -> bool:
    """Whether the optional package ``name`` imports."""
    return load(name) is not None
