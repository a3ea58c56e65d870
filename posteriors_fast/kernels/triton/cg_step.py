"""Triton conjugate-gradient iteration on flat real vectors.

One call of ``posteriors_fast::cg_step_triton`` is one CG iteration for the
damped operator ``A + damping·I``, given ``ap = A p`` (undamped)::

    pAp = p·ap + damping·(p·p);  α = gamma / pAp
    x += α p;  r -= α (ap + damping p);  gamma_new = r·r
    p ← r + (gamma_new / gamma) p;  return gamma_new

Three kernels, one per data-dependent pass: (1) per-block partial sums of p·ap
(and p·p when damped); (2) the x and r updates with per-block partial sums of
r·r; (3) the p update. The partials are summed with torch, and the scalars
(α, α·damping, the gamma ratio) stay on the device as small tensors loaded
inside the kernels: no ``.item()``, no host synchronisation.

Offsets: Triton's integers are 32-bit, and a block's first element
``pid·BLOCK`` passes 2^31 for vectors of 2^31 elements or more (8 GiB of
float32). Each program therefore moves its pointers to its block once, by an
int64 start; the offsets inside the block stay int32, which is safe since they
are below ``BLOCK`` (the vectors are contiguous), and so is the count of
elements left in the block (``min(N - start, BLOCK)``, formed in int64 once)
that the mask compares them with: the per-element integer work is that of
32-bit offsets.
"""

import torch
import triton
import triton.language as tl

from posteriors_fast.kernels.triton._launch import launch

#: Elements per program.
BLOCK = 1024


@triton.jit
def _cg_dots_kernel(p_ptr, ap_ptr, part_ptr, N, HAS_DAMPING: tl.constexpr, BLOCK: tl.constexpr):
    """part[0, pid] = Σ p·ap and, if damped, part[1, pid] = Σ p·p over the block."""
    pid = tl.program_id(0)
    # This block's pointers from an int64 start (see the module docstring).
    start = pid.to(tl.int64) * BLOCK
    p_ptr += start
    ap_ptr += start
    lanes = tl.arange(0, BLOCK)
    mask = lanes < tl.minimum(N - start, BLOCK).to(tl.int32)
    p = tl.load(p_ptr + lanes, mask=mask, other=0.0)
    ap = tl.load(ap_ptr + lanes, mask=mask, other=0.0)
    tl.store(part_ptr + pid, tl.sum(p * ap, axis=0))
    if HAS_DAMPING:
        tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(p * p, axis=0))


@triton.jit
def _cg_update_kernel(
    x_ptr, r_ptr, p_ptr, ap_ptr, scal_ptr, part_ptr, N, HAS_DAMPING: tl.constexpr, BLOCK: tl.constexpr
):
    """x += α p; r -= α ap + (α·damping) p; part[pid] = Σ r·r (new r)."""
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    x_ptr += start
    r_ptr += start
    p_ptr += start
    ap_ptr += start
    lanes = tl.arange(0, BLOCK)
    mask = lanes < tl.minimum(N - start, BLOCK).to(tl.int32)
    alpha = tl.load(scal_ptr)
    p = tl.load(p_ptr + lanes, mask=mask, other=0.0)
    ap = tl.load(ap_ptr + lanes, mask=mask, other=0.0)
    x = tl.load(x_ptr + lanes, mask=mask, other=0.0)
    r = tl.load(r_ptr + lanes, mask=mask, other=0.0)
    x = x + alpha * p
    r = r - alpha * ap
    if HAS_DAMPING:
        alpha_damping = tl.load(scal_ptr + 1)
        r = r - alpha_damping * p
    tl.store(x_ptr + lanes, x, mask=mask)
    tl.store(r_ptr + lanes, r, mask=mask)
    # Masked lanes loaded 0, so they add nothing.
    tl.store(part_ptr + pid, tl.sum(r * r, axis=0))


@triton.jit
def _cg_direction_kernel(p_ptr, r_ptr, ratio_ptr, N, BLOCK: tl.constexpr):
    """p ← r + ratio·p."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    p_ptr += start
    r_ptr += start
    lanes = tl.arange(0, BLOCK)
    mask = lanes < tl.minimum(N - start, BLOCK).to(tl.int32)
    ratio = tl.load(ratio_ptr)
    p = tl.load(p_ptr + lanes, mask=mask, other=0.0)
    r = tl.load(r_ptr + lanes, mask=mask, other=0.0)
    tl.store(p_ptr + lanes, r + ratio * p, mask=mask)


def check_cg_step_args(
    x: torch.Tensor, r: torch.Tensor, p: torch.Tensor, ap: torch.Tensor, gamma: torch.Tensor
) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 1-D tensor, got {got}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"x must be float32 or float64, got {x.dtype}")
    for name, t in (("x", x), ("r", r), ("p", p), ("ap", ap)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(x.shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D tensor of shape {tuple(x.shape)} (that of x), got {got}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} must have dtype {x.dtype} (that of x), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on device {x.device} (that of x), got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not isinstance(gamma, torch.Tensor) or gamma.dim() != 0:
        got = tuple(gamma.shape) if isinstance(gamma, torch.Tensor) else type(gamma).__name__
        raise ValueError(f"gamma must be a 0-dim tensor holding r·r, got {got}")
    if gamma.dtype != x.dtype:
        raise ValueError(f"gamma must have dtype {x.dtype} (that of x), got {gamma.dtype}")
    if gamma.device != x.device:
        raise ValueError(f"gamma must be on device {x.device} (that of x), got {gamma.device}")


@torch.library.triton_op("posteriors_fast::cg_step_triton", mutates_args={"x", "r", "p"})
def cg_step_triton(
    x: torch.Tensor,
    r: torch.Tensor,
    p: torch.Tensor,
    ap: torch.Tensor,
    gamma: torch.Tensor,
    damping: float,
) -> torch.Tensor:
    """One CG iteration in place on ``x``, ``r``, ``p``; returns ``gamma_new = r·r``
    (0-dim, same dtype). ``ap = A p`` is undamped; the operator is ``A + damping·I``."""
    check_cg_step_args(x, r, p, ap, gamma)
    size = x.shape[0]
    nblocks = max(triton.cdiv(size, BLOCK), 1)
    grid = (nblocks,)
    has_damping = damping != 0
    part = torch.empty((2 if has_damping else 1, nblocks), dtype=x.dtype, device=x.device)
    launch(_cg_dots_kernel, grid, p, ap, part, size, HAS_DAMPING=has_damping, BLOCK=BLOCK)
    pap = part[0].sum()
    if has_damping:
        pap = pap + damping * part[1].sum()
    alpha = gamma / pap
    scal = torch.stack((alpha, alpha * damping)) if has_damping else alpha.reshape(1)

    part_rr = torch.empty((nblocks,), dtype=x.dtype, device=x.device)
    launch(_cg_update_kernel, grid, x, r, p, ap, scal, part_rr, size, HAS_DAMPING=has_damping, BLOCK=BLOCK)
    gamma_new = part_rr.sum()
    ratio = (gamma_new / gamma).reshape(1)
    launch(_cg_direction_kernel, grid, p, r, ratio, size, BLOCK=BLOCK)
    return gamma_new
