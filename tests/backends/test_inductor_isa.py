"""The remembered inductor ISA load checks (``backends.inductor_isa``): a
process whose compile checked libraries that loaded writes them down; a later
process with the same machine key compiles without starting a child process
and gets the same results; another machine's key, a failed load, no cache
directory or an unreadable file change nothing; nested compiles restore
torch's own check."""

import json
import os
import subprocess
import sys

import pytest
import torch

from posteriors_fast.backends import inductor_isa

# torch._inductor is imported inside the tests: importing it while the tests
# are collected would import triton before tests/kernels/conftest.py sets
# TRITON_INTERPRET=1.


def _vec_isa():
    from torch._inductor.cpu_vec_isa import VecISA

    return VecISA


def _root(path):
    return lambda: str(path)


@pytest.fixture
def fake_loads(monkeypatch):
    """torch's load check replaced by a recorder: ``calls`` lists the
    libraries it was asked about, ``result`` is its answer."""
    state = {"calls": [], "result": True}

    def check(isa, output_path):
        state["calls"].append(os.path.basename(output_path))
        return state["result"]

    monkeypatch.setattr(_vec_isa(), "_probe_load", check)
    monkeypatch.setattr(inductor_isa, "_machine_key", lambda: "this machine")
    return state


def _ask(name):
    return _vec_isa()._probe_load(None, f"/some/dir/{name}")


def test_loads_are_remembered_and_answered_for_the_compile_only(tmp_path, fake_loads):
    check = _vec_isa().__dict__["_probe_load"]
    with inductor_isa.remembered_probe(_root(tmp_path)):
        assert _ask("a.so") and _ask("b.so")
    assert fake_loads["calls"] == ["a.so", "b.so"]
    assert json.loads((tmp_path / inductor_isa.FILE_NAME).read_text()) == {"this machine": ["a.so", "b.so"]}
    assert _vec_isa().__dict__["_probe_load"] is check  # restored
    with inductor_isa.remembered_probe(_root(tmp_path)):
        with inductor_isa.remembered_probe(_root(tmp_path)):  # nested: one install
            assert _ask("a.so") and _ask("b.so")
        assert _vec_isa().__dict__["_probe_load"] is not check
    assert fake_loads["calls"] == ["a.so", "b.so"]  # answered from the file
    assert _vec_isa().__dict__["_probe_load"] is check
    assert [p for p in os.listdir(tmp_path) if p.endswith(".tmp")] == []


def test_a_failed_load_is_checked_again_and_not_written(tmp_path, fake_loads):
    fake_loads["result"] = False
    for _ in range(2):
        with inductor_isa.remembered_probe(_root(tmp_path)):
            assert not _ask("a.so")
    assert fake_loads["calls"] == ["a.so", "a.so"]
    assert not (tmp_path / inductor_isa.FILE_NAME).exists()


@pytest.mark.parametrize("content", [{"another machine": ["a.so"]}, {"this machine": True}, "{not json"])
def test_another_machine_or_a_bad_file_answers_nothing(tmp_path, fake_loads, content):
    path = tmp_path / inductor_isa.FILE_NAME
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with inductor_isa.remembered_probe(_root(tmp_path)):
        assert _ask("a.so")
    assert fake_loads["calls"] == ["a.so"]
    written = json.loads(path.read_text())
    assert written["this machine"] == ["a.so"]
    if isinstance(content, dict) and "another machine" in content:
        assert written["another machine"] == ["a.so"]  # other machines' entries are kept


def test_no_cache_directory_changes_nothing(fake_loads):
    check = _vec_isa().__dict__["_probe_load"]
    with inductor_isa.remembered_probe(lambda: None):
        assert _vec_isa().__dict__["_probe_load"] is check


def test_the_machine_key_names_torch_the_cpu_and_the_compiler(monkeypatch):
    from torch._inductor import config

    key = inductor_isa._machine_key()
    assert key == inductor_isa._machine_key()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert inductor_isa._machine_key() != key
    monkeypatch.undo()
    with config.patch({"cpp.cxx": ("no-such-compiler-here",)}):
        assert inductor_isa._machine_key() != key
    assert config.cpp.cxx != ("no-such-compiler-here",)


_CHILD = """
import sys, torch
from torch._inductor import cpu_vec_isa
from posteriors_fast.backends import compile_policy as c

import subprocess
probes = []
run = subprocess.run
def counted(command, *args, **kwargs):
    if "-c" in command and any("CDLL" in str(part) or "cdll" in str(part) for part in command):
        probes.append(command)
    return run(command, *args, **kwargs)
subprocess.run = counted

def step(x):
    return torch.sin(x) * 2 + 1

tiered = c.TieredCompile(step, "a tiny graph", kind="tiny")
tiered.policy = c.Policy("always")
x = torch.linspace(0, 1, 1000)
out = tiered(step, "sig", x)
assert c.stats()["compiles"] == 1, c.stats()
torch.testing.assert_close(out, torch.sin(x) * 2 + 1)
print(len(probes))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="inductor's ISA load checks run on Linux")
def test_a_second_process_compiles_without_a_load_check(tmp_path):
    """Two fresh processes with one cache directory: the first starts a child
    process per ISA library and writes down those that loaded; the second
    compiles the same kind of graph, with the same result, starting children
    only for those that did not (none on the machines here)."""
    env = {**os.environ, "POSTERIORS_FAST_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    env.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    first = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    checked = int(first.stdout.split()[-1])
    remembered = list(json.loads((tmp_path / inductor_isa.FILE_NAME).read_text()).values())
    assert len(remembered) == 1 and 1 <= len(remembered[0]) <= checked  # at least the base ISA loads
    second = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert int(second.stdout.split()[-1]) == checked - len(remembered[0])  # only those that failed, again
