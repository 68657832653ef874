// A minimal deterministic parallel_for for the CPU kernels.
//
// Work [0, n) is cut into contiguous chunks, one per thread, in a fixed way that depends only on
// n and num_threads; kernels write to disjoint, precomputed output ranges, so results never
// depend on the thread count or on scheduling. Exceptions thrown by a worker are re-thrown on the
// calling thread (the first one, by chunk order).
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace jmp_ext {

// f(begin, end) is called on disjoint ranges covering [0, n). Chunks smaller than min_grain
// items are not worth a thread.
template <class F>
void parallel_for(int64_t n, int num_threads, int64_t min_grain, F&& f) {
  if (n <= 0) return;
  int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(1, min_grain));
  int chunks = static_cast<int>(std::min<int64_t>(std::max(1, num_threads), max_chunks));
  if (chunks == 1) {
    f(int64_t{0}, n);
    return;
  }
  std::vector<std::exception_ptr> errors(chunks);
  std::vector<std::thread> workers;
  workers.reserve(chunks - 1);
  auto run = [&](int c) {
    int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
    try {
      f(begin, end);
    } catch (...) {
      errors[c] = std::current_exception();
    }
  };
  for (int c = 1; c < chunks; ++c) workers.emplace_back(run, c);
  run(0);
  for (auto& w : workers) w.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace jmp_ext
