// Bulk BF16 <-> FP32 conversion, one Highway target per Isa (three-file shape with the -inl part inline:
// this file is compiled once per target through foreach_target.h).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/convert.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/convert.h"
#include "kt/kernels/hwy_dispatch.h"

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
namespace {

using Bf16ToF32Fn = void (*)(const bf16_t*, float*, size_t);
using F32ToBf16Fn = void (*)(const float*, bf16_t*, size_t);

const HwyFns<Bf16ToF32Fn> kBf16ToF32 = KT_HWY_FNS(Bf16ToF32Fn, Bf16ToF32);
const HwyFns<F32ToBf16Fn> kF32ToBf16 = KT_HWY_FNS(F32ToBf16Fn, F32ToBf16);

}  // namespace

// Bulk conversion is memory bound and exact on every target; the Isa picks the target like every other
// Highway module of kt (hwy_dispatch.h), so KT_ISA caps it too.
void ConvertBf16ToF32(Isa isa, const bf16_t* in, float* out, size_t n) {
  if (const Bf16ToF32Fn fn = kBf16ToF32.For(isa)) return fn(in, out, n);
  for (size_t i = 0; i < n; ++i) out[i] = Bf16ToF32(in[i]);
}

void ConvertF32ToBf16(Isa isa, const float* in, bf16_t* out, size_t n) {
  if (const F32ToBf16Fn fn = kF32ToBf16.For(isa)) return fn(in, out, n);
  for (size_t i = 0; i < n; ++i) out[i] = F32ToBf16(in[i]);
}

}  // namespace kt
#endif  // HWY_ONCE
