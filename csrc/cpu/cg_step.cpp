// posteriors_fast::cg_step_ on the CPU: one conjugate-gradient iteration in
// three passes over the vectors, the fewest the data dependencies allow
// (α needs p·Ap before x and r move; the new direction needs r·r after r moved):
//   1. p·ap and p·p                      (reads p, ap)
//   2. x += α p, r -= α(ap + δp), r·r    (reads x, r, p, ap; writes x, r)
//   3. p = r + (γ_new/γ) p               (reads r, p; writes p)
// The eager torch loop makes 7 passes and ~10 dispatches per iteration.
// Schema and semantics: posteriors_fast/_library.py.
//
// The loops are plain C++ written for auto-vectorisation, built for AVX-512,
// AVX2 and baseline x86-64 (PF_ISA_VARIANTS, multiversion.h); the op runs the
// build of the active ISA level, so the binary runs on any x86-64. Dot
// products accumulate in the vector's dtype within blocks of kBlock elements
// and in double across blocks (the vector width, so the level, sets the order
// of the sums within a block: the levels agree to rounding, not bit for bit);
// accumulating every product in a scalar double instead is several times
// slower. benchmarks/bench_cg_step.py times the step against the eager one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "multiversion.h"

#include <algorithm>
#include <utility>


namespace posteriors_fast {
namespace {

// Below this many elements a pass runs on one thread (waking threads costs more).
constexpr int64_t kGrain = 1 << 16;
// Elements summed in the vector's own dtype before adding to a double.
constexpr int64_t kBlock = 1024;

using Pair = std::pair<double, double>;

template <typename T>
PF_ALWAYS_INLINE Pair dots_body(const T* p, const T* ap, int64_t n) {
  double pap = 0.0, pp = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t i = b; i < e; ++i) {
      s1 += p[i] * ap[i];
      s2 += p[i] * p[i];
    }
    pap += s1;
    pp += s2;
  }
  return {pap, pp};
}

template <typename T>
PF_ALWAYS_INLINE double update_body(T* x, T* r, const T* p, const T* ap, int64_t n, T alpha, T alpha_damping) {
  double rr = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = b; i < e; ++i) {
      x[i] += alpha * p[i];
      const T ri = r[i] - alpha * ap[i] - alpha_damping * p[i];
      r[i] = ri;
      s += ri * ri;
    }
    rr += s;
  }
  return rr;
}

template <typename T>
PF_ALWAYS_INLINE void direction_body(T* p, const T* r, int64_t n, T ratio) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    p[i] = r[i] + ratio * p[i];
  }
}

// dots(isa, ...), update(isa, ...), direction(isa, ...): one build per ISA level.
PF_ISA_VARIANTS(template <typename T>, Pair, dots, (const T* p, const T* ap, int64_t n), (p, ap, n))
PF_ISA_VARIANTS(template <typename T>, double, update,
                (T* x, T* r, const T* p, const T* ap, int64_t n, T alpha, T alpha_damping),
                (x, r, p, ap, n, alpha, alpha_damping))
PF_ISA_VARIANTS(template <typename T>, void, direction, (T* p, const T* r, int64_t n, T ratio), (p, r, n, ratio))

template <typename scalar_t>
at::Tensor cg_step_impl(at::Tensor& x, at::Tensor& r, at::Tensor& p, const at::Tensor& ap,
                        const at::Tensor& gamma_t, double damping) {
  const int64_t n = x.numel();
  scalar_t* xd = x.mutable_data_ptr<scalar_t>();
  scalar_t* rd = r.mutable_data_ptr<scalar_t>();
  scalar_t* pd = p.mutable_data_ptr<scalar_t>();
  const scalar_t* ad = ap.const_data_ptr<scalar_t>();
  const double gamma = gamma_t.item<double>();
  const Isa isa = active_isa();

  const Pair d = at::parallel_reduce(
      0, n, kGrain, Pair{0.0, 0.0},
      [&](int64_t b, int64_t e, Pair acc) {
        const Pair part = dots(isa, pd + b, ad + b, e - b);
        return Pair{acc.first + part.first, acc.second + part.second};
      },
      [](Pair u, Pair v) { return Pair{u.first + v.first, u.second + v.second}; });

  const double alpha = gamma / (d.first + damping * d.second);
  const scalar_t a_s = static_cast<scalar_t>(alpha);
  const scalar_t ad_s = static_cast<scalar_t>(alpha * damping);
  const double rr = at::parallel_reduce(
      0, n, kGrain, 0.0,
      [&](int64_t b, int64_t e, double acc) {
        return acc + update(isa, xd + b, rd + b, pd + b, ad + b, e - b, a_s, ad_s);
      },
      [](double u, double v) { return u + v; });

  const scalar_t ratio = static_cast<scalar_t>(rr / gamma);
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { direction(isa, pd + b, rd + b, e - b, ratio); });
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
