// Work items spread over XLA's intra-op thread pool, shared by the CPU kernels.
//
// The items are claimed one at a time by the caller and by helpers scheduled on the pool. The caller waits only
// for items to be done, never for a helper to start, so a busy pool cannot deadlock it; a helper that starts
// late finds no item left and touches nothing but this shared state.

#ifndef BATCHGEN_KERNELS_CPU_PARALLEL_H_
#define BATCHGEN_KERNELS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace batchgen {

struct Work {
  explicit Work(int64_t items, std::function<void(int64_t)> body) : items(items), body(std::move(body)) {}
  void Run() {
    for (int64_t i; (i = next.fetch_add(1)) < items;) {
      body(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
  std::atomic<int64_t> next{0}, done{0};
  const int64_t items;
  const std::function<void(int64_t)> body;  // valid while the caller waits: it refers to the call's buffers
};

// Runs body(0) .. body(items - 1) on the calling thread and on up to the pool's other threads; returns when all
// are done.
inline void ParallelFor(xla::ffi::ThreadPool& threads, int64_t items, std::function<void(int64_t)> body) {
  auto work = std::make_shared<Work>(items, std::move(body));
  const int64_t helpers = std::min<int64_t>(threads.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) threads.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < work->items) std::this_thread::yield();
}

}  // namespace batchgen

#endif  // BATCHGEN_KERNELS_CPU_PARALLEL_H_
