// Every GGUF GEMM path, for every supported ggml type, against the scalar dequantize-then-float reference:
// the weights dequantized by DequantizeGgufRow, the activations as their Q8 partner holds them
// (q * scale) or as bf16 (float types), the sum in double. Random blocks (every quant bit pattern, scales
// drawn as fp16) over M = 1, 2, 3, 5, 8, 9, 14, 67 (row blocks of 4 and each remainder; the panel path from
// 8 rows, its 64-row slabs), 1..19 columns (panels of 8 and remainders), several K (one panel of K and two),
// misaligned weights; plus hand-made blocks whose
// values are worked out from the layouts, and the fp16 conversion.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_gguf.h"
#include "kt/kernels/gguf_quants.h"

namespace kt {
namespace {

void PutHalf(uint8_t* p, float v) {
  const uint16_t h = F32ToF16(v);
  p[0] = static_cast<uint8_t>(h & 0xff);
  p[1] = static_cast<uint8_t>(h >> 8);
}

// Offsets of a block's fp16 factors (d, and m / dmin where the type has one).
std::vector<size_t> HalfOffsets(GgufType t) {
  switch (t) {
    case GgufType::kQ4_0:
    case GgufType::kQ5_0:
    case GgufType::kQ8_0:
      return {0};
    case GgufType::kQ4_1:
    case GgufType::kQ5_1:
    case GgufType::kQ4_K:
    case GgufType::kQ5_K:
      return {0, 2};
    case GgufType::kQ2_K:
      return {80, 82};
    case GgufType::kQ3_K:
      return {108};
    case GgufType::kQ6_K:
      return {208};
    default:
      return {};
  }
}

// n rows of k values of random blocks: random bytes for the quants and scales, fp16 factors in
// +-[1e-3, 2e-2] (so no block is inf/NaN).
std::vector<uint8_t> RandomRows(GgufType t, size_t n, size_t k, std::mt19937& rng) {
  const size_t row_bytes = GgufRowBytes(t, k);
  std::vector<uint8_t> w(n * row_bytes);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> val(-1.0f, 1.0f), mag(1e-3f, 2e-2f);
  if (GgufIsFloat(t)) {
    for (size_t i = 0; i < n * k; ++i) {
      const float v = val(rng);
      if (t == GgufType::kF32) {
        std::memcpy(&w[4 * i], &v, 4);
      } else if (t == GgufType::kF16) {
        PutHalf(&w[2 * i], v);
      } else {
        const bf16_t b = F32ToBf16(v);
        std::memcpy(&w[2 * i], &b, 2);
      }
    }
    return w;
  }
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  const size_t bb = GgufBlockBytes(t);
  for (size_t blk = 0; blk < w.size() / bb; ++blk) {
    for (size_t off : HalfOffsets(t)) PutHalf(&w[blk * bb + off], (byte(rng) & 1 ? -1.0f : 1.0f) * mag(rng));
  }
  return w;
}

struct Case {
  GgufType type;
  GemmPath<GemmGgufFn> path;
};

std::vector<Case> Cases() {
  std::vector<Case> out;
  for (GgufType t : kGgufTypes) {
    for (const auto& p : GemmGgufPaths()) out.push_back({t, p});
  }
  return out;
}

class GemmGgufTest : public ::testing::TestWithParam<Case> {};

TEST_P(GemmGgufTest, MatchesDequantizedDoubleReference) {
  const auto [type, path] = GetParam();
  if (!IsaSupported(path.isa, GetCpuFeatures())) GTEST_SKIP() << path.name << " not supported here";
  std::mt19937 rng(1234 + static_cast<int>(type));
  const size_t be = GgufBlockElems(type);
  std::vector<size_t> ks = {256, 768};
  if (be == 32) ks.push_back(96);
  if (be == 1) ks.push_back(37);
  // Over the Highway kernels' panel of 2048 values (Q4_0 / Q4_K with 8 rows or more): two chunks.
  if (be > 1) ks.push_back(2304);
  const size_t ab = GgufActivationBlock(type);
  double worst = 0;
  for (size_t k : ks) {
    for (size_t m : {1, 2, 3, 5, 8, 9, 14, 67}) {
      for (size_t cols : {1, 7, 16, 19}) {
        const size_t row_bytes = GgufRowBytes(type, k);
        // One byte in: the kernels may not assume aligned rows (a GGUF row of Q4_K is 144 bytes per block).
        std::vector<uint8_t> store = RandomRows(type, cols, k, rng);
        std::vector<uint8_t> shifted(store.size() + 1);
        std::memcpy(shifted.data() + 1, store.data(), store.size());
        const size_t ld = k + 3;
        std::vector<bf16_t> x(m * ld);
        std::uniform_real_distribution<float> xv(-2.0f, 2.0f);
        for (auto& v : x) v = F32ToBf16(xv(rng));
        std::vector<int8_t> qx(m * ld, 0);
        std::vector<float> sx(ab ? m * (k / ab) : 0);
        if (ab) {
          for (size_t r = 0; r < m; ++r) {
            QuantizeGgufActivationRow(&x[r * ld], k, ab, &qx[r * ld], &sx[r * (k / ab)]);
          }
        }
        GgufRows in;
        in.x = x.data();
        in.qx = qx.data();
        in.sx = sx.data();
        in.ld = ld;
        const size_t ldy = cols + 2;
        std::vector<float> y(m * ldy, -7.0f);
        path.fn(type, m, k, in, shifted.data() + 1, cols, y.data(), ldy);
        std::vector<float> wrow(k);
        for (size_t j = 0; j < cols; ++j) {
          DequantizeGgufRow(type, &store[j * row_bytes], k, wrow.data());
          for (size_t r = 0; r < m; ++r) {
            double ref = 0, mag = 0;
            for (size_t c = 0; c < k; ++c) {
              const double a = ab ? static_cast<double>(qx[r * ld + c]) * sx[r * (k / ab) + c / ab]
                                  : static_cast<double>(Bf16ToF32(x[r * ld + c]));
              ref += static_cast<double>(wrow[c]) * a;
              mag += std::fabs(static_cast<double>(wrow[c]) * a);
            }
            // fp32 rounding of at most (terms + 8) additions and products, each 2^-24 relative of the
            // magnitude sum: integer block sums are exact, so the terms are blocks (or sub-blocks, two per
            // one with mins) for the quantized types and values for the float types.
            const double terms = ab ? 2.0 * static_cast<double>(k) / 16.0 : static_cast<double>(k);
            const double tol = (terms + 8.0) * std::ldexp(1.0, -24) * mag + 1e-30;
            const double err = std::fabs(static_cast<double>(y[r * ldy + j]) - ref);
            worst = std::max(worst, err / (mag + 1e-30));
            ASSERT_LE(err, tol) << GgufTypeName(type) << " " << path.name << " k=" << k << " m=" << m
                                << " cols=" << cols << " r=" << r << " j=" << j << " y=" << y[r * ldy + j]
                                << " ref=" << ref;
          }
        }
        for (size_t r = 0; r < m; ++r) {
          for (size_t j = cols; j < ldy; ++j) ASSERT_EQ(y[r * ldy + j], -7.0f) << "wrote past cols";
        }
      }
    }
  }
  RecordProperty("worst_relative_error", std::to_string(worst));
}

INSTANTIATE_TEST_SUITE_P(AllTypesAllPaths, GemmGgufTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(GgufTypeName(info.param.type)) + "_" + info.param.path.name;
                         });

TEST(GgufQuants, Fp16Conversion) {
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x7bff), 65504.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToF32(0x0400), std::ldexp(1.0f, -14));
  EXPECT_TRUE(std::isinf(F16ToF32(0x7c00)));
  EXPECT_TRUE(std::isnan(F16ToF32(0x7e00)));
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite non-negative half round-trips
    ASSERT_EQ(F32ToF16(F16ToF32(static_cast<uint16_t>(h))), h) << h;
  }
  EXPECT_EQ(F32ToF16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // a tie rounds to even
}

TEST(GgufQuants, SizesAreGgmls) {
  // ggml's block sizes (ggml docs; the gguf package's GGML_QUANT_SIZES).
  EXPECT_EQ(GgufBlockBytes(GgufType::kQ4_0), 18u);
  EXPECT_EQ(GgufBlockBytes(GgufType::kQ5_1), 24u);
  EXPECT_EQ(GgufBlockBytes(GgufType::kQ2_K), 84u);
  EXPECT_EQ(GgufBlockBytes(GgufType::kQ3_K), 110u);
  EXPECT_EQ(GgufBlockBytes(GgufType::kQ5_K), 176u);
  EXPECT_EQ(GgufBlockBytes(GgufType::kQ6_K), 210u);
  EXPECT_EQ(GgufRowBytes(GgufType::kQ4_K, 512), 288u);
  EXPECT_TRUE(IsGgufTypeId(12));
  EXPECT_FALSE(IsGgufTypeId(9));   // Q8_1: no LLAMAFILE kernel
  EXPECT_FALSE(IsGgufTypeId(20));  // IQ4_NL
}

TEST(GgufQuants, HandMadeBlocks) {
  // Q4_0: d = 0.5; byte 0 = 0x21: value 0 = 0.5 (1 - 8), value 16 = 0.5 (2 - 8); other bytes 0x88: 0.
  std::vector<uint8_t> b(18, 0x88);
  PutHalf(b.data(), 0.5f);
  b[2] = 0x21;
  std::vector<float> w(32);
  DequantizeGgufRow(GgufType::kQ4_0, b.data(), 32, w.data());
  EXPECT_EQ(w[0], -3.5f);
  EXPECT_EQ(w[16], -3.0f);
  EXPECT_EQ(w[1], 0.0f);
  // Q4_K: d = 1, dmin = 0.5; scale/min of sub-block 0 = 3 / 2 (bytes 0 and 4), sub-block 5 from the high
  // bytes: scale = (byte 9 & 15) | (byte 1 >> 6) << 4 = 1 | 1 << 4 = 17, min = (byte 9 >> 4) | (byte 5 >> 6)
  // << 4 = 2 | 0 = 2. qs byte 0 = 0x4a: value 0 = 0xa, value 32 = 4 (sub-block 1: scale 0x40 & 63 = 0,
  // min 0); qs byte 64 + 1 (values 128..191, high nibble: 160 + 1) = 0x70: value 161 = 7 in sub-block 5.
  std::vector<uint8_t> k4(144, 0);
  PutHalf(&k4[0], 1.0f);
  PutHalf(&k4[2], 0.5f);
  k4[4 + 0] = 3;
  k4[4 + 4] = 2;
  k4[4 + 1] = 0x40;
  k4[4 + 9] = 0x21;
  k4[16 + 0] = 0x4a;
  k4[16 + 64 + 1] = 0x70;
  std::vector<float> w4(256);
  DequantizeGgufRow(GgufType::kQ4_K, k4.data(), 256, w4.data());
  EXPECT_EQ(w4[0], 3.0f * 10 - 0.5f * 2);
  EXPECT_EQ(w4[32], 0.0f);
  EXPECT_EQ(w4[161], 17.0f * 7 - 0.5f * 2);
  EXPECT_EQ(w4[160], -0.5f * 2);  // nibble 0 of sub-block 5: just the min
}

}  // namespace
}  // namespace kt
