// Highway kernels (AVX2, AVX3, AVX3_DL) of the GGUF GEMM: one output channel's row of ggml blocks against
// one prepared activation row at a time, decoding the blocks in registers.
//
// Integer types: a block's quants are unpacked from 16 bytes to 16 uint8 lanes (nibbles with And/shifts),
// widened to int16 and multiplied with the int16-widened Q8 activations by ReorderWidenMulAccumulate
// (vpmaddwd: int32 lane j = a[2j] b[2j] + a[2j+1] b[2j+1]); all products and sums are exact in int32, so the
// result is the scalar dot's integer sums, scaled in fp32. For the K-quants the 6-bit (Q4_K) or int8 (Q6_K)
// sub-block scale multiplies the int16 quants first (|sc q| <= 63 * 15 = 945, 127 * 32 = 4064: int16), so a
// block needs one int32 accumulator and one fp32 scaling instead of one per sub-block; Q4_K's mins are the
// same product of the activations with the mins broadcast per sub-block. Largest int32 lane: 32 products of
// 4064 * 128 per block, about 1.7e7. Vectors are fixed at 256 bits (16 int16 lanes) on every target: a
// 32-value block is two of them. High bits (Q5_0/Q5_1 qh, Q5_K qh, Q3_K hmask) are shifted into place per
// 16 values; Q5_0/Q5_1's per-value bits go through a 256-entry byte table.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_gguf_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cstring>

#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/gemm_gguf.h"
#include "kt/kernels/hwy_dispatch.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#if HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL

using DU8 = hn::FixedTag<uint8_t, 16>;
using DI8 = hn::FixedTag<int8_t, 16>;
using DI16 = hn::FixedTag<int16_t, 16>;
using DI32 = hn::FixedTag<int32_t, 8>;
using DF = hn::FixedTag<float, 8>;
using VI16 = hn::Vec<DI16>;
using VI32 = hn::Vec<DI32>;
using VF = hn::Vec<DF>;

HWY_INLINE float HalfAt(const uint8_t* p) { return F16ToF32(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// 16 int8 activations widened to int16.
HWY_INLINE VI16 X16(const int8_t* p) { return hn::PromoteTo(DI16(), hn::LoadU(DI8(), p)); }
HWY_INLINE VI16 U16(hn::Vec<DU8> v) { return hn::PromoteTo(DI16(), v); }

HWY_INLINE VI32 MulAcc(VI16 a, VI16 b, VI32 acc) {
  VI32 unused = hn::Zero(DI32());  // never written on x86 (gemm_int8_hwy.cc)
  return hn::ReorderWidenMulAccumulate(DI32(), a, b, acc, unused);
}

HWY_INLINE float Total(VF v) { return hn::GetLane(hn::SumOfLanes(DF(), v)); }

float DotQ8_0(const uint8_t* w, size_t nb, const int8_t* qx, const float* sx) {
  const DF df;
  VF acc = hn::Zero(df);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 34;
    const auto* q = reinterpret_cast<const int8_t*>(blk + 2);
    VI32 s = MulAcc(X16(q), X16(qx + 32 * b), hn::Zero(DI32()));
    s = MulAcc(X16(q + 16), X16(qx + 32 * b + 16), s);
    acc = hn::MulAdd(hn::ConvertTo(df, s), hn::Set(df, HalfAt(blk) * sx[b]), acc);
  }
  return Total(acc);
}

float DotQ4_0(const uint8_t* w, size_t nb, const int8_t* qx, const float* sx) {
  const DF df;
  const DU8 du8;
  const VI16 eight = hn::Set(DI16(), 8);
  VF acc = hn::Zero(df);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 18;
    const auto q = hn::LoadU(du8, blk + 2);
    const VI16 lo = hn::Sub(U16(hn::And(q, hn::Set(du8, 0x0F))), eight);  // values 0..15
    const VI16 hi = hn::Sub(U16(hn::ShiftRight<4>(q)), eight);            // values 16..31
    VI32 s = MulAcc(lo, X16(qx + 32 * b), hn::Zero(DI32()));
    s = MulAcc(hi, X16(qx + 32 * b + 16), s);
    acc = hn::MulAdd(hn::ConvertTo(df, s), hn::Set(df, HalfAt(blk) * sx[b]), acc);
  }
  return Total(acc);
}

// Q4_K: per 64 values 32 bytes of qs, low nibbles the first 32 values (sub-block 2c), high the next (2c+1).
float DotQ4_K(const uint8_t* w, size_t nb, const int8_t* qx, const float* sx) {
  const DF df;
  const DU8 du8;
  const DI16 d16;
  const auto mask = hn::Set(du8, 0x0F);
  VF acc = hn::Zero(df);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 144;
    const uint8_t* s = blk + 4;
    const uint8_t* qs = blk + 16;
    const int8_t* x = qx + 256 * b;
    VI32 sq = hn::Zero(DI32()), sm = hn::Zero(DI32());
    for (int c = 0; c < 4; ++c) {
      for (int half = 0; half < 2; ++half) {
        const int i = 2 * c + half;
        int sc, m;
        GgufScaleMinK4(s, i, &sc, &m);
        const VI16 vsc = hn::Set(d16, static_cast<int16_t>(sc)), vm = hn::Set(d16, static_cast<int16_t>(m));
        for (int part = 0; part < 2; ++part) {
          const auto raw = hn::LoadU(du8, qs + 32 * c + 16 * part);
          const auto nib = half == 0 ? hn::And(raw, mask) : hn::ShiftRight<4>(raw);
          const VI16 xv = X16(x + 64 * c + 32 * half + 16 * part);
          sq = MulAcc(hn::Mul(U16(nib), vsc), xv, sq);
          sm = MulAcc(vm, xv, sm);
        }
      }
    }
    const float dx = sx[b];
    acc = hn::MulAdd(hn::ConvertTo(df, sq), hn::Set(df, HalfAt(blk) * dx), acc);
    acc = hn::NegMulAdd(hn::ConvertTo(df, sm), hn::Set(df, HalfAt(blk + 2) * dx), acc);
  }
  return Total(acc);
}

// Q6_K: per 128 values 64 bytes of ql and 32 of qh; the 16-value group g of a half takes ql bytes
// 16 (g % 4).. (low nibble for g < 4), qh bytes 16 (g % 2).. shifted by 2 (g / 2).
float DotQ6_K(const uint8_t* w, size_t nb, const int8_t* qx, const float* sx) {
  const DF df;
  const DU8 du8;
  const DI16 d16;
  const auto m4 = hn::Set(du8, 0x0F), m2 = hn::Set(du8, 0x03);
  const VI16 off = hn::Set(d16, 32);
  VF acc = hn::Zero(df);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    const auto* scales = reinterpret_cast<const int8_t*>(blk + 192);
    const int8_t* x = qx + 256 * b;
    VI32 sq = hn::Zero(DI32());
    for (int c = 0; c < 2; ++c) {
      const uint8_t* ql = blk + 64 * c;
      const uint8_t* qh = blk + 128 + 32 * c;
      const auto h0 = hn::LoadU(du8, qh), h1 = hn::LoadU(du8, qh + 16);
      for (int g = 0; g < 8; ++g) {
        const auto l = hn::LoadU(du8, ql + 16 * (g % 4));
        const auto lo = g < 4 ? hn::And(l, m4) : hn::ShiftRight<4>(l);
        const auto h = g % 2 == 0 ? h0 : h1;
        const int sh = g / 2;
        const auto hb = sh == 0   ? hn::And(h, m2)
                        : sh == 1 ? hn::And(hn::ShiftRight<2>(h), m2)
                        : sh == 2 ? hn::And(hn::ShiftRight<4>(h), m2)
                                  : hn::ShiftRight<6>(h);
        const VI16 q = hn::Sub(U16(hn::Or(lo, hn::ShiftLeft<4>(hb))), off);
        const VI16 vsc = hn::Set(d16, static_cast<int16_t>(scales[8 * c + g]));
        sq = MulAcc(hn::Mul(q, vsc), X16(x + 128 * c + 16 * g), sq);
      }
    }
    acc = hn::MulAdd(hn::ConvertTo(df, sq), hn::Set(df, HalfAt(blk + 208) * sx[b]), acc);
  }
  return Total(acc);
}

// 16 bits of a 32-value block's high-bit word (Q5_0 / Q5_1 qh, bits 16 h .. 16 h + 15) as 16 bytes of 0x10
// (bit set) or 0: bit 4 of the 16 values. Two 8-byte lookups in a 256-entry table built once.
struct BitsToNibble {
  uint64_t t[256];
  BitsToNibble() {
    for (int v = 0; v < 256; ++v) {
      uint64_t e = 0;
      for (int b = 0; b < 8; ++b) {
        if (v >> b & 1) e |= uint64_t{0x10} << (8 * b);
      }
      t[v] = e;
    }
  }
};
HWY_INLINE hn::Vec<DU8> HighBits16(uint32_t qh, int half) {
  static const BitsToNibble kTable;
  uint64_t lanes[2] = {kTable.t[(qh >> (16 * half)) & 0xff], kTable.t[(qh >> (16 * half + 8)) & 0xff]};
  return hn::LoadU(DU8(), reinterpret_cast<const uint8_t*>(lanes));
}

// The 32-value types with nibbles, optional bit 4 (qh) and optional min: Q4_1 (kHigh false, kMin true),
// Q5_0 (true, false), Q5_1 (true, true). q = nibble | bit << 4, w = d (q - offset) [+ m].
template <bool kHigh, bool kMin>
float DotLegacy(const uint8_t* w, size_t nb, size_t block_bytes, const int8_t* qx, const float* sx) {
  const DF df;
  const DU8 du8;
  const VI16 off = hn::Set(DI16(), kMin ? 0 : 16);
  const VI16 ones = hn::Set(DI16(), 1);
  const size_t qs_at = (kMin ? 4 : 2) + (kHigh ? 4 : 0);
  VF acc = hn::Zero(df);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * block_bytes;
    const auto q = hn::LoadU(du8, blk + qs_at);
    auto lo = hn::And(q, hn::Set(du8, 0x0F));
    auto hi = hn::ShiftRight<4>(q);
    if (kHigh) {
      uint32_t qh;
      std::memcpy(&qh, blk + (kMin ? 4 : 2), 4);
      lo = hn::Or(lo, HighBits16(qh, 0));
      hi = hn::Or(hi, HighBits16(qh, 1));
    }
    const VI16 x0 = X16(qx + 32 * b), x1 = X16(qx + 32 * b + 16);
    VI32 s = MulAcc(hn::Sub(U16(lo), off), x0, hn::Zero(DI32()));
    s = MulAcc(hn::Sub(U16(hi), off), x1, s);
    const float dx = sx[b];
    acc = hn::MulAdd(hn::ConvertTo(df, s), hn::Set(df, HalfAt(blk) * dx), acc);
    if (kMin) {
      const VI32 xs = MulAcc(x1, ones, MulAcc(x0, ones, hn::Zero(DI32())));
      acc = hn::MulAdd(hn::ConvertTo(df, xs), hn::Set(df, HalfAt(blk + 2) * dx), acc);
    }
  }
  return Total(acc);
}

// Q5_K: Q4_K's nibbles with bit 4 from qh: bit i of qh[l] for sub-block i (values 32 i + l).
float DotQ5_K(const uint8_t* w, size_t nb, const int8_t* qx, const float* sx) {
  const DF df;
  const DU8 du8;
  const DI16 d16;
  const auto mask = hn::Set(du8, 0x0F), one = hn::Set(du8, 0x01);
  VF acc = hn::Zero(df);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 176;
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + 48;
    const int8_t* x = qx + 256 * b;
    VI32 sq = hn::Zero(DI32()), sm = hn::Zero(DI32());
    for (int i = 0; i < 8; ++i) {
      const int c = i / 2, half = i % 2;
      int sc, m;
      GgufScaleMinK4(blk + 4, i, &sc, &m);
      const VI16 vsc = hn::Set(d16, static_cast<int16_t>(sc)), vm = hn::Set(d16, static_cast<int16_t>(m));
      for (int part = 0; part < 2; ++part) {
        const auto raw = hn::LoadU(du8, qs + 32 * c + 16 * part);
        const auto nib = half == 0 ? hn::And(raw, mask) : hn::ShiftRight<4>(raw);
        const auto hb = hn::And(hn::ShiftRightSame(hn::LoadU(du8, qh + 16 * part), i), one);
        const VI16 xv = X16(x + 32 * i + 16 * part);
        sq = MulAcc(hn::Mul(U16(hn::Or(nib, hn::ShiftLeft<4>(hb))), vsc), xv, sq);
        sm = MulAcc(vm, xv, sm);
      }
    }
    const float dx = sx[b];
    acc = hn::MulAdd(hn::ConvertTo(df, sq), hn::Set(df, HalfAt(blk) * dx), acc);
    acc = hn::NegMulAdd(hn::ConvertTo(df, sm), hn::Set(df, HalfAt(blk + 2) * dx), acc);
  }
  return Total(acc);
}

// Q2_K and Q3_K: 2-bit quants, per 128 values 32 bytes shifted by 0, 2, 4, 6 per 32 values; 16-value
// sub-blocks. Q2_K: w = d sc q - dmin m (nibbles of the scale bytes); Q3_K: q - 4 unless the hmask bit
// (bit 4 c + s of hmask[l]) is set, w = d (sc - 32) q.
template <bool kQ3>
float DotLowBits(const uint8_t* w, size_t nb, const int8_t* qx, const float* sx) {
  const DF df;
  const DU8 du8;
  const DI16 d16;
  const auto m2 = hn::Set(du8, 0x03), one = hn::Set(du8, 0x01);
  const VI16 four = hn::Set(d16, 4);
  VF acc = hn::Zero(df);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * (kQ3 ? 110 : 84);
    const uint8_t* qs = blk + (kQ3 ? 32 : 16);
    const int8_t* x = qx + 256 * b;
    VI32 sq = hn::Zero(DI32()), sm = hn::Zero(DI32());
    for (int c = 0; c < 2; ++c) {
      for (int sh = 0; sh < 4; ++sh) {
        for (int part = 0; part < 2; ++part) {
          const int i = 8 * c + 2 * sh + part;  // the 16-value sub-block
          const auto raw = hn::LoadU(du8, qs + 32 * c + 16 * part);
          VI16 q = U16(hn::And(hn::ShiftRightSame(raw, 2 * sh), m2));
          const VI16 xv = X16(x + 16 * i);
          int sc;
          if (kQ3) {
            const auto hb = hn::And(hn::ShiftRightSame(hn::LoadU(du8, blk + 16 * part), 4 * c + sh), one);
            q = hn::Sub(q, hn::Sub(four, hn::ShiftLeft<2>(U16(hb))));
            sc = GgufScaleQ3K(blk + 96, i);
          } else {
            sc = blk[i] & 0x0F;
            sm = MulAcc(hn::Set(d16, static_cast<int16_t>(blk[i] >> 4)), xv, sm);
          }
          sq = MulAcc(hn::Mul(q, hn::Set(d16, static_cast<int16_t>(sc))), xv, sq);
        }
      }
    }
    const float dx = sx[b];
    acc = hn::MulAdd(hn::ConvertTo(df, sq), hn::Set(df, HalfAt(blk + (kQ3 ? 108 : 80)) * dx), acc);
    if (!kQ3) acc = hn::NegMulAdd(hn::ConvertTo(df, sm), hn::Set(df, HalfAt(blk + 82) * dx), acc);
  }
  return Total(acc);
}

// Float weights against bf16 rows: 8 values per step, the tail scalar.
float DotFloat(GgufType type, const uint8_t* w, size_t k, const bf16_t* x) {
  const DF df;
  VF acc = hn::Zero(df);
  size_t j = 0;
  for (; j + 8 <= k; j += 8) {
    VF wv;
    if (type == GgufType::kF32) {
      wv = hn::LoadU(df, reinterpret_cast<const float*>(w) + j);
    } else if (type == GgufType::kBf16) {
      wv = LoadBf16(df, reinterpret_cast<const bf16_t*>(w) + j);
    } else {
      const hn::FixedTag<hwy::float16_t, 8> dh;
      wv = hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(w) + j));
    }
    acc = hn::MulAdd(wv, LoadBf16(df, x + j), acc);
  }
  float total = Total(acc);
  if (j < k) {
    const size_t eb = type == GgufType::kF32 ? 4 : 2;
    total += GgufDotBf16(type, w + j * eb, k - j, x + j);
  }
  return total;
}

void GemmGguf(GgufType type, size_t m, size_t k, const GgufRows& in, const uint8_t* w, size_t cols, float* y,
              size_t ldy) {
  const size_t row_bytes = GgufRowBytes(type, k);
  const size_t ab = GgufActivationBlock(type);
  const size_t nb = k / GgufBlockElems(type);
  for (size_t r = 0; r < m; ++r) {
    float* yr = y + r * ldy;
    if (ab == 0) {
      const bf16_t* x = in.x + r * in.ld;
      for (size_t j = 0; j < cols; ++j) yr[j] = DotFloat(type, w + j * row_bytes, k, x);
      continue;
    }
    const int8_t* qx = in.qx + r * in.ld;
    const float* sx = in.sx + r * (k / ab);
    switch (type) {
      case GgufType::kQ8_0:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotQ8_0(w + j * row_bytes, nb, qx, sx);
        break;
      case GgufType::kQ4_0:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotQ4_0(w + j * row_bytes, nb, qx, sx);
        break;
      case GgufType::kQ4_K:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotQ4_K(w + j * row_bytes, nb, qx, sx);
        break;
      case GgufType::kQ6_K:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotQ6_K(w + j * row_bytes, nb, qx, sx);
        break;
      case GgufType::kQ5_K:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotQ5_K(w + j * row_bytes, nb, qx, sx);
        break;
      case GgufType::kQ2_K:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotLowBits<false>(w + j * row_bytes, nb, qx, sx);
        break;
      case GgufType::kQ3_K:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotLowBits<true>(w + j * row_bytes, nb, qx, sx);
        break;
      case GgufType::kQ4_1:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotLegacy<false, true>(w + j * row_bytes, nb, 20, qx, sx);
        break;
      case GgufType::kQ5_0:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotLegacy<true, false>(w + j * row_bytes, nb, 22, qx, sx);
        break;
      case GgufType::kQ5_1:
        for (size_t j = 0; j < cols; ++j) yr[j] = DotLegacy<true, true>(w + j * row_bytes, nb, 24, qx, sx);
        break;
      default:
        for (size_t j = 0; j < cols; ++j) yr[j] = GgufDotQ8(type, w + j * row_bytes, k, qx, sx);
        break;
    }
  }
}

#else  // targets kt never dispatches to (hwy_dispatch.h): the scalar path

void GemmGguf(GgufType type, size_t m, size_t k, const GgufRows& in, const uint8_t* w, size_t cols, float* y,
              size_t ldy) {
  internal::GemmGgufScalar(type, m, k, in, w, cols, y, ldy);
}

#endif

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace internal {

GemmGgufFn GemmGgufHwy(Isa isa) {
  static constexpr HwyFns<GemmGgufFn> kGemm = KT_HWY_FNS(GemmGgufFn, GemmGguf);
  return kGemm.At(HwyTargetOf(isa));
}

}  // namespace internal
}  // namespace kt
#endif  // HWY_ONCE
