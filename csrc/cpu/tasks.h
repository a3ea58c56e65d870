// Dynamic hand-out of independent tasks to the ATen thread pool, for kernels
// whose tasks differ in size (the tiles of a triangle, a ragged last tile):
// a shared counter instead of static chunks, so no thread idles while work is
// left.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace posteriors_fast {

// Calls worker(claim) once on each of up to at::get_num_threads() threads;
// claim() returns the next task index, each of 0 .. ntasks - 1 exactly once
// across the workers and ntasks or more once none is left. Per-thread scratch
// buffers are set up in worker before its loop.
template <typename Worker>
void run_tasks(int64_t ntasks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker([&next] { return next++; }); });
}

}  // namespace posteriors_fast
