// posteriors_fast::new_matrix on the CPU: an uninitialised tensor whose
// memory, once every reference to it is gone, goes back to a small pool for
// the next request of the same byte size instead of back to malloc.
//
// The methods return a new P×P precision or covariance on every update. glibc
// serves a block that large from fresh pages whenever its heap was trimmed or
// the block is above its mmap threshold (always, past 32 MB), and touching
// fresh pages costs a fault per 4 KiB. Pooled blocks were touched before, so
// they fault no more (benchmarks/bench_new_matrix.py times both).
//
// Idle blocks are capped in total bytes (POSTERIORS_FAST_POOL_MB, default 512;
// 0 turns pooling off) and only blocks of at least 1 MiB are pooled. The pool
// is never destroyed, so a tensor freed during interpreter shutdown is safe.
// Schema and semantics: posteriors_fast/_library.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <new>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace posteriors_fast {
namespace {

constexpr size_t kMinBytes = size_t{1} << 20;

void* allocate(size_t bytes) {
  void* block = nullptr;
  if (posix_memalign(&block, 64, bytes) != 0) throw std::bad_alloc();  // 64: as torch's CPU allocator
  return block;
}

class Pool {
 public:
  Pool() {
    const char* mb = std::getenv("POSTERIORS_FAST_POOL_MB");
    const long long value = mb == nullptr ? 512 : std::atoll(mb);
    cap_ = value > 0 ? static_cast<size_t>(value) << 20 : 0;
  }

  void* take(size_t bytes) {
    if (bytes >= kMinBytes && bytes <= cap_) {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(bytes);
      if (it != idle_.end() && !it->second.empty()) {
        void* block = it->second.back();
        it->second.pop_back();
        idle_bytes_ -= bytes;
        return block;
      }
    }
    return allocate(bytes);
  }

  void give(void* block, size_t bytes) {
    if (bytes >= kMinBytes) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + bytes <= cap_) {
        idle_[bytes].push_back(block);
        idle_bytes_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return idle_bytes_;
  }

  void release_idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, blocks] : idle_) {
      for (void* block : blocks) std::free(block);
    }
    idle_.clear();
    idle_bytes_ = 0;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> idle_;
  size_t idle_bytes_ = 0;
  size_t cap_ = 0;
};

Pool& pool() {
  static Pool* instance = new Pool();  // never destroyed: see the file comment
  return *instance;
}

}  // namespace

at::Tensor new_matrix(c10::IntArrayRef size, const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "posteriors_fast::new_matrix: like must be a CPU tensor");
  int64_t numel = 1;
  for (int64_t s : size) {
    TORCH_CHECK(s >= 0, "posteriors_fast::new_matrix: negative size ", size);
    numel *= s;
  }
  const size_t bytes = static_cast<size_t>(numel) * like.element_size();
  if (bytes < kMinBytes) return at::empty(size, like.options().memory_format(at::MemoryFormat::Contiguous));
  void* block = pool().take(bytes);
  return at::from_blob(
      block, size, [bytes](void* p) { pool().give(p, bytes); },
      at::TensorOptions().dtype(like.dtype()).device(at::kCPU));
}

int64_t pool_idle_bytes(bool release) {
  if (release) pool().release_idle();
  return static_cast<int64_t>(pool().idle_bytes());
}

TORCH_LIBRARY_IMPL(posteriors_fast, CPU, m) { m.impl("new_matrix", &new_matrix); }
TORCH_LIBRARY_IMPL(posteriors_fast, CompositeExplicitAutograd, m) { m.impl("pool_idle_bytes", &pool_idle_bytes); }

}  // namespace posteriors_fast
