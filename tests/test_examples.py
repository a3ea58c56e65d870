"""The examples run (small settings) and their numbers make sense: each
writes its figure, and the scores it prints are checked, not only its exit."""

import contextlib
import importlib.util
import math
import os

import pytest

from posteriors_fast.backends import selection
from tests.conftest import skip_unless_installed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

for _module, _why in (("sklearn", "scikit-learn's bundled data"), ("matplotlib", "PNG figures"), ("torchopt", "vi")):
    skip_unless_installed(importlib.util.find_spec(_module) is not None, f"{_module} is not installed ({_why})")


@contextlib.contextmanager
def _default_backend_restored():
    before = selection._global_default
    try:
        yield
    finally:
        selection._global_default = before


@pytest.fixture(autouse=True)
def _restore_the_default_backend():
    """The examples call ``set_backend`` (the process-wide default, "compiled"
    unless told otherwise): put back what was set before, so later tests see
    the default they expect."""
    with _default_backend_restored():
        yield


def test_the_default_backend_is_restored():
    before = selection._global_default
    with _default_backend_restored():
        selection.set_backend("compiled" if before != "compiled" else "eager")
        assert selection._global_default != before
    assert selection._global_default == before


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_calibration_example(tmp_path):
    results = _load("calibration").main(["--quick", "--out", str(tmp_path)])
    assert set(results) == {"MAP", "Laplace", "EKF", "VI", "SG-MCMC"}
    for name, got in results.items():
        assert math.isfinite(got["nll"]) and 0.0 <= got["ece"] <= 1.0, (name, got)
        # Every posterior keeps the MAP's accuracy on digits (about 0.96) ...
        assert got["acc"] > 0.9, (name, got)
    # ... and none is badly miscalibrated (an uncalibrated Laplace with the
    # weak prior scores NLL ~1 and ECE ~0.5).
    assert max(got["nll"] for got in results.values()) < 0.3
    assert max(got["ece"] for got in results.values()) < 0.1
    assert (tmp_path / "calibration.png").stat().st_size > 10_000


def test_streaming_ekf_example(tmp_path):
    result = _load("streaming_ekf").main(["--quick", "--out", str(tmp_path)])
    snaps = result["snapshots"]
    first, last = snaps[0], snaps[-1]
    # The posterior tightens as data arrives, towards the noise level 0.1 ...
    assert last["sd_inside"] < 0.6 * first["sd_inside"] and last["sd_inside"] > 0.1
    # ... and its mean follows the data.
    assert last["rmse_inside"] < 0.8 * first["rmse_inside"]
    assert (tmp_path / "streaming_ekf.png").stat().st_size > 10_000


def test_lowrank_digits_example(tmp_path):
    results = _load("lowrank_digits").main(["--quick", "--out", str(tmp_path)])
    size = results["P"]
    for family in ("laplace", "ekf"):
        got = results[family]
        assert got["ranks"][-1] == size
        kls = [row["kl"] for row in got["lowrank"]]
        # The low-rank posterior approaches the dense one as the rank grows
        # (KL in float64 from the precisions) ...
        assert all(b < a for a, b in zip(kls, kls[1:])), (family, kls)
        # ... it is nearer than the diagonal at every rank ...
        assert kls[0] < got["diag"]["kl"], (family, kls, got["diag"]["kl"])
        # ... and at full rank it is the dense posterior (KL ~ 1e-10 measured).
        assert abs(kls[-1]) < 1e-6, (family, kls)
        for row in [got["dense"], got["diag"], *got["lowrank"]]:
            assert row["acc"] > 0.9 and math.isfinite(row["nll"]) and 0.0 <= row["ece"] <= 1.0, (family, row)
        # Full rank predicts as the dense posterior does.
        assert abs(got["lowrank"][-1]["nll"] - got["dense"]["nll"]) < 1e-3
    assert (tmp_path / "lowrank_digits.png").stat().st_size > 10_000
