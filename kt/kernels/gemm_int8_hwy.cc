// Highway kernels (AVX2, AVX3, AVX3_DL) for the INT8 GEMM over packed kquad panels. Without a byte dot
// instruction in Highway 1.0.3, each 32-bit weight lane {w0, w1, w2, w3} (four k of one output row) is
// viewed as two int16 lanes {w0 | w1 << 8, w2 | w3 << 8} and sign-extended in place with shifts:
//   even = (v << 8) >> 8 = {w0, w2},   odd = v >> 8 = {w1, w3}   (arithmetic shifts on int16).
// The broadcast x quad is split the same way, and ReorderWidenMulAccumulate (vpmaddwd on every x86
// target: 32-bit lane j gets a[2j] * b[2j] + a[2j + 1] * b[2j + 1]) adds w0 x0 + w2 x2, then w1 x1 + w3 x3,
// into the row's int32 lane. Products of int8 fit int16 exactly and vpmaddwd cannot saturate here (it does
// only for two (-32768)^2 products), so the sum is exact. This relies on x86's lane order of
// ReorderWidenMulAccumulate (Highway only promises the total over lanes); only x86 targets are dispatched.
//
// Blocks and driver: gemm_hwy-inl.h. Registers per target: AVX3 has 32 vector registers: 8 rows x 2 panels (2 zmm) = 16 int32
// accumulators + 2 split weights + 2 split x. AVX2 has 16: 4 rows x 1 panel (2 ymm) = 8 accumulators
// + 4 split weights + 2 split x. The accumulator's dependency is only the vpaddd inside the
// multiply-accumulate (vpmaddwd reads no accumulator), so one accumulator per output vector suffices.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_int8_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>

#include "kt/kernels/gemm_hwy-inl.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/prefetch.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DI32 = hn::ScalableTag<int32_t>;
using DI16 = hn::ScalableTag<int16_t>;
constexpr size_t kLanes = HWY_MAX_BYTES / sizeof(int32_t);
// Vectors per 16-row panel quad-row (1 for AVX3, 2 for AVX2, 4 for 128-bit targets).
constexpr size_t kVecsPerPanel = kInt8PanelRows / kLanes;
static_assert(kInt8PanelRows == gemm_hwy::kPanelRows16, "the driver walks 16-row panels");

// The 4 bytes qx[4kq .. 4kq+3] as one 32-bit value (zeros past k: no over-read of the row).
HWY_INLINE int32_t LoadQuad(const int8_t* row, size_t kq, size_t k) {
  int32_t quad = 0;
  const size_t k0 = 4 * kq;
  std::memcpy(&quad, row + k0, std::min<size_t>(4, k - k0));
  return quad;
}

// MR rows x NP panels of y: int32 accumulators, then y = (sx * sw) * float(acc).
// Loops with compile-time trip counts are unrolled explicitly (as in gemm_int4_hwy.cc): as loops, GCC 12
// keeps the accumulators on the stack and every vpaddd goes through a store and a reload.
template <int MR, int NP>
HWY_INLINE void Micro(size_t k, const int8_t* HWY_RESTRICT qx, size_t ldqx, const float* HWY_RESTRICT sx,
                      const int8_t* HWY_RESTRICT panels, size_t stride, const float* HWY_RESTRICT sw,
                      float* HWY_RESTRICT y, size_t ldy, size_t cols) {
  const DF df;
  const DI32 di32;
  const DI16 di16;
  constexpr size_t kV = NP * kVecsPerPanel;
  using VI = hn::Vec<DI32>;
  using VW = hn::Vec<DI16>;
  VI acc[MR][kV];
  #pragma GCC unroll 16
  for (int m = 0; m < MR; ++m) {
    #pragma GCC unroll 16
    for (size_t v = 0; v < kV; ++v) acc[m][v] = hn::Zero(di32);
  }
  VI unused = hn::Zero(di32);  // ReorderWidenMulAccumulate's sum1: never written on x86.
  const size_t kquads = KQuads(k);
  const size_t full_quads = k / 4;
  for (size_t kq = 0; kq < kquads; ++kq) {
    const bool full = kq < full_quads;
    #pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      // Split this panel's weights once; every row reuses them.
      const int32_t* src = reinterpret_cast<const int32_t*>(panels + p * stride + kq * 4 * kInt8PanelRows);
      if (MR <= kDecodePrefetchMaxRows) {
        PrefetchPanelAhead(panels + p * stride, kq * 4 * kInt8PanelRows, stride, NP);
      }
      VW w_even[kVecsPerPanel], w_odd[kVecsPerPanel];
      #pragma GCC unroll 16
      for (size_t s = 0; s < kVecsPerPanel; ++s) {
        const VW w = hn::BitCast(di16, hn::LoadU(di32, src + s * kLanes));
        w_even[s] = hn::ShiftRight<8>(hn::ShiftLeft<8>(w));
        w_odd[s] = hn::ShiftRight<8>(w);
      }
      #pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        int32_t quad;
        if (full) {
          std::memcpy(&quad, qx + m * ldqx + 4 * kq, sizeof(quad));
        } else {
          quad = LoadQuad(qx + m * ldqx, kq, k);
        }
        const VW xv = hn::BitCast(di16, hn::Set(di32, quad));
        const VW x_even = hn::ShiftRight<8>(hn::ShiftLeft<8>(xv));
        const VW x_odd = hn::ShiftRight<8>(xv);
        #pragma GCC unroll 16
        for (size_t s = 0; s < kVecsPerPanel; ++s) {
          const size_t v = p * kVecsPerPanel + s;
          acc[m][v] = hn::ReorderWidenMulAccumulate(di32, x_even, w_even[s], acc[m][v], unused);
          acc[m][v] = hn::ReorderWidenMulAccumulate(di32, x_odd, w_odd[s], acc[m][v], unused);
        }
      }
    }
  }
  #pragma GCC unroll 16
  for (size_t v = 0; v < kV; ++v) {
    const size_t c0 = v * kLanes;
    if (c0 >= cols) break;
    const size_t n = std::min(kLanes, cols - c0);
    // Scales are padded to whole panels, so a full-vector load is always in bounds.
    const auto w_scale = hn::LoadU(df, sw + c0);
    #pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const auto out = hn::Mul(hn::Mul(hn::Set(df, sx[m]), w_scale), hn::ConvertTo(df, acc[m][v]));
      gemm_hwy::StoreFirstN(df, out, n, y + m * ldy + c0);
    }
  }
}

// The int8 family of the shared driver.
struct Int8Family {
  struct Args {
    size_t k;
    const int8_t* qx;
    size_t ldqx;
    const float* sx;
    const int8_t* panels;
    size_t stride;
    const float* w_scales;
    float* y;
    size_t ldy;
  };
  template <int MR, int NP>
  static void Block(const Args& a, size_t i, size_t p, size_t cols) {
    const size_t c0 = p * kInt8PanelRows;
    Micro<MR, NP>(a.k, a.qx + i * a.ldqx, a.ldqx, a.sx + i, a.panels + p * a.stride, a.stride,
                  a.w_scales + c0, a.y + i * a.ldy + c0, a.ldy, cols);
  }
};

void GemmInt8(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx, const int8_t* panels,
              const float* w_scales, const int32_t* /*w_rowsums*/, size_t n_cols, float* y, size_t ldy) {
  gemm_hwy::RunBlocks<Int8Family>({k, qx, ldqx, sx, panels, Int8PanelStride(k), w_scales, y, ldy}, m,
                                  n_cols);
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace internal {

// The kernel of exactly the Highway target of the Isa (hwy_dispatch.h); nullptr if not compiled in.
GemmInt8Fn GemmInt8Hwy(Isa isa) {
  static constexpr HwyFns<GemmInt8Fn> kGemm = KT_HWY_FNS(GemmInt8Fn, GemmInt8);
  return kGemm.At(HwyTargetOf(isa));
}

}  // namespace internal
}  // namespace kt
#endif  // HWY_ONCE
