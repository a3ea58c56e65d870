"""``new_matrix``: the CPU block pool of the compiled backend (reuse of freed
blocks, never of live ones, the size floor, the cap) and the eager fallback."""

import os
import subprocess
import sys

import pytest
import torch

from posteriors_fast import _library
from posteriors_fast.ops import new_matrix as pool
from tests.ops._native import needs_ext

BIG = (600, 600)  # 1.4 MB of float32: above the 1 MiB floor


@pytest.fixture(autouse=True)
def empty_pool():
    pool.pool_idle_bytes(release=True)
    yield
    pool.pool_idle_bytes(release=True)


def test_eager_is_torch_empty():
    like = torch.zeros(2, dtype=torch.float64)
    out = pool.new_matrix(BIG, like, backend="eager")
    assert out.shape == BIG and out.dtype == torch.float64 and out.is_contiguous()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_freed_block_is_reused_for_the_same_size(dtype):
    like = torch.zeros(1, dtype=dtype)
    first = pool.new_matrix(BIG, like, backend="compiled")
    assert first.shape == BIG and first.dtype == dtype and first.is_contiguous()
    first.fill_(3.0)
    address, nbytes = first.data_ptr(), first.numel() * first.element_size()
    assert pool.pool_idle_bytes() == 0
    del first
    assert pool.pool_idle_bytes() == nbytes
    second = pool.new_matrix(BIG, like, backend="compiled")
    assert second.data_ptr() == address and pool.pool_idle_bytes() == 0
    other = pool.new_matrix((BIG[0] + 1, BIG[1]), like, backend="compiled")  # another size: a new block
    assert other.data_ptr() != address


@needs_ext
def test_a_block_with_a_live_view_is_not_reused():
    like = torch.zeros(1)
    block = pool.new_matrix(BIG, like, backend="compiled")
    view = block[10:, :5]
    address = block.data_ptr()
    del block
    assert pool.pool_idle_bytes() == 0
    other = pool.new_matrix(BIG, like, backend="compiled")
    assert other.data_ptr() != address
    view.fill_(1.0)
    assert bool((view == 1.0).all())
    del view
    assert pool.pool_idle_bytes() > 0


@needs_ext
def test_small_blocks_are_not_pooled_and_release_empties_the_pool():
    like = torch.zeros(1)
    small = pool.new_matrix((10, 10), like, backend="compiled")
    del small
    assert pool.pool_idle_bytes() == 0
    big = pool.new_matrix(BIG, like, backend="compiled")
    del big
    assert pool.pool_idle_bytes() > 0
    assert pool.pool_idle_bytes(release=True) == 0


@needs_ext
def test_pool_size_zero_turns_pooling_off():
    code = (
        "import torch; from posteriors_fast.ops import new_matrix as pool; "
        "x = pool.new_matrix((600, 600), torch.zeros(1), backend='compiled'); del x; "
        "print(pool.pool_idle_bytes())"
    )
    env = dict(os.environ, POSTERIORS_FAST_POOL_MB="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_fake_kernel_gives_the_shape_without_data():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        like = torch.empty(3, dtype=torch.float64)
        out = _library.OPS.new_matrix([4, 7], like)
    assert out.shape == (4, 7) and out.dtype == torch.float64


@needs_ext
def test_consecutive_updates_never_share_a_live_precision():
    import posteriors_fast as pf

    params = {"w": torch.zeros(600)}  # P = 600: a 1.4 MB precision, pooled

    def log_post(p, batch):
        return -(batch * p["w"]).sum(-1).pow(2).mean(), torch.tensor([])

    transform = pf.laplace.dense_fisher.build(log_post, init_prec=1.0, backend="compiled")
    batch = torch.randn(8, 600, generator=torch.Generator().manual_seed(0))
    states = [transform.init(params)]
    for _ in range(4):
        states.append(transform.update(states[-1], batch))
    addresses = {s.prec.data_ptr() for s in states}
    assert len(addresses) == len(states)
    eager = pf.laplace.dense_fisher.build(log_post, init_prec=1.0, backend="eager")
    want = eager.init(params)
    for state in states[1:]:
        want = eager.update(want, batch)
        torch.testing.assert_close(state.prec, want.prec, rtol=1e-5, atol=1e-5)


@needs_ext
def test_like_that_requires_grad_gives_a_plain_buffer():
    like = torch.zeros(3, requires_grad=True)
    out = pool.new_matrix(BIG, like, backend="compiled")
    assert not out.requires_grad and out.grad_fn is None
