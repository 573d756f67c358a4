// BF16 storage type and exact scalar conversions. The vectorized bulk conversions are in convert.h.
#ifndef KT_KERNELS_DTYPE_H_
#define KT_KERNELS_DTYPE_H_

#include <cstdint>
#include <cstring>

namespace kt {

// bfloat16 as stored: the upper 16 bits of an IEEE-754 binary32. A plain struct (not uint16_t) so that
// overloads cannot confuse it with integers; layout-compatible with torch.bfloat16.
struct bf16_t {
  uint16_t bits;
};
static_assert(sizeof(bf16_t) == 2, "bf16_t must be 2 bytes");

inline float Bf16ToF32(bf16_t v) {
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest, ties to even (what torch's .to(torch.bfloat16) does). NaN stays NaN: its payload's
// top bits are kept and the quiet bit is set, so rounding can never carry a NaN into infinity.
inline bf16_t F32ToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    return bf16_t{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  }
  const uint32_t lsb = (u >> 16) & 1u;
  u += 0x7fffu + lsb;
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// Rounds a float to the nearest bf16 value and returns it as float (used where the original rounds
// intermediates to bf16, e.g. silu(gate) * up before the down projection).
inline float RoundToBf16(float f) { return Bf16ToF32(F32ToBf16(f)); }

}  // namespace kt

#endif  // KT_KERNELS_DTYPE_H_
