// posteriors_fast::cg_step_ on the CPU: one conjugate-gradient iteration in
// three passes over the vectors, the fewest the data dependencies allow
// (α needs p·Ap before x and r move; the new direction needs r·r after r moved):
//   1. p·ap and p·p               (reads p, ap)
//   2. x += α p, r -= α(ap + δp), r·r   (reads x, r, p, ap; writes x, r)
//   3. p = r + (γ_new/γ) p        (reads r, p; writes p)
// The eager torch loop makes 7 passes and ~10 dispatches per iteration.
// Schema and semantics: posteriors_fast/_library.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <utility>

namespace posteriors_fast {
namespace {

// Below this many elements a pass runs on one thread (thread wake-up costs more).
constexpr int64_t kGrain = 1 << 15;

using Pair = std::pair<double, double>;

template <typename scalar_t>
at::Tensor cg_step_impl(at::Tensor& x, at::Tensor& r, at::Tensor& p, const at::Tensor& ap,
                        const at::Tensor& gamma_t, double damping) {
  const int64_t n = x.numel();
  scalar_t* xd = x.mutable_data_ptr<scalar_t>();
  scalar_t* rd = r.mutable_data_ptr<scalar_t>();
  scalar_t* pd = p.mutable_data_ptr<scalar_t>();
  const scalar_t* ad = ap.const_data_ptr<scalar_t>();
  const double gamma = gamma_t.item<double>();

  const Pair dots = at::parallel_reduce(
      0, n, kGrain, Pair{0.0, 0.0},
      [&](int64_t b, int64_t e, Pair acc) {
        double pap = 0.0, pp = 0.0;
#pragma omp simd reduction(+ : pap, pp)
        for (int64_t i = b; i < e; ++i) {
          const double pi = pd[i];
          pap += pi * static_cast<double>(ad[i]);
          pp += pi * pi;
        }
        return Pair{acc.first + pap, acc.second + pp};
      },
      [](Pair u, Pair v) { return Pair{u.first + v.first, u.second + v.second}; });

  const double alpha = gamma / (dots.first + damping * dots.second);
  const scalar_t a_s = static_cast<scalar_t>(alpha);
  const scalar_t ad_s = static_cast<scalar_t>(alpha * damping);

  const double rr = at::parallel_reduce(
      0, n, kGrain, 0.0,
      [&](int64_t b, int64_t e, double acc) {
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t i = b; i < e; ++i) {
          xd[i] += a_s * pd[i];
          const scalar_t ri = rd[i] - a_s * ad[i] - ad_s * pd[i];
          rd[i] = ri;
          s += static_cast<double>(ri) * ri;
        }
        return acc + s;
      },
      [](double u, double v) { return u + v; });

  const scalar_t ratio = static_cast<scalar_t>(rr / gamma);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      pd[i] = rd[i] + ratio * pd[i];
    }
  });
  return at::scalar_tensor(rr, x.options());
}

}  // namespace

at::Tensor cg_step_(at::Tensor x, at::Tensor r, at::Tensor p, const at::Tensor& ap,
                    const at::Tensor& gamma, double damping) {
  TORCH_CHECK(x.dim() == 1, "posteriors_fast::cg_step_: x must be 1-D, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "posteriors_fast::cg_step_: x must be float32 or float64, got ", x.scalar_type());
  const std::pair<const char*, const at::Tensor*> vecs[] = {{"x", &x}, {"r", &r}, {"p", &p}, {"ap", &ap}};
  for (const auto& [name, t] : vecs) {
    TORCH_CHECK(t->sizes() == x.sizes(), "posteriors_fast::cg_step_: ", name, " must have x's shape ",
                x.sizes(), ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "posteriors_fast::cg_step_: ", name,
                " must have x's dtype ", x.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->is_contiguous() && t->device().is_cpu(), "posteriors_fast::cg_step_: ", name,
                " must be a contiguous CPU tensor");
  }
  TORCH_CHECK(gamma.numel() == 1, "posteriors_fast::cg_step_: gamma must hold one value, got shape ",
              gamma.sizes());
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_", [&] {
    return cg_step_impl<scalar_t>(x, r, p, ap, gamma, damping);
  });
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("cg_step_", &cg_step_); }

}  // namespace posteriors_fast
