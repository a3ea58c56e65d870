"""ekf.dense_fisher: one update from a fixed state, and sample(100)."""

import torch

from benchmarks.workloads import batch, library, log_likelihood, log_likelihood_per_sample, mlp_params, num_params

LR, INIT_COV = 1e-3, 1e-2  # small enough that one reference update (wrong sign) still factors


def probe_reference(case) -> bool:
    """Run the reference in a killable child first: at P = 20k it may take minutes."""
    return case.model == "L"


def _state(lib, kwargs, params, data, per_sample=False):
    fn = log_likelihood_per_sample if per_sample else log_likelihood
    transform = lib.ekf.dense_fisher.build(fn, LR, init_cov=INIT_COV, per_sample=per_sample, **kwargs)
    return transform, transform.init(params)


def setup(case, provider, device):
    lib, kwargs = library(provider)
    params = {k: v.to(device) for k, v in mlp_params(case.model).items()}
    data = tuple(t.to(device) for t in batch(case.model, case.n))
    transform, state = _state(lib, kwargs, params, data, per_sample=case.op.endswith("per_sample"))
    if case.op in ("ekf.dense_fisher.update", "ekf.dense_fisher.update per_sample"):
        return lambda: transform.update(state, data)
    if case.op == "ekf.dense_fisher.update inplace":
        # Repeated in place on one state (the reference's covariance grows with
        # each of its wrong-sign steps; at this lr it still factors for the run).
        # In place, no new P×P covariance is allocated: at P = 4890 a fresh
        # 95 MB buffer costs ~25 ms of page faults per non-inplace update.
        return lambda: transform.update(state, data, inplace=True)
    # sample(100) from the same covariance for every provider: ours after one update.
    import posteriors_fast

    fast = posteriors_fast.ekf.dense_fisher
    tf = fast.build(log_likelihood, LR, init_cov=INIT_COV)
    cov = tf.update(tf.init(params), data).cov
    state = lib.ekf.dense_fisher.EKFDenseState(params, cov.clone())
    return lambda: lib.ekf.dense_fisher.sample(state, torch.Size([100]))


def flops(case) -> float:
    """Nominal: update 3·N·P² (Woodbury: ΣJᵀ then the half downdate), or
    N·P² + 2·P³ in precision form; sample 2·100·P² (one GEMM)."""
    p = num_params(case.model)
    if case.op.startswith("ekf.dense_fisher.sample"):
        return 2 * 100 * p * p
    return 3 * case.n * p * p if case.n < p else case.n * p * p + 2 * p**3
