"""``separable_jacobian``: the per-sample output Jacobian (N, C, P) of a
model ``forward(params, batch) -> (outputs, aux)`` whose outputs are a (N, C)
tensor, when the forward is sample-separable, verified on the fly.

One reverse pass per sample gives the Jacobian in O(N·C·P) instead of the
O(N²·C·P) of differentiating the batch outputs as a whole; one vector-Jacobian
product through the batch forward, with a fixed random cotangent, checks it
(:func:`separable_output_jacobian`). Both halves are small-kernel overhead, so
``"compiled"`` runs them as one graph through the tiered compile policy.
"""

import torch
from optree import tree_leaves
from optree.integrations.torch import tree_ravel
from torch.func import vjp

from posteriors_fast.backends import decline, implementation, register
from posteriors_fast.backends.compile_policy import TieredCompile
from posteriors_fast.ops.sample_jacobian import jacobian_signature, sample_jacobian_eager


def separable_parts_eager(forward_func, params, batch, probe):
    """``(jac, values, through_batch)``: the per-sample Jacobian (N·C, P) of
    ``forward_func(params, batch)[0]`` and its values (N·C,), both from one
    reverse pass per sample, and ``Jᵀ probe`` (P,) through the batch forward."""
    jac, values, _ = sample_jacobian_eager(forward_func, params, batch, True, False)
    flat, unravel = tree_ravel(params)
    _, pullback = vjp(lambda fp: forward_func(unravel(fp), batch)[0].reshape(-1), flat)
    return jac, values, pullback(probe)[0]


register(
    "separable_jacobian",
    "eager",
    separable_parts_eager,
    doc="per-sample output Jacobian plus one batch vector-Jacobian product to verify it",
)

# Both halves are small-kernel overhead, so one compiled graph serves them
# (benchmarks/bench_separable_jacobian.py).
_tiered_separable = TieredCompile(separable_parts_eager, "the per-sample output Jacobian")


def separable_parts_torch_compile(forward_func, params, batch, probe):
    """:func:`separable_parts_eager`, compiled once ``forward_func`` is called
    repeatedly with one signature."""
    signature = (jacobian_signature(params, batch, True, False), probe.dtype)
    return _tiered_separable(forward_func, signature, forward_func, params, batch, probe)


register("separable_jacobian", "torch_compile", separable_parts_torch_compile)
for _family in ("triton", "cpp"):
    decline(
        "separable_jacobian",
        _family,
        "the Jacobian runs the user's model: torch.compile traces it, a fixed kernel cannot",
    )

#: Relative agreement required between per-sample and batch evaluations.
_SEPARABLE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, floor: float) -> torch.Tensor:
    """On-device ``allclose(a, b, rtol=tol, atol=tol·max(max|b|, floor))``
    (False with NaN), so several checks share one host synchronisation."""
    atol = tol * b.abs().max().clamp_min(floor)
    return ((a - b).abs() <= atol + tol * b.abs()).all()


def separable_output_jacobian(forward_func, params, batch, forward_vals, *, backend: str):
    """(N, C, P) Jacobian of ``forward_func(params, batch)[0]`` (whose value
    ``forward_vals`` is given) from one reverse pass per sample, or None when
    the forward is not shown to be sample-separable.

    The per-sample evaluation must reproduce the batch outputs, and one random
    cotangent u must give the same ``Jᵀu`` through the batch forward as through
    the per-sample Jacobian. Any coupling of samples (batch statistics, a loss
    over the batch) fails this check for all but a measure-zero set of u, and
    the general Jacobian is used instead. O(N·C·P) instead of O(N²·C·P).
    """
    if not isinstance(forward_vals, torch.Tensor) or forward_vals.ndim != 2:
        return None
    sizes = {leaf.shape[0] for leaf in tree_leaves(batch) if isinstance(leaf, torch.Tensor) and leaf.ndim > 0}
    if sizes != {forward_vals.shape[0]}:
        return None
    want = forward_vals.detach().reshape(-1)
    probe = torch.randn(
        want.shape,
        generator=torch.Generator(device=want.device).manual_seed(0),
        dtype=want.dtype,
        device=want.device,
    )
    parts = implementation("separable_jacobian", backend, want.device.type)
    try:
        jac, values, through_batch = parts(forward_func, params, batch, probe)
    except Exception:  # e.g. a batch of one is refused, or control flow under vmap
        return None
    tol = _SEPARABLE_TOL.get(values.dtype, 1e-3)
    through_samples = torch.mv(jac.mT, probe.to(jac.dtype))
    agree = _close(values, want.to(values.dtype), tol, 1.0) & _close(
        through_samples, through_batch.to(jac.dtype), tol, 1e-30
    )
    if not bool(agree):
        return None
    return jac.reshape(*forward_vals.shape, jac.shape[-1])
