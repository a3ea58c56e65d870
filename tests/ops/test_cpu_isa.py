"""The ISA level of the CPU kernels (csrc/cpu/multiversion.h): the run-time
cap, what an unsupported request does, and POSTERIORS_FAST_CPU_ISA at load."""

import os
import subprocess
import sys

import pytest

from tests.ops._native import _C, ISAS, SUPPORTED_ISAS, cpu_isa, needs_ext


@needs_ext
def test_supported_levels_are_a_suffix_of_all_levels_and_auto_is_the_best():
    assert SUPPORTED_ISAS == ISAS[ISAS.index(SUPPORTED_ISAS[0]) :]
    with cpu_isa("auto"):
        assert _C.cpu_isa() == SUPPORTED_ISAS[0]


@needs_ext
def test_active_level_follows_the_cap_and_set_returns_the_previous_cap():
    start = _C.set_cpu_isa("auto")  # "auto" unless POSTERIORS_FAST_CPU_ISA set a cap
    try:
        assert _C.cpu_isa() == SUPPORTED_ISAS[0]
        previous = "auto"
        for name in SUPPORTED_ISAS:
            assert _C.set_cpu_isa(name) == previous
            assert _C.cpu_isa() == name
            previous = "auto" if name == "avx512" else name  # the top level caps nothing
        assert _C.set_cpu_isa(SUPPORTED_ISAS[-1].upper()) == SUPPORTED_ISAS[-1]  # names are case-insensitive
    finally:
        _C.set_cpu_isa(start)


@needs_ext
def test_unknown_or_unsupported_levels_raise_and_change_nothing():
    start = _C.cpu_isa()
    with pytest.raises(ValueError, match="unknown CPU ISA level 'sse9'.*avx512, avx2, baseline"):
        _C.set_cpu_isa("sse9")
    with pytest.raises(TypeError):
        _C.set_cpu_isa(2)
    assert _C.cpu_isa() == start
    # A CPU without AVX-512, simulated: avx512 is refused, the cap is min(CPU, cap).
    if "avx2" not in SUPPORTED_ISAS:
        pytest.skip("this CPU has neither AVX-512 nor AVX2")
    assert _C._simulate_cpu_isa("avx2") == "auto"
    try:
        assert _C.supported_cpu_isas() == ("avx2", "baseline")
        assert _C.cpu_isa() == ("avx2" if start == "avx512" else start)
        with pytest.raises(ValueError, match="'avx512' is not available: this CPU supports up to 'avx2'"):
            _C.set_cpu_isa("avx512")
        with cpu_isa("baseline"):
            assert _C.cpu_isa() == "baseline"
    finally:
        assert _C._simulate_cpu_isa("auto") == "avx2"
    assert _C.supported_cpu_isas() == SUPPORTED_ISAS and _C.cpu_isa() == start


@needs_ext
def test_a_cpu_cannot_be_simulated_with_more_than_it_has():
    if SUPPORTED_ISAS[0] == "avx512":
        pytest.skip("nothing above avx512 to ask for")
    with pytest.raises(ValueError, match="cannot simulate a CPU with 'avx512'"):
        _C._simulate_cpu_isa("avx512")


def _load_with_env(**env):
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "from posteriors_fast import _library\n"
        "assert _library.load_extension()[0]\n"
        "from posteriors_fast import _C; print(_C.cpu_isa())"
    )
    child_env = {k: v for k, v in os.environ.items() if k not in ("POSTERIORS_FAST_CPU_ISA",)}
    child_env.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip(), out.stderr


@needs_ext
def test_environment_variable_caps_the_level_at_load():
    """POSTERIORS_FAST_CPU_ISA is read once when the extension loads (hence a
    fresh process); an invalid value warns, naming the variable, and is
    ignored."""
    lowest = SUPPORTED_ISAS[-1]
    level, err = _load_with_env(POSTERIORS_FAST_CPU_ISA=lowest)
    assert level == lowest and "POSTERIORS_FAST" not in err
    assert _load_with_env(POSTERIORS_FAST_CPU_ISA="avx512")[0] == SUPPORTED_ISAS[0]  # a cap, never above the CPU
    assert _load_with_env()[0] == SUPPORTED_ISAS[0]
    level, err = _load_with_env(POSTERIORS_FAST_CPU_ISA="sse9")
    assert level == SUPPORTED_ISAS[0]
    assert "RuntimeWarning: POSTERIORS_FAST_CPU_ISA='sse9' is not one of avx512, avx2, baseline, auto" in err
    level, err = _load_with_env(POSTERIORS_FAST_PORTABLE_KERNELS="1")
    assert level == SUPPORTED_ISAS[0] and "POSTERIORS_FAST_PORTABLE_KERNELS is no longer read" in err
