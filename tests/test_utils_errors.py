"""Clear errors naming the argument for bad input to utils."""

import pytest
import torch

import posteriors_fast as pf


def test_cg_x0_structure_must_match_b():
    b = {"a": torch.ones(3), "b": torch.ones(2)}
    with pytest.raises(ValueError, match="x0 must have the same pytree structure as b"):
        pf.cg(lambda x: x, b, x0={"a": torch.ones(3)})
    with pytest.raises(ValueError, match="x0 leaf shapes must match b"):
        pf.cg(lambda x: x, b, x0={"a": torch.ones(3), "b": torch.ones(4)})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(maxiter=-1), "maxiter must be a non-negative integer"),
        (dict(maxiter=2.5), "maxiter must be a non-negative integer"),
        (dict(tol=-1e-3), "tol must be a non-negative number"),
        (dict(atol=float("nan")), "atol must be a non-negative number"),
        (dict(damping=-1.0), "damping must be a non-negative number"),
    ],
)
def test_cg_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pf.cg(lambda x: x, torch.ones(3), **kwargs)


def test_linearized_forward_diag_sd_structure():
    params = {"w": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="sd_diag must have the same pytree structure as params"):
        pf.linearized_forward_diag(
            lambda p, x: (x @ p["w"], torch.tensor([])), params, torch.ones(4, 2), {"v": torch.ones(2, 3)}
        )


def test_per_samplify_batch_leading_dims():
    f = pf.per_samplify(lambda p, b: p * b["x"].sum())
    with pytest.raises(ValueError, match="batch leaves disagree on the leading"):
        f(torch.ones(2), {"x": torch.ones(4, 2), "y": torch.ones(3)})


def test_L_from_flat_bad_length():
    with pytest.raises(ValueError, match="L_flat has 4 entries, which is not n\\(n\\+1\\)/2"):
        pf.L_from_flat(torch.ones(4))


def test_L_to_flat_not_square():
    with pytest.raises(ValueError, match="L must be a square 2-d tensor"):
        pf.L_to_flat(torch.ones(2, 3))


def test_ggn_argnums_error_is_value_and_assertion_error():
    with pytest.raises(ValueError, match="argnums=1 is not supported") as info:
        pf.ggn(lambda p: p, lambda z: z.sum(), argnums=1)
    assert isinstance(info.value, AssertionError)
    with pytest.raises(AssertionError):
        pf.diag_ggn(lambda p: p, lambda z: z.sum(), argnums=(0, 1))


def test_catch_aux_error_message():
    with pytest.raises(RuntimeError, match="Auxiliary output not found"):
        with pf.CatchAuxError():
            torch.func.grad(lambda x: (x**2).sum(), has_aux=True)(torch.ones(2))
