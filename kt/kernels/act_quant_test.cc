// The vectorized activation quantizer on every path against quant.h's scalar QuantizeActivationInt8(Grouped):
// equal bit for bit (same scale, same q), including values exactly on a rounding tie (x / scale = n + 0.5),
// values that clamp, all-zero rows and groups, and lengths with a vector remainder.
#include "kt/kernels/act_quant.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/isa_test_util.h"
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

// A NaN or an infinity anywhere in a row (vector body or remainder) or group gives scale NaN and q 0 for
// that row or group only, on every path as in the scalar code, so the products made from it are NaN.
TEST_P(ActQuantTest, NonFiniteGivesNanScale) {
  std::mt19937 rng(5);
  const bf16_t kBad[] = {bf16_t{0x7fc0} /* NaN */, bf16_t{0xffc1} /* -NaN, payload */, bf16_t{0x7f80} /* +Inf */,
                         bf16_t{0xff80} /* -Inf */};
  for (size_t k : {1, 7, 16, 17, 100, 4097}) {
    for (bf16_t bad : kBad) {
      for (size_t at : {size_t{0}, k / 2, k - 1}) {
        std::vector<bf16_t> x = RandomRow(k, rng, 0);
        x[at] = bad;
        std::vector<int8_t> q(k, 99), ref(k, 98);
        float scale = 1, ref_scale = 2;
        QuantizeRowInt8(GetParam(), x.data(), k, q.data(), &scale);
        QuantizeActivationInt8(x.data(), k, ref.data(), &ref_scale);
        ASSERT_TRUE(std::isnan(scale)) << "k=" << k << " at " << at << " bits " << bad.bits;
        ASSERT_TRUE(std::isnan(ref_scale)) << "k=" << k << " at " << at;
        ASSERT_EQ(q, std::vector<int8_t>(k, 0));
        ASSERT_EQ(ref, std::vector<int8_t>(k, 0));
      }
    }
  }
  for (int group : {32, 128}) {
    const size_t k = 4 * group;
    std::vector<bf16_t> x = RandomRow(k, rng, 0);
    x[group + 5] = bf16_t{0x7fc0};
    std::vector<int8_t> q(k), ref(k);
    std::vector<float> s(4), ref_s(4);
    QuantizeRowInt8Grouped(GetParam(), x.data(), k, group, q.data(), s.data());
    ASSERT_TRUE(QuantizeActivationInt8Grouped(x.data(), k, group, ref.data(), ref_s.data()).ok());
    for (int g = 0; g < 4; ++g) {
      EXPECT_EQ(std::isnan(s[g]), g == 1) << "group " << g;
      EXPECT_EQ(std::isnan(ref_s[g]), g == 1) << "group " << g;
      if (g != 1) EXPECT_EQ(s[g], ref_s[g]);
    }
    EXPECT_EQ(std::memcmp(q.data(), ref.data(), k), 0);
  }
}

// Tensor-parallel parts quantize their slices of a row against the whole row's max: the max of the slices'
// RowAbsMax is the row's, and each slice quantized against it equals that slice of QuantizeActivationInt8 of
// the whole row (codes and scale, bit for bit); a NaN or infinity in one slice makes every slice's scale NaN.
TEST_P(ActQuantTest, SlicesWithTheRowsMaxMatchTheWholeRow) {
  std::mt19937 rng(6);
  for (size_t k : {64, 768, 1536, 4100}) {
    for (int kind = 0; kind < 4; ++kind) {
      for (size_t parts : {1, 2, 4}) {
        std::vector<bf16_t> x = RandomRow(k, rng, kind);
        if (kind == 3) x[k / 3] = bf16_t{0xff80};  // -Inf in one slice
        std::vector<int8_t> ref(k, 98);
        float ref_scale = 2;
        QuantizeActivationInt8(x.data(), k, ref.data(), &ref_scale);
        const size_t len = k / parts;
        float amax = 0.0f;
        bool bad = false;
        for (size_t p = 0; p < parts; ++p) {
          const float m = RowAbsMax(GetParam(), x.data() + p * len, len);
          bad = bad || std::isnan(m);
          amax = std::fmax(amax, m);
        }
        if (bad) amax = std::numeric_limits<float>::quiet_NaN();
        std::vector<int8_t> q(k, 99);
        for (size_t p = 0; p < parts; ++p) {
          const float scale = QuantizeRowInt8WithMax(GetParam(), x.data() + p * len, len, amax, q.data() + p * len);
          ASSERT_EQ(std::memcmp(&scale, &ref_scale, sizeof(float)) == 0 || (std::isnan(scale) && std::isnan(ref_scale)),
                    true)
              << "k=" << k << " kind=" << kind << " parts=" << parts << " scale " << scale << " vs " << ref_scale;
        }
        ASSERT_EQ(q, ref) << "k=" << k << " kind=" << kind << " parts=" << parts;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllPaths, ActQuantTest, isa_test::AllIsas(), isa_test::IsaParamName());

}  // namespace
}  // namespace kt
