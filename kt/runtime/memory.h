// Allocation of the large arrays of kt/moe and kt/sft (expert weights, scratch, SFT caches).
//
// Arrays of at least kHugePageMinBytes are 2 MiB aligned, rounded up to whole 2 MiB pages and advised as
// transparent huge pages (madvise MADV_HUGEPAGE). Debian's default THP mode is `madvise`: without the advice
// every array is 4 KiB pages, the TLB misses every 4 KiB and the hardware prefetchers restart at every page.
// Decode streams each expert's weights once from DRAM, so it reads faster from huge pages
// (docs/perf-log/2026-11-27-session-09.md). Rounding wastes under 2 MiB
// per array (under 6% at the threshold). The advice is only advice: where the kernel has no huge page to
// give, the array is ordinary memory. KT_HUGE_PAGES=0 in the environment turns the advice off (for
// comparisons, or where THP is unwanted); the alignment stays.
#ifndef KT_RUNTIME_MEMORY_H_
#define KT_RUNTIME_MEMORY_H_

#include <cstddef>
#include <cstdlib>
#include <new>

namespace kt {

inline constexpr size_t kHugePageBytes = size_t{2} << 20;
inline constexpr size_t kHugePageMinBytes = size_t{32} << 20;

// 64-byte aligned (2 MiB aligned and huge-page advised from kHugePageMinBytes on); throws std::bad_alloc.
// Release with std::free.
void* AllocateArray(size_t bytes);

// The same, bound to NUMA node `node` (kt/runtime/numa.h: mbind MPOL_BIND before the first touch, so every
// page is placed on the node whichever thread touches it): page aligned and rounded up to whole pages (4 KiB,
// or 2 MiB from kHugePageMinBytes on), so that the policy covers this array's pages only. node < 0: exactly
// AllocateArray. Throws std::bad_alloc, or std::invalid_argument naming the node if it cannot be bound (no such
// node, NUMA unavailable). Release with std::free.
void* AllocateArrayOnNode(size_t bytes, int node);

// A std::vector allocator over AllocateArray, for the SFT engine's growable buffers.
template <typename T>
struct ArrayAllocator {
  using value_type = T;
  ArrayAllocator() = default;
  template <typename U>
  ArrayAllocator(const ArrayAllocator<U>&) {}  // NOLINT(google-explicit-constructor): allocator rebind
  T* allocate(size_t n) { return static_cast<T*>(AllocateArray(n * sizeof(T))); }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const ArrayAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const ArrayAllocator<U>&) const { return false; }
};

}  // namespace kt

#endif  // KT_RUNTIME_MEMORY_H_
