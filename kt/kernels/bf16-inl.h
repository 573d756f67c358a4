// Per-target Highway helpers for bf16 (textual header: include after <hwy/highway.h> inside
// HWY_BEFORE_NAMESPACE; no include guard on purpose, as Highway's -inl convention requires per-target
// re-inclusion).
#if defined(KT_KERNELS_BF16_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef KT_KERNELS_BF16_INL_H_
#undef KT_KERNELS_BF16_INL_H_
#else
#define KT_KERNELS_BF16_INL_H_
#endif

#include <hwy/highway.h>

#include "kt/kernels/dtype.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {

// fp32 lanes -> their bf16 bit patterns in the low 16 bits of each u32 lane: round to nearest even, NaN
// kept quiet with its sign (bit-identical to kt::F32ToBf16).
template <class DU32, class VF>
HWY_INLINE hwy::HWY_NAMESPACE::Vec<DU32> RoundToBf16Bits(DU32 du32, VF v) {
  namespace hn = hwy::HWY_NAMESPACE;
  const auto u = hn::BitCast(du32, v);
  const auto lsb = hn::And(hn::ShiftRight<16>(u), hn::Set(du32, 1u));
  const auto rounded = hn::Add(u, hn::Add(hn::Set(du32, 0x7fffu), lsb));
  const auto is_nan = hn::Gt(hn::And(u, hn::Set(du32, 0x7fffffffu)), hn::Set(du32, 0x7f800000u));
  const auto r = hn::IfThenElse(is_nan, hn::Or(u, hn::Set(du32, 0x00400000u)), rounded);
  return hn::ShiftRight<16>(r);
}

// Lanes(df) bf16 values at p widened to fp32 lanes (bf16 is the high half of an fp32): one u16 load of half
// a vector, a widening and a shift.
template <class DF>
HWY_INLINE hwy::HWY_NAMESPACE::Vec<DF> LoadBf16(DF df, const bf16_t* HWY_RESTRICT p) {
  namespace hn = hwy::HWY_NAMESPACE;
  const hn::RebindToUnsigned<DF> du32;
  const hn::Rebind<uint16_t, decltype(du32)> du16;
  const auto bits = hn::PromoteTo(du32, hn::LoadU(du16, reinterpret_cast<const uint16_t*>(p)));
  return hn::BitCast(df, hn::ShiftLeft<16>(bits));
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#endif  // KT_KERNELS_BF16_INL_H_
