// posteriors_fast::lowrank_truncate_fold_ on the CPU: the second pass of
// ops/lowrank_truncate.py in one sweep over the rows of the new factor.
//
// For each row p (out holds (S U C·V₁)[p] on entry, R is (K, P) by rows):
//   out[p]  += Σ_k R[k, p] · right[k]                   (the Rᵀ·(s V₂) GEMM)
//   diag[p]  = max(base[p] + s²·Σ_k R[k, p]² + prior[p] − ‖out[p]‖², base[p])
//   inner   += out[p]ᵀ out[p] / diag[p],  proj += out[p] · g[p] / diag[p]
// so R is read once, where ATen's skinny GEMM, the column sums of R², the
// norms and the Woodbury sums make four passes (benchmarks/bench_lowrank_truncate.py).
// Rows go in blocks of kBlock: the block's columns of R are packed, its new
// rows computed a register tile (kTile rows × kCols columns) at a time across
// the K rows of R, kept transposed for the norms and the Woodbury sums. Those
// sums accumulate in the factor's dtype within a block and in double across
// blocks, per task, tasks added in order. Loops are built per ISA level
// (PF_ISA_VARIANTS, multiversion.h).
// Schema and semantics: posteriors_fast/_library.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "multiversion.h"

#include <algorithm>
#include <vector>

namespace posteriors_fast {
namespace {

// Factor columns per register tile: 8 keeps the tile's sums in 8 vector
// registers and wastes little of a rank that is not a multiple of it.
constexpr int64_t kCols = 8;
// Rows of a block: R's columns for them are packed into a contiguous (K, kBlock)
// buffer first (K sequential reads instead of K concurrent strided streams,
// which the hardware prefetchers do not follow), and the block's new rows are
// kept transposed, (r, kBlock), for the norms and the Woodbury sums.
constexpr int64_t kBlock = 128;
// Rows per parallel task at least, and tasks at most: each task keeps r² + r
// doubles of Woodbury sums, added in task order at the end.
constexpr int64_t kGrain = 4096;
constexpr int64_t kMaxTasks = 256;

// One block of rows [p0, p0 + w), w <= kBlock. buf: (k, kBlock) scratch;
// outt: (r_padded, kBlock) scratch; sums: r·r + r values of T, added to.
template <typename T>
PF_ALWAYS_INLINE void block_body(T* out, T* diag, const T* rows, int64_t ld, int64_t k, const T* right_padded,
                                 const T* base, const T* prior, const T* g, int64_t r, int64_t r_padded, T scale2,
                                 int64_t p0, int64_t w, T* buf, T* outt, T* sums) {
  constexpr int64_t kTile = 64 / sizeof(T);  // rows per register tile: one 512-bit register
  T sq[kBlock];
#pragma omp simd
  for (int64_t i = 0; i < kBlock; ++i) sq[i] = 0;
  for (int64_t kk = 0; kk < k; ++kk) {
    const T* src = rows + kk * ld + p0;
    T* dst = buf + kk * kBlock;
    if (w == kBlock) {
#pragma omp simd
      for (int64_t i = 0; i < kBlock; ++i) {
        dst[i] = src[i];
        sq[i] += src[i] * src[i];
      }
    } else {
      for (int64_t i = 0; i < kBlock; ++i) dst[i] = i < w ? src[i] : T(0);
#pragma omp simd
      for (int64_t i = 0; i < kBlock; ++i) sq[i] += dst[i] * dst[i];
    }
  }
  // outt = (Rᵀ right)ᵀ for the block, a register tile (kCols × kTile) at a time.
  for (int64_t s0 = 0; s0 < kBlock; s0 += kTile) {
    for (int64_t j0 = 0; j0 < r_padded; j0 += kCols) {
      T acc[kCols][kTile];
      for (int64_t j = 0; j < kCols; ++j) {
#pragma omp simd
        for (int64_t i = 0; i < kTile; ++i) acc[j][i] = 0;
      }
      for (int64_t kk = 0; kk < k; ++kk) {
        const T* v = buf + kk * kBlock + s0;
        const T* coef = right_padded + kk * r_padded + j0;
        for (int64_t j = 0; j < kCols; ++j) {
          const T c = coef[j];
#pragma omp simd
          for (int64_t i = 0; i < kTile; ++i) acc[j][i] += v[i] * c;
        }
      }
      for (int64_t j = 0; j < kCols; ++j) {
#pragma omp simd
        for (int64_t i = 0; i < kTile; ++i) outt[(j0 + j) * kBlock + s0 + i] = acc[j][i];
      }
    }
  }
  // Add the U part (row-major in out), write the rows back.
  for (int64_t i = 0; i < w; ++i) {
    T* row = out + (p0 + i) * r;
    for (int64_t j = 0; j < r; ++j) {
      const T value = outt[j * kBlock + i] + row[j];
      outt[j * kBlock + i] = value;
      row[j] = value;
    }
  }
  for (int64_t j = 0; j < r; ++j) {  // rows past w hold zeros
    for (int64_t i = w; i < kBlock; ++i) outt[j * kBlock + i] = 0;
  }
  // The fold: d = max(d_p + s²·Σ R² + rowsum(U_p²) − rowsum(U_new²), d_p).
  T norm[kBlock], inv[kBlock];
#pragma omp simd
  for (int64_t i = 0; i < kBlock; ++i) norm[i] = 0;
  for (int64_t j = 0; j < r; ++j) {
    const T* col = outt + j * kBlock;
#pragma omp simd
    for (int64_t i = 0; i < kBlock; ++i) norm[i] += col[i] * col[i];
  }
  for (int64_t i = 0; i < w; ++i) {
    const int64_t p = p0 + i;
    const T value = std::max(base[p] + scale2 * sq[i] + prior[p] - norm[i], base[p]);
    diag[p] = value;
    inv[i] = T(1) / value;
  }
  if (g == nullptr) return;
  // The Woodbury sums over the block: inner[j][l] = Σ_i x_j[i]·u_l[i] (upper
  // half; the caller mirrors), proj[j] = Σ_i x_j[i]·g[i], x_j = u_j / d.
  T gw[kBlock], x[kBlock];
  for (int64_t i = 0; i < kBlock; ++i) {
    gw[i] = i < w ? g[p0 + i] : T(0);
    inv[i] = i < w ? inv[i] : T(0);
  }
  for (int64_t j = 0; j < r; ++j) {
    const T* uj = outt + j * kBlock;
    T pj = 0;
#pragma omp simd reduction(+ : pj)
    for (int64_t i = 0; i < kBlock; ++i) {
      x[i] = uj[i] * inv[i];
      pj += x[i] * gw[i];
    }
    sums[r * r + j] += pj;
    for (int64_t l = j; l < r; ++l) {
      const T* ul = outt + l * kBlock;
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < kBlock; ++i) dot += x[i] * ul[i];
      sums[j * r + l] += dot;
    }
  }
}

PF_ISA_VARIANTS(template <typename T>, void, block,
                (T * out, T* diag, const T* rows, int64_t ld, int64_t k, const T* right_padded, const T* base,
                 const T* prior, const T* g, int64_t r, int64_t r_padded, T scale2, int64_t p0, int64_t w, T* buf,
                 T* outt, T* sums),
                (out, diag, rows, ld, k, right_padded, base, prior, g, r, r_padded, scale2, p0, w, buf, outt, sums))

template <typename T>
void fold_impl(at::Tensor& factor, at::Tensor& diag, const at::Tensor& rows, const at::Tensor& right,
               const at::Tensor& base, const at::Tensor& prior, double scale2, const at::Tensor* vector,
               at::Tensor& inner, at::Tensor& proj) {
  const int64_t size = factor.size(0), r = factor.size(1), k = rows.size(0);
  const int64_t r_padded = (r + kCols - 1) / kCols * kCols;
  // right, zero-padded to whole column tiles, so the register tile has a
  // compile-time width.
  std::vector<T> padded(static_cast<size_t>(k * r_padded), T(0));
  const at::Tensor right_c = right.contiguous();
  const T* rd = right_c.const_data_ptr<T>();
  for (int64_t kk = 0; kk < k; ++kk) std::copy(rd + kk * r, rd + kk * r + r, padded.begin() + kk * r_padded);
  T* out = factor.mutable_data_ptr<T>();
  T* dg = diag.mutable_data_ptr<T>();
  const T* rw = rows.const_data_ptr<T>();
  const T* bs = base.const_data_ptr<T>();
  const T* pr = prior.const_data_ptr<T>();
  const T* g = vector == nullptr ? nullptr : vector->const_data_ptr<T>();
  const int64_t ld = rows.stride(0);
  const Isa isa = active_isa();
  // A multiple of kBlock, so only the last block of the last task is partial.
  const int64_t grain =
      std::max(kGrain, ((size + kMaxTasks - 1) / kMaxTasks + kBlock - 1) / kBlock * kBlock);
  const int64_t tasks = std::max<int64_t>(1, (size + grain - 1) / grain);
  const int64_t width = r * r + r;
  // One slot of Woodbury sums per task (in double; within a block in T),
  // summed in task order: the result does not depend on which thread ran
  // which task.
  std::vector<double> slots(g == nullptr ? 0 : static_cast<size_t>(tasks * width), 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> buf(static_cast<size_t>(std::max<int64_t>(k, 1) * kBlock));
    std::vector<T> outt(static_cast<size_t>(r_padded * kBlock));
    std::vector<T> sums(g == nullptr ? 0 : static_cast<size_t>(width));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t stop = std::min(size, (t + 1) * grain);
      double* slot = g == nullptr ? nullptr : slots.data() + t * width;
      for (int64_t p0 = t * grain; p0 < stop; p0 += kBlock) {
        if (g != nullptr) std::fill(sums.begin(), sums.end(), T(0));
        block(isa, out, dg, rw, ld, k, padded.data(), bs, pr, g, r, r_padded, static_cast<T>(scale2), p0,
              std::min(kBlock, stop - p0), buf.data(), outt.data(), g == nullptr ? nullptr : sums.data());
        if (g != nullptr) {
          for (int64_t i = 0; i < width; ++i) slot[i] += sums[i];
        }
      }
    }
  });
  if (g == nullptr) return;
  double* in = inner.mutable_data_ptr<double>();
  double* pj = proj.mutable_data_ptr<double>();
  for (int64_t t = 0; t < tasks; ++t) {
    const double* slot = slots.data() + t * width;
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t l = j; l < r; ++l) in[j * r + l] += slot[j * r + l];
      pj[j] += slot[r * r + j];
    }
  }
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t l = 0; l < j; ++l) in[j * r + l] = in[l * r + j];
  }
}

void check(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype, bool rows) {
  TORCH_CHECK(t.sizes() == shape, "posteriors_fast::lowrank_truncate_fold_: ", name, " must have shape ", shape,
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "posteriors_fast::lowrank_truncate_fold_: ", name, " must be ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "posteriors_fast::lowrank_truncate_fold_: ", name, " must be a CPU tensor");
  TORCH_CHECK(rows ? (t.dim() == 2 && t.stride(1) == 1) : t.is_contiguous(),
              "posteriors_fast::lowrank_truncate_fold_: ", name,
              rows ? " must have unit stride along its last dimension" : " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_truncate_fold_(at::Tensor factor, at::Tensor diag, const at::Tensor& rows,
                                                          const at::Tensor& right, const at::Tensor& base,
                                                          const at::Tensor& prior, double scale2,
                                                          const std::optional<at::Tensor>& vector) {
  TORCH_CHECK(factor.dim() == 2, "posteriors_fast::lowrank_truncate_fold_: factor must be 2-D (P, r), got ",
              factor.sizes());
  const auto dtype = factor.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "posteriors_fast::lowrank_truncate_fold_: factor must be float32 or float64, got ", dtype);
  const int64_t size = factor.size(0), r = factor.size(1);
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == size, "posteriors_fast::lowrank_truncate_fold_: rows must be (K, ",
              size, "), got ", rows.sizes());
  const int64_t k = rows.size(0);
  check(factor, "factor", {size, r}, dtype, false);
  check(diag, "diag", {size}, dtype, false);
  check(rows, "rows", {k, size}, dtype, true);
  TORCH_CHECK(right.sizes() == at::IntArrayRef({k, r}) && right.scalar_type() == dtype,
              "posteriors_fast::lowrank_truncate_fold_: right must be (", k, ", ", r, ") of ", dtype, ", got ",
              right.sizes(), " of ", right.scalar_type());
  check(base, "base", {size}, dtype, false);
  check(prior, "prior", {size}, dtype, false);
  if (vector.has_value()) check(*vector, "vector", {size}, dtype, false);
  const bool sums = vector.has_value();
  auto options = factor.options().dtype(at::kDouble);
  at::Tensor inner = at::zeros(sums ? at::IntArrayRef({r, r}) : at::IntArrayRef({0, 0}), options);
  at::Tensor proj = at::zeros(sums ? at::IntArrayRef({r}) : at::IntArrayRef({0}), options);
  AT_DISPATCH_FLOATING_TYPES(dtype, "lowrank_truncate_fold_", [&] {
    fold_impl<scalar_t>(factor, diag, rows, right, base, prior, scale2, sums ? &*vector : nullptr, inner, proj);
  });
  return {inner, proj};
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("lowrank_truncate_fold_", &lowrank_truncate_fold_); }

}  // namespace posteriors_fast
