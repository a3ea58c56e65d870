"""``direct_call``: a compiled graph run without torch.compile's frame hook
gives torch.compile's results and hands every call whose guards fail (a new
shape, a changed global, a changed closure of an argument) back to it."""

import gc
import logging
import types

import pytest
import torch

from posteriors_fast.backends import compile_policy as _tiered
from posteriors_fast.backends.direct_call import MISSED, direct_caller

SCALE = 2.0  # a global the compiled functions read: dynamo guards its value


LAST = {"out": None}  # a global the compiled function writes: dynamo replays that in its transformed code


def recorded(x):
    out = x + 1
    LAST["out"] = out
    return out


def scaled(x, y):
    return (x * y).sin() * SCALE


def calls_fn(fn, x):
    return fn(x) + 1


def holder_scale(holder, x):
    return holder.act.scale(x) + 1


def _compiled(fn, *args):
    compiled = torch.compile(fn, backend="eager", dynamic=False)
    compiled(*args)
    return compiled


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_hit_gives_the_compiled_result_and_a_new_shape_misses(fresh_dynamo):
    x, y = torch.randn(5), torch.randn(5)
    call = direct_caller(_compiled(scaled, x, y))
    assert call is not None
    hit, out = call((x, y))
    assert hit
    torch.testing.assert_close(out, scaled(x, y))
    assert call((torch.randn(6), torch.randn(6))) == MISSED
    assert call((x.double(), y.double())) == MISSED
    assert call((x,)) == MISSED  # another number of arguments


def test_side_effects_of_the_function_happen_on_every_direct_call(fresh_dynamo):
    call = direct_caller(_compiled(recorded, torch.randn(3)))
    assert call is not None
    for _ in range(3):
        x = torch.randn(3)
        LAST["out"] = None
        hit, out = call((x,))
        assert hit and LAST["out"] is out
        torch.testing.assert_close(out, x + 1)


def test_a_changed_global_misses(fresh_dynamo, monkeypatch):
    x, y = torch.randn(5), torch.randn(5)
    call = direct_caller(_compiled(scaled, x, y))
    monkeypatch.setitem(globals(), "SCALE", 3.0)
    assert call((x, y)) == MISSED  # the graph holds SCALE = 2 as a constant


def scaling_user(factor):
    """A user function whose closure holds ``factor``."""

    def user(x):
        return x * factor

    return user


def test_a_changed_closure_of_an_argument_misses(fresh_dynamo):
    user = scaling_user(2.0)
    x = torch.arange(3.0)
    call = direct_caller(_compiled(calls_fn, user, x))
    assert call((user, x))[0]
    torch.testing.assert_close(call((user, x))[1], 2 * x + 1)
    # A rebuilt function with the same code and closure values is the same graph.
    torch.testing.assert_close(call((scaling_user(2.0), x)), (True, 2 * x + 1))
    user.__closure__[0].cell_contents = 5.0
    assert call((user, x)) == MISSED
    assert call((scaling_user(7.0), x)) == MISSED


def test_not_for_graph_breaks_closures_or_defaults(fresh_dynamo):
    x = torch.randn(4)

    def breaks(x):
        y = x.sin()
        torch._dynamo.graph_break()
        return y.cos()

    assert direct_caller(_compiled(breaks, x)) is None
    factor = 3.0

    def closure(x):
        return x * factor

    assert direct_caller(_compiled(closure, x)) is None

    def default(x, k=2.0):
        return x * k

    assert direct_caller(_compiled(default, x)) is None
    assert direct_caller(scaled) is None  # not compiled
    assert direct_caller(torch.compile(scaled, backend="eager")) is None  # compiled, never called


def test_a_stance_other_than_the_default_goes_through_torch_compile(fresh_dynamo):
    x, y = torch.randn(5), torch.randn(5)
    call = direct_caller(_compiled(scaled, x, y))
    with torch.compiler.set_stance("force_eager"):
        assert call((x, y)) == MISSED
    assert call((x, y))[0]


def test_the_policy_runs_compiled_entries_directly_and_demotes_on_a_changed_closure(fresh_dynamo, caplog):
    """Through the policy: the compiled entry gets a direct caller, its calls
    do not enter dynamo (no new compile is started), and a closure change is
    still a recompile that demotes the signature to eager with one warning."""
    eager_calls = []

    def eager(fn, x):
        eager_calls.append(1)
        return calls_fn(fn, x)

    tiered = _tiered.TieredCompile(calls_fn, "the tiny computation", eager=eager, kind="tiny")
    tiered.book = _tiered.CostBook(None)
    tiered.policy = _tiered.Policy("always")
    user = scaling_user(2.0)
    x = torch.arange(3.0)
    torch.testing.assert_close(tiered(user, "sig", user, x), 2 * x + 1)
    entry = tiered._entries[user]["sig"]
    assert entry.direct is not None
    started = _tiered._DYNAMO_COMPILES.count()
    for _ in range(3):
        torch.testing.assert_close(tiered(user, "sig", user, x), 2 * x + 1)
    assert _tiered._DYNAMO_COMPILES.count() == started and eager_calls == []
    before = _tiered.stats()["recompiles"]
    user.__closure__[0].cell_contents = 4.0
    with caplog.at_level(logging.WARNING, logger="posteriors_fast"):
        for _ in range(2):
            torch.testing.assert_close(tiered(user, "sig", user, x), 4 * x + 1)
    assert _tiered.stats()["recompiles"] == before + 1 and len(eager_calls) == 1
    assert entry.direct is None
    assert sum("recompiled" in r.getMessage() for r in caplog.records) == 1


def _scaler_class(factor):
    """A new class (dynamo guards a method's class by identity) whose
    ``scale`` multiplies by ``factor``."""
    namespace = {}
    exec(f"class Scaler:\n    def scale(self, x):\n        return x * {factor}\n", namespace)
    return namespace["Scaler"]


def test_an_identity_guard_on_a_freed_object_misses_even_at_a_reused_address(fresh_dynamo):
    """dynamo guards the class by its id and, when that class is freed,
    replaces the entry's guards by ones that always fail; a new class at the
    same address must not pass the guards kept from before."""
    holder = types.SimpleNamespace(act=_scaler_class(2)())
    x = torch.ones(2)
    call = direct_caller(_compiled(holder_scale, holder, x))
    assert call is not None
    torch.testing.assert_close(call((holder, x)), (True, 2 * x + 1))
    old_id = id(type(holder.act))
    holder.act = None
    gc.collect()
    for _ in range(200):  # try for a new class at the freed one's address
        cls = _scaler_class(3)
        if id(cls) == old_id:
            break
    holder.act = cls()
    assert call((holder, x)) == MISSED
    torch.testing.assert_close(holder_scale(holder, x), 3 * x + 1)


def test_after_a_dynamo_reset_the_policy_drops_the_direct_caller(fresh_dynamo):
    tiered = _tiered.TieredCompile(calls_fn, "the tiny computation", kind="tiny")
    tiered.book = _tiered.CostBook(None)
    tiered.policy = _tiered.Policy("always")
    user, other = scaling_user(2.0), scaling_user(5.0)
    x = torch.arange(3.0)
    tiered(user, "sig", user, x)
    entry = tiered._entries[user]["sig"]
    assert entry.direct is not None
    torch._dynamo.reset()
    torch.testing.assert_close(tiered(user, "sig", user, x), 2 * x + 1)
    assert entry.direct is None
    torch.testing.assert_close(tiered(other, "sig", other, x), 5 * x + 1)  # registers dynamo's callback again
    assert _tiered._DYNAMO_COMPILES.count() is not None
    torch.testing.assert_close(tiered(user, "sig", user, x), 2 * x + 1)
    assert entry.direct is None
