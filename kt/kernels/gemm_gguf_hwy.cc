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
// 32-value block is two of them. The types without a vector kernel here run the scalar dot.
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
        if (i < 4) {
          sc = s[i] & 63;
          m = s[i + 4] & 63;
        } else {
          sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 6) << 4);
          m = (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
        }
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
