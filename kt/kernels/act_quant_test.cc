// The vectorized activation quantizer on every path against quant.h's scalar QuantizeActivationInt8(Grouped):
// equal bit for bit (same scale, same q), including values exactly on a rounding tie (x / scale = n + 0.5),
// values that clamp, all-zero rows and groups, and lengths with a vector remainder.
#include "kt/kernels/act_quant.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

class ActQuantTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!IsaSupported(GetParam(), GetCpuFeatures())) {
      GTEST_SKIP() << IsaName(GetParam()) << " is not supported by this CPU ("
                   << GetCpuFeatures().ToString() << "); it is tested on a machine that has it.";
    }
  }
};

std::vector<bf16_t> RandomRow(size_t k, std::mt19937& rng, int kind) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  std::vector<bf16_t> x(k);
  for (size_t i = 0; i < k; ++i) x[i] = F32ToBf16(n(rng) * 3.0f);
  if (kind == 1) {
    // Ties: with max |x| = 127 the scale is exactly 1, so x = n + 0.5 (exact in bf16 for |n| < 128) sits on
    // a rounding tie: half away from zero must give n + 1 (or n - 1 for negatives), not the even one.
    for (size_t i = 0; i < k; ++i) x[i] = F32ToBf16(static_cast<float>(static_cast<int>(i % 100) - 50) + 0.5f);
    x[k / 2] = F32ToBf16(-127.0f);
  }
  if (kind == 2) std::fill(x.begin(), x.end(), bf16_t{0});
  if (kind == 3) {
    for (size_t i = 0; i < k; i += 3) x[i] = bf16_t{0x8000};  // -0 and tiny values
    x[k - 1] = F32ToBf16(1e-30f);
  }
  return x;
}

TEST_P(ActQuantTest, RowsMatchScalarBitForBit) {
  std::mt19937 rng(3);
  for (size_t k : {1, 7, 8, 15, 16, 17, 31, 64, 100, 768, 2048, 4097}) {
    for (int kind = 0; kind < 4; ++kind) {
      if (kind == 1 && k < 2) continue;
      const std::vector<bf16_t> x = RandomRow(k, rng, kind);
      std::vector<int8_t> q(k, 99), ref(k, 98);
      float scale = -1, ref_scale = -2;
      QuantizeRowInt8(GetParam(), x.data(), k, q.data(), &scale);
      QuantizeActivationInt8(x.data(), k, ref.data(), &ref_scale);
      ASSERT_EQ(std::memcmp(&scale, &ref_scale, sizeof(float)), 0) << "k=" << k << " kind=" << kind;
      for (size_t i = 0; i < k; ++i) {
        ASSERT_EQ(q[i], ref[i]) << "k=" << k << " kind=" << kind << " at " << i << " x="
                                << Bf16ToF32(x[i]);
      }
    }
  }
}

TEST_P(ActQuantTest, GroupsMatchScalarBitForBit) {
  std::mt19937 rng(4);
  for (int group : {32, 64, 128}) {
    for (size_t k : {size_t(group), size_t(4 * group), size_t(12 * group)}) {
      std::vector<bf16_t> x = RandomRow(k, rng, 0);
      for (int i = 0; i < group; ++i) x[i] = bf16_t{0};  // an all-zero group gets scale 0
      std::vector<int8_t> q(k), ref(k);
      std::vector<float> s(k / group), ref_s(k / group);
      QuantizeRowInt8Grouped(GetParam(), x.data(), k, group, q.data(), s.data());
      ASSERT_TRUE(QuantizeActivationInt8Grouped(x.data(), k, group, ref.data(), ref_s.data()).ok());
      ASSERT_EQ(std::memcmp(s.data(), ref_s.data(), s.size() * sizeof(float)), 0) << "group " << group;
      ASSERT_EQ(std::memcmp(q.data(), ref.data(), k), 0) << "group " << group << " k " << k;
      EXPECT_EQ(s[0], 0.0f);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllPaths, ActQuantTest,
                         ::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni,
                                           Isa::kAvx512Bf16, Isa::kAmx),
                         [](const auto& info) { return std::string(IsaName(info.param)); });

}  // namespace
}  // namespace kt
