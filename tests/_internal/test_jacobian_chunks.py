"""The per-sample Jacobian built in chunks within a memory budget gives what
the whole Jacobian gives (float64, every diagonal method and
``utils.diag_ggn``), and an update's peak memory stays within the bound."""

import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel

import posteriors_fast as pf
from posteriors_fast._internal import jacobian_budget, jacobian_chunks
from posteriors_fast.laplace import _lowrank as lowrank_common
from tests.ekf._problem import log_likelihood, log_likelihood_per_sample, logits, make_problem

N = 11


@contextmanager
def budget_for(samples: int, size: int, rows_per_sample: int = 1):
    """A budget that holds ``samples`` samples of float64 Jacobian rows."""
    previous = jacobian_budget.set_budget_mb(samples * rows_per_sample * size * 8 / 2**20)
    try:
        yield
    finally:
        jacobian_budget.set_budget_mb(previous)


def _size(params):
    return tree_ravel(params)[0].numel()


def _close(a, b):
    torch.testing.assert_close(tree_ravel(a)[0], tree_ravel(b)[0], rtol=1e-12, atol=1e-14)


def _forward(p, batch):
    return logits(p, batch["x"]), torch.tensor([])


def _outer(z, batch):
    return -torch.nn.functional.cross_entropy(z, batch["y"], reduction="sum")


def _coupled_forward(p, batch):
    z = logits(p, batch["x"])
    return z - z.mean(0), torch.tensor([])


def test_sample_slices_cover_the_batch_evenly():
    assert jacobian_budget.sample_slices(10, 3) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert jacobian_budget.sample_slices(5, 8) == [(0, 5)]
    with pytest.raises(ValueError, match="budget"):
        jacobian_budget.set_budget_mb(0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_ekf_diag_fisher_chunked_equals_whole(per_sample):
    params, batch = make_problem(N, torch.float64)
    fn = log_likelihood_per_sample if per_sample else log_likelihood
    transform = pf.ekf.diag_fisher.build(fn, lr=0.7, transition_sd=0.1, per_sample=per_sample, backend="eager")
    whole = transform.update(transform.init(params), batch)
    with budget_for(3, _size(params)):
        chunks = jacobian_chunks.LogDensityChunks(
            fn, params, batch, per_sample=per_sample, what="log_likelihood", backend="eager"
        )
        assert len(chunks.slices) == 4
        chunked = transform.update(transform.init(params), batch)
    _close(chunked.params, whole.params)
    _close(chunked.sd_diag, whole.sd_diag)
    torch.testing.assert_close(chunked.log_likelihood, whole.log_likelihood, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked.aux, whole.aux, rtol=0, atol=0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_laplace_diag_fisher_chunked_equals_whole(per_sample):
    params, batch = make_problem(N, torch.float64, seed=1)
    fn = log_likelihood_per_sample if per_sample else log_likelihood
    transform = pf.laplace.diag_fisher.build(fn, per_sample=per_sample, backend="eager")
    whole = transform.update(transform.init(params), batch)
    with budget_for(2, _size(params)):
        chunked = transform.update(transform.init(params), batch)
    _close(chunked.prec_diag, whole.prec_diag)
    torch.testing.assert_close(chunked.aux, whole.aux, rtol=0, atol=0)


@pytest.mark.parametrize("forward", [_forward, _coupled_forward], ids=["separable", "coupled"])
def test_laplace_diag_ggn_chunked_equals_whole(forward):
    params, batch = make_problem(N, torch.float64, seed=2)
    transform = pf.laplace.diag_ggn.build(forward, _outer, backend="eager")
    whole = transform.update(transform.init(params), batch)
    with budget_for(2, _size(params), rows_per_sample=3):
        chunked = transform.update(transform.init(params), batch)
    _close(chunked.prec_diag, whole.prec_diag)
    assert float(tree_ravel(whole.prec_diag)[0].abs().max()) > 0.1


@pytest.mark.parametrize("coupled_loss", [False, True], ids=["block-diagonal", "dense-hessian"])
@pytest.mark.parametrize("normalize", [False, True])
def test_utils_diag_ggn_chunked_equals_whole(coupled_loss, normalize):
    params, batch = make_problem(N, torch.float64, seed=3)

    def forward(p):
        return logits(p, batch["x"])

    def loss(z):
        value = torch.nn.functional.cross_entropy(z, batch["y"], reduction="sum")
        return value + 0.3 * z.sum() ** 2 if coupled_loss else value

    diag_ggn = pf.utils.diag_ggn(forward, loss, normalize=normalize, backend="eager")
    whole = diag_ggn(params)
    with budget_for(2, _size(params), rows_per_sample=3):
        chunked = diag_ggn(params)
    _close(chunked, whole)
    # Independent float64 oracle: the dense GGN's diagonal.
    dense = pf.utils.ggn(forward, loss, normalize=normalize, backend="eager")(params)
    torch.testing.assert_close(tree_ravel(chunked)[0], torch.diagonal(dense), rtol=1e-10, atol=1e-12)


def _same_lowrank(a, b):
    _close(a.prec_diag, b.prec_diag)
    # U is unique up to a rotation of its columns: compare U Uᵀ.
    torch.testing.assert_close(
        a.prec_factor @ a.prec_factor.mT, b.prec_factor @ b.prec_factor.mT, rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("per_sample", [False, True])
def test_lowrank_fisher_methods_chunked_equal_whole(per_sample):
    params, batch = make_problem(N, torch.float64, seed=5)
    fn = log_likelihood_per_sample if per_sample else log_likelihood
    transforms = [
        pf.ekf.lowrank_fisher.build(fn, lr=0.5, rank=4, per_sample=per_sample, backend="eager"),
        pf.laplace.lowrank_fisher.build(fn, rank=4, per_sample=per_sample, init_prec_diag=1.0, backend="eager"),
    ]
    for transform in transforms:
        whole = transform.update(transform.init(params), batch)
        with budget_for(3, _size(params)):
            chunked = transform.update(transform.init(params), batch)
        _same_lowrank(chunked, whole)
        _close(chunked.params, whole.params)
        torch.testing.assert_close(chunked.aux, whole.aux, rtol=0, atol=0)


def _precision_diagonal(state):
    return tree_ravel(state.prec_diag)[0] + state.prec_factor.square().sum(1)


@pytest.mark.parametrize("rank", [5, 28])
def test_lowrank_ggn_beyond_the_budget_folds_blocks_of_samples(rank, monkeypatch):
    """Beyond the budget the GGN rows are folded in a block of samples at a
    time: the state that updates on those blocks as batches give (the loss
    sums over samples), the precision's diagonal exact, and with rank >= P
    the whole batch's precision."""
    params, batch = make_problem(N, torch.float64, seed=6)
    size = _size(params)
    assert rank <= 5 or rank >= size
    transform = pf.laplace.lowrank_ggn.build(_forward, _outer, rank=rank, init_prec_diag=1.0, backend="eager")
    whole = transform.update(transform.init(params), batch)
    folded = []
    truncate = lowrank_common.lowrank_truncate

    def recording(diag, factor, rows, *args, **kwargs):
        folded.append(rows.shape[0])
        return truncate(diag, factor, rows, *args, **kwargs)

    monkeypatch.setattr(lowrank_common, "lowrank_truncate", recording)
    with budget_for(2, size, rows_per_sample=3):
        chunked = transform.update(transform.init(params), batch)
    slices = jacobian_budget.sample_slices(N, 2)
    assert folded[: len(slices)] == [3 * (b - a) for a, b in slices]  # C = 3 rows per sample
    state = transform.init(params)
    for a, b in slices:
        state = transform.update(state, jacobian_budget.take(batch, a, b, N))
    _same_lowrank(chunked, state)
    _close(_precision_diagonal(chunked), _precision_diagonal(whole))
    torch.testing.assert_close(chunked.aux, whole.aux, rtol=0, atol=0)
    if rank >= size:
        _same_lowrank(chunked, whole)


def test_chunked_per_sample_log_density_must_not_couple_samples():
    params, batch = make_problem(N, torch.float64, seed=4)

    def coupled(p, b):
        z = logits(p, b["x"])
        z = z - z.mean(0)
        return -torch.nn.functional.cross_entropy(z, b["y"], reduction="none"), torch.tensor([])

    transform = pf.laplace.diag_fisher.build(coupled, per_sample=True, backend="eager")
    state = transform.init(params)
    before = tree_map(torch.clone, state.prec_diag)
    with (
        budget_for(3, _size(params)),
        pytest.raises(ValueError, match="couples the samples.*POSTERIORS_FAST_JACOBIAN_MB"),
    ):
        transform.update(state, batch, inplace=True)
    _close(state.prec_diag, before)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    import posteriors_fast as pf
    from posteriors_fast._internal import jacobian_budget, jacobian_chunks

    torch.manual_seed(0)
    n, d, k = 64, 2000, 1000  # P = 2·10⁶: the whole float32 Jacobian is 512 MB
    params = {"w": torch.randn(k, d) * 0.01}
    batch = {"x": torch.randn(n, d)}

    def log_lik(p, b):
        return -(b["x"] @ p["w"].T).square().sum() / 2, torch.tensor([])

    transform = pf.ekf.diag_fisher.build(log_lik, lr=1.0, backend="eager")
    state = transform.init(params)
    transform.update(state, {"x": batch["x"][:2]})  # one-time costs (about 200 MB of libraries and caches)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = transform.update(state, batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"delta_bytes": (peak - base) * 1024, "size": k * d, "n": n,
                      "budget": jacobian_budget.budget_bytes()}))
    """
)


def test_diag_update_peak_memory_stays_within_the_budget():
    # A fixed mmap threshold: glibc's default raises it as large blocks are
    # freed, after which freed chunks stay resident and ru_maxrss counts heap
    # fragmentation rather than live memory (measured: 580 MB vs 23 MB here).
    env = dict(os.environ, POSTERIORS_FAST_JACOBIAN_MB="16", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    found = json.loads(run.stdout.strip().splitlines()[-1])
    whole_jacobian = found["n"] * found["size"] * 4
    # Beyond the state (mean, sds: 2P) the step holds the new state and a
    # few P-vectors, one chunk of J and its square: well under the 512 MB
    # Jacobian it would need whole.
    bound = 8 * found["size"] * 4 + 4 * found["budget"]
    assert found["delta_bytes"] < bound, (found, bound)
    assert found["delta_bytes"] < whole_jacobian / 4


def test_large_p_row_by_row_sums_match_the_fused_reduction():
    # P above _ROW_LOOP_MIN takes the row-by-row path, in one block or two.
    jac = torch.randn(
        9, jacobian_chunks._ROW_LOOP_MIN + 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    square, grad = jacobian_chunks._column_sums(jac, None, None, True)
    torch.testing.assert_close(square, jac.square().sum(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(grad, jac.sum(0), rtol=1e-12, atol=1e-13)
    split = jacobian_chunks._column_sums(jac[:4], None, None, False)
    split = jacobian_chunks._column_sums(jac[4:], *split, False)
    assert split[1] is None
    torch.testing.assert_close(split[0], square, rtol=1e-13, atol=0)


@pytest.mark.parametrize("verdict", [None, False])
def test_lowrank_ggn_later_block_undecided_or_coupled(verdict, monkeypatch):
    """A later block whose separability probe cannot decide takes the general
    Jacobian of its samples (the same state); one found coupled raises and
    leaves an inplace state as it was."""
    from posteriors_fast.laplace import _ggn

    params, batch = make_problem(N, torch.float64, seed=6)
    size = _size(params)
    transform = pf.laplace.lowrank_ggn.build(_forward, _outer, rank=5, init_prec_diag=1.0, backend="eager")
    with budget_for(2, size, rows_per_sample=3):
        want = transform.update(transform.init(params), batch)
        probe = _ggn._separable_output_jacobian
        calls = []

        def later_blocks_unknown(forward, p, part, z, **kwargs):
            calls.append(z.shape[0])
            return (None, verdict) if len(calls) > 1 else probe(forward, p, part, z, **kwargs)

        monkeypatch.setattr(_ggn, "_separable_output_jacobian", later_blocks_unknown)
        state = transform.init(params)
        before = (state.prec_factor.clone(), tree_ravel(state.prec_diag)[0].clone())
        if verdict is None:
            got = transform.update(state, batch)
            _same_lowrank(got, want)
            assert len(calls) == len(jacobian_budget.sample_slices(N, 2))
        else:
            with pytest.raises(ValueError, match="forward couples samples 2:.*POSTERIORS_FAST_JACOBIAN_MB"):
                transform.update(state, batch, inplace=True)
            assert torch.equal(state.prec_factor, before[0])
            assert torch.equal(tree_ravel(state.prec_diag)[0], before[1])


def test_batch_ggn_root_beyond_the_budget_is_the_whole_root():
    """The distributed path gathers the whole R: built block by block into
    one tensor, it is the R of the whole-batch Jacobian."""
    from posteriors_fast.laplace._ggn import batch_ggn_root

    params, batch = make_problem(N, torch.float64, seed=3)
    whole, aux = batch_ggn_root(params, batch, _forward, _outer, backend="eager")
    with budget_for(2, _size(params), rows_per_sample=3):
        blocked, blocked_aux = batch_ggn_root(params, batch, _forward, _outer, backend="eager")
    assert blocked.shape == whole.shape == (3 * N, _size(params))
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(blocked_aux, aux, rtol=0, atol=0)


@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocks"])
def test_lowrank_ggn_names_a_non_finite_gradient_of_forward(blocked, monkeypatch):
    """The GGN rows are checked once; when they are not finite, the Jacobian
    is looked at to say that forward's gradient was, in both the whole-batch
    and the block-of-samples paths, and the state is left as it was."""
    from posteriors_fast.laplace import _ggn

    rows = _ggn._checked_rows
    params, batch = make_problem(N, torch.float64, seed=8)
    # The last two samples' gradient is NaN (sqrt of |u| at u = 0), so the
    # first block of samples passes the separability probe and a later block
    # carries the NaN.
    batch["c"] = params["b1"][0] + torch.tensor([1.0] * (N - 2) + [0.0, 0.0], dtype=torch.float64)

    def forward(p, b):
        return logits(p, b["x"]) + (p["b1"][0] - b["c"]).abs().sqrt()[:, None], torch.tensor([])

    transform = pf.laplace.lowrank_ggn.build(forward, _outer, rank=3, init_prec_diag=1.0, backend="eager")
    state = transform.init(params)
    before = (state.prec_factor.clone(), tree_ravel(state.prec_diag)[0].clone())
    checked = []
    monkeypatch.setattr(_ggn, "_checked_rows", lambda roots, jac: checked.append(jac.shape[0]) or rows(roots, jac))
    with budget_for(2 if blocked else N, _size(params), rows_per_sample=3):
        with pytest.raises(ValueError, match="the gradient of forward is NaN or inf"):
            transform.update(state, batch, inplace=True)
    # Blocks: the first blocks of samples passed, the last one raised.
    assert checked == ([b - a for a, b in jacobian_budget.sample_slices(N, 2)] if blocked else [N])
    assert torch.equal(state.prec_factor, before[0]) and torch.equal(tree_ravel(state.prec_diag)[0], before[1])
