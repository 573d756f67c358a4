// OCP Microscaling (MX) element and scale types, scalar and exact: E2M1 (FP4, MXFP4's elements), E8M0
// (the shared scale of a block of 32 along K) and the MX quantizer's shared exponent. E4M3 (MXFP8's
// elements) is fp8.h's.
//
// E2M1: s.ee.m, exponent bias 1, no Inf/NaN: e = 0 is subnormal (m * 0.5), else (1 + m / 2) * 2^(e - 1);
//   magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. Every value is exactly an fp32 (and a bf16 and an E4M3).
// E8M0: an unsigned biased exponent, value 2^(e - 127); 0xff is NaN; no zero, no sign.
// Quantizing a block (OCP MX v1.0, section 6.3): shared exponent = floor(log2(amax)) - emax(element), with
//   emax 2 for E2M1 and 8 for E4M3, clamped to the E8M0 range; each element is w / 2^shared rounded to the
//   nearest element value (ties to even), saturating at the largest finite one. An all-zero block gets
//   exponent 0 (2^0 = 1) and zero codes.
#ifndef KT_KERNELS_MX_H_
#define KT_KERNELS_MX_H_

#include <cmath>
#include <cstdint>
#include <limits>

namespace kt {

inline constexpr int kMxBlock = 32;  // elements per E8M0 scale, along K
inline constexpr float kE2M1Max = 6.0f;
inline constexpr int kE2M1Emax = 2;  // 6 = 1.5 * 2^2
inline constexpr int kE4M3Emax = 8;  // 448 = 1.75 * 2^8

// The fp32 value of an E2M1 code (the low 4 bits of `code`).
inline float E2M1ToF32(uint8_t code) {
  static constexpr float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  const float m = kMag[code & 7];
  return (code & 8) ? -m : m;
}

// The nearest E2M1 code to f, ties to even (the code with an even mantissa bit); beyond 6 saturates; NaN
// gives +0 (E2M1 has none; Quantize rejects non-finite weights before).
inline uint8_t F32ToE2M1(float f) {
  if (std::isnan(f)) return 0;
  const uint8_t sign = std::signbit(f) ? 8 : 0;
  const float a = std::fabs(f);
  // Midpoints between consecutive magnitudes; at a tie the even code (mantissa bit 0) wins: 0.25 -> 0,
  // 0.75 -> 1.0 (code 2), 1.25 -> 1.0, 1.75 -> 2.0, 2.5 -> 2.0, 3.5 -> 4.0, 5 -> 4.0.
  uint8_t m;
  if (a <= 0.25f) m = 0;
  else if (a < 0.75f) m = 1;
  else if (a <= 1.25f) m = 2;
  else if (a < 1.75f) m = 3;
  else if (a <= 2.5f) m = 4;
  else if (a < 3.5f) m = 5;
  else if (a <= 5.0f) m = 6;
  else m = 7;
  return static_cast<uint8_t>(sign | m);
}

// 2^(e - 127) (e = 0: 2^-127, a subnormal fp32, exact); NaN for 0xff.
inline float E8M0ToF32(uint8_t e) {
  if (e == 0xff) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(e) - 127);
}

// The E8M0 code of a scale that is a power of two in [2^-127, 2^127] (or NaN -> 0xff); false otherwise.
inline bool F32ToE8M0(float s, uint8_t* e) {
  if (std::isnan(s)) {
    *e = 0xff;
    return true;
  }
  if (!(s > 0.0f)) return false;
  int exp;
  const float mant = std::frexp(s, &exp);  // s = mant * 2^exp, mant in [0.5, 1)
  if (mant != 0.5f || exp - 1 < -127 || exp - 1 > 127) return false;
  *e = static_cast<uint8_t>(exp - 1 + 127);
  return true;
}

// The block's shared exponent code for amax (OCP MX: floor(log2(amax)) - emax, clamped to [-127, 127]);
// 127 (scale 1) for an all-zero block.
inline uint8_t MxSharedExponent(float amax, int emax) {
  if (!(amax > 0.0f)) return 127;
  int exp;
  std::frexp(amax, &exp);  // amax in [2^(exp-1), 2^exp): floor(log2(amax)) = exp - 1
  int shared = exp - 1 - emax;
  if (shared < -127) shared = -127;
  if (shared > 127) shared = 127;
  return static_cast<uint8_t>(shared + 127);
}

}  // namespace kt

#endif  // KT_KERNELS_MX_H_
