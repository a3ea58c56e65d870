"""Results: a markdown table on stdout, CSV and JSON files, and a PNG plot."""

import csv
import json
import logging
import math
import os
import platform
import subprocess
import time
from typing import Dict, List

import torch

logger = logging.getLogger("benchmarks")

COLUMNS = [
    "op",
    "model",
    "P",
    "N",
    "provider",
    "status",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "speedup",
    "after_switch_ms",
    "after_switch_speedup",
    "baseline",
    "gflops",
    "first_call_ms",
    "compile_s",
    "note",
]


def environment(device: str) -> Dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_isa": _active_isa(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        # Other work on a shared machine skews per-call ratios; a reader can
        # judge a run by the load it started under (1, 5, 15 minute averages).
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        import posteriors

        env["posteriors"] = getattr(posteriors, "__version__", "?")
    except ImportError:
        env["posteriors"] = "not installed"
    return env


def _cpuinfo() -> Dict[str, str]:
    try:
        with open("/proc/cpuinfo") as handle:
            first = handle.read().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines())}


def _cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def _cpu_flags() -> str:
    """The vector extensions that decide which kernels run (all of them: cpu_isa)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl") if f in flags)


def _active_isa() -> str:
    try:
        from posteriors_fast import _library

        if not _library.load_extension()[0]:
            return "extension not loaded"
        from posteriors_fast import _C

        return _C.cpu_isa()
    except Exception as err:  # reported, never fatal
        return f"unknown ({type(err).__name__})"


def _fmt(value, digits=2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.{digits}f}"
    return str(value)


def markdown(rows: List[Dict]) -> str:
    shown = [
        "op",
        "model",
        "P",
        "N",
        "provider",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "speedup",
        "after_switch_ms",
        "after_switch_speedup",
        "baseline",
        "gflops",
        "compile_s",
        "status",
    ]
    ratios = ("speedup", "after_switch_speedup")
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [
            _fmt(row.get(c, float("nan")))
            if c not in ratios
            else (f"{row[c]:.1f}x" if isinstance(row.get(c), float) and not math.isnan(row[c]) else "—")
            for c in shown
        ]
        if row["status"] != "ok":
            cells[-1] = f"{row['status']}: {row['note']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(rows: List[Dict], env: Dict, out_dir: str, workflows: List[Dict] = (), coldstart: List[Dict] = ()) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(
            {"environment": env, "results": rows, "workflows": list(workflows), "coldstart": list(coldstart)},
            handle,
            indent=1,
            default=str,
        )
    _plot(rows, env, os.path.join(out_dir, "speedups.png"))


def _plot(rows: List[Dict], env: Dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("plot skipped: matplotlib is not installed (pip install -e .[bench])")
        return
    # One group per case: eager and compiled speedups over the case's baseline
    # (posteriors 0.0.5, or plain torch for the kernel benches).
    groups: Dict[str, Dict[str, float]] = {}
    for row in rows:
        if (
            row["provider"] in ("eager", "compiled", "cpp")
            and isinstance(row["speedup"], float)
            and not math.isnan(row["speedup"])
        ):
            size = f"{row['model']}/N={row['N']}" if row["model"] != "-" else f"P={row['P']}"
            label = f"{row['op']} {size} (vs {row['baseline']})"
            groups.setdefault(label, {})[row["provider"]] = row["speedup"]
    if not groups:
        return
    labels = list(groups)
    colors = {"eager": "tab:blue", "compiled": "tab:orange", "cpp": "tab:green"}
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(labels) + 1.5))
    height = 0.4
    # Kernel benches have no "compiled" row: their C++ bar takes its slot.
    for k, provider in ((0, "eager"), (1, "compiled"), (1, "cpp")):
        ys = [i + (k - 0.5) * height for i, label in enumerate(labels) if provider in groups[label]]
        xs = [groups[label][provider] for label in labels if provider in groups[label]]
        if xs:
            ax.barh(ys, xs, height=height, color=colors[provider], label=provider)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("same-run speedup over the baseline (log scale)")
    ax.set_title(f"{env['device']} · torch {env['torch']} · {env['threads']} threads · {env['commit'][:8]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
