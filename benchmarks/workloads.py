"""Models, batches and functions shared by the bench modules (tanh MLP with
cross-entropy, the workload of the issues)."""

import torch

from benchmarks.config import MODELS


def mlp_params(model: str, dtype=torch.float32, seed: int = 0):
    sizes = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = (torch.randn(a, b, generator=g) / a**0.5).to(dtype)
        params[f"b{i}"] = torch.zeros(b, dtype=dtype)
    return params


def batch(model: str, n: int, dtype=torch.float32, seed: int = 1):
    sizes = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=g).to(dtype)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return x, y


def forward(params, x):
    h = torch.tanh(x @ params["w0"] + params["b0"])
    return h @ params["w1"] + params["b1"]


def log_likelihood(params, batch_):
    """Mean log-likelihood of a batch, logits as aux (posteriors' convention)."""
    x, y = batch_
    z = forward(params, x)
    return -torch.nn.functional.cross_entropy(z, y), z


def log_likelihood_per_sample(params, batch_):
    """One log-likelihood per sample (``per_sample=True``), logits as aux."""
    x, y = batch_
    z = forward(params, x)
    return -torch.nn.functional.cross_entropy(z, y, reduction="none"), z


def num_params(model: str) -> int:
    sizes = MODELS[model]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def library(provider: str):
    """``(module, extra_kwargs)`` for a provider: the reference takes no backend."""
    if provider == "posteriors":
        import posteriors

        return posteriors, {}
    import posteriors_fast

    return posteriors_fast, {"backend": provider}
