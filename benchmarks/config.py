"""The workload table: every shape the suite runs comes from here."""

from dataclasses import dataclass
from typing import Tuple

#: tanh MLP layer sizes (input, hidden, classes) per model size.
MODELS = {
    "S": (20, 40, 5),  # P = 1045
    "M": (50, 80, 10),  # P = 4890
    "L": (100, 180, 10),  # P = 19990
}

PROVIDERS = ("posteriors", "eager", "compiled")

#: A reference call slower than this is reported as "did not finish".
REFERENCE_LIMIT_S = 60.0


@dataclass(frozen=True)
class Case:
    bench: str  # module stem: benchmarks/bench_<bench>.py
    op: str  # what is timed
    model: str  # key of MODELS
    n: int  # batch size (rows K of the kernel benches)
    quick: bool  # in the default run and --quick; otherwise --full only
    p: int = 0  # parameter count of the kernel benches (model "-"); 0: from the model


def _cases():
    out = []
    for model, n, quick in [("S", 64, True), ("M", 64, True), ("S", 256, False), ("M", 256, False), ("L", 64, False)]:
        out.append(Case("ekf_dense_fisher", "ekf.dense_fisher.update", model, n, quick))
    for model, n, quick in [("S", 64, True), ("M", 256, False)]:
        out.append(Case("ekf_dense_fisher", "ekf.dense_fisher.update per_sample", model, n, quick))
    for model in ("S", "M"):
        out.append(Case("ekf_dense_fisher", "ekf.dense_fisher.update inplace", model, 64, False))
    for model, quick in [("S", True), ("M", True), ("L", False)]:
        out.append(Case("ekf_dense_fisher", "ekf.dense_fisher.sample(100)", model, 64, quick))
    for model, n, quick in [("S", 64, True), ("S", 256, False), ("S", 1024, False), ("M", 256, True)]:
        out.append(Case("empirical_fisher", "empirical_fisher", model, n, quick))
    for op in ("ggn", "diag_ggn"):
        for model, n, quick in [("S", 64, True), ("S", 256, False), ("M", 64, False), ("M", 256, False)]:
            out.append(Case("ggn", op, model, n, quick))
    for model, n, quick in [("S", 64, True), ("S", 256, False), ("M", 256, False)]:
        out.append(Case("linearized_forward_diag", "linearized_forward_diag", model, n, quick))
    for op in ("hvp", "fvp", "ggnvp"):
        for model, n, quick in [("S", 64, True), ("M", 256, False)]:
            out.append(Case("products", op, model, n, quick))
    for op in ("cg(50) ggn operator", "cg(50) dense SPD"):
        for model, n, quick in [("S", 64, True), ("M", 256, False)]:
            out.append(Case("cg", op, model, n, quick))
    out.append(Case("sgmcmc", "sgmcmc.sghmc step (1M params)", "S", 0, True))
    for model, n, quick in [("S", 64, True), ("M", 256, False)]:
        out.append(Case("laplace", "laplace.dense_fisher.update", model, n, quick))
    for model, n, quick in [("S", 64, True), ("M", 256, False)]:
        out.append(Case("laplace", "laplace.dense_fisher.update per_sample", model, n, quick))
        for suffix in ("", " per_sample"):
            out.append(Case("laplace", "laplace.diag_fisher.update" + suffix, model, n, quick))
    for model, n, quick in [("S", 256, False), ("M", 256, False)]:
        out.append(Case("laplace", "laplace.diag_ggn.update", model, n, quick))
    out.append(Case("laplace", "laplace.dense_fisher.sample(100)", "M", 64, False))
    out.append(Case("laplace", "laplace.dense_fisher.sample(100) flat params", "M", 64, False))
    out.append(Case("vi", "vi.diag.update", "S", 64, True))
    # Native kernels against their plain-torch baselines (BASELINE of the module).
    # P = 1045, K = 64: the product of laplace.dense_fisher.update at the S size.
    for p, k, quick in [(1045, 64, True), (5000, 256, True), (20000, 64, False)]:
        out.append(Case("syrk", "syrk (JᵀJ, P×P)", "-", k, quick, p))
    for p, r, quick in [(4890, 64, True), (4890, 256, False), (4890, 16, False)]:
        out.append(Case("symm_jt", "symm_jt (Σ·Jᵀ, P×R)", "-", r, quick, p))
    for p, quick in [(10_000, True), (10_000_000, False)]:
        out.append(Case("cg_step", "cg step (vector updates)", "-", 0, quick, p))
    out.append(Case("cov_downdate", "cov_downdate (Σ − WᵀW)", "-", 64, True, 4890))
    for d, p in [(640, 4890), (640, 20000)]:
        out.append(Case("ggn_diag", "ggn_diag (diag JᵀHJ)", "-", d, False, p))
    out.append(Case("jsjt", "jsjt (J diag(v) Jᵀ per sample)", "-", 256, False, 4890))
    out.append(Case("lowrank_update", "lowrank_update (EKF covariance step)", "-", 64, False, 4890))
    out.append(Case("lowrank_truncate", "lowrank_truncate (rank 20 + 64 columns)", "-", 64, False, 1_000_000))
    for p in (1045, 4890):
        out.append(Case("new_matrix", "new_matrix (P×P output)", "-", 0, False, p))
    out.append(Case("normal", "normal (10⁶ draws, 4 leaves)", "-", 0, False, 1_000_000))
    out.append(Case("sghmc_step", "sghmc_step (10⁶ params, 4 leaves)", "-", 0, False, 1_000_000))
    for model, n in [("S", 64), ("M", 256)]:
        out.append(Case("sample_jacobian", "sample_jacobian", model, n, False))
        out.append(Case("separable_jacobian", "separable_jacobian", model, n, False))
    out.append(Case("value_grad", "value_grad (10⁶ params, 4 leaves)", "-", 0, False, 1_000_000))
    return tuple(out)


CASES: Tuple[Case, ...] = _cases()
