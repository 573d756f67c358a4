// Highway kernels (AVX2, AVX3, AVX3_DL) for the INT4 GEMM over kt-int4-panel16-kblock8-v1 panels.
// Highway 1.0.3 has no byte dot product, so the nibbles go straight to int16 lanes for vpmaddwd
// (ReorderWidenMulAccumulate on x86: 32-bit lane j gets a[2j] b[2j] + a[2j+1] b[2j+1]). A 16-bit lane of
// a packed block holds bytes {4r + j, 4r + j + 1} (j even) of one output row r, i.e. four nibbles:
//   v & 0xF       = u[8b + j]        (v >> 8) & 0xF  = u[8b + j + 1]        (quad 2b)
//   (v >> 4) & 0xF = u[8b + 4 + j]    v >> 12         = u[8b + 4 + j + 1]    (quad 2b + 1)
// so 3 shifts and 3 ANDs give four int16 vectors that pair with x's quads split as in gemm_int8_hwy.cc
// ({x0, x2} and {x1, x3} sign-extended). |u x| <= 15 * 127 and vpmaddwd sums two such products: exact.
//
// Each group's int32 sums go through the epilogue t = (sx * sw) * float(acc - z * xsum) into fp32 partial
// results kept in a small stack array (the int32 accumulators already use most registers), added left to
// right over groups exactly as the scalar path does (-ffp-contract=off: no fused multiply-add).
//
// On the dispatched targets (AVX2, AVX3, AVX3_DL) the inner loop instead uses vpmaddubsw (unsigned bytes
// times signed bytes, adjacent pairs summed into int16; raw intrinsic, Highway 1.0.3 has no op for it):
// `block & 0xF` and `(block >> 4) & 0xF` are the u bytes of quads 2b and 2b + 1 in the int8 kquad order,
// multiplied with x's quads broadcast: maddubs(lo, x0) + maddubs(hi, x1) holds 4 products per int16 pair
// (|sum| <= 4 * 15 * 127 = 7620, no saturation), and one vpmaddwd with ones widens each pair into the row's
// int32 lane. That is 2 AND, 1 shift, 2 vpmaddubsw, 1 vpaddw, 1 vpmaddwd, 1 vpaddd per 64 multiply-adds of
// a 32-byte vector, about half the work of the int16 route (docs/perf-log/2026-11-27-int4.md). Exact either
// way.
//
// Blocks and driver: gemm_hwy-inl.h. Registers: AVX3 (32 zmm): 8 rows x 2 panels = 16 accumulators + 8 nibble vectors + 4 x vectors.
// AVX2 (16 ymm, a panel is 2 vectors): 4 rows x 1 panel = 8 accumulators; decode (m <= 2) takes 2 panels.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_int4_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>

#include "kt/kernels/gemm_hwy-inl.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/prefetch.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DI32 = hn::ScalableTag<int32_t>;
using DI16 = hn::ScalableTag<int16_t>;
using DU16 = hn::ScalableTag<uint16_t>;
using DU8 = hn::ScalableTag<uint8_t>;

#if HWY_TARGET == HWY_AVX2
#define KT_INT4_MADDUBS 1
// Pairwise u8 x s8 products summed into int16 (vpmaddubsw).
HWY_INLINE hn::Vec<DI16> MulAddPairsU8I8(hn::Vec<DU8> u, hn::Vec<DI32> x) {
  return hn::Vec<DI16>{_mm256_maddubs_epi16(u.raw, x.raw)};
}
#elif HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
#define KT_INT4_MADDUBS 1
HWY_INLINE hn::Vec<DI16> MulAddPairsU8I8(hn::Vec<DU8> u, hn::Vec<DI32> x) {
  return hn::Vec<DI16>{_mm512_maddubs_epi16(u.raw, x.raw)};
}
#else
#define KT_INT4_MADDUBS 0
#endif
constexpr size_t kLanes = HWY_MAX_BYTES / sizeof(int32_t);
constexpr size_t kVecsPerPanel = kInt4PanelRows / kLanes;  // 1 for AVX3, 2 for AVX2, 4 for 128-bit
using gemm_hwy::kRegs;
static_assert(kInt4PanelRows == gemm_hwy::kPanelRows16, "the driver walks 16-row panels");

// The 4 bytes qx[4q .. 4q+3] as one 32-bit value, zeros past k (no over-read of the row).
HWY_INLINE int32_t LoadQuad(const int8_t* row, size_t q, size_t k) {
  int32_t quad = 0;
  const size_t k0 = 4 * q;
  if (k0 < k) std::memcpy(&quad, row + k0, std::min<size_t>(4, k - k0));
  return quad;
}

// Row xr's quads 2b and 2b + 1 (the k of block b): plain 4-byte loads when the block lies inside K (`full`),
// LoadQuad's zeros past K for the last partial block.
HWY_INLINE void BlockQuads(const int8_t* xr, size_t b, size_t k, bool full, int32_t& q0, int32_t& q1) {
  if (full) {
    std::memcpy(&q0, xr + 8 * b, 4);
    std::memcpy(&q1, xr + 8 * b + 4, 4);
  } else {
    q0 = LoadQuad(xr, 2 * b, k);
    q1 = LoadQuad(xr, 2 * b + 1, k);
  }
}

#if KT_INT4_MADDUBS
// Blocks whose int16 sums can be added before widening: one block adds at most
// 2 * 2 * 15 * 128 = 7680 to an int16 lane (two vpmaddubsw of two u x qx products each, |qx| <= 128), so
// 4 blocks stay within 30720 < 32767 with no wrap. Group sizes (32, 64, 128 k = 4, 8, 16 blocks) are
// multiples of it, so a chunk never straddles a group.
constexpr size_t kInt16Blocks = 4;

// Adds block b of NP panels into the sums: pairs = maddubs(lo, x0) + maddubs(hi, x1), where lo / hi are
// the low / high nibbles of the block's bytes (quads 2b and 2b + 1 of the panel's rows) and x0 / x1 row m's
// quads 2b and 2b + 1 broadcast. kWiden (a chunk of one block): acc[m][v] += vpmaddwd(pairs, 1) at once;
// otherwise int16 sums[m][v] += pairs, widened by the caller after the chunk. kFull: the block lies inside
// K, so the quads are plain 4-byte loads; the last partial block reads them with LoadQuad (zeros past K).
// Loop order: with up to 2 rows (decode) each nibble vector is expanded right before the rows use it and
// the rows' x broadcasts stay in registers; with more rows the block's nibbles are expanded once up front
// and each row's x is broadcast in turn (the rows' accumulators need the registers).
template <int MR, int NP, bool kFull, bool kWiden>
HWY_INLINE void MaddubsBlock(size_t b, size_t k, const int8_t* HWY_RESTRICT qx, size_t ldqx,
                             const uint8_t* HWY_RESTRICT panels, size_t stride,
                             hn::Vec<DI16> (&sums)[MR][NP * kVecsPerPanel],
                             hn::Vec<DI32> (&acc)[MR][NP * kVecsPerPanel]) {
  constexpr size_t kV = NP * kVecsPerPanel;
  const DI32 di32;
  [[maybe_unused]] const DI16 di16;  // used by the maddubs path only
  const DU8 du8;
  const DU16 du16;
  const auto mask4 = hn::Set(du8, uint8_t{0xF});
  const auto ones = hn::Set(di16, int16_t{1});
  auto quads = [&](int m, hn::Vec<DI32>& x0, hn::Vec<DI32>& x1) {
    int32_t q0, q1;
    BlockQuads(qx + m * ldqx, b, k, kFull, q0, q1);
    x0 = hn::Set(di32, q0);
    x1 = hn::Set(di32, q1);
  };
  auto add = [&](int m, size_t v, hn::Vec<DU8> lo, hn::Vec<DU8> hi, hn::Vec<DI32> x0, hn::Vec<DI32> x1) {
    const auto pairs = hn::Add(MulAddPairsU8I8(lo, x0), MulAddPairsU8I8(hi, x1));
    if (kWiden) {
      hn::Vec<DI32> unused = hn::Zero(di32);  // sum1 of ReorderWidenMulAccumulate: never written on x86
      acc[m][v] = hn::ReorderWidenMulAccumulate(di32, pairs, ones, acc[m][v], unused);
    } else {
      sums[m][v] = hn::Add(sums[m][v], pairs);
    }
  };
  auto expand = [&](size_t v, hn::Vec<DU8>& lo, hn::Vec<DU8>& hi) {
    const size_t p = v / kVecsPerPanel, s = v % kVecsPerPanel;
    const uint8_t* src = panels + p * stride + b * 64;
    if (s == 0 && MR <= kDecodePrefetchMaxRows) PrefetchPanelAhead(panels + p * stride, b * 64, stride, NP);
    const auto w = hn::LoadU(du8, src + s * HWY_MAX_BYTES);
    lo = hn::And(w, mask4);
    hi = hn::And(hn::BitCast(du8, hn::ShiftRight<4>(hn::BitCast(du16, w))), mask4);
  };
  if constexpr (MR <= 2) {
    hn::Vec<DI32> x0[MR], x1[MR];
    #pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) quads(m, x0[m], x1[m]);
    #pragma GCC unroll 16
    for (size_t v = 0; v < kV; ++v) {
      hn::Vec<DU8> lo, hi;
      expand(v, lo, hi);
      #pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) add(m, v, lo, hi, x0[m], x1[m]);
    }
  } else {
    hn::Vec<DU8> lo[kV], hi[kV];
    #pragma GCC unroll 16
    for (size_t v = 0; v < kV; ++v) expand(v, lo[v], hi[v]);
    #pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      hn::Vec<DI32> x0, x1;
      quads(m, x0, x1);
      #pragma GCC unroll 16
      for (size_t v = 0; v < kV; ++v) add(m, v, lo[v], hi[v], x0, x1);
    }
  }
}
#endif

#if !KT_INT4_MADDUBS
// Block b of NP panels by the int16 route (nibbles and x bytes split to int16 lanes, vpmaddwd), for the
// targets without vpmaddubsw: Highway compiles them, kt dispatches only AVX2/AVX3/AVX3_DL (MaddubsBlock).
template <int MR, int NP>
HWY_INLINE void Int16Block(size_t b, size_t k, bool full, const int8_t* HWY_RESTRICT qx, size_t ldqx,
                           const uint8_t* HWY_RESTRICT panels, size_t stride,
                           hn::Vec<DI32> (&acc)[MR][NP * kVecsPerPanel]) {
  using VI = hn::Vec<DI32>;
  using VW = hn::Vec<DI16>;
  const DI32 di32;
  [[maybe_unused]] const DI16 di16;  // used by the maddubs path only
  const DU16 du16;
  const auto mask4 = hn::Set(du16, uint16_t{0xF});
  [[maybe_unused]] VI unused = hn::Zero(di32);  // ReorderWidenMulAccumulate's sum1: never written on x86.
  #pragma GCC unroll 16
  for (int p = 0; p < NP; ++p) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(panels + p * stride + b * 64);
    if (MR <= kDecodePrefetchMaxRows) PrefetchPanelAhead(panels + p * stride, b * 64, stride, NP);
    VW w[4][kVecsPerPanel];  // u of quad 2b even/odd k, quad 2b+1 even/odd k
    #pragma GCC unroll 16
    for (size_t s = 0; s < kVecsPerPanel; ++s) {
      const auto v = hn::LoadU(du16, src + s * (kLanes * 2));
      w[0][s] = hn::BitCast(di16, hn::And(v, mask4));
      w[1][s] = hn::BitCast(di16, hn::And(hn::ShiftRight<8>(v), mask4));
      w[2][s] = hn::BitCast(di16, hn::And(hn::ShiftRight<4>(v), mask4));
      w[3][s] = hn::BitCast(di16, hn::ShiftRight<12>(v));
    }
    #pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      int32_t q0, q1;
      BlockQuads(qx + m * ldqx, b, k, full, q0, q1);
      const VW x0 = hn::BitCast(di16, hn::Set(di32, q0));
      const VW x1 = hn::BitCast(di16, hn::Set(di32, q1));
      const VW x0e = hn::ShiftRight<8>(hn::ShiftLeft<8>(x0)), x0o = hn::ShiftRight<8>(x0);
      const VW x1e = hn::ShiftRight<8>(hn::ShiftLeft<8>(x1)), x1o = hn::ShiftRight<8>(x1);
      #pragma GCC unroll 16
      for (size_t s = 0; s < kVecsPerPanel; ++s) {
        VI& a = acc[m][p * kVecsPerPanel + s];
        a = hn::ReorderWidenMulAccumulate(di32, x0e, w[0][s], a, unused);
        a = hn::ReorderWidenMulAccumulate(di32, x0o, w[1][s], a, unused);
        a = hn::ReorderWidenMulAccumulate(di32, x1e, w[2][s], a, unused);
        a = hn::ReorderWidenMulAccumulate(di32, x1o, w[3][s], a, unused);
      }
    }
  }
}
#endif

// The loops over rows, panels and vectors have compile-time trip counts and are unrolled explicitly (GCC
// unroll pragmas): left as loops, GCC 12 keeps acc[][] and the expanded nibbles on the stack, and every
// vpaddd goes through a store and a reload (perf: half of Micro<1, 2>'s samples on that load-add-store
// chain; docs/perf-log/2026-11-27-pipeline.md).
template <int MR, int NP>
HWY_INLINE void Micro(size_t k, size_t group, const int8_t* HWY_RESTRICT qx, size_t ldqx,
                      const float* HWY_RESTRICT sx, const int32_t* HWY_RESTRICT xsum,
                      const uint8_t* HWY_RESTRICT panels, size_t stride, const float* HWY_RESTRICT sw,
                      const uint8_t* HWY_RESTRICT zw, float* HWY_RESTRICT y, size_t ldy, size_t cols) {
  const DF df;
  const DI32 di32;
  [[maybe_unused]] const DI16 di16;  // used by the maddubs path only
  constexpr size_t kV = NP * kVecsPerPanel;
  using VI = hn::Vec<DI32>;
  using VW [[maybe_unused]] = hn::Vec<DI16>;
#if KT_INT4_MADDUBS
  // Blocks summed in int16 before widening: kInt16Blocks where the int16 sums and the int32 accumulators
  // fit the registers beside what MaddubsBlock keeps live (up to 2 rows: the rows' x broadcasts and one
  // vector's nibble halves; more rows: the block's nibble halves and one row's x), plus 2 constants: AVX2
  // at M = 1, AVX3 (2 panels) up to 6 rows. Otherwise every block is widened at once (the registers of
  // before).
  constexpr size_t kLive = MR <= 2 ? 2 * MR + 2 : 2 * kV + 2;
  constexpr size_t kChunk = 2 * MR * kV + kLive + 2 <= static_cast<size_t>(kRegs) ? kInt16Blocks : 1;
#endif
  const size_t groups = Int4Groups(k, group);
  const size_t blocks = KBlocks8(k);
  const size_t full_blocks = k / 8;
  const size_t blocks_per_group = group == 0 ? blocks : group / 8;
  HWY_ALIGN float out[MR][kV * kLanes];
  [[maybe_unused]] VI unused = hn::Zero(di32);  // ReorderWidenMulAccumulate's sum1: never written on x86.
  for (size_t g = 0; g < groups; ++g) {
    VI acc[MR][kV];
    #pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      #pragma GCC unroll 16
      for (size_t v = 0; v < kV; ++v) acc[m][v] = hn::Zero(di32);
    }
    const size_t b_end = std::min(blocks, (g + 1) * blocks_per_group);
#if KT_INT4_MADDUBS
    // int16 sums of up to kChunk blocks, widened into acc once per chunk (see MaddubsBlock).
    for (size_t b = g * blocks_per_group; b < b_end; b += kChunk) {
      const size_t b_next = std::min(b_end, b + kChunk);
      VW sums[MR][kV];
      #pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        #pragma GCC unroll 16
        for (size_t v = 0; v < kV; ++v) sums[m][v] = hn::Zero(di16);
      }
      constexpr bool kWiden = kChunk == 1;
      const size_t b_full = std::min(b_next, full_blocks);
      for (size_t bb = b; bb < b_full; ++bb) {
        MaddubsBlock<MR, NP, true, kWiden>(bb, k, qx, ldqx, panels, stride, sums, acc);
      }
      for (size_t bb = std::max(b, b_full); bb < b_next; ++bb) {
        MaddubsBlock<MR, NP, false, kWiden>(bb, k, qx, ldqx, panels, stride, sums, acc);
      }
      if (!kWiden) {
        const auto ones = hn::Set(di16, int16_t{1});
        #pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
          #pragma GCC unroll 16
          for (size_t v = 0; v < kV; ++v) {
            acc[m][v] = hn::ReorderWidenMulAccumulate(di32, sums[m][v], ones, acc[m][v], unused);
          }
        }
      }
    }
#else
    for (size_t b = g * blocks_per_group; b < b_end; ++b) {
      Int16Block<MR, NP>(b, k, b < full_blocks, qx, ldqx, panels, stride, acc);
    }
#endif
    // Epilogue of group g. Lane c of vector v is row (v % kVecsPerPanel) * kLanes + c of panel
    // v / kVecsPerPanel; its scale and zero point sit at [(panel * groups + g) * 16 + row].
    #pragma GCC unroll 16
    for (size_t v = 0; v < kV; ++v) {
      const size_t p = v / kVecsPerPanel, r0 = (v % kVecsPerPanel) * kLanes;
      const size_t e = (p * groups + g) * kInt4PanelRows + r0;
      const auto w_scale = hn::LoadU(df, sw + e);
      // Zero points: kLanes bytes widened to int32 (vpmovzxbd), or the symmetric formats' constant 8.
      const VI z = zw ? hn::PromoteTo(di32, hn::LoadU(hn::Rebind<uint8_t, DI32>(), zw + e))
                      : hn::Set(di32, kInt4SymZero);
      #pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const VI dot = hn::Sub(acc[m][v], hn::Mul(z, hn::Set(di32, xsum[m * groups + g])));
        const auto t = hn::Mul(hn::Mul(hn::Set(df, sx[m * groups + g]), w_scale), hn::ConvertTo(df, dot));
        float* o = out[m] + v * kLanes;
        hn::Store(g == 0 ? t : hn::Add(hn::Load(df, o), t), df, o);
      }
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) std::copy(out[m], out[m] + cols, y + m * ldy);
}

// The int4 family of the shared driver: scales and zero points are [panel][group][16], so a block's start
// in them moves by 16 groups entries per panel.
struct Int4Family {
  struct Args {
    size_t k;
    size_t group;
    size_t groups;
    const int8_t* qx;
    size_t ldqx;
    const float* sx;
    const int32_t* xsum;
    const uint8_t* panels;
    size_t stride;
    const float* w_scales;
    const uint8_t* w_zeros;
    float* y;
    size_t ldy;
  };
  template <int MR, int NP>
  static void Block(const Args& a, size_t i, size_t p, size_t cols) {
    const size_t c0 = p * kInt4PanelRows;
    const size_t e0 = p * kInt4PanelRows * a.groups;
    Micro<MR, NP>(a.k, a.group, a.qx + i * a.ldqx, a.ldqx, a.sx + i * a.groups, a.xsum + i * a.groups,
                  a.panels + p * a.stride, a.stride, a.w_scales + e0, a.w_zeros ? a.w_zeros + e0 : nullptr,
                  a.y + i * a.ldy + c0, a.ldy, cols);
  }
};

void GemmInt4(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx,
              const int32_t* xsum, const uint8_t* panels, const float* w_scales, const uint8_t* w_zeros,
              size_t n_cols, float* y, size_t ldy) {
  const Int4Family::Args args{k, group, Int4Groups(k, group), qx, ldqx, sx, xsum, panels,
                              Int4PanelStride(k), w_scales, w_zeros, y, ldy};
  gemm_hwy::RunBlocks<Int4Family>(args, m, n_cols);
}

#undef KT_INT4_MADDUBS
// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace internal {

// The kernel of exactly the Highway target of the Isa (hwy_dispatch.h); nullptr if not compiled in.
GemmInt4Fn GemmInt4Hwy(Isa isa) {
  static constexpr HwyFns<GemmInt4Fn> kGemm = KT_HWY_FNS(GemmInt4Fn, GemmInt4);
  return kGemm.At(HwyTargetOf(isa));
}

}  // namespace internal
}  // namespace kt
#endif  // HWY_ONCE
