"""Hot ops. One module per op, named as the op is everywhere (registry,
``_library.py`` schema, ``csrc/cpu/<op>.cpp``, ``kernels/triton/<op>.py``,
``tests/ops/test_<op>.py``, ``benchmarks/bench_<op>.py``): the eager torch
implementation first, then any faster families, each registered with
:mod:`posteriors_fast.backends` when the module is imported (importing this
package registers them all)."""

from posteriors_fast.ops import (  # noqa: F401  (imported to register)
    cg_step,
    cov_downdate,
    ggn_diag,
    jsjt,
    lowrank_truncate,
    lowrank_update,
    new_matrix,
    normal,
    sample_jacobian,
    separable_jacobian,
    sghmc_step,
    symm_jt,
    syrk,
    value_grad,
)
