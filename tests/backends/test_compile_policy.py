"""The tiered ``torch.compile`` of the per-sample Jacobian: when it compiles,
that the compiled Jacobian equals the eager one, that it does not recompile,
and that failures fall back (or propagate the user's own error)."""

import logging

import pytest
import torch

from posteriors_fast.backends import compile_policy as _tiered
from posteriors_fast.ops import sample_jacobian as jacobian
from posteriors_fast.ops import separable_jacobian


def _mlp(dtype, sizes=(3, 5, 4)):
    g = torch.Generator().manual_seed(0)
    params = {
        "w": {"a": torch.randn(sizes[0], sizes[1], generator=g, dtype=dtype)},
        "v": torch.randn(sizes[1], sizes[2], generator=g, dtype=dtype),
        "b": torch.randn(sizes[2], generator=g, dtype=dtype),
    }
    x = torch.randn(7, sizes[0], generator=g, dtype=dtype)
    y = torch.randint(0, sizes[2], (7,), generator=g)
    return params, (x, y)


def _logits(params, batch):
    x, _ = batch
    return torch.tanh(x @ params["w"]["a"]) @ params["v"] + params["b"]


def log_lik(params, batch):
    z = _logits(params, batch)
    return -torch.nn.functional.cross_entropy(z, batch[1]), z


def forward(params, batch):
    return _logits(params, batch), None  # multi-output, aux that is not a tensor


class _Recorder:
    """Stands in for torch.compile: counts compiles and compiled calls."""

    def __init__(self, fail=False):
        self.compiles = 0
        self.calls = 0
        self.fail = fail

    def __call__(self, tiered):
        self.compiles += 1
        eager = tiered._fn

        def compiled(*args):
            self.calls += 1
            if self.fail:
                raise RuntimeError("backend compiler failed\nsecond line")
            return eager(*args)

        return compiled


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    tiered = _tiered.TieredCompile(jacobian.sample_jacobian_eager, "the per-sample Jacobian")
    monkeypatch.setattr(tiered, "_compile", lambda: rec(tiered))
    monkeypatch.setattr(jacobian, "_tiered_sample_jacobian", tiered)
    return rec


def _jac(f, params, batch, **kw):
    with torch.no_grad():
        return jacobian.sample_jacobian(f, params, batch, True, backend="compiled:torch_compile", **kw)


def test_compiles_on_the_nth_call_with_one_signature(recorder):
    params, batch = _mlp(torch.float64)
    for call in range(1, _tiered.COMPILE_AFTER + 3):
        _jac(log_lik, params, batch)
        assert recorder.compiles == (call >= _tiered.COMPILE_AFTER)
    assert recorder.calls == 3
    # Another batch size is the same signature (batch sizes are dynamic) ...
    _jac(log_lik, params, (batch[0][:4], batch[1][:4]))
    assert recorder.compiles == 1 and recorder.calls == 4
    # ... another dtype is a new one, counted from zero.
    params32, batch32 = _mlp(torch.float32)
    for _ in range(_tiered.COMPILE_AFTER - 1):
        _jac(log_lik, params32, batch32)
    assert recorder.compiles == 1


def test_a_function_rebuilt_every_call_is_never_compiled(recorder):
    params, batch = _mlp(torch.float64)
    for _ in range(2 * _tiered.COMPILE_AFTER):
        _jac(lambda p, b: log_lik(p, b), params, batch)
    assert recorder.compiles == 0


def test_eager_when_autograd_must_see_through(recorder):
    params, batch = _mlp(torch.float64)
    params["b"].requires_grad_(True)
    for _ in range(2 * _tiered.COMPILE_AFTER):
        jacobian.sample_jacobian(log_lik, params, batch, True, backend="compiled:torch_compile")
    assert recorder.compiles == 0


def test_a_failed_compile_is_logged_once_and_runs_eagerly(monkeypatch, caplog):
    rec = _Recorder(fail=True)
    tiered = _tiered.TieredCompile(jacobian.sample_jacobian_eager, "the per-sample Jacobian")
    monkeypatch.setattr(tiered, "_compile", lambda: rec(tiered))
    monkeypatch.setattr(jacobian, "_tiered_sample_jacobian", tiered)
    params, batch = _mlp(torch.float64)
    want = jacobian.sample_jacobian_eager(log_lik, params, batch, True)[0]
    with caplog.at_level(logging.WARNING, logger="posteriors_fast"):
        for _ in range(_tiered.COMPILE_AFTER + 3):
            torch.testing.assert_close(_jac(log_lik, params, batch)[0], want, rtol=0, atol=0)
    assert rec.calls == 1
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert lines == [
        "posteriors_fast: torch.compile of the per-sample Jacobian failed "
        "(RuntimeError: backend compiler failed); running it eagerly"
    ]


def test_the_users_own_error_propagates_unchanged(recorder):
    params, batch = _mlp(torch.float64)
    calls = []

    def picky(p, b):
        calls.append(1)
        if b[0].shape[-1] != 3:
            raise ValueError("picky wants 3 features")
        return log_lik(p, b)

    for _ in range(_tiered.COMPILE_AFTER):
        _jac(picky, params, batch)
    bad = (torch.zeros(7, 2, dtype=torch.float64), batch[1])
    with pytest.raises(ValueError, match="picky wants 3 features"):
        _jac(picky, params, bad)


@pytest.mark.parametrize(
    "dtype,f,keep_aux",
    [(torch.float32, log_lik, True), (torch.float64, forward, False)],
    ids=["f32-scalar-with-aux", "f64-multi-output"],
)
def test_compiled_jacobian_matches_eager_and_does_not_recompile(monkeypatch, dtype, f, keep_aux):
    monkeypatch.setattr(_tiered, "COMPILE_AFTER", 1)
    monkeypatch.setattr(
        jacobian,
        "_tiered_sample_jacobian",
        _tiered.TieredCompile(jacobian.sample_jacobian_eager, "the per-sample Jacobian"),
    )
    params, batch = _mlp(dtype)
    want = jacobian.sample_jacobian_eager(f, params, batch, True, keep_aux)
    got = _jac(f, params, batch, keep_aux=keep_aux)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    assert jacobian._tiered_sample_jacobian._compiled == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _jac(f, params, batch, keep_aux=keep_aux)
    torch.testing.assert_close(again[0], want[0], rtol=tol, atol=tol)


def test_compiled_separable_jacobian_matches_eager_and_still_detects_coupling(monkeypatch):
    monkeypatch.setattr(_tiered, "COMPILE_AFTER", 1)
    tiered = _tiered.TieredCompile(separable_jacobian.separable_parts_eager, "the per-sample output Jacobian")
    monkeypatch.setattr(separable_jacobian, "_tiered_separable", tiered)
    params, batch = _mlp(torch.float64)

    def coupled(p, b):
        z = _logits(p, b)
        return z - z.mean(0), None  # every output depends on the whole batch

    for fwd, separable in ((forward, True), (coupled, False)):
        z = fwd(params, batch)[0]
        with torch.no_grad():
            got = separable_jacobian.separable_output_jacobian(fwd, params, batch, z, backend="compiled")
            want = separable_jacobian.separable_output_jacobian(fwd, params, batch, z, backend="eager")
        if separable:
            assert got is not None and got.shape == (7, 4, 39)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert got is None and want is None
    assert tiered._compiled == 2
