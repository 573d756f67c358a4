#include "kt/runtime/memory.h"

#include <cstring>
#include <stdexcept>
#include <string>

#include "absl/status/status.h"
#include "kt/runtime/numa.h"

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

void* AllocateArrayOnNode(size_t bytes, int node) {
  if (node < 0 || bytes == 0) return AllocateArray(bytes);
  constexpr size_t kPage = 4096;
  const size_t page = bytes >= kHugePageMinBytes ? kHugePageBytes : kPage;
  const size_t whole = (bytes + page - 1) / page * page;
  void* p = std::aligned_alloc(page, whole);
  if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__)
  if (page == kHugePageBytes && HugePagesWanted()) ::madvise(p, whole, MADV_HUGEPAGE);
#endif
  if (absl::Status s = BindMemoryToNode(p, whole, node); !s.ok()) {
    std::free(p);
    throw std::invalid_argument(std::string(s.message()));
  }
  return p;
}

}  // namespace kt
