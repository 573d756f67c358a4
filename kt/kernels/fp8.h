// FP8 E4M3 ("e4m3fn": torch.float8_e4m3fn, safetensors F8_E4M3) scalar conversions, exact both ways where
// the value is representable.
//
// A code is s.eeee.mmm with exponent bias 7 and no infinities: e = 0 is subnormal (m * 2^-9), e in 1..15 is
// (1 + m / 8) * 2^(e - 7), except s.1111.111 which is NaN; the largest finite magnitude is 448 (0x7e). Every
// code is exactly a bf16 and an fp32 value (3 mantissa bits, exponents 2^-9 .. 2^8), so decoding never
// rounds. The vectorized decodes live in the kernels (gemm_fp8_hwy.cc); these are the scalar truth.
#ifndef KT_KERNELS_FP8_H_
#define KT_KERNELS_FP8_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kt/kernels/dtype.h"

namespace kt {

inline constexpr float kFp8E4M3Max = 448.0f;

// The fp32 value of an E4M3 code, by bit manipulation: a normal code's exponent and mantissa move into
// place and the exponent is rebased (bias 7 -> 127: + 120); a subnormal code is m * 2^-9 exactly.
inline float Fp8E4M3ToF32(uint8_t code) {
  const uint32_t mag = code & 0x7fu;
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  uint32_t bits;
  if (mag == 0x7fu) {
    bits = 0x7fc00000u;  // quiet NaN
  } else if (mag < 8u) {
    const float sub = static_cast<float>(mag) * (1.0f / 512.0f);  // exact: m < 8, times a power of two
    std::memcpy(&bits, &sub, sizeof(bits));
  } else {
    bits = (mag << 20) + (120u << 23);
  }
  bits |= sign;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The same value as bf16 (exact: the fp32 value's low 16 bits are zero).
inline bf16_t Fp8E4M3ToBf16(uint8_t code) {
  const float f = Fp8E4M3ToF32(code);
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// The nearest E4M3 code to f, ties to even; magnitudes beyond 448 saturate to +-448 (0x7e / 0xfe) and NaN
// gives 0x7f. (torch's cast gives NaN beyond the range; the block quantizer never gets there: every
// |w / scale| <= 448 up to one rounding.)
inline uint8_t F32ToFp8E4M3(float f) {
  if (std::isnan(f)) return 0x7f;
  const uint8_t sign = std::signbit(f) ? 0x80 : 0x00;
  const float a = std::fabs(f);
  if (a >= kFp8E4M3Max) return sign | 0x7e;
  uint32_t code;
  if (a < 1.0f / 64.0f) {
    // Subnormal range (below the smallest normal 2^-6): steps of 2^-9; rounding up to 8 is exactly the
    // smallest normal code 0x08.
    code = static_cast<uint32_t>(std::nearbyint(a * 512.0f));
  } else {
    int e;
    const float mant = std::frexp(a, &e);  // a = mant * 2^e, mant in [0.5, 1)
    // a = (1 + m/8) * 2^(e - 1): biased exponent e - 1 + 7; m rounded ties to even (nearbyint in the
    // default rounding mode). m = 8 carries into the exponent, which the code arithmetic does by itself.
    const uint32_t m = static_cast<uint32_t>(std::nearbyint((mant * 2.0f - 1.0f) * 8.0f));
    code = (static_cast<uint32_t>(e + 6) << 3) + m;
    if (code > 0x7eu) code = 0x7eu;  // 464 and above would round to 480, past the range: saturate
  }
  return static_cast<uint8_t>(sign | code);
}

}  // namespace kt

#endif  // KT_KERNELS_FP8_H_
