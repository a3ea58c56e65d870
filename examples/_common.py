"""Helpers shared by the examples: bundled data, a small MLP, calibration
metrics, a progress line and the output folder."""

import os
import sys
import time
from typing import Dict, Iterable, Iterator, Tuple

import torch


def load_digits(seed: int = 0) -> Tuple[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor], int]:
    """scikit-learn's bundled 8x8 digits, standardised, split 80/20:
    ``(train, test, classes)``."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    cut = int(0.8 * len(y))
    mean, sd = x[:cut].mean(0), x[:cut].std(0).clamp_min(1e-6)
    x = (x - mean) / sd
    return (x[:cut], y[:cut]), (x[cut:], y[cut:]), 10


def mlp_params(sizes, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Parameters of a tanh MLP with layer sizes ``sizes`` (input first)."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = torch.randn(a, b, generator=g) / a**0.5
        params[f"b{i}"] = torch.zeros(b)
    return params


def mlp(params: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of the tanh MLP."""
    layers = len(params) // 2
    for i in range(layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            x = torch.tanh(x)
    return x


def minibatches(data, size: int, epochs: int = 1, seed: int = 1) -> Iterator:
    x, y = data
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), size):
            idx = order[start : start + size]
            yield x[idx], y[idx]


def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> Dict:
    """Accuracy, mean negative log-likelihood, expected calibration error
    (ECE, equal-width confidence bins) and the reliability curve."""
    confidence, predicted = probs.max(1)
    correct = (predicted == y).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece, curve = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            gap = correct[inside].mean() - confidence[inside].mean()
            ece += float(inside.float().mean() * gap.abs())
            curve.append((float(confidence[inside].mean()), float(correct[inside].mean()), int(inside.sum())))
    nll = -torch.log(probs.gather(1, y[:, None]).clamp_min(1e-12)).mean()
    return {"acc": float(correct.mean()), "nll": float(nll), "ece": ece, "curve": curve}


def progress(items: Iterable, total: int, label: str, every: float = 0.5) -> Iterator:
    """Yield ``items`` while printing ``label i/total`` at most every
    ``every`` seconds (on one line when stderr is a terminal)."""
    last = 0.0
    end = "\r" if sys.stderr.isatty() else "\n"
    for i, item in enumerate(items, 1):
        now = time.perf_counter()
        if now - last >= every or i == total:
            print(f"{label} {i}/{total}", end=end if i < total else "\n", file=sys.stderr, flush=True)
            last = now
        yield item


def output_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
