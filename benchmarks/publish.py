"""Publish a full run: keep its results file in the repository and regenerate
every measured table of the README and the docs from it, so that a number in
the docs always has a file behind it.

    python -m benchmarks --full              # writes benchmarks/results/results.json
    python -m benchmarks.publish             # copies it to docs/results/full_run.json, rewrites the tables

The tables live between ``<!-- generated: NAME -->`` and ``<!-- end generated -->``
markers in ``README.md`` and ``docs/performance.md``; ``--check`` only
verifies that they match the committed results file (the test suite does).
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "docs", "results", "full_run.json")
TARGETS = (os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "performance.md"))
MARKER = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- end generated -->)", re.S)

#: The README's headline rows: (op, model, N).
HEADLINE = [
    ("ekf.dense_fisher.update", "S", 64),
    ("ekf.dense_fisher.update", "M", 64),
    ("ekf.dense_fisher.update per_sample", "S", 64),
    ("laplace.dense_fisher.update", "S", 64),
    ("laplace.diag_fisher.update", "S", 64),
    ("empirical_fisher", "M", 256),
    ("linearized_forward_diag", "S", 64),
    ("cg(50) ggn operator", "S", 64),
    ("sgmcmc.sghmc step (1M params)", "S", 0),
    ("vi.diag.update", "S", 64),
]


def _ratio(x) -> str:
    return "—" if not isinstance(x, (int, float)) or math.isnan(x) else f"{x:.1f}x"


def _ms(x) -> str:
    if not isinstance(x, (int, float)) or math.isnan(x):
        return "—"
    return f"{x:.3g} ms" if x < 1000 else f"{x / 1000:.2f} s"


def _rows_by_case(results: List[Dict]) -> Dict:
    cases: Dict = {}
    for row in results:
        # P too: kernel cases of one op and N differ only in P.
        cases.setdefault((row["op"], row["model"], row["N"], row["P"]), {})[row["provider"]] = row
    return cases


def _size(model: str, n: int, p: int) -> str:
    return f"P = {p}" + (f", N = {n}" if n else "") if model == "-" else f"{model}, N = {n}" if n else model


def environment(data: Dict) -> str:
    env = data["environment"]
    return (
        f"Measured on {env['device_name']} ({env.get('cpu_flags', '')}; kernels at {env.get('cpu_isa', '?')}), "
        f"{env['threads']} threads, torch {env['torch']}, posteriors {env['posteriors']}, "
        f"commit {env['commit'][:10]}, {env.get('date', '')}{_load(env)}{_command(env)}: `docs/results/full_run.json`."
    )


def _command(env: Dict) -> str:
    return f", by `{env['command'].strip()}`" if env.get("command") else ""


def _load(env: Dict) -> str:
    load = env.get("load_average")
    if not load or not env.get("cpu_count"):
        return ""
    return f", load average {load[0]:.1f} on {env['cpu_count']} cores at the start"


def headline(data: Dict) -> str:
    cases = _rows_by_case(data["results"])
    lines = ["| case | size | eager | compiled |", "|---|---|---|---|"]
    for op, model, n in HEADLINE:
        got = next((rows for key, rows in cases.items() if key[:3] == (op, model, n)), None)
        if not got or "eager" not in got:
            continue
        p = got["eager"]["P"]
        lines.append(
            f"| `{op}` | {_size(model, n, p)} | {_ratio(got['eager']['speedup'])} | "
            f"{_ratio(got.get('compiled', {}).get('speedup'))} |"
        )
    from benchmarks import workflows as flows

    for name, got in flows.by_workflow(data.get("workflows", [])).items():
        if "eager" not in got or got["eager"]["status"] != "ok":
            continue
        size = f"workflow `{name}`, wall time with compiles | P = {got['eager']['P']}"
        failed = flows.failed_phases(got.get("posteriors"))
        if failed:
            # posteriors 0.0.5 fails a phase (its defects): the ratios to it
            # cover the phases it finishes; compiled against eager covers all.
            missing = ", ".join(f"`{f}`" for f in failed)
            over_eager = flows.total_seconds(got["eager"]) / flows.total_seconds(got.get("compiled"))
            lines.append(
                f"| {size} | {_ratio(got['eager'].get('speedup'))} (without {missing}: "
                f"posteriors 0.0.5 fails it) | {_ratio(got.get('compiled', {}).get('speedup'))}; "
                f"every phase: {_ratio(over_eager)} over eager |"
            )
            continue
        lines.append(
            f"| {size} | {_ratio(got['eager'].get('speedup'))} | {_ratio(got.get('compiled', {}).get('speedup'))} |"
        )
    return "\n".join(lines)


def workflow_summary(data: Dict) -> str:
    from benchmarks import workflows as flows

    return flows.summary_markdown(data.get("workflows", []))


def per_call(data: Dict) -> str:
    lines = [
        "| op | size | posteriors 0.0.5 | eager | compiled | compile s |",
        "|---|---|---|---|---|---|",
    ]
    for (op, model, n, _), got in _rows_by_case(data["results"]).items():
        ref = got.get("posteriors")
        if ref is None:
            continue
        p = next(iter(got.values()))["P"]
        cells = [f"`{op}`", _size(model, n, p), _ms(ref["median_ms"]) if ref["status"] == "ok" else ref["status"]]
        for provider in ("eager", "compiled"):
            row = got.get(provider)
            if row is None or row["status"] != "ok":
                cells.append(row["status"] if row else "—")
            else:
                cells.append(f"{_ms(row['median_ms'])} ({_ratio(row['speedup'])})")
        compile_s = got.get("compiled", {}).get("compile_s", float("nan"))
        cells.append("—" if not isinstance(compile_s, float) or math.isnan(compile_s) else f"{compile_s:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernels(data: Dict) -> str:
    lines = ["| kernel | size | baseline | providers (speedup over the baseline) |", "|---|---|---|---|"]
    for (op, model, n, _), got in _rows_by_case(data["results"]).items():
        if "posteriors" in got:
            continue
        first = next(iter(got.values()))
        base = got.get(first["baseline"])
        others = [
            f"{name} {_ratio(row['speedup'])}"
            for name, row in got.items()
            if name != first["baseline"] and row["status"] == "ok" and name != "copy"
        ]
        lines.append(
            f"| `{op}` | {_size(model, n, first['P'])} | {first['baseline']} {_ms(base['median_ms']) if base else ''} "
            f"| {', '.join(others)} |"
        )
    return "\n".join(lines)


def workflows(data: Dict) -> str:
    from benchmarks import workflows as flows

    rows = data.get("workflows", [])
    return flows.markdown(rows) if rows else "(no workflow rows in this run)"


def coldstart(data: Dict) -> str:
    from benchmarks import coldstart as cold

    rows = data.get("coldstart", [])
    return cold.markdown(rows) if rows else "(no cold-start rows in this run)"


SECTIONS: Dict[str, Callable[[Dict], str]] = {
    "environment": environment,
    "headline": headline,
    "workflow_summary": workflow_summary,
    "per_call": per_call,
    "kernels": kernels,
    "workflows": workflows,
    "coldstart": coldstart,
}


def render(text: str, data: Dict) -> str:
    """``text`` with every generated section rewritten from ``data``."""

    def replace(match):
        name = match.group(2)
        if name not in SECTIONS:
            raise KeyError(f"unknown generated section {name!r}")
        return f"{match.group(1)}{SECTIONS[name](data).rstrip()}\n{match.group(4)}"

    return MARKER.sub(replace, text)


def load(path: str = PUBLISHED) -> Dict:
    with open(path) as handle:
        return json.load(handle)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.publish", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "results.json"))
    parser.add_argument("--check", action="store_true", help="only verify the tables against the committed file")
    args = parser.parse_args(argv)
    if not args.check:
        os.makedirs(os.path.dirname(PUBLISHED), exist_ok=True)
        # Publishing the published file again (--results docs/results/full_run.json,
        # to regenerate the tables) has nothing to copy.
        if not (os.path.exists(PUBLISHED) and os.path.samefile(args.results, PUBLISHED)):
            shutil.copyfile(args.results, PUBLISHED)
    data = load()
    stale = []
    for path in TARGETS:
        with open(path) as handle:
            text = handle.read()
        new = render(text, data)
        if new != text:
            if args.check:
                stale.append(os.path.relpath(path, ROOT))
            else:
                with open(path, "w") as handle:
                    handle.write(new)
    if stale:
        print(f"tables out of date with {os.path.relpath(PUBLISHED, ROOT)}: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
