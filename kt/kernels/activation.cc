#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/activation.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include <cmath>

#include "kt/kernels/activation.h"
#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/hwy_dispatch.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void SiluMul(const float* HWY_RESTRICT g, const float* HWY_RESTRICT u, bf16_t* HWY_RESTRICT h,
             size_t n) {
  const hn::ScalableTag<float> df;
  const hn::ScalableTag<uint32_t> du32;
  const hn::Rebind<uint16_t, decltype(du32)> du16;
  const size_t lanes = hn::Lanes(df);
  // exp(88) is near FLT_MAX; below g = -88 silu(g) is -0 to fp32 precision anyway.
  const auto kMaxNegExp = hn::Set(df, 88.0f);
  const auto one = hn::Set(df, 1.0f);
  uint16_t* out = reinterpret_cast<uint16_t*>(h);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto gv = hn::LoadU(df, g + i);
    const auto e = hn::Exp(df, hn::Min(hn::Neg(gv), kMaxNegExp));
    const auto silu = hn::Div(gv, hn::Add(one, e));
    const auto prod = hn::Mul(silu, hn::LoadU(df, u + i));
    hn::StoreU(hn::TruncateTo(du16, RoundToBf16Bits(du32, prod)), du16, out + i);
  }
  for (; i < n; ++i) h[i] = F32ToBf16(g[i] / (1.0f + std::exp(-g[i])) * u[i]);
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace {

using SiluMulFn = void (*)(const float*, const float*, bf16_t*, size_t);
const HwyFns<SiluMulFn> kSiluMul = KT_HWY_FNS(SiluMulFn, SiluMul);

}  // namespace

void SiluMulToBf16(Isa isa, const float* g, const float* u, bf16_t* h, size_t n) {
  if (const SiluMulFn fn = kSiluMul.For(isa)) return fn(g, u, h, n);
  for (size_t i = 0; i < n; ++i) h[i] = F32ToBf16(g[i] / (1.0f + std::exp(-g[i])) * u[i]);
}

void SwigluToBf16(Isa isa, const SwigluParams& p, float* g, float* u, bf16_t* h, size_t n) {
  if (p.limit > 0.0f) {
    const float l = p.limit;
    // Comparisons, not fmin/fmax, so that a NaN stays NaN.
    for (size_t i = 0; i < n; ++i) {
      g[i] = g[i] > l ? l : g[i];
      u[i] = u[i] > l ? l : (u[i] < -l ? -l : u[i]);
    }
  }
  if (p.alpha > 0.0f) {
    // g sigmoid(a g) (u + 1) = silu(a g) * ((u + 1) / a): the vectorized silu does the exp.
    const float a = p.alpha, inv = 1.0f / p.alpha;
    for (size_t i = 0; i < n; ++i) {
      g[i] *= a;
      u[i] = (u[i] + 1.0f) * inv;
    }
  }
  SiluMulToBf16(isa, g, u, h, n);
}

}  // namespace kt
#endif  // HWY_ONCE
