// Per-target E4M3 -> fp32 decode of kLanes codes into fp32 lanes (gemm_fp8_hwy.cc has the two variants'
// reasoning) and the decode (1-2 rows of x; 1-4 on AVX3) of E4M3 panels, shared by the FP8 block-scaled and the
// MXFP8 kernels. Textual header: include after <hwy/highway.h> and bf16-inl.h; re-included per target
// (Highway's -inl convention).
#if defined(KT_KERNELS_FP8_DECODE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef KT_KERNELS_FP8_DECODE_INL_H_
#undef KT_KERNELS_FP8_DECODE_INL_H_
#else
#define KT_KERNELS_FP8_DECODE_INL_H_
#endif

#include <hwy/highway.h>

#include <cstddef>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kt/kernels/prefetch.h"

// The loops over rows, panels and vectors must be unrolled for the accumulators to live in registers.
#ifndef KT_FP8_DECODE_UNROLL
#define KT_FP8_DECODE_UNROLL _Pragma("GCC unroll 16")
#endif

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

#undef KT_FP8_DECODE_ROWS
// Not on HWY_SCALAR (one lane), where the kernels use Fp8Decoder only.
#if HWY_TARGET != HWY_SCALAR
#define KT_FP8_DECODE_ROWS 1
// ---- Decode (1-2 rows of x) over NP 16-row panels side by side, shared by the FP8 block and MXFP8 kernels.
// Each panel is its own weight stream (panel p at base + p * stride, k's 16 codes at byte 16 * k), two at a
// time as the int8 and int4 decode kernels walk them; the x broadcasts and per-block work are shared by the NP
// panels.
constexpr size_t kFp8DecodeVecs = 16 / (HWY_MAX_BYTES / sizeof(float));  // fp32 vectors per 16 rows
// Rows of x up to which the kernels take this decode: 2 on AVX2 (16 registers: 8 accumulators at 2 rows x 2
// panels), 4 on AVX3 (32 registers).
constexpr int kFp8DecodeMaxRows = HWY_MAX_BYTES >= 64 ? 4 : 2;

// The activations' side of Fp8ScaledSums: xs[i] = xf[i] * 2^112 for i < len (len a multiple of the lane
// count or the rest scalar); false if some |xf[i]| >= 2^16 (xs would overflow where x * w does not), when the
// caller takes Fp8ExactSums instead. A NaN x gives a NaN xs (it propagates either way).
constexpr float kFp8XScale = 0x1p112f;
HWY_INLINE bool Fp8ScaleActivations(const float* HWY_RESTRICT xf, size_t len, float* HWY_RESTRICT xs) {
  using DF = hn::ScalableTag<float>;
  const DF df;
  const auto up = hn::Set(df, kFp8XScale), limit = hn::Set(df, 0x1p16f);
  auto big = hn::Zero(df);  // lanes that met a large |x|: all ones
  size_t i = 0;
  for (; i + hn::Lanes(df) <= len; i += hn::Lanes(df)) {
    const auto v = hn::Load(df, xf + i);
    big = hn::Or(big, hn::VecFromMask(df, hn::Ge(hn::Abs(v), limit)));
    hn::Store(hn::Mul(v, up), df, xs + i);
  }
  bool ok = hn::AllFalse(df, hn::MaskFromVec(big));
  for (; i < len; ++i) {
    ok &= !(std::abs(xf[i]) >= 0x1p16f);
    xs[i] = xf[i] * kFp8XScale;
  }
  return ok;
}

// The throughput decode: acc[r][p * kVecs + s] = 2^-8 * sum over k in [0, len) of x[r][k] * w_p[k][rows of
// vector s], for the codes of NP panels from byte off of each, with integer operations only on the weights'
// side. An E4M3 code sign-extended to 32 bits, shifted left 20 and masked (0x87f00000) is the fp32 of the E4M3
// value times 2^-120 (a subnormal code a subnormal fp32, exact); the activations come pre-multiplied by 2^112
// (xs, Fp8ScaleActivations), so each product is x * w * 2^-8 exactly. 3 operations per kLanes codes
// (vpmovsxbd with its load, vpslld, vpand), none on the FMA ports. The fp16 decode it replaces (the code
// sign-extended to 16 bits, shifted, masked: the fp16 of w * 2^-8, widened by vcvtph2ps) gave the very same
// products; on the dev box's Zen 3 a loop of 16 codes + 2 FMAs took 1.5 ns that way, 1.0 ns this way (0.62 ns
// for the FMAs alone). The FMAs read a subnormal operand for subnormal codes: exact only with MXCSR.DAZ clear
// (the callers check); AMD and Intel cores take FMA subnormal inputs at full speed.
// With fewer than 4 accumulator vectors per panel (one row on AVX2, two on AVX3) even and odd k go to
// separate sets, summed at the end (the FMA latency must not bound a step): the chains of the fp16 decode.
// NaN codes are found on the way (the bytes of each 32-byte step or-ed with 0x80 and max-ed: a NaN is 0xff,
// 2 operations per 32 bytes): true if the block holds one, and acc is then to be discarded (the caller takes
// Fp8ExactSums). Inside the loop rather than as a scan of the block before it (the fp16 decode's way): 10.5-11.3
// -> 13-14 GB/s in cache on the dev box (a build without any NaN check: 13.6-14.8). The loop also prefetches
// each panel's stream kDecodePrefetchBytes ahead (prefetch.h), one line per 4 k.
template <int MR, int NP>
HWY_INLINE bool Fp8ScaledSums(const float* HWY_RESTRICT xs, size_t ldxs, const uint8_t* HWY_RESTRICT base,
                              size_t stride, size_t off, size_t len,
                              hn::Vec<hn::ScalableTag<float>> (&acc)[MR][NP * kFp8DecodeVecs]) {
  using DF = hn::ScalableTag<float>;
  using DI = hn::ScalableTag<int32_t>;
  using VF = hn::Vec<DF>;
  const DF df;
  const DI di;
  const hn::Rebind<int8_t, DI> di8;
  const hn::FixedTag<uint8_t, 16> d16;
  const hn::Simd<uint8_t, HWY_MIN(32, HWY_MAX_BYTES), 0> d32;  // 32 bytes (2 k) on AVX2 and AVX3
  constexpr size_t kVecs = kFp8DecodeVecs, kLanes = HWY_MAX_BYTES / sizeof(float);
  constexpr size_t kSets = MR * kVecs < 4 ? 2 : 1;
  const auto mask = hn::Set(di, static_cast<int32_t>(0x87f00000u));
  const hn::Simd<int16_t, 16, 0> di16;  // AVX2's 16-bit widening (below)
  const hn::Simd<int8_t, 16, 0> d8x16;
  (void)di16;
  (void)d8x16;
  const auto sign = hn::Set(d32, 0x80);
  auto top = hn::Zero(d32);  // max of the codes or-ed with 0x80
  VF part[kSets][MR][NP * kVecs];
  KT_FP8_DECODE_UNROLL
  for (size_t t = 0; t < kSets; ++t) {
    KT_FP8_DECODE_UNROLL
    for (int r = 0; r < MR; ++r) {
      KT_FP8_DECODE_UNROLL
      for (size_t v = 0; v < NP * kVecs; ++v) part[t][r][v] = hn::Zero(df);
    }
  }
  const auto step = [&](size_t c, size_t set) HWY_ATTR {
    VF xv[MR];
    KT_FP8_DECODE_UNROLL
    for (int r = 0; r < MR; ++r) xv[r] = hn::Set(df, xs[r * ldxs + c]);
    KT_FP8_DECODE_UNROLL
    for (int p = 0; p < NP; ++p) {
#if HWY_MAX_BYTES == 32
      // AVX2: the 16 codes sign-extended to 16 bits at once and shifted left 4: 32-bit lane i then holds row
      // 2i + 1's code at bits 27..20 (sign copies above) and row 2i's at bits 11..4, so the mask alone gives
      // the odd rows and a shift by 16 then the mask the even ones: 5 operations per 16 codes instead of 6.
      // Vector 0 collects the even rows, vector 1 the odd ones (put back in order at the end).
      const auto h = hn::BitCast(di, hn::ShiftLeft<4>(hn::PromoteTo(
                                         di16, hn::LoadU(d8x16, reinterpret_cast<const int8_t*>(
                                                                    base + p * stride + off + c * 16)))));
      const VF w[2] = {hn::BitCast(df, hn::And(hn::ShiftLeft<16>(h), mask)), hn::BitCast(df, hn::And(h, mask))};
      KT_FP8_DECODE_UNROLL
      for (size_t s = 0; s < 2; ++s) {
        KT_FP8_DECODE_UNROLL
        for (int r = 0; r < MR; ++r) part[set][r][p * 2 + s] = hn::MulAdd(xv[r], w[s], part[set][r][p * 2 + s]);
      }
#else
      KT_FP8_DECODE_UNROLL
      for (size_t s = 0; s < kVecs; ++s) {
        const int8_t* src = reinterpret_cast<const int8_t*>(base + p * stride + off + c * 16 + s * kLanes);
        const VF w = hn::BitCast(df, hn::And(hn::ShiftLeft<20>(hn::PromoteTo(di, hn::LoadU(di8, src))), mask));
        KT_FP8_DECODE_UNROLL
        for (int r = 0; r < MR; ++r) part[set][r][p * kVecs + s] = hn::MulAdd(xv[r], w, part[set][r][p * kVecs + s]);
      }
#endif
    }
  };
  const auto check2 = [&](size_t c) HWY_ATTR {  // k = c, c + 1 of every panel
    KT_FP8_DECODE_UNROLL
    for (int p = 0; p < NP; ++p) {
#if HWY_MAX_BYTES >= 32
      top = hn::Max(top, hn::Or(hn::LoadU(d32, base + p * stride + off + c * 16), sign));
#else
      top = hn::Max(top, hn::Or(hn::LoadU(d32, base + p * stride + off + c * 16), sign));
      top = hn::Max(top, hn::Or(hn::LoadU(d32, base + p * stride + off + c * 16 + 16), sign));
#endif
    }
  };
  size_t c = 0;
  for (; c + 4 <= len; c += 4) {
    KT_FP8_DECODE_UNROLL
    for (int p = 0; p < NP; ++p) PrefetchPanelAhead(base + p * stride, off + c * 16, stride, NP);
    check2(c);
    step(c, 0);
    step(c + 1, kSets - 1);
    check2(c + 2);
    step(c + 2, 0);
    step(c + 3, kSets - 1);
  }
  for (; c + 2 <= len; c += 2) {
    check2(c);
    step(c, 0);
    step(c + 1, kSets - 1);
  }
  bool nan = !hn::AllFalse(d32, hn::Eq(top, hn::Set(d32, 0xff)));
  if (c < len) {
    step(c, 0);
    auto t16 = hn::Zero(d16);
    for (int p = 0; p < NP; ++p) t16 = hn::Max(t16, hn::Or(hn::LoadU(d16, base + p * stride + off + c * 16), hn::Set(d16, 0x80)));
    nan |= !hn::AllFalse(d16, hn::Eq(t16, hn::Set(d16, 0xff)));
  }
  KT_FP8_DECODE_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_FP8_DECODE_UNROLL
    for (size_t v = 0; v < NP * kVecs; ++v) {
      acc[r][v] = kSets == 2 ? hn::Add(part[0][r][v], part[kSets - 1][r][v]) : part[0][r][v];
    }
#if HWY_MAX_BYTES == 32
    KT_FP8_DECODE_UNROLL
    for (int p = 0; p < NP; ++p) {  // even rows, odd rows -> rows 0-7, 8-15
      const VF lo = hn::InterleaveLower(df, acc[r][2 * p], acc[r][2 * p + 1]);  // rows 0-3 | 8-11
      const VF hi = hn::InterleaveUpper(df, acc[r][2 * p], acc[r][2 * p + 1]);  // rows 4-7 | 12-15
      acc[r][2 * p] = hn::ConcatLowerLower(df, hi, lo);
      acc[r][2 * p + 1] = hn::ConcatUpperUpper(df, hi, lo);
    }
#endif
  }
  return nan;
}

// The same sums with Fp8Decoder<true> (NaN codes propagate), one k per step in one chain, without the 2^-8:
// for the rare block that holds a NaN code or meets an |x| >= 2^16.
template <int MR, int NP>
HWY_NOINLINE void Fp8ExactSums(const float* HWY_RESTRICT xf, size_t ldxf, const uint8_t* HWY_RESTRICT base,
                             size_t stride, size_t off, size_t len,
                             hn::Vec<hn::ScalableTag<float>> (&acc)[MR][NP * kFp8DecodeVecs]) {
  using DF = hn::ScalableTag<float>;
  const DF df;
  constexpr size_t kVecs = kFp8DecodeVecs, kLanes = HWY_MAX_BYTES / sizeof(float);
  const Fp8Decoder<true> dec;
  for (int r = 0; r < MR; ++r) {
    for (size_t v = 0; v < NP * kVecs; ++v) acc[r][v] = hn::Zero(df);
  }
  for (size_t c = 0; c < len; ++c) {
    for (int p = 0; p < NP; ++p) {
      for (size_t s = 0; s < kVecs; ++s) {
        const auto w = dec.Decode(base + p * stride + off + c * 16 + s * kLanes);
        for (int r = 0; r < MR; ++r) {
          acc[r][p * kVecs + s] = hn::MulAdd(hn::Set(df, xf[r * ldxf + c]), w, acc[r][p * kVecs + s]);
        }
      }
    }
  }
}
// Decode of MR rows of x over NP panels from panels (cols columns of y, the last panel possibly partial),
// MXCSR.DAZ clear, for a format with a scale per kBlockK k (128: FP8 block; 32: MXFP8) that
// scale_of(p, b, s) gives as the fp32 vector of panel p, k block b, rows s * kLanes ..; each panel is
// 16 k bytes. Per 128 k, x is widened once and pre-scaled (Fp8ScaleActivations); per k block,
// Fp8ScaledSums times 2^8, or Fp8ExactSums for a block with a NaN code or a large |x|; then
// total += acc * scale. Per column, the same fp32 operations in the same order as the fp16 decode of the
// kernels' 1-2 row micro-kernels before it (bit for bit, but for the Fp8ExactSums blocks: one chain).
template <int MR, int NP, size_t kBlockK, class ScaleOf>
HWY_NOINLINE void Fp8DecodePanels(size_t k, const bf16_t* HWY_RESTRICT x, size_t ldx,
                                  const uint8_t* HWY_RESTRICT panels, size_t cols, float* HWY_RESTRICT y,
                                  size_t ldy, size_t p0, const ScaleOf& scale_of) {
  using DF = hn::ScalableTag<float>;
  using VF = hn::Vec<DF>;
  const DF df;
  constexpr size_t kVecs = kFp8DecodeVecs, kLanes = HWY_MAX_BYTES / sizeof(float);
  constexpr size_t kChunkK = 128;  // x widened per 128 k: 512 B per row, L1
  static_assert(kChunkK % kBlockK == 0, "k blocks tile the x chunk");
  constexpr size_t kCols = NP * 16;
  const size_t stride = 16 * k;
  HWY_ALIGN float total[MR][kCols];
  KT_FP8_DECODE_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_FP8_DECODE_UNROLL
    for (size_t v = 0; v < NP * kVecs; ++v) hn::Store(hn::Zero(df), df, total[r] + v * kLanes);
  }
  const VF up = hn::Set(df, 256.0f);  // the 2^-8 of Fp8ScaledSums' products taken back (exact)
  for (size_t k0 = 0; k0 < k; k0 += kChunkK) {
    const size_t chunk = HWY_MIN(k - k0, kChunkK);
    HWY_ALIGN float xf[MR][kChunkK];
    HWY_ALIGN float xs[MR][kChunkK];
    bool scaled = true;
    for (int r = 0; r < MR; ++r) {
      size_t c = 0;
      for (; c + kLanes <= chunk; c += kLanes) hn::Store(LoadBf16(df, x + r * ldx + k0 + c), df, xf[r] + c);
      for (; c < chunk; ++c) xf[r][c] = Bf16ToF32(x[r * ldx + k0 + c]);
      scaled &= Fp8ScaleActivations(xf[r], chunk, xs[r]);
    }
    for (size_t c0 = 0; c0 < chunk; c0 += kBlockK) {
      const size_t len = HWY_MIN(chunk - c0, kBlockK), off = (k0 + c0) * 16, b = (k0 + c0) / kBlockK;
      VF acc[MR][NP * kVecs];
      const bool nan = scaled && Fp8ScaledSums<MR, NP>(xs[0] + c0, kChunkK, panels, stride, off, len, acc);
      if (HWY_LIKELY(scaled && !nan)) {
        KT_FP8_DECODE_UNROLL
        for (int r = 0; r < MR; ++r) {
          KT_FP8_DECODE_UNROLL
          for (size_t v = 0; v < NP * kVecs; ++v) acc[r][v] = hn::Mul(acc[r][v], up);
        }
      } else {
        Fp8ExactSums<MR, NP>(xf[0] + c0, kChunkK, panels, stride, off, len, acc);
      }
      KT_FP8_DECODE_UNROLL
      for (size_t v = 0; v < NP * kVecs; ++v) {
        const VF scale = scale_of(p0 + v / kVecs, b, v % kVecs);
        KT_FP8_DECODE_UNROLL
        for (int r = 0; r < MR; ++r) {
          float* t = total[r] + v * kLanes;
          hn::Store(hn::MulAdd(acc[r][v], scale, hn::Load(df, t)), df, t);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(y + r * ldy, total[r], HWY_MIN(cols, kCols) * sizeof(float));
}

// All n_cols columns of y for m <= kFp8DecodeMaxRows rows: panels two at a time (two weight streams, as the
// int8 and int4 decode kernels), an odd last one alone.
template <int MR, size_t kBlockK, class ScaleOf>
HWY_INLINE void Fp8DecodeRowsOf(size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, size_t n_cols,
                                float* y, size_t ldy, const ScaleOf& scale_of) {
  const size_t stride = 16 * k, np = (n_cols + 15) / 16;
  size_t p = 0;
  for (; p + 2 <= np; p += 2) {
    Fp8DecodePanels<MR, 2, kBlockK>(k, x, ldx, panels + p * stride, n_cols - p * 16, y + p * 16, ldy, p, scale_of);
  }
  if (p < np) {
    Fp8DecodePanels<MR, 1, kBlockK>(k, x, ldx, panels + p * stride, n_cols - p * 16, y + p * 16, ldy, p, scale_of);
  }
}
template <size_t kBlockK, class ScaleOf>
HWY_INLINE void Fp8DecodeRows(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels,
                              size_t n_cols, float* y, size_t ldy, const ScaleOf& scale_of) {
  switch (m) {
    case 1: return Fp8DecodeRowsOf<1, kBlockK>(k, x, ldx, panels, n_cols, y, ldy, scale_of);
    case 2: return Fp8DecodeRowsOf<2, kBlockK>(k, x, ldx, panels, n_cols, y, ldy, scale_of);
    case 3: return Fp8DecodeRowsOf<(kFp8DecodeMaxRows >= 3 ? 3 : 1), kBlockK>(k, x, ldx, panels, n_cols, y, ldy, scale_of);
    default: return Fp8DecodeRowsOf<kFp8DecodeMaxRows, kBlockK>(k, x, ldx, panels, n_cols, y, ldy, scale_of);
  }
}
#else
#define KT_FP8_DECODE_ROWS 0
#endif  // HWY_TARGET != HWY_SCALAR

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#endif  // KT_KERNELS_FP8_DECODE_INL_H_
