"""Calibration on real data: MAP against Laplace, EKF, VI and SG-MCMC.

A tanh MLP (64-32-10) classifies scikit-learn's bundled 8x8 digits. From its
MAP fit, four approximate posteriors are built with the posteriors 0.0.5 API
(``import posteriors_fast as posteriors``):

* Laplace: ``laplace.diag_fisher`` over the training set, with the linearised
  predictive (``linearized_forward_diag``) and the prior precision chosen on
  a validation split (a Laplace approximation is only as good as its prior:
  with the MAP's weak N(0, 1) prior it is far too wide);
* EKF: ``ekf.diag_fisher``, one pass over the training set in mini-batches;
* VI: ``vi.diag``, a diagonal Gaussian fitted by Adam on the negative ELBO;
* SG-MCMC: an ``sgmcmc.sghmc`` chain, thinned.

Each predictive averages the softmax over posterior draws. The script prints
accuracy, negative log-likelihood (NLL) and expected calibration error (ECE)
on the held-out 20%, and writes a reliability diagram to
``<out>/calibration.png``.

    python examples/calibration.py [--quick] [--backend eager|compiled] [--out DIR]
"""

import argparse
import os
import sys
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import calibration, load_digits, minibatches, mlp, mlp_params, output_dir, progress  # noqa: E402

import posteriors_fast as posteriors  # noqa: E402

DRAWS = 100  # posterior draws per predictive
BATCH = 64


def main(argv=None) -> Dict[str, Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke test)")
    parser.add_argument("--backend", default="compiled", choices=["eager", "compiled"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    posteriors.set_backend(args.backend)
    map_epochs, vi_steps, chain = (8, 100, 300) if args.quick else (40, 600, 3000)

    train, test, classes = load_digits()
    x_test, y_test = test
    cut = int(0.9 * len(train[1]))  # the last tenth of the training split validates the Laplace prior
    valid = (train[0][cut:], train[1][cut:])
    train = (train[0][:cut], train[1][:cut])
    n_train = len(train[1])
    params = mlp_params((64, 32, classes))

    def log_prior(p):
        return -0.5 * sum((v**2).sum() for v in p.values())  # N(0, 1) on every weight

    def log_likelihood(p, batch):
        """Mean log-likelihood of the batch, logits as aux."""
        x, y = batch
        logits = mlp(p, x)
        return -torch.nn.functional.cross_entropy(logits, y), logits

    def log_posterior(p, batch):
        """Per datum: mean log-likelihood + log prior / n (posteriors' convention)."""
        value, logits = log_likelihood(p, batch)
        return value + log_prior(p) / n_train, logits

    def predictive(draws):
        """Mean softmax over draws (a leading dimension on every leaf)."""
        logits = torch.func.vmap(lambda p: mlp(p, x_test))(draws)
        return torch.softmax(logits, -1).mean(0)

    results, seconds = {}, {}

    # MAP.
    t0 = time.perf_counter()
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    optimizer = torch.optim.Adam(p.values(), lr=1e-2)
    steps = map_epochs * -(-n_train // BATCH)
    for batch in progress(minibatches(train, BATCH, map_epochs), steps, "MAP"):
        optimizer.zero_grad()
        (-log_posterior(p, batch)[0]).backward()
        optimizer.step()
    params = {k: v.detach() for k, v in p.items()}
    results["MAP"] = calibration(torch.softmax(mlp(params, x_test), -1), y_test)
    seconds["MAP"] = time.perf_counter() - t0

    # Laplace with the linearised predictive; prior precision by validation NLL.
    t0 = time.perf_counter()
    transform = posteriors.laplace.diag_fisher.build(log_likelihood, init_prec_diag=0.0)
    state = transform.init(params)
    for batch in minibatches(train, BATCH):
        state = transform.update(state, batch)

    def forward(p, x):
        return mlp(p, x), torch.tensor([])

    def linearised(prior_prec, x):
        sd = posteriors.tree_utils.tree_map(lambda fisher: (fisher + prior_prec) ** -0.5, state.prec_diag)
        mean, chol, _ = posteriors.linearized_forward_diag(forward, state.params, x, sd)
        noise = torch.randn(DRAWS, *mean.shape, generator=torch.Generator().manual_seed(1))
        return torch.softmax(mean + torch.einsum("nij,snj->sni", chol, noise), -1).mean(0)

    grid = [1.0, 10.0, 100.0, 1000.0, 10000.0]
    prior_prec = min(grid, key=lambda tau: calibration(linearised(tau, valid[0]), valid[1])["nll"])
    results["Laplace"] = calibration(linearised(prior_prec, x_test), y_test)
    seconds["Laplace"] = time.perf_counter() - t0

    # EKF: one pass of mini-batches from the MAP, prior N(MAP, 0.1²).
    t0 = time.perf_counter()
    transform = posteriors.ekf.diag_fisher.build(log_likelihood, lr=float(BATCH), init_sds=0.1)
    state = transform.init(params)
    for batch in minibatches(train, BATCH):
        state = transform.update(state, batch)
    results["EKF"] = calibration(predictive(posteriors.ekf.diag_fisher.sample(state, (DRAWS,))), y_test)
    seconds["EKF"] = time.perf_counter() - t0

    # VI.
    import torchopt

    t0 = time.perf_counter()
    transform = posteriors.vi.diag.build(
        log_posterior, torchopt.adam(lr=1e-2), temperature=1 / n_train, init_log_sds=-3.0
    )
    state = transform.init(params)
    batches = minibatches(train, BATCH, epochs=10**6)
    for _ in progress(range(vi_steps), vi_steps, "VI"):
        state = transform.update(state, next(batches))
    results["VI"] = calibration(predictive(posteriors.vi.diag.sample(state, (DRAWS,))), y_test)
    seconds["VI"] = time.perf_counter() - t0

    # SG-MCMC: an SGHMC chain from the MAP, every chain/DRAWS-th state kept.
    t0 = time.perf_counter()
    transform = posteriors.sgmcmc.sghmc.build(log_posterior, lr=1e-2, alpha=10.0, temperature=1 / n_train)
    state = transform.init(params)
    kept, thin = [], chain // DRAWS
    batches = minibatches(train, BATCH, epochs=10**6)
    for step in progress(range(chain), chain, "SGHMC"):
        state = transform.update(state, next(batches))
        if step % thin == thin - 1:
            kept.append({k: v.clone() for k, v in state.params.items()})
    draws = {k: torch.stack([d[k] for d in kept]) for k in kept[0]}
    results["SG-MCMC"] = calibration(predictive(draws), y_test)
    seconds["SG-MCMC"] = time.perf_counter() - t0

    print(f"\ndigits, tanh MLP 64-32-10 (P = {sum(v.numel() for v in params.values())}), backend {args.backend}")
    print("| method | accuracy | NLL | ECE | seconds |\n|---|---|---|---|---|")
    for name, got in results.items():
        print(f"| {name} | {got['acc']:.3f} | {got['nll']:.3f} | {got['ece']:.3f} | {seconds[name]:.1f} |")
    path = _plot(results, output_dir(args.out))
    print(f"wrote {path}")
    return results


def _plot(results: Dict[str, Dict], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), sharey=True)
    for ax, (name, got) in zip(axes, results.items()):
        conf = [c for c, _, _ in got["curve"]]
        acc = [a for _, a, _ in got["curve"]]
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.bar(conf, acc, width=0.08, alpha=0.7, edgecolor="black")
        ax.set_title(f"{name}\nNLL {got['nll']:.3f}, ECE {got['ece']:.3f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    fig.suptitle("Reliability on held-out digits (bars: accuracy per confidence bin)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "calibration.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
