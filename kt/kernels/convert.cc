// Bulk BF16 <-> FP32 conversion, Highway dynamic dispatch (three-file shape with the -inl part inline:
// this file is compiled once per target through foreach_target.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/convert.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "kt/kernels/bf16-inl.h"
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
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto bits = RoundToBf16Bits(du32, hn::LoadU(df, in + i));
    hn::StoreU(hn::TruncateTo(du16, bits), du16, dst + i);
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
