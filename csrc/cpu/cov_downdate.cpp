// posteriors_fast::cov_downdate_ on the CPU: Σ ← Σ − WᵀW in place for W of
// shape (R, P), the Woodbury EKF covariance step. It is the syrk_ kernel with
// α = −1, β = 1 and C = out (only Σ's upper triangle is read; the result is
// mirrored, so exactly symmetric). Schema and semantics: posteriors_fast/_library.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "syrk.h"

namespace posteriors_fast {

void cov_downdate_(at::Tensor cov, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "posteriors_fast::cov_downdate_: w must be 2-D (R, P), got ", w.sizes());
  syrk_(cov, w, std::nullopt, std::nullopt, -1.0, 1.0, true);
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("cov_downdate_", &cov_downdate_); }

}  // namespace posteriors_fast
