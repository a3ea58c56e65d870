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
