"""Every ``posteriors_fast::`` operator schema and its fake (meta) kernel.

Importing this module defines the schemas, so a first call under
``torch.compile(fullgraph=True)`` traces without touching data. Implementations
live elsewhere and attach to these names:

* ``csrc/cpu/*.cpp`` registers CPU kernels with
  ``TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m)``; the built extension
  (``posteriors_fast._C``) is soft-loaded by :func:`load_extension`.
* The Triton kernels (``posteriors_fast/kernels/triton``) are separate
  ``torch.library.triton_op`` operators named ``<op>_triton``: ``triton_op``
  defines its own schema from its Python body so that Inductor can trace into
  it, which an opaque CPU kernel under the same name would prevent.

None of the ops is differentiable: they serve ``torch.no_grad`` paths (Fisher
accumulation, the EKF covariance downdate, CG, SG-MCMC noise and steps).
Calling one on tensors that require grad, with grad mode on, raises a
``RuntimeError`` that says so instead of silently dropping gradients. An op
that writes an argument advances its version counter, as torch's in-place
ops do.
"""

import logging
from typing import Tuple

import torch

logger = logging.getLogger("posteriors_fast")

NAMESPACE = "posteriors_fast"

#: op name -> schema. Documented semantics (shared by every implementation):
SCHEMAS = {
    # out ← beta·C + alpha·AᵀB on the upper triangle (diagonal included), A and B
    # of shape (K, P), AᵀB symmetric (B defaults to A), C defaults to out (in
    # place); only C's upper triangle is read and C is not read when beta == 0.
    # mirror=True copies the upper triangle onto the lower one; otherwise the
    # strictly lower triangle of out is left untouched.
    "syrk_": "syrk_(Tensor(a!) out, Tensor a, Tensor? b, Tensor? c, float alpha, float beta, bool mirror) -> ()",
    # S·Jᵀ, shape (P, R), for S (P, P) symmetric and J (R, P): the Σ·Jᵀ of the
    # Woodbury EKF step. Implementations may read S by rows or by columns.
    "symm_jt": "symm_jt(Tensor s, Tensor j) -> Tensor",
    # cov ← cov − WᵀW, W of shape (R, P): the Woodbury EKF covariance downdate.
    # Reads cov's upper triangle and writes an exactly symmetric result.
    "cov_downdate_": "cov_downdate_(Tensor(a!) cov, Tensor w) -> ()",
    # One conjugate-gradient iteration on flat real vectors for the operator
    # A + damping·I, given ap = A·p and gamma = r·r (0-dim):
    #   α = gamma / (p·ap + damping·p·p); x += α·p; r −= α·(ap + damping·p);
    #   gamma_new = r·r; p ← r + (gamma_new / gamma)·p; returns gamma_new (0-dim).
    "cg_step_": "cg_step_(Tensor(a!) x, Tensor(b!) r, Tensor(c!) p, Tensor ap, Tensor gamma, float damping) -> Tensor",
    # Fill out (contiguous float32/float64) with standard normal draws that are
    # a function of (seed, element index) only (Philox4x32-10 + Box-Muller):
    # the same for any thread count, independent streams for different seeds.
    "normal_": "normal_(Tensor(a!) out, int seed) -> ()",
    # One SGHMC step of every leaf, the noise drawn inside the kernel:
    # params' = params + step·momenta;
    # momenta' = keep·momenta + lr·grads + scale·ξ, ξ ~ N(0, I) from the
    # generator of normal_ (leaf k: stream seed + k·0x9E3779B97F4A7C15).
    "sghmc_step": (
        "sghmc_step(Tensor[] params, Tensor[] momenta, Tensor[] grads, float step, float keep, "
        "float lr, float scale, int seed) -> (Tensor[], Tensor[])"
    ),
    # The second pass of ops.lowrank_truncate over rows p of the new factor
    # (P, r), for R (K, P) with unit stride along P and right (K, r):
    #   factor[p] += Σ_k R[k, p]·right[k]   (factor holds the U part on entry);
    #   diag[p] = max(base[p] + scale2·Σ_k R[k, p]² + prior[p] − ‖factor[p]‖², base[p]);
    # with vector g returns (Σ_p factor[p]ᵀfactor[p]/diag[p], Σ_p factor[p]·g[p]/diag[p])
    # in float64, else two empty float64 tensors. diag is written, not read.
    "lowrank_truncate_fold_": (
        "lowrank_truncate_fold_(Tensor(a!) factor, Tensor(b!) diag, Tensor rows, Tensor right, Tensor base, "
        "Tensor prior, float scale2, Tensor? vector) -> (Tensor, Tensor)"
    ),
}

#: Allocation helpers: not numerical kernels, so exempt from the no-autograd
#: guard below (an allocation neither reads nor differentiates its inputs).
ALLOC_SCHEMAS = {
    # An uninitialised contiguous tensor of `size` with like's dtype (CPU) whose
    # memory is reused by a later request of the same byte size once it is
    # freed (csrc/cpu/new_matrix.cpp), so it is not faulted in afresh.
    "new_matrix": "new_matrix(int[] size, Tensor like) -> Tensor",
    # Bytes idle in that pool; release=True first frees them.
    "pool_idle_bytes": "pool_idle_bytes(bool release) -> int",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _schema in (*SCHEMAS.values(), *ALLOC_SCHEMAS.values()):
    _lib.define(_schema)

#: ``torch.ops.posteriors_fast``: call the ops as ``OPS.syrk_(...)``.
OPS = getattr(torch.ops, NAMESPACE)


def _square(t: torch.Tensor, name: str, size: int) -> None:
    torch._check(
        t.dim() == 2 and t.shape[0] == size and t.shape[1] == size,
        lambda: f"{name} must be ({size}, {size}), got {tuple(t.shape)}",
    )


@torch.library.register_fake(f"{NAMESPACE}::syrk_")
def _syrk_fake(out, a, b, c, alpha, beta, mirror):
    torch._check(a.dim() == 2, lambda: f"a must be 2-D (K, P), got {tuple(a.shape)}")
    _square(out, "out", a.shape[1])
    if b is not None:
        torch._check(b.shape == a.shape, lambda: f"b must match a {tuple(a.shape)}, got {tuple(b.shape)}")
    if c is not None:
        _square(c, "c", a.shape[1])
    return None


@torch.library.register_fake(f"{NAMESPACE}::symm_jt")
def _symm_jt_fake(s, j):
    torch._check(j.dim() == 2, lambda: f"j must be 2-D (R, P), got {tuple(j.shape)}")
    _square(s, "s", j.shape[1])
    return s.new_empty((j.shape[1], j.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::cov_downdate_")
def _cov_downdate_fake(cov, w):
    torch._check(w.dim() == 2, lambda: f"w must be 2-D (R, P), got {tuple(w.shape)}")
    _square(cov, "cov", w.shape[1])
    return None


@torch.library.register_fake(f"{NAMESPACE}::cg_step_")
def _cg_step_fake(x, r, p, ap, gamma, damping):
    for name, t in (("r", r), ("p", p), ("ap", ap)):
        torch._check(t.shape == x.shape, lambda name=name: f"{name} must match x {tuple(x.shape)}")
    return x.new_empty(())


@torch.library.register_fake(f"{NAMESPACE}::normal_")
def _normal_fake(out, seed):
    return None


@torch.library.register_fake(f"{NAMESPACE}::sghmc_step")
def _sghmc_step_fake(params, momenta, grads, step, keep, lr, scale, seed):
    torch._check(
        len(momenta) == len(params) and len(grads) == len(params),
        lambda: "params, momenta and grads must have as many leaves",
    )
    return [torch.empty_like(p) for p in params], [torch.empty_like(m) for m in momenta]


@torch.library.register_fake(f"{NAMESPACE}::lowrank_truncate_fold_")
def _lowrank_truncate_fold_fake(factor, diag, rows, right, base, prior, scale2, vector):
    torch._check(factor.dim() == 2, lambda: f"factor must be 2-D (P, r), got {tuple(factor.shape)}")
    size, rank = factor.shape
    torch._check(
        rows.dim() == 2 and rows.shape[1] == size, lambda: f"rows must be (K, {size}), got {tuple(rows.shape)}"
    )
    torch._check(right.shape == (rows.shape[0], rank), lambda: f"right must be (K, {rank}), got {tuple(right.shape)}")
    for name, t in (("diag", diag), ("base", base), ("prior", prior)):
        torch._check(t.shape == (size,), lambda name=name, t=t: f"{name} must be ({size},), got {tuple(t.shape)}")
    shape = (rank, rank) if vector is not None else (0, 0)
    return factor.new_empty(shape, dtype=torch.float64), factor.new_empty(shape[:1], dtype=torch.float64)


@torch.library.register_fake(f"{NAMESPACE}::new_matrix")
def _new_matrix_fake(size, like):
    return like.new_empty(size)


def _no_autograd(name: str):
    op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def kernel(*args):
        # Grad mode first: the library calls these under no_grad, where no
        # argument needs scanning.
        if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for a in args
            for t in (a if isinstance(a, (list, tuple)) else (a,))
        ):
            raise RuntimeError(
                f"{NAMESPACE}::{name} is not differentiable (it serves no-grad paths); "
                "call it under torch.no_grad() on detached tensors, or use "
                "backend='eager' to differentiate through the torch code"
            )
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _lib.impl(name, kernel, "Autograd")


for _name in SCHEMAS:
    _no_autograd(_name)


def _bump_versions(name: str) -> None:
    """Advance the version counter of every argument ``name`` writes (``(a!)``
    in its schema) before running it, as torch's in-place ops do (and as
    ``torch.library.custom_op`` does for its mutating ops): caches keyed on
    ``(tensor, version)`` and autograd's saved-tensor checks then see the write,
    whichever kernel family ran it."""
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    written = [
        i for i, arg in enumerate(op._schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write
    ]
    below = torch._C._after_ADInplaceOrView_keyset

    def kernel(keyset, *args):
        for i in written:
            torch.autograd.graph.increment_version(args[i])
        return op.redispatch(keyset & below, *args)

    _lib.impl(name, kernel, "ADInplaceOrView", with_keyset=True)


for _name in SCHEMAS:
    if getattr(getattr(torch.ops, NAMESPACE), _name).default._schema.is_mutable:
        _bump_versions(_name)


_EXTENSION: Tuple[bool, str] | None = None


def load_extension() -> Tuple[bool, str]:
    """Load the C++ CPU kernels once; returns ``(loaded, reason)``.

    Never raises: a missing or broken build is logged once with its reason and
    the dispatch layer falls back to other families.
    """
    global _EXTENSION
    if _EXTENSION is None:
        try:
            from posteriors_fast import _C  # noqa: F401  (registers the CPU kernels)

            _EXTENSION = (True, "")
        except Exception as exc:  # ImportError, undefined symbol, ABI mismatch ...
            _EXTENSION = (
                False,
                f"C++ extension posteriors_fast._C not loaded ({type(exc).__name__}: {exc}); "
                "reinstall with a compiler present: pip install --no-build-isolation -e .",
            )
            logger.info("posteriors_fast: %s", _EXTENSION[1])
    return _EXTENSION
