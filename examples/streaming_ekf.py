"""Online learning with an extended Kalman filter: the posterior tightens as
data arrives.

Noisy observations of y = sin(3x) + 0.3·x arrive in small batches, at inputs
drawn from [-2, 2]. A tanh MLP (1-32-1, P = 97) is updated once per batch by
``ekf.dense_fisher`` with a per-sample Gaussian log-likelihood
(``per_sample=True``) and a little transition noise, so the filter keeps
learning. After a few checkpoints the script draws the linearised predictive,

$$ y(x) \\sim N\\big(f(x; μ),\\; J(x) Σ J(x)ᵀ + σ^2\\big), $$

with μ and Σ the filter's mean and covariance and J(x) the Jacobian of the
network output at x, and writes ``<out>/streaming_ekf.png``: the mean follows
the data as it arrives and the band narrows towards the noise level σ where
data has been seen. Outside [-2, 2] the band narrows too, while the mean no
longer follows the truth there: the linearised posterior of a small tanh
network is overconfident away from the data, a known limitation of this
family of approximations worth seeing once.

    python examples/streaming_ekf.py [--quick] [--backend eager|compiled] [--out DIR]
"""

import argparse
import os
import sys
from typing import Dict, List

import torch
from optree.integrations.torch import tree_ravel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import mlp, mlp_params, output_dir, progress  # noqa: E402

import posteriors_fast as posteriors  # noqa: E402

NOISE = 0.1  # observation noise standard deviation σ
BATCH = 8


def truth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(3 * x) + 0.3 * x


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings (a smoke test)")
    parser.add_argument("--backend", default="compiled", choices=["eager", "compiled"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    posteriors.set_backend(args.backend)
    batches = 64 if args.quick else 400
    checkpoints = sorted({1, 4, batches // 4, batches})

    params = mlp_params((1, 32, 1))

    def log_likelihood(p, batch):
        """One Gaussian log-likelihood per observation (per_sample=True)."""
        x, y = batch
        mean = mlp(p, x).squeeze(-1)
        return torch.distributions.Normal(mean, NOISE).log_prob(y), mean

    # lr = batch size: each update adds the batch's whole Fisher, J^T J, to the
    # precision, as a Bayesian update on those observations would.
    transform = posteriors.ekf.dense_fisher.build(
        log_likelihood, lr=float(BATCH), per_sample=True, init_cov=1.0, transition_cov=1e-5
    )
    state = transform.init(params)
    grid = torch.linspace(-3, 3, 121)[:, None]
    inside = grid[:, 0].abs() <= 2
    seen_x: List[torch.Tensor] = []
    seen_y: List[torch.Tensor] = []
    snapshots = []
    g = torch.Generator().manual_seed(1)
    for step in progress(range(1, batches + 1), batches, "EKF batches"):
        x = 4 * torch.rand(BATCH, 1, generator=g) - 2
        y = truth(x[:, 0]) + NOISE * torch.randn(BATCH, generator=g)
        state = transform.update(state, (x, y))
        seen_x.append(x[:, 0])
        seen_y.append(y)
        if step in checkpoints:
            mean, sd = _predictive(state, grid)
            snapshots.append(
                {
                    "seen": step * BATCH,
                    "mean": mean,
                    "sd": sd,
                    "x": torch.cat(seen_x),
                    "y": torch.cat(seen_y),
                    "rmse_inside": float(((mean - truth(grid[:, 0]))[inside] ** 2).mean().sqrt()),
                    "sd_inside": float(sd[inside].mean()),
                    "sd_outside": float(sd[~inside].mean()),
                }
            )
    print("| observations | RMSE of the mean on [-2, 2] | mean predictive sd on [-2, 2] | outside |")
    print("|---|---|---|---|")
    for snap in snapshots:
        print(f"| {snap['seen']} | {snap['rmse_inside']:.3f} | {snap['sd_inside']:.3f} | {snap['sd_outside']:.3f} |")
    path = _plot(snapshots, grid, output_dir(args.out))
    print(f"wrote {path}")
    return {"snapshots": [{k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for s in snapshots]}


def _predictive(state, grid: torch.Tensor):
    """Linearised predictive mean and standard deviation of y at ``grid``."""
    flat, unravel = tree_ravel(state.params)
    jac = torch.func.jacrev(lambda f: mlp(unravel(f), grid)[:, 0])(flat)  # (points, P)
    with torch.no_grad():
        mean = mlp(state.params, grid)[:, 0]
        var = ((jac @ state.cov) * jac).sum(-1) + NOISE**2
    return mean, var.sqrt()


def _plot(snapshots, grid: torch.Tensor, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = grid[:, 0]
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3.4 * len(snapshots), 3.2), sharey=True)
    for ax, snap in zip(axes, snapshots):
        lo, hi = snap["mean"] - 2 * snap["sd"], snap["mean"] + 2 * snap["sd"]
        ax.fill_between(xs, lo, hi, alpha=0.3, label="±2 sd")
        ax.plot(xs, truth(xs), color="black", linestyle=":", linewidth=1, label="truth")
        ax.plot(xs, snap["mean"], label="mean")
        ax.scatter(snap["x"], snap["y"], s=4, color="tab:red", alpha=0.5)
        ax.axvspan(-3, -2, color="grey", alpha=0.08)
        ax.axvspan(2, 3, color="grey", alpha=0.08)
        ax.set_title(f"{snap['seen']} observations", fontsize=9)
        ax.set_ylim(-3, 3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("ekf.dense_fisher, linearised predictive (grey: outside the data's range)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out, "streaming_ekf.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
