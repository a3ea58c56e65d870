"""The Triton kernels of ``posteriors_fast.kernels.triton``, imported once for
this folder so that they run on CPU tensors under the Triton interpreter.

``triton.jit`` reads ``TRITON_INTERPRET`` when a function is decorated, so the
variable is set only while the kernel modules are imported and then restored:
it does not leak into the test modules collected after this folder, whose own
``triton.jit`` kernels would otherwise be interpreted too.

What cannot be undone in-process: the kernel modules stay imported, with
interpreted kernels, for the rest of the session, and so does triton's own
device library (``tl.sum`` and the rest of ``triton.language.standard`` are
``triton.jit`` functions decorated when triton is first imported, which must
happen here: an interpreted kernel can only call interpreted functions). A
Triton kernel compiled later in the same process that calls them (Inductor's
on CUDA, say) then fails to compile: on a CUDA machine, run this folder in a
pytest process of its own.
"""

import importlib
import importlib.util
import os

import pytest
import torch

#: The kernel modules (``cov_downdate`` imports ``syrk``; all import the
#: launch helpers of ``_launch``, which define no kernel).
KERNEL_MODULES = (
    "posteriors_fast.kernels.triton._launch",
    "posteriors_fast.kernels.triton.syrk",
    "posteriors_fast.kernels.triton.cov_downdate",
    "posteriors_fast.kernels.triton.cg_step",
)

#: ``TRITON_INTERPRET`` as found before the import (``None`` if unset).
TRITON_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")


def import_interpreted(names=KERNEL_MODULES):
    """Import ``names`` with ``TRITON_INTERPRET=1`` set for the import only.

    A module imported earlier without it keeps its compiled kernels (the
    import is a cache hit);
    ``test_kernels_are_interpreted_and_triton_interpret_does_not_leak``
    reports that.
    """
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        modules = [importlib.import_module(name) for name in names]
        # The first launch's argument specialisation (native code) imports
        # triton.experimental.gluon, which wraps triton.language's functions
        # and asserts that they are JIT functions unless TRITON_INTERPRET is
        # set: have it imported now, inside the window.
        import torch
        import triton.runtime.jit

        triton.runtime.jit.mangle_type(torch.empty(0))
        return modules
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


#: On a CUDA machine this folder runs only when asked to (its own process):
#: its interpreted imports would break the compiled kernels of tests/kernels_cuda.
INTERPRET_HERE = not torch.cuda.is_available() or os.environ.get("POSTERIORS_FAST_TRITON_INTERPRET") == "1"

if importlib.util.find_spec("triton") is not None and INTERPRET_HERE:
    import_interpreted()


def pytest_collection_modifyitems(config, items):
    if INTERPRET_HERE:
        return
    skip = pytest.mark.skip(
        reason="CUDA present: the compiled Triton kernels are tested by tests/kernels_cuda; this folder "
        "runs them under the interpreter in a process of its own (POSTERIORS_FAST_TRITON_INTERPRET=1, "
        "as benchmarks/gpu_check.sh does)"
    )
    folder = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if str(item.fspath).startswith(folder):
            item.add_marker(skip)


@pytest.fixture
def triton_interpret_before():
    """``TRITON_INTERPRET`` as it was before the kernel modules were imported."""
    return TRITON_INTERPRET_BEFORE
