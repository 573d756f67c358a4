// The MX element and scale types against their definitions (OCP MX v1.0), the MX quantizer on hand-worked
// blocks, packing round trips, and every MXFP4 / MXFP8 GEMM path against a double reference on the
// canonical form (element value * 2^(e - 127), exact bf16 activations, double sums) over M = 1..33 (row
// blocks of 4 / 8 and tails), N not a multiple of 16, K = 32 .. 320, misaligned x; NaN scales and DAZ.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include <xmmintrin.h>

#include "gtest/gtest.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/fp8.h"
#include "kt/kernels/gemm_fp8.h"
#include "kt/kernels/gemm_mx.h"
#include "kt/kernels/gemm_test_util.h"
#include "kt/kernels/mx.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using gemm_test::GuardedOutput;

// E2M1 from its definition: sign, 2-bit exponent (bias 1), 1-bit mantissa; e = 0 subnormal.
double E2M1Definition(int code) {
  const int s = (code >> 3) & 1, e = (code >> 1) & 3, m = code & 1;
  const double mag = e == 0 ? m * 0.5 : (1.0 + m / 2.0) * std::ldexp(1.0, e - 1);
  return s ? -mag : mag;
}

TEST(Mx, E2M1DecodesEveryCodeAndRoundsTiesToEven) {
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(E2M1ToF32(static_cast<uint8_t>(c)), E2M1Definition(c)) << c;
    if (c != 8) {  // -0.0 encodes as 8 too, +0.0 as 0
      EXPECT_EQ(F32ToE2M1(static_cast<float>(E2M1Definition(c))), c) << c;
    }
  }
  // Midpoints go to the code with mantissa bit 0; past 6 saturates.
  const std::pair<float, float> ties[] = {{0.25f, 0.0f}, {0.75f, 1.0f}, {1.25f, 1.0f}, {1.75f, 2.0f},
                                          {2.5f, 2.0f},  {3.5f, 4.0f},  {5.0f, 4.0f},  {100.0f, 6.0f},
                                          {-0.8f, -1.0f}, {5.01f, 6.0f}};
  for (auto [in, want] : ties) EXPECT_EQ(E2M1ToF32(F32ToE2M1(in)), want) << in;
}

TEST(Mx, E8M0IsAPowerOfTwoAndRoundTrips) {
  for (int e = 0; e < 255; ++e) {
    const float s = E8M0ToF32(static_cast<uint8_t>(e));
    EXPECT_EQ(static_cast<double>(s), std::ldexp(1.0, e - 127)) << e;
    uint8_t back = 0;
    ASSERT_TRUE(F32ToE8M0(s, &back)) << e;
    EXPECT_EQ(back, e);
  }
  EXPECT_TRUE(std::isnan(E8M0ToF32(0xff)));
  uint8_t e;
  EXPECT_FALSE(F32ToE8M0(3.0f, &e));
  EXPECT_FALSE(F32ToE8M0(0.0f, &e));
  EXPECT_FALSE(F32ToE8M0(-1.0f, &e));
}

// One hand-worked block per format: amax 5.5 -> floor(log2) = 2; MXFP4 emax 2 -> scale 1, MXFP8 emax 8 ->
// scale 2^-6.
TEST(Mx, QuantizerFollowsTheOcpSharedExponent) {
  std::vector<bf16_t> w(64, F32ToBf16(0.0f));
  w[0] = F32ToBf16(5.5f);  // -> 6 (tie 5 < 5.5: up), E4M3: 5.5 * 64 = 352 exactly
  w[1] = F32ToBf16(-0.3f);
  w[2] = F32ToBf16(1.25f);  // E2M1 tie -> 1.0
  // Block 2 all zero: scale 1, codes 0.
  auto q4 = Quantize(QuantSpec{QuantFormat::kMxfp4, 0}, w.data(), 64, 1, 64);
  ASSERT_TRUE(q4.ok()) << q4.status();
  EXPECT_EQ(q4->scales[0], 1.0f);
  EXPECT_EQ(q4->scales[1], 1.0f);
  std::vector<float> d(64);
  Dequantize(*q4, d.data(), 64);
  EXPECT_EQ(d[0], 6.0f);
  EXPECT_EQ(d[1], -0.5f);
  EXPECT_EQ(d[2], 1.0f);
  for (size_t i = 3; i < 64; ++i) EXPECT_EQ(d[i], 0.0f) << i;
  auto q8 = Quantize(QuantSpec{QuantFormat::kMxfp8, 0}, w.data(), 64, 1, 64);
  ASSERT_TRUE(q8.ok()) << q8.status();
  EXPECT_EQ(q8->scales[0], 0x1p-6f);
  Dequantize(*q8, d.data(), 64);
  EXPECT_EQ(d[0], 5.5f);
  EXPECT_EQ(d[2], 1.25f);
  EXPECT_NEAR(d[1], -0.3f, 0.3f / 16);  // 3 mantissa bits
  // K must be a multiple of 32.
  EXPECT_EQ(Quantize(QuantSpec{QuantFormat::kMxfp4, 0}, w.data(), 64, 1, 48).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(QuantLayoutTag(QuantSpec{QuantFormat::kMxfp4, 0}), "kt-mxfp4-v1");
  EXPECT_EQ(QuantLayoutTag(QuantSpec{QuantFormat::kMxfp8, 0}), "kt-mxfp8-v1");
}

// Random codes over every finite value (E4M3 NaN codes excluded) and E8M0 scales 2^-10 .. 2^-4.
QuantizedMatrix RandomMx(bool fp4, size_t n, size_t k, std::mt19937& rng) {
  QuantizedMatrix qm;
  qm.spec = QuantSpec{fp4 ? QuantFormat::kMxfp4 : QuantFormat::kMxfp8, 0};
  qm.n = n;
  qm.k = k;
  std::uniform_int_distribution<int> byte(0, 255), exp(117, 123);
  qm.data.resize(n * QuantizedRowBytes(qm.spec, k));
  for (auto& c : qm.data) {
    c = static_cast<uint8_t>(byte(rng));
    if (!fp4 && (c & 0x7f) == 0x7f) c ^= 1;  // no NaN codes
  }
  qm.scales.resize(n * k / 32);
  for (auto& s : qm.scales) s = E8M0ToF32(static_cast<uint8_t>(exp(rng)));
  return qm;
}

struct Packed {
  std::vector<uint8_t> panels, scales;
};

Packed Pack(const QuantizedMatrix& qm) {
  const bool fp4 = qm.spec.format == QuantFormat::kMxfp4;
  Packed p{std::vector<uint8_t>(PackedMxBytes(fp4, qm.n, qm.k), 0x5A),
           std::vector<uint8_t>(PackedMxScales(qm.n, qm.k), 0xA5)};
  const absl::Status s = PackMx(qm, p.panels.data(), p.scales.data());
  EXPECT_TRUE(s.ok()) << s;
  return p;
}

TEST(PackMx, UnpacksToDequantizeRoundedToBf16PlainAndTransposed) {
  std::mt19937 rng(1);
  for (bool fp4 : {true, false}) {
    for (size_t n : {1, 16, 17, 40}) {
      for (size_t k : {32, 96, 256}) {
        const QuantizedMatrix qm = RandomMx(fp4, n, k, rng);
        const Packed p = Pack(qm);
        std::vector<float> deq(n * k);
        Dequantize(qm, deq.data(), k);
        std::vector<bf16_t> w(n * k), wt(k * n);
        UnpackMxToBf16(fp4, n, k, p.panels.data(), p.scales.data(), false, w.data(), k);
        UnpackMxToBf16(fp4, n, k, p.panels.data(), p.scales.data(), true, wt.data(), n);
        for (size_t r = 0; r < n; ++r) {
          for (size_t c = 0; c < k; ++c) {
            ASSERT_EQ(w[r * k + c].bits, F32ToBf16(deq[r * k + c]).bits) << fp4 << " " << n << "x" << k << " at " << r
                                                                         << "," << c;
            ASSERT_EQ(wt[c * n + r].bits, w[r * k + c].bits) << r << "," << c;
          }
        }
      }
    }
  }
}

TEST(PackMx, RejectsOtherFormatsWrongSizesAndScalesThatAreNotE8M0) {
  std::mt19937 rng(2);
  QuantizedMatrix qm = RandomMx(true, 16, 64, rng);
  std::vector<uint8_t> panels(PackedMxBytes(true, 16, 64)), scales(PackedMxScales(16, 64));
  QuantizedMatrix bad = qm;
  bad.scales[5] = 0.3f;
  absl::Status s = PackMx(bad, panels.data(), scales.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("row 2 block 1"), absl::string_view::npos) << s;
  bad = qm;
  bad.scales.pop_back();
  EXPECT_EQ(PackMx(bad, panels.data(), scales.data()).code(), absl::StatusCode::kInvalidArgument);
  bad = qm;
  bad.spec.format = QuantFormat::kFp8Block128;
  s = PackMx(bad, panels.data(), scales.data());
  EXPECT_NE(s.message().find("kt-mxfp4-v1"), absl::string_view::npos) << s;
}

TEST(GetGemmMx, TablesSelectEveryIsa) {
  const std::vector<std::string> names = {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni"};
  const std::vector<std::string> by_isa = {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni", "hwy_avx512_vnni",
                                           "hwy_avx512_vnni"};
  gemm_test::ExpectTableSelects(GemmMxfp4Paths(), +[](Isa isa) { return GetGemmMx(true, isa); }, names, by_isa);
  gemm_test::ExpectTableSelects(GemmMxfp8Paths(), +[](Isa isa) { return GetGemmMx(false, isa); }, names, by_isa);
}

class GemmMxPathTest : public gemm_test::KernelPathTest<GemmMxFn> {
 protected:
  bool fp4() const { return GetParam().name.rfind("mxfp4", 0) == 0; }
  // The path on an m x n x k problem against the double reference: each output within 1e-5 of
  // sum_k |x w| (fp32 accumulation of exact products over <= 320 terms, a few ulps, stays far below).
  void Check(size_t m, size_t n, size_t k, size_t x_offset, std::mt19937& rng) {
    const QuantizedMatrix qm = RandomMx(fp4(), n, k, rng);
    const Packed p = Pack(qm);
    std::vector<float> w(n * k);
    Dequantize(qm, w.data(), k);  // exact: element * power of two
    std::normal_distribution<float> dist;
    const size_t ldx = k + 3;
    std::vector<bf16_t> xbuf(x_offset + m * ldx);
    for (auto& v : xbuf) v = F32ToBf16(dist(rng));
    const bf16_t* x = xbuf.data() + x_offset;
    GuardedOutput y(m, n);
    fn_(m, k, x, ldx, p.panels.data(), p.scales.data(), n, y.data(), y.ld());
    for (size_t i = 0; i < m; ++i) {
      for (size_t j = 0; j < n; ++j) {
        double ref = 0, mag = 0;
        for (size_t c = 0; c < k; ++c) {
          ref += static_cast<double>(Bf16ToF32(x[i * ldx + c])) * w[j * k + c];
          mag += std::fabs(static_cast<double>(Bf16ToF32(x[i * ldx + c])) * w[j * k + c]);
        }
        ASSERT_NEAR(y.at(i, j), ref, 1e-5 * mag + 1e-30) << "m=" << m << " n=" << n << " k=" << k << " at " << i
                                                          << "," << j;
      }
      y.ExpectRowPaddingUntouched(i);
    }
    y.ExpectNothingBefore();
  }
};

TEST_P(GemmMxPathTest, MatchesDoubleReferenceOnEveryRemainder) {
  std::mt19937 rng(7);
  for (size_t m = 1; m <= 33; m += (m < 10 ? 1 : 7)) {
    for (size_t n : {16, 17, 45}) {
      for (size_t k : {32, 96, 320}) {
        Check(m, n, k, m % 2, rng);
        if (HasFailure()) return;
      }
    }
  }
  Check(4, 256, 1024, 1, rng);
}

TEST_P(GemmMxPathTest, NanScalePropagatesToItsColumnOnly) {
  std::mt19937 rng(9);
  QuantizedMatrix qm = RandomMx(fp4(), 32, 128, rng);
  qm.scales[5 * 4 + 2] = std::nanf("");  // row 5, third k block
  const Packed p = Pack(qm);
  std::vector<bf16_t> x(2 * 128, F32ToBf16(0.5f));
  std::vector<float> y(2 * 32);
  fn_(2, 128, x.data(), 128, p.panels.data(), p.scales.data(), 32, y.data(), 32);
  for (size_t i = 0; i < 2; ++i) {
    for (size_t j = 0; j < 32; ++j) EXPECT_EQ(std::isnan(y[i * 32 + j]), j == 5) << i << "," << j;
  }
}

// An E4M3 NaN element code (MXFP8) makes its own output column NaN and no other, whichever decode the
// Highway kernels take for the other blocks (a block with one is redone with the exact decode).
TEST_P(GemmMxPathTest, Mxfp8NanCodePropagatesToItsColumnOnly) {
  if (fp4()) GTEST_SKIP() << "E2M1 has no NaN code";
  std::mt19937 rng(12);
  QuantizedMatrix qm = RandomMx(false, 32, 128, rng);
  qm.data[5 * 128 + 70] = 0x7f;   // row 5, third k block
  qm.data[20 * 128 + 3] = 0xff;   // row 20, first k block
  const Packed p = Pack(qm);
  for (const float v : {0.5f, 0x1p17f}) {  // pre-scaled activations; |x| >= 2^16: the exact decode
    for (size_t m : {1, 2, 3, 5}) {
      std::vector<bf16_t> x(m * 128, F32ToBf16(v));
      std::vector<float> y(m * 32);
      fn_(m, 128, x.data(), 128, p.panels.data(), p.scales.data(), 32, y.data(), 32);
      for (size_t i = 0; i < m; ++i) {
        for (size_t j = 0; j < 32; ++j) {
          EXPECT_EQ(std::isnan(y[i * 32 + j]), j == 5 || j == 20) << v << " m=" << m << ": " << i << "," << j;
        }
      }
    }
  }
}

// Every element code decodes exactly through whichever decode its block takes (DAZ clear): with x one-hot
// (row i picks k = (j + 37 i) mod K), each output is one element times its power-of-two scale, exact in
// fp32, so it must equal Dequantize's weight bit for bit. 16 rows x 256 k cycle through all 256 bytes
// (MXFP8: the two NaN codes replaced by zero); m = 1, 2, 3, 5 (the decode rows of AVX2 / AVX3, the row
// blocks and a tail).
TEST_P(GemmMxPathTest, EveryCodeExactWithOneHotActivations) {
  std::mt19937 rng(13);
  const size_t n = 16, k = 256;
  QuantizedMatrix qm = RandomMx(fp4(), n, k, rng);
  for (size_t i = 0; i < qm.data.size(); ++i) {
    const uint8_t c = static_cast<uint8_t>(i % 256);
    qm.data[i] = !fp4() && (c & 0x7f) == 0x7f ? 0 : c;
  }
  const Packed p = Pack(qm);
  std::vector<float> w(n * k);
  Dequantize(qm, w.data(), k);
  // x = 1, and x = 2^17 (MXFP8: the decode rows' exact-decode fallback instead of the pre-scaled activations).
  for (const float one : {1.0f, 0x1p17f}) {
    for (size_t m : {1, 2, 3, 5}) {
      std::vector<bf16_t> x(m * k);
      std::vector<float> y(m * n);
      for (size_t j = 0; j < k; ++j) {
        std::fill(x.begin(), x.end(), F32ToBf16(0.0f));
        for (size_t i = 0; i < m; ++i) x[i * k + (j + 37 * i) % k] = F32ToBf16(one);
        fn_(m, k, x.data(), k, p.panels.data(), p.scales.data(), n, y.data(), n);
        for (size_t i = 0; i < m; ++i) {
          const size_t c = (j + 37 * i) % k;
          for (size_t r = 0; r < n; ++r) {
            ASSERT_EQ(y[i * n + r], w[r * k + c] * one)
                << "x=" << one << " m=" << m << " row " << i << " col " << r << " k " << c;
          }
        }
      }
    }
  }
}

// With MXCSR.DAZ (and FTZ) set, the kernels take their integer-only decodes: subnormal element codes (E2M1
// 0.5, E4M3 m * 2^-9) must still count.
TEST_P(GemmMxPathTest, ExactUnderDenormalsAreZero) {
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);
  std::mt19937 rng(11);
  for (size_t m : {1, 5, 9}) Check(m, 45, 96, m % 2, rng);
  QuantizedMatrix qm = RandomMx(fp4(), 16, 64, rng);
  for (size_t i = 0; i < qm.data.size(); ++i) {
    qm.data[i] = fp4() ? static_cast<uint8_t>(i % 3 == 0 ? 0x99 : 0x11) : static_cast<uint8_t>((i % 8) | (i % 3 == 0 ? 0x80 : 0));
  }
  const Packed p = Pack(qm);
  std::vector<bf16_t> x(64, F32ToBf16(1.0f));
  std::vector<float> y(16), w(16 * 64);
  fn_(1, 64, x.data(), 64, p.panels.data(), p.scales.data(), 16, y.data(), 16);
  _mm_setcsr(saved);
  Dequantize(qm, w.data(), 64);
  for (size_t j = 0; j < 16; ++j) {
    double ref = 0;
    for (size_t c = 0; c < 64; ++c) ref += w[j * 64 + c];
    EXPECT_NEAR(y[j], ref, 1e-6 * std::fabs(ref) + 1e-30) << j;
    EXPECT_NE(y[j], 0.0f) << j;
  }
}

// Both tables' paths, named mxfp4_<path> and mxfp8_<path> (fp4() reads the prefix).
std::vector<gemm_test::KernelPath<GemmMxFn>> AllPaths() {
  std::vector<gemm_test::KernelPath<GemmMxFn>> out;
  for (bool fp4 : {true, false}) {
    for (auto p : gemm_test::TablePaths(fp4 ? GemmMxfp4Paths() : GemmMxfp8Paths())) {
      p.name = std::string(fp4 ? "mxfp4_" : "mxfp8_") + p.name;
      out.push_back(p);
    }
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(Paths, GemmMxPathTest, ::testing::ValuesIn(AllPaths()), gemm_test::PathName());

}  // namespace
}  // namespace kt
