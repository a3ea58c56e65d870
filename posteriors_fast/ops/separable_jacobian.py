"""``separable_jacobian``: the per-sample output Jacobian (N, C, P) of a
model ``forward(params, batch) -> (outputs, aux)`` whose outputs are a (N, C)
tensor, when the forward is sample-separable, verified on the fly.

One reverse pass per sample gives the Jacobian in O(N·C·P) instead of the
O(N²·C·P) of differentiating the batch outputs as a whole; one vector-Jacobian
product through the batch forward, with a fixed random cotangent, checks it
(:func:`separable_output_jacobian`). Both halves are small-kernel overhead, so
``"compiled"`` runs them as one graph through the tiered compile policy.
"""

import weakref
from typing import Any, Callable, Tuple

import torch
from optree import tree_leaves, tree_map, tree_structure
from optree.integrations.torch import tree_ravel
from torch.func import vjp

from posteriors_fast._internal import checks
from posteriors_fast._internal.errors import split_aux
from posteriors_fast._internal.jacobian import output_jacobian
from posteriors_fast.backends import decline, implementation, register
from posteriors_fast.backends.compile_policy import TieredCompile
from posteriors_fast.ops.sample_jacobian import jacobian_signature, sample_jacobian, sample_jacobian_eager


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


# What the probe found, per user function (held weakly) and input signature:
# True (sample-separable), False (coupled), or absent (not probed yet). A
# function's structure does not change between calls with the same shapes,
# so one probe serves every later call.
_verdicts: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _verdict(fn, signature):
    try:
        return _verdicts.get(fn, {}).get(signature)
    except TypeError:  # no weak references to this callable
        return None


def _remember(fn, signature, verdict) -> None:
    try:
        per_fn = _verdicts.setdefault(fn, {})
    except TypeError:
        return
    if verdict is None:
        per_fn.pop(signature, None)
    else:
        per_fn[signature] = verdict


def _probe(forward_func, params, batch, want: torch.Tensor, *, backend: str):
    """``(jac, values)`` from one reverse pass per sample, checked against the
    batch: the per-sample values must reproduce ``want`` and one fixed random
    cotangent u must give the same ``Jᵀu`` through the batch forward. False
    when finite values disagree (the samples are coupled); None when the
    probe cannot tell (a value is NaN or inf, or the per-sample evaluation
    fails), so that a later call probes again."""
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
    finite = torch.stack([t.isfinite().all() for t in (values, want, through_samples, through_batch)]).all()
    agree, finite = torch.stack([agree, finite]).tolist()  # one host synchronisation
    if agree:
        return jac, values
    return False if finite else None


def _batch_size_matches(batch, n: int) -> bool:
    sizes = {leaf.shape[0] for leaf in tree_leaves(batch) if isinstance(leaf, torch.Tensor) and leaf.ndim > 0}
    return sizes == {n}


def separable_output_jacobian(forward_func, params, batch, forward_vals, *, backend: str):
    """(N, C, P) Jacobian of ``forward_func(params, batch)[0]`` (whose value
    ``forward_vals``, (N, C) or (N,), is given; (N, P) for the latter) from one
    reverse pass per sample, or None when the forward is not shown to be
    sample-separable.

    The first call with a function and input signature probes it: the
    per-sample evaluation must reproduce the batch outputs, and one random
    cotangent u must give the same ``Jᵀu`` through the batch forward as through
    the per-sample Jacobian. Any coupling of samples (batch statistics, a loss
    over the batch) fails this check for all but a measure-zero set of u, and
    the general Jacobian is used instead. Later calls reuse the verdict and
    check only that the per-sample values reproduce the batch outputs (one
    comparison, no second pass). O(N·C·P) instead of O(N²·C·P). Only finite
    values that disagree make the verdict "coupled"; a probe that meets NaN or
    inf, or fails, decides nothing and the next call probes again.
    """
    return _separable_output_jacobian(forward_func, params, batch, forward_vals, backend=backend)[0]


def _separable_output_jacobian(forward_func, params, batch, forward_vals, *, backend: str):
    """``(jac or None, verdict)``: :func:`separable_output_jacobian` and what
    is known about the function now: True (separable), False (coupled) or
    None (undecided)."""
    if not isinstance(forward_vals, torch.Tensor) or forward_vals.ndim not in (1, 2):
        return None, False
    if not _batch_size_matches(batch, forward_vals.shape[0]):
        return None, False
    want = forward_vals.detach().reshape(-1)
    signature = (jacobian_signature(params, batch, True, False), tuple(forward_vals.shape), forward_vals.dtype)
    known = _verdict(forward_func, signature)
    if known is False:
        return None, False
    if known is True:
        try:
            jac, values, _ = sample_jacobian(forward_func, params, batch, True, False, backend=backend)
        except Exception:
            jac = None
        tol = _SEPARABLE_TOL.get(want.dtype, 1e-3)
        if jac is None or not bool(_close(values, want.to(values.dtype), tol, 1.0)):
            _remember(forward_func, signature, None)  # probe again next time
            return None, None
    else:
        found = _probe(forward_func, params, batch, want, backend=backend)
        _remember(forward_func, signature, None if found is None else found is not False)
        if not found:
            return None, found
        jac, _ = found
    return jac.reshape(*forward_vals.shape, jac.shape[-1]), True


def _merge_sample_dim(aux: Any) -> Any:
    """Per-sample aux stacked by vmap, (N, 1, ...) per leaf, as the batch
    call returns it, (N, ...)."""
    return tree_map(lambda x: x.reshape((-1,) + tuple(x.shape[2:])), aux)


def _aux_matches(batch_aux: Any, merged: Any, tol: float) -> bool:
    """Whether the per-sample aux, merged, is the batch call's aux."""
    try:
        if tree_structure(batch_aux) != tree_structure(merged):
            return False
        pairs = list(zip(tree_leaves(batch_aux), tree_leaves(merged)))
    except Exception:
        return False
    for a, b in pairs:
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() and a.numel():
            if not bool(_close(b.detach(), a.detach(), tol, 1.0)):
                return False
        elif not torch.equal(a, b):
            return False
    return True


# Verdicts of the per-sample evaluation (see per_sample_evaluation): ("merge",
# output shape per sample) when values, Jacobian and aux all come from the
# per-sample graph; "values" when the Jacobian does but aux needs the batch
# call; False when the function couples samples.


def per_sample_evaluation(fn, params, batch, kind: str, *, backend: str):
    """``(jac, values, aux, witness)`` of ``fn`` from its per-sample graph
    alone, or None when that has not been shown to reproduce the batch call.

    ``fn(params, batch) -> (outputs, aux)`` with outputs of shape (N, ...).
    Once :func:`learn_separability` has seen a call with this function and
    input signature find ``fn`` sample-separable, and its aux, evaluated one
    sample at a time and merged, equal to the batch call's aux, one reverse
    pass per sample gives everything: ``jac`` (N·k, P), ``values`` shaped as
    the batch call returns them, ``aux`` merged, and the finiteness witness.
    ``kind`` keeps the verdicts of different callers apart.
    """
    signature = (kind, jacobian_signature(params, batch, True, True, True))
    known = _verdict(fn, signature)
    if not (isinstance(known, tuple) and known[0] == "merge"):
        return None
    try:
        jac, values, aux, witness = sample_jacobian(fn, params, batch, True, True, True, backend=backend)
    except Exception:  # behaves differently now: check it again from scratch
        _remember(fn, signature, None)
        return None
    return jac, values.reshape((-1,) + known[1]), _merge_sample_dim(aux), witness


def learn_separability(fn, params, batch, kind: str, values, aux, *, backend: str):
    """The (N, ..., P) per-sample Jacobian of ``fn``'s outputs ``values`` (the
    batch call's, with ``aux``), or None when ``fn`` couples samples or the
    probe could not tell (NaN or inf values, a failing per-sample
    evaluation: then nothing is recorded and the next call probes again);
    records for :func:`per_sample_evaluation` whether later calls may skip the
    batch call: only when the aux is per-sample and neither the values nor
    the aux carry an autograd graph (the per-sample graph runs without one)."""
    signature = (kind, jacobian_signature(params, batch, True, True, True))
    known = _verdict(fn, signature)
    if known is False:
        return None
    jac, verdict = _separable_output_jacobian(fn, params, batch, values, backend=backend)
    if jac is None:
        _remember(fn, signature, False if verdict is False else None)
    elif known is None:
        graph = any(isinstance(x, torch.Tensor) and x.requires_grad for x in tree_leaves((values, aux)))
        merge = not graph and _aux_separable(fn, params, batch, aux, backend)
        _remember(fn, signature, ("merge", tuple(values.shape[1:])) if merge else "values")
    return jac


def _per_sample_log_density(fn, params, batch, what: str, backend: str):
    """``(jac, values, aux, witness)`` of a per-sample log density (shape (N,)).

    The first call with a function and input signature evaluates ``fn`` on the
    batch and probes it (:func:`learn_separability`); when it is
    sample-separable with a per-sample aux, later calls run only the
    per-sample graph (:func:`per_sample_evaluation`), as ``per_sample=False``
    does. A coupled function gets the Jacobian of its whole output.
    """
    fast = per_sample_evaluation(fn, params, batch, _LOG_DENSITY, backend=backend)
    if fast is not None:
        return fast
    with checks.blame_batch(batch, what):
        values, aux = split_aux(fn(params, batch), True)
    n = checks.common_leading_dim(batch)
    if not isinstance(values, torch.Tensor) or values.ndim != 1 or (n is not None and values.shape[0] != n):
        got = f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        want = f"({n},) for this batch of {n}" if n is not None else "(N,)"
        raise ValueError(
            f"{what} must return one value per sample, a tensor of shape {want}, when per_sample=True; got {got}"
        )
    jac = learn_separability(fn, params, batch, _LOG_DENSITY, values, aux, backend=backend)
    if jac is None:
        with checks.blame_batch(batch, what):
            jac, values, aux = output_jacobian(fn, (params, batch), 0, has_aux=True)
    return jac, values, aux, None


_LOG_DENSITY = "log_density"


def _aux_separable(fn, params, batch, batch_aux, backend: str) -> bool:
    """Whether ``fn``'s aux, evaluated one sample at a time and merged, is the
    batch call's aux (tensors only: vmap cannot return anything else)."""
    try:
        _, values, aux, _ = sample_jacobian(fn, params, batch, True, True, True, backend=backend)
    except Exception:
        return False
    return _aux_matches(batch_aux, _merge_sample_dim(aux), _SEPARABLE_TOL.get(values.dtype, 1e-3))


def log_density_jacobian(
    fn: Callable,
    params: Any,
    batch: Any,
    *,
    per_sample: bool,
    what: str,
    backend: str,
    values_must_be_finite: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, Any]:
    """The per-sample values of a user's log density and their (N, P)
    Jacobian, checked, for the methods that need both (EKF, Fisher Laplace).

    Args:
        fn: ``fn(params, batch) -> (value, aux)``: a scalar for the batch
            (``per_sample=False``; evaluated one sample at a time, so the batch
            must be sample-separable, as posteriors' ``per_samplify`` assumes)
            or one value per sample, shape (N,) (``per_sample=True``; its
            Jacobian then comes from one reverse pass per sample when ``fn``
            is found sample-separable, see :func:`separable_output_jacobian`).
        params: Pytree of parameters (the state's).
        batch: Pytree whose tensor leaves share the leading dimension N.
        per_sample: See ``fn``.
        what: The user's name for ``fn`` in messages (``"log_likelihood"``).
        backend: Resolved backend name.
        values_must_be_finite: Whether a NaN or inf value (not only gradient)
            is an error.

    Returns:
        ``(jac, values, aux)``: ``jac`` (N, P) in ravel order, ``values`` (N,),
        ``aux`` as ``fn`` returns it (stacked over samples when
        ``per_sample=False``).

    Raises:
        ValueError: the batch's leaves disagree on N (``per_sample=False``,
            or ``fn`` fails on such a batch), ``fn`` returns the wrong shape,
            or params, the values or the gradients hold NaN or inf (the
            message says which, and which leaf or sample).
    """
    if per_sample:
        jac, values, aux, witness = _per_sample_log_density(fn, params, batch, what, backend)
    else:
        n = checks.batch_leading_dim(batch, "batch")
        jac, values, aux, witness = sample_jacobian(fn, params, batch, True, witness=True, backend=backend)
        if values.numel() != n:
            raise ValueError(
                f"{what} must return a scalar for a batch when per_sample=False (it is evaluated one "
                f"sample at a time); got {values.numel() // max(n, 1)} values per sample"
            )
    entries = [(params, "state.params hold a non-finite value (NaN or inf)", "leaf")]
    if values_must_be_finite:
        entries.append((values, f"{what} returned NaN or inf", "sample"))
    entries.append((jac, f"the gradient of {what} is NaN or inf", "sample"))
    checks.require_finite(entries, witness)
    return jac, values.reshape(-1), aux
