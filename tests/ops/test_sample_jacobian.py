"""``sample_jacobian`` and ``separable_jacobian``: the per-sample Jacobians
against ``torch.func.jacrev`` of each sample in float64, eager and compiled;
coupling between samples is detected (tests/backends/test_compile_policy.py
covers when the compiled form is used)."""

import pytest
import torch
from optree.integrations.torch import tree_ravel

from posteriors_fast.ops import sample_jacobian, separable_jacobian
from tests._compare import tol
from tests._trees import forward, random_batch, random_params


def _ll(p, batch):
    x, y = batch
    return -torch.nn.functional.cross_entropy(forward(p, x), y), forward(p, x)


def _oracle(fn, params, batch):
    flat, unravel = tree_ravel(params)
    rows = []
    for i in range(batch[0].shape[0]):
        sample = tuple(t[i : i + 1] for t in batch)
        rows.append(torch.func.jacrev(lambda fp, sample=sample: fn(unravel(fp), sample)[0].reshape(-1))(flat))
    return torch.cat(rows)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
@pytest.mark.parametrize("kind", ["dict", "nested"])
def test_sample_jacobian_matches_per_sample_jacrev(compile_after, monkeypatch, dtype, backend, kind):
    compile_after(1)
    params, batch = random_params(kind, dtype), random_batch(7, dtype)
    want = _oracle(_ll, params, batch)
    jac, values, aux = sample_jacobian.sample_jacobian(_ll, params, batch, True, backend=backend)
    torch.testing.assert_close(jac, want, **tol(dtype))
    assert values.shape == (7,) and aux.shape == (7, 1, 3)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_separable_output_jacobian_matches_and_detects_coupling(compile_after, monkeypatch, backend):
    compile_after(1)
    params, batch = random_params("nested", torch.float64), random_batch(6, torch.float64)

    def fwd(p, b):
        return forward(p, b[0]), torch.tensor([])

    def coupled(p, b):
        z = forward(p, b[0])
        return z - z.mean(0), torch.tensor([])

    z = fwd(params, batch)[0]
    with torch.no_grad():
        jac = separable_jacobian.separable_output_jacobian(fwd, params, batch, z, backend=backend)
    want = _oracle(lambda p, s: fwd(p, s), params, batch).reshape(6, 3, -1)
    torch.testing.assert_close(jac, want, **tol(torch.float64))
    with torch.no_grad():
        assert (
            separable_jacobian.separable_output_jacobian(
                coupled, params, batch, coupled(params, batch)[0], backend=backend
            )
            is None
        )
