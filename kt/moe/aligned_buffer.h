// A 64-byte aligned array of trivially copyable T, allocated through memory.h (huge pages for large ones):
// packed expert panels and the layer's scratch are read one cache line per load.
#ifndef KT_MOE_ALIGNED_BUFFER_H_
#define KT_MOE_ALIGNED_BUFFER_H_

#include <cstddef>
#include <cstdlib>
#include <memory>

#include "kt/runtime/memory.h"

namespace kt {
namespace moe_internal {

// Contents unspecified after a size change. Movable, not copyable.
template <typename T>
struct AlignedBuffer {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], Free> data;
  size_t size = 0;
  int numa_node = -1;  // >= 0: allocations bound to this NUMA node (AllocateArrayOnNode)
  // Exactly n elements.
  void Resize(size_t n) {
    if (n == size) return;
    data.reset(static_cast<T*>(AllocateArrayOnNode(n * sizeof(T), numa_node)));
    size = n;
  }
  // At least n: grows, never shrinks.
  void Reserve(size_t n) {
    if (n > size) Resize(n);
  }
  T* get() const { return data.get(); }
};

}  // namespace moe_internal
}  // namespace kt

#endif  // KT_MOE_ALIGNED_BUFFER_H_
