// posteriors_fast::symm_jt on the CPU: S·Jᵀ for a symmetric S (P × P) and J
// (R × P), the Σ·Jᵀ of the Woodbury EKF step. Schema and semantics:
// posteriors_fast/_library.py.
//
// S is symmetric, so (S·Jᵀ)[i][j] = Σ_k S[k][i]·J[j][k]: S's rows are the
// broadcast operand of gemm_avx512.h's micro-kernel as stored (no transpose)
// and Jᵀ, packed once, the vector operand. Each task is a band of kRows
// output rows, all R columns; its S panel is packed chunk by chunk, so S is
// read once (benchmarks/bench_symm_jt.py: against torch.mm, which runs MKL's
// AVX2 kernels on AMD CPUs). Below the avx512 ISA level (multiversion.h),
// for an S that is not row-major, or for R < kMinR, one ATen GEMM.
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
constexpr int64_t kRows = 96;  // output rows per task (a multiple of kMr)
constexpr int64_t kMinR = 4;   // from R = 4 the kernel beats at::mm (P = 2410, 4890)

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
  const v4::Matrix<T> sm{s.const_data_ptr<T>(), s.stride(0), 1};
  T* o = out.mutable_data_ptr<T>();
  const int64_t ld = out.stride(0);
  const int64_t ntasks = (p + kRows - 1) / kRows;
  const int64_t kc_max = std::min(v4::kKc, std::max<int64_t>(p, 1));
  run_tasks(ntasks, [&](const auto& claim) {
    // The S tile as kc rows of kRows entries (row k: S[k0 + k][r0, r0 + rows));
    // entries past the band's rows are read, never written out: zeroed once.
    auto sp = v4::aligned_buffer<T>(kRows * kc_max);
    std::fill(sp.get(), sp.get() + kRows * kc_max, T(0));
    for (int64_t t = claim(); t < ntasks; t = claim()) {
      const int64_t r0 = t * kRows, rows = std::min(kRows, p - r0), row_end = r0 + rows;
      for (int64_t k0 = 0; k0 < p; k0 += v4::kKc) {
        const int64_t kc = std::min(v4::kKc, p - k0);
        v4::copy_rows(sp.get(), kRows, sm, k0, kc, r0, rows);
        // The next chunk's S tile (kKc rows, each a short run of `rows`
        // entries) is prefetched into L2 a slice per row block while this one
        // computes: read in tile order from memory it is latency-bound, and
        // slower than torch.mm without the prefetch.
        const int64_t next_k0 = k0 + kc, next_kc = std::min(v4::kKc, p - next_k0);
        const int64_t blocks = (rows + kMr - 1) / kMr;
        const int64_t per_block = (next_kc + blocks - 1) / blocks;
        for (int64_t i0 = r0; i0 < row_end; i0 += kMr) {
          const int64_t first_row = next_k0 + ((i0 - r0) / kMr) * per_block;
          const int64_t last_row = std::min(next_k0 + next_kc, first_row + per_block);
          for (int64_t k = first_row; k < last_row; ++k) {
            const T* row = sm.data + k * sm.s0 + r0;
            for (int64_t x = 0; x < rows; x += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(row + x, 0, 2);
            __builtin_prefetch(row + rows - 1, 0, 2);
          }
          for (int64_t q = 0; q < panels; ++q) {
            // beta = 0: the first chunk writes, later ones accumulate; `out`
            // stands in for the unread C.
            v4::micro_tile<T, kMr, kNv>(sp.get() + (i0 - r0), kRows, jp.get() + q * NR * p + k0 * NR, kc, o, ld, o, ld,
                                        i0, q * NR, row_end, r, false, k0 == 0, T(1), T(0));
          }
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
