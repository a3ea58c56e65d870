"""``sample_jacobian``: the per-sample Jacobian against ``torch.func.jacrev``
of each sample in float64, eager and compiled (tests/backends/test_compile_policy.py
covers when the compiled form is used)."""

import pytest
import torch
from optree.integrations.torch import tree_ravel

from posteriors_fast.ops import sample_jacobian
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
