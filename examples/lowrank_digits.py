"""Diagonal-plus-low-rank posteriors on real data: how close to the dense
posterior each rank gets, and what that buys in the predictive.

A tanh MLP (64-32-10, P = 2410) classifies scikit-learn's bundled 8x8 digits.
From its MAP fit, two families of Gaussian posteriors are built with the
posteriors 0.0.5 API (``import posteriors_fast as posteriors``), each dense,
diagonal and diagonal-plus-low-rank at several ranks r:

* Laplace with the GGN precision: ``laplace.dense_ggn``, ``laplace.diag_ggn``,
  ``laplace.lowrank_ggn`` over the training set, prior precision chosen on a
  validation split for the dense one and shared by all;
* EKF: ``ekf.dense_fisher``, ``ekf.diag_fisher``, ``ekf.lowrank_fisher``, one
  pass of mini-batches from the MAP.

For each it prints accuracy, NLL and expected calibration error (ECE) of the
linearised predictive on the held-out 20% (the logits f(x; μ) + J(x)(θ − μ)
averaged in softmax over draws θ of the posterior) and the KL divergence
KL(q ‖ p_dense) to the dense posterior of the same family, computed in float64
from the precisions (D + UUᵀ for the low-rank states, formed densely: fine at
this P). It writes ``<out>/lowrank_digits.png``: KL and NLL against the rank.

    python examples/lowrank_digits.py [--quick] [--backend eager|compiled] [--out DIR]
"""

import argparse
import os
import sys
import time
from typing import Dict

import torch
from optree.integrations.torch import tree_ravel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import calibration, load_digits, minibatches, mlp, mlp_params, output_dir, progress  # noqa: E402

import posteriors_fast as posteriors  # noqa: E402

DRAWS = 100  # posterior draws per predictive
BATCH = 64


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke test): hidden width 8")
    parser.add_argument("--backend", default="eager", choices=["eager", "compiled"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    posteriors.set_backend(args.backend)
    hidden, map_epochs = (8, 10) if args.quick else (32, 40)

    train, test, classes = load_digits()
    x_test, y_test = test
    cut = int(0.9 * len(train[1]))  # the last tenth of the training split validates the prior
    valid = (train[0][cut:], train[1][cut:])
    train = (train[0][:cut], train[1][:cut])
    n_train = len(train[1])
    params = mlp_params((64, hidden, classes))
    size = sum(v.numel() for v in params.values())
    # Full rank (r = P) is the check that the low-rank state is exact; at
    # P = 2410 it needs an eigh of (N + P)² per batch, so only --quick runs it.
    ranks = [2, 16, size] if args.quick else [1, 3, 10, 30, 100, 300, 1000]

    def log_likelihood(p, batch):
        """Mean log-likelihood of the batch, logits as aux."""
        x, y = batch
        logits = mlp(p, x)
        return -torch.nn.functional.cross_entropy(logits, y), logits

    def forward(p, batch):
        return mlp(p, batch[0]), torch.tensor([])

    def outer_log_likelihood(z, batch):
        return -torch.nn.functional.cross_entropy(z, batch[1], reduction="sum")

    # MAP under a N(0, 1) prior.
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(p.values(), lr=1e-2)
    steps = map_epochs * -(-n_train // BATCH)
    for batch in progress(minibatches(train, BATCH, map_epochs), steps, "MAP"):
        optimizer.zero_grad()
        loss = -log_likelihood(p, batch)[0] + 0.5 * sum((v**2).sum() for v in p.values()) / n_train
        loss.backward()
        optimizer.step()
    params = {k: v.detach() for k, v in p.items()}

    # ---- Laplace (GGN): the data term once per structure, the prior added after.
    def laplace(module, **kwargs):
        transform = module.build(forward, outer_log_likelihood, **kwargs)
        state = transform.init(params)
        for batch in minibatches(train, BATCH):
            state = transform.update(state, batch)
        return state

    t0 = time.perf_counter()
    dense_data = laplace(posteriors.laplace.dense_ggn).prec.double()
    flat_map = tree_ravel(params)[0].double()
    eye = torch.eye(size, dtype=torch.float64)

    def valid_nll(tau):
        return _predictive(params, dense_data + tau * eye, flat_map, valid[0], valid[1])["nll"]

    prior = min([1.0, 3.0, 10.0, 30.0, 100.0], key=valid_nll)
    seconds = {"dense": time.perf_counter() - t0}
    lap = {"prior_precision": prior, "dense": _predictive(params, dense_data + prior * eye, flat_map, x_test, y_test)}
    dense_prec = dense_data + prior * eye
    t0 = time.perf_counter()
    diag = laplace(posteriors.laplace.diag_ggn, init_prec_diag=prior)
    diag_prec = torch.diag(tree_ravel(diag.prec_diag)[0].double())
    seconds["diag"] = time.perf_counter() - t0
    lap["diag"] = {
        **_predictive(params, diag_prec, flat_map, x_test, y_test),
        "kl": _kl(flat_map, diag_prec, flat_map, dense_prec),
    }
    lap["ranks"], lap["lowrank"] = ranks, []
    for rank in progress(ranks, len(ranks), "Laplace low-rank"):
        t0 = time.perf_counter()
        state = laplace(posteriors.laplace.lowrank_ggn, rank=rank, init_prec_diag=prior)
        prec = _lowrank_precision(state.prec_diag, state.prec_factor)
        seconds[f"r={rank}"] = time.perf_counter() - t0
        lap["lowrank"].append(
            {**_predictive(params, prec, flat_map, x_test, y_test), "kl": _kl(flat_map, prec, flat_map, dense_prec)}
        )

    # ---- EKF: one pass from the MAP, prior N(MAP, 0.1²).
    def ekf(module, **kwargs):
        transform = module.build(log_likelihood, lr=float(BATCH), **kwargs)
        state = transform.init(params)
        for batch in minibatches(train, BATCH):
            state = transform.update(state, batch)
        return state, tree_ravel(state.params)[0].double()

    state, dense_mean = ekf(posteriors.ekf.dense_fisher, init_cov=0.01)
    ekf_dense_prec = torch.cholesky_inverse(torch.linalg.cholesky(_symmetric(state.cov.double())))
    ek = {"dense": _predictive(state.params, ekf_dense_prec, dense_mean, x_test, y_test)}
    state, mean = ekf(posteriors.ekf.diag_fisher, init_sds=0.1)
    prec = torch.diag(tree_ravel(state.sd_diag)[0].double() ** -2)
    ek["diag"] = {
        **_predictive(state.params, prec, mean, x_test, y_test),
        "kl": _kl(mean, prec, dense_mean, ekf_dense_prec),
    }
    ek["ranks"], ek["lowrank"] = ranks, []
    for rank in progress(ranks, len(ranks), "EKF low-rank"):
        state, mean = ekf(posteriors.ekf.lowrank_fisher, rank=rank, init_cov=0.01)
        prec = _lowrank_precision(state.prec_diag, state.prec_factor)
        ek["lowrank"].append(
            {**_predictive(state.params, prec, mean, x_test, y_test), "kl": _kl(mean, prec, dense_mean, ekf_dense_prec)}
        )

    results = {"P": size, "laplace": lap, "ekf": ek}
    print(f"\ndigits, tanh MLP 64-{hidden}-10 (P = {size}), backend {args.backend}; Laplace prior precision {prior:g}")
    print(markdown(results))
    path = _plot(results, output_dir(args.out))
    print(f"wrote {path}")
    return results


def _symmetric(m: torch.Tensor) -> torch.Tensor:
    return (m + m.mT) / 2


def _lowrank_precision(prec_diag, prec_factor) -> torch.Tensor:
    """D + UUᵀ in float64, (P, P)."""
    factor = prec_factor.double()
    return torch.diag(tree_ravel(prec_diag)[0].double()) + factor @ factor.mT


def _kl(mean_q, prec_q, mean_p, prec_p) -> float:
    """KL(N(μ_q, Λ_q⁻¹) ‖ N(μ_p, Λ_p⁻¹)) in float64:
    ½[tr(Λ_p Λ_q⁻¹) − P + (μ_q − μ_p)ᵀ Λ_p (μ_q − μ_p) + ln|Λ_q| − ln|Λ_p|]."""
    chol_q = torch.linalg.cholesky(_symmetric(prec_q))
    chol_p = torch.linalg.cholesky(_symmetric(prec_p))
    # tr(Λ_p Λ_q⁻¹) = ‖L_q⁻¹ L_p‖²_F with Λ = L Lᵀ.
    trace = torch.linalg.solve_triangular(chol_q, chol_p, upper=False).square().sum()
    delta = mean_q - mean_p
    mahalanobis = (chol_p.mT @ delta).square().sum()
    logdet = 2 * (chol_q.diagonal().log().sum() - chol_p.diagonal().log().sum())
    return float(0.5 * (trace - prec_q.shape[0] + mahalanobis + logdet))


def _predictive(params, prec: torch.Tensor, flat_mean: torch.Tensor, x, y) -> Dict:
    """Calibration of the linearised predictive: the softmax of
    f(x; μ) + J(x) δ averaged over DRAWS draws δ ~ N(0, Λ⁻¹)."""
    flat, unravel = tree_ravel(params)
    jac = torch.func.jacrev(lambda fp: mlp(unravel(fp), x))(flat).reshape(-1, flat.numel()).double()
    chol = torch.linalg.cholesky(_symmetric(prec))
    noise = torch.randn(flat.numel(), DRAWS, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    deltas = torch.linalg.solve_triangular(chol.mT, noise, upper=True)  # Cov = Λ⁻¹
    logits = mlp(unravel(flat_mean.to(flat.dtype)), x).double()
    draws = logits[None] + (jac @ deltas).mT.reshape(DRAWS, *logits.shape)
    got = calibration(torch.softmax(draws, -1).mean(0).float(), y)
    return {k: got[k] for k in ("acc", "nll", "ece")}


def markdown(results: Dict) -> str:
    lines = ["| family | structure | KL to dense | accuracy | NLL | ECE |", "|---|---|---:|---:|---:|---:|"]
    for family, name in (("laplace", "Laplace GGN"), ("ekf", "EKF")):
        got = results[family]
        rows = [("dense", got["dense"], 0.0), ("diagonal", got["diag"], got["diag"]["kl"])]
        rows += [(f"rank {r}", row, row["kl"]) for r, row in zip(got["ranks"], got["lowrank"])]
        for label, row, kl in rows:
            lines.append(f"| {name} | {label} | {kl:.3g} | {row['acc']:.3f} | {row['nll']:.3f} | {row['ece']:.3f} |")
    return "\n".join(lines)


def _plot(results: Dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_kl, ax_nll) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for family, name, color in (("laplace", "Laplace GGN", "C0"), ("ekf", "EKF", "C1")):
        got = results[family]
        ranks = got["ranks"]
        kl = [max(row["kl"], 1e-6) for row in got["lowrank"]]  # below 1e-6: drawn at 1e-6 (log axis)
        ax_kl.loglog(ranks, kl, "o-", color=color, label=f"{name}, diagonal + rank r")
        ax_kl.axhline(got["diag"]["kl"], color=color, linestyle="--", linewidth=1, label=f"{name}, diagonal")
        ax_nll.semilogx(ranks, [row["nll"] for row in got["lowrank"]], "o-", color=color, label=f"{name}, rank r")
        ax_nll.axhline(got["diag"]["nll"], color=color, linestyle="--", linewidth=1, label=f"{name}, diagonal")
        ax_nll.axhline(got["dense"]["nll"], color=color, linestyle=":", linewidth=1, label=f"{name}, dense")
    ax_kl.set_xlabel("rank r")
    ax_kl.set_ylabel("KL(q ‖ dense posterior)")
    ax_kl.set_title(f"Distance to the dense posterior (P = {results['P']})", fontsize=10)
    ax_nll.set_xlabel("rank r")
    ax_nll.set_ylabel("test NLL (linearised predictive)")
    ax_nll.set_title("Held-out negative log-likelihood", fontsize=10)
    for ax in (ax_kl, ax_nll):
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, "lowrank_digits.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
