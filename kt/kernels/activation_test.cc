// SiluMulToBf16 on every path against a double-precision oracle: each output must be one of the two bf16
// values around the exact result (the correctly rounded one, or its neighbour when fp32 exp's error moves
// the product across a rounding boundary), and the scalar path must be the correctly rounded one almost
// always.
#include "kt/kernels/activation.h"
#include "kt/kernels/isa_test_util.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

class ActivationTest : public ::testing::TestWithParam<Isa> {};

TEST_P(ActivationTest, MatchesDoubleOracleWithinOneBf16Step) {
  const Isa isa = GetParam();
  if (!IsaSupported(isa, GetCpuFeatures())) GTEST_SKIP() << IsaName(isa) << " not on this CPU";
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.0f, 4.0f);
  for (size_t len : {0, 1, 7, 16, 17, 100, 1031}) {
    std::vector<float> g(len), u(len);
    for (size_t i = 0; i < len; ++i) {
      g[i] = n(rng);
      u[i] = n(rng);
    }
    if (len > 10) {
      g[0] = -100.0f;  // exp overflow region
      g[1] = 100.0f;
      g[2] = 0.0f;
      g[3] = -88.5f;
    }
    std::vector<bf16_t> h(len + 1, bf16_t{0x1234});
    SiluMulToBf16(isa, g.data(), u.data(), h.data(), len);
    size_t not_nearest = 0;
    for (size_t i = 0; i < len; ++i) {
      const double exact = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
      const float got = Bf16ToF32(h[i]);
      const float nearest = Bf16ToF32(F32ToBf16(static_cast<float>(exact)));
      // One bf16 step at this magnitude: 2^-7 relative (8 significant bits), plus a floor near zero.
      const double step = std::max(std::fabs(exact) * std::ldexp(1.0, -7), 1e-30);
      ASSERT_LE(std::fabs(got - exact), step) << "i=" << i << " g=" << g[i] << " u=" << u[i];
      // Results below 1e-30 (g < -88, where the vector paths clamp exp's argument) are ~0 either way.
      not_nearest += std::fabs(exact) > 1e-30 && got != nearest;
    }
    EXPECT_LE(not_nearest, len / 50 + 1) << "too many results off the nearest bf16";
    EXPECT_EQ(h[len].bits, 0x1234) << "wrote past n";
  }
}

// The clamp and swigluoai variants against their double-precision definitions (gpt-oss' formula: g capped
// at limit, u clamped to +-limit, g sigmoid(alpha g) (u + 1)): within one bf16 step, every path; and
// NaN kept; plain parameters give SiluMulToBf16's bits.
TEST_P(ActivationTest, SwigluLimitAndAlphaMatchTheirDefinition) {
  const Isa isa = GetParam();
  if (!IsaSupported(isa, GetCpuFeatures())) GTEST_SKIP() << IsaName(isa) << " not on this CPU";
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.0f, 6.0f);
  const SwigluParams cases[] = {{7.0f, 0.0f}, {0.0f, 1.702f}, {7.0f, 1.702f}, {0.0f, 0.0f}};
  for (const SwigluParams& p : cases) {
    const size_t len = 333;
    std::vector<float> g(len), u(len);
    for (size_t i = 0; i < len; ++i) {
      g[i] = n(rng);
      u[i] = n(rng);
    }
    g[5] = std::nanf("");
    std::vector<float> g0 = g, u0 = u;
    std::vector<bf16_t> h(len), plain(len);
    SiluMulToBf16(isa, g0.data(), u0.data(), plain.data(), len);
    SwigluToBf16(isa, p, g.data(), u.data(), h.data(), len);
    size_t clamped = 0;
    for (size_t i = 0; i < len; ++i) {
      double gd = g0[i], ud = u0[i];
      if (p.limit > 0) {
        clamped += gd > p.limit || std::fabs(ud) > p.limit;
        gd = std::min(gd, static_cast<double>(p.limit));
        ud = std::max(std::min(ud, static_cast<double>(p.limit)), -static_cast<double>(p.limit));
      }
      const double exact = p.alpha > 0 ? gd / (1.0 + std::exp(-p.alpha * gd)) * (ud + 1.0)
                                       : gd / (1.0 + std::exp(-gd)) * ud;
      const float got = Bf16ToF32(h[i]);
      if (i == 5) {
        EXPECT_TRUE(std::isnan(got)) << "NaN gate must stay NaN";
        continue;
      }
      const double step = std::max(std::fabs(exact) * std::ldexp(1.0, -7), 1e-30);
      ASSERT_LE(std::fabs(got - exact), step) << "limit=" << p.limit << " alpha=" << p.alpha << " i=" << i
                                               << " g=" << g0[i] << " u=" << u0[i];
      if (p.plain()) {
        EXPECT_EQ(h[i].bits, plain[i].bits) << i;
      }
    }
    if (p.limit > 0) {
      EXPECT_GT(clamped, 20u) << "the data must exercise the clamp";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllPaths, ActivationTest, isa_test::AllIsas(), isa_test::IsaParamName());

}  // namespace
}  // namespace kt
