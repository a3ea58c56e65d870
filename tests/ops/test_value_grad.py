"""``value_grad``: the traced (``torch.func``) and compiled gradients against
plain autograd, aux of any kind, the finiteness witness, and the SG-MCMC
checks built on it."""

import math

import pytest
import torch

from posteriors_fast.backends import compile_policy as _tiered
from posteriors_fast.ops import value_grad as vg
from posteriors_fast.sgmcmc import _step
from tests._compare import tol


def _params(dtype):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g, dtype=dtype), "b": {"c": torch.randn(3, generator=g, dtype=dtype)}}


def _batch(dtype):
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)


def log_post(params, batch):
    z = torch.tanh(batch @ params["w"] + params["b"]["c"])
    return -(z * z).sum() - 0.5 * (params["w"] ** 2).sum(), {"z": z, "scale": 0.5, "tag": "x", "none": None}


def log_post_1d(params, batch):  # a one-element value of shape (1,), aux a tensor
    value, aux = log_post(params, batch)
    return value.reshape(1), aux["z"]


def log_post_no_aux(params, batch):  # aux None, a leaf the value does not use
    return log_post(params, batch)[0], None


def _assert_same(got, want, dtype):
    close = tol(dtype, "op")
    grads, value, aux, witness = got
    want_grads, want_value, want_aux, want_witness = want
    torch.testing.assert_close(grads, want_grads, **close)
    assert value.shape == want_value.shape
    torch.testing.assert_close(value, want_value, **close)
    torch.testing.assert_close(witness, want_witness, **close)
    if isinstance(want_aux, dict):
        assert aux.keys() == want_aux.keys()
        assert (aux["scale"], aux["tag"], aux["none"]) == (0.5, "x", None)
        torch.testing.assert_close(aux["z"], want_aux["z"], **close)
    elif want_aux is None:
        assert aux is None
    else:
        torch.testing.assert_close(aux, want_aux, **close)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fn", [log_post, log_post_1d, log_post_no_aux])
def test_traced_matches_autograd(dtype, fn):
    params, batch = _params(dtype), _batch(dtype)
    want = vg.value_grad_eager(fn, params, batch, "log_posterior")
    got = vg.value_grad_traced(fn, params, batch, "log_posterior")
    _assert_same(got, want, dtype)
    grads, value, _, witness = want
    # The witness is the value plus the sum of every gradient and parameter entry.
    total = value.double().sum() + sum(
        t.double().sum() for t in (grads["w"], grads["b"]["c"], params["w"], params["b"]["c"])
    )
    assert math.isclose(witness.item(), total.item(), rel_tol=1e-5)


def test_compiled_matches_autograd_and_does_not_recompile(compile_after, monkeypatch):
    compile_after(1)
    tiered = _tiered.TieredCompile(vg.value_grad_traced, "the gradient", eager=vg.value_grad_eager)
    monkeypatch.setattr(vg, "_tiered", tiered)
    params, batch = _params(torch.float32), _batch(torch.float32)
    want = vg.value_grad_eager(log_post, params, batch, "log_posterior")
    got = vg.value_grad(log_post, params, batch, "log_posterior", backend="compiled:torch_compile")
    assert tiered._compiled == 1
    _assert_same(got, want, torch.float32)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = vg.value_grad(log_post, params, batch, "log_posterior", backend="compiled:torch_compile")
    _assert_same(again, want, torch.float32)
    # The compiled graph's witness catches a NaN parameter like the eager one,
    # and the message names the leaf.
    bad = {"w": params["w"].clone(), "b": params["b"]}
    bad["w"][1, 2] = float("nan")
    with torch._dynamo.config.patch(error_on_recompile=True):
        with pytest.raises(ValueError, match=r"state.params hold a non-finite value \(NaN or inf\) \(leaf \['w'\]\)"):
            _step.gradient(log_post, bad, batch, "compiled:torch_compile")


def test_eager_until_the_tier_and_autograd_for_the_eager_calls(compile_after, monkeypatch):
    compile_after(3)
    compiled = []
    tiered = _tiered.TieredCompile(vg.value_grad_traced, "the gradient", eager=vg.value_grad_eager)
    monkeypatch.setattr(tiered, "_compile", lambda: compiled.append(1) or vg.value_grad_traced)
    monkeypatch.setattr(vg, "_tiered", tiered)
    eager_calls = []
    monkeypatch.setattr(tiered, "_fn", lambda *a: eager_calls.append(1) or vg.value_grad_eager(*a))
    params, batch = _params(torch.float64), _batch(torch.float64)
    for _ in range(3 + 2):
        vg.value_grad(log_post, params, batch, "log_posterior", backend="compiled:torch_compile")
    assert len(eager_calls) == 3 - 1 and compiled == [1]


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_gradient_checks_name_the_culprit(backend):
    params, batch = _params(torch.float64), _batch(torch.float64)

    def nan_value(p, b):
        return log_post(p, b)[0] * float("nan"), None

    def inf_grad(p, b):  # finite value, infinite gradient at 0
        return p["w"].abs().sqrt().sum(), None

    with pytest.raises(ValueError, match="log_posterior returned NaN or inf"):
        _step.gradient(nan_value, params, batch, backend)
    zero = {"w": torch.zeros(4, 3, dtype=torch.float64), "b": params["b"]}
    with pytest.raises(
        ValueError, match=r"the gradient of log_posterior is NaN or inf for this batch \(leaf \['w'\]\)"
    ):
        _step.gradient(inf_grad, zero, batch, backend)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_an_overflowing_witness_with_finite_entries_is_not_an_error(backend):
    slope = torch.full((4,), 3e38)  # float32: each gradient entry is finite, their sum is not
    params = {"a": torch.full((4,), 1e-10)}

    def linear(p, b):
        return (p["a"] * slope).sum(), None

    assert not math.isfinite(vg.value_grad_eager(linear, params, None, "log_posterior")[3].item())
    leaves, _, value, _ = _step.gradient(linear, params, None, backend)
    assert math.isfinite(value.item())
    torch.testing.assert_close(leaves[0], slope)
