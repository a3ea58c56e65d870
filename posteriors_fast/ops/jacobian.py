"""Flat Jacobians: one (R, P) matrix whose columns follow optree's ravel order
(sorted dict keys) of the parameters, and whose R rows are the function's
outputs.

Two constructions:

* :func:`sample_jacobian` for sample-separable functions (the output for sample
  i depends only on sample i, as for every function built by ``per_samplify``):
  ``vmap`` over samples of a per-sample reverse pass. O(N·P) work.
* :func:`output_jacobian` for arbitrary functions: one forward pass, then a
  ``vmap`` of its vector-Jacobian product over the R unit cotangents.
"""

from typing import Any, Callable, Sequence, Tuple

import torch
from optree import tree_leaves, tree_map
from optree.integrations.torch import tree_ravel
from torch.func import vjp, vmap

from posteriors_fast._checks import finite_witness
from posteriors_fast._errors import split_aux
from posteriors_fast.backends import decline, device_type_of, implementation, register
from posteriors_fast.ops._tiered import TieredCompile, shape_signature

#: Samples per vmap chunk are capped so that chunk · P stays below this.
_CHUNK_ENTRIES = 1 << 24

# torch.func transforms only carry tensors through aux; stands in for "no aux".
_NO_AUX = torch.empty(0)


def _ravel_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.reshape(-1)
    return tree_ravel(out)[0]


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
        witness: Also return ``finite_witness([values, jac])`` (see
            :mod:`posteriors_fast._checks`), computed in the same compiled
            graph, for the callers' finiteness check.

    Returns:
        ``(jac, values, aux)``: ``jac`` (N·k, P) with rows in sample-major order,
        ``values`` (N·k,) the raveled outputs, ``aux`` stacked over samples (None
        without has_aux or keep_aux); k is the number of output elements per
        sample. With ``witness``, the witness follows as a fourth element.
    """
    flat, unravel = tree_ravel(params)
    keep_aux = has_aux and keep_aux

    def one_sample(flat_params, sample):
        sample = tree_map(lambda x: x.unsqueeze(0), sample)

        def of_flat(fp):
            value, aux = split_aux(f(unravel(fp), sample), has_aux)
            return _ravel_output(value), aux if keep_aux else _NO_AUX

        value, pullback, aux = vjp(of_flat, flat_params, has_aux=True)
        if value.numel() == 1:  # the common case: one reverse pass, no inner vmap
            rows = pullback(torch.ones_like(value))[0].unsqueeze(0)
        else:
            rows = vmap(pullback)(torch.eye(value.numel(), dtype=value.dtype, device=value.device))[0]
        return rows, value, aux

    # Bound the per-sample temporaries vmap holds at once to about
    # _CHUNK_ENTRIES gradient entries; the result is still one (N, P) matrix.
    chunk = max(1, _CHUNK_ENTRIES // max(1, flat.numel()))
    jac, values, aux = vmap(one_sample, in_dims=(None, 0), chunk_size=chunk)(flat, batch)
    jac, values, aux = jac.reshape(-1, flat.numel()), values.reshape(-1), aux if keep_aux else None
    if witness:
        return jac, values, aux, finite_witness([values, jac])
    return jac, values, aux


register(
    "sample_jacobian",
    "eager",
    sample_jacobian_eager,
    doc="(N, P) per-sample Jacobian of a sample-separable function: vmap of one reverse pass",
)

# The per-sample passes are dozens of tiny kernels whose cost is framework
# overhead; compiled, vmap-of-vjp becomes a few fused GEMMs. Measured, float32,
# 2 threads, tanh MLP with cross-entropy, ms eager / compiled: P = 1045, N = 64
# 0.73 / 0.11; P = 4890, N = 256 1.45 / 0.26 (compile 5-7 s, paid once).
_tiered_sample_jacobian = TieredCompile(sample_jacobian_eager, "the per-sample Jacobian")


def _signature(params: Any, batch: Any, has_aux: bool, keep_aux: bool, witness: bool = False) -> Tuple:
    return shape_signature(params, batch) + (has_aux, keep_aux, witness)


def sample_jacobian_torch_compile(
    f: Callable, params: Any, batch: Any, has_aux: bool, keep_aux: bool = True, witness: bool = False
) -> Tuple:
    """:func:`sample_jacobian_eager` compiled once ``f`` is called repeatedly
    with the same signature (see :mod:`posteriors_fast.ops._tiered`)."""
    signature = _signature(params, batch, has_aux, keep_aux, witness)
    return _tiered_sample_jacobian(f, signature, f, params, batch, has_aux, keep_aux, witness)


register("sample_jacobian", "torch_compile", sample_jacobian_torch_compile)


def sample_jacobian(
    f: Callable, params: Any, batch: Any, has_aux: bool, keep_aux: bool = True, witness: bool = False,
    *, backend: str
) -> Tuple:
    """Dispatching entry point (see :func:`sample_jacobian_eager` for the
    arguments and result); ``backend`` must already be resolved."""
    return implementation("sample_jacobian", backend, device_type_of(params))(
        f, params, batch, has_aux, keep_aux, witness
    )


def output_jacobian(
    f: Callable, args: Sequence[Any], argnums: int | Sequence[int], has_aux: bool
) -> Tuple[torch.Tensor, torch.Tensor, Any]:
    """Jacobian of the raveled output of ``f(*args)`` with respect to the
    arguments selected by ``argnums`` (raveled together, as optree ravels the
    tuple of them when ``argnums`` is a sequence).

    Returns:
        ``(jac, output, aux)``: ``jac`` (R, P), ``output`` the value returned by
        ``f`` (unraveled, detached from the transforms), ``aux`` (None without
        has_aux).
    """
    args = list(args)
    if isinstance(argnums, int):
        selected = args[argnums]
    else:
        selected = tuple(args[i] for i in argnums)
    flat, unravel = tree_ravel(selected)

    def of_flat(flat_params):
        new_args = list(args)
        chosen = unravel(flat_params)
        if isinstance(argnums, int):
            new_args[argnums] = chosen
        else:
            for i, value in zip(argnums, chosen):
                new_args[i] = value
        value, aux = split_aux(f(*new_args), has_aux)
        return _ravel_output(value), (value, aux if has_aux else _NO_AUX)

    raveled, pullback, (output, aux) = vjp(of_flat, flat, has_aux=True)
    rows = raveled.numel()
    basis = torch.eye(rows, dtype=raveled.dtype, device=raveled.device)
    (jac,) = vmap(pullback)(basis)
    return jac, output, aux if has_aux else None


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

# Both halves are small-kernel overhead, so one compiled graph serves them:
# linearized_forward_diag at P = 1045, N = 64 took 0.91 ms with only the
# per-sample Jacobian compiled.
_tiered_separable = TieredCompile(separable_parts_eager, "the per-sample output Jacobian")


def separable_parts_torch_compile(forward_func, params, batch, probe):
    """:func:`separable_parts_eager`, compiled once ``forward_func`` is called
    repeatedly with one signature."""
    signature = (_signature(params, batch, True, False), probe.dtype)
    return _tiered_separable(forward_func, signature, forward_func, params, batch, probe)


register("separable_jacobian", "torch_compile", separable_parts_torch_compile)
for _op in ("sample_jacobian", "separable_jacobian"):
    for _family in ("triton", "cpp"):
        decline(
            _op, _family,
            "the Jacobian runs the user's model: torch.compile traces it, a fixed kernel cannot",
        )


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
        want.shape, generator=torch.Generator(device=want.device).manual_seed(0),
        dtype=want.dtype, device=want.device,
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


# Relative agreement required between per-sample and batch evaluations.
_SEPARABLE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
