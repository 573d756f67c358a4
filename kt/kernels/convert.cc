// Bulk BF16 <-> FP32 conversion, Highway dynamic dispatch (three-file shape with the -inl part inline:
// this file is compiled once per target through foreach_target.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/convert.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "kt/kernels/convert.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void Bf16ToF32(const bf16_t* HWY_RESTRICT in, float* HWY_RESTRICT out, size_t n) {
  const hn::ScalableTag<uint32_t> du32;
  const hn::ScalableTag<float> df;
  const hn::Rebind<uint16_t, decltype(du32)> du16;
  const size_t lanes = hn::Lanes(du32);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(in);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto wide = hn::PromoteTo(du32, hn::LoadU(du16, src + i));
    hn::StoreU(hn::BitCast(df, hn::ShiftLeft<16>(wide)), df, out + i);
  }
  for (; i < n; ++i) out[i] = kt::Bf16ToF32(in[i]);
}

void F32ToBf16(const float* HWY_RESTRICT in, bf16_t* HWY_RESTRICT out, size_t n) {
  const hn::ScalableTag<uint32_t> du32;
  const hn::ScalableTag<float> df;
  const hn::Rebind<uint16_t, decltype(du32)> du16;
  const size_t lanes = hn::Lanes(du32);
  uint16_t* dst = reinterpret_cast<uint16_t*>(out);
  const auto k7fff = hn::Set(du32, 0x7fffu);
  const auto kOne = hn::Set(du32, 1u);
  const auto kAbsMask = hn::Set(du32, 0x7fffffffu);
  const auto kInf = hn::Set(du32, 0x7f800000u);
  const auto kQuiet = hn::Set(du32, 0x00400000u);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto u = hn::BitCast(du32, hn::LoadU(df, in + i));
    // Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate.
    const auto lsb = hn::And(hn::ShiftRight<16>(u), kOne);
    const auto rounded = hn::Add(u, hn::Add(k7fff, lsb));
    // NaN: keep the payload's top bits and force quiet, without rounding.
    const auto is_nan = hn::Gt(hn::And(u, kAbsMask), kInf);
    const auto r = hn::IfThenElse(is_nan, hn::Or(u, kQuiet), rounded);
    hn::StoreU(hn::TruncateTo(du16, hn::ShiftRight<16>(r)), du16, dst + i);
  }
  for (; i < n; ++i) out[i] = kt::F32ToBf16(in[i]);
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {

HWY_EXPORT(Bf16ToF32);
HWY_EXPORT(F32ToBf16);

// Bulk conversion is memory bound and exact on every target, so the Isa only decides scalar vs. vectors.
void ConvertBf16ToF32(Isa isa, const bf16_t* in, float* out, size_t n) {
  if (isa == Isa::kScalar) {
    for (size_t i = 0; i < n; ++i) out[i] = Bf16ToF32(in[i]);
    return;
  }
  HWY_DYNAMIC_DISPATCH(Bf16ToF32)(in, out, n);
}

void ConvertF32ToBf16(Isa isa, const float* in, bf16_t* out, size_t n) {
  if (isa == Isa::kScalar) {
    for (size_t i = 0; i < n; ++i) out[i] = F32ToBf16(in[i]);
    return;
  }
  HWY_DYNAMIC_DISPATCH(F32ToBf16)(in, out, n);
}

}  // namespace kt
#endif  // HWY_ONCE
