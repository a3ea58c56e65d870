// posteriors_fast::syrk_ on the CPU.
//
// out ← beta·C + alpha·AᵀB on the upper triangle, optionally mirrored onto
// the lower triangle (about half the FLOPs of a full AᵀB). At the avx512 ISA
// level (multiversion.h) the packed AVX-512 micro-kernel of gemm_avx512.h;
// below it (or for a C that is not row-major) one ATen GEMM per upper tile. Schemas and
// semantics: posteriors_fast/_library.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "gemm_avx512.h"
#include "syrk.h"
#include "tasks.h"

#include <algorithm>
#include <vector>

namespace posteriors_fast {
namespace {

// Tile edge of the GEMMs (below the avx512 level) and of the blocks of the
// transposed copy: 512 and 128 were the fastest pair of those tried at
// (P = 5000, K = 256) and (P = 20000, K = 64), the bench_syrk.py sizes.
constexpr int64_t kTile = 512;
constexpr int64_t kCopyBlock = 128;

// Smaller tiles for small P so that every thread gets work: at P = 1045 tiles
// of 256 were a third faster than 512 (and 128 no faster).
int64_t tile_for(int64_t p) { return p < 4096 ? 256 : kTile; }

template <typename scalar_t>
void mirror_tile(scalar_t* out, int64_t ld, int64_t i0, int64_t j0, int64_t rows, int64_t cols) {
  // out[j0 + c][i0 + r] = out[i0 + r][j0 + c] for the (rows × cols) tile at (i0, j0).
  for (int64_t rb = 0; rb < rows; rb += kCopyBlock) {
    for (int64_t cb = 0; cb < cols; cb += kCopyBlock) {
      const int64_t re = std::min(rows, rb + kCopyBlock);
      const int64_t ce = std::min(cols, cb + kCopyBlock);
      for (int64_t r = rb; r < re; ++r) {
        const scalar_t* src = out + (i0 + r) * ld + j0;
        for (int64_t c = cb; c < ce; ++c) {
          out[(j0 + c) * ld + i0 + r] = src[c];
        }
      }
    }
  }
}

template <typename scalar_t>
void write_diagonal_tile(scalar_t* out, int64_t ld, int64_t i0, const at::Tensor& value, bool mirror) {
  // value: contiguous (n × n) result for the diagonal tile at (i0, i0); only its
  // upper triangle is used, so the tile comes out exactly symmetric.
  const int64_t n = value.size(0);
  const scalar_t* v = value.const_data_ptr<scalar_t>();
  for (int64_t r = 0; r < n; ++r) {
    scalar_t* row = out + (i0 + r) * ld + i0;
    for (int64_t c = r; c < n; ++c) {
      row[c] = v[r * n + c];
    }
    if (mirror) {
      for (int64_t c = 0; c < r; ++c) {
        row[c] = v[c * n + r];
      }
    }
  }
}

void check_inputs(const at::Tensor& out, const at::Tensor& a, const std::optional<at::Tensor>& b,
                  const std::optional<at::Tensor>& c) {
  TORCH_CHECK(a.dim() == 2, "posteriors_fast::syrk_: a must be 2-D (K, P), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "posteriors_fast::syrk_: a must be float32 or float64, got ", a.scalar_type());
  const int64_t p = a.size(1);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == p && out.size(1) == p,
              "posteriors_fast::syrk_: out must be (", p, ", ", p, "), got ", out.sizes());
  TORCH_CHECK(out.stride(1) == 1 && out.stride(0) >= std::max<int64_t>(p, 1),
              "posteriors_fast::syrk_: out must be row-major (stride(1) == 1), got strides ", out.strides());
  TORCH_CHECK(out.scalar_type() == a.scalar_type(), "posteriors_fast::syrk_: out dtype ",
              out.scalar_type(), " differs from a dtype ", a.scalar_type());
  TORCH_CHECK(out.device().is_cpu() && a.device().is_cpu(), "posteriors_fast::syrk_: CPU tensors only");
  if (b.has_value()) {
    TORCH_CHECK(b->sizes() == a.sizes(), "posteriors_fast::syrk_: b must have a's shape ", a.sizes(),
                ", got ", b->sizes());
    TORCH_CHECK(b->scalar_type() == a.scalar_type() && b->device().is_cpu(),
                "posteriors_fast::syrk_: b must be a CPU tensor of a's dtype");
  }
  if (c.has_value()) {
    TORCH_CHECK(c->dim() == 2 && c->size(0) == p && c->size(1) == p,
                "posteriors_fast::syrk_: c must be (", p, ", ", p, "), got ", c->sizes());
    TORCH_CHECK(c->scalar_type() == a.scalar_type() && c->device().is_cpu(),
                "posteriors_fast::syrk_: c must be a CPU tensor of a's dtype");
  }
}

}  // namespace

void syrk_(at::Tensor out, const at::Tensor& a, const std::optional<at::Tensor>& b_opt,
           const std::optional<at::Tensor>& c_opt, double alpha, double beta, bool mirror) {
  check_inputs(out, a, b_opt, c_opt);
  const int64_t p = a.size(1);
  if (p == 0) return;
  const at::Tensor b = b_opt.has_value() ? *b_opt : a;
  // C == out (in place) unless a separate C is given; with beta == 0 C is never read.
  const at::Tensor c = c_opt.has_value() ? *c_opt : out;
#if PF_HAVE_V4_KERNELS
  if (active_isa() == Isa::kAvx512 && (c.stride(1) == 1 || beta == 0.0)) {
    AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "syrk_avx512",
                               [&] { gemm_v4::syrk_run<scalar_t>(out, a, b, c, alpha, beta, mirror); });
    return;
  }
#endif
  const int64_t ld = out.stride(0);
  const int64_t tile_edge = tile_for(p);

  // Work items: the strictly upper tiles, and each diagonal tile split into
  // two half-size diagonal blocks and the rectangle between them, so a GEMM
  // computes the mirrored half of only a quarter of a diagonal tile (P = 1045,
  // K = 64: 19% of the FLOPs were thrown away with whole diagonal tiles).
  // Largest first, handed out dynamically (an atomic counter) so that the
  // ragged last row and column do not leave a thread idle, which contiguous
  // static chunks did.
  struct Task {
    int64_t r0, rows, c0, cols;
    bool diagonal;
  };
  std::vector<Task> tasks;
  const int64_t half = tile_edge / 2;
  for (int64_t i0 = 0; i0 < p; i0 += tile_edge) {
    const int64_t rows = std::min(tile_edge, p - i0);
    const int64_t top = std::min(half, rows), rest = rows - top;
    tasks.push_back({i0, top, i0, top, true});
    if (rest > 0) {
      tasks.push_back({i0 + top, rest, i0 + top, rest, true});
      tasks.push_back({i0, top, i0 + top, rest, false});
    }
    for (int64_t j0 = i0 + tile_edge; j0 < p; j0 += tile_edge) {
      tasks.push_back({i0, rows, j0, std::min(tile_edge, p - j0), false});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& u, const Task& v) { return u.rows * u.cols > v.rows * v.cols; });
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  run_tasks(ntasks, [&](const auto& claim) {
    for (int64_t t = claim(); t < ntasks; t = claim()) {
      const Task& task = tasks[t];
      const at::Tensor a_i = a.narrow(1, task.r0, task.rows).t();
      const at::Tensor b_j = b.narrow(1, task.c0, task.cols);
      const at::Tensor c_tile = c.narrow(0, task.r0, task.rows).narrow(1, task.c0, task.cols);
      if (!task.diagonal) {
        at::Tensor tile = out.narrow(0, task.r0, task.rows).narrow(1, task.c0, task.cols);
        if (c.is_same(out)) {
          tile.addmm_(a_i, b_j, beta, alpha);
        } else {
          at::addmm_out(tile, c_tile, a_i, b_j, beta, alpha);
        }
        if (mirror) {
          AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "syrk_mirror", [&] {
            mirror_tile<scalar_t>(out.mutable_data_ptr<scalar_t>(), ld, task.r0, task.c0, task.rows, task.cols);
          });
        }
      } else {
        const at::Tensor value = at::addmm(c_tile, a_i, b_j, beta, alpha).contiguous();
        AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "syrk_diag", [&] {
          write_diagonal_tile<scalar_t>(out.mutable_data_ptr<scalar_t>(), ld, task.r0, value, mirror);
        });
      }
    }
  });
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("syrk_", &syrk_); }

}  // namespace posteriors_fast
