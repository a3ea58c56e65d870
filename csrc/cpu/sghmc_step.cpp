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

// The same step at every ISA level: no FMA contraction here or in philox.h, so
// θ' and m' round each product and sum as written (the noise is the same too).
PF_EXACT_FP_BEGIN

template <typename T, typename Engine>
PF_ALWAYS_INLINE void leaf_impl(const T* theta, const T* m, const T* g, T* theta_out, T* m_out, int64_t n,
                                uint64_t seed, Coefficients<T> c, int64_t b, int64_t e) {
  using Block = philox::NormalBlock<T, Engine>;
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

// Outputs at least this large are streamed past the cache (below); smaller
// ones, which fit in the core's caches, stay there for the next step's
// gradient, which reads them right away. 4 MiB is the L2 of one core of the
// Xeon (Sapphire Rapids class, 2 vCPUs) this was measured on: larger outputs
// leave L2 anyway. The measurement does not show a gain from streaming there:
// a chain of float32 steps (each step's outputs are the next one's inputs),
// 1 thread, one leaf, outputs of 1 / 4 / 16 / 64 / 256 MiB, median ms per
// step over 4 alternated processes, streaming vs the cached path forced
// through this constant: 0.25 vs 0.30, 1.14 vs 0.95, 6.4 vs 5.3, 105 vs 71,
// 419 vs 331 (streaming 16% faster at 1 MiB, 20-50% slower from 4 MiB on).
// Streaming stores pay off when many cores saturate the DRAM bandwidth (they
// skip the read-for-ownership); that case is unmeasured here.
constexpr int64_t kStreamBytes = int64_t{4} << 20;

#if PF_HAVE_V4_KERNELS
// float32 on AVX-512 with `stream`: whole, aligned blocks are written with
// streaming stores, so the new θ and m (fresh buffers, read by the next step,
// not this one) are not first read into cache. The arithmetic is leaf_impl's,
// in the same order and without FMAs (the same bits as at avx2 and baseline).
// Skipping the read-for-ownership of the fresh outputs is a fifth less
// traffic (benchmarks/bench_sghmc_step.py and bench_sgmcmc.py report GB/s
// against a STREAM copy).
PF_TARGET_V4 void leaf_v4(const float* th, const float* m, const float* g, float* tho, float* mo, int64_t n,
                          uint64_t seed, Coefficients<float> c, int64_t b, int64_t e, bool stream) {
  if (!stream) {
    leaf_impl<float, philox::Avx512>(th, m, g, tho, mo, n, seed, c, b, e);
    return;
  }
  using Block = philox::NormalBlock<float, philox::Avx512>;
  alignas(64) float z[Block::kSize];
  const __m512 step = _mm512_set1_ps(c.step), keep = _mm512_set1_ps(c.keep), lr = _mm512_set1_ps(c.lr),
               scale = _mm512_set1_ps(c.scale);
  for (int64_t blk = b; blk < e; ++blk) {
    const int64_t base = blk * Block::kSize;
    const bool whole = n - base >= Block::kSize &&
                       ((reinterpret_cast<uintptr_t>(tho + base) | reinterpret_cast<uintptr_t>(mo + base)) & 63) == 0;
    if (!whole) {
      leaf_impl<float, philox::Avx512>(th, m, g, tho, mo, n, seed, c, blk, blk + 1);
      continue;
    }
    Block::fill(static_cast<uint64_t>(blk), seed, z);
    for (int64_t i = base; i < base + Block::kSize; i += 16) {
      const __m512 mi = _mm512_loadu_ps(m + i);
      _mm512_stream_ps(tho + i, _mm512_add_ps(_mm512_loadu_ps(th + i), _mm512_mul_ps(step, mi)));
      const __m512 kept = _mm512_add_ps(_mm512_mul_ps(keep, mi), _mm512_mul_ps(lr, _mm512_loadu_ps(g + i)));
      _mm512_stream_ps(mo + i, _mm512_add_ps(kept, _mm512_mul_ps(scale, _mm512_load_ps(z + (i - base)))));
    }
  }
  _mm_sfence();  // the streamed lines are visible before the parallel region ends
}
PF_TARGET_V4 void leaf_v4(const double* th, const double* m, const double* g, double* tho, double* mo, int64_t n,
                          uint64_t seed, Coefficients<double> c, int64_t b, int64_t e, bool /*stream*/) {
  leaf_impl<double, philox::Avx512>(th, m, g, tho, mo, n, seed, c, b, e);
}
#endif

// leaf(isa, ...): avx2 and baseline build the portable engine for their target.
template <typename T>
PF_ALWAYS_INLINE void leaf_body(const T* th, const T* m, const T* g, T* tho, T* mo, int64_t n, uint64_t seed,
                                Coefficients<T> c, int64_t b, int64_t e, bool /*stream*/) {
  leaf_impl<T, philox::Portable>(th, m, g, tho, mo, n, seed, c, b, e);
}
PF_ISA_VARIANTS_V4(template <typename T>, void, leaf, leaf_v4,
                   (const T* th, const T* m, const T* g, T* tho, T* mo, int64_t n, uint64_t seed, Coefficients<T> c,
                    int64_t b, int64_t e, bool stream),
                   (th, m, g, tho, mo, n, seed, c, b, e, stream))

PF_EXACT_FP_END

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

// Updates the leaves ks (all of dtype T) in one parallel region: their noise
// blocks are numbered one after another (leaf i owns blocks first[i] ..
// first[i + 1]), so there is one fork/join instead of one per leaf, and a
// leaf's draws still depend only on its seed and block index.
template <typename T>
void update_leaves(const std::vector<size_t>& ks, const std::vector<at::Tensor>& th, const std::vector<at::Tensor>& m,
                   const std::vector<at::Tensor>& g, std::vector<at::Tensor>& tho, std::vector<at::Tensor>& mo,
                   const std::vector<uint64_t>& seeds, Coefficients<T> c) {
  constexpr int64_t size = philox::NormalBlock<T>::kSize;
  const Isa isa = active_isa();
  std::vector<int64_t> first(ks.size() + 1, 0);
  int64_t out_bytes = 0;
  for (size_t i = 0; i < ks.size(); ++i) {
    first[i + 1] = first[i] + (th[ks[i]].numel() + size - 1) / size;
    out_bytes += 2 * th[ks[i]].numel() * static_cast<int64_t>(sizeof(T));
  }
  const bool stream = out_bytes >= kStreamBytes;
  at::parallel_for(0, first.back(), 64, [&](int64_t b, int64_t e) {
    size_t i = std::upper_bound(first.begin(), first.end(), b) - first.begin() - 1;
    for (; b < e; ++i) {
      const size_t k = ks[i];
      const int64_t stop = std::min(e, first[i + 1]);
      leaf(isa, th[k].const_data_ptr<T>(), m[k].const_data_ptr<T>(), g[k].const_data_ptr<T>(),
           tho[k].mutable_data_ptr<T>(), mo[k].mutable_data_ptr<T>(), th[k].numel(), seeds[k], c, b - first[i],
           stop - first[i], stream);
      b = stop;
    }
  });
}

}  // namespace

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> sghmc_step(
    at::TensorList params, at::TensorList momenta, at::TensorList grads, double step, double keep, double lr,
    double scale, int64_t seed) {
  check_leaves(params, momenta, grads);
  const size_t leaves = params.size();
  std::vector<at::Tensor> th(leaves), m(leaves), g(leaves), params_out(leaves), momenta_out(leaves);
  std::vector<uint64_t> seeds(leaves);
  std::vector<size_t> floats, doubles;
  for (size_t k = 0; k < leaves; ++k) {
    th[k] = params[k].contiguous();
    m[k] = momenta[k].contiguous();
    g[k] = grads[k].contiguous();
    params_out[k] = at::empty_like(th[k], at::MemoryFormat::Contiguous);
    momenta_out[k] = at::empty_like(m[k], at::MemoryFormat::Contiguous);
    seeds[k] = static_cast<uint64_t>(seed) + static_cast<uint64_t>(k) * 0x9E3779B97F4A7C15ull;
    (th[k].scalar_type() == at::kFloat ? floats : doubles).push_back(k);
  }
  if (!floats.empty()) {
    update_leaves<float>(floats, th, m, g, params_out, momenta_out, seeds,
                         {static_cast<float>(step), static_cast<float>(keep), static_cast<float>(lr),
                          static_cast<float>(scale)});
  }
  if (!doubles.empty()) {
    update_leaves<double>(doubles, th, m, g, params_out, momenta_out, seeds, {step, keep, lr, scale});
  }
  return {params_out, momenta_out};
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("sghmc_step", &sghmc_step); }

}  // namespace posteriors_fast
