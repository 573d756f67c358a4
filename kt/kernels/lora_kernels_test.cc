// LoraGemm and SiluBackwardToBf16 on every path against double-precision oracles.
//
// LoraGemm: each element within (k + 2) · 2^-23 · |alpha| · Σ_q |a b| + 2^-23 · |c_before|: the fp32
// summation bound of k products (each product exact or rounded once, each of the k additions rounds by at
// most 2^-24 relative to the running |sum| ≤ Σ|a b|; 2^-23 leaves a factor 2 for FMA vs mul+add), plus the
// roundings of alpha · sum and of the final + c. The worst ratio to that bound is printed. Shapes sweep
// the vector remainders (n around 8 and 16 lanes, m around the 4- and 8-row blocks), k from 0 to 257, A
// read plain and transposed, fp32 and bf16, misaligned pointers, ldc > n (the padding must stay untouched).
//
// LoraGemmNT likewise (a bf16 [m, k] and b fp32 [n, k], both along k).
//
// SiluBackwardToBf16: each output one of the two bf16 values around the exact result (the vector paths'
// exp is ~1 ulp, which can move a product across a rounding boundary), mostly the nearest.
#include "kt/kernels/lora_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/eigen_views.h"
#include "kt/kernels/isa_test_util.h"

namespace kt {
namespace {

class LoraKernelsTest : public ::testing::TestWithParam<Isa> {};

// Checks rows [0, m) of c (stored in c_store from index 1, row stride ldc) after c = alpha * A B (+ c_before
// when accumulating), A [m, k] and B [k, n] the operands' values in double, against the double product within
// the bound above, the padding columns [n, ldc) and the elements before and after c untouched. Returns the
// worst error / bound.
template <typename Label>
double CheckRows(size_t m, size_t n, size_t k, size_t ldc, float alpha, bool accumulate,
                 const std::vector<float>& c_store, const std::vector<float>& c_before, const eigen::MatrixD& a,
                 const eigen::MatrixD& b, Label label) {
  const eigen::MatrixD sum = a * b;                          // sum_q a_iq b_qj
  const eigen::MatrixD abs_sum = a.cwiseAbs() * b.cwiseAbs();  // sum_q |a_iq b_qj|
  double worst = 0.0;
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < ldc; ++j) {
      const size_t at = 1 + i * ldc + j;
      if (j >= n) {
        EXPECT_EQ(c_store[at], c_before[at]) << "wrote into the padding at i=" << i << " j=" << j;
        continue;
      }
      const double before = accumulate ? c_before[at] : 0.0;
      const double ref = alpha * sum(i, j) + before;
      const double bound = (k + 2) * std::ldexp(1.0, -23) * std::fabs(alpha) * abs_sum(i, j) +
                           std::ldexp(1.0, -23) * std::fabs(before) + 1e-30;
      const double err = std::fabs(c_store[at] - ref);
      EXPECT_LE(err, bound) << label() << " m=" << m << " n=" << n << " k=" << k << " i=" << i << " j=" << j
                            << " acc=" << accumulate;
      worst = std::max(worst, err / bound);
    }
  }
  EXPECT_EQ(c_store[0], c_before[0]) << "wrote before c";
  EXPECT_EQ(c_store.back(), c_before.back()) << "wrote past the last row";
  return worst;
}

template <typename TA>
double CheckGemm(Isa isa, size_t m, size_t n, size_t k, bool transposed_a, bool accumulate,
                 std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  // A stored [m, k] (a_row = k + 3, a_col = 1) or [k, m] read transposed (a_row = 1, a_col = m + 2); one
  // element of offset everywhere so that no pointer is vector-aligned.
  const size_t a_row = transposed_a ? 1 : k + 3, a_col = transposed_a ? m + 2 : 1;
  const size_t a_size = 1 + (m > 0 ? (m - 1) * a_row : 0) + (k > 0 ? (k - 1) * a_col : 0) + 1;
  std::vector<TA> a_store(a_size + 1);
  for (auto& v : a_store) v = TA{};
  const TA* a = a_store.data() + 1;
  for (size_t i = 0; i < m; ++i) {
    for (size_t q = 0; q < k; ++q) {
      const float x = nd(rng);
      if constexpr (std::is_same_v<TA, float>) {
        a_store[1 + i * a_row + q * a_col] = x;
      } else {
        a_store[1 + i * a_row + q * a_col] = F32ToBf16(x);
      }
    }
  }
  const size_t ldb = n + 5, ldc = n + 3;
  std::vector<float> b_store(1 + k * ldb + 1), c_store(1 + m * ldc + 1);
  for (auto& v : b_store) v = nd(rng);
  for (auto& v : c_store) v = nd(rng);
  const float* b = b_store.data() + 1;
  float* c = c_store.data() + 1;
  const std::vector<float> c_before = c_store;
  const float alpha = 0.75f;
  LoraGemm(isa, m, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  return CheckRows(m, n, k, ldc, alpha, accumulate, c_store, c_before, eigen::ToDouble(a, m, k, a_row, a_col),
                   eigen::ToDouble(b, k, n, ldb),
                   [&] {
                     return std::string(IsaName(isa)) + " transposed=" + std::to_string(transposed_a);
                   });
}

TEST_P(LoraKernelsTest, GemmMatchesDoubleSums) {
  const Isa isa = GetParam();
  if (!IsaSupported(isa, GetCpuFeatures())) {
    GTEST_SKIP() << IsaName(isa) << " not on this CPU (" << GetCpuFeatures().ToString() << ")";
  }
  std::mt19937 rng(11);
  double worst = 0.0;
  // m: single rows, the 4- and 8-row blocks and their remainders; n: below, at and around 8 and 16 lanes
  // and two vectors of each, the 48-column blocks; k: empty, one, the rank, and long inner dimensions.
  for (size_t m : {1, 3, 4, 5, 8, 9, 16, 33}) {
    for (size_t n : {1, 7, 8, 15, 16, 17, 32, 33, 48, 100}) {
      for (size_t k : {0, 1, 16, 80, 257}) {
        for (bool transposed : {false, true}) {
          for (bool accumulate : {false, true}) {
            worst = std::max(worst, CheckGemm<float>(isa, m, n, k, transposed, accumulate, rng));
            worst = std::max(worst, CheckGemm<bf16_t>(isa, m, n, k, transposed, accumulate, rng));
          }
        }
      }
    }
  }
  std::printf("%s: worst error / bound = %.3g\n", IsaName(isa), worst);
}

// LoraGemmNT: a [m, k] bf16 and b [n, k] fp32, both with padded rows and misaligned; same bound.
double CheckGemmNT(Isa isa, size_t m, size_t n, size_t k, bool accumulate, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const size_t lda = k + 3, ldb = k + 1, ldc = n + 2;
  std::vector<bf16_t> a_store(1 + m * lda);
  std::vector<float> b_store(1 + n * ldb), c_store(1 + m * ldc + 1);
  for (auto& v : a_store) v = F32ToBf16(nd(rng));
  for (auto& v : b_store) v = nd(rng);
  for (auto& v : c_store) v = nd(rng);
  const bf16_t* a = a_store.data() + 1;
  const float* b = b_store.data() + 1;
  const std::vector<float> c_before = c_store;
  const float alpha = -1.5f;
  LoraGemmNT(isa, m, n, k, alpha, a, lda, b, ldb, c_store.data() + 1, ldc, accumulate);
  return CheckRows(m, n, k, ldc, alpha, accumulate, c_store, c_before, eigen::ToDouble(a, m, k, lda),
                   eigen::ToDouble(b, n, k, ldb).transpose(),
                   [&] { return std::string(IsaName(isa)) + " NT"; });
}

TEST_P(LoraKernelsTest, GemmNTMatchesDoubleSums) {
  const Isa isa = GetParam();
  if (!IsaSupported(isa, GetCpuFeatures())) {
    GTEST_SKIP() << IsaName(isa) << " not on this CPU (" << GetCpuFeatures().ToString() << ")";
  }
  std::mt19937 rng(13);
  double worst = 0.0;
  // m, n around the 2 x 4 blocks; k below, at and around 8 and 16 lanes and long (H, I of the tests).
  for (size_t m : {1, 2, 3, 5, 16, 33}) {
    for (size_t n : {1, 3, 4, 5, 8, 16, 17}) {
      for (size_t k : {0, 1, 7, 8, 16, 17, 48, 80, 257, 2048}) {
        for (bool accumulate : {false, true}) {
          worst = std::max(worst, CheckGemmNT(isa, m, n, k, accumulate, rng));
        }
      }
    }
  }
  std::printf("%s: NT worst error / bound = %.3g\n", IsaName(isa), worst);
}

TEST_P(LoraKernelsTest, SiluBackwardWithinOneBf16Step) {
  const Isa isa = GetParam();
  if (!IsaSupported(isa, GetCpuFeatures())) {
    GTEST_SKIP() << IsaName(isa) << " not on this CPU (" << GetCpuFeatures().ToString() << ")";
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  for (size_t len : {0, 1, 7, 16, 17, 100, 1031}) {
    std::vector<float> d(len), g(len), u(len);
    for (size_t i = 0; i < len; ++i) {
      d[i] = nd(rng);
      g[i] = nd(rng);
      u[i] = nd(rng);
    }
    if (len > 10) {
      g[0] = -100.0f;  // exp overflow region (the vector paths clamp exp's argument at 88)
      g[1] = 100.0f;
      g[2] = 0.0f;
      g[3] = -88.5f;
    }
    std::vector<bf16_t> dg(len + 1, bf16_t{0x1234}), du(len + 1, bf16_t{0x1234});
    SiluBackwardToBf16(isa, d.data(), g.data(), u.data(), dg.data(), du.data(), len);
    size_t not_nearest = 0;
    for (size_t i = 0; i < len; ++i) {
      const double sig = 1.0 / (1.0 + std::exp(-static_cast<double>(g[i])));
      const double exact[2] = {static_cast<double>(d[i]) * u[i] * sig * (1.0 + g[i] * (1.0 - sig)),
                               static_cast<double>(d[i]) * g[i] * sig};
      const float got[2] = {Bf16ToF32(dg[i]), Bf16ToF32(du[i])};
      for (int o = 0; o < 2; ++o) {
        // One bf16 step at this magnitude: 2^-7 relative (8 significant bits), plus a floor near zero.
        const double step = std::max(std::fabs(exact[o]) * std::ldexp(1.0, -7), 1e-30);
        ASSERT_LE(std::fabs(got[o] - exact[o]), step)
            << (o == 0 ? "dg" : "du") << " i=" << i << " d=" << d[i] << " g=" << g[i] << " u=" << u[i];
        not_nearest += std::fabs(exact[o]) > 1e-30 &&
                       got[o] != Bf16ToF32(F32ToBf16(static_cast<float>(exact[o])));
      }
    }
    EXPECT_LE(not_nearest, 2 * len / 25 + 1) << "too many results off the nearest bf16";
    EXPECT_EQ(dg[len].bits, 0x1234) << "wrote past n";
    EXPECT_EQ(du[len].bits, 0x1234) << "wrote past n";
  }
}

INSTANTIATE_TEST_SUITE_P(AllPaths, LoraKernelsTest, isa_test::AllIsas(), isa_test::IsaParamName());

}  // namespace
}  // namespace kt
