// Highway kernels (AVX2, AVX3, AVX3_DL) for the FP8 block-scaled GEMM over kt-fp8-panel16-kblock128-v1
// panels (gemm_fp8.h).
//
// Per k, one 16-byte row of a panel holds that k's codes of the panel's 16 output rows. They widen to 32-bit
// lanes (2 vectors on AVX2, 1 on AVX3) and decode to fp32 exactly, one of two ways:
//   fast (the default): the code sign-extended to 32 bits and shifted left by 20 puts its sign at bit 31 and
//     its exponent and mantissa at bits 20..26: masked, that is the fp32 whose value is the E4M3 value times
//     2^-120 (a subnormal fp32 for the subnormal codes), and one multiply by 2^120 gives the value exactly;
//     magnitude 0x7f (NaN) is or-ed to all ones. 6 operations per vector.
//   exact under denormals-are-zero: when MXCSR.DAZ is set (a library built with -ffast-math can set it for
//     the whole process), that multiply would read the subnormal operand as 0, so integer operations only:
//     normal codes (exponent field > 0): (code & 0x7f) << 20 plus 120 << 23 to rebias the exponent;
//     subnormal codes (magnitude < 8): float(magnitude) * 2^-9; NaN; the sign bit moved to bit 31.
//   GemmFp8 reads MXCSR once per call (Fp8DenormalsAreZero) and picks the variant; both are tested.
// The decoded weights are FMAed with the broadcast activation x[k] into a per-k-block accumulator; at the end
// of each 128-k block, accumulator * the 16 rows' block scales is added to the row's total (kept in a small
// array in L1: it is touched once per 128 k). Rows go MR at a time (4 on AVX2, 8 on AVX3). Up to MR rows
// (decode), the weights are decoded in registers as they stream; with more rows (prefill), each 128-k block of
// a whole panel is decoded once into an 8 KiB fp32 buffer (L1) that every row block then reads, and y itself
// holds the totals.
// Decode (up to kFp8DecodeMaxRows rows: 2 on AVX2, 4 on AVX3), DAZ clear, takes a third way
// (fp8_decode-inl.h, Fp8DecodeRows): two panels side by side, the activations pre-multiplied by 2^112 so that
// the codes need integer operations only (sign-extend, shift, and: the E4M3 value times 2^-120, products
// x * w * 2^-8), NaN codes found inside the loop, the 2^-8 taken back per block (exact): bit for bit the sums
// of the fp16 decode this kernel had before. A block with a NaN code or an |x| >= 2^16 takes the fast decode
// above, in one chain.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_fp8_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "kt/kernels/gemm_fp8.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/prefetch.h"

// Per-target bf16 helpers (LoadBf16) and the E4M3 decoder (Fp8Decoder): re-included per target, hence after
// foreach_target.
#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/fp8_decode-inl.h"

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

// The loops over rows and vectors of a micro-kernel must be unrolled for its accumulators to live in
// registers (GCC at -O2 otherwise keeps the acc[][] array on the stack: 5x slower, measured).
#ifndef KT_FP8_UNROLL
#define KT_FP8_UNROLL _Pragma("GCC unroll 16")
#endif

// x[r][c0 .. c0 + len) of MR rows as fp32 into xf[r][0 .. len): vector widening, so that the inner loops
// broadcast each activation straight from L1 (one load) instead of widening it per use.
template <int MR>
HWY_INLINE void WidenRows(const bf16_t* HWY_RESTRICT x, size_t ldx, size_t len,
                          float (*HWY_RESTRICT xf)[kFp8BlockK]) {
  const DF df;
  KT_FP8_UNROLL
  for (int r = 0; r < MR; ++r) {
    size_t c = 0;
    for (; c + kLanes <= len; c += kLanes) hn::Store(LoadBf16(df, x + r * ldx + c), df, xf[r] + c);
    for (; c < len; ++c) xf[r][c] = Bf16ToF32(x[r * ldx + c]);
  }
}

// One k block [c0, c1) of MR rows x one 16-row panel with Fp8Decoder: acc[r][s] (zeroed here) = sum over the
// block of x * w, w the exact E4M3 values.
template <int MR, bool kFast>
HWY_NOINLINE void BlockExact(size_t c0, size_t c1, const float (*HWY_RESTRICT xf)[kFp8BlockK],
                           const uint8_t* HWY_RESTRICT panel, hn::Vec<DF> (&acc)[MR][kVecs]) {
  const DF df;
  using VF = hn::Vec<DF>;
  const Fp8Decoder<kFast> dec;
  // Local accumulators, acc written once at the end: a vector type may alias the floats of xf, so GCC
  // would store every FMA's result through the reference.
  VF sum[MR][kVecs];
  KT_FP8_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) sum[r][s] = hn::Zero(df);
  }
  for (size_t c = c0; c < c1; ++c) {
    VF w[kVecs];
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) w[s] = dec.Decode(panel + c * kFp8PanelRows + s * kLanes);
    KT_FP8_UNROLL
    for (int r = 0; r < MR; ++r) {
      const VF xv = hn::Set(df, xf[r][c - c0]);
      KT_FP8_UNROLL
      for (size_t s = 0; s < kVecs; ++s) sum[r][s] = hn::MulAdd(xv, w[s], sum[r][s]);
    }
  }
  KT_FP8_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) acc[r][s] = sum[r][s];
  }
}

// MR rows (x, ldx) x one 16-row panel: total[r][16] over all k blocks, through BlockExact.
template <int MR, bool kFast>
HWY_INLINE void Micro(size_t k, const bf16_t* HWY_RESTRICT x, size_t ldx, const uint8_t* HWY_RESTRICT panel,
                      const float* HWY_RESTRICT scales, float (*HWY_RESTRICT total)[kFp8PanelRows]) {
  const DF df;
  using VF = hn::Vec<DF>;
  KT_FP8_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) hn::Store(hn::Zero(df), df, total[r] + s * kLanes);
  }
  const size_t blocks = Fp8KBlocks(k);
  for (size_t b = 0; b < blocks; ++b) {
    VF acc[MR][kVecs];
    const size_t c0 = b * kFp8BlockK, c1 = std::min(k, c0 + kFp8BlockK);
    HWY_ALIGN float xf[MR][kFp8BlockK];
    WidenRows<MR>(x + c0, ldx, c1 - c0, xf);
    BlockExact<MR, kFast>(c0, c1, xf, panel, acc);
    const float* bs = scales + b * kFp8PanelRows;
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) {
      const VF scale = hn::LoadU(df, bs + s * kLanes);
      KT_FP8_UNROLL
      for (int r = 0; r < MR; ++r) {
        float* t = total[r] + s * kLanes;
        hn::Store(hn::MulAdd(acc[r][s], scale, hn::Load(df, t)), df, t);
      }
    }
  }
}

// Prefill: MR rows x one whole panel over one decoded k block w[len][16] (L1); y (16 columns of MR rows)
// becomes acc * scale on the first block and y + acc * scale after, as Micro's total does.
template <int MR>
HWY_INLINE void MicroDecoded(size_t len, const bf16_t* HWY_RESTRICT x, size_t ldx, const float* HWY_RESTRICT w,
                             const float* HWY_RESTRICT scale, bool first, float* HWY_RESTRICT y, size_t ldy) {
  const DF df;
  using VF = hn::Vec<DF>;
  VF acc[MR][kVecs];
  KT_FP8_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::Zero(df);
  }
  HWY_ALIGN float xf[MR][kFp8BlockK];
  WidenRows<MR>(x, ldx, len, xf);
  for (size_t c = 0; c < len; ++c) {
    VF wv[kVecs];
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) wv[s] = hn::Load(df, w + c * kFp8PanelRows + s * kLanes);
    KT_FP8_UNROLL
    for (int r = 0; r < MR; ++r) {
      const VF xv = hn::Set(df, xf[r][c]);
      KT_FP8_UNROLL
      for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::MulAdd(xv, wv[s], acc[r][s]);
    }
  }
  KT_FP8_UNROLL
  for (size_t s = 0; s < kVecs; ++s) {
    const VF sc = hn::LoadU(df, scale + s * kLanes);
    KT_FP8_UNROLL
    for (int r = 0; r < MR; ++r) {
      float* t = y + r * ldy + s * kLanes;
      hn::StoreU(hn::MulAdd(acc[r][s], sc, first ? hn::Zero(df) : hn::LoadU(df, t)), df, t);
    }
  }
}

using DecodedFn = void (*)(size_t, const bf16_t*, size_t, const float*, const float*, bool, float*, size_t);

DecodedFn PickDecodedRows(size_t rows) {
  switch (rows) {
    case 1: return &MicroDecoded<1>;
    case 2: return &MicroDecoded<2>;
    case 3: return &MicroDecoded<3>;
    case 4: return &MicroDecoded<4>;
    case 5: return &MicroDecoded<(kMaxRows >= 5 ? 5 : 4)>;
    case 6: return &MicroDecoded<(kMaxRows >= 6 ? 6 : 4)>;
    case 7: return &MicroDecoded<(kMaxRows >= 7 ? 7 : 4)>;
    default: return &MicroDecoded<kMaxRows>;
  }
}

// Decodes k in [c0, c1) of a panel into w[c1 - c0][16].
template <bool kFast>
void DecodeBlock(const uint8_t* HWY_RESTRICT panel, size_t c0, size_t c1, float* HWY_RESTRICT w) {
  const DF df;
  const Fp8Decoder<kFast> dec;
  for (size_t c = c0; c < c1; ++c) {
    KT_FP8_UNROLL
    for (size_t s = 0; s < kVecs; ++s) {
      hn::Store(dec.Decode(panel + c * kFp8PanelRows + s * kLanes), df, w + (c - c0) * kFp8PanelRows + s * kLanes);
    }
  }
}

using MicroFn = void (*)(size_t, const bf16_t*, size_t, const uint8_t*, const float*, float (*)[kFp8PanelRows]);

template <bool kFast>
MicroFn PickRows(size_t rows) {
  switch (rows) {
    case 1: return &Micro<1, kFast>;
    case 2: return &Micro<2, kFast>;
    case 3: return &Micro<3, kFast>;
    case 4: return &Micro<4, kFast>;
    case 5: return &Micro<(kMaxRows >= 5 ? 5 : 4), kFast>;
    case 6: return &Micro<(kMaxRows >= 6 ? 6 : 4), kFast>;
    case 7: return &Micro<(kMaxRows >= 7 ? 7 : 4), kFast>;
    default: return &Micro<kMaxRows, kFast>;
  }
}


void GemmFp8(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const float* scales,
             size_t n_cols, float* y, size_t ldy) {
  const size_t stride = Fp8PanelStride(k), scale_stride = kFp8PanelRows * Fp8KBlocks(k);
  HWY_ALIGN float total[kMaxRows][kFp8PanelRows];
  const bool fast = !internal::Fp8DenormalsAreZero();
#if KT_FP8_DECODE_ROWS
  if (fast && m <= kFp8DecodeMaxRows) {  // decode: fp8_decode-inl.h's, with the block scales
    const DF df;
    return Fp8DecodeRows<kFp8BlockK>(m, k, x, ldx, panels, n_cols, y, ldy, [&](size_t p, size_t b, size_t s) HWY_ATTR {
      return hn::LoadU(df, scales + p * scale_stride + b * kFp8PanelRows + s * kLanes);
    });
  }
#endif
  HWY_ALIGN float decoded[kFp8BlockK * kFp8PanelRows];
  const size_t blocks = Fp8KBlocks(k);
  for (size_t p = 0; p * kFp8PanelRows < n_cols; ++p) {
    const size_t c0 = p * kFp8PanelRows;
    const size_t cols = std::min(kFp8PanelRows, n_cols - c0);
    if (m > static_cast<size_t>(kMaxRows) && cols == kFp8PanelRows) {
      // Prefill on a whole panel: decode each k block once, then every row block reads it.
      for (size_t b = 0; b < blocks; ++b) {
        const size_t k0 = b * kFp8BlockK, k1 = std::min(k, k0 + kFp8BlockK);
        if (fast) {
          DecodeBlock<true>(panels + p * stride, k0, k1, decoded);
        } else {
          DecodeBlock<false>(panels + p * stride, k0, k1, decoded);
        }
        const float* scale = scales + p * scale_stride + b * kFp8PanelRows;
        for (size_t i = 0; i < m;) {
          const size_t rows = std::min<size_t>(kMaxRows, m - i);
          PickDecodedRows(rows)(k1 - k0, x + i * ldx + k0, ldx, decoded, scale, b == 0, y + i * ldy + c0, ldy);
          i += rows;
        }
      }
      continue;
    }
    for (size_t i = 0; i < m;) {
      const size_t rows = std::min<size_t>(kMaxRows, m - i);
      (fast ? PickRows<true>(rows) : PickRows<false>(rows))(k, x + i * ldx, ldx, panels + p * stride, scales + p * scale_stride, total);
      for (size_t r = 0; r < rows; ++r) std::memcpy(y + (i + r) * ldy + c0, total[r], cols * sizeof(float));
      i += rows;
    }
  }
}

// bf16 bits of v (low 16 bits of each lane), rounded to nearest even as dtype.h's F32ToBf16; every NaN as the
// quiet NaN 0x7fc0, which is what F32ToBf16(Fp8E4M3ToF32(NaN code) * scale) gives (the decoder's NaN lanes are
// all ones).
HWY_INLINE hn::Vec<DU> RoundToBf16Bits(hn::Vec<DF> v) {
  const DU du;
  const auto u = hn::BitCast(du, v);
  const auto is_nan = hn::Gt(hn::And(u, hn::Set(du, 0x7fffffffu)), hn::Set(du, 0x7f800000u));
  const auto rounded = hn::ShiftRight<16>(hn::Add(u, hn::Add(hn::Set(du, 0x7fffu), hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1u)))));
  return hn::IfThenElse(is_nan, hn::Set(du, 0x7fc0u), rounded);
}

// n_panels FP8 panels (with their scales) to bf16 panels in gemm_bf16.h's layout: out[kp][r] holds
// {bf16(w[r][2kp]), bf16(w[r][2kp + 1])} with w = fp8 * block scale (one fp32 multiply, one rounding: what
// UnpackFp8ToBf16 gives), the pair of an odd K's last k zero. For the AMX path (GemmFp8Amx).
template <bool kFast>
void PanelsToBf16Impl(size_t k, const uint8_t* HWY_RESTRICT panels, const float* HWY_RESTRICT scales,
                      size_t n_panels, bf16_t* HWY_RESTRICT out) {
  const DF df;
  const DU du;
  const Fp8Decoder<kFast> dec;
  const size_t stride = Fp8PanelStride(k), blocks = Fp8KBlocks(k), pairs = (k + 1) / 2;
  for (size_t p = 0; p < n_panels; ++p) {
    const uint8_t* panel = panels + p * stride;
    const float* ps = scales + p * kFp8PanelRows * blocks;
    uint32_t* o = reinterpret_cast<uint32_t*>(out + p * pairs * 2 * kFp8PanelRows);
    for (size_t kp = 0; kp < pairs; ++kp) {
      const size_t c = 2 * kp;
      const float* sc = ps + (c / kFp8BlockK) * kFp8PanelRows;  // c and c + 1 share a 128-k block
      KT_FP8_UNROLL
      for (size_t s = 0; s < kVecs; ++s) {
        const auto scale = hn::LoadU(df, sc + s * kLanes);
        const auto lo = RoundToBf16Bits(hn::Mul(dec.Decode(panel + c * kFp8PanelRows + s * kLanes), scale));
        auto hi = hn::Zero(du);
        if (c + 1 < k) hi = RoundToBf16Bits(hn::Mul(dec.Decode(panel + (c + 1) * kFp8PanelRows + s * kLanes), scale));
        hn::StoreU(hn::Or(lo, hn::ShiftLeft<16>(hi)), du, o + kp * kFp8PanelRows + s * kLanes);
      }
    }
  }
}

void PanelsToBf16(size_t k, const uint8_t* panels, const float* scales, size_t n_panels, bf16_t* out) {
  if (internal::Fp8DenormalsAreZero()) return PanelsToBf16Impl<false>(k, panels, scales, n_panels, out);
  PanelsToBf16Impl<true>(k, panels, scales, n_panels, out);
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace internal {

// The kernel of exactly the Highway target of the Isa (hwy_dispatch.h); nullptr if not compiled in.
GemmFp8Fn GemmFp8Hwy(Isa isa) {
  static constexpr HwyFns<GemmFp8Fn> kGemm = KT_HWY_FNS(GemmFp8Fn, GemmFp8);
  return kGemm.At(HwyTargetOf(isa));
}

Fp8PanelsToBf16Fn Fp8PanelsToBf16Hwy(Isa isa) {
  static constexpr HwyFns<Fp8PanelsToBf16Fn> kConvert = KT_HWY_FNS(Fp8PanelsToBf16Fn, PanelsToBf16);
  return kConvert.At(HwyTargetOf(isa));
}

}  // namespace internal
}  // namespace kt
#endif  // HWY_ONCE
