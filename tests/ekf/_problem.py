"""A small classification problem and an independent float64 oracle for the
dense-Fisher EKF step (written from the maths, not from posteriors_fast)."""

import torch
from optree import tree_map
from optree.integrations.torch import tree_ravel


def make_problem(n, dtype, seed=0, d=3, h=4, c=3):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(d, h, generator=g, dtype=dtype) * 0.5,
        "b1": torch.randn(h, generator=g, dtype=dtype) * 0.1,
        "head": {"w2": torch.randn(h, c, generator=g, dtype=dtype) * 0.5},
    }
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return params, {"x": x, "y": y}


def logits(p, x):
    return torch.tanh(x @ p["w1"] + p["b1"]) @ p["head"]["w2"]


def log_likelihood(p, batch):
    """Batch-level mean log-likelihood with the logits as aux."""
    z = logits(p, batch["x"])
    return -torch.nn.functional.cross_entropy(z, batch["y"]), z


def log_likelihood_per_sample(p, batch):
    z = logits(p, batch["x"])
    return -torch.nn.functional.cross_entropy(z, batch["y"], reduction="none"), z


def oracle_step(params, cov, batch, lr, q):
    """Σ_new = ((Σ + Q)⁻¹ + lr JᵀJ/N)⁻¹, μ_new = μ + lr Σ_new ḡ, in float64."""
    flat, unravel = tree_ravel(tree_map(lambda t: t.double(), params))
    x, y = batch["x"].double(), batch["y"]

    def one(fp, xi, yi):
        z = logits(unravel(fp), xi[None])
        return -torch.nn.functional.cross_entropy(z, yi[None])

    jac = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(flat, x, y)
    n, size = jac.shape
    q = q * torch.eye(size, dtype=torch.float64) if not torch.is_tensor(q) else q.double()
    pred = cov.double() + q
    fisher = jac.T @ jac / n
    new_cov = torch.linalg.inv(torch.linalg.inv(pred) + lr * fisher)
    new_cov = (new_cov + new_cov.T) / 2
    new_mean = flat + lr * new_cov @ jac.mean(0)
    lls = torch.func.vmap(one, in_dims=(None, 0, 0))(flat, x, y)
    return new_mean, new_cov, lls.mean()
