// posteriors_fast::normal_ on the CPU: fill a tensor with standard normal
// draws from the counter-based generator of philox.h.
//
// Element i depends only on (seed, i): the fill runs in parallel chunks and
// gives the same numbers for any thread count. torch's CPU normal_ draws from
// one serial mt19937 stream (benchmarks/bench_normal.py times the two).
// Schema and semantics: posteriors_fast/_library.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "multiversion.h"
#include "philox.h"

namespace posteriors_fast {
namespace {

// Same draws at every ISA level: no FMA contraction here or in philox.h.
PF_EXACT_FP_BEGIN

template <typename T, typename Engine>
PF_ALWAYS_INLINE void fill_impl(T* out, int64_t n, uint64_t seed, int64_t b, int64_t e) {
  using Block = philox::NormalBlock<T, Engine>;
  alignas(64) T z[Block::kSize];
  for (int64_t blk = b; blk < e; ++blk) {
    Block::fill(static_cast<uint64_t>(blk), seed, z);
    const int64_t base = blk * Block::kSize;
    std::copy(z, z + std::min<int64_t>(Block::kSize, n - base), out + base);
  }
}

#if PF_HAVE_V4_KERNELS
// avx512: the hand-written Philox engine.
PF_TARGET_V4 void fill_v4(float* out, int64_t n, uint64_t seed, int64_t b, int64_t e) {
  fill_impl<float, philox::Avx512>(out, n, seed, b, e);
}
PF_TARGET_V4 void fill_v4(double* out, int64_t n, uint64_t seed, int64_t b, int64_t e) {
  fill_impl<double, philox::Avx512>(out, n, seed, b, e);
}
#endif

// fill(isa, ...): blocks b .. e of the draws; avx2 and baseline build the
// portable engine for their target.
template <typename T>
PF_ALWAYS_INLINE void fill_body(T* out, int64_t n, uint64_t seed, int64_t b, int64_t e) {
  fill_impl<T, philox::Portable>(out, n, seed, b, e);
}
PF_ISA_VARIANTS_V4(template <typename T>, void, fill, fill_v4, (T* out, int64_t n, uint64_t seed, int64_t b, int64_t e),
                   (out, n, seed, b, e))

PF_EXACT_FP_END

}  // namespace

void normal_(at::Tensor out, int64_t seed) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(),
              "posteriors_fast::normal_: out must be a contiguous CPU tensor");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble,
              "posteriors_fast::normal_: out must be float32 or float64, got ", out.scalar_type());
  const int64_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "normal_", [&] {
    constexpr int64_t size = philox::NormalBlock<scalar_t>::kSize;
    scalar_t* d = out.mutable_data_ptr<scalar_t>();
    const Isa isa = active_isa();
    at::parallel_for(0, (n + size - 1) / size, 64, [&](int64_t b, int64_t e) {
      fill(isa, d, n, static_cast<uint64_t>(seed), b, e);
    });
  });
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("normal_", &normal_); }

}  // namespace posteriors_fast
