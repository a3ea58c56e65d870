// posteriors_fast::sghmc_step on the CPU: one SGHMC update of every leaf with
// the noise generated in registers (philox.h) instead of in a separate tensor:
//   θ' = θ + step·m,   m' = keep·m + lr·g + scale·ξ,   ξ ~ N(0, I)
// One pass reads θ, m, g and writes θ', m' (the foreach path adds a noise
// tensor write and read and four more passes). Leaf k draws from stream
// seed + k·φ (φ = 2⁶⁴/golden ratio), so leaves are independent.
// Schema and semantics: posteriors_fast/_library.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "multiversion.h"
#include "philox.h"

namespace posteriors_fast {
namespace {

template <typename T>
struct Coefficients {
  T step, keep, lr, scale;
};

template <typename T>
inline __attribute__((always_inline)) void leaf_impl(const T* theta, const T* m, const T* g, T* theta_out, T* m_out,
                                                     int64_t n, uint64_t seed, Coefficients<T> c, int64_t b,
                                                     int64_t e) {
  using Block = philox::NormalBlock<T>;
  alignas(64) T z[Block::kSize];
  for (int64_t blk = b; blk < e; ++blk) {
    Block::fill(static_cast<uint64_t>(blk), seed, z);
    const int64_t base = blk * Block::kSize;
    const int64_t len = std::min<int64_t>(Block::kSize, n - base);
    const T* th = theta + base;
    const T* mm = m + base;
    const T* gg = g + base;
    T* tho = theta_out + base;
    T* mo = m_out + base;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const T mi = mm[i];
      tho[i] = th[i] + c.step * mi;
      mo[i] = c.keep * mi + c.lr * gg[i] + c.scale * z[i];
    }
  }
}

PF_MULTIVERSION void leaf(const float* th, const float* m, const float* g, float* tho, float* mo, int64_t n,
                          uint64_t seed, Coefficients<float> c, int64_t b, int64_t e) {
  leaf_impl(th, m, g, tho, mo, n, seed, c, b, e);
}
PF_MULTIVERSION void leaf(const double* th, const double* m, const double* g, double* tho, double* mo, int64_t n,
                          uint64_t seed, Coefficients<double> c, int64_t b, int64_t e) {
  leaf_impl(th, m, g, tho, mo, n, seed, c, b, e);
}

void check_leaves(const at::TensorList& params, const at::TensorList& momenta, const at::TensorList& grads) {
  TORCH_CHECK(momenta.size() == params.size() && grads.size() == params.size(),
              "posteriors_fast::sghmc_step: params, momenta and grads must have as many leaves (", params.size(),
              ", ", momenta.size(), ", ", grads.size(), ")");
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& p = params[k];
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
                "posteriors_fast::sghmc_step: params[", k, "] must be float32 or float64, got ", p.scalar_type());
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"momenta", &momenta[k]},
                                  std::pair<const char*, const at::Tensor*>{"grads", &grads[k]}}) {
      TORCH_CHECK(t->sizes() == p.sizes() && t->scalar_type() == p.scalar_type(), "posteriors_fast::sghmc_step: ",
                  name, "[", k, "] must match params[", k, "] (", p.sizes(), ", ", p.scalar_type(), "), got ",
                  t->sizes(), ", ", t->scalar_type());
    }
    TORCH_CHECK(p.device().is_cpu() && momenta[k].device().is_cpu() && grads[k].device().is_cpu(),
                "posteriors_fast::sghmc_step: CPU tensors only (leaf ", k, ")");
  }
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sghmc_step(
    at::TensorList params, at::TensorList momenta, at::TensorList grads, double step, double keep, double lr,
    double scale, int64_t seed) {
  check_leaves(params, momenta, grads);
  std::vector<at::Tensor> params_out, momenta_out;
  params_out.reserve(params.size());
  momenta_out.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor th = params[k].contiguous(), m = momenta[k].contiguous(), g = grads[k].contiguous();
    at::Tensor tho = at::empty_like(th, at::MemoryFormat::Contiguous);
    at::Tensor mo = at::empty_like(m, at::MemoryFormat::Contiguous);
    const int64_t n = th.numel();
    const uint64_t leaf_seed = static_cast<uint64_t>(seed) + static_cast<uint64_t>(k) * 0x9E3779B97F4A7C15ull;
    AT_DISPATCH_FLOATING_TYPES(th.scalar_type(), "sghmc_step", [&] {
      constexpr int64_t size = philox::NormalBlock<scalar_t>::kSize;
      const Coefficients<scalar_t> c{static_cast<scalar_t>(step), static_cast<scalar_t>(keep),
                                     static_cast<scalar_t>(lr), static_cast<scalar_t>(scale)};
      const scalar_t* thd = th.const_data_ptr<scalar_t>();
      const scalar_t* md = m.const_data_ptr<scalar_t>();
      const scalar_t* gd = g.const_data_ptr<scalar_t>();
      scalar_t* thod = tho.mutable_data_ptr<scalar_t>();
      scalar_t* mod = mo.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, (n + size - 1) / size, 64, [&](int64_t b, int64_t e) {
        leaf(thd, md, gd, thod, mod, n, leaf_seed, c, b, e);
      });
    });
    params_out.push_back(tho);
    momenta_out.push_back(mo);
  }
  return {params_out, momenta_out};
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("sghmc_step", &sghmc_step); }

}  // namespace posteriors_fast
