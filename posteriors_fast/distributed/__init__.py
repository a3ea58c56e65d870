"""Many processes on ``torch.distributed``: what is reduced, gathered or
sharded, in one place.

Every ``build`` (and ``empirical_fisher``, ``ggn``, ``diag_ggn``, ``cg``) takes
``process_group=``:

* ``None`` (default): one process, nothing changes.
* a ``torch.distributed.ProcessGroup`` or :func:`data_parallel` ``(group)``:
  each rank passes its own shard of one global batch (sizes may differ, and
  be zero) and every rank gets the state one process would get on the
  concatenation of the shards in rank order, equal up to float reduction
  order and bit-identical across ranks.
* :func:`sharded` ``(group)``: data parallel, and the P×P matrix of
  ``ekf.dense_fisher`` / ``laplace.dense_*`` split by rows
  (:class:`ShardedMatrix`), so P may exceed what one device holds.
* :func:`chains` ``(group, seed=)``: one independent SG-MCMC chain (or VI fit,
  or optimisation) per rank, noise from seed + rank, nothing reduced.

What is communicated, per update (R ranks, N samples in the global batch, P
parameters, C outputs per sample; values, not bytes):

=============================================  ==============================================
method                                         collectives (after the 6-int64 header all-gather)
=============================================  ==============================================
``ekf.dense_fisher``                           all-gather of the Jacobian rows and values, N·(P+1)
``ekf.dense_fisher``, sharded                  that, all-reduce N², all-gather (N+1)·P
``ekf.diag_fisher``                            all-reduce of Σ J², Σ J, Σ values: 2P+1
``laplace.dense_fisher`` (also sharded)        all-gather of the Jacobian rows, N·(P+1)
``laplace.dense_ggn`` (also sharded)           all-gather of J and H J rows, 2·N·C·P
``ekf.lowrank_fisher``, ``laplace.lowrank_``   all-gather of the Jacobian rows (and values),
``fisher``                                     N·(P+1), before the truncation
``laplace.lowrank_ggn``                        all-gather of the GGN square-root rows, twice, 2·N·C·P
``laplace.dense_hessian``                      all-reduce of the P×P term (sharded: R reduces of P²/R)
``laplace.diag_fisher``, ``diag_ggn``          all-reduce of P
SG-MCMC, ``vi.*``, ``torchopt``, ``optim``     all-reduce of the gradient and value, P+1
``empirical_fisher``                           all-gather of the Jacobian rows
``ggn`` / ``diag_ggn``                         all-gather of J and H J rows / all-reduce of P
``cg`` with a curvature operator               all-reduce of P per operator product
``sample`` of a sharded state                  first call after an update: ≈P²/2 (the factor); S·P per call
=============================================  ==============================================

Failures: every update first computes its local part, then all ranks
exchange a status; if any rank failed, every rank raises the same
:class:`RankError` (also an instance of the failing rank's error type)
before anything is written, so with ``inplace=True`` no rank's state
changes. Ranks that disagree on the parameters (structure, shapes, dtypes;
values at ``init`` and the first step) or settings raise
:class:`MismatchError`. A rank that never arrives makes the others raise
:class:`CollectiveError` after the process group's timeout
(``init_process_group(timeout=...)``; gloo's default is 30 minutes).
"""

from posteriors_fast.distributed._group import (
    CollectiveError,
    CommStats,
    Group,
    MismatchError,
    NoiseStream,
    RankError,
    all_gather_tree,
    broadcast_,
    chains,
    data_parallel,
    resolve,
    sharded,
)
from posteriors_fast.distributed._sharded import ShardedMatrix, row_bounds

__all__ = [
    "CollectiveError",
    "CommStats",
    "Group",
    "MismatchError",
    "NoiseStream",
    "RankError",
    "ShardedMatrix",
    "all_gather_tree",
    "broadcast_",
    "chains",
    "data_parallel",
    "resolve",
    "row_bounds",
    "sharded",
]
