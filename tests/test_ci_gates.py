"""The skips a broken install would cause are failures in CI
(``POSTERIORS_FAST_CI=1``, set by ``.ci/run``)."""

import os
import subprocess
import sys
import textwrap


def _run_with_broken_reference(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    shadow = tmp_path / "shadow" / "posteriors"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text("raise ImportError('simulated broken posteriors install')\n")
    test = tmp_path / "test_uses_reference.py"
    test.write_text(
        textwrap.dedent("""
        def test_needs_reference(ref):
            assert ref is not None
    """)
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), root]))
    env.pop("POSTERIORS_FAST_CI", None)
    if ci:
        env["POSTERIORS_FAST_CI"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(test),
            "-q",
            "-p",
            "no:cacheprovider",
            "-rs",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            "-p",
            "tests.conftest",
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_reference_that_fails_to_import_skips_locally_and_fails_in_ci(tmp_path):
    local = _run_with_broken_reference(tmp_path, ci=False)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    assert "simulated broken posteriors install" in local.stdout
    ci = _run_with_broken_reference(tmp_path, ci=True)
    assert ci.returncode == 1 and "1 error" in ci.stdout, ci.stdout + ci.stderr  # failed in fixture setup
    assert "in CI every test dependency must be installed" in ci.stdout


def test_gpu_check_script_parses_and_names_what_exists():
    """benchmarks/gpu_check.sh (run on a CUDA machine) is valid bash, refuses
    to run without a GPU, and everything it names exists."""
    import re
    import shutil

    import pytest
    import torch

    from benchmarks.config import CASES

    if shutil.which("bash") is None:
        pytest.skip("no bash on this machine")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    text = open(script).read()
    for folder in re.findall(r"(tests/[\w/]+)", text):
        assert os.path.isdir(os.path.join(root, folder)), folder
    (only,) = re.findall(r'--only "([^"]+)"', text)
    for term in only.split(","):
        assert any(term in c.bench or term in c.op for c in CASES if c.quick), term
    if not torch.cuda.is_available():
        env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        done = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2 and "no CUDA device" in done.stderr
