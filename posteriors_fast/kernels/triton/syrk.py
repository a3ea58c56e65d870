"""Triton ``syrk``: ``out ← β·C + α·AᵀB`` on the upper triangle of a (P, P)
output, for A, B of shape (K, P) with AᵀB symmetric (B defaults to A), and
optionally mirrored so the result is exactly symmetric.

The grid is 2-D over (row tile i, column tile j); programs with j < i exit at
once, so only the upper tiles are computed (about half the FLOPs of AᵀB). Each
upper tile reads only the upper triangle of C and, with ``MIRROR``, also writes
its transpose into the (j, i) tile; no program reads what another writes, so C
may be ``out`` itself (in place). With ``HAS_C`` false (β == 0) C is never
loaded, so NaN or garbage in it is ignored.

Registered as the custom op ``posteriors_fast::syrk_triton``.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from posteriors_fast.kernels.triton._launch import check_factor, check_like, launch

#: Tile edges. Output tiles are square (BLOCK_M == BLOCK_N).
BLOCK_MN = 32
BLOCK_K = 16


@triton.jit
def _syrk_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    out_ptr,
    P,
    K,
    alpha: "fp64",  # noqa: F821  (Triton's type annotation: float64 scalars)
    beta: "fp64",  # noqa: F821
    stride_ak,
    stride_ap,
    stride_bk,
    stride_bp,
    stride_cm,
    stride_cn,
    stride_om,
    stride_on,
    HAS_C: tl.constexpr,
    MIRROR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    if pid_j < pid_i:
        return
    dtype = out_ptr.dtype.element_ty
    rm = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < P
    mask_n = rn < P

    # Element offsets are int64. Triton's integers are 32-bit, and index·stride
    # passes 2^31 once P ≥ 46,341 (a row of out or C: rm·P) or K·P ≥ 2^31 (A,
    # B); the strides are arbitrary (views), so not even an offset inside one
    # tile is provably below 2^31. Hence every index is widened before it
    # meets a stride (plain int64, no 32-bit in-tile part). The indices
    # themselves stay int32 (below P + BLOCK_M and K + BLOCK_K). The int64
    # products are formed once per program: the K loop advances its pointers
    # by a 64-bit scalar, so the loop body does the same integer work as with
    # 32-bit offsets (adding an offset to a pointer is 64-bit either way).
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rk64 = rk.to(tl.int64)
    a_ptrs = a_ptr + rk64[:, None] * stride_ak + rm64[None, :] * stride_ap
    b_ptrs = b_ptr + rk64[:, None] * stride_bk + rn64[None, :] * stride_bp
    # tl.cast, not .to: a stride equal to 1 is specialised to a constexpr.
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=dtype)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        a_ptrs += a_step
        b_ptrs += b_step

    # alpha and beta are float64 scalars (python floats would be fp32 on GPU):
    # the epilogue runs in the promoted type and is cast once at the store.
    value = acc * alpha
    # Global row <= col: the whole tile when j > i, the upper half on the diagonal.
    upper = (rm[:, None] <= rn[None, :]) & mask_m[:, None] & mask_n[None, :]
    if HAS_C:
        c = tl.load(c_ptr + rm64[:, None] * stride_cm + rn64[None, :] * stride_cn, mask=upper, other=0.0)
        value += beta * c
    value = value.to(dtype)
    tl.store(out_ptr + rm64[:, None] * stride_om + rn64[None, :] * stride_on, value, mask=upper)
    if MIRROR:
        # out[col, row] = value[row, col] for row < col: swapping the strides
        # stores the transpose without moving data in registers.
        strict = (rm[:, None] < rn[None, :]) & mask_m[:, None] & mask_n[None, :]
        tl.store(out_ptr + rm64[:, None] * stride_on + rn64[None, :] * stride_om, value, mask=strict)


def check_syrk_args(out: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], c: Optional[torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the offending argument."""
    check_factor("a", a, "(K, P)")
    size = a.shape[1]
    if b is not None:
        check_like("b", b, a.shape, a, "a")
    check_like("out", out, (size, size), a, "a")
    if c is not None:
        check_like("c", c, (size, size), a, "a")


def launch_syrk(
    out: torch.Tensor,
    a: torch.Tensor,
    b: Optional[torch.Tensor],
    c: Optional[torch.Tensor],
    alpha: float,
    beta: float,
    mirror: bool,
) -> None:
    """Launch ``_syrk_kernel`` through ``wrap_triton`` (arguments already checked)."""
    size, depth = a.shape[1], a.shape[0]
    if size == 0:
        return
    b = a if b is None else b
    c = out if c is None else c
    has_c = beta != 0
    grid = (triton.cdiv(size, BLOCK_MN), triton.cdiv(size, BLOCK_MN))
    launch(
        _syrk_kernel,
        grid,
        a,
        b,
        c,
        out,
        size,
        depth,
        float(alpha),
        float(beta),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        c.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_C=has_c,
        MIRROR=bool(mirror),
        BLOCK_M=BLOCK_MN,
        BLOCK_N=BLOCK_MN,
        BLOCK_K=BLOCK_K,
    )


@torch.library.triton_op("posteriors_fast::syrk_triton", mutates_args={"out"})
def syrk_triton(
    out: torch.Tensor,
    a: torch.Tensor,
    b: Optional[torch.Tensor],
    c: Optional[torch.Tensor],
    alpha: float,
    beta: float,
    mirror: bool,
) -> None:
    """``out ← beta·c + alpha·aᵀb`` on the upper triangle (diagonal included).

    ``b`` defaults to ``a`` (the caller guarantees ``aᵀb`` symmetric); ``c``
    defaults to ``out`` (in-place accumulate) and only its upper triangle is
    read; with ``beta == 0`` it is not read at all. With ``mirror`` the lower
    triangle becomes the transpose of the upper one; otherwise it is untouched.
    """
    check_syrk_args(out, a, b, c)
    launch_syrk(out, a, b, c, alpha, beta, mirror)
