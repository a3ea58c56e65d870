"""Differential tests: every utils function against posteriors 0.0.5 on random
dict, tuple and nested pytrees, float32 and float64, over both backends."""

from functools import partial

import optree
import pytest
import torch
from optree import tree_map

import posteriors_fast as pf
from tests._compare import assert_tree_close, tol

from ._trees import KINDS, forward, random_batch, random_params


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def _ll(params, batch):
    x, y = batch
    z = forward(params, x)
    return -torch.nn.functional.cross_entropy(z, y), z


def _ll_per_sample(params, batch):
    x, y = batch
    return -torch.nn.functional.cross_entropy(forward(params, x), y, reduction="none")


def _loss(z, y):
    return torch.nn.functional.cross_entropy(z, y)


def _tangent(params, seed=7):
    g = torch.Generator().manual_seed(seed)
    return tree_map(lambda t: torch.randn(t.shape, generator=g).to(t.dtype), params)


# --- empirical Fisher -------------------------------------------------------


@pytest.mark.parametrize("has_aux", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_empirical_fisher_per_samplified(ref, backend, dtype, kind, has_aux, normalize):
    params, batch = random_params(kind, dtype), random_batch(6, dtype)
    f = _ll if has_aux else (lambda p, b: _ll(p, b)[0])
    got = pf.empirical_fisher(pf.per_samplify(f), has_aux=has_aux, normalize=normalize, backend=backend)(params, batch)
    want = ref.empirical_fisher(ref.per_samplify(f), has_aux=has_aux, normalize=normalize)(params, batch)
    assert_tree_close(got, want, dtype)


@pytest.mark.parametrize("normalize", [False, True])
def test_empirical_fisher_general_function_and_argnums(ref, backend, dtype, kind, normalize):
    params, (x, _) = random_params(kind, dtype), random_batch(5, dtype)
    scale = torch.tensor([1.5, -0.5, 2.0], dtype=dtype)

    def f(p, s):
        return (forward(p, x) * s).sum(-1)

    for argnums in (0, 1, (0, 1)):
        got = pf.empirical_fisher(f, argnums=argnums, normalize=normalize, backend=backend)(params, scale)
        want = ref.empirical_fisher(f, argnums=argnums, normalize=normalize)(params, scale)
        assert_tree_close(got, want, dtype)


# --- GGN --------------------------------------------------------------------


@pytest.mark.parametrize("forward_has_aux", [False, True])
@pytest.mark.parametrize("loss_has_aux", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("which", ["ggn", "diag_ggn"])
def test_ggn_and_diag(ref, backend, dtype, kind, forward_has_aux, loss_has_aux, normalize, which):
    params, (x, y) = random_params(kind, dtype), random_batch(5, dtype)
    fwd = (lambda p: (forward(p, x), x.sum())) if forward_has_aux else partial(forward, x=x)
    loss = (lambda z: (_loss(z, y), z.mean())) if loss_has_aux else partial(_loss, y=y)
    kwargs = dict(forward_has_aux=forward_has_aux, loss_has_aux=loss_has_aux, normalize=normalize)
    got = getattr(pf, which)(fwd, loss, backend=backend, **kwargs)(params)
    want = getattr(ref, which)(fwd, loss, **kwargs)(params)
    assert_tree_close(got, want, dtype)


def test_ggn_coupled_loss(ref, backend, dtype):
    # A loss that is not a per-sample sum: the block shortcut must not apply.
    params, (x, _) = random_params("dict", dtype), random_batch(4, dtype)

    def loss(z):
        return z.sum() ** 2 + (z.exp()).mean()

    for which in ("ggn", "diag_ggn"):
        got = getattr(pf, which)(partial(forward, x=x), loss, backend=backend)(params)
        want = getattr(ref, which)(partial(forward, x=x), loss)(params)
        assert_tree_close(got, want, dtype)


@pytest.mark.parametrize("which", ["ggn", "diag_ggn"])
def test_ggn_argnums_not_zero_is_an_assertion_error(ref, which):
    for lib in (pf, ref):
        with pytest.raises(AssertionError):
            getattr(lib, which)(lambda p: p, lambda z: z.sum(), argnums=1)


# --- vector products ----------------------------------------------------------


@pytest.mark.parametrize("has_aux", [False, True])
def test_hvp(ref, backend, dtype, kind, has_aux):
    params, (x, y) = random_params(kind, dtype), random_batch(5, dtype)

    def f(p):
        value = _loss(forward(p, x), y)
        return (value, forward(p, x)) if has_aux else value

    v = _tangent(params)
    got = pf.hvp(f, (params,), (v,), has_aux=has_aux, backend=backend)
    want = ref.hvp(f, (params,), (v,), has_aux=has_aux)
    assert_tree_close(got, want, dtype)


@pytest.mark.parametrize("has_aux", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_fvp(ref, backend, dtype, kind, has_aux, normalize):
    params, batch = random_params(kind, dtype), random_batch(5, dtype)

    def f(p):
        values = _ll_per_sample(p, batch)
        return (values, values.detach() * 2) if has_aux else values

    v = _tangent(params)
    got = pf.fvp(f, (params,), (v,), has_aux=has_aux, normalize=normalize, backend=backend)
    want = ref.fvp(f, (params,), (v,), has_aux=has_aux, normalize=normalize)
    assert_tree_close(got, want, dtype)


@pytest.mark.parametrize("forward_has_aux", [False, True])
@pytest.mark.parametrize("loss_has_aux", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_ggnvp(ref, backend, dtype, kind, forward_has_aux, loss_has_aux, normalize):
    params, (x, y) = random_params(kind, dtype), random_batch(5, dtype)
    fwd = (lambda p: (forward(p, x), x.sum())) if forward_has_aux else partial(forward, x=x)
    loss = (lambda z: (_loss(z, y), z.mean())) if loss_has_aux else partial(_loss, y=y)
    v = _tangent(params)
    kwargs = dict(forward_has_aux=forward_has_aux, loss_has_aux=loss_has_aux, normalize=normalize)
    got = pf.ggnvp(fwd, loss, (params,), (v,), backend=backend, **kwargs)
    want = ref.ggnvp(fwd, loss, (params,), (v,), **kwargs)
    assert_tree_close(got, want, dtype)


# --- linearised forward ----------------------------------------------------------


def test_linearized_forward_diag(ref, backend, dtype, kind):
    params, (x, _) = random_params(kind, dtype), random_batch(6, dtype)
    sd = tree_map(lambda t: torch.rand_like(t) + 0.1, params)

    def fwd(p, batch):
        return forward(p, batch), batch.sum(-1)

    got = pf.linearized_forward_diag(fwd, params, x, sd, backend=backend)
    want = ref.linearized_forward_diag(fwd, params, x, sd)
    assert_tree_close(got, want, dtype)


# --- cg -------------------------------------------------------------------------


def _spd_operator(b, dtype, seed=3):
    flat, unravel = optree.integrations.torch.tree_ravel(b)
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(flat.numel(), flat.numel(), generator=g).to(dtype)
    matrix = a @ a.T / flat.numel() + 0.5 * torch.eye(flat.numel(), dtype=dtype)
    return lambda v: unravel(matrix @ optree.integrations.torch.tree_ravel(v)[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"maxiter": 4},
        {"damping": 0.3},
        {"tol": 1e-3, "atol": 1e-2},
        {"x0": "ones"},
        {"M": "diag"},
    ],
    ids=["default", "maxiter", "damping", "tol-atol", "x0", "precond"],
)
def test_cg(ref, backend, dtype, kind, kwargs):
    b = random_params(kind, dtype, seed=5)
    A = _spd_operator(b, dtype)
    kwargs = dict(kwargs)
    if kwargs.get("x0") == "ones":
        kwargs["x0"] = tree_map(torch.ones_like, b)
    if kwargs.get("M") == "diag":
        kwargs["M"] = lambda r: tree_map(lambda t: t * 0.8, r)
    x, info = pf.cg(A, b, backend=backend, **kwargs)
    x_ref, info_ref = ref.cg(A, b, **kwargs)
    # CG amplifies summation-order differences.
    assert_tree_close(x, x_ref, dtype, kind="solve")
    assert info["niter"] == info_ref["niter"]
    assert bool(info["converged"]) == bool(info_ref["converged"])
    assert info["converged"].shape == info_ref["converged"].shape
    torch.testing.assert_close(
        info["error"].to(torch.float64), info_ref["error"].to(torch.float64), rtol=5e-2, atol=1e-6
    )


# --- Gaussian helpers -------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("scalar", [False, True])
def test_diag_normal_log_prob(ref, dtype, kind, normalize, scalar):
    x = random_params(kind, dtype, seed=1)
    if scalar:
        mean, sd = 0.3, 1.7
    else:
        mean = random_params(kind, dtype, seed=2)
        sd = tree_map(lambda t: t.abs() + 0.2, random_params(kind, dtype, seed=3))
    got = pf.diag_normal_log_prob(x, mean, sd, normalize=normalize)
    want = ref.diag_normal_log_prob(x, mean, sd, normalize=normalize)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, **tol(dtype))


@pytest.mark.parametrize("shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("scalar", [False, True])
def test_diag_normal_sample_same_seed(ref, kind, shape, scalar):
    mean = random_params(kind, torch.float32, seed=1)
    sd = 0.5 if scalar else tree_map(lambda t: t.abs() + 0.1, random_params(kind, torch.float32, seed=2))
    torch.manual_seed(42)
    got = pf.diag_normal_sample(mean, sd, torch.Size(shape))
    torch.manual_seed(42)
    want = ref.diag_normal_sample(mean, sd, torch.Size(shape))
    assert_tree_close(got, want, torch.float32, rtol=0, atol=0)
    for leaf, m in zip(optree.tree_leaves(got), optree.tree_leaves(mean)):
        assert leaf.shape == torch.Size(shape) + m.shape


def test_per_samplify(ref, dtype, kind):
    params, batch = random_params(kind, dtype), random_batch(5, dtype)
    assert_tree_close(pf.per_samplify(_ll)(params, batch), ref.per_samplify(_ll)(params, batch), dtype)
    assert pf.per_samplify(_ll).__name__ == "_ll"


@pytest.mark.parametrize("x", [1, 2.5, True, torch.tensor(3.0), torch.ones(1, 1), torch.ones(2), "a", None, [1.0]])
def test_is_scalar(ref, x):
    assert pf.is_scalar(x) == ref.is_scalar(x)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_L_flat_roundtrip(ref, n):
    flat = torch.randn(n * (n + 1) // 2)
    L = pf.L_from_flat(flat)
    torch.testing.assert_close(L, ref.L_from_flat(flat))
    torch.testing.assert_close(pf.L_to_flat(L), ref.L_to_flat(L))
    torch.testing.assert_close(pf.L_to_flat(L), flat)


def test_L_from_flat_float64_keeps_dtype(ref):
    flat = torch.randn(6, dtype=torch.float64)
    L = pf.L_from_flat(flat)
    assert L.dtype == torch.float64
    torch.testing.assert_close(L, torch.tril(L))
    with pytest.raises(RuntimeError):  # the reference builds float32 and fails
        ref.L_from_flat(flat)


def test_model_to_function(ref, dtype):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(dtype)
    params = {k: v.detach() * 2 for k, v in model.named_parameters()}
    x = torch.randn(5, 3, dtype=dtype)
    torch.testing.assert_close(pf.model_to_function(model)(params, x), ref.model_to_function(model)(params, x))


def test_catch_aux_error_matches_reference(ref):
    def no_aux(p):
        return (p**2).sum()

    for lib in (pf, ref):
        with pytest.raises(RuntimeError, match="Auxiliary output not found"):
            with lib.CatchAuxError():
                torch.func.grad(no_aux, has_aux=True)(torch.ones(2))


def test_public_names_and_signatures_match_reference(ref):
    import inspect

    names = [n for n in dir(ref.utils) if not n.startswith("_") and callable(getattr(ref.utils, n))]
    for name in (
        "CatchAuxError",
        "model_to_function",
        "linearized_forward_diag",
        "hvp",
        "fvp",
        "empirical_fisher",
        "ggnvp",
        "ggn",
        "diag_ggn",
        "cg",
        "diag_normal_log_prob",
        "diag_normal_sample",
        "per_samplify",
        "is_scalar",
        "L_from_flat",
        "L_to_flat",
    ):
        assert name in names
        assert hasattr(pf, name), name
        if name == "CatchAuxError":
            continue
        ours = inspect.signature(getattr(pf.utils, name)).parameters
        theirs = inspect.signature(getattr(ref.utils, name)).parameters
        assert [k for k in ours if k not in ("backend", "process_group")] == list(theirs), name
        for k, p in theirs.items():
            if p.default is not inspect.Parameter.empty and k != "M":
                assert ours[k].default == p.default or (
                    isinstance(p.default, torch.Size) and ours[k].default == p.default
                ), (name, k)
            assert ours[k].kind == p.kind, (name, k)


@pytest.mark.parametrize("coupled", [False, True], ids=["separable", "batch-coupled"])
def test_linearized_forward_diag_paths(ref, dtype, coupled, monkeypatch):
    import posteriors_fast.utils as utils_module

    params, (x, _) = random_params("nested", dtype), random_batch(7, dtype)
    sd = tree_map(lambda t: torch.rand_like(t) + 0.1, params)

    def fwd(p, batch):
        z = forward(p, batch)
        # Centering over the batch couples every sample's output to the others.
        return (z - z.mean(0) if coupled else z), torch.tensor([])

    calls = []
    general = utils_module.output_jacobian
    monkeypatch.setattr(utils_module, "output_jacobian", lambda *a, **k: calls.append(1) or general(*a, **k))
    got = pf.linearized_forward_diag(fwd, params, x, sd)
    want = ref.linearized_forward_diag(fwd, params, x, sd)
    assert_tree_close(got[:2], want[:2], dtype)
    assert calls == ([1] if coupled else [])  # the per-sample path only when separable


def test_linearized_forward_diag_forward_refusing_single_samples(ref):
    params, (x, _) = random_params("dict", torch.float64), random_batch(6, torch.float64)
    sd = tree_map(lambda t: torch.full_like(t, 0.2), params)

    def fwd(p, batch):
        if batch.shape[0] == 1:  # like BatchNorm in training mode
            raise ValueError("Expected more than 1 value per channel when training")
        return forward(p, batch), torch.tensor([])

    got = pf.linearized_forward_diag(fwd, params, x, sd)
    want = ref.linearized_forward_diag(fwd, params, x, sd)
    assert_tree_close(got[:2], want[:2], torch.float64)


@pytest.mark.parametrize("backend", ["eager", "compiled"])
def test_linearized_forward_diag_repeated_calls_match_the_reference(ref, compile_after, backend):
    """After the first call has found the forward sample-separable, later calls
    take outputs, Jacobian and aux from the per-sample graph alone: every call
    still equals posteriors 0.0.5, and the batch forward is not run again."""
    compile_after(1)
    params = random_params("nested", torch.float64)
    sd = tree_map(lambda t: torch.rand_like(t) + 0.1, params)
    sizes = []

    def fwd(p, batch):
        z = forward(p, batch)
        return z, {"logits": z}

    def counted(p, batch):
        sizes.append(batch.shape[0])
        return fwd(p, batch)

    for seed in range(3):
        (x, _) = random_batch(7, torch.float64, seed=seed)
        if seed == 1:
            probed = len(sizes)
        got = pf.linearized_forward_diag(counted, params, x, sd, backend=backend)
        want = ref.linearized_forward_diag(fwd, params, x, sd)
        assert_tree_close(got, want, torch.float64)
    assert 7 not in sizes[probed:]


def test_linearized_forward_diag_keeps_the_graph_of_outputs_when_params_require_grad(ref):
    params = tree_map(lambda t: t.requires_grad_(True), random_params("dict", torch.float64))
    sd = tree_map(lambda t: torch.full_like(t, 0.2), params)
    (x, _) = random_batch(5, torch.float64)

    def fwd(p, batch):
        return forward(p, batch), torch.tensor([])

    for _ in range(2):
        values, chol, _ = pf.linearized_forward_diag(fwd, params, x, sd)
        assert values.requires_grad
        values.sum().backward()


@pytest.mark.parametrize("needs_grad", ["batch", "closure"])
def test_linearized_forward_diag_keeps_the_graph_when_the_batch_or_a_closure_requires_grad(needs_grad):
    """After a first call has found the forward sample-separable, a later
    call whose batch (or a tensor the forward closes over) requires grad
    still returns outputs with their autograd graph, whose gradient equals
    the batch forward's (float64 autograd of the plain forward)."""
    params = random_params("dict", torch.float64)
    sd = tree_map(lambda t: torch.full_like(t, 0.2), params)
    (x0, _) = random_batch(5, torch.float64)
    shift = torch.zeros(3, dtype=torch.float64, requires_grad=needs_grad == "closure")

    def fwd(p, batch):
        return forward(p, batch) + shift, torch.tensor([])

    pf.linearized_forward_diag(fwd, params, x0.clone(), sd)  # probes: sample-separable
    for _ in range(2):
        x = x0.clone().requires_grad_(needs_grad == "batch")
        values, _, _ = pf.linearized_forward_diag(fwd, params, x, sd)
        assert values.requires_grad
        leaf = x if needs_grad == "batch" else shift
        (got,) = torch.autograd.grad((values**2).sum(), leaf)
        (want,) = torch.autograd.grad((fwd(params, x)[0] ** 2).sum(), leaf)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
