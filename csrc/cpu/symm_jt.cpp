// posteriors_fast::symm_jt on the CPU: S·Jᵀ for a symmetric S (P × P) and J
// (R × P), the Σ·Jᵀ of the Woodbury EKF step. Schema and semantics:
// posteriors_fast/_library.py.
//
// Row by row: (S·Jᵀ)[i][:] = Σ_k S[i][k]·Jᵀ[k][:]. Jᵀ is packed once into
// panels of NR columns (gemm_avx512.h's pack_transposed); each task is a
// block of kMr output rows, whose micro-kernel broadcasts from kMr rows of S
// as stored, read along k in long sequential runs that the hardware
// prefetchers follow, against a Jᵀ panel: S is read once and never packed
// (a kernel that packed column bands of S chunk by chunk, reading it in
// short runs, took 1.1-1.6x as long at P = 1045-5000, R = 8-256;
// benchmarks/bench_symm_jt.py compares with torch.mm, which runs MKL's AVX2
// kernels on AMD CPUs). Below the avx512 ISA level (multiversion.h), for an
// S that is not row-major, or for R < kMinR, one ATen GEMM.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gemm_avx512.h"
#include "tasks.h"

namespace posteriors_fast {
namespace {

void check_inputs(const at::Tensor& s, const at::Tensor& j) {
  TORCH_CHECK(j.dim() == 2, "posteriors_fast::symm_jt: j must be 2-D (R, P), got ", j.sizes());
  const int64_t p = j.size(1);
  TORCH_CHECK(s.dim() == 2 && s.size(0) == p && s.size(1) == p, "posteriors_fast::symm_jt: s must be (", p, ", ",
              p, "), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble,
              "posteriors_fast::symm_jt: s must be float32 or float64, got ", s.scalar_type());
  TORCH_CHECK(j.scalar_type() == s.scalar_type(), "posteriors_fast::symm_jt: j dtype ", j.scalar_type(),
              " differs from s dtype ", s.scalar_type());
  TORCH_CHECK(s.device().is_cpu() && j.device().is_cpu(), "posteriors_fast::symm_jt: CPU tensors only");
}

#if PF_HAVE_V4_KERNELS
namespace v4 = gemm_v4;

constexpr int64_t kMr = 6;     // output rows per micro-tile
constexpr int64_t kNvMax = 4;  // vectors of output columns per micro-tile (R = 64 in float32: one panel)
constexpr int64_t kMinR = 4;     // from R = 4 the kernel beats at::mm (P = 2410, 4890)
constexpr int64_t kChunk = 256;  // terms of k summed in registers before they are added to the output

// out[r][:ncols] (=, or += unless `first`) Σ_{k0 <= k < k1} rows[r][k]·bp[k][:]
// for r < nrows, bp a Jᵀ panel (NR columns, k-major); rows[r] for r >= nrows
// points at a valid row whose results are dropped. The rows are prefetched
// kAhead entries ahead, a line per row every kLine steps.
template <typename T, int MR, int NV>
PF_TARGET_V4 void row_tile(const T* const* rows, const T* bp, int64_t k0, int64_t k1, int64_t p, T* out, int64_t ld,
                           int64_t nrows, int64_t ncols, bool first) {
  using S = v4::Simd<T>;
  constexpr int64_t L = S::L, NR = NV * L, kLine = 64 / sizeof(T), kAhead = 8 * kLine;
  typename S::reg acc[MR][NV];
  v4::tile_fma<T, MR, NV>(
      acc, bp + k0 * NR, k1 - k0, [&](int64_t k, int r) { return rows[r][k0 + k]; },
      [&](int64_t k) {
        if (((k0 + k) & (kLine - 1)) == 0) {
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) __builtin_prefetch(rows[r] + std::min(k0 + k + kAhead, p - 1), 0, 3);
        }
      });
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    if (r >= nrows) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const typename S::mask m = v4::lanes<T>(0, ncols - v * L);
      if (m == 0) continue;
      T* dst = out + r * ld + v * L;
      S::storem(dst, m, first ? acc[r][v] : S::add(acc[r][v], S::loadm(m, dst)));
    }
  }
}

// kNv vectors of output columns per micro-tile: the fewest that hold R when
// R fits in kNvMax vectors (a narrower tile computes no padding columns: at
// R = 4 the widest one did 64 columns of work for four), else kNvMax.
template <typename T, int kNv>
void symm_jt_run(at::Tensor& out, const at::Tensor& s, const at::Tensor& j) {
  constexpr int64_t NR = kNv * v4::Simd<T>::L;
  const int64_t r = j.size(0), p = j.size(1);
  const int64_t panels = (r + NR - 1) / NR;
  // Jᵀ packed once for all tasks: panel q holds columns [q·NR, q·NR + NR),
  // k-major over all P rows of Jᵀ.
  auto jp = v4::aligned_buffer<T>(panels * NR * p);
  if (j.stride(1) == 1) {
    v4::pack_transposed<T, NR>(jp.get(), j.const_data_ptr<T>(), j.stride(0), r, p);
  } else {
    const v4::Matrix<T> jt{j.const_data_ptr<T>(), j.stride(1), j.stride(0)};
    v4::pack<T, NR>(jp.get(), jt, 0, p, 0, r);
  }
  const T* sp = s.const_data_ptr<T>();
  const int64_t lds = s.stride(0);
  T* o = out.mutable_data_ptr<T>();
  const int64_t ld = out.stride(0);
  const int64_t ntasks = (p + kMr - 1) / kMr;
  run_tasks(ntasks, [&](const auto& claim) {
    for (int64_t t = claim(); t < ntasks; t = claim()) {
      const int64_t i0 = t * kMr, nrows = std::min(kMr, p - i0);
      const T* rows[kMr];
      for (int64_t x = 0; x < kMr; ++x) rows[x] = sp + (i0 + std::min(x, nrows - 1)) * lds;
      // Partial sums of kChunk terms added into the output: the rounding of
      // a blocked GEMM, not of one running sum over all of P (float32,
      // P = 2410: about 6x the error of the chunked sums).
      for (int64_t q = 0; q < panels; ++q) {
        for (int64_t k0 = 0; k0 < p; k0 += kChunk) {
          row_tile<T, kMr, kNv>(rows, jp.get() + q * NR * p, k0, std::min(p, k0 + kChunk), p, o + i0 * ld + q * NR, ld,
                                nrows, std::min(NR, r - q * NR), k0 == 0);
        }
      }
    }
  });
}
#endif

}  // namespace

at::Tensor symm_jt(const at::Tensor& s, const at::Tensor& j) {
  check_inputs(s, j);
  at::Tensor out = at::empty({j.size(1), j.size(0)}, s.options());
  if (out.numel() == 0) return out;
#if PF_HAVE_V4_KERNELS
  // Fewer than kMinR columns is a matrix-vector product, bound by reading S
  // once: ATen's GEMV does that without the tile packing.
  if (active_isa() == Isa::kAvx512 && s.stride(1) == 1 && j.size(0) >= kMinR) {
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "symm_jt_avx512", [&] {
      constexpr int64_t L = v4::Simd<scalar_t>::L;
      switch (std::min<int64_t>((j.size(0) + L - 1) / L, kNvMax)) {
        case 1: symm_jt_run<scalar_t, 1>(out, s, j); break;
        case 2: symm_jt_run<scalar_t, 2>(out, s, j); break;
        case 3: symm_jt_run<scalar_t, 3>(out, s, j); break;
        default: symm_jt_run<scalar_t, kNvMax>(out, s, j); break;
      }
    });
    return out;
  }
#endif
  at::mm_out(out, s, j.t());
  return out;
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("symm_jt", &symm_jt); }

}  // namespace posteriors_fast
