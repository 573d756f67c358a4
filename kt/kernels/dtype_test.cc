#include "kt/kernels/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/convert.h"
#include "kt/kernels/isa_test_util.h"

namespace kt {
namespace {

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Independent oracle for round-to-nearest-even: pick the nearer of the two bf16 neighbours in double.
uint16_t RneOracle(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  if ((u & 0xffffu) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);
  const double d = f;
  const double dl = Bf16ToF32(bf16_t{lo});
  // Rounding treats infinity as the next value after the largest finite bf16, i.e. 2^128.
  const double dh = (hi & 0x7fffu) == 0x7f80u ? std::copysign(std::ldexp(1.0, 128), d)
                                               : static_cast<double>(Bf16ToF32(bf16_t{hi}));
  const double el = std::fabs(d - dl), eh = std::fabs(dh - d);
  if (el < eh) return lo;
  if (eh < el) return hi;
  return (lo & 1) ? hi : lo;
}

TEST(Dtype, ExactValuesRoundTrip) {
  for (float f : {0.0f, -0.0f, 1.0f, -2.5f, 65280.0f, std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(Bf16ToF32(F32ToBf16(f)), f);
  }
}

TEST(Dtype, RoundsToNearestEven) {
  // 1 + 2^-8 is exactly halfway between bf16 1.0 and 1.0078125: ties go to the even mantissa (1.0).
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808000u)).bits, 0x3f80u);
  // Halfway above an odd mantissa rounds up to even.
  EXPECT_EQ(F32ToBf16(FromBits(0x3f818000u)).bits, 0x3f82u);
  EXPECT_EQ(F32ToBf16(FromBits(0x3f808001u)).bits, 0x3f81u);
  // Largest finite float rounds to infinity, as torch does.
  EXPECT_EQ(F32ToBf16(FromBits(0x7f7fffffu)).bits, 0x7f80u);
}

TEST(Dtype, NanStaysNan) {
  for (uint32_t u : {0x7fc00000u, 0x7f800001u, 0xffffffffu, 0x7fffffffu, 0xff800001u}) {
    const bf16_t b = F32ToBf16(FromBits(u));
    EXPECT_TRUE(std::isnan(Bf16ToF32(b))) << std::hex << u;
    EXPECT_EQ(b.bits & 0x8000u, (u >> 16) & 0x8000u) << "sign kept";
  }
}

TEST(Dtype, ScalarMatchesOracleOnRandomBits) {
  std::mt19937 rng(1);
  for (int i = 0; i < 200000; ++i) {
    const float f = FromBits(static_cast<uint32_t>(rng()));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToBf16(f).bits, RneOracle(f)) << std::hex << f;
  }
}

class ConvertTest : public ::testing::TestWithParam<Isa> {};

TEST_P(ConvertTest, BulkMatchesScalarBitForBit) {
  const Isa isa = GetParam();
  if (!IsaSupported(isa, GetCpuFeatures())) GTEST_SKIP() << IsaName(isa) << " not on this CPU";
  std::mt19937 rng(7);
  for (size_t n : {0, 1, 7, 15, 16, 17, 31, 33, 64, 1000, 1025}) {
    // +1 offset: misaligned pointers on purpose.
    std::vector<float> f(n + 1);
    std::vector<bf16_t> b(n + 1), want(n + 1);
    for (size_t i = 0; i < n; ++i) {
      uint32_t u = static_cast<uint32_t>(rng());
      if (i % 13 == 0) u = 0x7fc00001u | (u & 0x80000000u);  // some NaNs
      f[i + 1] = FromBits(u);
      want[i + 1] = F32ToBf16(f[i + 1]);
    }
    ConvertF32ToBf16(isa, f.data() + 1, b.data() + 1, n);
    for (size_t i = 1; i <= n; ++i) ASSERT_EQ(b[i].bits, want[i].bits) << "n=" << n << " i=" << i;
    std::vector<float> back(n + 1);
    ConvertBf16ToF32(isa, b.data() + 1, back.data() + 1, n);
    for (size_t i = 1; i <= n; ++i) {
      const float expect = Bf16ToF32(b[i]);
      ASSERT_EQ(std::memcmp(&back[i], &expect, 4), 0) << "n=" << n << " i=" << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllPaths, ConvertTest, isa_test::AllIsas(), isa_test::IsaParamName());

}  // namespace
}  // namespace kt
