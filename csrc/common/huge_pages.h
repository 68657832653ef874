// Asks Linux to back a large fresh buffer with transparent huge pages before it is first written.
//
// A fresh multi-MB output (torch.empty, or a std::vector the kernel fills) is otherwise
// page-faulted in 4 KB at a time, and for the radius graph of 100k atoms those faults cost more
// than finding the pairs. numpy does the same for its large arrays, so this also puts our
// outputs on an equal footing with numpy-based libraries such as vesin. A hint only: ignored
// where THP is off or the call is not available.
//
// Only fresh memory is advised (a buffer whose first huge page is already resident is recycled
// heap, which faults no more), and callers do not advise at all when the allocator keeps freed
// memory (jmp_ext.cpu.keep_freed_memory): there, advising made cu_100k_6A take 630-690 ms
// instead of ~420 in 5 of 15 runs (bench/README.md).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace jmp_ext {

inline void advise_huge_pages(const void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{1} << 21;
  if (bytes < 2 * kHugePage) return;  // nothing a whole huge page would cover
  // madvise takes page-aligned ranges; the kernel uses huge pages on the 2 MB-aligned parts.
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end <= begin) return;
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(begin), 1, &resident) == 0 && (resident & 1)) return;
  madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace jmp_ext
