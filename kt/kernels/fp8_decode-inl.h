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

#include <cstddef>
#include <cstdint>
#include <limits>

#include "kt/kernels/prefetch.h"

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

// The throughput decode (MXCSR.DAZ clear, no NaN code among the bytes it reads: callers check with
// Fp8AnyNan first), through fp16: an E4M3 code c sign-extended to 16 bits and shifted left by 7 has its
// magnitude bits at 13..7, its sign at bits 15 and 14; with bit 14 cleared that is the fp16 whose value is
// the E4M3 value times 2^-8 (fp16's exponent bias is 15, E4M3's 7; the subnormal codes land on fp16
// subnormals with the same factor), which F16C's vcvtph2ps (Highway's PromoteTo) widens to fp32 exactly.
// 3 integer operations per 16 (AVX2) or 32 (AVX3) codes plus the conversions, against Fp8Decoder's 6 per
// kLanes codes; the 2^-8 is taken back once per block on the accumulators (a power of two: exact).
#undef KT_FP8_HALF_DECODE
// Not on HWY_SCALAR (one lane: no halves), where the kernels use Fp8Decoder only.
#if HWY_TARGET != HWY_SCALAR
#define KT_FP8_HALF_DECODE 1
struct Fp8HalfDecoder {
  using DF = hn::ScalableTag<float>;
  using DI16 = hn::Repartition<int16_t, DF>;  // 2 * kLanes lanes
  hn::Vec<DI16> keep;
  Fp8HalfDecoder() : keep(hn::Set(DI16(), static_cast<int16_t>(0xbfff))) {}

  static constexpr float kUnscale = 256.0f;  // the decoded values are the E4M3 values times 1 / kUnscale

  // 2 * kLanes codes at p: the first kLanes into lo, the next into hi (values times 2^-8).
  HWY_INLINE void Decode2(const uint8_t* HWY_RESTRICT p, hn::Vec<DF>& lo, hn::Vec<DF>& hi) const {
    const DF df;
    const DI16 di16;
    const hn::Rebind<int8_t, DI16> di8;
    const hn::Half<DI16> dh16;
    const hn::Rebind<hwy::float16_t, decltype(dh16)> dhf;
    const auto h = hn::And(hn::ShiftLeft<7>(hn::PromoteTo(di16, hn::LoadU(di8, reinterpret_cast<const int8_t*>(p)))),
                           keep);
    lo = hn::PromoteTo(df, hn::BitCast(dhf, hn::LowerHalf(dh16, h)));
    hi = hn::PromoteTo(df, hn::BitCast(dhf, hn::UpperHalf(dh16, h)));
  }
};

// Whether any of the `len` bytes at p (len a multiple of 16) is an E4M3 NaN code (0x7f or 0xff): with the
// sign bit set, a NaN is the byte 0xff, the largest; 2 operations per vector of bytes. With kPrefetch (decode:
// the bytes come from DRAM once) it also asks for each 64-byte line kDecodePrefetchBytes ahead
// (prefetch.h): the scan runs ahead of the arithmetic, so the line is in flight well before it is needed.
template <bool kPrefetch>
HWY_INLINE bool Fp8AnyNan(const uint8_t* HWY_RESTRICT p, size_t len) {
  const hn::ScalableTag<uint8_t> d8;
  const hn::FixedTag<uint8_t, 16> d16;
  constexpr size_t kLine = 64;
  const size_t n = hn::Lanes(d8);
  auto mx = hn::Zero(d8);
  const auto sign = hn::Set(d8, 0x80);
  size_t i = 0;
  if (n <= kLine) {
    for (; i + kLine <= len; i += kLine) {
      if (kPrefetch) PrefetchAhead(p + i);
      for (size_t j = 0; j < kLine; j += n) mx = hn::Max(mx, hn::Or(hn::LoadU(d8, p + i + j), sign));
    }
  }
  for (; i + n <= len; i += n) mx = hn::Max(mx, hn::Or(hn::LoadU(d8, p + i), sign));
  bool nan = !hn::AllFalse(d8, hn::Eq(mx, hn::Set(d8, 0xff)));
  auto mx16 = hn::Zero(d16);
  for (; i < len; i += 16) mx16 = hn::Max(mx16, hn::Or(hn::LoadU(d16, p + i), hn::Set(d16, 0x80)));
  return nan || !hn::AllFalse(d16, hn::Eq(mx16, hn::Set(d16, 0xff)));
}
#else
#define KT_FP8_HALF_DECODE 0
#endif  // HWY_TARGET != HWY_SCALAR

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#endif  // KT_KERNELS_FP8_DECODE_INL_H_
