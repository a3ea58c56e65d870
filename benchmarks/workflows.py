"""End-to-end workflows on scikit-learn's bundled data, as a user runs them.

One workflow is a script written once against the posteriors 0.0.5 API and
run by a provider: ``posteriors`` (the reference), ``eager`` or ``compiled``
(``import posteriors_fast as posteriors`` with that default backend). The
parent (``python -m benchmarks``) runs each (workflow, provider) in a fresh
Python process, so the wall time includes everything a user's run pays:
imports, first calls and every compile. The child prints one JSON line with
the wall time of each phase and its accuracy and NLL on held-out data, so a
speedup never hides a change in the results.

``python -m benchmarks.workflows <workflow> <provider>`` runs one child.

Workflows (tanh MLPs, data standardised, 80/20 split with a fixed seed):

* ``breast_cancer`` / ``digits``: MAP with ``torch.optim.Adam``; then from the
  MAP ``laplace.diag_fisher`` with a linearised predictive
  (``linearized_forward_diag``), ``laplace.dense_fisher``, ``ekf.diag_fisher``
  and ``ekf.dense_fisher`` over one epoch of mini-batches, ``vi.diag``
  (300 steps) and an ``sgmcmc.sghmc`` chain (300 steps).
* ``sghmc_long``: a 100,000-step SGHMC chain on digits.
* ``ekf_dense_long``: 50 epochs of ``ekf.dense_fisher`` on digits.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple, Union

import torch
from optree.integrations.torch import tree_ravel

PROVIDERS = ("posteriors", "eager", "compiled")


@dataclass(frozen=True)
class Workflow:
    data: str
    hidden: int
    phases: Tuple[str, ...]
    long: bool = False  # part of --full only
    sghmc_steps: int = 300
    ekf_epochs: int = 1
    map_epochs: int = 30
    vi_steps: int = 300


SHORT_PHASES = ("map", "laplace_diag", "laplace_dense", "ekf_diag", "ekf_dense", "vi_diag", "sghmc")

WORKFLOWS: Dict[str, Workflow] = {
    "breast_cancer": Workflow("breast_cancer", 32, SHORT_PHASES),
    "digits": Workflow("digits", 32, SHORT_PHASES),
    "sghmc_long": Workflow("digits", 32, ("map", "sghmc"), long=True, sghmc_steps=100_000),
    "ekf_dense_long": Workflow("digits", 32, ("map", "ekf_dense"), long=True, ekf_epochs=50),
}

BATCH = 64
PRIOR_SD = 1.0
SAMPLES = 100  # posterior draws for each predictive


def _optree_alias() -> None:
    """posteriors 0.0.5 imports optree.integration.torch, renamed since."""
    import optree
    import optree.integrations
    import optree.integrations.torch

    sys.modules.setdefault("optree.integration", optree.integrations)
    sys.modules.setdefault("optree.integration.torch", optree.integrations.torch)


def library(provider: str):
    if provider == "posteriors":
        _optree_alias()
        import posteriors

        return posteriors
    import posteriors_fast

    posteriors_fast.set_backend(provider)
    return posteriors_fast


def load(name: str, seed: int = 0):
    """Standardised train/test tensors of a bundled scikit-learn data set."""
    from sklearn import datasets

    bunch = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    mean, sd = x[:cut].mean(0), x[:cut].std(0).clamp_min(1e-6)
    x = (x - mean) / sd
    return (x[:cut], y[:cut]), (x[cut:], y[cut:]), int(y.max()) + 1


def init_params(inputs: int, hidden: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "w0": torch.randn(inputs, hidden, generator=g) / inputs**0.5,
        "b0": torch.zeros(hidden),
        "w1": torch.randn(hidden, classes, generator=g) / hidden**0.5,
        "b1": torch.zeros(classes),
    }


def forward(params, x):
    return torch.tanh(x @ params["w0"] + params["b0"]) @ params["w1"] + params["b1"]


def batches(train, epochs: int = 1, seed: int = 1):
    x, y = train
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), BATCH):
            idx = order[start : start + BATCH]
            yield x[idx], y[idx]


def scores(probs: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    """Accuracy and mean negative log-likelihood of predictive probabilities."""
    nll = -torch.log(probs.gather(1, y[:, None]).clamp_min(1e-12)).mean()
    return {"acc": float((probs.argmax(1) == y).float().mean()), "nll": float(nll)}


def sampled_predictive(draws, x) -> torch.Tensor:
    """Mean softmax over posterior draws (leading dimension of each leaf)."""
    logits = torch.func.vmap(lambda p: forward(p, x))(draws)
    return torch.softmax(logits, -1).mean(0)


def run(workflow: Workflow, provider: str) -> Dict:
    started = time.perf_counter()
    posteriors = library(provider)
    torch.manual_seed(0)
    train, test, classes = load(workflow.data)
    n_train = len(train[1])
    x_test, y_test = test
    params = init_params(train[0].shape[1], workflow.hidden, classes)
    size = sum(p.numel() for p in params.values())

    def log_prior(p):
        return -0.5 * sum((v**2).sum() for v in p.values()) / PRIOR_SD**2

    def log_likelihood(p, batch):
        """Mean log-likelihood of the batch (posteriors' convention)."""
        x, y = batch
        logits = forward(p, x)
        return -torch.nn.functional.cross_entropy(logits, y), logits

    def log_posterior(p, batch):
        """Per-datum scale: mean log-likelihood + log prior / n_train."""
        value, logits = log_likelihood(p, batch)
        return value + log_prior(p) / n_train, logits

    def forward_fn(p, batch):
        return forward(p, batch[0]), torch.tensor([])

    phases: Dict[str, Dict] = {}

    def timed(name: str, fn: Callable[[], Dict]) -> None:
        t0 = time.perf_counter()
        result = fn()
        phases[name] = {"s": time.perf_counter() - t0, **result}

    def fit_map():
        nonlocal params
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        opt = torch.optim.Adam(p.values(), lr=1e-2)
        for batch in batches(train, epochs=workflow.map_epochs):
            opt.zero_grad()
            (-log_posterior(p, batch)[0]).backward()
            opt.step()
        params = {k: v.detach() for k, v in p.items()}
        return scores(torch.softmax(forward(params, x_test), -1), y_test)

    def laplace_diag():
        transform = posteriors.laplace.diag_fisher.build(log_likelihood, init_prec_diag=1 / PRIOR_SD**2)
        state = transform.init(params)
        for batch in batches(train):
            state = transform.update(state, batch)
        sd = posteriors.tree_utils.tree_map(lambda v: v**-0.5, state.prec_diag)
        mean, chol, _ = posteriors.linearized_forward_diag(forward_fn, state.params, (x_test, y_test), sd)
        noise = torch.randn(SAMPLES, *mean.shape, generator=torch.Generator().manual_seed(2))
        logits = mean + torch.einsum("nij,snj->sni", chol, noise)
        return scores(torch.softmax(logits, -1).mean(0), y_test)

    def laplace_dense():
        transform = posteriors.laplace.dense_fisher.build(log_likelihood, init_prec=1 / PRIOR_SD**2)
        state = transform.init(params)
        for batch in batches(train):
            state = transform.update(state, batch)
        # One flat leaf: posteriors 0.0.5's dense sample reshapes multi-dimensional leaves wrongly.
        flat, unravel = tree_ravel(state.params)
        draws = posteriors.laplace.dense_fisher.sample(state._replace(params=flat), (SAMPLES,))
        return scores(sampled_predictive(torch.func.vmap(unravel)(draws), x_test), y_test)

    def ekf_diag():
        transform = posteriors.ekf.diag_fisher.build(log_likelihood, lr=float(BATCH), init_sds=0.1)
        state = transform.init(params)
        for batch in batches(train, epochs=workflow.ekf_epochs):
            state = transform.update(state, batch)
        draws = posteriors.ekf.diag_fisher.sample(state, (SAMPLES,))
        return scores(sampled_predictive(draws, x_test), y_test)

    def ekf_dense():
        transform = posteriors.ekf.dense_fisher.build(log_likelihood, lr=float(BATCH), init_cov=0.01)
        state = transform.init(params)
        for batch in batches(train, epochs=workflow.ekf_epochs):
            state = transform.update(state, batch)
        draws = posteriors.ekf.dense_fisher.sample(state, (SAMPLES,))
        return scores(sampled_predictive(draws, x_test), y_test)

    def vi_diag():
        import torchopt

        transform = posteriors.vi.diag.build(
            log_posterior, torchopt.adam(lr=1e-2), temperature=1 / n_train, init_log_sds=-3.0
        )
        state = transform.init(params)
        for _, batch in zip(range(workflow.vi_steps), batches(train, epochs=10**6)):
            state = transform.update(state, batch)
        draws = posteriors.vi.diag.sample(state, (SAMPLES,))
        return scores(sampled_predictive(draws, x_test), y_test)

    def sghmc():
        transform = posteriors.sgmcmc.sghmc.build(log_posterior, lr=1e-2, alpha=10.0, temperature=1 / n_train)
        state = transform.init(params)
        kept = []
        thin = max(1, workflow.sghmc_steps // SAMPLES)
        for step, batch in zip(range(workflow.sghmc_steps), batches(train, epochs=10**6)):
            state = transform.update(state, batch)
            if step % thin == thin - 1:
                kept.append({k: v.clone() for k, v in state.params.items()})
        draws = {k: torch.stack([d[k] for d in kept]) for k in kept[0]}
        return scores(sampled_predictive(draws, x_test), y_test)

    steps = {
        "map": fit_map,
        "laplace_diag": laplace_diag,
        "laplace_dense": laplace_dense,
        "ekf_diag": ekf_diag,
        "ekf_dense": ekf_dense,
        "vi_diag": vi_diag,
        "sghmc": sghmc,
    }
    setup_s = time.perf_counter() - started
    for name in workflow.phases:
        try:
            timed(name, steps[name])
        except Exception as err:  # the reference's defects: reported, not fatal
            phases[name] = {"s": float("nan"), "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    compile_s, compiles = _compile_stats(provider)
    return {
        "provider": provider,
        "P": size,
        "n_train": n_train,
        "setup_s": setup_s,
        "phases": phases,
        "total_s": sum(v["s"] for v in phases.values() if not math.isnan(v["s"])),
        "compile_s": compile_s,
        "compiles": compiles,
    }


def _compile_stats(provider: str) -> Tuple[float, int]:
    if provider == "posteriors":
        return 0.0, 0
    from posteriors_fast.backends import compile_policy

    stats = compile_policy.stats()
    return stats["compile_s"], stats["compiles"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.workflows")
    parser.add_argument("workflow", choices=sorted(WORKFLOWS))
    parser.add_argument("provider", choices=PROVIDERS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(json.dumps(run(WORKFLOWS[args.workflow], args.provider)))
    return 0


# ---------------------------------------------------------------------------
# The parent side: fresh processes, interleaved providers, medians.


def run_child(name: str, provider: str, threads: int, env: Dict[str, str], timeout_s: float = 900.0) -> Dict:
    """One (workflow, provider) in a fresh process; adds ``process_s``, the
    wall time of the whole process (interpreter start and imports included)."""
    import subprocess

    command = [sys.executable, "-m", "benchmarks.workflows", name, provider, "--threads", str(threads)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, cwd=root, env={**os.environ, **env}
        )
    except subprocess.TimeoutExpired:
        return {"provider": provider, "status": "DNF", "note": f"took over {timeout_s:.0f} s"}
    elapsed = time.perf_counter() - t0
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"provider": provider, "status": "error", "note": tail}
    result = json.loads(lines[-1])
    result.update(status="ok", process_s=elapsed)
    return result


#: Fresh processes per (workflow, provider) with ``--full``. The short rows
#: take seconds, where this shared host's noise is a tenth or more of a run:
#: the MAP fit, the same torch.optim code for every provider, varied by 0.4 s
#: between processes. With four warm rounds, one run's median put compiled at
#: 1.11x eager's time on breast_cancer, where six alternating pairs of
#: processes on a quiet host gave 0.96-1.01x; so the short rows take eight
#: warm rounds. A long row's tens of seconds average the noise out within
#: the run.
FULL_ROUNDS = {"short": 9, "long": 3}


def full_rounds(names) -> Dict[str, int]:
    """``FULL_ROUNDS`` for each workflow of ``names``."""
    return {name: FULL_ROUNDS["long" if WORKFLOWS[name].long else "short"] for name in names}


def measure_workflows(
    names, providers, rounds: Union[int, Dict[str, int]], threads: int, cache_dir: str, log=print
) -> List[Dict]:
    """Every (workflow, provider) ``rounds`` times (or ``rounds[name]``),
    providers rotated per round; returns one summary row per (workflow,
    provider) with the medians.

    The compiled provider's caches (torch inductor's on-disk caches and the
    library's compile-cost estimates) live under ``cache_dir``, which the
    caller empties first: round 1 runs with cold caches, later rounds with the
    caches the earlier ones left, as a user's second run of a script would.
    With two rounds or more, the medians are over the later rounds (every
    provider alike) and round 1 is reported on its own (``cold_process_s``,
    ``cold_compile_s``): a median over one cold and two warm rounds is the
    slower warm round for the compiled provider and the middle one for the
    others.
    """
    env = {
        "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, "inductor"),
        "POSTERIORS_FAST_CACHE_DIR": os.path.join(cache_dir, "posteriors_fast"),
    }
    rows = []
    for name in names:
        runs: Dict[str, List[Dict]] = {p: [] for p in providers}
        count = rounds[name] if isinstance(rounds, dict) else rounds
        for r in range(count):
            order = providers[r % len(providers) :] + providers[: r % len(providers)]
            for provider in order:
                runs[provider].append(run_child(name, provider, threads, env))
        firsts = [next((x for x in runs[p] if x.get("status") == "ok"), runs[p][0]) for p in providers]
        common = _common_phases(firsts)
        for provider in providers:
            # A round counts when its process finished and every common phase
            # completed in it; the others are dropped (and counted), so one
            # failed round cannot turn a median into NaN.
            counted = runs[provider][1:] if count > 1 else runs[provider]
            ok = [x for x in counted if _completed(x, common)]
            row = {"workflow": name, "provider": provider, "rounds": len(ok), "failed_rounds": len(counted) - len(ok)}
            if not ok and count > 1 and _completed(runs[provider][0], common):
                ok = runs[provider][:1]  # every later round failed: round 1, marked as such
                row["cold_only"] = True
            if not ok:
                first = runs[provider][0]
                note = first.get("note", "") or "a common phase failed in every round"
                row.update(status=first.get("status", "error") if first.get("status") != "ok" else "error", note=note)
                rows.append(row)
                continue
            row.update(
                status="ok",
                P=ok[0]["P"],
                process_s=statistics.median(x["process_s"] for x in ok),
                cold_process_s=runs[provider][0].get("process_s", float("nan")),
                cold_compile_s=runs[provider][0].get("compile_s", float("nan")),
                common_s=statistics.median(sum(x["phases"][p]["s"] for p in common) for x in ok),
                compile_s=statistics.median(x["compile_s"] for x in ok),
                compiles=ok[-1]["compiles"],
                phases={phase: _phase_median(ok, phase) for phase in ok[-1]["phases"]},
                common=common,
            )
            rows.append(row)
        base = next((x for x in rows if x["workflow"] == name and x["provider"] == "posteriors"), None)
        for row in rows:
            if row["workflow"] == name and row["status"] == "ok":
                row["speedup"] = base["common_s"] / row["common_s"] if base and base["status"] == "ok" else float("nan")
        eager = next((x for x in rows if x["workflow"] == name and x["provider"] == "eager"), None)
        for row in rows:
            if row["workflow"] == name and row["status"] == "ok" and eager and eager["status"] == "ok":
                row["vs_eager"] = row["common_s"] / eager["common_s"]
        log(_summary_line(name, [x for x in rows if x["workflow"] == name]))
    return rows


def _completed(result: Dict, common: List[str]) -> bool:
    """Whether a child finished and completed every phase of ``common``."""
    if result.get("status") != "ok":
        return False
    phases = result["phases"]
    return all(p in phases and "error" not in phases[p] and math.isfinite(phases[p]["s"]) for p in common)


def _phase_median(results: List[Dict], phase: str) -> Dict:
    """A phase's median time over the rounds that completed it, with the last
    such round's scores; the last round's error when none did (a phase the
    reference fails, outside the common ones)."""
    done = [x["phases"][phase] for x in results if phase in x["phases"] and "error" not in x["phases"][phase]]
    if not done:
        return results[-1]["phases"][phase]
    return {**done[-1], "s": statistics.median(d["s"] for d in done)}


def _common_phases(results: List[Dict]) -> List[str]:
    """Phases every provider completed (the reference fails some, its defects)."""
    ok = [x for x in results if x.get("status") == "ok"]
    if not ok:
        return []
    names = list(ok[0]["phases"])
    return [p for p in names if all("error" not in x["phases"].get(p, {"error": 1}) for x in ok)]


def _summary_line(name: str, rows: List[Dict]) -> str:
    parts = []
    for row in rows:
        if row["status"] != "ok":
            parts.append(f"{row['provider']} {row['status']}")
            continue
        failed = f", {row['failed_rounds']} failed rounds dropped" if row.get("failed_rounds") else ""
        parts.append(
            f"{row['provider']} {row['common_s']:.2f} s (process {row['process_s']:.1f} s, "
            f"compile {row['compile_s']:.1f} s, {row.get('speedup', float('nan')):.2f}x{failed})"
        )
    return f"workflow {name}: " + ", ".join(parts)


def _cold(row: Dict) -> str:
    """Round 1's process seconds, with its compile seconds when it compiled."""
    compiled = row.get("cold_compile_s", 0.0)
    extra = f" (compile {compiled:.1f})" if isinstance(compiled, float) and compiled > 0.05 else ""
    return _seconds(row["cold_process_s"]) + extra


def markdown(rows: List[Dict]) -> str:
    """Two tables: wall times with ratios, and the results of each phase."""
    head = (
        "| workflow | P | provider | phases s | process s | first process s, cold caches | compile s "
        "| speedup vs reference | time / eager |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['workflow']} | | {row['provider']} | {row['status']}: {row.get('note', '')} |||||")
            continue
        provider = row["provider"]
        if row.get("cold_only"):
            provider += " (every later round failed: round 1, cold caches, only)"
        elif row.get("failed_rounds"):
            provider += f" ({row['failed_rounds']} of {row['rounds'] + row['failed_rounds']} rounds failed, dropped)"
        lines.append(
            f"| {row['workflow']} | {row['P']} | {provider} | {row['common_s']:.2f} | {row['process_s']:.1f} "
            f"| {_cold(row)} | {row['compile_s']:.1f} | {_ratio(row.get('speedup'))} "
            f"| {_ratio(row.get('vs_eager'))} |"
        )
    lines += ["", "| workflow | provider | " + " | ".join(SHORT_PHASES) + " |"]
    lines.append("|---|---|" + "---|" * len(SHORT_PHASES))
    for row in rows:
        if row["status"] != "ok":
            continue
        cells = []
        for phase in SHORT_PHASES:
            got = row["phases"].get(phase)
            if got is None:
                cells.append("")
            elif "error" in got:
                cells.append("error")
            else:
                cells.append(f"{got['s']:.2f} s, acc {got['acc']:.3f}, NLL {got['nll']:.3f}")
        lines.append(f"| {row['workflow']} | {row['provider']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_workflow(rows: List[Dict]) -> Dict[str, Dict[str, Dict]]:
    """Summary rows as ``{workflow: {provider: row}}``, in order."""
    flows: Dict[str, Dict[str, Dict]] = {}
    for row in rows:
        flows.setdefault(row["workflow"], {})[row["provider"]] = row
    return flows


def failed_phases(row) -> List[str]:
    """The phases a summary row's provider failed (none for a failed row)."""
    if not row or row.get("status") != "ok":
        return []
    return [name for name, phase in row.get("phases", {}).items() if phase.get("error")]


def total_seconds(row) -> float:
    """Seconds over every phase of a summary row (NaN when one failed)."""
    if not row or row.get("status") != "ok":
        return float("nan")
    return sum(phase.get("s", float("nan")) for phase in row["phases"].values())


def summary_markdown(rows: List[Dict]) -> str:
    """One row per workflow: each provider's seconds over every phase it
    completed (the sum of the phases' medians over the warm rounds, compiles
    included), compiled against eager over all phases, the compiled
    process's compile seconds (warm rounds; round 1, with cold caches, in
    brackets), and each provider's test accuracy and NLL after the
    workflow's last phase."""
    lines = [
        "| workflow | P | posteriors 0.0.5 | eager | compiled | compiled / eager | compile s "
        "| last phase: accuracy, NLL (posteriors 0.0.5 · eager · compiled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, got in by_workflow(rows).items():
        eager, compiled = got.get("eager"), got.get("compiled")
        if not eager or eager.get("status") != "ok":
            continue
        cells, results = [], []
        last = list(eager["phases"])[-1]
        for provider in ("posteriors", "eager", "compiled"):
            row = got.get(provider)
            if not row or row.get("status") != "ok":
                cells.append(row.get("status", "—") if row else "—")
                results.append("—")
                continue
            failed = ", ".join(f"`{phase}`" for phase in failed_phases(row))
            done = sum(phase.get("s", math.nan) for phase in row["phases"].values() if not phase.get("error"))
            cells.append(f"{_seconds(done, 2)} s" + (f" (fails {failed})" if failed else ""))
            results.append(_accuracy(row["phases"].get(last)))
        ratio = total_seconds(compiled) / total_seconds(eager) if compiled else math.nan
        compile_s = _seconds(compiled.get("compile_s") if compiled else None)
        cold = _seconds(compiled.get("cold_compile_s") if compiled else None)
        lines.append(
            f"| {name} | {eager['P']} | {' | '.join(cells)} | "
            f"{'—' if math.isnan(ratio) else f'{ratio:.2f}x the time'} | "
            f"{compile_s} (cold caches: {cold}) | `{last}`: {' · '.join(results)} |"
        )
    return "\n".join(lines)


def _accuracy(phase) -> str:
    """``"acc, nll"`` of a phase's result; "error" when it failed, "—" when
    it is missing or not finite."""
    if phase is None:
        return "—"
    if phase.get("error"):
        return "error"
    acc, nll = phase.get("acc", math.nan), phase.get("nll", math.nan)
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (acc, nll)):
        return "—"
    return f"{acc:.3f}, {nll:.3f}"


def _seconds(value, digits: int = 1) -> str:
    return "—" if not isinstance(value, (int, float)) or math.isnan(value) else f"{value:.{digits}f}"


def _ratio(value) -> str:
    if not isinstance(value, float) or math.isnan(value):
        return "—"
    return f"{value:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
