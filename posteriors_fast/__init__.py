"""posteriors_fast: a drop-in, accelerated re-implementation of posteriors 0.0.5.

``import posteriors_fast as posteriors`` and existing code runs unchanged; pass
``backend="compiled"`` (or call :func:`set_backend`) for the compiled hot paths.
"""

# As in posteriors 0.0.5, ``version`` (importlib.metadata's) is importable from here.
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

from posteriors_fast import backends, distributed, ekf, laplace, optim, sgmcmc, torchopt, types, vi
from posteriors_fast.backends import get_backend, set_backend, use_backend
from posteriors_fast.tree_utils import (
    extract_requires_grad,
    extract_requires_grad_and_func,
    flexi_tree_map,
    inplacify,
    insert_requires_grad,
    insert_requires_grad_,
    tree_extract,
    tree_insert,
    tree_insert_,
    tree_map_inplacify_,
    tree_size,
)
from posteriors_fast.utils import (
    CatchAuxError,
    L_from_flat,
    L_to_flat,
    cg,
    diag_ggn,
    diag_normal_log_prob,
    diag_normal_sample,
    empirical_fisher,
    fvp,
    ggn,
    ggnvp,
    hvp,
    is_scalar,
    linearized_forward_diag,
    linearized_forward_lowrank,
    model_to_function,
    per_samplify,
)

try:
    __version__ = version("posteriors_fast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"
del PackageNotFoundError

__all__ = [
    "backends",
    "distributed",
    "ekf",
    "laplace",
    "optim",
    "sgmcmc",
    "torchopt",
    "types",
    "vi",
    "get_backend",
    "set_backend",
    "use_backend",
    "extract_requires_grad",
    "extract_requires_grad_and_func",
    "flexi_tree_map",
    "inplacify",
    "insert_requires_grad",
    "insert_requires_grad_",
    "tree_extract",
    "tree_insert",
    "tree_insert_",
    "tree_map_inplacify_",
    "tree_size",
    "CatchAuxError",
    "L_from_flat",
    "L_to_flat",
    "cg",
    "diag_ggn",
    "diag_normal_log_prob",
    "diag_normal_sample",
    "empirical_fisher",
    "fvp",
    "ggn",
    "ggnvp",
    "hvp",
    "is_scalar",
    "linearized_forward_diag",
    "linearized_forward_lowrank",
    "model_to_function",
    "per_samplify",
    "__version__",
]
