"""Helpers shared by the native-op tests: tolerances, the extension skip, and
a run of the portable kernels in a child process."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

from posteriors_fast import _library

#: dtype -> (rtol, atol) against a float64 oracle.
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-11, 1e-11)}

EXT_LOADED, EXT_REASON = _library.load_extension()
needs_ext = pytest.mark.skipif(not EXT_LOADED, reason=f"extension not built: {EXT_REASON}")


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol * scale)


def run_portable(body: str, inputs):
    """Run ``body`` in a child process with POSTERIORS_FAST_PORTABLE_KERNELS=1
    (the code CPUs without AVX-512 take). ``body`` sees ``inputs`` (saved with
    ``torch.save``) as ``cases`` and the extension's ops as ``OPS``, and must
    assign ``out``, which is returned."""
    code = (
        "import sys, torch; from posteriors_fast import _library; _library.load_extension(); "
        "OPS = _library.OPS; cases = torch.load(sys.argv[1])\n" + body + "\ntorch.save(out, sys.argv[2])"
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save(inputs, paths[0])
        env = dict(os.environ, POSTERIORS_FAST_PORTABLE_KERNELS="1")
        subprocess.run([sys.executable, "-c", code, *paths], env=env, check=True)
        return torch.load(paths[1])
