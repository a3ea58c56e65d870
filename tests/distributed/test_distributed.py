"""Data-parallel, sharded and many-chain runs on gloo, 2 and 3 processes
spawned here (loopback only, bounded in time): every check of
tests/distributed/checks.py runs once per world size in one process group,
and each becomes one test here."""

import pytest
import torch
import torch.distributed as dist

import posteriors_fast as pf
from posteriors_fast import distributed as pfd
from tests.distributed._harness import run_checks

CHECKS = [
    "check_every_method_matches_one_process_on_the_concatenated_batch",
    "check_gradient_reductions",
    "check_lowrank_ggn_mean_reduction",
    "check_batch_size_knob",
    "check_noise_is_shared_and_reproducible",
    "check_independent_chains",
    "check_sharded_equals_dense",
    "check_sharded_sampling",
    "check_utils_match_one_process",
    "check_a_failing_rank_makes_every_rank_raise_and_changes_nothing",
    "check_mismatches_are_found_up_front",
    "check_sharded_overflow_is_voted",
    "check_collectives_per_step",
    # torch.compile of a graph per process: seconds; one world size is enough.
    "check_compiled_backend_with_a_process_group",
    # Last: it leaves a broken subgroup behind.
    "check_a_rank_that_never_arrives_times_out",
]
ONLY_TWO = {"check_compiled_backend_with_a_process_group"}
CASES = [(name, world) for world in (2, 3) for name in CHECKS if world == 2 or name not in ONLY_TWO]

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


@pytest.fixture(scope="module")
def groups():
    """One run of all checks per world size, started on first use."""
    cache = {}

    def get(world):
        if world not in cache:
            names = [name for name, w in CASES if w == world]
            cache[world] = run_checks("tests.distributed.checks", names, world, timeout=240, gloo_timeout=30)
        return cache[world]

    return get


@needs_gloo
@pytest.mark.parametrize("name,world", CASES, ids=[f"{n.removeprefix('check_')}-{w}procs" for n, w in CASES])
def test_distributed(groups, name, world):
    groups(world).expect(name)


def test_no_process_group_means_none():
    assert pfd.resolve(None, "x") is None


def test_a_group_needs_torch_distributed_initialised():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        pfd.data_parallel()


def test_process_group_of_the_wrong_type_is_named():
    with pytest.raises(TypeError, match="process_group must be None, a torch.distributed.ProcessGroup"):
        pf.ekf.dense_fisher.build(lambda p, b: (p.sum(), None), lr=0.1, process_group="world")


def test_noise_stream_replays_and_leaves_the_global_generator_alone():
    torch.manual_seed(0)
    expected_next = torch.rand(())
    torch.manual_seed(0)
    draws = []
    for _ in range(2):
        stream = pfd.NoiseStream(42)
        with stream.seeded():
            a = torch.randn(3)
        with stream.seeded():
            b = torch.randn(3)
        draws.append((a, b))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[0][1])
    assert torch.equal(torch.rand(()), expected_next)


def test_row_bounds_cover_every_row_once():
    for size, parts in ((7, 3), (3, 3), (2, 3), (31, 2)):
        bounds = pfd.row_bounds(size, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == size
        assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
        assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
