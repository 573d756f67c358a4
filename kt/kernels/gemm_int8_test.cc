// Every INT8 GEMM path against the int64 reference over shapes that hit every remainder: M = 1..33 (row
// blocks of 8 and 4, AMX's 16/32-row tiles, tails), K not a multiple of 4 (the quad tail) or of 64 (AMX's
// K chunk), N not a multiple of the 16-row panel or of the 2-3 panel blocks, misaligned qx/y pointers
// and padded strides. The integer sums are exact in every path, so paths differ from the reference only by
// the fp32 epilogue's roundings, and from each other not at all (same fp32 expression everywhere).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/gemm_reference.h"
#include "kt/kernels/gemm_test_util.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

std::vector<int8_t> RandomInt8(size_t n, std::mt19937& rng, int lo = -127, int hi = 127) {
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<int8_t> v(n);
  for (auto& e : v) e = static_cast<int8_t>(dist(rng));
  return v;
}

std::vector<float> RandomScales(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(1e-4f, 2e-2f);
  std::vector<float> v(n);
  for (auto& e : v) e = dist(rng);
  return v;
}

// A weight matrix in packed form plus the unpacked truth it came from.
struct Packed {
  std::vector<int8_t> panels;
  std::vector<float> scales;
  std::vector<int32_t> rowsums;
};

Packed Pack(const int8_t* qw, size_t ldqw, const float* sw, size_t n, size_t k) {
  Packed p;
  p.panels.assign(PackedInt8Bytes(n, k), int8_t{0x55});
  p.scales.assign(PackedInt8Rows(n), -1.0f);
  p.rowsums.assign(PackedInt8Rows(n), -1);
  PackInt8(qw, ldqw, sw, n, k, p.panels.data(), p.scales.data(), p.rowsums.data());
  return p;
}

TEST(PackInt8, RoundTripsZeroPadsAndSumsRows) {
  std::mt19937 rng(3);
  for (size_t n : {1, 16, 17, 40}) {
    for (size_t k : {1, 3, 4, 7, 64, 67}) {
      const std::vector<int8_t> q = RandomInt8(n * k, rng, -128, 127);
      const std::vector<float> s = RandomScales(n, rng);
      const Packed p = Pack(q.data(), k, s.data(), n, k);
      std::vector<int8_t> back(n * k);
      std::vector<float> back_s(n);
      UnpackInt8(p.panels.data(), p.scales.data(), n, k, back.data(), k, back_s.data());
      ASSERT_EQ(back, q);
      ASSERT_EQ(back_s, s);
      // Padding (rows >= n, k past K in the last quad) must be zero so kernels can run over it.
      EXPECT_EQ(std::count(p.panels.begin(), p.panels.end(), 0), static_cast<long>(p.panels.size()) -
                                                                     static_cast<long>(n * k) +
                                                                     std::count(q.begin(), q.end(), 0));
      for (size_t row = 0; row < PackedInt8Rows(n); ++row) {
        int32_t sum = 0;
        for (size_t kk = 0; row < n && kk < k; ++kk) sum += q[row * k + kk];
        EXPECT_EQ(p.rowsums[row], sum) << "row " << row;
        EXPECT_EQ(p.scales[row], row < n ? s[row] : 0.0f) << "row " << row;
      }
    }
  }
}

TEST(PackInt8, LayoutIsPanelQuadRowLane) {
  // kt-int8-panel16-kquad-v1: panel[kq][r][j] = q[16p + r][4kq + j].
  const size_t n = 20, k = 9;
  std::vector<int8_t> q(n * k);
  for (size_t i = 0; i < n * k; ++i) q[i] = static_cast<int8_t>(i % 251 - 125);
  const std::vector<float> s(n, 1.0f);
  const Packed p = Pack(q.data(), k, s.data(), n, k);
  ASSERT_EQ(Int8PanelStride(k), 3u * 64u);
  for (size_t row = 0; row < n; ++row) {
    for (size_t kk = 0; kk < k; ++kk) {
      const size_t pn = row / 16, r = row % 16, kq = kk / 4, j = kk % 4;
      ASSERT_EQ(p.panels[pn * 192 + kq * 64 + r * 4 + j], q[row * k + kk]) << row << "," << kk;
    }
  }
}

TEST(PackInt8, FromQuantizedMatrix) {
  std::mt19937 rng(4);
  std::normal_distribution<float> dist;
  const size_t n = 19, k = 37;
  std::vector<bf16_t> w(n * k);
  for (auto& e : w) e = F32ToBf16(dist(rng));
  const auto qm = Quantize(QuantSpec{QuantFormat::kInt8PerChannel, 0}, w.data(), k, n, k);
  ASSERT_TRUE(qm.ok()) << qm.status();
  std::vector<int8_t> panels(PackedInt8Bytes(n, k));
  std::vector<float> scales(PackedInt8Rows(n));
  std::vector<int32_t> rowsums(PackedInt8Rows(n));
  ASSERT_TRUE(PackInt8(*qm, panels.data(), scales.data(), rowsums.data()).ok());
  std::vector<int8_t> back(n * k);
  std::vector<float> back_s(n);
  UnpackInt8(panels.data(), scales.data(), n, k, back.data(), k, back_s.data());
  EXPECT_EQ(0, std::memcmp(back.data(), qm->data.data(), n * k));
  EXPECT_EQ(back_s, qm->scales);

  const auto q4 = Quantize(QuantSpec{QuantFormat::kInt4PerChannel, 0}, w.data(), k, n, k);
  ASSERT_TRUE(q4.ok());
  const absl::Status bad = PackInt8(*q4, panels.data(), scales.data(), rowsums.data());
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
}

TEST(GetGemmInt8, TableSelectsEveryIsa) {
  gemm_test::ExpectTableSelects(GemmInt8Paths(), &GetGemmInt8,
                                {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni", "vnni", "amx"},
                                {"scalar", "hwy_avx2", "hwy_avx512", "vnni", "vnni", "amx"});
}

class GemmInt8Test : public gemm_test::KernelPathTest<GemmInt8Fn> {
 protected:

  // Runs one shape on given operands and checks every element: against the reference with
  // |y - ref| <= 2^-22 |ref| + tiny (the int sums are exact; the epilogue rounds int->float, sx*sw and the
  // product, the reference rounds once), and bit for bit against the scalar path. Returns the worst
  // |y - ref| / |ref|.
  double Run(size_t m, size_t n, size_t k, const std::vector<int8_t>& qx_buf, size_t x_offset,
             size_t ldqx, const std::vector<float>& sx, const std::vector<int8_t>& qw,
             const std::vector<float>& sw) {
    const int8_t* qx = qx_buf.data() + x_offset;
    const Packed p = Pack(qw.data(), k, sw.data(), n, k);
    gemm_test::GuardedOutput y(m, n);
    std::vector<float> ys(m * n), ref(m * n);
    GemmInt8Reference(m, n, k, qx, ldqx, sx.data(), qw.data(), k, sw.data(), ref.data(), n);
    internal::GemmInt8Scalar(m, k, qx, ldqx, sx.data(), p.panels.data(), p.scales.data(),
                             p.rowsums.data(), n, ys.data(), n);
    fn_(m, k, qx, ldqx, sx.data(), p.panels.data(), p.scales.data(), p.rowsums.data(), n, y.data(), y.ld());
    double worst = 0;
    for (size_t i = 0; i < m; ++i) {
      for (size_t j = 0; j < n; ++j) {
        const float got = y.at(i, j);
        const double want = ref[i * n + j];
        const double err = std::fabs(static_cast<double>(got) - want);
        EXPECT_LE(err, std::ldexp(std::fabs(want), -22) + 1e-30)
            << "m=" << m << " n=" << n << " k=" << k << " at (" << i << "," << j << ") got " << got
            << " want " << want;
        EXPECT_EQ(got, ys[i * n + j]) << "differs from the scalar path at (" << i << "," << j << ")";
        if (want != 0) worst = std::max(worst, err / std::fabs(want));
      }
      y.ExpectRowPaddingUntouched(i);
    }
    y.ExpectNothingBefore();
    return worst;
  }

  double Check(size_t m, size_t n, size_t k, size_t x_offset, std::mt19937& rng) {
    const size_t ldqx = k + 3;
    const std::vector<int8_t> qx = RandomInt8(m * ldqx + x_offset, rng);
    const std::vector<int8_t> qw = RandomInt8(n * k, rng);
    return Run(m, n, k, qx, x_offset, ldqx, RandomScales(m, rng), qw, RandomScales(n, rng));
  }
};

TEST_P(GemmInt8Test, ShapeSweepMatchesReference) {
  std::mt19937 rng(11);
  const double worst = gemm_test::SweepShapes(
      {1, 15, 16, 17, 33, 50}, {3, 4, 60, 64, 67, 68, 128, 200},
      [&](size_t m, size_t n, size_t k, size_t x_offset) { return Check(m, n, k, x_offset, rng); });
  if (HasFailure()) return;
  std::printf("[%s] worst |y - ref| / |ref| = %.3g (bound 2^-22 = %.3g)\n", GetParam().name.c_str(), worst,
              std::ldexp(1.0, -22));
}

TEST_P(GemmInt8Test, ExpertShapes) {
  // K over several of AMX's 64-wide chunks with and without a tail.
  std::mt19937 rng(5);
  gemm_test::ForExpertShapes(
      [&](size_t m, size_t n, size_t k, size_t x_offset) { return Check(m, n, k, x_offset, rng); });
}

// The AMX kernel at an explicit K block (GemmInt8AmxKBlocked): exact like every path, for K blocks that do
// not divide K, more rows than one row group (256), and remainders that use whole-K blocks.
size_t g_amx_kb = 0;
void AmxAtKBlock(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx, const int8_t* panels,
                 const float* w_scales, const int32_t* w_rowsums, size_t n_cols, float* y, size_t ldy) {
  internal::GemmInt8AmxKBlocked(g_amx_kb, m, k, qx, ldqx, sx, panels, w_scales, w_rowsums, n_cols, y, ldy);
}

TEST_P(GemmInt8Test, AmxKBlockSizes) {
  if (GetParam().isa != Isa::kAmx) GTEST_SKIP() << "AMX-only schedule";
  fn_ = &AmxAtKBlock;
  std::mt19937 rng(21);
  // K blocks of 0, 64, 192, 512 and 2048 on K = 1280, 640, 512 and 192.
  gemm_test::ForAmxKBlockShapes(
      /*tile_k=*/64, [](size_t kb) { g_amx_kb = kb; },
      [&](size_t m, size_t n, size_t k, size_t x_offset) { return Check(m, n, k, x_offset, rng); });
}

TEST_P(GemmInt8Test, ExtremeValues) {
  // +-127 everywhere (what the quantizers produce at the row maximum), and the full int8 range including
  // -128, which QuantizeActivationInt8 never produces but every kernel handles exactly (VNNI's x + 128
  // maps -128..127 onto 0..255; AMX and Highway multiply signed bytes).
  std::mt19937 rng(7);
  for (size_t m : {1, 7, 9, 33}) {
    for (size_t k : {3, 64, 67, 257}) {
      const size_t n = 33;
      for (int pattern = 0; pattern < 4; ++pattern) {
        std::vector<int8_t> qx(m * k), qw(n * k);
        switch (pattern) {
          case 0:  // all +127 / -127: largest sums of one sign
            std::fill(qx.begin(), qx.end(), int8_t{127});
            std::fill(qw.begin(), qw.end(), int8_t{-127});
            break;
          case 1:  // random signs of magnitude 127
            for (auto& e : qx) e = (rng() & 1) ? 127 : -127;
            for (auto& e : qw) e = (rng() & 1) ? 127 : -127;
            break;
          case 2:  // -128 everywhere: the largest positive products
            std::fill(qx.begin(), qx.end(), int8_t{-128});
            std::fill(qw.begin(), qw.end(), int8_t{-128});
            break;
          default:  // full range, random
            qx = RandomInt8(m * k, rng, -128, 127);
            qw = RandomInt8(n * k, rng, -128, 127);
            break;
        }
        Run(m, n, k, qx, 0, k, RandomScales(m, rng), qw, RandomScales(n, rng));
        if (HasFailure()) return;
      }
    }
  }
}

TEST_P(GemmInt8Test, LargestExactK) {
  // K = kInt8MaxK - 1 with every product (-128)^2 = 2^14: the sum 2^31 - 2^14 is the largest the int32
  // accumulators must hold. VNNI's (x + 128) * w sums wrap on the way and must still come out exact.
  const size_t m = 9, n = 17, k = kInt8MaxK - 1;  // 9 rows: AMX tiles, not its VNNI fallback
  std::vector<int8_t> qx(m * k, int8_t{-128}), qw(n * k, int8_t{-128});
  qx[5] = 127;  // rows that differ a little
  qw[k + 11] = 0;
  std::mt19937 rng(8);
  Run(m, n, k, qx, 0, k, RandomScales(m, rng), qw, RandomScales(n, rng));
}

TEST_P(GemmInt8Test, ZeroScalesAndZeroTokens) {
  // An all-zero token quantizes to scale 0 and q 0; a zero weight row likewise. y must be exactly 0.
  std::mt19937 rng(10);
  const size_t m = 10, n = 20, k = 70;
  std::vector<int8_t> qx = RandomInt8(m * k, rng), qw = RandomInt8(n * k, rng);
  std::vector<float> sx = RandomScales(m, rng), sw = RandomScales(n, rng);
  std::fill(qx.begin() + 3 * k, qx.begin() + 4 * k, int8_t{0});
  sx[3] = 0.0f;
  std::fill(qw.begin() + 5 * k, qw.begin() + 6 * k, int8_t{0});
  sw[5] = 0.0f;
  Run(m, n, k, qx, 0, k, sx, qw, sw);
}

TEST_P(GemmInt8Test, ColumnRangeThroughPanelOffset) {
  // The MoE layer splits N across threads by offsetting panels, scales and row sums by whole panels.
  std::mt19937 rng(9);
  const size_t m = 9, n = 70, k = 45;
  const std::vector<int8_t> qx = RandomInt8(m * k, rng), qw = RandomInt8(n * k, rng);
  const std::vector<float> sx = RandomScales(m, rng), sw = RandomScales(n, rng);
  const Packed p = Pack(qw.data(), k, sw.data(), n, k);
  std::vector<float> full(m * n), parts(m * n);
  fn_(m, k, qx.data(), k, sx.data(), p.panels.data(), p.scales.data(), p.rowsums.data(), n, full.data(), n);
  for (size_t pn = 0; pn < Int8NumPanels(n); ++pn) {
    const size_t c0 = pn * kInt8PanelRows;
    fn_(m, k, qx.data(), k, sx.data(), p.panels.data() + pn * Int8PanelStride(k), p.scales.data() + c0,
        p.rowsums.data() + c0, std::min(kInt8PanelRows, n - c0), parts.data() + c0, n);
  }
  for (size_t i = 0; i < m * n; ++i) ASSERT_EQ(full[i], parts[i]) << i;
}

TEST_P(GemmInt8Test, EndToEndFromBf16) {
  // bf16 x and W -> QuantizeActivationInt8 per token, Quantize(int8_channel) per row -> kernel, against
  // the exact product of the bf16 values. The error is the format's, not the kernel's.
  std::mt19937 rng(12);
  std::normal_distribution<float> dist;
  const size_t m = 37, n = 96, k = 1024;
  std::vector<bf16_t> x(m * k), w(n * k);
  for (auto& e : x) e = F32ToBf16(dist(rng));
  for (auto& e : w) e = F32ToBf16(dist(rng));
  std::vector<int8_t> qx(m * k);
  std::vector<float> sx(m);
  for (size_t i = 0; i < m; ++i) QuantizeActivationInt8(x.data() + i * k, k, qx.data() + i * k, &sx[i]);
  const auto qm = Quantize(QuantSpec{QuantFormat::kInt8PerChannel, 0}, w.data(), k, n, k);
  ASSERT_TRUE(qm.ok()) << qm.status();
  std::vector<int8_t> panels(PackedInt8Bytes(n, k));
  std::vector<float> scales(PackedInt8Rows(n));
  std::vector<int32_t> rowsums(PackedInt8Rows(n));
  ASSERT_TRUE(PackInt8(*qm, panels.data(), scales.data(), rowsums.data()).ok());
  std::vector<float> y(m * n);
  fn_(m, k, qx.data(), k, sx.data(), panels.data(), scales.data(), rowsums.data(), n, y.data(), n);
  const double rel = gemm_test::MeanRelErrorVsBf16Product(m, n, k, x, w, y);
  std::printf("[%s] int8 x int8 end to end: mean |y - exact| / mean |exact| = %.4f (M=%zu N=%zu K=%zu)\n",
              GetParam().name.c_str(), rel, m, n, k);
  EXPECT_LT(rel, 0.05);
}

INSTANTIATE_TEST_SUITE_P(AllPaths, GemmInt8Test,
                         ::testing::ValuesIn(gemm_test::TablePaths(GemmInt8Paths())), gemm_test::PathName());

}  // namespace
}  // namespace kt
