"""``separable_jacobian``: the per-sample output Jacobian of a batch forward
against ``torch.func.jacrev`` of each sample (float64, eager and compiled),
coupling between samples detected; and the per-sample log-density path of
``log_density_jacobian`` (``per_sample=True``): after one probe it runs only
the per-sample graph, with the batch call's values and aux, and it falls back
for coupled functions and for an aux that is not per-sample."""

import pytest
import torch
from optree.integrations.torch import tree_ravel

from posteriors_fast.ops import separable_jacobian
from tests._compare import assert_tree_close, tol
from tests._trees import forward, random_batch, random_params


def _oracle(fn, params, batch):
    flat, unravel = tree_ravel(params)
    rows = []
    for i in range(batch[0].shape[0]):
        sample = tuple(t[i : i + 1] for t in batch)
        rows.append(torch.func.jacrev(lambda fp, sample=sample: fn(unravel(fp), sample)[0].reshape(-1))(flat))
    return torch.cat(rows)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_separable_output_jacobian_matches_and_detects_coupling(compile_after, backend):
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


class _Counting:
    """A per-sample log-likelihood that records the batch sizes it sees."""

    def __init__(self, aux="logits", coupled=False):
        self.sizes, self.aux, self.coupled = [], aux, coupled
        self.refuse_single = False  # like BatchNorm in training mode

    def __call__(self, p, b):
        x, y = b
        self.sizes.append(x.shape[0])
        if self.refuse_single and x.shape[0] == 1:
            raise ValueError("Expected more than 1 value per channel when training")
        z = forward(p, x)
        values = -torch.nn.functional.cross_entropy(z, y, reduction="none")
        if self.coupled:
            values = values - values.mean()
        aux = {"logits": z, "mean": z.mean(), "empty": torch.tensor([])}[self.aux]
        return values, aux


def _density(fn, params, batch, backend):
    with torch.no_grad():
        return separable_jacobian.log_density_jacobian(
            fn, params, batch, per_sample=True, what="log_likelihood", backend=backend
        )


# Compiled once (a compile costs seconds): the graph is the eager computation.
_CASES = [(aux, "eager") for aux in ("logits", "empty", "mean")] + [("logits", "compiled")]


@pytest.mark.parametrize("aux, backend", _CASES)
def test_per_sample_log_density_matches_the_batch_call_every_time(compile_after, dtype, backend, aux):
    compile_after(1)
    params = random_params("nested", dtype)
    fn = _Counting(aux)
    reference = _Counting(aux)
    for seed in range(3):
        if seed == 1:
            probed = len(fn.sizes)  # the first call probed the function
        batch = random_batch(5, dtype, seed=seed)
        jac, values, got_aux = _density(fn, params, batch, backend)
        want_values, want_aux = reference(params, batch)
        torch.testing.assert_close(jac, _oracle(reference, params, batch), **tol(dtype))
        torch.testing.assert_close(values, want_values, **tol(dtype))
        assert_tree_close(got_aux, want_aux, dtype)
    later = fn.sizes[probed:]
    if aux == "mean":  # not per-sample: every later call evaluates the batch too
        assert later.count(5) == 2
    else:  # after the probe, only per-sample evaluations (under vmap: size 1)
        assert later and set(later) == {1}


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_per_sample_log_density_of_a_coupled_function_uses_the_batch_jacobian(compile_after, backend):
    compile_after(1)
    params = random_params("dict", torch.float64)
    fn = _Counting(coupled=True)
    for seed in range(2):
        batch = random_batch(4, torch.float64, seed=seed)
        jac, values, _ = _density(fn, params, batch, backend)
        flat, unravel = tree_ravel(params)
        want = torch.func.jacrev(lambda fp, b=batch, u=unravel: fn(u(fp), b)[0])(flat)
        torch.testing.assert_close(jac, want, **tol(torch.float64))


def test_per_sample_log_density_rechecks_when_the_fast_path_fails(compile_after):
    """A function found separable whose per-sample graph later fails (here it
    starts refusing batches of one) is checked again from scratch: that call
    runs the batch function and gets the batch Jacobian, right; once the
    per-sample graph works again a new probe (a batch call) restores the
    per-sample path."""
    compile_after(1)
    params = random_params("dict", torch.float64)
    fn, reference = _Counting(), _Counting()

    def check(seed):
        batch = random_batch(5, torch.float64, seed=seed)
        jac, values, _ = _density(fn, params, batch, "eager")
        torch.testing.assert_close(jac, _oracle(reference, params, batch), **tol(torch.float64))
        torch.testing.assert_close(values, reference(params, batch)[0], **tol(torch.float64))

    check(0)  # probes: separable, per-sample aux
    start = len(fn.sizes)
    check(1)
    assert set(fn.sizes[start:]) == {1}  # the per-sample graph alone
    fn.refuse_single = True
    start = len(fn.sizes)
    check(2)
    assert 5 in fn.sizes[start:]  # the fast path failed: the batch call ran
    fn.refuse_single = False
    start = len(fn.sizes)
    check(3)
    assert 5 in fn.sizes[start:]  # the verdict was reset: probed again with a batch call
    start = len(fn.sizes)
    check(4)
    assert set(fn.sizes[start:]) == {1}  # ... which found it separable again


def test_a_non_finite_or_failing_probe_decides_nothing():
    """Only finite values that disagree make a function "coupled": a batch
    with NaN, or a per-sample evaluation that fails, leaves it undecided and
    the next clean batch finds it separable."""
    params = random_params("dict", torch.float64)

    def fwd(p, b):
        return forward(p, b[0]), torch.tensor([])

    x, y = random_batch(5, torch.float64)
    nan_x = x.clone()
    nan_x[2, 0] = float("nan")
    refuse = [True]

    def picky(p, b):
        if refuse[0] and b[0].shape[0] == 1:
            raise ValueError("no batches of one")
        return fwd(p, b)

    for f, first in ((fwd, (nan_x, y)), (picky, (x, y))):
        refuse[0] = True
        with torch.no_grad():
            z = f(params, first)[0]
            assert separable_jacobian.learn_separability(f, params, first, "t", z, None, backend="eager") is None
            refuse[0] = False
            z = f(params, (x, y))[0]
            jac = separable_jacobian.learn_separability(f, params, (x, y), "t", z, None, backend="eager")
        assert jac is not None
        torch.testing.assert_close(jac.reshape(-1, jac.shape[-1]), _oracle(fwd, params, (x, y)), **tol(torch.float64))

    def coupled(p, b):
        z = forward(p, b[0])
        return z - z.mean(0), torch.tensor([])

    with torch.no_grad():
        z = coupled(params, (x, y))[0]
        assert separable_jacobian.learn_separability(coupled, params, (x, y), "t", z, None, backend="eager") is None
    signature = ("t", separable_jacobian.jacobian_signature(params, (x, y), True, True, True))
    assert separable_jacobian._verdict(coupled, signature) is False  # finite disagreement: remembered
