// Highway kernels (AVX2, AVX3, AVX3_DL) for the MX GEMMs over kt-mx-panel16-kblock32-v1 panels (gemm_mx.h).
//
// One 16-byte row of a panel holds one k of the panel's 16 output rows (MXFP8) or two k (MXFP4: the low
// nibbles k = 2j, the high ones 2j + 1). The bytes widen to 32-bit lanes (2 vectors on AVX2, 1 on AVX3) and
// decode to fp32 exactly:
//   E4M3: fp8_decode-inl.h's Fp8Decoder (the FP8 block kernel's).
//   E2M1, fast (MXCSR.DAZ clear): the nibble's magnitude bits shifted to bits 22..24 and its sign to bit 31
//     form the fp32 whose value is the E2M1 value times 2^-126 (0.5 is the subnormal 2^-127); one multiply by
//     2^126 gives the value. 6 operations per vector.
//   E2M1, exact under DAZ: magnitudes >= 2 (normal) as (mag << 22) + (126 << 23), 1 as 0.5, 0 as 0, with
//     integer selects only.
//   Scales: the E8M0 byte shifted to the fp32 exponent field (code 0: the subnormal 2^-127; 0xff: NaN), once
//     per 32 k.
// Decode of MXFP8 (up to 2 rows on AVX2, 4 on AVX3; DAZ clear): the FP8 block kernel's (fp8_decode-inl.h,
// Fp8DecodeRows: two panels at a time, integer-only decode against activations pre-scaled by 2^112, NaN codes
// found in the loop) with the E8M0 scales per 32 k. MXFP4 on AVX2 / AVX3 at any row count through a pshufb
// table (E2M1BlockLut below).
// Up to MR rows (4 on AVX2, 8 on AVX3: decode), the decoded weights are FMAed with the broadcast activation
// into a per-32-k-block accumulator, added times the block's 16 scales to the rows' totals (L1). With more
// rows (prefill), each 128-k chunk of a whole panel is decoded once, with its blocks' scales multiplied in
// (exact: powers of two), into an 8 KiB fp32 buffer that every row block then reads with plain FMAs (no
// per-block epilogue); y holds the totals. The two orders round differently (fp32 sums, within the tests'
// 1e-5 of sum |x w|).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_mx_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>

#include "kt/kernels/gemm_fp8.h"
#include "kt/kernels/gemm_mx.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/prefetch.h"

// Per-target helpers, re-included per target, hence after foreach_target.
#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/fp8_decode-inl.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
// Internal linkage: gemm_fp8_hwy.cc has per-target helpers of the same names (PickDecodedRows, ...).
namespace {

using DF = hn::ScalableTag<float>;
using DU = hn::ScalableTag<uint32_t>;
using VF = hn::Vec<DF>;
using VU = hn::Vec<DU>;
constexpr size_t kLanes = HWY_MAX_BYTES / sizeof(float);
constexpr size_t kVecs = kMxPanelRows / kLanes;  // vectors per 16 rows: 1 (AVX3), 2 (AVX2), 4 (128-bit)
constexpr int kMaxRows = HWY_MAX_BYTES >= 64 ? 8 : 4;

// As in gemm_fp8_hwy.cc: the accumulators stay in registers only with these loops unrolled.
#ifndef KT_MX_UNROLL
#define KT_MX_UNROLL _Pragma("GCC unroll 16")
#endif

// kLanes bytes at p, one per 32-bit lane.
HWY_INLINE VU LoadBytes(const uint8_t* HWY_RESTRICT p) {
  const hn::Rebind<uint8_t, DU> du8;
  return hn::PromoteTo(DU(), hn::LoadU(du8, p));
}

// E2M1 nibbles (in the low 4 bits of each lane, the rest zero) to fp32.
template <bool kFast>
struct E2M1Decoder {
  VU mag_field, sign_field, seven, two, one, rebias, half;
  VF pow126;
  // Written out: an implicit constructor would not get the target's attributes (Highway's pragma covers
  // only functions written in the namespace).
  E2M1Decoder()
      : mag_field(hn::Set(DU(), 0x01c00000u)),
        sign_field(hn::Set(DU(), 0x80000000u)),
        seven(hn::Set(DU(), 7u)),
        two(hn::Set(DU(), 2u)),
        one(hn::Set(DU(), 1u)),
        rebias(hn::Set(DU(), 126u << 23)),
        half(hn::Set(DU(), 0x3f000000u)),
        pow126(hn::Set(DF(), 0x1p126f)) {}

  HWY_INLINE VF Decode(VU nib) const {
    const DF df;
    const VU sign = hn::And(hn::ShiftLeft<28>(nib), sign_field);
    if constexpr (kFast) {
      const VU lane = hn::Or(hn::And(hn::ShiftLeft<22>(nib), mag_field), sign);
      return hn::Mul(hn::BitCast(df, lane), pow126);
    } else {
      const VU mag = hn::And(nib, seven);
      const VU normal = hn::Add(hn::ShiftLeft<22>(mag), rebias);
      VU bits = hn::IfThenElseZero(hn::Eq(mag, one), half);
      bits = hn::IfThenElse(hn::Lt(mag, two), bits, normal);
      return hn::BitCast(df, hn::Or(bits, sign));
    }
  }
};

// Lanes(d) E8M0 codes of one k block -> their fp32 scales (d: the kernels' full vectors, or 8 lanes for
// Fp4DecodePanels).
template <class D = DF>
HWY_INLINE hn::Vec<D> DecodeScales(const uint8_t* HWY_RESTRICT p, D d = D()) {
  const hn::RebindToUnsigned<D> du;
  const auto e = hn::PromoteTo(du, hn::LoadU(hn::Rebind<uint8_t, decltype(du)>(), p));
  auto bits = hn::ShiftLeft<23>(e);
  bits = hn::IfThenElse(hn::Eq(e, hn::Zero(du)), hn::Set(du, 0x00400000u), bits);   // 2^-127
  bits = hn::IfThenElse(hn::Eq(e, hn::Set(du, 0xffu)), hn::Set(du, 0x7fc00000u), bits);  // NaN
  return hn::BitCast(d, bits);
}

// x[r][c0 .. c0 + 32) of MR rows as fp32 into xf[r][0 .. 32).
template <int MR>
HWY_INLINE void WidenRows(const bf16_t* HWY_RESTRICT x, size_t ldx, float (*HWY_RESTRICT xf)[kMxBlockK]) {
  const DF df;
  KT_MX_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_MX_UNROLL
    for (size_t c = 0; c < kMxBlockK; c += kLanes) hn::Store(LoadBf16(df, x + r * ldx + c), df, xf[r] + c);
  }
}


#undef KT_MX_E2M1_LUT
#if HWY_TARGET != HWY_SCALAR && HWY_MAX_BYTES >= 32
#define KT_MX_E2M1_LUT 1
// MXFP4 decode through a byte table (AVX2 and AVX-512 targets): one 16-byte panel row holds k = 2j (low
// nibbles) and 2j + 1 (high) of the 16 rows; a pshufb (TableLookupBytes) maps each nibble to twice its E2M1
// value as an int8 (0, 1, 2, 3, 4, 6, 8, 12 and their negatives), which widens and converts to fp32 exactly
// (vpmovsxbd, vcvtdq2ps). About 9 (AVX3) / 15 (AVX2) operations per 16 bytes against E2M1Decoder's 15 / 30,
// with no subnormal operand anywhere (so also exact under DAZ); the factor 2 is taken back once per block.
using D8 = hn::FixedTag<int8_t, 16>;
// 16 int8 values to kVecs fp32 vectors (lanes s * kLanes ..).
template <size_t V = kVecs>
HWY_INLINE void I8ToF32(hn::Vec<D8> v, VF (&out)[kVecs]) {
  const hn::Simd<int32_t, 16 / V, 0> di;  // depends on V: only the taken branch is instantiated
  const hn::Simd<float, 16 / V, 0> df;
  if constexpr (V == 1) {
    out[0] = hn::ConvertTo(df, hn::PromoteTo(di, v));
  } else {
    static_assert(V == 2, "AVX2 has 2 vectors of 8 fp32 per 16 rows");
    const hn::Half<D8> dh;
    out[0] = hn::ConvertTo(df, hn::PromoteTo(di, hn::LowerHalf(dh, v)));
    out[1] = hn::ConvertTo(df, hn::PromoteTo(di, hn::UpperHalf(dh, v)));
  }
}

// One 32-k block of MR rows: acc = the block's exact sum of x * element (before the block scale).
template <int MR>
HWY_INLINE void E2M1BlockLut(const float (*HWY_RESTRICT xf)[kMxBlockK], const uint8_t* HWY_RESTRICT pb,
                             VF (&acc)[MR][kVecs]) {
  const DF df;
  const D8 d8;
  const hn::FixedTag<uint8_t, 16> du8;
  alignas(16) static constexpr int8_t kTwice[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
  const auto table = hn::Load(d8, kTwice);
  const auto low = hn::Set(du8, 0x0f);
  constexpr size_t kSets = MR * kVecs < 4 ? 2 : 1;  // as Fp8BlockHalf: k = 2j and 2j + 1 on separate chains
  VF part[kSets][MR][kVecs];
  KT_MX_UNROLL
  for (size_t t = 0; t < kSets; ++t) {
    KT_MX_UNROLL
    for (int r = 0; r < MR; ++r) {
      KT_MX_UNROLL
      for (size_t s = 0; s < kVecs; ++s) part[t][r][s] = hn::Zero(df);
    }
  }
  for (size_t j = 0; j < kMxBlockK / 2; ++j) {
    if (MR <= kDecodePrefetchMaxRows && j % 4 == 0) PrefetchAhead(pb + j * kMxPanelRows);
    const auto bytes = hn::LoadU(du8, pb + j * kMxPanelRows);
    KT_MX_UNROLL
    for (size_t kk = 0; kk < 2; ++kk) {  // k = 2j (low nibbles), then 2j + 1: one k's vectors live at a time
      VF w[kVecs];
      const auto nib = kk == 0 ? hn::And(bytes, low) : hn::And(hn::ShiftRight<4>(bytes), low);
      I8ToF32(hn::TableLookupBytes(table, hn::BitCast(d8, nib)), w);
      KT_MX_UNROLL
      for (int r = 0; r < MR; ++r) {
        const VF xv = hn::Set(df, xf[r][2 * j + kk]);
        KT_MX_UNROLL
        for (size_t s = 0; s < kVecs; ++s) {
          VF& a = part[kk % kSets][r][s];
          a = hn::MulAdd(xv, w[s], a);
        }
      }
    }
  }
  const VF half = hn::Set(df, 0.5f);
  KT_MX_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_MX_UNROLL
    for (size_t s = 0; s < kVecs; ++s) {
      VF sum = part[0][r][s];
      if constexpr (kSets == 2) sum = hn::Add(sum, part[kSets - 1][r][s]);
      acc[r][s] = hn::Mul(sum, half);
    }
  }
}

// MXFP4 decode (one row of x; MR rows kept general): NP panels side by side (two weight streams, as the
// int8/int4 kernels), 256-bit vectors on AVX2 and AVX3 alike (the same code on both). Per 16-byte panel row j (k = 2j in
// the low nibbles, 2j + 1 in the high ones, of the 16 rows): the row broadcast to both 128-bit halves, the low
// nibbles indexed in the lower half and the high ones in the upper (one variable shift, one and), two pshufb
// give the high and low bytes of each element's bf16 (every E2M1 value is a bf16), a byte interleave the
// bf16 words, a shift or a mask fp32: [4 even (or odd) rows at k = 2j | the same rows at k = 2j + 1], FMAed
// with [x[2j] x4 | x[2j+1] x4] (one vpermps). 11 operations per 32 elements beside the 4 FMAs, against
// E2M1BlockLut's ~19 (vpmovsxbd + vcvtdq2ps per 8: on the dev box's Zen 3 a loop of 16 bytes and 4 FMAs took
// 3.4 ns that way, 2.0 ns through bf16 tables and word unpacks). The lower halves sum the even k and the upper halves the odd k,
// added at the end of the block: exactly E2M1BlockLut's two chains at one row (bit for bit; the elements
// themselves instead of twice them, so no 0.5 after).
// No subnormal operand anywhere: exact with or without DAZ.
template <int MR, int NP>
HWY_NOINLINE void Fp4DecodePanels(size_t k, const bf16_t* HWY_RESTRICT x, size_t ldx,
                                  const uint8_t* HWY_RESTRICT panels, size_t stride,
                                  const uint8_t* HWY_RESTRICT scales, size_t scale_stride, size_t cols,
                                  float* HWY_RESTRICT y, size_t ldy) {
  const hn::Simd<float, 8, 0> df;
  const hn::Simd<uint8_t, 32, 0> du8;
  const hn::Simd<uint32_t, 8, 0> du32;
  const hn::Simd<int32_t, 8, 0> di32;
  using V = hn::Vec<decltype(df)>;
  // bf16 of the E2M1 values, by nibble (sign in bit 3; -0 as +0, as E2M1BlockLut's table): high bytes, low bytes.
  alignas(16) static constexpr uint8_t kHi[16] = {0x00, 0x3f, 0x3f, 0x3f, 0x40, 0x40, 0x40, 0x40,
                                                  0x00, 0xbf, 0xbf, 0xbf, 0xc0, 0xc0, 0xc0, 0xc0};
  alignas(16) static constexpr uint8_t kLo[16] = {0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0,
                                                  0x00, 0x00, 0x80, 0xc0, 0x00, 0x40, 0x80, 0xc0};
  alignas(32) static constexpr uint32_t kShift[8] = {0, 0, 0, 0, 4, 4, 4, 4};
  alignas(32) static constexpr int32_t kPair[8] = {0, 0, 0, 0, 1, 1, 1, 1};
  const auto thi = hn::LoadDup128(du8, kHi), tlo = hn::LoadDup128(du8, kLo);
  const auto shift = hn::Load(du32, kShift);
  const auto low = hn::Set(du8, 0x0f);
  const auto top16 = hn::Set(du32, 0xffff0000u);
  alignas(32) static constexpr int32_t kRows[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // [even rows | odd rows] -> in order
  const auto rows = hn::IndicesFromVec(df, hn::Load(di32, kRows));
  const auto pair = hn::IndicesFromVec(df, hn::Load(di32, kPair));
  constexpr size_t kCols = NP * kMxPanelRows;
  HWY_ALIGN float total[MR][kCols];
  for (int r = 0; r < MR; ++r) std::memset(total[r], 0, sizeof(total[r]));
  const size_t row_bytes = (kMxBlockK / 2) * kMxPanelRows;  // a 32-k block of one panel: 256 bytes
  for (size_t b = 0; b < k / kMxBlockK; ++b) {
    HWY_ALIGN float xf[MR][kMxBlockK + 8];  // + 8: the pair loads at j = 15 read 8 floats from 30
    KT_MX_UNROLL
    for (int r = 0; r < MR; ++r) {
      KT_MX_UNROLL
      for (size_t c = 0; c < kMxBlockK; c += 8) hn::Store(LoadBf16(df, x + r * ldx + b * kMxBlockK + c), df, xf[r] + c);
      hn::Store(hn::Zero(df), df, xf[r] + kMxBlockK);
    }
    V acc[MR][NP][4];
    KT_MX_UNROLL
    for (int r = 0; r < MR; ++r) {
      KT_MX_UNROLL
      for (int p = 0; p < NP; ++p) {
        KT_MX_UNROLL
        for (size_t i = 0; i < 4; ++i) acc[r][p][i] = hn::Zero(df);
      }
    }
    for (size_t j = 0; j < kMxBlockK / 2; ++j) {
      if (j % 4 == 0) {
        KT_MX_UNROLL
        for (int p = 0; p < NP; ++p) PrefetchPanelAhead(panels + p * stride, b * row_bytes + j * kMxPanelRows, stride, NP);
      }
      V xv[MR];
      KT_MX_UNROLL
      for (int r = 0; r < MR; ++r) xv[r] = hn::TableLookupLanes(hn::LoadU(df, xf[r] + 2 * j), pair);
      KT_MX_UNROLL
      for (int p = 0; p < NP; ++p) {
        const auto bytes = hn::LoadDup128(du8, panels + p * stride + b * row_bytes + j * kMxPanelRows);
        const auto idx = hn::And(hn::BitCast(du8, hn::Shr(hn::BitCast(du32, bytes), shift)), low);
        const auto hi = hn::TableLookupBytes(thi, idx), lo = hn::TableLookupBytes(tlo, idx);
        // bf16 words of rows 0-7 / 8-15, each 128-bit half [k even | k odd]; a 32-bit lane holds rows 2i (low
        // word) and 2i + 1 (high word): fp32 by a shift and by a mask (integer ports; word unpacks with zero
        // would load the two shuffle ports, which bound this loop on the dev box's Zen 3).
        const auto w01 = hn::BitCast(du32, hn::InterleaveLower(du8, lo, hi));
        const auto w23 = hn::BitCast(du32, hn::InterleaveUpper(du8, lo, hi));
        const V w[4] = {hn::BitCast(df, hn::ShiftLeft<16>(w01)), hn::BitCast(df, hn::And(w01, top16)),
                        hn::BitCast(df, hn::ShiftLeft<16>(w23)), hn::BitCast(df, hn::And(w23, top16))};
        KT_MX_UNROLL
        for (int r = 0; r < MR; ++r) {
          KT_MX_UNROLL
          for (size_t i = 0; i < 4; ++i) acc[r][p][i] = hn::MulAdd(xv[r], w[i], acc[r][p][i]);
        }
      }
    }
    KT_MX_UNROLL
    for (int p = 0; p < NP; ++p) {
      KT_MX_UNROLL
      for (size_t s = 0; s < 2; ++s) {  // rows 8s .. 8s + 7
        const V scale = DecodeScales(scales + p * scale_stride + b * kMxPanelRows + s * 8, df);
        KT_MX_UNROLL
        for (int r = 0; r < MR; ++r) {
          const V a = acc[r][p][2 * s], c = acc[r][p][2 * s + 1];  // rows 8s + {0, 2, 4, 6}, 8s + {1, 3, 5, 7}
          const V sum = hn::TableLookupLanes(  // even + odd k, rows in order
              hn::Add(hn::ConcatLowerLower(df, c, a), hn::ConcatUpperUpper(df, c, a)), rows);
          float* t = total[r] + p * kMxPanelRows + s * 8;
          hn::Store(hn::MulAdd(sum, scale, hn::Load(df, t)), df, t);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(y + r * ldy, total[r], HWY_MIN(cols, kCols) * sizeof(float));
}

// All n_cols columns of one row: two panels at a time, an odd last one alone.
void Fp4DecodeRow(size_t k, const bf16_t* x, const uint8_t* panels, const uint8_t* scales, size_t n_cols,
                  float* y) {
  const size_t stride = MxPanelStride(true, k), scale_stride = kMxPanelRows * (k / kMxBlockK);
  const size_t np = MxNumPanels(n_cols);
  size_t p = 0;
  for (; p + 2 <= np; p += 2) {
    Fp4DecodePanels<1, 2>(k, x, k, panels + p * stride, stride, scales + p * scale_stride, scale_stride,
                          n_cols - p * kMxPanelRows, y + p * kMxPanelRows, 0);
  }
  if (p < np) {
    Fp4DecodePanels<1, 1>(k, x, k, panels + p * stride, stride, scales + p * scale_stride, scale_stride,
                          n_cols - p * kMxPanelRows, y + p * kMxPanelRows, 0);
  }
}
#else
#define KT_MX_E2M1_LUT 0
#endif

// MR rows (x, ldx) x one 16-row panel: total[r][16] over all k blocks.
template <int MR, bool kFp4, bool kFast>
HWY_INLINE void Micro(size_t k, const bf16_t* HWY_RESTRICT x, size_t ldx, const uint8_t* HWY_RESTRICT panel,
                      const uint8_t* HWY_RESTRICT scales, float (*HWY_RESTRICT total)[kMxPanelRows]) {
  const DF df;
  const Fp8Decoder<kFast> dec8;
  const E2M1Decoder<kFast> dec4;
  const VU low_nibble = hn::Set(DU(), 0x0fu);
  KT_MX_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_MX_UNROLL
    for (size_t s = 0; s < kVecs; ++s) hn::Store(hn::Zero(df), df, total[r] + s * kLanes);
  }
  const size_t blocks = k / kMxBlockK;
  for (size_t b = 0; b < blocks; ++b) {
    VF acc[MR][kVecs];
    KT_MX_UNROLL
    for (int r = 0; r < MR; ++r) {
      KT_MX_UNROLL
      for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::Zero(df);
    }
    HWY_ALIGN float xf[MR][kMxBlockK];
    WidenRows<MR>(x + b * kMxBlockK, ldx, xf);
    if constexpr (kFp4) {
      const uint8_t* pb = panel + b * (kMxBlockK / 2) * kMxPanelRows;
#if KT_MX_E2M1_LUT
      E2M1BlockLut<MR>(xf, pb, acc);
#else
      for (size_t j = 0; j < kMxBlockK / 2; ++j) {
        VF lo[kVecs], hi[kVecs];
        KT_MX_UNROLL
        for (size_t s = 0; s < kVecs; ++s) {
          const VU code = LoadBytes(pb + j * kMxPanelRows + s * kLanes);
          lo[s] = dec4.Decode(hn::And(code, low_nibble));
          hi[s] = dec4.Decode(hn::ShiftRight<4>(code));
        }
        KT_MX_UNROLL
        for (int r = 0; r < MR; ++r) {
          const VF x0 = hn::Set(df, xf[r][2 * j]), x1 = hn::Set(df, xf[r][2 * j + 1]);
          KT_MX_UNROLL
          for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::MulAdd(x1, hi[s], hn::MulAdd(x0, lo[s], acc[r][s]));
        }
      }
#endif
    } else {
      const uint8_t* pb = panel + b * kMxBlockK * kMxPanelRows;
      for (size_t c = 0; c < kMxBlockK; ++c) {
        VF w[kVecs];
        KT_MX_UNROLL
        for (size_t s = 0; s < kVecs; ++s) w[s] = dec8.Decode(pb + c * kMxPanelRows + s * kLanes);
        KT_MX_UNROLL
        for (int r = 0; r < MR; ++r) {
          const VF xv = hn::Set(df, xf[r][c]);
          KT_MX_UNROLL
          for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::MulAdd(xv, w[s], acc[r][s]);
        }
      }
    }
    const uint8_t* bs = scales + b * kMxPanelRows;
    KT_MX_UNROLL
    for (size_t s = 0; s < kVecs; ++s) {
      const VF scale = DecodeScales(bs + s * kLanes);
      KT_MX_UNROLL
      for (int r = 0; r < MR; ++r) {
        float* t = total[r] + s * kLanes;
        hn::Store(hn::MulAdd(acc[r][s], scale, hn::Load(df, t)), df, t);
      }
    }
  }
}

// Prefill: a panel's k chunk [c0, c1) (whole 32-k blocks) decoded once into w[c1 - c0][16] with each
// block's scale multiplied in. Exact: the scale is a power of two and every element has at most 4
// significant bits, so element * 2^(e - 127) is representable (down to 2^-136, above fp32's 2^-149).
constexpr size_t kChunkK = 128;  // 8 KiB of fp32 per panel chunk: L1, as the FP8 kernel's block

template <bool kFp4, bool kFast>
void DecodeChunk(const uint8_t* HWY_RESTRICT panel, const uint8_t* HWY_RESTRICT scales, size_t c0, size_t c1,
                 float* HWY_RESTRICT w) {
  const DF df;
  const Fp8Decoder<kFast> dec8;
  const E2M1Decoder<kFast> dec4;
  const VU low_nibble = hn::Set(DU(), 0x0fu);
  for (size_t b = c0 / kMxBlockK; b < c1 / kMxBlockK; ++b) {
    VF scale[kVecs];
    KT_MX_UNROLL
    for (size_t s = 0; s < kVecs; ++s) scale[s] = DecodeScales(scales + b * kMxPanelRows + s * kLanes);
    float* wb = w + (b * kMxBlockK - c0) * kMxPanelRows;
    if constexpr (kFp4) {
      const uint8_t* pb = panel + b * (kMxBlockK / 2) * kMxPanelRows;
      for (size_t j = 0; j < kMxBlockK / 2; ++j) {
        KT_MX_UNROLL
        for (size_t s = 0; s < kVecs; ++s) {
          const VU code = LoadBytes(pb + j * kMxPanelRows + s * kLanes);
          hn::Store(hn::Mul(dec4.Decode(hn::And(code, low_nibble)), scale[s]), df,
                    wb + (2 * j) * kMxPanelRows + s * kLanes);
          hn::Store(hn::Mul(dec4.Decode(hn::ShiftRight<4>(code)), scale[s]), df,
                    wb + (2 * j + 1) * kMxPanelRows + s * kLanes);
        }
      }
    } else {
      const uint8_t* pb = panel + b * kMxBlockK * kMxPanelRows;
      for (size_t c = 0; c < kMxBlockK; ++c) {
        KT_MX_UNROLL
        for (size_t s = 0; s < kVecs; ++s) {
          hn::Store(hn::Mul(dec8.Decode(pb + c * kMxPanelRows + s * kLanes), scale[s]), df,
                    wb + c * kMxPanelRows + s * kLanes);
        }
      }
    }
  }
}

// MR rows x one whole panel over a decoded, scaled chunk w[len][16]: y (16 columns of MR rows) becomes the
// chunk's sum on the first chunk and y + the sum after.
template <int MR>
HWY_INLINE void MicroDecoded(size_t len, const bf16_t* HWY_RESTRICT x, size_t ldx, const float* HWY_RESTRICT w,
                             bool first, float* HWY_RESTRICT y, size_t ldy) {
  const DF df;
  VF acc[MR][kVecs];
  KT_MX_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_MX_UNROLL
    for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::Zero(df);
  }
  HWY_ALIGN float xf[MR][kChunkK];
  KT_MX_UNROLL
  for (int r = 0; r < MR; ++r) {
    for (size_t c = 0; c < len; c += kLanes) hn::Store(LoadBf16(df, x + r * ldx + c), df, xf[r] + c);
  }
  for (size_t c = 0; c < len; ++c) {
    VF wv[kVecs];
    KT_MX_UNROLL
    for (size_t s = 0; s < kVecs; ++s) wv[s] = hn::Load(df, w + c * kMxPanelRows + s * kLanes);
    KT_MX_UNROLL
    for (int r = 0; r < MR; ++r) {
      const VF xv = hn::Set(df, xf[r][c]);
      KT_MX_UNROLL
      for (size_t s = 0; s < kVecs; ++s) acc[r][s] = hn::MulAdd(xv, wv[s], acc[r][s]);
    }
  }
  KT_MX_UNROLL
  for (int r = 0; r < MR; ++r) {
    KT_MX_UNROLL
    for (size_t s = 0; s < kVecs; ++s) {
      float* t = y + r * ldy + s * kLanes;
      hn::StoreU(first ? acc[r][s] : hn::Add(acc[r][s], hn::LoadU(df, t)), df, t);
    }
  }
}

using DecodedFn = void (*)(size_t, const bf16_t*, size_t, const float*, bool, float*, size_t);

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

using MicroFn = void (*)(size_t, const bf16_t*, size_t, const uint8_t*, const uint8_t*, float (*)[kMxPanelRows]);

template <bool kFp4, bool kFast>
MicroFn PickRows(size_t rows) {
  switch (rows) {
    case 1: return &Micro<1, kFp4, kFast>;
    case 2: return &Micro<2, kFp4, kFast>;
    case 3: return &Micro<3, kFp4, kFast>;
    case 4: return &Micro<4, kFp4, kFast>;
    case 5: return &Micro<(kMaxRows >= 5 ? 5 : 4), kFp4, kFast>;
    case 6: return &Micro<(kMaxRows >= 6 ? 6 : 4), kFp4, kFast>;
    case 7: return &Micro<(kMaxRows >= 7 ? 7 : 4), kFp4, kFast>;
    default: return &Micro<kMaxRows, kFp4, kFast>;
  }
}


template <bool kFp4>
void GemmMx(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const uint8_t* scales,
            size_t n_cols, float* y, size_t ldy) {
  const size_t stride = MxPanelStride(kFp4, k), scale_stride = kMxPanelRows * (k / kMxBlockK);
  HWY_ALIGN float total[kMaxRows][kMxPanelRows];
  // The E2M1 and E4M3 fast decodes multiply subnormal fp32 values: exact only with MXCSR.DAZ clear.
  const bool fast = !internal::Fp8DenormalsAreZero();
#if KT_MX_E2M1_LUT
  // One row only: at two rows the 8 accumulators of one panel measured slower than E2M1BlockLut (3.4-3.6 vs
  // 4.0 GB/s in cache, dev box), which also keeps the two-row results as they were.
  if (kFp4 && m == 1) return Fp4DecodeRow(k, x, panels, scales, n_cols, y);
#endif
#if KT_FP8_DECODE_ROWS
  if (!kFp4 && fast && m <= kFp8DecodeMaxRows) {  // MXFP8 decode: the FP8 block kernel's, a scale per 32 k
    return Fp8DecodeRows<kMxBlockK>(m, k, x, ldx, panels, n_cols, y, ldy, [&](size_t p, size_t b, size_t s) HWY_ATTR {
      return DecodeScales(scales + p * scale_stride + b * kMxPanelRows + s * kLanes);
    });
  }
#endif
  HWY_ALIGN float decoded[kChunkK * kMxPanelRows];
  for (size_t p = 0; p * kMxPanelRows < n_cols; ++p) {
    const size_t c0 = p * kMxPanelRows;
    const size_t cols = std::min(kMxPanelRows, n_cols - c0);
    if (m > static_cast<size_t>(kMaxRows) && cols == kMxPanelRows) {
      // Prefill on a whole panel: decode (and scale) each k chunk once, then every row block reads it.
      for (size_t k0 = 0; k0 < k; k0 += kChunkK) {
        const size_t k1 = std::min(k, k0 + kChunkK);
        if (fast) {
          DecodeChunk<kFp4, true>(panels + p * stride, scales + p * scale_stride, k0, k1, decoded);
        } else {
          DecodeChunk<kFp4, false>(panels + p * stride, scales + p * scale_stride, k0, k1, decoded);
        }
        for (size_t i = 0; i < m;) {
          const size_t rows = std::min<size_t>(kMaxRows, m - i);
          PickDecodedRows(rows)(k1 - k0, x + i * ldx + k0, ldx, decoded, k0 == 0, y + i * ldy + c0, ldy);
          i += rows;
        }
      }
      continue;
    }
    for (size_t i = 0; i < m;) {
      const size_t rows = std::min<size_t>(kMaxRows, m - i);
      const MicroFn fn = fast ? PickRows<kFp4, true>(rows) : PickRows<kFp4, false>(rows);
      fn(k, x + i * ldx, ldx, panels + p * stride, scales + p * scale_stride, total);
      for (size_t r = 0; r < rows; ++r) std::memcpy(y + (i + r) * ldy + c0, total[r], cols * sizeof(float));
      i += rows;
    }
  }
}

}  // namespace

void GemmMxfp4(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const uint8_t* scales,
               size_t n_cols, float* y, size_t ldy) {
  GemmMx<true>(m, k, x, ldx, panels, scales, n_cols, y, ldy);
}
void GemmMxfp8(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const uint8_t* scales,
               size_t n_cols, float* y, size_t ldy) {
  GemmMx<false>(m, k, x, ldx, panels, scales, n_cols, y, ldy);
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace internal {

GemmMxFn GemmMxHwy(bool fp4, Isa isa) {
  static constexpr HwyFns<GemmMxFn> kFp4 = KT_HWY_FNS(GemmMxFn, GemmMxfp4);
  static constexpr HwyFns<GemmMxFn> kFp8 = KT_HWY_FNS(GemmMxFn, GemmMxfp8);
  return (fp4 ? kFp4 : kFp8).At(HwyTargetOf(isa));
}

}  // namespace internal
}  // namespace kt
#endif  // HWY_ONCE
