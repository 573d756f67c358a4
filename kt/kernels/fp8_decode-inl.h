// Per-target E4M3 -> fp32 decode of kLanes codes into fp32 lanes (gemm_fp8_hwy.cc has the two variants'
// reasoning), shared by the FP8 block-scaled and the MXFP8 kernels. Textual header: include after
// <hwy/highway.h>; re-included per target (Highway's -inl convention).
#if defined(KT_KERNELS_FP8_DECODE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef KT_KERNELS_FP8_DECODE_INL_H_
#undef KT_KERNELS_FP8_DECODE_INL_H_
#else
#define KT_KERNELS_FP8_DECODE_INL_H_
#endif

#include <hwy/highway.h>

#include <cstdint>
#include <limits>

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;  // the same alias as the including files' (a redeclaration is allowed)

// The decode constants, built once per micro-kernel call. kFast: the multiply decode (MXCSR.DAZ clear).
template <bool kFast>
struct Fp8Decoder {
  using DF = hn::ScalableTag<float>;
  using DU = hn::ScalableTag<uint32_t>;
  using DI = hn::ScalableTag<int32_t>;
  hn::Vec<DU> mag_mask, sign_mask, rebias, nan_mag, sub_limit, lane_mask, mag_bits, nan_bits;
  hn::Vec<DF> sub_scale, nan, pow120;
  Fp8Decoder()
      : mag_mask(hn::Set(DU(), 0x7fu)),
        sign_mask(hn::Set(DU(), 0x80u)),
        rebias(hn::Set(DU(), 120u << 23)),
        nan_mag(hn::Set(DU(), 0x7fu)),
        sub_limit(hn::Set(DU(), 8u)),
        lane_mask(hn::Set(DU(), 0x87f00000u)),
        mag_bits(hn::Set(DU(), 0x07f00000u)),
        nan_bits(hn::Set(DU(), 0x07f00000u)),
        sub_scale(hn::Set(DF(), 1.0f / 512.0f)),
        nan(hn::Set(DF(), std::numeric_limits<float>::quiet_NaN())),
        pow120(hn::Set(DF(), 0x1p120f)) {}

  // kLanes codes at p (one per 32-bit lane) to fp32.
  HWY_INLINE hn::Vec<DF> Decode(const uint8_t* HWY_RESTRICT p) const {
    const DF df;
    const DU du;
    if constexpr (kFast) {
      const DI di;
      const hn::Rebind<int8_t, DI> di8;
      const auto code = hn::BitCast(du, hn::PromoteTo(di, hn::LoadU(di8, reinterpret_cast<const int8_t*>(p))));
      const auto lane = hn::And(hn::ShiftLeft<20>(code), lane_mask);
      const auto v = hn::Mul(hn::BitCast(df, lane), pow120);
      const auto is_nan = hn::Eq(hn::And(lane, mag_bits), nan_bits);
      return hn::Or(v, hn::BitCast(df, hn::VecFromMask(du, is_nan)));  // all ones: a NaN
    } else {
      const hn::Rebind<uint8_t, DU> du8;
      const auto code = hn::PromoteTo(du, hn::LoadU(du8, p));
      const auto mag = hn::And(code, mag_mask);
      const auto normal = hn::BitCast(df, hn::Add(hn::ShiftLeft<20>(mag), rebias));
      const auto sub = hn::Mul(hn::ConvertTo(df, hn::BitCast(DI(), mag)), sub_scale);
      auto v = hn::IfThenElse(hn::RebindMask(df, hn::Lt(mag, sub_limit)), sub, normal);
      v = hn::IfThenElse(hn::RebindMask(df, hn::Eq(mag, nan_mag)), nan, v);
      const auto sign = hn::ShiftLeft<24>(hn::And(code, sign_mask));
      return hn::Or(v, hn::BitCast(df, sign));
    }
  }
};

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#endif  // KT_KERNELS_FP8_DECODE_INL_H_
