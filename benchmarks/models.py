"""The model families of the scale benchmarks (``benchmarks/scale.py``), each
at P ≈ 10⁶ and P ≈ 10⁷: a tanh MLP, a small convolutional network on
32×32×3 images and a small causal transformer language model.

Every model is a pure function ``forward(params, x) -> logits`` of a dict of
tensors, so ``vmap`` of a per-sample gradient (the per-sample Jacobian) runs
through it unchanged. ``build(name)`` returns a :class:`ScaleModel` with the
parameters, a batch maker, the log-likelihoods in posteriors' conventions and
the GGN pair ``(forward, outer_log_likelihood)``.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

#: name -> (family, sizes). Sizes are chosen for P within 10% of the target.
SHAPES: Dict[str, tuple] = {
    # tanh MLP (input, hidden, classes)
    "mlp-1M": ("mlp", (1024, 960, 10)),
    "mlp-10M": ("mlp", (1024, 9600, 10)),
    # conv3x3(3→c1)-relu-pool2-conv3x3(c1→c2)-relu-pool2-linear(c2·64→h)-relu-linear(h→10)
    "cnn-1M": ("cnn", (32, 64, 240)),
    "cnn-10M": ("cnn", (64, 128, 1200)),
    # causal transformer LM (vocab, width, layers, feed-forward width, sequence length)
    "transformer-1M": ("transformer", (1000, 160, 2, 640, 32)),
    "transformer-10M": ("transformer", (4000, 384, 4, 1536, 32)),
}


def _init(g, *shape, fan_in):
    return torch.randn(*shape, generator=g) / math.sqrt(fan_in)


def mlp_params(sizes, g):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{i}"] = _init(g, a, b, fan_in=a)
        params[f"b{i}"] = torch.zeros(b)
    return params


def mlp_forward(params, x):
    h = torch.tanh(x @ params["w0"] + params["b0"])
    return h @ params["w1"] + params["b1"]


def cnn_params(sizes, g):
    c1, c2, hidden = sizes
    return {
        "conv1": _init(g, c1, 3, 3, 3, fan_in=27),
        "conv1_b": torch.zeros(c1),
        "conv2": _init(g, c2, c1, 3, 3, fan_in=9 * c1),
        "conv2_b": torch.zeros(c2),
        "fc1": _init(g, c2 * 64, hidden, fan_in=c2 * 64),
        "fc1_b": torch.zeros(hidden),
        "fc2": _init(g, hidden, 10, fan_in=hidden),
        "fc2_b": torch.zeros(10),
    }


def cnn_forward(params, x):
    h = F.max_pool2d(F.relu(F.conv2d(x, params["conv1"], params["conv1_b"], padding=1)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, params["conv2"], params["conv2_b"], padding=1)), 2)
    h = F.relu(h.flatten(1) @ params["fc1"] + params["fc1_b"])
    return h @ params["fc2"] + params["fc2_b"]


def transformer_params(sizes, g):
    vocab, width, layers, ff, length = sizes
    params = {"embed": _init(g, vocab, width, fan_in=1) * 0.02, "pos": _init(g, length, width, fan_in=1) * 0.02}
    for i in range(layers):
        params[f"l{i}"] = {
            "ln1": torch.ones(width),
            "qkv": _init(g, width, 3 * width, fan_in=width),
            "out": _init(g, width, width, fan_in=width),
            "ln2": torch.ones(width),
            "ff1": _init(g, width, ff, fan_in=width),
            "ff2": _init(g, ff, width, fan_in=ff),
        }
    params["ln_f"] = torch.ones(width)
    params["unembed"] = _init(g, width, vocab, fan_in=width)
    return params


def _heads(width):
    return max(1, width // 64)


def transformer_forward(params, tokens):
    """Logits (B, T, vocab) of a pre-norm causal transformer."""
    b, t = tokens.shape
    width = params["embed"].shape[1]
    heads = _heads(width)
    h = params["embed"][tokens] + params["pos"][:t]
    mask = torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()
    layer = 0
    while f"l{layer}" in params:
        p = params[f"l{layer}"]
        a = F.layer_norm(h, (width,), p["ln1"])
        q, k, v = (a @ p["qkv"]).split(width, -1)
        q, k, v = (z.reshape(b, t, heads, -1).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        attn = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        h = h + attn.transpose(1, 2).reshape(b, t, width) @ p["out"]
        h = h + F.gelu(F.layer_norm(h, (width,), p["ln2"]) @ p["ff1"]) @ p["ff2"]
        layer += 1
    return F.layer_norm(h, (width,), params["ln_f"]) @ params["unembed"]


@dataclass
class ScaleModel:
    name: str
    family: str
    params: dict
    make_batch: Callable  # (n, seed) -> (x, y)
    forward: Callable  # (params, x) -> logits
    classes: int

    @property
    def size(self) -> int:
        return sum(t.numel() for t in _leaves(self.params))

    def log_likelihood(self, params, batch):
        """Mean per-sample log-likelihood of the batch, logits as aux
        (posteriors' convention; for the language model the log-likelihood of
        a sequence is the sum over its tokens)."""
        x, y = batch
        z = self.forward(params, x)
        return -self._nll(z, y).mean(), z

    def log_likelihood_per_sample(self, params, batch):
        x, y = batch
        z = self.forward(params, x)
        return -self._nll(z, y), z

    def _nll(self, z, y):
        if z.ndim == 3:
            return F.cross_entropy(z.flatten(0, 1), y.flatten(), reduction="none").reshape(y.shape).sum(-1)
        return F.cross_entropy(z, y, reduction="none")

    def ggn_forward(self, params, batch):
        """``(z, aux)`` for ``laplace.*_ggn``: per-sample outputs (N, C); the
        language model's (N, T·vocab)."""
        z = self.forward(params, batch[0])
        return z.reshape(z.shape[0], -1), torch.tensor([])

    def outer_log_likelihood(self, z, batch):
        y = batch[1]
        if y.ndim == 2:
            z = z.reshape(y.shape[0] * y.shape[1], -1)
            y = y.reshape(-1)
        return -F.cross_entropy(z, y, reduction="sum")


def _leaves(tree):
    for value in tree.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        else:
            yield value


def build(name: str, seed: int = 0) -> ScaleModel:
    family, sizes = SHAPES[name]
    g = torch.Generator().manual_seed(seed)
    if family == "mlp":
        params = mlp_params(sizes, g)

        def make_batch(n, seed=1):
            gb = torch.Generator().manual_seed(seed)
            return torch.randn(n, sizes[0], generator=gb), torch.randint(0, sizes[-1], (n,), generator=gb)

        return ScaleModel(name, family, params, make_batch, mlp_forward, sizes[-1])
    if family == "cnn":
        params = cnn_params(sizes, g)

        def make_batch(n, seed=1):
            gb = torch.Generator().manual_seed(seed)
            return torch.randn(n, 3, 32, 32, generator=gb), torch.randint(0, 10, (n,), generator=gb)

        return ScaleModel(name, family, params, make_batch, cnn_forward, 10)
    params = transformer_params(sizes, g)
    vocab, length = sizes[0], sizes[-1]

    def make_batch(n, seed=1):
        gb = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (n, length + 1), generator=gb)
        return tokens[:, :-1], tokens[:, 1:]

    return ScaleModel(name, family, params, make_batch, transformer_forward, vocab)


def num_params(name: str) -> int:
    return build(name).size
