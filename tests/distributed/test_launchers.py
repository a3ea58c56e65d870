"""The torchrun example and the distributed benchmark run end to end on
2 gloo processes (loopback only, bounded in time; nothing timed is asserted)."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", POSTERIORS_FAST_CACHE_DIR="off")
    return env


def test_torchrun_example_sharded_matches_one_process(tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on localhost, a free port
        "--nproc_per_node=2",
        os.path.join(ROOT, "examples", "distributed_ekf.py"),
        "--sharded",
        "--check",
        "--out",
        str(tmp_path),
    ]
    run = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "mode = sharded" in run.stdout and "test accuracy" in run.stdout, run.stdout
    line = next(x for x in run.stdout.splitlines() if x.startswith("largest difference to one process"))
    mean, cov = (float(part.split()[-1]) for part in line.split(":")[1].split(","))
    assert mean < 1e-3 and cov < 1e-3, line


def test_distributed_benchmark_quick_run(tmp_path):
    command = [sys.executable, "-m", "benchmarks.distributed", "--procs", "2", "--quick"]
    command += ["--steps", "1", "--warmup", "1", "--timeout", "200", "--out", str(tmp_path)]
    run = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.load(open(tmp_path / "distributed_R2.json"))["rows"]
    assert {(r["method"], r["mode"]) for r in rows} == {
        ("ekf.dense_fisher", "data"),
        ("ekf.dense_fisher", "sharded"),
        ("laplace.diag_ggn", "data"),
    }
    for row in rows:
        assert row["wire_bytes"] > 0 and row["state_bytes"] > 0 and row["update_ms"] > 0
        assert row["one_process_ms"] > 0 and row["calls"] >= 1
    assert (tmp_path / "distributed_R2.csv").exists()
