"""A dense-Fisher EKF over several processes: data parallel, or with the
covariance sharded by rows.

    torchrun --standalone --nproc_per_node=2 examples/distributed_ekf.py
    torchrun --standalone --nproc_per_node=2 examples/distributed_ekf.py --sharded

CPU with gloo (CUDA with NCCL when every rank has a GPU). Every step, each rank
takes its slice of one global minibatch of scikit-learn's bundled breast
cancer data; every rank ends with the filter one process would run on the
whole minibatches (``--check`` runs that process on rank 0 and prints the
largest difference). Rank 0 prints the test accuracy and NLL of the
posterior predictive (100 draws), the bytes each rank received per step, and
writes a figure of the predictive probabilities to ``--out``.
"""

import argparse
import os

import torch
import torch.distributed as dist
from optree.integrations.torch import tree_ravel

import posteriors_fast as pf


def load(seed: int = 0):
    """Standardised train/test split of the breast cancer data (569 × 30, 2
    classes; a synthetic stand-in of the same shape without scikit-learn)."""
    try:
        from sklearn import datasets

        bunch = datasets.load_breast_cancer()
        x = torch.tensor(bunch.data, dtype=torch.float32)
        y = torch.tensor(bunch.target, dtype=torch.long)
    except ImportError:
        print("scikit-learn is not installed: synthetic data of the same shape")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(569, 30, generator=g)
        y = (x[:, :5].sum(1) + 0.5 * torch.randn(569, generator=g) > 0).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    mean, sd = x[:cut].mean(0), x[:cut].std(0).clamp_min(1e-6)
    return ((x[:cut] - mean) / sd, y[:cut]), ((x[cut:] - mean) / sd, y[cut:])


def forward(params, x):
    return torch.tanh(x @ params["w0"] + params["b0"]) @ params["w1"] + params["b1"]


def log_likelihood(params, batch):
    """Mean log-likelihood of a batch (evaluated one sample at a time by the EKF)."""
    x, y = batch
    logits = forward(params, x)
    return -torch.nn.functional.cross_entropy(logits, y), logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sharded", action="store_true", help="split the covariance by rows across the ranks")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="global minibatch size")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument(
        "--lr", type=float, default=64.0, help="weight of each minibatch's mean log-likelihood (64: its sum)"
    )
    parser.add_argument("--check", action="store_true", help="rank 0 also runs one process on the whole batches")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial parameters on every rank (checked at init)

    (x, y), (x_test, y_test) = load()
    x, y, x_test, y_test = x.to(device), y.to(device), x_test.to(device), y_test.to(device)
    params = {
        "w0": torch.randn(x.shape[1], args.hidden, device=device) / x.shape[1] ** 0.5,
        "b0": torch.zeros(args.hidden, device=device),
        "w1": torch.randn(args.hidden, 2, device=device) / args.hidden**0.5,
        "b1": torch.zeros(2, device=device),
    }
    group = pf.distributed.sharded() if args.sharded else pf.distributed.data_parallel()
    transform = pf.ekf.dense_fisher.build(log_likelihood, lr=args.lr, init_cov=1.0, process_group=group)
    state = transform.init(params)
    if args.check and rank == 0:
        single = pf.ekf.dense_fisher.build(log_likelihood, lr=args.lr, init_cov=1.0)
        one = single.init({k: v.clone() for k, v in params.items()})

    steps = 0
    for epoch in range(args.epochs):
        for start in range(0, len(y), args.batch):
            xb, yb = x[start : start + args.batch], y[start : start + args.batch]
            a, b = rank * len(yb) // world, (rank + 1) * len(yb) // world  # this rank's slice
            state = transform.update(state, (xb[a:b], yb[a:b]), inplace=True)
            if args.check and rank == 0:
                one = single.update(one, (xb, yb), inplace=True)
            steps += 1
        if rank == 0:
            print(f"epoch {epoch}: mean log-likelihood of the last batch {float(state.log_likelihood):.4f}")

    # Posterior predictive on the test set: every rank calls sample (sharded:
    # the factor is computed across the ranks) and gets the same draws.
    draws = pf.ekf.dense_fisher.sample(state, (100,))
    probs = torch.func.vmap(forward, in_dims=(0, None))(draws, x_test).softmax(-1).mean(0)
    accuracy = float((probs.argmax(-1) == y_test).float().mean())
    nll = float(-probs[torch.arange(len(y_test)), y_test].clamp_min(1e-12).log().mean())
    stats = group.stats
    size = tree_ravel(state.params)[0].numel()
    if rank == 0:
        print(f"R = {world}, mode = {group.mode}, P = {size}, {steps} steps")
        print(f"test accuracy {accuracy:.3f}, test NLL {nll:.3f}")
        print(
            f"received per rank: {stats.wire_bytes / 1e3 / steps:.1f} kB per step on average "
            f"(updates and sampling), {stats.calls} collectives in all, {stats.seconds:.2f} s inside them"
        )
        if args.check:
            mean_diff = float((tree_ravel(state.params)[0] - tree_ravel(one.params)[0]).abs().max())
            cov = state.cov.gather() if args.sharded else state.cov
            cov_diff = float((cov - one.cov).abs().max())
            print(f"largest difference to one process: mean {mean_diff:.2e}, covariance {cov_diff:.2e}")
        _figure(probs.cpu(), y_test.cpu(), args.out, f"{group.mode}, R = {world}")
    elif args.check and args.sharded:
        state.cov.gather()  # gather is collective: every rank joins rank 0's
    # Tear down together: a rank that destroys its gloo group while rank 0 is
    # still drawing the figure can abort in gloo's teardown (seen once in CI).
    dist.barrier()
    dist.destroy_process_group()


def _figure(probs, labels, out, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure")
        return
    os.makedirs(out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, colour in ((0, "tab:red"), (1, "tab:blue")):
        values = probs[labels == label, 1].numpy()
        ax.hist(values, bins=20, range=(0, 1), alpha=0.6, color=colour, label=f"class {label}")
    ax.set_xlabel("posterior predictive P(class 1)")
    ax.set_ylabel("test points")
    ax.set_title(f"Dense-Fisher EKF ({title})")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "distributed_ekf.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
