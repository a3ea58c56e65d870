"""posteriors_fast.optim and posteriors_fast.torchopt against posteriors 0.0.5:
same trajectories, and the fixed defects."""

import pytest
import torch
import torchopt
from optree import tree_leaves, tree_map

import posteriors_fast as pf

from ._trees import forward, random_batch, random_params


def _loss(p, batch):
    x, y = batch
    z = forward(p, x)
    return torch.nn.functional.cross_entropy(z, y), z


def _nan_loss(p, batch):
    value, z = _loss(p, batch)
    return value * float("nan"), z


def _close(a, b, **tol):
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        torch.testing.assert_close(x.detach(), y.detach(), **tol)


def _trainable(params):
    return tree_map(lambda t: t.clone().requires_grad_(True), params)


@pytest.mark.parametrize(
    "opt, kwargs", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.05})]
)
def test_optim_trajectory_matches_reference(ref, dtype, opt, kwargs):
    params = random_params("tuple", dtype)  # torch.optim takes an iterable of tensors
    ours, theirs = pf.optim.build(_loss, opt, **kwargs), ref.optim.build(_loss, opt, **kwargs)
    a, b = ours.init(_trainable(params)), theirs.init(_trainable(params))
    for step in range(4):
        batch = random_batch(6, dtype, seed=step)
        a, b = ours.update(a, batch), theirs.update(b, batch)
        torch.testing.assert_close(a.loss, b.loss)
    _close(a.params, b.params)


def test_optim_inplace_only_and_nan_loss():
    params = _trainable(random_params("tuple", torch.float64))
    transform = pf.optim.build(_loss, torch.optim.SGD, lr=0.1)
    state = transform.init(params)
    with pytest.raises(NotImplementedError, match="inplace=True"):
        transform.update(state, random_batch(4, torch.float64), inplace=False)
    before = [t.detach().clone() for t in tree_leaves(params)]
    with pytest.raises(ValueError, match="loss_fn returned NaN or inf"):
        pf.optim.update(state, random_batch(4, torch.float64), _nan_loss)
    assert all(torch.equal(t.detach(), b) for t, b in zip(tree_leaves(params), before))


def test_optim_state_does_not_write_into_shared_default():
    params = _trainable(random_params("dict", torch.float64))
    optimizer = torch.optim.SGD(list(tree_leaves(params)), lr=0.1)
    state = pf.optim.OptimState(params, optimizer)
    state = pf.optim.update(state, random_batch(4, torch.float64), _loss)
    assert state.loss.shape == () and pf.optim.OptimState._field_defaults["loss"].numel() == 0


@pytest.mark.parametrize(
    "make", [lambda: torchopt.sgd(0.1, momentum=0.9), lambda: torchopt.adam(0.05)], ids=["sgd", "adam"]
)
@pytest.mark.parametrize("inplace", [False, True])
def test_torchopt_trajectory_matches_reference_functional_path(ref, dtype, make, inplace):
    params = random_params("nested", dtype)
    ours, theirs = pf.torchopt.build(_loss, make()), ref.torchopt.build(_loss, make())
    a, b = ours.init(tree_map(torch.clone, params)), theirs.init(tree_map(torch.clone, params))
    for step in range(4):
        batch = random_batch(6, dtype, seed=step)
        a = ours.update(a, batch, inplace=inplace)
        b = theirs.update(b, batch, inplace=False)  # the reference's correct path
        torch.testing.assert_close(a.loss, b.loss)
    _close(a.params, b.params)


def test_torchopt_inplace_advances_the_optimizer_state(ref):
    params = random_params("dict", torch.float64)
    transform = pf.torchopt.build(_loss, torchopt.adam(0.05))
    state = transform.init(tree_map(torch.clone, params))
    for step in range(3):
        state = transform.update(state, random_batch(4, torch.float64, seed=step), inplace=True)
    counts = [int(c) for c in tree_leaves(state.opt_state) if c.dtype == torch.int64]
    assert counts and all(c == 3 for c in counts)
    # posteriors 0.0.5 returns the old optimizer state from an in-place update.
    theirs = ref.torchopt.build(_loss, torchopt.adam(0.05))
    rs = theirs.init(tree_map(torch.clone, params))
    for step in range(3):
        rs = theirs.update(rs, random_batch(4, torch.float64, seed=step), inplace=True)
    assert [int(c) for c in tree_leaves(rs.opt_state) if c.dtype == torch.int64] != counts


def test_torchopt_non_inplace_leaves_input_state_untouched():
    params = random_params("dict", torch.float64)
    transform = pf.torchopt.build(_loss, torchopt.adam(0.05))
    state = transform.init(tree_map(torch.clone, params))
    snapshot = [t.clone() for t in tree_leaves((state.params, state.opt_state))]
    transform.update(state, random_batch(4, torch.float64))
    assert all(torch.equal(t, s) for t, s in zip(tree_leaves((state.params, state.opt_state)), snapshot))


def test_torchopt_nan_loss_changes_nothing():
    params = random_params("dict", torch.float64)
    transform = pf.torchopt.build(_nan_loss, torchopt.adam(0.05))
    state = transform.init(tree_map(torch.clone, params))
    snapshot = [t.clone() for t in tree_leaves((state.params, state.opt_state))]
    with pytest.raises(ValueError, match="loss_fn returned NaN or inf"):
        transform.update(state, random_batch(4, torch.float64), inplace=True)
    assert all(torch.equal(t, s) for t, s in zip(tree_leaves((state.params, state.opt_state)), snapshot))


def test_import_without_torchopt_installed():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torchopt'] = None\n"
        "import posteriors_fast as pf\n"
        "try:\n"
        "    pf.torchopt.init({}, None)\n"
        "except ImportError as err:\n"
        "    print('ImportError:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install torchopt" in out.stdout
