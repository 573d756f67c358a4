#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/act_quant.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kt/kernels/act_quant.h"
#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/quant.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// max |x[0, len)| (exact whatever the order), or NaN when some x is NaN or infinite: x * 0 is summed
// alongside, since Max alone would drop a NaN.
float SpanAbsMax(const bf16_t* HWY_RESTRICT x, size_t len) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  auto vmax = hn::Zero(df);
  auto vbad = hn::Zero(df);
  size_t i = 0;
  for (; i + lanes <= len; i += lanes) {
    const auto v = LoadBf16(df, x + i);
    vmax = hn::Max(vmax, hn::Abs(v));
    vbad = hn::MulAdd(v, hn::Zero(df), vbad);
  }
  float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
  bool finite = !std::isnan(hn::GetLane(hn::SumOfLanes(df, vbad)));
  for (; i < len; ++i) {
    const float a = Bf16ToF32(x[i]);
    finite = finite && std::isfinite(a);
    amax = amax > (a < 0 ? -a : a) ? amax : (a < 0 ? -a : a);
  }
  return finite ? amax : std::numeric_limits<float>::quiet_NaN();
}

// Quantizes x[0, len) against `amax` (SpanAbsMax of x, or of a longer row x is part of), exactly as
// quant.cc's QuantizeActivationInt8 does against the span's own: NaN amax gives q 0 and scale NaN.
float QuantizeSpanWithMax(const bf16_t* HWY_RESTRICT x, size_t len, float amax, int8_t* HWY_RESTRICT q) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di32;
  const hn::Rebind<int8_t, decltype(di32)> di8;
  const size_t lanes = hn::Lanes(df);
  if (std::isnan(amax)) {
    for (size_t j = 0; j < len; ++j) q[j] = 0;
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float scale = amax / 127.0f;
  if (!(scale > 0.0f)) {
    for (size_t j = 0; j < len; ++j) q[j] = 0;
    return 0.0f;
  }
  // q = clamp(round_half_away(x / scale)). x / scale - trunc(x / scale) is exact in fp32, so comparing
  // its magnitude with 0.5 decides the tie the same way std::round does.
  const auto vscale = hn::Set(df, scale);
  const auto half = hn::Set(df, 0.5f);
  const auto one = hn::Set(df, 1.0f);
  const auto lim = hn::Set(df, 127.0f);
  size_t i = 0;
  for (; i + lanes <= len; i += lanes) {
    const auto v = hn::Min(hn::Max(hn::Div(LoadBf16(df, x + i), vscale), hn::Neg(lim)), lim);
    const auto t = hn::Trunc(v);
    const auto away = hn::Ge(hn::Abs(hn::Sub(v, t)), half);
    const auto r = hn::IfThenElse(away, hn::Add(t, hn::CopySignToAbs(one, v)), t);
    const auto qi = hn::ConvertTo(di32, r);
    hn::StoreU(hn::DemoteTo(di8, qi), di8, q + i);
  }
  for (; i < len; ++i) {
    // Clamping before rounding equals clamping after (the bounds are integers), and makes the cast
    // defined for any input (a NaN lands on -127 as in the scalar code).
    const float v = std::fmin(std::fmax(Bf16ToF32(x[i]) / scale, -127.0f), 127.0f);
    float t = static_cast<float>(static_cast<int32_t>(v));
    const float frac = v - t;
    if (frac >= 0.5f) t += 1.0f;
    if (frac <= -0.5f) t -= 1.0f;
    q[i] = static_cast<int8_t>(t);
  }
  return scale;
}

float QuantizeSpan(const bf16_t* HWY_RESTRICT x, size_t len, int8_t* HWY_RESTRICT q) {
  return QuantizeSpanWithMax(x, len, SpanAbsMax(x, len), q);
}

void Row(const bf16_t* x, size_t k, int8_t* q, float* scale) { *scale = QuantizeSpan(x, k, q); }

void RowGrouped(const bf16_t* x, size_t k, size_t group, int8_t* q, float* scales) {
  for (size_t g = 0; g * group < k; ++g) scales[g] = QuantizeSpan(x + g * group, group, q + g * group);
}

float RowAbsMaxFn(const bf16_t* x, size_t k) { return SpanAbsMax(x, k); }

float RowWithMax(const bf16_t* x, size_t k, float amax, int8_t* q) { return QuantizeSpanWithMax(x, k, amax, q); }

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace {

using RowFn = void (*)(const bf16_t*, size_t, int8_t*, float*);
using RowGroupedFn = void (*)(const bf16_t*, size_t, size_t, int8_t*, float*);
using AbsMaxFn = float (*)(const bf16_t*, size_t);
using RowWithMaxFn = float (*)(const bf16_t*, size_t, float, int8_t*);

// kScalar (no Highway target) uses quant.h's reference code itself.
const HwyFns<RowFn> kRow = KT_HWY_FNS(RowFn, Row);
const HwyFns<RowGroupedFn> kRowGrouped = KT_HWY_FNS(RowGroupedFn, RowGrouped);
const HwyFns<AbsMaxFn> kAbsMax = KT_HWY_FNS(AbsMaxFn, RowAbsMaxFn);
const HwyFns<RowWithMaxFn> kRowWithMax = KT_HWY_FNS(RowWithMaxFn, RowWithMax);

}  // namespace

void QuantizeRowInt8(Isa isa, const bf16_t* x, size_t k, int8_t* q, float* scale) {
  if (const RowFn fn = kRow.For(isa)) return fn(x, k, q, scale);
  QuantizeActivationInt8(x, k, q, scale);
}

void QuantizeRowInt8Grouped(Isa isa, const bf16_t* x, size_t k, size_t group, int8_t* q, float* scales) {
  if (const RowGroupedFn fn = kRowGrouped.For(isa)) return fn(x, k, group, q, scales);
  for (size_t g = 0; g * group < k; ++g) {
    QuantizeActivationInt8(x + g * group, group, q + g * group, scales + g);
  }
}

float RowAbsMax(Isa isa, const bf16_t* x, size_t k) {
  if (const AbsMaxFn fn = kAbsMax.For(isa)) return fn(x, k);
  float amax = 0.0f;
  for (size_t i = 0; i < k; ++i) {
    const float a = Bf16ToF32(x[i]);
    if (!std::isfinite(a)) return std::numeric_limits<float>::quiet_NaN();
    amax = std::fmax(amax, std::fabs(a));
  }
  return amax;
}

float QuantizeRowInt8WithMax(Isa isa, const bf16_t* x, size_t k, float amax, int8_t* q) {
  if (const RowWithMaxFn fn = kRowWithMax.For(isa)) return fn(x, k, amax, q);
  if (std::isnan(amax)) {
    std::fill_n(q, k, int8_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  // quant.cc's QuantizeSymmetric with the given max: scale 0 (all-zero row) gives q 0; fmax/fmin before the
  // cast so the conversion is always defined.
  const float scale = amax / 127.0f;
  if (!(scale > 0.0f)) {
    std::fill_n(q, k, int8_t{0});
    return 0.0f;
  }
  for (size_t i = 0; i < k; ++i) {
    q[i] = static_cast<int8_t>(std::fmin(std::fmax(std::round(Bf16ToF32(x[i]) / scale), -127.0f), 127.0f));
  }
  return scale;
}

}  // namespace kt
#endif  // HWY_ONCE
