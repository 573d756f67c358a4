// Highway kernels (AVX2, AVX3, AVX3_DL) for the FP8 block-scaled GEMM over kt-fp8-panel16-kblock128-v1
// panels (gemm_fp8.h).
//
// Per k, one 16-byte row of a panel holds that k's codes of the panel's 16 output rows. They widen to 32-bit
// lanes (2 vectors on AVX2, 1 on AVX3) and decode to fp32 exactly, with integer ops only (no subnormal fp32
// operand, so flush-to-zero / denormals-are-zero modes cannot change a value):
//   normal codes (exponent field > 0): bits = (code & 0x7f) << 20, plus 120 << 23 to rebias the exponent;
//   subnormal codes (magnitude < 8):    float(magnitude) * 2^-9;
//   magnitude 0x7f:                     NaN;
//   sign:                               bit 7 moved to bit 31.
// The decoded weights are FMAed with the broadcast activation x[k] into a per-k-block accumulator; at the end
// of each 128-k block, accumulator * the 16 rows' block scales is added to the row's total (kept in a small
// array in L1: it is touched once per 128 k). Rows go MR at a time (4 on AVX2, 8 on AVX3); the weights are
// decoded once per MR rows, which is what decode (M <= 4) needs; prefill re-decodes per row block.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_fp8_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "kt/kernels/gemm_fp8.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DU = hn::ScalableTag<uint32_t>;
using DI = hn::ScalableTag<int32_t>;
constexpr size_t kLanes = HWY_MAX_BYTES / sizeof(float);
constexpr size_t kVecs = kFp8PanelRows / kLanes;  // vectors per 16 rows: 1 (AVX3), 2 (AVX2), 4 (128-bit)
constexpr int kMaxRows = HWY_MAX_BYTES >= 64 ? 8 : 4;

// The decode constants, built once per micro-kernel call.
struct Fp8Decoder {
  hn::Vec<DU> mag_mask, sign_mask, rebias, nan_mag, sub_limit;
  hn::Vec<DF> sub_scale, nan;
  Fp8Decoder()
      : mag_mask(hn::Set(DU(), 0x7fu)),
        sign_mask(hn::Set(DU(), 0x80u)),
        rebias(hn::Set(DU(), 120u << 23)),
        nan_mag(hn::Set(DU(), 0x7fu)),
        sub_limit(hn::Set(DU(), 8u)),
        sub_scale(hn::Set(DF(), 1.0f / 512.0f)),
        nan(hn::Set(DF(), std::numeric_limits<float>::quiet_NaN())) {}

  // kLanes codes at p (one per 32-bit lane) to fp32.
  HWY_INLINE hn::Vec<DF> Decode(const uint8_t* HWY_RESTRICT p) const {
    const DF df;
    const DU du;
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
};

// MR rows (x, ldx) x one 16-row panel: total[r][16] over all k blocks.
template <int MR>
HWY_INLINE void Micro(size_t k, const bf16_t* HWY_RESTRICT x, size_t ldx, const uint8_t* HWY_RESTRICT panel,
                      const float* HWY_RESTRICT scales, float (*HWY_RESTRICT total)[kFp8PanelRows]) {
  const DF df;
  using VF = hn::Vec<DF>;
  const Fp8Decoder dec;
  for (int r = 0; r < MR; ++r) {
    for (size_t s = 0; s < kVecs; ++s) hn::Store(hn::Zero(df), df, total[r] + s * kLanes);
  }
  const size_t blocks = Fp8KBlocks(k);
  for (size_t b = 0; b < blocks; ++b) {
    VF acc[MR][kVecs];
    for (int r = 0; r < MR; ++r) {
      for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::Zero(df);
    }
    const size_t c1 = std::min(k, (b + 1) * kFp8BlockK);
    for (size_t c = b * kFp8BlockK; c < c1; ++c) {
      VF w[kVecs];
      for (size_t s = 0; s < kVecs; ++s) w[s] = dec.Decode(panel + c * kFp8PanelRows + s * kLanes);
      for (int r = 0; r < MR; ++r) {
        const VF xv = hn::Set(df, Bf16ToF32(x[r * ldx + c]));
        for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::MulAdd(xv, w[s], acc[r][s]);
      }
    }
    const float* bs = scales + b * kFp8PanelRows;
    for (size_t s = 0; s < kVecs; ++s) {
      const VF scale = hn::LoadU(df, bs + s * kLanes);
      for (int r = 0; r < MR; ++r) {
        float* t = total[r] + s * kLanes;
        hn::Store(hn::MulAdd(acc[r][s], scale, hn::Load(df, t)), df, t);
      }
    }
  }
}

using MicroFn = void (*)(size_t, const bf16_t*, size_t, const uint8_t*, const float*, float (*)[kFp8PanelRows]);

MicroFn PickRows(size_t rows) {
  switch (rows) {
    case 1: return &Micro<1>;
    case 2: return &Micro<2>;
    case 3: return &Micro<3>;
    case 4: return &Micro<4>;
    case 5: return &Micro<(kMaxRows >= 5 ? 5 : 4)>;
    case 6: return &Micro<(kMaxRows >= 6 ? 6 : 4)>;
    case 7: return &Micro<(kMaxRows >= 7 ? 7 : 4)>;
    default: return &Micro<kMaxRows>;
  }
}

void GemmFp8(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const float* scales,
             size_t n_cols, float* y, size_t ldy) {
  const size_t stride = Fp8PanelStride(k), scale_stride = kFp8PanelRows * Fp8KBlocks(k);
  HWY_ALIGN float total[kMaxRows][kFp8PanelRows];
  for (size_t p = 0; p * kFp8PanelRows < n_cols; ++p) {
    const size_t c0 = p * kFp8PanelRows;
    const size_t cols = std::min(kFp8PanelRows, n_cols - c0);
    for (size_t i = 0; i < m;) {
      const size_t rows = std::min<size_t>(kMaxRows, m - i);
      PickRows(rows)(k, x + i * ldx, ldx, panels + p * stride, scales + p * scale_stride, total);
      for (size_t r = 0; r < rows; ++r) std::memcpy(y + (i + r) * ldy + c0, total[r], cols * sizeof(float));
      i += rows;
    }
  }
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace internal {

// Explicit per-target selection (as gemm_bf16_hwy.cc): KT_ISA caps the path, the caller picks the target.
GemmFp8Fn GemmFp8Hwy(Isa isa) {
  switch (isa) {
#if HWY_TARGETS & HWY_AVX2
    case Isa::kAvx2:
      return &N_AVX2::GemmFp8;
#endif
#if HWY_TARGETS & HWY_AVX3
    case Isa::kAvx512:
      return &N_AVX3::GemmFp8;
#endif
#if HWY_TARGETS & HWY_AVX3_DL
    case Isa::kAvx512Vnni:
    case Isa::kAvx512Bf16:
    case Isa::kAmx:
      return &N_AVX3_DL::GemmFp8;
#endif
    default:
      return nullptr;
  }
}

}  // namespace internal
}  // namespace kt
#endif  // HWY_ONCE
