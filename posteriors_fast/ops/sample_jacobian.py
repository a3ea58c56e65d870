"""``sample_jacobian``: the (N·k, P) per-sample Jacobian of a sample-separable
function (the output for sample i depends only on sample i, as for every
function built by ``per_samplify``), by ``vmap`` over samples of a
single-sample reverse pass: O(N·P) work where differentiating the batch
function as a whole costs O(N²·P). Columns follow optree's ravel order of the
parameters; rows are sample-major.

Eager runs it as it stands; ``"compiled"`` runs it through the tiered compile
policy (:mod:`posteriors_fast.backends.compile_policy`): the per-sample passes
are dozens of tiny kernels whose cost is framework overhead, which one
compiled graph removes.
"""

from typing import Any, Callable, Tuple

import torch
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel
from torch.func import vjp, vmap

from posteriors_fast._internal.checks import common_leading_dim, finite_witness
from posteriors_fast._internal.errors import split_aux
from posteriors_fast._internal.jacobian import NO_AUX, ravel_output
from posteriors_fast._internal.jacobian_budget import samples_per_chunk
from posteriors_fast.backends import decline, device_type_of, implementation, register
from posteriors_fast.backends.compile_policy import TieredCompile, shape_signature


def sample_jacobian_eager(
    f: Callable, params: Any, batch: Any, has_aux: bool, keep_aux: bool = True, witness: bool = False
) -> Tuple:
    """Jacobian of a batch-level function evaluated one sample at a time.

    ``f(params, batch)`` is called on batches of one sample (leading dimension 1)
    under ``vmap``, exactly as ``per_samplify`` does.

    Args:
        f: ``f(params, batch) -> value`` or ``(value, aux)`` with ``has_aux``.
        params: Pytree of parameters.
        batch: Pytree of tensors with a common leading (sample) dimension N.
        has_aux: Whether ``f`` returns ``(value, aux)``.
        keep_aux: With has_aux, whether to return aux (False drops it inside
            the transforms, so it need not be made of tensors).
        witness: Also return ``finite_witness([values, jac, params])`` (see
            :mod:`posteriors_fast._internal.checks`; params raveled), computed
            in the same compiled graph, for the callers' finiteness check.

    Returns:
        ``(jac, values, aux)``: ``jac`` (N·k, P) with rows in sample-major order,
        ``values`` (N·k,) the raveled outputs, ``aux`` stacked over samples (None
        without has_aux or keep_aux); k is the number of output elements per
        sample. With ``witness``, the witness follows as a fourth element.
    """
    flat = tree_ravel(params)[0]
    keep_aux = has_aux and keep_aux

    def one_sample(params_, sample):
        sample = tree_map(lambda x: x.unsqueeze(0), sample)

        def of_params(p):
            value, aux = split_aux(f(p, sample), has_aux)
            return ravel_output(value), aux if keep_aux else NO_AUX

        value, pullback, aux = vjp(of_params, params_, has_aux=True)
        if value.numel() == 1:  # the common case: one reverse pass, no inner vmap
            rows = tree_map(lambda g: g.unsqueeze(0), pullback(torch.ones_like(value))[0])
        else:
            rows = vmap(pullback)(torch.eye(value.numel(), dtype=value.dtype, device=value.device))[0]
        return rows, value, aux

    # The gradient is taken with respect to the parameter tree and raveled
    # once at the end: differentiating through an unravel of a flat vector
    # writes a P-vector of zeros per sample into which each leaf's gradient
    # is scattered (benchmarks/scale.py, tanh MLP, P = 10⁶, N = 64: 1.1 s
    # through the flat vector, 0.3 s through the tree). vmap's temporaries are
    # chunks of samples are bounded by the Jacobian memory budget (chunks of
    # 2²⁴ entries cost 2x at P = 10⁶: vmap pays per chunk and concatenates).
    n = common_leading_dim(batch) or 1
    chunk = samples_per_chunk(n, 1, flat.numel(), flat.element_size())
    rows, values, aux = vmap(one_sample, in_dims=(None, 0), chunk_size=None if chunk >= n else chunk)(params, batch)
    total = values.numel()
    jac = torch.cat([leaf.reshape(total, -1) for leaf in tree_leaves(rows)], 1)
    values, aux = values.reshape(-1), aux if keep_aux else None
    if witness:
        return jac, values, aux, finite_witness([values, jac, flat])
    return jac, values, aux


register(
    "sample_jacobian",
    "eager",
    sample_jacobian_eager,
    doc="(N, P) per-sample Jacobian of a sample-separable function: vmap of one reverse pass",
)

# The per-sample passes are dozens of tiny kernels whose cost is framework
# overhead; compiled, vmap-of-vjp becomes a few fused GEMMs
# (benchmarks/bench_sample_jacobian.py: S/64 and M/256, compiled 3-6x eager in
# the steady state; the compile itself is reported as compile_s).
_tiered_sample_jacobian = TieredCompile(sample_jacobian_eager, "the per-sample Jacobian")


def jacobian_signature(params: Any, batch: Any, has_aux: bool, keep_aux: bool, witness: bool = False) -> Tuple:
    return shape_signature(params, batch) + (has_aux, keep_aux, witness)


def sample_jacobian_torch_compile(
    f: Callable, params: Any, batch: Any, has_aux: bool, keep_aux: bool = True, witness: bool = False
) -> Tuple:
    """:func:`sample_jacobian_eager` compiled once ``f`` is called repeatedly
    with the same signature (see :mod:`posteriors_fast.backends.compile_policy`)."""
    signature = jacobian_signature(params, batch, has_aux, keep_aux, witness)
    return _tiered_sample_jacobian(f, signature, f, params, batch, has_aux, keep_aux, witness)


register("sample_jacobian", "torch_compile", sample_jacobian_torch_compile)


def sample_jacobian(
    f: Callable, params: Any, batch: Any, has_aux: bool, keep_aux: bool = True, witness: bool = False, *, backend: str
) -> Tuple:
    """Dispatching entry point (see :func:`sample_jacobian_eager` for the
    arguments and result); ``backend`` must already be resolved."""
    return implementation("sample_jacobian", backend, device_type_of(params))(
        f, params, batch, has_aux, keep_aux, witness
    )


for _family in ("triton", "cpp"):
    decline(
        "sample_jacobian",
        _family,
        "the Jacobian runs the user's model: torch.compile traces it, a fixed kernel cannot",
    )
