"""The compile policy (``backends.compile_policy``): the ski-rental rule
compiles when the eager time spent reaches the estimated compile cost, not
before, and keeps every run within the bound; ``after``/``never``/``always``;
the persisted cost estimates; the compiled per-sample Jacobian equals the
eager one without recompiling; failures fall back (or propagate the user's
own error); nothing compiles at import."""

import logging
import subprocess
import sys

import pytest
import torch

from posteriors_fast.backends import compile_policy as _tiered
from posteriors_fast.ops import sample_jacobian as jacobian
from posteriors_fast.ops import separable_jacobian
from tests._compare import tol


def _mlp(dtype, sizes=(3, 5, 4)):
    g = torch.Generator().manual_seed(0)
    params = {
        "w": {"a": torch.randn(sizes[0], sizes[1], generator=g, dtype=dtype)},
        "v": torch.randn(sizes[1], sizes[2], generator=g, dtype=dtype),
        "b": torch.randn(sizes[2], generator=g, dtype=dtype),
    }
    x = torch.randn(7, sizes[0], generator=g, dtype=dtype)
    y = torch.randint(0, sizes[2], (7,), generator=g)
    return params, (x, y)


def _logits(params, batch):
    x, _ = batch
    return torch.tanh(x @ params["w"]["a"]) @ params["v"] + params["b"]


def log_lik(params, batch):
    z = _logits(params, batch)
    return -torch.nn.functional.cross_entropy(z, batch[1]), z


def forward(params, batch):
    return _logits(params, batch), None  # multi-output, aux that is not a tensor


class _Recorder:
    """Stands in for torch.compile: counts compiles and compiled calls."""

    def __init__(self, fail=False):
        self.compiles = 0
        self.calls = 0
        self.fail = fail

    def __call__(self, tiered):
        self.compiles += 1
        eager = tiered._fn

        def compiled(*args):
            self.calls += 1
            if self.fail:
                raise RuntimeError("backend compiler failed\nsecond line")
            return eager(*args)

        return compiled


@pytest.fixture
def recorder(monkeypatch, compile_after):
    compile_after(3)
    rec = _Recorder()
    tiered = _tiered.TieredCompile(jacobian.sample_jacobian_eager, "the per-sample Jacobian")
    monkeypatch.setattr(tiered, "_compile", lambda: rec(tiered))
    monkeypatch.setattr(jacobian, "_tiered_sample_jacobian", tiered)
    return rec


def _jac(f, params, batch, **kw):
    with torch.no_grad():
        return jacobian.sample_jacobian(f, params, batch, True, backend="compiled:torch_compile", **kw)


def test_after_mode_compiles_on_the_nth_call_with_one_signature(recorder):
    params, batch = _mlp(torch.float64)
    for call in range(1, 6):
        _jac(log_lik, params, batch)
        assert recorder.compiles == (call >= 3)
    assert recorder.calls == 3
    # Another batch size is another signature, counted from zero ...
    small = (batch[0][:4], batch[1][:4])
    for _ in range(2):
        _jac(log_lik, params, small)
    assert recorder.compiles == 1
    # ... and so is another dtype.
    params32, batch32 = _mlp(torch.float32)
    for _ in range(2):
        _jac(log_lik, params32, batch32)
    assert recorder.compiles == 1


class _FakeClock:
    """Advances only when a call of the fake computation says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_tiered(monkeypatch, clock, eager_s, compiled_s, compile_s, estimate_s):
    """A TieredCompile whose eager calls take ``eager_s``, whose compiled calls
    take ``compiled_s`` and whose compile takes ``compile_s`` on the fake
    clock, with an in-memory cost book that estimates ``estimate_s``."""
    state = {"compiles": 0}

    def eager(x):
        clock.now += eager_s
        return x + 1

    tiered = _tiered.TieredCompile(eager, "the fake computation", kind="fake")
    monkeypatch.setattr(tiered, "clock", clock)
    tiered.book = _tiered.CostBook(None)
    tiered.book.kinds["fake"] = [estimate_s]
    tiered.policy = _tiered.Policy("auto", 1.0)

    def compile_():
        state["compiles"] += 1
        first = [True]

        def compiled(x):
            clock.now += compiled_s + (compile_s if first[0] else 0.0)
            first[0] = False
            return x + 1

        return compiled

    monkeypatch.setattr(tiered, "_compile", compile_)
    return tiered, state


def _owner(x):  # a user function for the entries to hang on
    return x


def test_auto_compiles_once_the_eager_time_reaches_the_estimate_not_before(monkeypatch):
    clock = _FakeClock()
    tiered, state = _fake_tiered(monkeypatch, clock, eager_s=0.125, compiled_s=0.0, compile_s=1.0, estimate_s=1.0)
    for call in range(1, 30):
        tiered(_owner, "sig", torch.zeros(()))
        # Eight eager calls spend 1.0 s (the estimate): the 9th compiles.
        assert state["compiles"] == (1 if call >= 9 else 0), call
    # The measured compile cost (the first compiled call beyond an eager one) is recorded.
    (key,) = tiered.book.graphs
    assert key.startswith("fake|") and tiered.book.graphs[key] == 1.0 - 0.125


@pytest.mark.parametrize("compile_s", [0.3, 1.0, 3.0])
def test_no_run_is_more_than_twice_eager_however_long(monkeypatch, compile_s):
    """Ski rental: with the estimate learned from a first run of the same
    graph, every run length n costs at most 2x what n eager calls cost."""
    eager_s, compiled_s = 0.05, 0.01
    for n in range(1, 200, 7):
        clock = _FakeClock()
        tiered, _ = _fake_tiered(monkeypatch, clock, eager_s, compiled_s, compile_s, estimate_s=compile_s)
        for _ in range(n):
            tiered(_owner, "sig", torch.zeros(()))
        assert clock.now <= 2 * n * eager_s + compiled_s + 1e-9, (n, clock.now, n * eager_s)
    # ... while long runs reach the compiled steady state:
    clock = _FakeClock()
    tiered, _ = _fake_tiered(monkeypatch, clock, eager_s, compiled_s, compile_s, estimate_s=compile_s)
    for _ in range(2000):
        tiered(_owner, "sig", torch.zeros(()))
    assert clock.now < 0.5 * 2000 * eager_s


def test_a_slower_compile_than_estimated_teaches_the_estimate(monkeypatch):
    clock = _FakeClock()
    tiered, state = _fake_tiered(monkeypatch, clock, eager_s=0.1, compiled_s=0.01, compile_s=4.0, estimate_s=0.5)
    for _ in range(10):
        tiered(_owner, "sig", torch.zeros(()))
    assert state["compiles"] == 1
    # The same graph waits for the measured cost next time, not the guess.
    (key,) = tiered.book.graphs
    assert tiered.book.estimate(key, "fake") == pytest.approx(4.0 + 0.01 - 0.1)


def test_never_and_always(monkeypatch):
    clock = _FakeClock()
    tiered, state = _fake_tiered(monkeypatch, clock, eager_s=0.1, compiled_s=0.01, compile_s=1.0, estimate_s=0.0)
    tiered.policy = _tiered.Policy("never")
    for _ in range(50):
        tiered(_owner, "sig", torch.zeros(()))
    assert state["compiles"] == 0
    tiered.policy = _tiered.Policy("always")
    tiered(_owner, "other", torch.zeros(()))
    assert state["compiles"] == 1


def test_set_compile_policy_validates_and_returns_the_previous_one():
    before = _tiered.get_compile_policy()
    try:
        previous = _tiered.set_compile_policy("never")
        assert previous == before and _tiered.get_compile_policy().mode == "never"
        _tiered.set_compile_policy(after=5)
        assert _tiered.get_compile_policy().mode == "after" and _tiered.get_compile_policy().after == 5
        with pytest.raises(ValueError, match="mode='sometimes' is not a compile policy"):
            _tiered.set_compile_policy("sometimes")
        with pytest.raises(ValueError, match="budget must be a finite number > 0"):
            _tiered.set_compile_policy(budget=0.0)
        with pytest.raises(ValueError, match="after must be a positive integer"):
            _tiered.set_compile_policy(after=0)
    finally:
        _tiered.set_compile_policy(before.mode, budget=before.budget, after=before.after)


@pytest.mark.parametrize(
    "env, want",
    [
        ({}, ("auto", 1.0)),
        ({"POSTERIORS_FAST_COMPILE": "never"}, ("never", 1.0)),
        ({"POSTERIORS_FAST_COMPILE_BUDGET": "2.5"}, ("auto", 2.5)),
        ({"POSTERIORS_FAST_COMPILE_AFTER": "4"}, ("after", 1.0)),
        ({"POSTERIORS_FAST_COMPILE": "sometimes"}, ("auto", 1.0)),  # warned about, default kept
    ],
)
def test_policy_from_the_environment(monkeypatch, env, want):
    for name in ("POSTERIORS_FAST_COMPILE", "POSTERIORS_FAST_COMPILE_BUDGET", "POSTERIORS_FAST_COMPILE_AFTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    policy = _tiered._policy_from_environment()
    assert (policy.mode, policy.budget) == want


def test_cost_estimates_persist_across_processes(tmp_path):
    path = str(tmp_path / "compile_costs.json")
    book = _tiered.CostBook(path)
    assert book.estimate("g", "jacobian") == _tiered.DEFAULT_COMPILE_S
    book.record("g", "jacobian", 1.25)
    book.record("h", "jacobian", 2.0)
    code = (
        "import sys; from posteriors_fast.backends import compile_policy as c; "
        "b = c.CostBook(sys.argv[1]); print(b.estimate('g', 'jacobian'), b.estimate('new', 'jacobian'), "
        "b.estimate('new', 'other'))"
    )
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["1.25", "1.625", str(_tiered.DEFAULT_COMPILE_S)]
    with open(path, "w") as handle:
        handle.write("{not json")
    assert _tiered.CostBook(path).estimate("g", "jacobian") == _tiered.DEFAULT_COMPILE_S  # ignored, not raised


def test_nothing_compiles_at_import():
    code = (
        "import torch, posteriors_fast; from torch._dynamo.utils import counters; "
        "print(sum(counters['stats'].values()), len(torch._dynamo.eval_frame._debug_get_cache_entry_list"
        "(posteriors_fast.ops.cg_step.cg_step_eager.__code__)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["0", "0"]


def test_a_function_rebuilt_every_call_is_never_compiled(recorder):
    params, batch = _mlp(torch.float64)
    for _ in range(6):
        _jac(lambda p, b: log_lik(p, b), params, batch)
    assert recorder.compiles == 0


def test_eager_when_autograd_must_see_through(recorder):
    params, batch = _mlp(torch.float64)
    params["b"].requires_grad_(True)
    for _ in range(6):
        jacobian.sample_jacobian(log_lik, params, batch, True, backend="compiled:torch_compile")
    assert recorder.compiles == 0


def test_a_failed_compile_is_logged_once_and_runs_eagerly(monkeypatch, caplog, compile_after):
    compile_after(3)
    rec = _Recorder(fail=True)
    tiered = _tiered.TieredCompile(jacobian.sample_jacobian_eager, "the per-sample Jacobian")
    monkeypatch.setattr(tiered, "_compile", lambda: rec(tiered))
    monkeypatch.setattr(jacobian, "_tiered_sample_jacobian", tiered)
    params, batch = _mlp(torch.float64)
    want = jacobian.sample_jacobian_eager(log_lik, params, batch, True)[0]
    with caplog.at_level(logging.WARNING, logger="posteriors_fast"):
        for _ in range(6):
            torch.testing.assert_close(_jac(log_lik, params, batch)[0], want, rtol=0, atol=0)
    assert rec.calls == 1
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert lines == [
        "posteriors_fast: torch.compile of the per-sample Jacobian failed "
        "(RuntimeError: backend compiler failed); running it eagerly"
    ]


def test_the_users_own_error_propagates_unchanged(recorder):
    params, batch = _mlp(torch.float64)
    calls = []

    def picky(p, b):
        calls.append(1)
        if b[0].shape[-1] != 3:
            raise ValueError("picky wants 3 features")
        return log_lik(p, b)

    for _ in range(3):
        _jac(picky, params, batch)
    bad = (torch.zeros(7, 2, dtype=torch.float64), batch[1])
    with pytest.raises(ValueError, match="picky wants 3 features"):
        _jac(picky, params, bad)


@pytest.mark.parametrize(
    "dtype,f,keep_aux",
    [(torch.float32, log_lik, True), (torch.float64, forward, False)],
    ids=["f32-scalar-with-aux", "f64-multi-output"],
)
def test_compiled_jacobian_matches_eager_and_does_not_recompile(monkeypatch, compile_after, dtype, f, keep_aux):
    compile_after(1)
    monkeypatch.setattr(
        jacobian,
        "_tiered_sample_jacobian",
        _tiered.TieredCompile(jacobian.sample_jacobian_eager, "the per-sample Jacobian"),
    )
    params, batch = _mlp(dtype)
    want = jacobian.sample_jacobian_eager(f, params, batch, True, keep_aux)
    got = _jac(f, params, batch, keep_aux=keep_aux)
    close = tol(dtype, "op")
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, **close)
    assert jacobian._tiered_sample_jacobian._compiled == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _jac(f, params, batch, keep_aux=keep_aux)
    torch.testing.assert_close(again[0], want[0], **close)


def test_compiled_separable_jacobian_matches_eager_and_still_detects_coupling(monkeypatch, compile_after):
    compile_after(1)
    tiered = _tiered.TieredCompile(separable_jacobian.separable_parts_eager, "the per-sample output Jacobian")
    monkeypatch.setattr(separable_jacobian, "_tiered_separable", tiered)
    params, batch = _mlp(torch.float64)

    def coupled(p, b):
        z = _logits(p, b)
        return z - z.mean(0), None  # every output depends on the whole batch

    for fwd, separable in ((forward, True), (coupled, False)):
        z = fwd(params, batch)[0]
        with torch.no_grad():
            got = separable_jacobian.separable_output_jacobian(fwd, params, batch, z, backend="compiled")
            want = separable_jacobian.separable_output_jacobian(fwd, params, batch, z, backend="eager")
        if separable:
            assert got is not None and got.shape == (7, 4, 39)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        else:
            assert got is None and want is None
    assert tiered._compiled == 2


def test_a_failed_compile_is_remembered_and_not_retried(tmp_path, monkeypatch):
    """A graph whose compile failed is never compiled again, in this process
    or the next (same torch), and the time the failure took counts as a cost."""
    path = str(tmp_path / "compile_costs.json")
    clock = _FakeClock()
    tiered, state = _fake_tiered(monkeypatch, clock, eager_s=0.5, compiled_s=0.0, compile_s=0.0, estimate_s=1.0)
    tiered.book = _tiered.CostBook(path)
    tiered.book.kinds["fake"] = [1.0]

    def failing_compile():
        state["compiles"] += 1

        def compiled(x):
            clock.now += 2.0  # what the failed attempt cost
            raise RuntimeError("inductor exploded")

        return compiled

    monkeypatch.setattr(tiered, "_compile", failing_compile)
    for _ in range(10):
        tiered(_owner, "sig", torch.zeros(()))
    assert state["compiles"] == 1
    (key,) = tiered.book.failures
    assert tiered.book.estimate(key, tiered.kind) == pytest.approx(2.0)
    # A new process (a new book on the same file) does not try again.
    fresh, state2 = _fake_tiered(monkeypatch, _FakeClock(), eager_s=0.5, compiled_s=0.0, compile_s=0.0, estimate_s=0)
    fresh.book = _tiered.CostBook(path)
    for _ in range(10):
        fresh(_owner, "sig", torch.zeros(()))
    assert state2["compiles"] == 0


def test_cost_file_of_another_torch_is_ignored_and_saves_merge(tmp_path):
    import json

    path = tmp_path / "compile_costs.json"
    path.write_text(json.dumps({"torch": "0.0.1", "graphs": {"g": 9.0}, "kinds": {"k": [9.0]}, "failures": {"g": 1}}))
    book = _tiered.CostBook(str(path))
    assert book.estimate("g", "k") == _tiered.DEFAULT_COMPILE_S and not book.failed("g")
    # Two processes record different graphs: the file keeps both.
    first, second = _tiered.CostBook(str(path)), _tiered.CostBook(str(path))
    first.record("a", "k", 1.0)
    second.record("b", "k", 3.0)
    data = json.loads(path.read_text())
    assert data["torch"] == torch.__version__ and data["graphs"] == {"a": 1.0, "b": 3.0}


def test_explain_states_the_compile_policy():
    import posteriors_fast as pf

    before = _tiered.get_compile_policy()
    try:
        _tiered.set_compile_policy("auto", budget=2.0)
        assert "auto: compile once the eager time spent reaches 2x" in pf.backends.explain()
        _tiered.set_compile_policy(after=4)
        assert "after: compile on call 4" in pf.backends.explain()
    finally:
        _tiered.set_compile_policy(before.mode, budget=before.budget, after=before.after)
