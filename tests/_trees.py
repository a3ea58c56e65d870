"""Random parameter pytrees of three shapes and a small tanh model on them."""

import torch

KINDS = ("dict", "tuple", "nested")


def random_params(kind: str, dtype, seed: int = 0, d: int = 3, h: int = 4, c: int = 3):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(dtype)

    if kind == "dict":
        return {"w1": r(d, h), "b1": r(h), "w2": r(h, c)}
    if kind == "tuple":
        return (r(d, h), r(h), r(h, c))
    return {"layer": {"w": r(d, h), "b": r(h)}, "head": (r(h, c), r(c))}


def _unpack(params):
    if isinstance(params, tuple):
        return params[0], params[1], params[2], None
    if "layer" in params:
        return params["layer"]["w"], params["layer"]["b"], params["head"][0], params["head"][1]
    return params["w1"], params["b1"], params["w2"], None


def forward(params, x):
    w1, b1, w2, b2 = _unpack(params)
    z = torch.tanh(x @ w1 + b1) @ w2
    return z if b2 is None else z + b2


def random_batch(n: int, dtype, seed: int = 1, d: int = 3, c: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(dtype), torch.randint(0, c, (n,), generator=g)
