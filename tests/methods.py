"""The table of every method of the library, in the shape of optax's
``_OPTIMIZERS_UNDER_TEST``: one row per (module, setting) with the user
functions it is built from, so that the shared invariants (tests/test_methods.py)
and the bad-input sweep (tests/test_bad_input.py) run over all of them.

Each user function is named by its role (``log_likelihood``, ``log_posterior``,
``forward``, ``outer_log_likelihood``, ``loss_fn``): the build argument of
that name. Tests swap one role for a broken function to check that the error
names it.
"""

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from optree import tree_leaves

from tests._trees import forward as _model
from tests._trees import random_batch, random_params

N = 6  # samples per batch


def log_likelihood(p, batch):
    """Batch mean log-likelihood, logits as aux."""
    x, y = batch
    z = _model(p, x)
    return -torch.nn.functional.cross_entropy(z, y), z


def log_likelihood_per_sample(p, batch):
    x, y = batch
    z = _model(p, x)
    return -torch.nn.functional.cross_entropy(z, y, reduction="none"), z


def log_posterior(p, batch):
    """Mean log-likelihood plus a Gaussian prior (SG-MCMC, VI)."""
    value, z = log_likelihood(p, batch)
    return value - 0.05 * sum((t**2).sum() for t in tree_leaves(p)), z


def summed_log_posterior(p, batch):
    x, y = batch
    return -torch.nn.functional.cross_entropy(_model(p, x), y, reduction="sum"), torch.tensor([])


def forward(p, batch):
    return _model(p, batch[0]), torch.tensor([])


def outer_log_likelihood(z, batch):
    return -torch.nn.functional.cross_entropy(z, batch[1], reduction="sum")


def loss_fn(p, batch):
    value, z = log_posterior(p, batch)
    return -value, z


def _torchopt_adam():
    import torchopt

    return torchopt.adam(1e-2)


@dataclass
class Method:
    """One row of the table.

    Attributes:
        name: Row id, e.g. ``"ekf.dense_fisher[per_sample]"``.
        module: Module path below the package, e.g. ``"ekf.dense_fisher"``.
        functions: Build argument name -> the user function.
        settings: The other build arguments (a callable makes a fresh value,
            e.g. an optimizer, per build).
        per_sample: The row's ``per_sample`` setting (None: the method has none).
        splits_batch: The method evaluates the user function one sample at
            a time, so the batch's leaves must agree on their first dimension.
        noisy: Draws random numbers in ``update`` (SG-MCMC, VI).
        inplace_only: ``update`` works only with ``inplace=True`` (optim).
        takes_backend: ``build`` takes ``backend=``.
        reference: Why the row is not compared with posteriors 0.0.5, or "".
        reference_float64: Why it is compared in float32 only, or "".
        quiet: Build settings that switch the noise off (compiled equals
            eager although the compiled generator draws other numbers).
    """

    name: str
    module: str
    functions: Dict[str, Callable]
    settings: Dict = field(default_factory=dict)
    per_sample: Optional[bool] = None
    splits_batch: bool = False
    noisy: bool = False
    inplace_only: bool = False
    takes_backend: bool = True
    reference: str = ""
    reference_float64: str = ""
    quiet: Dict = field(default_factory=dict)

    def lib_module(self, lib):
        return importlib.import_module(f"{lib.__name__}.{self.module}")

    def build(self, lib, backend=None, quiet=False, **replace):
        """The transform of ``lib`` (posteriors_fast or posteriors) with the
        user functions of ``replace`` swapped in by role."""
        settings = {k: (v() if callable(v) else v) for k, v in self.settings.items()}
        if quiet:
            settings.update(self.quiet)
        if self.per_sample is not None:
            settings["per_sample"] = self.per_sample
        if backend is not None and self.takes_backend and lib.__name__ == "posteriors_fast":
            settings["backend"] = backend
        functions = {**self.functions, **replace}
        module = self.lib_module(lib)
        if self.module == "optim":
            return module.build(functions["loss_fn"], torch.optim.SGD, lr=0.05)
        return module.build(**functions, **settings)

    def problem(self, dtype, seed=0, n=N):
        """``(params, batch)``: a nested pytree of parameters and one batch."""
        if self.module == "optim":  # torch.optim takes an iterable of tensors that require grad
            params = tuple(t.requires_grad_(True) for t in random_params("tuple", dtype, seed=seed))
        else:
            params = random_params("nested", dtype, seed=seed)
        return params, random_batch(n, dtype, seed=seed + 1)


#: Why the low-rank rows are not compared with posteriors 0.0.5.
_LOWRANK = (
    "posteriors 0.0.5 has no low-rank methods; tests/ekf and tests/laplace check them against "
    "the dense methods (rank >= P) and float64 dense formulas"
)


def _rows():
    rows = []
    for per_sample in (False, True):
        tag = "[per_sample]" if per_sample else ""
        ll = log_likelihood_per_sample if per_sample else log_likelihood
        rows.append(
            Method(
                f"ekf.dense_fisher{tag}",
                "ekf.dense_fisher",
                {"log_likelihood": ll},
                dict(lr=0.3, transition_cov=0.01, init_cov=0.5),
                per_sample=per_sample,
                splits_batch=True,
                reference="posteriors 0.0.5 subtracts the Fisher from the precision (a documented defect); "
                "tests/ekf checks this method against a float64 dense formula",
            )
        )
        rows.append(
            Method(
                f"ekf.lowrank_fisher{tag}",
                "ekf.lowrank_fisher",
                {"log_likelihood": ll},
                dict(lr=0.3, rank=4, transition_cov=0.01, init_cov=0.5),
                per_sample=per_sample,
                splits_batch=True,
                reference=_LOWRANK,
            )
        )
        rows.append(
            Method(
                f"ekf.diag_fisher{tag}",
                "ekf.diag_fisher",
                {"log_likelihood": ll},
                dict(lr=0.3, transition_sd=0.01, init_sds=0.7),
                per_sample=per_sample,
                splits_batch=True,
            )
        )
        lp = log_likelihood_per_sample if per_sample else log_likelihood
        rows.append(
            Method(
                f"laplace.dense_fisher{tag}",
                "laplace.dense_fisher",
                {"log_posterior": lp},
                dict(init_prec=0.5),
                per_sample=per_sample,
                splits_batch=True,
            )
        )
        rows.append(
            Method(
                f"laplace.lowrank_fisher{tag}",
                "laplace.lowrank_fisher",
                {"log_posterior": lp},
                dict(rank=4, init_prec_diag=0.5),
                per_sample=per_sample,
                splits_batch=True,
                reference=_LOWRANK,
            )
        )
        rows.append(
            Method(
                f"laplace.diag_fisher{tag}",
                "laplace.diag_fisher",
                {"log_posterior": lp},
                dict(init_prec_diag=0.5),
                per_sample=per_sample,
                splits_batch=True,
            )
        )
    ggn = {"forward": forward, "outer_log_likelihood": outer_log_likelihood}
    rows += [
        Method("laplace.dense_ggn", "laplace.dense_ggn", ggn, dict(init_prec=0.5)),
        Method("laplace.diag_ggn", "laplace.diag_ggn", ggn, dict(init_prec_diag=0.5)),
        Method("laplace.lowrank_ggn", "laplace.lowrank_ggn", ggn, dict(rank=4, init_prec_diag=0.5), reference=_LOWRANK),
        Method(
            "laplace.dense_hessian",
            "laplace.dense_hessian",
            {"log_posterior": summed_log_posterior},
            dict(init_prec=0.5, epsilon=0.1),
            reference_float64="posteriors 0.0.5 adds a float32 epsilon·I (a documented defect): 1.5e-9 per step",
        ),
        Method(
            "vi.diag",
            "vi.diag",
            {"log_posterior": log_posterior},
            dict(optimizer=_torchopt_adam, init_log_sds=-1.0),
            noisy=True,
        ),
        Method(
            "vi.dense",
            "vi.dense",
            {"log_posterior": log_posterior},
            # stl=False: the reference's stl keeps the mean live in log q (a documented difference)
            dict(optimizer=_torchopt_adam, init_L=0.3, stl=False),
            noisy=True,
            reference_float64="posteriors 0.0.5 builds a float32 init_L identity, which float64 params reject",
        ),
        Method(
            "sgmcmc.sgld",
            "sgmcmc.sgld",
            {"log_posterior": log_posterior},
            dict(lr=1e-2, beta=0.1),
            noisy=True,
            quiet=dict(temperature=0.0),
        ),
        Method(
            "sgmcmc.sghmc",
            "sgmcmc.sghmc",
            {"log_posterior": log_posterior},
            dict(lr=1e-2, alpha=0.05, momenta=0.2),
            noisy=True,
            quiet=dict(temperature=0.0),
        ),
        Method(
            "sgmcmc.sgnht",
            "sgmcmc.sgnht",
            {"log_posterior": log_posterior},
            dict(lr=1e-2, alpha=0.05, momenta=0.2),
            noisy=True,
            quiet=dict(temperature=0.0),
        ),
        Method("torchopt", "torchopt", {"loss_fn": loss_fn}, dict(optimizer=_torchopt_adam)),
        Method("optim", "optim", {"loss_fn": loss_fn}, inplace_only=True),
    ]
    return rows


METHODS = _rows()
BY_NAME = {m.name: m for m in METHODS}
