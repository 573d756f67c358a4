#include "kt/runtime/memory.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

uintptr_t Addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

TEST(AllocateArray, SmallArraysAre64ByteAligned) {
  for (size_t bytes : {size_t{1}, size_t{63}, size_t{64}, size_t{1000}, kHugePageMinBytes - 1}) {
    void* p = AllocateArray(bytes);
    EXPECT_EQ(Addr(p) % 64, 0u) << bytes;
    std::memset(p, 0xAB, bytes);  // the whole request is usable
    std::free(p);
  }
}

TEST(AllocateArray, LargeArraysStartOnA2MiBPage) {
  for (size_t bytes : {kHugePageMinBytes, kHugePageMinBytes + 12345}) {
    auto* p = static_cast<uint8_t*>(AllocateArray(bytes));
    EXPECT_EQ(Addr(p) % kHugePageBytes, 0u) << bytes;
    p[0] = 1;
    p[bytes - 1] = 2;
    EXPECT_EQ(p[0] + p[bytes - 1], 3);
    std::free(p);
  }
}

TEST(ArrayAllocator, BacksAVectorThatGrowsAcrossTheThreshold) {
  std::vector<float, ArrayAllocator<float>> v(16, 1.5f);
  EXPECT_EQ(Addr(v.data()) % 64, 0u);
  v.resize(kHugePageMinBytes / sizeof(float) + 7, 2.5f);
  EXPECT_EQ(Addr(v.data()) % kHugePageBytes, 0u);
  EXPECT_EQ(v[15], 1.5f);  // kept across the reallocation
  EXPECT_EQ(v.back(), 2.5f);
}

}  // namespace
}  // namespace kt
