// AVX-512 GEMM building blocks (x86-64-v4 CPUs) and the body of
// posteriors_fast::syrk_; symm_jt.cpp uses its SIMD wrappers, packing and
// register-tile loop (tile_fma).
// The ops run these at the avx512 ISA level (active_isa(), multiversion.h),
// else ATen GEMMs.
//
// Own micro-kernel rather than ATen GEMMs because MKL runs its AVX2 kernels on
// AMD CPUs (one AVX-512 core does more than twice MKL's sgemm FMA rate there),
// and with (K, tile) panels as small as here its packing and call overhead
// cost another third (benchmarks/bench_syrk.py and bench_symm_jt.py time the
// kernels; tests set the ISA level to compare with the ATen tiles).
//
// Structure (the usual GEMM blocking, after BLIS):
//   task   = one tile of the result, handed out to the threads dynamically,
//            largest first;
//   K      = chunks of kKc: each copies A's part of the tile as row runs
//            (copy_rows) and packs B's part into NR-column panels,
//            zero-padded (pack);
//   micro  = MR × NR block of AᵀB in 24 zmm accumulators (MR rows broadcast,
//            NR = NV vectors of columns), written straight into `out` with
//            beta·C fused on the first chunk (C is not read when beta == 0);
//   mirror = (syrk) after the tile's last chunk, its transposed copy onto the
//            lower triangle in 8 × 8 (float) / 4 × 4 (double) register
//            transposes while the tile is still in L2.
#pragma once

#include "multiversion.h"

#if PF_HAVE_V4_KERNELS

#include <ATen/ATen.h>

#include "tasks.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace posteriors_fast {
namespace gemm_v4 {

constexpr int64_t kMr = 8;      // syrk: rows of a micro-tile (broadcast operands)
constexpr int64_t kNv = 3;      // syrk: vectors of columns in a micro-tile
constexpr int64_t kKc = 128;    // K chunk: panels of kTile × kKc stay in L2
constexpr int64_t kTile = 240;  // multiple of kMr and of both NRs (48, 24)

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int64_t L = 16;
  PF_TARGET_V4 static inline reg zero() { return _mm512_setzero_ps(); }
  PF_TARGET_V4 static inline reg load(const float* p) { return _mm512_load_ps(p); }
  PF_TARGET_V4 static inline reg set1(float x) { return _mm512_set1_ps(x); }
  PF_TARGET_V4 static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  PF_TARGET_V4 static inline reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  PF_TARGET_V4 static inline reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  PF_TARGET_V4 static inline reg loadm(mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  PF_TARGET_V4 static inline void storem(float* p, mask m, reg x) { _mm512_mask_storeu_ps(p, m, x); }
};

template <>
struct Simd<double> {
  using reg = __m512d;
  using mask = __mmask8;
  static constexpr int64_t L = 8;
  PF_TARGET_V4 static inline reg zero() { return _mm512_setzero_pd(); }
  PF_TARGET_V4 static inline reg load(const double* p) { return _mm512_load_pd(p); }
  PF_TARGET_V4 static inline reg set1(double x) { return _mm512_set1_pd(x); }
  PF_TARGET_V4 static inline reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  PF_TARGET_V4 static inline reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  PF_TARGET_V4 static inline reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  PF_TARGET_V4 static inline reg loadm(mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  PF_TARGET_V4 static inline void storem(double* p, mask m, reg x) { _mm512_mask_storeu_pd(p, m, x); }
};

// Operand as (K, P) with arbitrary strides.
template <typename T>
struct Matrix {
  const T* data;
  int64_t s0, s1;
};

// dst[(idx / W) * kc * W + k * W + idx % W] = m[k0 + k][i0 + idx] for idx < n,
// zero up to the next multiple of W: panels of W consecutive indices, k-major.
template <typename T, int64_t W>
PF_TARGET_V4 void pack(T* dst, const Matrix<T>& m, int64_t k0, int64_t kc, int64_t i0, int64_t n) {
  const int64_t panels = (n + W - 1) / W;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t base = p * W, width = std::min<int64_t>(W, n - base);
    T* out = dst + p * kc * W;
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = m.data + (k0 + k) * m.s0 + (i0 + base) * m.s1;
      T* row = out + k * W;
      if (m.s1 == 1 && width == W) {
        std::memcpy(row, src, W * sizeof(T));  // constant size: vector moves
        continue;
      }
      if (m.s1 == 1) {
        for (int64_t w = 0; w < width; ++w) row[w] = src[w];
      } else {
        for (int64_t w = 0; w < width; ++w) row[w] = src[w * m.s1];
      }
      for (int64_t w = width; w < W; ++w) row[w] = T(0);
    }
  }
}

// dst[k * step + idx] = m[k0 + k][i0 + idx] for k < kc, idx < n: a tile's
// rows, each one run (one memcpy when m's columns are contiguous), which
// micro_tile reads with a_step = step.
template <typename T>
void copy_rows(T* dst, int64_t step, const Matrix<T>& m, int64_t k0, int64_t kc, int64_t i0, int64_t n) {
  for (int64_t k = 0; k < kc; ++k) {
    const T* src = m.data + (k0 + k) * m.s0 + i0 * m.s1;
    if (m.s1 == 1) {
      std::memcpy(dst + k * step, src, n * sizeof(T));
    } else {
      for (int64_t idx = 0; idx < n; ++idx) dst[k * step + idx] = src[idx * m.s1];
    }
  }
}

// Lanes [lo, hi) of a vector set, as a mask.
template <typename T>
inline typename Simd<T>::mask lanes(int64_t lo, int64_t hi) {
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, Simd<T>::L);
  if (hi <= lo) return 0;
  const uint32_t upto = hi >= 32 ? ~0u : ((1u << hi) - 1u);
  return static_cast<typename Simd<T>::mask>(upto & ~((1u << lo) - 1u));
}

// The register tile's inner loop, shared by micro_tile and symm_jt:
// acc[r][:] = Σ_{k < kc} a(k, r)·bp[k][:] for a packed B panel bp (NR
// columns, k-major); each_k(k) runs first at every k (prefetches). `a` reads
// the A operand wherever it lies: packed rows here, rows of S as stored in
// symm_jt.
template <typename T, int MR, int NV, typename AAt, typename EachK>
PF_TARGET_V4 inline void tile_fma(typename Simd<T>::reg (&acc)[MR][NV], const T* bp, int64_t kc, AAt a,
                                  EachK each_k) {
  using S = Simd<T>;
  constexpr int64_t L = S::L, NR = NV * L;
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = S::zero();
  }
  for (int64_t k = 0; k < kc; ++k) {
    each_k(k);
    const T* brow = bp + k * NR;
    typename S::reg bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = S::load(brow + v * L);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const typename S::reg ar = S::set1(a(k, r));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = S::fmadd(ar, bv[v], acc[r][v]);
    }
  }
}

// The MR × NR block of AᵀB from the A rows at `ap` (row k of the block at
// ap + k·a_step, as copy_rows lays them out) and the B panel `bp`, then
// out[i][j] = beta·C[i][j] + alpha·acc (first chunk) or out[i][j] += alpha·acc,
// for i < row_end, j < col_end and, on a diagonal tile, j >= i.
template <typename T, int MR, int NV>
PF_TARGET_V4 void micro_tile(const T* ap, int64_t a_step, const T* bp, int64_t kc, T* out, int64_t ld, const T* c,
                             int64_t ldc, int64_t i0, int64_t j0, int64_t row_end, int64_t col_end, bool diagonal,
                             bool first, T alpha, T beta) {
  using S = Simd<T>;
  constexpr int64_t L = S::L, NR = NV * L;
  const bool read_c = first && beta != T(0);
  // The C rows and output rows of the next row block (the same columns, a
  // tile row of micro-tiles later) arrive while these FMAs run: C and the
  // output are P × P, in L3 or memory: with cold caches this steadies the
  // time, where each block fetching its own rows varied by a quarter.
  constexpr int64_t kLine = 64 / sizeof(T);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t i = std::min(i0 + MR + r, row_end - 1);
#pragma GCC unroll 4
    for (int64_t x = 0; x < NR; x += kLine) {
      if (read_c) __builtin_prefetch(c + i * ldc + j0 + x, 0, 3);
      __builtin_prefetch(out + i * ld + j0 + x, 1, 3);
    }
  }
  typename S::reg acc[MR][NV];
  tile_fma<T, MR, NV>(acc, bp, kc, [&](int64_t k, int r) { return ap[k * a_step + r]; }, [](int64_t) {});
  const typename S::reg va = S::set1(alpha), vb = S::set1(beta);
  // Interior blocks (the vast majority) take full vectors; edge blocks and
  // blocks that cross the diagonal are masked lane by lane.
  const bool whole = i0 + MR <= row_end && j0 + NR <= col_end && (!diagonal || j0 >= i0 + MR - 1);
  const typename S::mask all = static_cast<typename S::mask>(~0u);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t i = i0 + r;
    if (i >= row_end) break;
    T* orow = out + i * ld;
    const T* crow = c + i * ldc;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t j = j0 + v * L;
      const typename S::mask m = whole ? all : lanes<T>(diagonal ? i - j : 0, col_end - j);
      if (m == 0) continue;
      typename S::reg x = S::mul(va, acc[r][v]);
      if (read_c) {
        x = S::fmadd(vb, S::loadm(m, crow + j), x);
      } else if (!first) {
        x = S::add(x, S::loadm(m, orow + j));
      }
      S::storem(orow + j, m, x);
    }
  }
}


// 8 × 8 float / 4 × 4 double register transposes: dst[c][r] = src[r][c].
PF_TARGET_V4 inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

PF_TARGET_V4 inline void transpose_block(const double* src, int64_t lds, double* dst, int64_t ldd) {
  const __m256d r0 = _mm256_loadu_pd(src), r1 = _mm256_loadu_pd(src + lds);
  const __m256d r2 = _mm256_loadu_pd(src + 2 * lds), r3 = _mm256_loadu_pd(src + 3 * lds);
  const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
  const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
  _mm256_storeu_pd(dst, _mm256_permute2f128_pd(t0, t2, 0x20));
  _mm256_storeu_pd(dst + ldd, _mm256_permute2f128_pd(t1, t3, 0x20));
  _mm256_storeu_pd(dst + 2 * ldd, _mm256_permute2f128_pd(t0, t2, 0x31));
  _mm256_storeu_pd(dst + 3 * ldd, _mm256_permute2f128_pd(t1, t3, 0x31));
}

// out[c][r] = out[r][c] over the tile rows [r0, r0 + rows) × columns
// [c0, c0 + cols) of the upper triangle; a diagonal tile (r0 == c0) copies
// only its part above the diagonal.
template <typename T>
PF_TARGET_V4 void mirror_tile(T* out, int64_t ld, int64_t r0, int64_t rows, int64_t c0, int64_t cols, bool diagonal) {
  constexpr int64_t B = 32 / sizeof(T);
  // Destination-row-major order: each lower row segment is written start to
  // end while the source tile is read from L2.
  for (int64_t cb = 0; cb < cols; cb += B) {
    const int64_t rb_end = diagonal ? std::min(rows, cb + B) : rows;
    {
      // The next block's destination rows (lower triangle: not in cache
      // after other work) are fetched for writing while this block is
      // copied (with cold caches about a tenth faster).
      const int64_t next_end = diagonal ? std::min(rows, cb + 2 * B) : rows;
      for (int64_t c = cb + B; c < std::min(cols, cb + 2 * B); ++c) {
        T* dst = out + (c0 + c) * ld + r0;
        for (int64_t x = 0; x < next_end; x += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(dst + x, 1, 3);
      }
    }
    for (int64_t rb = 0; rb < rb_end; rb += B) {
      if (rb + B <= rows && cb + B <= cols && !(diagonal && cb == rb)) {
        transpose_block(out + (r0 + rb) * ld + c0 + cb, ld, out + (c0 + cb) * ld + r0 + rb, ld);
        continue;
      }
      const int64_t re = std::min(rows, rb + B), ce = std::min(cols, cb + B);
      for (int64_t r = rb; r < re; ++r) {
        for (int64_t c = diagonal ? std::max(cb, r + 1) : cb; c < ce; ++c) {
          out[(c0 + c) * ld + r0 + r] = out[(r0 + r) * ld + c0 + c];
        }
      }
    }
  }
}

// dst[(j / W) * p * W + k * W + j % W] = m[j][k] for j < r, k < p (m row-major
// with leading dimension ldm), zero up to the next multiple of W: the panels
// pack<T, W> makes of mᵀ, built with register transposes instead of strided
// loads (P = 1045, R = 64: the strided loop took about a tenth of symm_jt).
template <typename T, int64_t W>
PF_TARGET_V4 void pack_transposed(T* dst, const T* m, int64_t ldm, int64_t r, int64_t p) {
  constexpr int64_t B = 32 / sizeof(T);
  static_assert(W % B == 0, "panel width must be a multiple of the transpose block");
  const int64_t panels = (r + W - 1) / W;
  for (int64_t q = 0; q < panels; ++q) {
    T* panel = dst + q * p * W;
    for (int64_t jb = 0; jb < W; jb += B) {
      const int64_t j0 = q * W + jb;
      for (int64_t k0 = 0; k0 < p; k0 += B) {
        if (j0 + B <= r && k0 + B <= p) {
          transpose_block(m + j0 * ldm + k0, ldm, panel + k0 * W + jb, W);
          continue;
        }
        for (int64_t k = k0; k < std::min(p, k0 + B); ++k) {
          for (int64_t j = j0; j < j0 + B; ++j) panel[k * W + (j - q * W)] = j < r ? m[j * ldm + k] : T(0);
        }
      }
    }
  }
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T, AlignedFree> aligned_buffer(int64_t count) {
  const size_t bytes = ((static_cast<size_t>(count) * sizeof(T) + 63) / 64) * 64;
  T* p = static_cast<T*>(std::aligned_alloc(64, std::max<size_t>(bytes, 64)));
  TORCH_CHECK(p != nullptr, "posteriors_fast: out of memory for a ", bytes, "-byte packing buffer");
  return std::unique_ptr<T, AlignedFree>(p);
}

// syrk_: the whole update. `c` is row-major (stride(1) == 1) or is `out` itself.
template <typename T>
void syrk_run(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double alpha_,
         double beta_, bool mirror) {
  constexpr int64_t NR = kNv * Simd<T>::L;
  const int64_t k_total = a.size(0), p = a.size(1);
  const Matrix<T> am{a.const_data_ptr<T>(), a.stride(0), a.stride(1)};
  const Matrix<T> bm{b.const_data_ptr<T>(), b.stride(0), b.stride(1)};
  T* o = out.mutable_data_ptr<T>();
  const int64_t ld = out.stride(0);
  const bool in_place = c.is_same(out);
  const T* cp = in_place ? o : c.const_data_ptr<T>();
  const int64_t ldc = in_place ? ld : c.stride(0);
  const T alpha = static_cast<T>(alpha_), beta = static_cast<T>(beta_);

  struct Task {
    int64_t r0, rows, c0, cols;
  };
  std::vector<Task> tasks;
  for (int64_t r0 = 0; r0 < p; r0 += kTile) {
    for (int64_t c0 = r0; c0 < p; c0 += kTile) {
      tasks.push_back({r0, std::min(kTile, p - r0), c0, std::min(kTile, p - c0)});
    }
  }
  // Largest first (a diagonal tile is half the work), handed out dynamically.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& u, const Task& v) {
    return u.rows * u.cols / (u.r0 == u.c0 ? 2 : 1) > v.rows * v.cols / (v.r0 == v.c0 ? 2 : 1);
  });
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  const int64_t kc_max = std::min(kKc, std::max<int64_t>(k_total, 1));
  run_tasks(ntasks, [&](const auto& claim) {
    // Entries past a tile's rows are read by its last row block but never
    // written out; zeroed once so they start finite.
    auto ap = aligned_buffer<T>(kTile * kc_max);
    std::fill(ap.get(), ap.get() + kTile * kc_max, T(0));
    auto bp = aligned_buffer<T>(((kTile + NR - 1) / NR) * NR * kc_max);
    for (int64_t t = claim(); t < ntasks; t = claim()) {
      const Task& task = tasks[t];
      const bool diagonal = task.r0 == task.c0;
      const int64_t row_end = task.r0 + task.rows, col_end = task.c0 + task.cols;
      // At least one chunk: with K == 0 the result is beta·C.
      for (int64_t k0 = 0; k0 == 0 || k0 < k_total; k0 += kKc) {
        const int64_t kc = std::min(kKc, k_total - k0);
        copy_rows(ap.get(), kTile, am, k0, kc, task.r0, task.rows);
        pack<T, NR>(bp.get(), bm, k0, kc, task.c0, task.cols);
        // Row blocks outer: C and the output are then read and written a
        // whole tile row (a contiguous run) at a time, which the hardware
        // prefetchers follow; the B panels (kTile × kc) stay in L2.
        for (int64_t i0 = task.r0; i0 < row_end; i0 += kMr) {
          // On a diagonal tile, start at the first block reaching j >= i0.
          const int64_t j_first = diagonal ? task.c0 + ((i0 - task.c0) / NR) * NR : task.c0;
          for (int64_t j0 = j_first; j0 < col_end; j0 += NR) {
            micro_tile<T, kMr, kNv>(ap.get() + (i0 - task.r0), kTile, bp.get() + (j0 - task.c0) * kc, kc, o, ld, cp,
                                    ldc, i0, j0, row_end, col_end, diagonal, k0 == 0, alpha, beta);
          }
        }
      }
      if (mirror) mirror_tile<T>(o, ld, task.r0, task.rows, task.c0, task.cols, diagonal);
    }
  });
}

}  // namespace gemm_v4
}  // namespace posteriors_fast

#endif  // PF_HAVE_V4_KERNELS
