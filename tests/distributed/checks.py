"""Checks that run inside every process of a gloo group (see _harness.py).

Each ``check_*(rank, world)`` runs in every rank and raises on failure. The
oracle is always the one-process result of the same method on the
concatenation of the ranks' shards in rank order (same dtype, tolerance
``tests/_compare.TOL["method"]``), with the same noise where the method draws
any (``posteriors_fast.distributed.NoiseStream`` replays the group's seeds).
States must also be bit-identical across ranks (all-gathered, ``torch.equal``).
"""

import time
from functools import partial

import torch
import torch.distributed as dist
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel

import posteriors_fast as pf
from posteriors_fast import distributed as pfd
from posteriors_fast import operators
from posteriors_fast.distributed import ShardedMatrix
from posteriors_fast.distributed._sharded import factor, normal_from_seed
from tests._compare import assert_tree_close
from tests.methods import METHODS, log_likelihood, log_posterior, summed_log_posterior

DTYPES = (torch.float32, torch.float64)


def _sizes(world: int, step: int):
    """Uneven shard sizes, with an empty shard in some steps."""
    table = {2: [[4, 3], [0, 5]], 3: [[2, 0, 5], [3, 3, 1]]}
    return table[world][step % 2]


#: A step whose shards are all non-empty, per world size.
_NO_EMPTY = {2: 0, 3: 1}


def _shards(method, dtype, world: int, step: int):
    sizes = _sizes(world, step)
    return [method.problem(dtype, seed=100 * step + 10 + r, n=n)[1] for r, n in enumerate(sizes)]


def _concat(shards):
    return tuple(torch.cat([s[i] for s in shards]) for i in range(len(shards[0])))


def _fresh(params):
    return tree_map(lambda t: t.detach().clone().requires_grad_(t.requires_grad), params)


def _build(method, process_group=None, **overrides):
    module = method.lib_module(pf)
    if method.module == "optim":
        return module.build(method.functions["loss_fn"], torch.optim.SGD, lr=0.05, process_group=process_group)
    settings = {k: (v() if callable(v) else v) for k, v in method.settings.items()}
    if method.per_sample is not None:
        settings["per_sample"] = method.per_sample
    settings.update(overrides)
    return module.build(**method.functions, **settings, process_group=process_group)


def _comparable(state):
    """The state's compared fields: aux is each rank's own, the optim state's
    optimizer object is compared through its params, a sharded matrix whole."""
    fields = {}
    for field, value in zip(state._fields, state):
        if field in ("aux", "optimizer"):
            value = None
        elif isinstance(value, ShardedMatrix):
            value = value.gather()
        fields[field] = value
    return type(state)(**fields)


def same_on_every_rank(tree, what: str) -> None:
    """Every tensor leaf of ``tree`` has the same bits on every rank."""
    for i, leaf in enumerate(x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)):
        parts = [torch.empty_like(leaf) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, leaf.detach().contiguous())
        for r, part in enumerate(parts):
            assert torch.equal(part, parts[0]), f"{what}: leaf {i} differs between rank 0 and rank {r}"


def _replicated(state):
    """The fields every rank must hold bit for bit (a sharded matrix's rows differ)."""
    return [
        v for f, v in zip(state._fields, state) if f not in ("aux", "optimizer") and not isinstance(v, ShardedMatrix)
    ]


def _run_pair(method, dtype, rank, world, inplace, steps=2, group_maker=pfd.data_parallel, **overrides):
    """``(state on this rank's shards, one-process state on the concatenations)``."""
    params, _ = method.problem(dtype)
    group = group_maker()
    transform = _build(method, process_group=group, **overrides)
    torch.manual_seed(1234)
    state = transform.init(_fresh(params))
    for step in range(steps):
        shards = _shards(method, dtype, world, step)
        state = transform.update(state, shards[rank], inplace=inplace or method.inplace_only)
    stream = None if group._stream is None else pfd.NoiseStream(group._stream.seed)
    single = _build(method, **overrides)
    one = single.init(_fresh(params))
    for step in range(steps):
        batch = _concat(_shards(method, dtype, world, step))
        device = tree_leaves(one.params)[0].device
        if stream is None:
            one = single.update(one, batch, inplace=inplace or method.inplace_only)
        else:
            with stream.seeded(device):
                one = single.update(one, batch, inplace=inplace or method.inplace_only)
    return state, one, group


def _calls(snapshot, op):
    return snapshot["by_op"].get(op, (0, 0, 0))[0]


def check_every_method_matches_one_process_on_the_concatenated_batch(rank, world):
    report = {}
    for method in METHODS:
        group_maker = pfd.data_parallel
        if method.name == "laplace.dense_hessian":

            def group_maker():
                return pfd.data_parallel(reduction="sum")

        for dtype in DTYPES:
            for inplace in (False, True):
                if method.inplace_only and not inplace:
                    continue
                state, one, group = _run_pair(method, dtype, rank, world, inplace, group_maker=group_maker)
                try:
                    assert_tree_close(_comparable(state), _comparable(one), dtype)
                except AssertionError as err:
                    raise AssertionError(f"{method.name} {dtype} inplace={inplace}: {err}") from err
                same_on_every_rank(_replicated(state), f"{method.name} {dtype}")
                report[f"{method.name}/{dtype}/{inplace}"] = group.stats.wire_bytes
    return report


def check_compiled_backend_with_a_process_group(rank, world):
    """The compiled backend's kernels (C++ syrk, block pool, downdate, Philox
    noise; for one method the tiered torch.compile of the per-sample Jacobian,
    compiled on its first call here) run outside the collectives and give the
    eager data-parallel result, bit-identical across ranks."""
    from posteriors_fast.backends import compile_policy

    saved = compile_policy.get_compile_policy()
    cases = (("ekf.dense_fisher[per_sample]", "after"), ("laplace.dense_fisher", "never"), ("sgmcmc.sghmc", "never"))
    try:
        for name, mode in cases:
            compile_policy.set_compile_policy(mode, after=1)
            method = next(m for m in METHODS if m.name == name)
            dtype = torch.float64
            quiet = dict(method.quiet)
            eager, _, _ = _run_pair(method, dtype, rank, world, False, backend="eager", **quiet)
            compiled, one, _ = _run_pair(method, dtype, rank, world, False, backend="compiled", **quiet)
            assert_tree_close(_comparable(compiled), _comparable(eager), dtype)
            assert_tree_close(_comparable(compiled), _comparable(one), dtype)
            same_on_every_rank(_replicated(compiled), method.name)
    finally:
        compile_policy.set_compile_policy(saved.mode, budget=saved.budget, after=saved.after)
    return True


def check_noise_is_shared_and_reproducible(rank, world):
    """A data-parallel SGLD chain draws the same noise on every rank (states
    bit-identical) and the same chain again from the same seed on rank 0."""
    method = next(m for m in METHODS if m.name == "sgmcmc.sgld")
    runs = []
    for _ in range(2):
        torch.manual_seed(7 + rank)  # only rank 0's seed may matter
        state, one, group = _run_pair(method, torch.float64, rank, world, False)
        same_on_every_rank(_replicated(state), "sgld")
        runs.append(state)
        assert_tree_close(_comparable(state), _comparable(one), torch.float64)
    # _run_pair seeds 1234 before init: the same base seed both times.
    assert torch.equal(tree_ravel(runs[0].params)[0], tree_ravel(runs[1].params)[0])
    return True


def check_independent_chains(rank, world):
    """``chains(seed=s)``: each rank's chain is the one-process chain on its
    own batches with the noise stream of s + rank; the chains differ."""
    method = next(m for m in METHODS if m.name == "sgmcmc.sghmc")
    dtype = torch.float64
    params, _ = method.problem(dtype)
    group = pfd.chains(seed=5)
    transform = _build(method, process_group=group, momenta=None)
    state = transform.init(_fresh(params))
    batches = [method.problem(dtype, seed=50 + 10 * rank + step, n=4)[1] for step in range(3)]
    for batch in batches:
        state = transform.update(state, batch)
    assert group.stats.calls == 0  # a given seed: nothing communicated at all
    single = _build(method, momenta=None)
    stream = pfd.NoiseStream(5 + rank)
    with stream.seeded():
        one = single.init(_fresh(params))
    for batch in batches:
        with stream.seeded():
            one = single.update(one, batch)
    assert_tree_close(_comparable(state), _comparable(one), dtype)
    stacked = pfd.all_gather_tree(state.params)
    firsts = [tree_ravel(tree_map(lambda x, r=r: x[r], stacked))[0] for r in range(world)]
    assert all(not torch.equal(firsts[0], f) for f in firsts[1:]), "chains on different ranks must differ"
    # Without a seed: rank 0 draws one and broadcasts it; rank r uses it + r.
    torch.manual_seed(99)
    unseeded = pfd.chains()
    transform = _build(method, process_group=unseeded, momenta=None)
    transform.init(_fresh(params))
    seeds = [None] * world
    dist.all_gather_object(seeds, unseeded._stream.seed)
    assert seeds == [seeds[0] + r for r in range(world)], seeds
    return True


def check_gradient_reductions(rank, world):
    """reduction="mean" (a per-datum mean log posterior) and "sum" (a sum over
    the data) both equal one process on the concatenated batch, for SGLD
    (noiseless), torchopt and VI (whose log q counts once in the sum)."""
    rows = {m.name: m for m in METHODS}
    dtype = torch.float64
    for name in ("sgmcmc.sgld", "torchopt", "vi.diag", "vi.dense", "optim"):
        method = rows[name]
        for reduction, fn in (("mean", None), ("sum", summed_log_posterior)):
            overrides = dict(method.quiet)
            if fn is not None:
                role = "loss_fn" if name in ("torchopt", "optim") else "log_posterior"
                if role == "loss_fn":
                    method = type(method)(**{**method.__dict__, "functions": {"loss_fn": _summed_loss}})
                else:
                    method = type(method)(**{**method.__dict__, "functions": {"log_posterior": fn}})

            def group_maker(reduction=reduction):
                return pfd.data_parallel(reduction=reduction)

            state, one, _ = _run_pair(method, dtype, rank, world, False, group_maker=group_maker, **overrides)
            try:
                assert_tree_close(_comparable(state), _comparable(one), dtype)
            except AssertionError as err:
                raise AssertionError(f"{name} reduction={reduction}: {err}") from err
            method = rows[name]
    return True


def check_lowrank_ggn_mean_reduction(rank, world):
    """laplace.lowrank_ggn with a per-datum mean outer log-likelihood and
    reduction="mean": each rank's GGN square-root rows are weighted by
    √(n_r / N), so the state equals one process on the concatenated batch
    (also with an empty shard, sizes from _sizes)."""
    method = next(m for m in METHODS if m.name == "laplace.lowrank_ggn")

    def mean_outer(z, batch):
        return -torch.nn.functional.cross_entropy(z, batch[1])

    method = type(method)(**{**method.__dict__, "functions": {**method.functions, "outer_log_likelihood": mean_outer}})
    for inplace in (False, True):
        state, one, _ = _run_pair(
            method, torch.float64, rank, world, inplace, group_maker=lambda: pfd.data_parallel(reduction="mean")
        )
        assert_tree_close(_comparable(state), _comparable(one), torch.float64)
    return True


def check_batch_size_knob(rank, world):
    """A batch whose tensor leaves do not share a first dimension: "sum"
    needs no batch size; "mean" asks for one (every rank raises, naming
    the knob) and works with ``batch_size=``."""
    method = next(m for m in METHODS if m.name == "sgmcmc.sgld")
    dtype = torch.float64
    params, _ = method.problem(dtype)
    shards = _shards(method, dtype, world, 1)

    def lp(p, batch):
        return summed_log_posterior(p, batch[:2])

    def with_scale(batch):
        return (*batch, torch.tensor(1.0, dtype=dtype))

    for reduction in ("sum", "mean"):
        for batch_size in (None, lambda b: b[0].shape[0]):
            group = pfd.data_parallel(reduction=reduction, batch_size=batch_size)
            transform = pf.sgmcmc.sgld.build(lp, lr=1e-2, temperature=0.0, process_group=group)
            state = transform.init(_fresh(params))
            if reduction == "mean" and batch_size is None:
                try:
                    transform.update(state, with_scale(shards[rank]))
                    raise AssertionError("no error for a mean without a batch size")
                except pfd.RankError as err:
                    assert "batch_size=" in str(err) and isinstance(err, ValueError), str(err)
                continue
            state = transform.update(state, with_scale(shards[rank]))
            single = pf.sgmcmc.sgld.build(lp, lr=1e-2, temperature=0.0)
            one = single.update(single.init(_fresh(params)), with_scale(_concat(shards)))
            if reduction == "sum":
                assert_tree_close(_comparable(state), _comparable(one), dtype)
            else:  # the mean of sums: each rank's sum weighted by its share of the samples
                sizes = _sizes(world, 1)
                assert state.log_posterior.shape == one.log_posterior.shape
                values = [None] * world
                local = summed_log_posterior(params, shards[rank])[0] if sizes[rank] else torch.tensor(0.0, dtype=dtype)
                dist.all_gather_object(values, float(local))
                expected = sum(n * v for n, v in zip(sizes, values)) / sum(sizes)
                assert abs(float(state.log_posterior) - expected) < 1e-9 * max(1.0, abs(expected))
    return True


def _summed_loss(p, batch):
    value, aux = summed_log_posterior(p, batch)
    return -value, aux


def _sharded_rows():
    return [m for m in METHODS if m.module in ("ekf.dense_fisher", "laplace.dense_fisher", "laplace.dense_ggn")] + [
        m for m in METHODS if m.module == "laplace.dense_hessian"
    ]


def check_sharded_equals_dense(rank, world):
    """The sharded mode against the dense one-process method on the
    concatenated batch: covariance / precision (gathered), mean, log
    likelihood; in place and not; scalar and matrix transition covariance."""
    report = {}
    for method in _sharded_rows():
        reduction = "sum" if method.module == "laplace.dense_hessian" else "auto"
        variants = [{}]
        if method.module == "ekf.dense_fisher":
            size = tree_ravel(method.problem(torch.float64)[0])[0].numel()
            g = torch.Generator().manual_seed(3)
            a = torch.randn(size, size, generator=g, dtype=torch.float64)
            variants.append({"transition_cov": (a @ a.T / size * 0.01)})
        for extra in variants:
            for dtype in DTYPES:
                for inplace in (False, True):
                    extra_d = {k: v.to(dtype) for k, v in extra.items()}

                    def group_maker(reduction=reduction):
                        return pfd.sharded(reduction=reduction)

                    state, one, group = _run_pair(
                        method, dtype, rank, world, inplace, group_maker=group_maker, **extra_d
                    )
                    matrix = state.cov if hasattr(state, "cov") else state.prec
                    assert isinstance(matrix, ShardedMatrix)
                    a, b = matrix.start, matrix.stop
                    assert matrix.local.shape == (b - a, matrix.size)
                    try:
                        assert_tree_close(_comparable(state), _comparable(one), dtype)
                    except AssertionError as err:
                        raise AssertionError(f"{method.name} {dtype} inplace={inplace} {list(extra)}: {err}") from err
                    same_on_every_rank(_replicated(state), method.name)
                    report[f"{method.name}/{dtype}/{inplace}/{list(extra)}"] = group.stats.wire_bytes
    return report


def check_sharded_sampling(rank, world):
    """The distributed factor equals the Cholesky factor of the gathered
    matrix; draws equal the dense formulas with the same noise (EKF: μ + L ε,
    Laplace: μ + L⁻ᵀ ε); the factor is cached until the next update."""
    for module, name in (("ekf.dense_fisher", "ekf.dense_fisher"), ("laplace.dense_fisher", "laplace.dense_fisher")):
        method = next(m for m in METHODS if m.name == name)
        for dtype in DTYPES:
            state, _, group = _run_pair(method, dtype, rank, world, False, group_maker=pfd.sharded)
            matrix = state.cov if hasattr(state, "cov") else state.prec
            whole = matrix.gather()
            rows = factor(matrix, "m", "")
            widths = [b - a for a, b in matrix.bounds()]
            padded = torch.zeros(rows.shape[0], matrix.size, dtype=dtype)
            padded[:, : rows.shape[1]] = rows
            full = group.gather_columns(padded.mT.contiguous(), widths).mT
            assert_tree_close(full, torch.linalg.cholesky(whole), dtype)
            flat = tree_ravel(state.params)[0]
            module_ = method.lib_module(pf)
            for shape in ((), (5,), (2, 3)):
                torch.manual_seed(11)
                before = group.stats.snapshot()
                draws = module_.sample(state, shape)
                after = group.stats.snapshot()
                # rank 0's seed, as sample drew it
                torch.manual_seed(11)
                seed = pfd._group.draw_seed()
                n = torch.Size(shape).numel()
                eps = normal_from_seed(seed, (n, matrix.size), dtype, flat.device)
                chol = torch.linalg.cholesky(whole)
                if module == "ekf.dense_fisher":
                    expected = flat + eps @ chol.mT
                else:
                    expected = flat + torch.linalg.solve_triangular(chol, eps, upper=False, left=False)
                got = torch.cat([x.reshape(n, -1) for x in tree_leaves(draws)], 1)
                assert_tree_close(got, expected, dtype)
                for leaf, p in zip(tree_leaves(draws), tree_leaves(state.params)):
                    assert leaf.shape == torch.Size(shape) + p.shape
                same_on_every_rank(draws, f"{name} draws")
                # the factor was cached by the factor() call above: no broadcast of its blocks
                factor_calls = _calls(after, "broadcast") - _calls(before, "broadcast")
                expected_calls = 1 if module == "ekf.dense_fisher" else 1 + world
                assert factor_calls == expected_calls, (factor_calls, expected_calls)
    return True


def check_utils_match_one_process(rank, world):
    """empirical_fisher, ggn, diag_ggn and cg with curvature operators over
    a process group equal one process on the concatenated batch."""
    from tests.methods import forward, outer_log_likelihood

    method = METHODS[0]
    for dtype in DTYPES:
        params, _ = method.problem(dtype)
        # Shards without an empty one (ggn's closures and the operators are
        # the user's functions of their shard; an empty one is theirs to handle).
        shards = _shards(method, dtype, world, _NO_EMPTY[world])
        whole = _concat(shards)
        mine = shards[rank]
        # empirical_fisher of a per_samplify function takes an empty shard.
        empty_shards = _shards(method, dtype, world, 1 if world == 2 else 0)
        per_sample_ll = pf.per_samplify(lambda p, b: log_likelihood(p, b)[0])
        got = pf.empirical_fisher(per_sample_ll, process_group=pfd.data_parallel())(params, empty_shards[rank])
        assert_tree_close(got, pf.empirical_fisher(per_sample_ll)(params, _concat(empty_shards)), dtype)
        group = pfd.data_parallel()
        per_sample = pf.per_samplify(lambda p, b: log_likelihood(p, b)[0])
        for normalize in (False, True):
            got = pf.empirical_fisher(per_sample, normalize=normalize, process_group=group)(params, mine)
            want = pf.empirical_fisher(per_sample, normalize=normalize)(params, whole)
            assert_tree_close(got, want, dtype)
            same_on_every_rank([got], "empirical_fisher")

            def fwd(batch):
                return lambda p: forward(p, batch)[0]

            def loss(batch):
                return lambda z: -outer_log_likelihood(z, batch)

            got = pf.ggn(fwd(mine), loss(mine), normalize=normalize, process_group=group)(params)
            want = pf.ggn(fwd(whole), loss(whole), normalize=normalize)(params)
            assert_tree_close(got, want, dtype)
            got = pf.diag_ggn(fwd(mine), loss(mine), normalize=normalize, process_group=group)(params)
            want = pf.diag_ggn(fwd(whole), loss(whole), normalize=normalize)(params)
            assert_tree_close(got, want, dtype)

            b = tree_map(lambda x: torch.ones_like(x), params)
            for make in (operators.ggn_operator, operators.fisher_operator):
                if make is operators.ggn_operator:
                    mine_op = make(fwd(mine), loss(mine), params, normalize=normalize)
                    whole_op = make(fwd(whole), loss(whole), params, normalize=normalize)
                else:
                    mine_op = make(lambda p, s=mine: log_likelihood_per(p, s), params, normalize=normalize)
                    whole_op = make(lambda p, s=whole: log_likelihood_per(p, s), params, normalize=normalize)
                x, info = pf.cg(mine_op, b, maxiter=8, damping=1.0, process_group=group)
                y, info1 = pf.cg(whole_op, b, maxiter=8, damping=1.0)
                assert info["niter"] == info1["niter"]
                assert_tree_close(x, y, dtype, kind="solve")
                same_on_every_rank(x, "cg")
        # a Hessian operator of a per-datum mean: its rank weights come from A.rows
        mean_lp = lambda s: lambda p: log_posterior(p, s)[0]
        op = operators.hessian_operator(mean_lp(mine), params)
        op.rows = mine[0].shape[0]
        x, _ = pf.cg(op, tree_map(torch.ones_like, params), maxiter=5, damping=1.0, process_group=group)
        y, _ = pf.cg(
            operators.hessian_operator(mean_lp(whole), params),
            tree_map(torch.ones_like, params),
            maxiter=5,
            damping=1.0,
        )
        assert_tree_close(x, y, dtype, kind="solve")
    return True


def log_likelihood_per(p, batch):
    from tests.methods import log_likelihood_per_sample

    return log_likelihood_per_sample(p, batch)[0]


class ShardError(Exception):
    """A user's error raised on one rank only."""


def _snapshot(state):
    """Clones of every tensor of a state (a sharded matrix's local rows included)."""
    out = []
    for value in state:
        if isinstance(value, ShardedMatrix):
            out.append(value.local.clone())
        elif isinstance(value, torch.optim.Optimizer):
            continue
        else:
            out += [x.detach().clone() for x in tree_leaves(value) if isinstance(x, torch.Tensor)]
    return out


def _unchanged(state, before, what):
    after = _snapshot(state)
    assert len(after) == len(before)
    for i, (a, b) in enumerate(zip(after, before)):
        assert a.shape == b.shape and torch.equal(a, b), f"{what}: tensor {i} of the state changed"


def _expect_rank_error(fn, what, failing, kind=ValueError, text=None):
    try:
        fn()
    except pfd.RankError as err:
        assert isinstance(err, kind), (what, type(err).__mro__)
        assert err.rank == failing, (what, err.rank, str(err))
        assert f"rank {failing} of" in str(err), str(err)
        if text is not None:
            assert text in str(err), str(err)
        return str(err)
    raise AssertionError(f"{what}: no RankError")


def check_a_failing_rank_makes_every_rank_raise_and_changes_nothing(rank, world):
    """A rank whose batch gives NaN (or whose user function raises) makes
    every rank raise the same RankError before anything is written: in-place
    states stay bit for bit as they were, on every rank. Both exchanges are
    covered: the header (a method's first step on a group, and every step
    of the gathering methods) and the status folded into an all-reduce."""
    failing = world - 1
    names = [
        "ekf.dense_fisher",
        "ekf.diag_fisher",
        "ekf.lowrank_fisher",
        "laplace.dense_fisher",
        "laplace.diag_ggn",
        "laplace.lowrank_ggn",
        "laplace.dense_hessian",
        "sgmcmc.sghmc",
        "vi.diag",
        "torchopt",
        "optim",
    ]
    messages = {}
    for name in names:
        method = next(m for m in METHODS if m.name == name)
        for group_maker in (pfd.data_parallel, pfd.sharded) if name == "ekf.dense_fisher" else (pfd.data_parallel,):
            dtype = torch.float64
            params, _ = method.problem(dtype)
            group = group_maker(reduction="sum" if name == "laplace.dense_hessian" else "auto")
            transform = _build(method, process_group=group)
            state = transform.init(_fresh(params))
            # One good step first: after it the all-reduce methods fold the
            # status into their payload (the path a failure must also stop).
            state = transform.update(state, _shards(method, dtype, world, 0)[rank], inplace=True)
            batch = _shards(method, dtype, world, 1)[rank]
            if rank == failing:
                batch = (batch[0].clone().fill_(float("nan")), batch[1])
            before = _snapshot(state)
            update = partial(transform.update, state, batch, inplace=True)
            text = _expect_rank_error(update, name, failing)
            _unchanged(state, before, name)
            # every rank raised the same message
            texts = [None] * world
            dist.all_gather_object(texts, text)
            assert len(set(texts)) == 1, texts
            messages[f"{name}/{group.mode}"] = text
    # A user's own exception type: every rank's RankError is also one.
    method = next(m for m in METHODS if m.name == "laplace.diag_fisher")

    def broken(p, batch):
        if rank == 0:
            raise ShardError("this shard is bad")
        return log_likelihood(p, batch)

    params, _ = method.problem(torch.float32)
    transform = pf.laplace.diag_fisher.build(broken, process_group=pfd.data_parallel())
    state = transform.init(_fresh(params))
    before = _snapshot(state)
    _expect_rank_error(
        lambda: transform.update(state, _shards(method, torch.float32, world, _NO_EMPTY[world])[rank], inplace=True),
        "user error",
        0,
        kind=ShardError,
        text="ShardError: this shard is bad",
    )
    _unchanged(state, before, "user error")
    return messages


def check_mismatches_are_found_up_front(rank, world):
    """Different parameter shapes or values at init, different
    hyperparameters at the first update: every rank raises MismatchError."""
    method = next(m for m in METHODS if m.name == "ekf.diag_fisher")
    params, _ = method.problem(torch.float32)
    last = world - 1
    # shapes
    odd = dict(params, head=(params["head"][0], torch.zeros(5 if rank == last else 3)))
    try:
        pf.ekf.diag_fisher.build(log_likelihood, lr=0.1, process_group=pfd.data_parallel()).init(odd)
        raise AssertionError("no MismatchError for shapes")
    except pfd.MismatchError as err:
        assert "Rank 0:" in str(err) and f"Rank {last}:" in str(err) and "(5,)" in str(err), str(err)
    # values
    values = _fresh(params)
    if rank == last:
        values["layer"]["b"].add_(1e-6)
    try:
        pf.ekf.diag_fisher.build(log_likelihood, lr=0.1, process_group=pfd.data_parallel()).init(values)
        raise AssertionError("no MismatchError for values")
    except pfd.MismatchError as err:
        assert f"rank(s) [{last}]" in str(err), str(err)
    # broadcast_ repairs it
    pfd.broadcast_(values)
    pf.ekf.diag_fisher.build(log_likelihood, lr=0.1, process_group=pfd.data_parallel()).init(values)
    # hyperparameters
    transform = pf.ekf.diag_fisher.build(
        log_likelihood, lr=0.1 if rank != last else 0.2, process_group=pfd.data_parallel()
    )
    state = transform.init(_fresh(params))
    try:
        transform.update(state, _shards(method, torch.float32, world, 1)[rank])
        raise AssertionError("no MismatchError for lr")
    except pfd.MismatchError as err:
        assert "0.2" in str(err), str(err)
    # an empty global batch
    transform = pf.ekf.diag_fisher.build(log_likelihood, lr=0.1, process_group=pfd.data_parallel())
    state = transform.init(_fresh(params))
    empty = method.problem(torch.float32, n=0)[1]
    try:
        transform.update(state, empty)
        raise AssertionError("no error for an empty global batch")
    except ValueError as err:
        assert "empty on every rank" in str(err), str(err)
    # states and groups that do not go together
    sharded_state = pf.ekf.dense_fisher.build(log_likelihood, lr=0.1, process_group=pfd.sharded()).init(params)
    try:
        pf.ekf.dense_fisher.update(sharded_state, empty, log_likelihood, lr=0.1, process_group=pfd.data_parallel())
        raise AssertionError("no error for a sharded state with a data-parallel group")
    except ValueError as err:
        assert "sharded" in str(err), str(err)
    try:
        pf.ekf.diag_fisher.build(log_likelihood, lr=0.1, process_group=pfd.sharded())
        raise AssertionError("ekf.diag_fisher accepted a sharded group")
    except ValueError as err:
        assert "'sharded'" in str(err), str(err)
    return True


def _linear_log_likelihood(p, batch):
    return (batch[0] * p["w"]).sum(-1).sum(), torch.tensor([])


def check_sharded_overflow_is_voted(rank, world):
    """A sharded update whose local rows overflow on any rank raises on
    every rank and writes nothing (the last check before writing)."""
    params = {"w": torch.ones(7)}
    transform = pf.laplace.dense_fisher.build(_linear_log_likelihood, init_prec=1.0, process_group=pfd.sharded())
    state = transform.init(params)
    x = torch.ones(2, 7) * (1e25 if rank == 0 else 1.0)
    before = _snapshot(state)
    try:
        transform.update(state, (x,), inplace=True)
        raise AssertionError("no error for an overflowing term")
    except ValueError as err:
        assert "overflowed" in str(err) and "no rank changed its state" in str(err), str(err)
    _unchanged(state, before, "overflow")
    return True


def check_a_rank_that_never_arrives_times_out(rank, world):
    """Rank 0 updates, the others never do: rank 0 raises CollectiveError
    after the group's timeout (3 s here) instead of hanging."""
    import datetime

    sub = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3))
    method = next(m for m in METHODS if m.name == "laplace.diag_fisher")
    params, batch = method.problem(torch.float32)
    group = pfd.data_parallel(sub)
    state = pf.laplace.diag_fisher.build(log_likelihood, process_group=group).init(_fresh(params))
    outcome = "no update"
    if rank == 0:
        start = time.monotonic()
        try:
            pf.laplace.diag_fisher.update(state, batch, log_likelihood, process_group=group)
            outcome = "returned"
        except pfd.CollectiveError as err:
            outcome = f"CollectiveError after {time.monotonic() - start:.1f} s: {str(err)[:80]}"
        assert outcome.startswith("CollectiveError"), outcome
    return outcome


def check_collectives_per_step(rank, world):
    """The collectives of one steady-state step are the ones documented:
    their number and payloads (values) for uneven shards."""
    size = tree_ravel(METHODS[0].problem(torch.float32)[0])[0].numel()
    counts = _sizes(world, 1)
    n, widest = sum(counts), max(counts)
    rows = [b - a for a, b in pfd.row_bounds(size, world)]
    header = 6 * world  # int64 values, all-gathered
    expected = {
        # method: {op: (calls, payload values)} of one step after the first
        ("ekf.diag_fisher", "data"): {"all_reduce": (1, 2 * size + 1 + 2)},
        ("laplace.diag_fisher", "data"): {"all_reduce": (1, size + 2)},
        ("sgmcmc.sghmc", "data"): {"all_reduce": (1, size + 1 + 2)},
        ("ekf.dense_fisher", "data"): {"all_gather": (2, header + world * widest * (size + 1))},
        ("laplace.dense_fisher", "data"): {"all_gather": (2, header + world * widest * (size + 1))},
        ("ekf.lowrank_fisher", "data"): {"all_gather": (2, header + world * widest * (size + 1))},
        ("ekf.dense_fisher", "sharded"): {
            "all_gather": (3, header + world * widest * (size + 1) + world * (n + 1) * max(rows)),
            "all_reduce": (1, n * n),
        },
    }
    for (name, mode), ops in expected.items():
        method = next(m for m in METHODS if m.name == name)
        group = pfd.sharded() if mode == "sharded" else pfd.data_parallel()
        transform = _build(method, process_group=group)
        state = transform.init(_fresh(method.problem(torch.float32)[0]))
        state = transform.update(state, _shards(method, torch.float32, world, 0)[rank])
        group.stats.reset()
        transform.update(state, _shards(method, torch.float32, world, 1)[rank])
        got = {op: calls for op, (calls, _, _) in group.stats.by_op.items()}
        for op, (calls, values) in ops.items():
            assert got.get(op) == calls, (name, mode, group.stats.by_op)
            payload = group.stats.by_op[op][1]
            if op == "all_gather":
                # the header is int64 (8 bytes), the rest float32
                assert payload == 8 * header + 4 * (values - header), (name, mode, payload, values)
            else:
                assert payload == 4 * values, (name, mode, payload, values)
        assert set(got) == set(ops), (name, mode, group.stats.by_op)
    return True
