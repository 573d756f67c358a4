#include "kt/runtime/memory.h"

#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kt {
namespace {

bool HugePagesWanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("KT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return wanted;
}

}  // namespace

void* AllocateArray(size_t bytes) {
  bytes = bytes < 64 ? 64 : (bytes + 63) / 64 * 64;
  void* p;
  if (bytes >= kHugePageMinBytes) {
    const size_t whole = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
    p = std::aligned_alloc(kHugePageBytes, whole);
#if defined(__linux__)
    if (p != nullptr && HugePagesWanted()) ::madvise(p, whole, MADV_HUGEPAGE);  // failure changes nothing
#endif
  } else {
    p = std::aligned_alloc(64, bytes);
  }
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace kt
