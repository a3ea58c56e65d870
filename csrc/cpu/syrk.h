// The CPU syrk_ kernel (syrk.cpp), for the ops built on it (cov_downdate.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace posteriors_fast {

// out ← beta·C + alpha·AᵀB on the upper triangle, mirrored with `mirror`;
// schema and semantics: posteriors_fast/_library.py.
void syrk_(at::Tensor out, const at::Tensor& a, const std::optional<at::Tensor>& b_opt,
           const std::optional<at::Tensor>& c_opt, double alpha, double beta, bool mirror);

}  // namespace posteriors_fast
