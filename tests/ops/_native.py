"""Helpers shared by the native-op tests: tolerances and the extension skip."""

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
