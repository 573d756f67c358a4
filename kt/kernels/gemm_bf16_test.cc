// Every BF16 GEMM path against the double-precision reference over shapes that hit every remainder:
// M = 1..33 (row blocks of 8 and 4 plus tails), K odd and even (the pair tail), N not a multiple of the
// 16-row panel or of the 2-3 panel blocks, misaligned x/y pointers and padded strides.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/eigen_views.h"
#include "kt/kernels/gemm_bf16.h"
#include "kt/kernels/gemm_reference.h"
#include "kt/kernels/gemm_test_util.h"

namespace kt {
namespace {

std::vector<bf16_t> RandomBf16(size_t n, std::mt19937& rng, float scale) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<bf16_t> v(n);
  for (auto& e : v) e = F32ToBf16(dist(rng));
  return v;
}

TEST(PackBf16, RoundTripsAndZeroPads) {
  std::mt19937 rng(3);
  for (size_t n : {1, 16, 17, 40}) {
    for (size_t k : {1, 2, 7, 64, 301}) {  // 301: three 64-pair tiles of UnpackBf16, the last partial, odd k
      const std::vector<bf16_t> w = RandomBf16(n * k, rng, 1.0f);
      std::vector<bf16_t> packed(PackedBf16Size(n, k), bf16_t{0xffff});
      PackBf16(w.data(), k, n, k, packed.data());
      std::vector<bf16_t> back(n * k);
      UnpackBf16(packed.data(), n, k, back.data(), k);
      for (size_t i = 0; i < n * k; ++i) ASSERT_EQ(back[i].bits, w[i].bits);
      // Padding (rows >= n, the odd k's partner) must be zero so kernels can run over it.
      size_t nonzero = 0;
      for (const bf16_t& e : packed) nonzero += (e.bits & 0x7fff) != 0;
      size_t nonzero_w = 0;
      for (const bf16_t& e : w) nonzero_w += (e.bits & 0x7fff) != 0;
      EXPECT_EQ(nonzero, nonzero_w);
    }
  }
}

TEST(PackBf16, TransposePackedMatchesPackOfTranspose) {
  // Whole 16 x 16 blocks (the word transpose), partial ones (element by element) and odd K / N, against
  // PackBf16 of the transposed row-major matrix; the destination starts as garbage so that padding the
  // function fails to zero shows.
  std::mt19937 rng(4);
  const std::pair<size_t, size_t> shapes[] = {{16, 16}, {32, 48}, {48, 80}, {17, 33}, {5, 3}, {1, 1},
                                              {16, 17}, {31, 16}, {64, 2048}, {768, 64}, {2, 31}};
  for (const auto& [n, k] : shapes) {
    const std::vector<bf16_t> w = RandomBf16(n * k, rng, 1.0f);
    std::vector<bf16_t> wt(k * n);
    for (size_t r = 0; r < n; ++r) {
      for (size_t c = 0; c < k; ++c) wt[c * n + r] = w[r * k + c];
    }
    std::vector<bf16_t> packed(PackedBf16Size(n, k)), want(PackedBf16Size(k, n));
    PackBf16(w.data(), k, n, k, packed.data());
    PackBf16(wt.data(), n, k, n, want.data());
    std::vector<bf16_t> got(PackedBf16Size(k, n), bf16_t{0x7fc1});
    TransposePackedBf16(packed.data(), n, k, got.data());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].bits, want[i].bits) << "N = " << n << ", K = " << k << ", element " << i;
    }
  }
}

TEST(GetGemmBf16, TableSelectsEveryIsa) {
  gemm_test::ExpectTableSelects(
      GemmBf16Paths(), &GetGemmBf16,
      {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni", "avx512_bf16", "amx"},
      {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni", "avx512_bf16", "amx"});
}

class GemmBf16Test : public gemm_test::KernelPathTest<GemmBf16Fn> {
 protected:
  // Runs one shape and checks every element against the reference with the fp32 summation bound
  // |err| <= K * 2^-23 * sum_k |x_k w_k| (+ a tiny absolute floor for all-zero rows). Products of bf16
  // are exact in fp32, so only the K additions round; returns the worst error relative to its bound.
  double Check(size_t m, size_t n, size_t k, size_t x_offset, std::mt19937& rng) {
    const size_t ldx = k + 3, ldw = k;
    const std::vector<bf16_t> x = RandomBf16(m * ldx + x_offset, rng, 1.0f);
    const std::vector<bf16_t> w = RandomBf16(n * ldw, rng, 0.5f);
    std::vector<bf16_t> packed(PackedBf16Size(n, k));
    PackBf16(w.data(), ldw, n, k, packed.data());
    gemm_test::GuardedOutput y(m, n);
    std::vector<float> ref(m * n);
    const bf16_t* xp = x.data() + x_offset;
    GemmBf16Reference(m, n, k, xp, ldx, w.data(), ldw, ref.data(), n);
    fn_(m, k, xp, ldx, packed.data(), n, y.data(), y.ld());
    // mag(i, j) = sum_k |x_ik w_jk|.
    const eigen::MatrixD mag = eigen::Bf16ToDouble(xp, m, k, ldx).cwiseAbs() *
                               eigen::Bf16ToDouble(w.data(), n, k, ldw).cwiseAbs().transpose();
    double worst = 0;
    for (size_t i = 0; i < m; ++i) {
      for (size_t j = 0; j < n; ++j) {
        const double bound = static_cast<double>(k) * std::ldexp(1.0, -23) * mag(i, j) + 1e-30;
        const double err = std::fabs(static_cast<double>(y.at(i, j)) - ref[i * n + j]);
        EXPECT_LE(err, bound) << "m=" << m << " n=" << n << " k=" << k << " at (" << i << "," << j
                              << ") got " << y.at(i, j) << " want " << ref[i * n + j];
        worst = std::max(worst, err / bound);
      }
      y.ExpectRowPaddingUntouched(i);
    }
    y.ExpectNothingBefore();
    return worst;
  }

};

TEST_P(GemmBf16Test, ShapeSweepMatchesReference) {
  std::mt19937 rng(11);
  const double worst = gemm_test::SweepShapes(
      {1, 15, 16, 17, 33, 50}, {1, 2, 3, 31, 64, 67},
      [&](size_t m, size_t n, size_t k, size_t x_offset) { return Check(m, n, k, x_offset, rng); });
  if (HasFailure()) return;
  std::printf("[%s] worst error / fp32 bound = %.3g\n", GetParam().name.c_str(), worst);
}

TEST_P(GemmBf16Test, ExpertShapes) {
  // K past several of AMX's 256-wide K blocks, with whole and edge 32x32 blocks.
  std::mt19937 rng(5);
  gemm_test::ForExpertShapes(
      [&](size_t m, size_t n, size_t k, size_t x_offset) { return Check(m, n, k, x_offset, rng); });
}

// The AMX kernel at an explicit K block (GemmBf16AmxKBlocked): the K-blocked schedule must match the
// reference for every block size, including K blocks that do not divide K, more rows than one row group
// (256), and row/column remainders that fall back to whole-K blocks.
size_t g_amx_kb = 0;
void AmxAtKBlock(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels, size_t n_cols,
                 float* y, size_t ldy) {
  internal::GemmBf16AmxKBlocked(g_amx_kb, m, k, x, ldx, panels, n_cols, y, ldy);
}

TEST_P(GemmBf16Test, AmxKBlockSizes) {
  if (GetParam().isa != Isa::kAmx) GTEST_SKIP() << "AMX-only schedule";
  fn_ = &AmxAtKBlock;
  std::mt19937 rng(21);
  // K blocks of 0, 32, 96, 256 and 1024 on K = 640, 320, 256 and 96.
  gemm_test::ForAmxKBlockShapes(
      /*tile_k=*/32, [](size_t kb) { g_amx_kb = kb; },
      [&](size_t m, size_t n, size_t k, size_t x_offset) { return Check(m, n, k, x_offset, rng); });
}

TEST_P(GemmBf16Test, ColumnRangeThroughPanelOffset) {
  // The MoE layer splits N across threads by offsetting `panels`: the result must equal the full product.
  std::mt19937 rng(9);
  const size_t m = 9, n = 70, k = 45;
  const std::vector<bf16_t> x = RandomBf16(m * k, rng, 1.0f);
  const std::vector<bf16_t> w = RandomBf16(n * k, rng, 1.0f);
  std::vector<bf16_t> packed(PackedBf16Size(n, k));
  PackBf16(w.data(), k, n, k, packed.data());
  std::vector<float> full(m * n), parts(m * n);
  fn_(m, k, x.data(), k, packed.data(), n, full.data(), n);
  for (size_t p = 0; p < NumPanels(n); ++p) {
    const size_t c0 = p * kPanelRows;
    fn_(m, k, x.data(), k, packed.data() + p * PanelStride(k), std::min(kPanelRows, n - c0),
        parts.data() + c0, n);
  }
  for (size_t i = 0; i < m * n; ++i) ASSERT_EQ(full[i], parts[i]) << i;
}

INSTANTIATE_TEST_SUITE_P(AllPaths, GemmBf16Test,
                         ::testing::ValuesIn(gemm_test::TablePaths(GemmBf16Paths())), gemm_test::PathName());

}  // namespace
}  // namespace kt
