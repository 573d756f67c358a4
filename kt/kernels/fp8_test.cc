// The E4M3 conversions (fp8.h) against a table built from the format's definition, over all 256 codes; and the
// kt-fp8-block128-v1 quantization (quant.h) built on them.
#include "kt/kernels/fp8.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

// The value of a code from the definition: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
// subnormal; s.1111.111 is NaN (no infinities).
double ReferenceValue(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::nan("");
  const double mag = e == 0 ? std::ldexp(m, -9) : std::ldexp(8 + m, e - 10);
  return s ? -mag : mag;
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

TEST(Fp8E4M3, DecodesEveryCodeExactlyToF32AndBf16) {
  for (int c = 0; c < 256; ++c) {
    const double want = ReferenceValue(c);
    const float f = Fp8E4M3ToF32(static_cast<uint8_t>(c));
    const float b = Bf16ToF32(Fp8E4M3ToBf16(static_cast<uint8_t>(c)));
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f)) << c;
      EXPECT_TRUE(std::isnan(b)) << c;
      EXPECT_EQ(std::signbit(f), c >= 128) << c;
      continue;
    }
    EXPECT_EQ(static_cast<double>(f), want) << "code " << c;
    EXPECT_EQ(static_cast<double>(b), want) << "code " << c;
    EXPECT_EQ(Bits(f) & 0xffffu, 0u) << "code " << c << " is not exactly a bf16";
    EXPECT_EQ(std::signbit(f), c >= 128) << c;  // -0 included
  }
  EXPECT_EQ(Fp8E4M3ToF32(0x7e), 448.0f);
  EXPECT_EQ(Fp8E4M3ToF32(0x01), std::ldexp(1.0f, -9));
}

TEST(Fp8E4M3, EncodeRoundTripsEveryFiniteCode) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) {
      EXPECT_EQ(F32ToFp8E4M3(Fp8E4M3ToF32(static_cast<uint8_t>(c))), 0x7f);
      continue;
    }
    EXPECT_EQ(F32ToFp8E4M3(Fp8E4M3ToF32(static_cast<uint8_t>(c))), c) << c;
  }
}

TEST(Fp8E4M3, EncodeRoundsToNearestTiesToEvenAndSaturates) {
  // Every midpoint between neighbouring positive finite codes goes to the even code; just off the midpoint
  // goes to the nearer one.
  for (int c = 0; c < 0x7e; ++c) {
    const double lo = ReferenceValue(c), hi = ReferenceValue(c + 1), mid = (lo + hi) / 2;
    const int even = (c % 2 == 0) ? c : c + 1;
    EXPECT_EQ(F32ToFp8E4M3(static_cast<float>(mid)), even) << "between " << c << " and " << c + 1;
    EXPECT_EQ(F32ToFp8E4M3(std::nextafter(static_cast<float>(mid), 0.0f)), c) << c;
    EXPECT_EQ(F32ToFp8E4M3(std::nextafter(static_cast<float>(mid), 1e9f)), c + 1) << c;
    EXPECT_EQ(F32ToFp8E4M3(-static_cast<float>(mid)), 0x80 | even) << c;
  }
  EXPECT_EQ(F32ToFp8E4M3(460.0f), 0x7e);
  EXPECT_EQ(F32ToFp8E4M3(1e30f), 0x7e);
  EXPECT_EQ(F32ToFp8E4M3(-1e30f), 0xfe);
  EXPECT_EQ(F32ToFp8E4M3(std::nanf("")), 0x7f);
  EXPECT_EQ(F32ToFp8E4M3(1e-10f), 0x00);
  EXPECT_EQ(F32ToFp8E4M3(-0.0f), 0x80);
}

// kt-fp8-block128-v1 from the outside: each 128 x 128 block's scale is its amax / 448 (the same in every row
// of the block), every code decodes (fp8.h) to within half an E4M3 step of w / scale, and Dequantize is
// code value * scale; K and N not multiples of 128 give short edge blocks; an all-zero block has scale 0.
TEST(QuantFp8Block, BlockScalesCodesAndDequantize) {
  const QuantSpec spec{QuantFormat::kFp8Block128, 0};
  EXPECT_STREQ(QuantFormatName(spec.format), "fp8_block128");
  EXPECT_EQ(QuantLayoutTag(spec), "kt-fp8-block128-v1");
  EXPECT_EQ(QuantLayoutTag(QuantSpec{QuantFormat::kFp8Block128, 128}), "");
  EXPECT_EQ(ScalesPerRow(spec, 300), 3u);
  EXPECT_EQ(QuantizedRowBytes(spec, 300), 300u);
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  const size_t n = 200, k = 300, blocks = 3;
  std::vector<bf16_t> w(n * k);
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < k; ++c) {
      // Block (1, 2) is all zero; the others have magnitudes that differ per block.
      const bool zero = r >= 128 && c >= 256;
      w[r * k + c] = F32ToBf16(zero ? 0.0f : dist(rng) * (1 + (r / 128) + 3 * (c / 128)));
    }
  }
  const auto qm = Quantize(spec, w.data(), k, n, k);
  ASSERT_TRUE(qm.ok()) << qm.status();
  ASSERT_EQ(qm->data.size(), n * k);
  ASSERT_EQ(qm->scales.size(), n * blocks);
  std::vector<float> deq(n * k);
  Dequantize(*qm, deq.data(), k);
  for (size_t rb = 0; rb < 2; ++rb) {
    for (size_t b = 0; b < blocks; ++b) {
      float amax = 0;
      for (size_t r = rb * 128; r < std::min(n, rb * 128 + 128); ++r) {
        for (size_t c = b * 128; c < std::min(k, b * 128 + 128); ++c) amax = std::max(amax, std::fabs(Bf16ToF32(w[r * k + c])));
      }
      const float scale = amax / 448.0f;
      for (size_t r = rb * 128; r < std::min(n, rb * 128 + 128); ++r) {
        ASSERT_EQ(qm->scales[r * blocks + b], scale) << r << "," << b;
        for (size_t c = b * 128; c < std::min(k, b * 128 + 128); ++c) {
          const float v = Bf16ToF32(w[r * k + c]);
          const float got = Fp8E4M3ToF32(qm->data[r * k + c]);
          ASSERT_EQ(deq[r * k + c], got * scale);
          if (scale == 0) {
            ASSERT_EQ(qm->data[r * k + c], 0);
            continue;
          }
          // Half a step: 2^-4 of the value for normal codes, 2^-10 absolute below 2^-6.
          const float t = v / scale;
          ASSERT_LE(std::fabs(got - t), std::max(std::fabs(t) / 16.0f, 1.0f / 1024.0f) * 1.0001f)
              << r << "," << c << ": " << t << " -> " << got;
        }
      }
    }
  }
  // The checkpoint's block scales expand to these row scales.
  std::vector<float> block_scales(2 * blocks), rows(n * blocks);
  for (size_t rb = 0; rb < 2; ++rb) {
    for (size_t b = 0; b < blocks; ++b) block_scales[rb * blocks + b] = qm->scales[rb * 128 * blocks + b];
  }
  ExpandFp8BlockScales(block_scales.data(), n, k, rows.data());
  EXPECT_EQ(rows, qm->scales);
}

}  // namespace
}  // namespace kt
