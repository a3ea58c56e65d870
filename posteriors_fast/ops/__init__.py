"""Hot ops. One module per op: the eager torch implementation first, then any
faster families, each registered with :mod:`posteriors_fast.backends` when the
module is imported (importing this package registers them all)."""

from posteriors_fast.ops import (  # noqa: F401  (imported to register)
    buffers,
    cg,
    cholesky,
    cov_downdate,
    ggn_diag,
    jacobian,
    jsjt,
    loss_hessian,
    lowrank_update,
    normal,
    products,
    sghmc_step,
    symm_jt,
    syrk,
    value_grad,
)
