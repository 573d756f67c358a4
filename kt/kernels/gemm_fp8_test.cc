// Every FP8 GEMM path against a double reference on the canonical form (fp8 value * row block scale, exact
// bf16 activations, double sums), over shapes that hit every remainder: M = 1..33 (row blocks of 4 / 8 and
// tails), N not a multiple of the 16-row panel, K not a multiple of 128 (a short last scale block) and
// below one block; misaligned x and y. Plus packing round trips and the NaN code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <xmmintrin.h>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/fp8.h"
#include "kt/kernels/gemm_bf16.h"
#include "kt/kernels/gemm_fp8.h"
#include "kt/kernels/gemm_test_util.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using gemm_test::GuardedOutput;

// Random codes over every finite E4M3 value (NaN codes 0x7f / 0xff excluded) and per-row block scales that
// differ between 128-row blocks and k blocks.
QuantizedMatrix RandomFp8(size_t n, size_t k, std::mt19937& rng) {
  QuantizedMatrix qm;
  qm.spec = QuantSpec{QuantFormat::kFp8Block128, 0};
  qm.n = n;
  qm.k = k;
  const size_t blocks = ScalesPerRow(qm.spec, k);
  std::uniform_int_distribution<int> code(0, 253);
  std::uniform_real_distribution<float> scale(1e-3f, 1e-2f);
  qm.data.resize(n * k);
  for (auto& c : qm.data) {
    const int v = code(rng);
    c = static_cast<uint8_t>(v < 0x7f ? v : v + 1);  // skip 0x7f; 253 + 1 = 0xfe, so 0xff never comes
  }
  std::vector<float> block_scales(((n + 127) / 128) * blocks);
  for (auto& s : block_scales) s = scale(rng);
  qm.scales.resize(n * blocks);
  ExpandFp8BlockScales(block_scales.data(), n, k, qm.scales.data());
  return qm;
}

struct Packed {
  std::vector<uint8_t> panels;
  std::vector<float> scales;
};

Packed Pack(const QuantizedMatrix& qm) {
  Packed p{std::vector<uint8_t>(PackedFp8Bytes(qm.n, qm.k), 0x5A),
           std::vector<float>(PackedFp8Scales(qm.n, qm.k), -1.0f)};
  const absl::Status s = PackFp8(qm, p.panels.data(), p.scales.data());
  EXPECT_TRUE(s.ok()) << s;
  return p;
}

TEST(PackFp8, UnpacksToDequantizeRoundedToBf16PlainAndTransposed) {
  std::mt19937 rng(1);
  for (size_t n : {1, 16, 17, 130}) {
    for (size_t k : {1, 100, 128, 300}) {
      const QuantizedMatrix qm = RandomFp8(n, k, rng);
      const Packed p = Pack(qm);
      std::vector<float> deq(n * k);
      Dequantize(qm, deq.data(), k);
      std::vector<bf16_t> w(n * k), wt(k * n);
      UnpackFp8ToBf16(n, k, p.panels.data(), p.scales.data(), false, w.data(), k);
      UnpackFp8ToBf16(n, k, p.panels.data(), p.scales.data(), true, wt.data(), n);
      for (size_t r = 0; r < n; ++r) {
        for (size_t c = 0; c < k; ++c) {
          ASSERT_EQ(w[r * k + c].bits, F32ToBf16(deq[r * k + c]).bits) << n << "x" << k << " at " << r << "," << c;
          ASSERT_EQ(wt[c * n + r].bits, w[r * k + c].bits) << r << "," << c;
        }
      }
    }
  }
}

TEST(PackFp8, RejectsOtherFormatsAndWrongSizes) {
  std::mt19937 rng(2);
  QuantizedMatrix qm = RandomFp8(16, 128, rng);
  std::vector<uint8_t> panels(PackedFp8Bytes(16, 128));
  std::vector<float> scales(PackedFp8Scales(16, 128));
  qm.scales.pop_back();
  EXPECT_EQ(PackFp8(qm, panels.data(), scales.data()).code(), absl::StatusCode::kInvalidArgument);
  qm.spec.format = QuantFormat::kInt8PerChannel;
  const absl::Status s = PackFp8(qm, panels.data(), scales.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("kt-fp8-block128-v1"), absl::string_view::npos) << s;
}

// The AMX path's conversion: bf16 panels bit-identical to PackBf16 of UnpackFp8ToBf16's matrix (NaN codes,
// an odd K, rows past N), on every Highway target this CPU runs, with and without MXCSR.DAZ.
TEST(Fp8PanelsToBf16, EqualsUnpackThenPackBf16) {
  std::mt19937 rng(13);
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni}) {
    const internal::Fp8PanelsToBf16Fn fn = internal::Fp8PanelsToBf16Hwy(isa);
    if (fn == nullptr || !IsaSupported(isa, GetCpuFeatures())) continue;
    for (const auto& [n, k] : std::vector<std::pair<size_t, size_t>>{{16, 128}, {45, 301}, {32, 2}, {17, 1}}) {
      for (bool daz : {false, true}) {
        QuantizedMatrix qm = RandomFp8(n, k, rng);
        qm.data[(n - 1) * k + k / 2] = 0x7f;  // a NaN code
        for (size_t c = 0; c < k; c += 7) qm.data[c] = static_cast<uint8_t>(c % 8);  // subnormal codes
        const Packed p = Pack(qm);
        std::vector<bf16_t> w(n * k);
        UnpackFp8ToBf16(n, k, p.panels.data(), p.scales.data(), /*transposed=*/false, w.data(), k);
        std::vector<bf16_t> want(PackedBf16Size(n, k)), got(PackedBf16Size(n, k), bf16_t{0x1234});
        PackBf16(w.data(), k, n, k, want.data());
        const unsigned saved = _mm_getcsr();
        if (daz) _mm_setcsr(saved | 0x8040u);
        fn(k, p.panels.data(), p.scales.data(), Fp8NumPanels(n), got.data());
        _mm_setcsr(saved);
        for (size_t i = 0; i < want.size(); ++i) {
          ASSERT_EQ(got[i].bits, want[i].bits) << IsaName(isa) << " n=" << n << " k=" << k << " daz=" << daz
                                               << " at " << i;
        }
      }
    }
  }
}

// The AVX512-BF16 conversion (vcvtne2ps2bf16) gives the same bits as the portable one under its contract:
// MXCSR.DAZ clear and no scale small enough for a subnormal product. Runs where CPUID reports AVX512-BF16.
TEST(Fp8PanelsToBf16, Avx512Bf16EqualsUnpackThenPackBf16) {
  const CpuFeatures& f = GetCpuFeatures();
  if (!f.avx512_bf16 || !f.os_avx512) GTEST_SKIP() << "no AVX512-BF16 on this CPU";
  std::mt19937 rng(17);
  for (const auto& [n, k] : std::vector<std::pair<size_t, size_t>>{{16, 128}, {45, 301}, {32, 2}, {17, 1}, {64, 2048}}) {
    QuantizedMatrix qm = RandomFp8(n, k, rng);
    qm.data[(n - 1) * k + k / 2] = 0x7f;  // NaN codes of both signs
    qm.data[k / 3] = 0xff;
    for (size_t c = 0; c < k; c += 7) qm.data[c] = static_cast<uint8_t>(c % 8);  // subnormal codes
    for (size_t c = 1; c < k; c += 11) qm.data[k + c] = static_cast<uint8_t>(0x80 | (c % 8));  // negative ones
    const Packed p = Pack(qm);
    ASSERT_TRUE(internal::Fp8ScalesBf16Safe(p.scales.data(), p.scales.size()));
    std::vector<bf16_t> w(n * k);
    UnpackFp8ToBf16(n, k, p.panels.data(), p.scales.data(), /*transposed=*/false, w.data(), k);
    std::vector<bf16_t> want(PackedBf16Size(n, k)), got(PackedBf16Size(n, k), bf16_t{0x1234});
    PackBf16(w.data(), k, n, k, want.data());
    internal::Fp8PanelsToBf16Avx512Bf16(k, p.panels.data(), p.scales.data(), Fp8NumPanels(n), got.data());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].bits, want[i].bits) << "n=" << n << " k=" << k << " at " << i;
    }
  }
}

TEST(Fp8ScalesBf16Safe, FlagsScalesThatMakeSubnormalProducts) {
  const float ok[] = {1.0f, 0.0f, -3e-4f, 0x1p-115f, 1e30f};
  EXPECT_TRUE(internal::Fp8ScalesBf16Safe(ok, 5));
  const float tiny[] = {1.0f, 0x1p-116f};
  EXPECT_FALSE(internal::Fp8ScalesBf16Safe(tiny, 2));
  const float tiny_negative[] = {-1e-36f};
  EXPECT_FALSE(internal::Fp8ScalesBf16Safe(tiny_negative, 1));
}

TEST(GetGemmFp8, TableSelectsEveryIsa) {
  gemm_test::ExpectTableSelects(GemmFp8Paths(), &GetGemmFp8,
                                {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni", "amx"},
                                {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni", "hwy_avx512_vnni", "amx"});
}

class GemmFp8PathTest : public gemm_test::KernelPathTest<GemmFp8Fn> {
 protected:
  // Runs the path on an m x n x k problem and compares with the double reference: each output within
  // 1e-5 of sum_k |x w| (fp32 accumulation of exact products over <= 600 terms stays far below that); the
  // AMX path's prefill (m >= kAmxMinRows) multiplies bf16(w) instead of w, each at most 2^-8 relative
  // off (bf16 keeps 8 significant bits; measured 0.003 at k = 1 on the AMX host), so within 2^-8 of
  // sum_k |x w| plus the same accumulation margin.
  double Tolerance(size_t m) const {
    return std::string(GetParam().name) == "amx" && m >= internal::kAmxMinRows ? 0x1p-8 + 1e-5 : 1e-5;
  }
  void Check(size_t m, size_t n, size_t k, size_t x_offset, std::mt19937& rng) {
    const QuantizedMatrix qm = RandomFp8(n, k, rng);
    const Packed p = Pack(qm);
    std::normal_distribution<float> dist;
    const size_t ldx = k + 3;
    std::vector<bf16_t> xbuf(x_offset + m * ldx);
    for (auto& v : xbuf) v = F32ToBf16(dist(rng));
    const bf16_t* x = xbuf.data() + x_offset;
    GuardedOutput y(m, n);
    fn_(m, k, x, ldx, p.panels.data(), p.scales.data(), n, y.data(), y.ld());
    const size_t blocks = ScalesPerRow(qm.spec, k);
    for (size_t i = 0; i < m; ++i) {
      for (size_t j = 0; j < n; ++j) {
        double ref = 0, mag = 0;
        for (size_t c = 0; c < k; ++c) {
          const double w = static_cast<double>(Fp8E4M3ToF32(qm.data[j * k + c])) * qm.scales[j * blocks + c / 128];
          ref += Bf16ToF32(x[i * ldx + c]) * w;
          mag += std::fabs(Bf16ToF32(x[i * ldx + c]) * w);
        }
        ASSERT_NEAR(y.at(i, j), ref, Tolerance(m) * mag + 1e-30) << "m=" << m << " n=" << n << " k=" << k << " at " << i
                                                          << "," << j;
      }
      y.ExpectRowPaddingUntouched(i);
    }
    y.ExpectNothingBefore();
  }
};

TEST_P(GemmFp8PathTest, MatchesDoubleReferenceOnEveryRemainder) {
  std::mt19937 rng(7);
  for (size_t m = 1; m <= 33; m += (m < 10 ? 1 : 7)) {
    for (size_t n : {16, 17, 45}) {
      for (size_t k : {1, 37, 128, 300}) {
        Check(m, n, k, m % 2, rng);
        if (HasFailure()) return;
      }
    }
  }
  Check(64, 160, 600, 0, rng);
  Check(4, 256, 1024, 1, rng);
}

TEST_P(GemmFp8PathTest, NanCodePropagatesToItsColumnOnly) {
  std::mt19937 rng(9);
  QuantizedMatrix qm = RandomFp8(32, 256, rng);
  qm.data[5 * 256 + 200] = 0xff;  // row 5, second k block
  const Packed p = Pack(qm);
  std::vector<bf16_t> x(2 * 256, F32ToBf16(0.5f));
  std::vector<float> y(2 * 32);
  fn_(2, 256, x.data(), 256, p.panels.data(), p.scales.data(), 32, y.data(), 32);
  for (size_t i = 0; i < 2; ++i) {
    for (size_t j = 0; j < 32; ++j) EXPECT_EQ(std::isnan(y[i * 32 + j]), j == 5) << i << "," << j;
  }
}

// A NaN code makes its column NaN through each decode of the Highway kernels' decode rows: a pair of panels
// (second panel, first block), a lone last panel, the odd last k of a block, with x = 0.5 (pre-scaled
// activations, NaN found in the loop) and x = 2^17 (the exact decode).
TEST_P(GemmFp8PathTest, NanCodeFoundOnEveryDecodeWay) {
  std::mt19937 rng(10);
  const size_t n = 48, k = 255;
  QuantizedMatrix qm = RandomFp8(n, k, rng);
  qm.data[5 * k + 200] = 0xff;  // panel 0, second block
  qm.data[20 * k + 3] = 0x7f;   // panel 1, first block
  qm.data[40 * k + 254] = 0xff;  // panel 2 (alone), the odd last k
  const Packed p = Pack(qm);
  for (const float v : {0.5f, 0x1p17f}) {
    for (size_t m : {1, 2, 3, 5}) {
      std::vector<bf16_t> x(m * k, F32ToBf16(v));
      std::vector<float> y(m * n);
      fn_(m, k, x.data(), k, p.panels.data(), p.scales.data(), n, y.data(), n);
      for (size_t i = 0; i < m; ++i) {
        for (size_t j = 0; j < n; ++j) {
          EXPECT_EQ(std::isnan(y[i * n + j]), j == 5 || j == 20 || j == 40) << v << " m=" << m << ": " << i << "," << j;
        }
      }
    }
  }
}

// Every finite code decodes exactly, through whichever decode a block takes (DAZ clear: the integer decode
// against pre-scaled activations, or the exact one for |x| >= 2^16, of the Highway kernels' decode rows; the
// tail k of an odd block): with x one-hot
// (row i picks k = (j + 37 i) mod K) each output is one weight times its block scale, a single fp32
// rounding, so it must equal float(fp8 value) * scale bit for bit. K = 255 (a short second block of odd
// length), 16 rows x 255 k cycle through all 254 finite codes; m = 1, 2, 3, 5 (the decode rows of AVX2 and
// AVX3, the row blocks and a tail).
TEST_P(GemmFp8PathTest, EveryFiniteCodeExactWithOneHotActivations) {
  std::mt19937 rng(13);
  const size_t n = 16, k = 255;
  QuantizedMatrix qm = RandomFp8(n, k, rng);
  for (size_t i = 0; i < n * k; ++i) {
    const size_t v = i % 254;
    qm.data[i] = static_cast<uint8_t>(v < 0x7f ? v : v + 1);
  }
  const Packed p = Pack(qm);
  const size_t blocks = ScalesPerRow(qm.spec, k);
  // x = 1, and x = 2^17 (|x| >= 2^16: the decode rows' exact-decode fallback).
  for (const float one : {1.0f, 0x1p17f}) {
    for (size_t m : {1, 2, 3, 5}) {
      std::vector<bf16_t> x(m * k, F32ToBf16(0.0f));
      std::vector<float> y(m * n);
      for (size_t j = 0; j < k; ++j) {
        for (size_t i = 0; i < m; ++i) {
          std::fill(x.begin() + i * k, x.begin() + (i + 1) * k, F32ToBf16(0.0f));
          x[i * k + (j + 37 * i) % k] = F32ToBf16(one);
        }
        fn_(m, k, x.data(), k, p.panels.data(), p.scales.data(), n, y.data(), n);
        for (size_t i = 0; i < m; ++i) {
          const size_t c = (j + 37 * i) % k;
          for (size_t r = 0; r < n; ++r) {
            const float want = Fp8E4M3ToF32(qm.data[r * k + c]) * qm.scales[r * blocks + c / 128] * one;
            ASSERT_EQ(y[i * n + r], want) << "x=" << one << " m=" << m << " row " << i << " col " << r << " k " << c
                                          << " code " << int{qm.data[r * k + c]};
          }
        }
      }
    }
  }
}

// With MXCSR.DAZ set (as a -ffast-math library can leave it), the kernels switch to their integer-only
// decode: the subnormal codes must still decode exactly. FTZ too, for good measure.
TEST_P(GemmFp8PathTest, ExactUnderDenormalsAreZero) {
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);  // DAZ (bit 6) and FTZ (bit 15)
  EXPECT_TRUE(internal::Fp8DenormalsAreZero());
  std::mt19937 rng(11);
  for (size_t m : {1, 5, 9}) {
    Check(m, 45, 300, m % 2, rng);
  }
  // Only subnormal codes (and zeros): the fast decode would give zeros here.
  QuantizedMatrix qm = RandomFp8(16, 128, rng);
  for (size_t i = 0; i < qm.data.size(); ++i) qm.data[i] = static_cast<uint8_t>((i % 8) | (i % 3 == 0 ? 0x80 : 0));
  const Packed p = Pack(qm);
  std::vector<bf16_t> x(128, F32ToBf16(1.0f));
  std::vector<float> y(16);
  fn_(1, 128, x.data(), 128, p.panels.data(), p.scales.data(), 16, y.data(), 16);
  _mm_setcsr(saved);
  for (size_t j = 0; j < 16; ++j) {
    double ref = 0;
    for (size_t c = 0; c < 128; ++c) ref += static_cast<double>(Fp8E4M3ToF32(qm.data[j * 128 + c])) * qm.scales[j];
    EXPECT_NEAR(y[j], ref, 1e-6 * std::fabs(ref) + 1e-30) << j;
    EXPECT_NE(y[j], 0.0f) << j;
  }
  EXPECT_FALSE(internal::Fp8DenormalsAreZero());
}

INSTANTIATE_TEST_SUITE_P(Paths, GemmFp8PathTest, ::testing::ValuesIn(gemm_test::TablePaths(GemmFp8Paths())),
                         gemm_test::PathName());

}  // namespace
}  // namespace kt
