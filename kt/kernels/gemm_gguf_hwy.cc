// Highway kernels (AVX2, AVX3, AVX3_DL) of the GGUF GEMM: one output channel's row of ggml blocks against
// up to 4 prepared activation rows at a time, each block decoded once in registers for all of them. With 8
// rows or more, Q4_0, Q4_K and Q8_0 take the panel path instead (8 columns unpacked once), and with 4 rows or
// more the float types take 4 x 2 FMA tiles (FloatGemmTiled): both in gemm_gguf_prefill-inl.h.
//
// All products and sums of integers are exact in int32, so every kernel computes the scalar dot's integer
// sums, scaled in fp32 per block. Two multiplies:
// - Q4_0, Q5_0, Q8_0 and the K-quants: vpmaddubsw ("byte-dot kernels" below), 32 unsigned weights times 32
//   int8 activations into 16 int16 pair sums (signed weights q - 8, q - 16, Q8_0's: |w| times x with w's sign,
//   vpsignb), then vpmaddwd with the sub-block scales (two per vector for the 16-value sub-blocks of Q2_K,
//   Q3_K, Q6_K) into int32. A pair sum is at most 2 * 128 * 127 = 32512 (int16), a scaled one
//   2 * 16002 * 128 (Q6_K), far inside int32. Q3_K's -4 and Q6_K's -32 offsets become min terms.
// - Q4_1, Q5_1: 16 nibbles (plus bit 4 from qh through a 256-entry byte table) widened to int16 times the
//   int16-widened activations by ReorderWidenMulAccumulate (vpmaddwd), their mins as min terms.
// Min terms (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K, and the offsets): min x (sum of the sub-block's activations),
// exact in int32, from the activations' 16-value sums (int16) computed once per call for all columns,
// subtracted in fp32 once per block. The K-quants unpack a block's scales and mins with a few 32-bit word
// operations into int16 vectors (no per-sub-block scalar code), take the min terms as one vpmaddwd of the
// mins with the block's 16 sums, broadcast each sub-block's scale with vpshufb, keep the block's min terms
// as a vector until the column ends, and prefetch kPrefetchBytes ahead: the scalar per-sub-block scale
// decoding had held Q4_K decode to a third of its speed now (docs/perf-log/2026-12-07-gguf-kquant-speed.md).
// A block's fp16 factors convert with F16C (vcvtph2ps): the portable conversion, a call with branches, had
// cost Q4_0 and Q8_0 more than half their time. Vectors are 256 bits on every
// target (x86 intrinsics of AVX2, which the AVX3 targets have too).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_gguf_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>

#include <immintrin.h>

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

// An fp16 factor of a block: F16C's vcvtph2ps (exact; every dispatched target has F16C), not the portable
// F16ToF32, a call with branches that cost as much as the rest of a 32-value block.
HWY_INLINE float HalfAt(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 16 int8 activations widened to int16.
HWY_INLINE VI16 X16(const int8_t* p) { return hn::PromoteTo(DI16(), hn::LoadU(DI8(), p)); }
HWY_INLINE VI16 U16(hn::Vec<DU8> v) { return hn::PromoteTo(DI16(), v); }

HWY_INLINE VI32 MulAcc(VI16 a, VI16 b, VI32 acc) {
  VI32 unused = hn::Zero(DI32());  // never written on x86 (gemm_int8_hwy.cc)
  return hn::ReorderWidenMulAccumulate(DI32(), a, b, acc, unused);
}

HWY_INLINE float Total(VF v) { return hn::GetLane(hn::SumOfLanes(DF(), v)); }

// Up to kMaxRows activation rows multiplied with one weight row at once: every block's quants are decoded
// once and used by all R rows (prefill: M rows of one expert; decode: R = 1). Per row: int32 accumulators of
// the block (quants, and activations times mins) and an fp32 total.
constexpr int kMaxRows = 4;
// The row loops have compile-time trip counts; unrolled, the accumulators stay in registers (as loops, GCC 12
// keeps them on the stack: gemm_int8_hwy.cc).
#define HWY_UNROLL_ROWS _Pragma("GCC unroll 4")

template <int R>
struct Acc {
  const int8_t* qx[R];
  const float* sx[R];
  const int16_t* sums[R];  // per row: the activations' sums over each 16 values (QuantCols)
  VF f[R];
  VI32 s[R];
  VI32 ms[R];    // K-quants: the block's min terms, 8 int32 partial sums (MinsK)
  int32_t m[R];  // the 32-value types: the block's sum of min x activation-sum products (exact)
  float mins[R];  // fp32 total of the 32-value types' min terms, subtracted at the end

  HWY_INLINE void Begin() {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      s[r] = hn::Zero(DI32());
      m[r] = 0;
    }
  }
  // 16 int16 weights (already multiplied by their sub-block scale) times activations [at, at + 16).
  HWY_INLINE void Add(VI16 wv, size_t at) {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) s[r] = MulAcc(wv, X16(qx[r] + at), s[r]);
  }
  // 32 unsigned weights w (bytes) times the rows' 32 activations at `at`, the first 16 products' pair sums
  // times scale_lo, the last 16's times scale_hi (vpmaddubsw, then vpmaddwd with the scales). Exact when
  // every pair w0 x0 + w1 x1 fits int16: w <= 128 with |x| <= 127 does (32512).
  HWY_INLINE void AddU8(__m256i w, size_t at, __m256i scales) {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx[r] + at));
      const __m256i pairs = _mm256_maddubs_epi16(w, x);
      s[r] = VI32{_mm256_add_epi32(s[r].raw, _mm256_madd_epi16(pairs, scales))};
    }
  }
  // 32 signed int8 weights: |w| times x with w's sign moved onto x (vpsignb; x is never -128).
  HWY_INLINE void AddS8(__m256i w, size_t at) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i aw = _mm256_sign_epi8(w, w);
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx[r] + at));
      const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(x, w));
      s[r] = VI32{_mm256_add_epi32(s[r].raw, _mm256_madd_epi16(pairs, ones))};
    }
  }
  // A sub-block's min times its activations' sum: `groups` 16-value sums from `at` (a multiple of 16).
  HWY_INLINE void AddMin(int min, size_t at, int groups) {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      int32_t sum = 0;
      for (int g = 0; g < groups; ++g) sum += sums[r][at / 16 + g];
      m[r] += min * sum;
    }
  }
  // Block `b` done: total += (d sum - dmin msum) * the row's activation scale of the block.
  HWY_INLINE void End(size_t b, float d, float dmin) {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      const float dx = sx[r][b];
      f[r] = hn::MulAdd(hn::ConvertTo(DF(), s[r]), hn::Set(DF(), d * dx), f[r]);
      if (dmin != 0.0f) mins[r] += dmin * dx * static_cast<float>(m[r]);
    }
  }
  // K-quants, the min terms of 256-value block b in one vpmaddwd per row: mins16 holds the min weight of each
  // of the block's 16-value groups (a 32-value sub-block's min twice), times the rows' 16 int16 sums. Exact:
  // |min| <= 128 (Q6_K's scales) times |sum| <= 16 * 127, two per lane.
  HWY_INLINE void MinsK(__m256i mins16, size_t b) {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sums[r] + 16 * b));
      ms[r] = VI32{_mm256_madd_epi16(mins16, bs)};
    }
  }
  // K-quant block `b` done: total += (d sum - dmin msum) * dx, both as 8-lane vectors (no horizontal sum per
  // block: the lanes are added once per column).
  HWY_INLINE void EndK(size_t b, float d, float dmin) {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      const float dx = sx[r][b];
      f[r] = hn::MulAdd(hn::ConvertTo(DF(), s[r]), hn::Set(DF(), d * dx), f[r]);
      f[r] = hn::MulAdd(hn::ConvertTo(DF(), ms[r]), hn::Set(DF(), -(dmin * dx)), f[r]);
    }
  }
};

// Sub-block scales as vpmaddwd factors: sc8 holds 8 int16 scales in each 128-bit half; the result has scale
// i in the low half's 8 lanes and scale j in the high half's (vpshufb picks the int16 lane in each half).
HWY_INLINE __m256i ScalePair(__m256i sc8, int i, int j) {
  const auto pick = [](int l) { return _mm_set1_epi16(static_cast<int16_t>((2 * l + 1) << 8 | 2 * l)); };
  return _mm256_shuffle_epi8(sc8, _mm256_set_m128i(pick(j), pick(i)));
}

// Software prefetch distance of the K-quant kernels, in bytes ahead of the block being decoded: rows are
// read front to back, so the next blocks (of this row, then the next column's) are the ones to come.
constexpr size_t kPrefetchBytes = 512;
HWY_INLINE void Prefetch(const uint8_t* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }

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

// The 32-value nibble types: Q4_0 (no high bit, no min), Q4_1 (min), Q5_0 (bit 4 from qh), Q5_1 (both).
// q = nibble | bit << 4, w = d (q - offset) [+ m]: the min is added (End's dmin = -m).
template <bool kHigh, bool kMin, int R>
HWY_INLINE void DotLegacy(const uint8_t* w, size_t nb, Acc<R>& a) {
  const DU8 du8;
  const VI16 off = hn::Set(DI16(), kMin ? 0 : (kHigh ? 16 : 8));
  constexpr size_t kBytes = 2 + (kMin ? 2 : 0) + (kHigh ? 4 : 0) + 16;
  constexpr size_t kQs = kBytes - 16;
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes;
    const auto q = hn::LoadU(du8, blk + kQs);
    auto lo = hn::And(q, hn::Set(du8, 0x0F));
    auto hi = hn::ShiftRight<4>(q);
    if (kHigh) {
      uint32_t qh;
      std::memcpy(&qh, blk + (kMin ? 4 : 2), 4);
      lo = hn::Or(lo, HighBits16(qh, 0));
      hi = hn::Or(hi, HighBits16(qh, 1));
    }
    a.Begin();
    if (kMin) {
      a.Add(U16(lo), 32 * b);
      a.Add(U16(hi), 32 * b + 16);
      a.AddMin(1, 32 * b, 2);
      a.End(b, HalfAt(blk), -HalfAt(blk + 2));
    } else {
      a.Add(hn::Sub(U16(lo), off), 32 * b);
      a.Add(hn::Sub(U16(hi), off), 32 * b + 16);
      a.End(b, HalfAt(blk), 0.0f);
    }
  }
}

// The byte-dot kernels (vpmaddubsw: 32 weights per instruction, the activations read as int8 with no
// widening; Q4_0, Q5_0, Q8_0 and the K-quants). Offsets move to the min terms (Q6_K's -32: 32 d sc sum(x); Q3_K's -4),
// exact in int32 like the rest.

// Q4_0 / Q5_0: q - 8 (q - 16) as signed bytes, 32 per vector (low nibbles values 0..15, high 16..31; Q5_0's
// bit 4 from qh), through vpsignb like Q8_0: no min term.
template <bool kQ5, int R>
HWY_INLINE void DotQx_0B(const uint8_t* w, size_t nb, Acc<R>& a) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m256i off = _mm256_set1_epi8(kQ5 ? 16 : 8);
  constexpr size_t kBytes = kQ5 ? 22 : 18, kQs = kQ5 ? 6 : 2;
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes;
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + kQs));
    __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
    if (kQ5) {
      uint32_t qh;
      std::memcpy(&qh, blk + 2, 4);
      v = _mm256_or_si256(v, _mm256_set_m128i(HighBits16(qh, 1).raw, HighBits16(qh, 0).raw));
    }
    a.Begin();
    a.AddS8(_mm256_sub_epi8(v, off), 32 * b);
    a.End(b, HalfAt(blk), 0.0f);
  }
}

template <int R>
HWY_INLINE void DotQ8_0B(const uint8_t* w, size_t nb, Acc<R>& a) {
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 34;
    a.Begin();
    a.AddS8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2)), 32 * b);
    a.End(b, HalfAt(blk), 0.0f);
  }
}

// Q4_K / Q5_K: per 64 values 32 bytes of qs: low nibbles sub-block 2c, high nibbles 2c + 1 (32 values
// each); Q5_K's bit 4 of sub-block i is bit i of qh[l], l = 0..31. The 8 scales and 8 mins are unpacked from
// their 12 bytes with 32-bit word operations (GgufScaleMinK4 per sub-block, vectorized): with the words
// a, b, c of bytes 0-3, 4-7, 8-11, scales 0-3 = a & 63, mins 0-3 = b & 63 (per byte), scales 4-7 = c's low
// nibbles | a's top 2 bits << 4, mins 4-7 = c's high nibbles | b's top 2 bits << 4.
template <bool kQ5, int R>
HWY_INLINE void DotQ45_KB(const uint8_t* w, size_t nb, Acc<R>& a) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
  constexpr size_t kBytes = kQ5 ? 176 : 144, kQs = kQ5 ? 48 : 16;
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes;
    Prefetch(blk + kPrefetchBytes);
    Prefetch(blk + kPrefetchBytes + 64);
    if (kQ5) Prefetch(blk + kPrefetchBytes + 128);
    uint32_t sw[3];
    std::memcpy(sw, blk + 4, 12);
    const uint32_t lo6 = 0x3f3f3f3f, lo4 = 0x0f0f0f0f, top2 = 0x30303030;
    const __m128i scm = _mm_set_epi32(static_cast<int>(((sw[2] >> 4) & lo4) | ((sw[1] >> 2) & top2)),
                                      static_cast<int>(sw[1] & lo6),
                                      static_cast<int>((sw[2] & lo4) | ((sw[0] >> 2) & top2)),
                                      static_cast<int>(sw[0] & lo6));  // bytes: scales 0-7, mins 0-7
    const __m256i sc8 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scm));
    a.MinsK(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(scm, scm)), b);  // each min for its two 16-value groups
    const __m256i qh = kQ5 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)) : _mm256_setzero_si256();
    a.Begin();
    _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + kQs + 32 * c));
      __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
      if (kQ5) {  // bits 2c and 2c + 1 of qh to bit 4 (0..31: no carry across bytes)
        const __m256i h = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c));
        lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), bit4));
        hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), bit4));
      }
      a.AddU8(lo, 256 * b + 64 * c, ScalePair(sc8, 2 * c, 2 * c));
      a.AddU8(hi, 256 * b + 64 * c + 32, ScalePair(sc8, 2 * c + 1, 2 * c + 1));
    }
    a.EndK(b, HalfAt(blk), HalfAt(blk + 2));
  }
}

// Q2_K / Q3_K: values 128 c + 32 s + l (l = 0..31) are bits 2 s of qs[32 c + l]; 16-value sub-blocks
// i = 8 c + 2 s (l < 16) and i + 1. Q2_K: w = d sc q - dmin m (scales: 16 bytes, low nibble scale, high
// nibble min). Q3_K: q + 4 = low bits + 4 (hmask bit 4 c + s of hmask[l]) is unsigned 0..7, so its -4 moves
// to the min terms: 4 d sc sum(x). Q3_K's 16 6-bit scales (GgufScaleQ3K, vectorized): with the words a, b,
// t of bytes 0-3, 4-7, 8-11, scales 4 g .. 4 g + 3 (g = 0..3) are nibbles (a, b, a >> 4, b >> 4)[g] | bits
// 2 g of t's bytes << 4, minus 32.
template <bool kQ3, int R>
HWY_INLINE void DotLowBitsB(const uint8_t* w, size_t nb, Acc<R>& a) {
  const __m256i m2 = _mm256_set1_epi8(0x03), bit2 = _mm256_set1_epi8(0x04);
  constexpr size_t kBytes = kQ3 ? 110 : 84;
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes;
    Prefetch(blk + kPrefetchBytes);
    Prefetch(blk + kPrefetchBytes + 64);
    const uint8_t* qs = blk + (kQ3 ? 32 : 16);
    __m128i sc16;  // 16 int8 scales
    if (kQ3) {
      uint32_t sw[3];
      std::memcpy(sw, blk + 96, 12);
      const uint32_t lo4 = 0x0f0f0f0f, lo2 = 0x03030303;
      sc16 = _mm_sub_epi8(
          _mm_set_epi32(static_cast<int>(((sw[1] >> 4) & lo4) | (((sw[2] >> 6) & lo2) << 4)),
                        static_cast<int>(((sw[0] >> 4) & lo4) | (((sw[2] >> 4) & lo2) << 4)),
                        static_cast<int>((sw[1] & lo4) | (((sw[2] >> 2) & lo2) << 4)),
                        static_cast<int>((sw[0] & lo4) | ((sw[2] & lo2) << 4))),
          _mm_set1_epi8(32));
      const __m256i s16 = _mm256_cvtepi8_epi16(sc16);
      a.MinsK(s16, b);  // the -4 offset: 4 d sc sum(x), dmin = 4 d below
    } else {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
      sc16 = _mm_and_si128(v, _mm_set1_epi8(0x0F));
      a.MinsK(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(0x0F))), b);
    }
    // Scales 0-7 in both halves, and 8-15 (the two 128-value halves c of the block).
    const __m256i s16 = kQ3 ? _mm256_cvtepi8_epi16(sc16) : _mm256_cvtepu8_epi16(sc16);
    const __m256i sc8[2] = {_mm256_permute2x128_si256(s16, s16, 0x00), _mm256_permute2x128_si256(s16, s16, 0x11)};
    const __m256i hmask = kQ3 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)) : _mm256_setzero_si256();
    a.Begin();
    _Pragma("GCC unroll 2") for (int c = 0; c < 2; ++c) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      _Pragma("GCC unroll 4") for (int sh = 0; sh < 4; ++sh) {
        __m256i v = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * sh)), m2);
        if (kQ3) {  // hmask bit 4 c + sh to bit 2
          const __m256i h = _mm256_srl_epi16(hmask, _mm_cvtsi32_si128(4 * c + sh));
          v = _mm256_or_si256(v, _mm256_and_si256(_mm256_slli_epi16(h, 2), bit2));  // 0..7
        }
        a.AddU8(v, 256 * b + 128 * c + 32 * sh, ScalePair(sc8[c], 2 * sh, 2 * sh + 1));
      }
    }
    if (kQ3) {
      const float d = HalfAt(blk + 108);
      a.EndK(b, d, 4.0f * d);
    } else {
      a.EndK(b, HalfAt(blk + 80), HalfAt(blk + 82));
    }
  }
}

// Q6_K: values 128 c + 32 p .. + 32 (p = 0..3): ql bytes 64 c + 32 (p % 2) (low nibbles for p < 2), qh bytes
// 128 + 32 c shifted by 2 p; scales 8 c + 2 p (first 16 values) and 8 c + 2 p + 1. q - 32 = (unsigned q) - 32,
// the -32 a min term: 32 d sc sum(x).
template <int R>
HWY_INLINE void DotQ6_KB(const uint8_t* w, size_t nb, Acc<R>& a) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), hi2 = _mm256_set1_epi8(0x30);
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    Prefetch(blk + kPrefetchBytes);
    Prefetch(blk + kPrefetchBytes + 64);
    Prefetch(blk + kPrefetchBytes + 128);
    Prefetch(blk + kPrefetchBytes + 192);
    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    a.MinsK(s16, b);
    const __m256i sc8[2] = {_mm256_permute2x128_si256(s16, s16, 0x00), _mm256_permute2x128_si256(s16, s16, 0x11)};
    a.Begin();
    _Pragma("GCC unroll 2") for (int c = 0; c < 2; ++c) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * c));
      const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * c));
      const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 64 * c + 32));
      _Pragma("GCC unroll 4") for (int p = 0; p < 4; ++p) {
        const __m256i ql = p % 2 == 0 ? ql0 : ql1;
        const __m256i lo = p < 2 ? _mm256_and_si256(ql, m4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4);
        // qh bits 2p, 2p + 1 to bits 4, 5 (0..63: no carry across bytes)
        const __m256i hb = p < 2 ? _mm256_slli_epi16(qh, 4 - 2 * (p & 1)) : _mm256_srli_epi16(qh, 2 * p - 4);
        const __m256i q = _mm256_or_si256(lo, _mm256_and_si256(hb, hi2));
        a.AddU8(q, 256 * b + 128 * c + 32 * p, ScalePair(sc8[c], 2 * p, 2 * p + 1));
      }
    }
    const float d = HalfAt(blk + 208);
    a.EndK(b, d, 32.0f * d);
  }
}

template <int R>
using DotFn = void (*)(const uint8_t* w, size_t nb, Acc<R>& a);

// The activations' sums over each 16 values of a row of k (a multiple of 32): vpmaddubsw with ones (pair
// sums), vpmaddwd with ones (sums of 4), then the 4 lanes of each 128-bit half (16 values) added. |sum| <=
// 16 * 127: int16, as the K-quants' vpmaddwd with their mins takes it.
HWY_INLINE void SumsOf16(const int8_t* x, size_t k, int16_t* sums) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (size_t c = 0; c < k; c += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c));
    __m256i t = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16);
    t = _mm256_add_epi32(t, _mm256_shuffle_epi32(t, 0x4e));
    t = _mm256_add_epi32(t, _mm256_shuffle_epi32(t, 0xb1));
    sums[c / 16] = static_cast<int16_t>(_mm256_cvtsi256_si32(t));
    sums[c / 16 + 1] = static_cast<int16_t>(_mm256_extract_epi32(t, 4));
  }
}

// Rows r0 .. r0 + R of y for every column: each weight row decoded once for the R rows. kDot is a template
// argument so that it inlines here and the accumulators live in registers. kSums: the kernel reads the
// activations' 16-value sums (min terms).
template <int R, DotFn<R> kDot, bool kSums>
void QuantCols(size_t row_bytes, size_t nb, size_t groups, size_t k, const GgufRows& in, size_t r0,
               const uint8_t* w, size_t cols, float* y, size_t ldy) {
  // The activations' sums per 16 values, once per call for all columns (the min terms need them): K is
  // bounded by kGgufMaxK (the traits' max_k), so the buffer fits the stack (32 KiB at R = 4).
  int16_t sums[R][kSums ? kGgufMaxK / 16 : 1];
  Acc<R> a;
  HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
    a.qx[r] = in.qx + (r0 + r) * in.ld;
    a.sx[r] = in.sx + (r0 + r) * groups;
    a.sums[r] = sums[r];
    if (kSums) SumsOf16(a.qx[r], k, sums[r]);
  }
  for (size_t j = 0; j < cols; ++j) {
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) {
      a.f[r] = hn::Zero(DF());
      a.mins[r] = 0.0f;
    }
    kDot(w + j * row_bytes, nb, a);
    HWY_UNROLL_ROWS for (int r = 0; r < R; ++r) y[(r0 + r) * ldy + j] = Total(a.f[r]) - a.mins[r];
  }
}

template <int R>
void QuantRows(GgufType type, size_t k, const GgufRows& in, size_t r0, const uint8_t* w, size_t cols, float* y,
               size_t ldy) {
  const size_t rb = GgufRowBytes(type, k), nb = k / GgufBlockElems(type), g = k / GgufActivationBlock(type);
  switch (type) {
    case GgufType::kQ4_0: return QuantCols<R, &DotQx_0B<false, R>, false>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ4_1: return QuantCols<R, &DotLegacy<false, true, R>, true>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ5_0: return QuantCols<R, &DotQx_0B<true, R>, false>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ5_1: return QuantCols<R, &DotLegacy<true, true, R>, true>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ8_0: return QuantCols<R, &DotQ8_0B<R>, false>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ2_K: return QuantCols<R, &DotLowBitsB<false, R>, true>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ3_K: return QuantCols<R, &DotLowBitsB<true, R>, true>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ4_K: return QuantCols<R, &DotQ45_KB<false, R>, true>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ5_K: return QuantCols<R, &DotQ45_KB<true, R>, true>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    case GgufType::kQ6_K: return QuantCols<R, &DotQ6_KB<R>, true>(rb, nb, g, k, in, r0, w, cols, y, ldy);
    default: return;  // float types: FloatRows
  }
}

// Float weights against R bf16 rows: 8 values per step (converted once for the R rows), the tail scalar.
template <int R>
void FloatRows(GgufType type, size_t k, const GgufRows& in, size_t r0, const uint8_t* w, size_t cols, float* y,
               size_t ldy) {
  const DF df;
  const size_t eb = type == GgufType::kF32 ? 4 : 2;
  for (size_t j = 0; j < cols; ++j) {
    const uint8_t* wr = w + j * k * eb;
    VF acc[R];
    for (int r = 0; r < R; ++r) acc[r] = hn::Zero(df);
    size_t c = 0;
    for (; c + 8 <= k; c += 8) {
      VF wv;
      if (type == GgufType::kF32) {
        wv = hn::LoadU(df, reinterpret_cast<const float*>(wr) + c);
      } else if (type == GgufType::kBf16) {
        wv = LoadBf16(df, reinterpret_cast<const bf16_t*>(wr) + c);
      } else {
        const hn::FixedTag<hwy::float16_t, 8> dh;
        wv = hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(wr) + c));
      }
      for (int r = 0; r < R; ++r) acc[r] = hn::MulAdd(wv, LoadBf16(df, in.x + (r0 + r) * in.ld + c), acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float total = Total(acc[r]);
      if (c < k) total += GgufDotBf16(type, wr + c * eb, k - c, in.x + (r0 + r) * in.ld + c);
      y[(r0 + r) * ldy + j] = total;
    }
  }
}

template <int R>
void Rows(GgufType type, size_t k, const GgufRows& in, size_t r0, const uint8_t* w, size_t cols, float* y,
          size_t ldy) {
  if (GgufIsFloat(type)) {
    FloatRows<R>(type, k, in, r0, w, cols, y, ldy);
  } else {  // NOLINT
    QuantRows<R>(type, k, in, r0, w, cols, y, ldy);
  }
}

// The prefill paths (the panel for Q4_0 / Q4_K / Q8_0, fp32 tiles for the float types): their own file
// for size, part of this translation unit (compiled once per target, in this namespace).
#include "kt/kernels/gemm_gguf_prefill-inl.h"

void GemmGguf(GgufType type, size_t m, size_t k, const GgufRows& in, const uint8_t* w, size_t cols, float* y,
              size_t ldy) {
  if (m >= kPanelMinRows && cols >= kPanelCols &&
      (type == GgufType::kQ4_0 || type == GgufType::kQ4_K || type == GgufType::kQ8_0)) {
    const size_t cols8 = cols / kPanelCols * kPanelCols;
    if (type == GgufType::kQ4_K) {
      PanelGemm<GgufType::kQ4_K>(m, k, in, w, cols8, y, ldy);
    } else if (type == GgufType::kQ4_0) {
      PanelGemm<GgufType::kQ4_0>(m, k, in, w, cols8, y, ldy);
    } else {
      PanelGemm<GgufType::kQ8_0>(m, k, in, w, cols8, y, ldy);
    }
    if (cols8 == cols) return;
    w += cols8 * GgufRowBytes(type, k);
    y += cols8;
    cols -= cols8;
  }
  size_t r0 = 0;
  if (m >= 4 && GgufIsFloat(type)) {
    r0 = m / 4 * 4;
    switch (type) {
      case GgufType::kF32: FloatGemmTiled<GgufType::kF32>(r0, k, in, w, cols, y, ldy); break;
      case GgufType::kF16: FloatGemmTiled<GgufType::kF16>(r0, k, in, w, cols, y, ldy); break;
      default: FloatGemmTiled<GgufType::kBf16>(r0, k, in, w, cols, y, ldy); break;
    }
  }
  for (; r0 + kMaxRows <= m; r0 += kMaxRows) Rows<kMaxRows>(type, k, in, r0, w, cols, y, ldy);
  switch (m - r0) {
    case 3: Rows<3>(type, k, in, r0, w, cols, y, ldy); break;
    case 2: Rows<2>(type, k, in, r0, w, cols, y, ldy); break;
    case 1: Rows<1>(type, k, in, r0, w, cols, y, ldy); break;
    default: break;
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
