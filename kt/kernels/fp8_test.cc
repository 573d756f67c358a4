// The E4M3 conversions (fp8.h) against a table built from the format's definition, over all 256 codes.
#include "kt/kernels/fp8.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#include "gtest/gtest.h"
#include "kt/kernels/dtype.h"

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

}  // namespace
}  // namespace kt
