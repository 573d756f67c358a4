// Highway kernels (AVX2, AVX3, AVX3_DL) for the BF16 GEMM over packed panels. Without a bf16 dot
// instruction, each 32-bit weight lane {W[r][2kp], W[r][2kp+1]} becomes two fp32 values with one shift
// (even k: low half moved up) and one mask (odd k: high half kept), then two FMAs against broadcast
// x[2kp] and x[2kp+1]. Products of bf16 values are exact in fp32, so only the accumulation rounds.
//
// Blocks and driver: gemm_hwy-inl.h. Registers per target: AVX3 (32): 8 rows x 2 panels (2 zmm) = 16
// accumulators + 4 unpacked weights + 2 broadcasts. AVX2 (16): 4 rows x 1 panel (2 ymm) = 8 accumulators
// + 4 weights + 2 broadcasts.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/gemm_bf16_hwy.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>

#include "kt/kernels/gemm_bf16.h"
#include "kt/kernels/gemm_hwy-inl.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/prefetch.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

using DF = hn::ScalableTag<float>;
using DU = hn::ScalableTag<uint32_t>;
constexpr size_t kLanes = HWY_MAX_BYTES / sizeof(float);
// Vectors per 16-row panel pair-row (1 for AVX3, 2 for AVX2, 4 for 128-bit targets).
constexpr size_t kVecsPerPanel = kPanelRows / kLanes;
static_assert(kPanelRows == gemm_hwy::kPanelRows16, "the driver walks 16-row panels");

// MR rows x NP panels. kSplit keeps the even-k and odd-k products in separate accumulators: with few rows
// (decode) there are otherwise too few independent FMA chains to hide the FMA latency (2 dependent FMAs
// per k-pair per accumulator), and the kernel would run at half speed even from cache.
template <int MR, int NP, bool kSplit>
HWY_INLINE void Micro(size_t k, const bf16_t* HWY_RESTRICT x, size_t ldx,
                      const bf16_t* HWY_RESTRICT panels, size_t stride, float* HWY_RESTRICT y,
                      size_t ldy, size_t cols) {
  const DF df;
  const DU du;
  constexpr size_t kV = NP * kVecsPerPanel;
  constexpr size_t kAcc = kSplit ? 2 : 1;
  using VF = hn::Vec<DF>;
  VF acc[MR][kV][kAcc];
  for (int m = 0; m < MR; ++m) {
    for (size_t v = 0; v < kV; ++v) {
      for (size_t a = 0; a < kAcc; ++a) acc[m][v][a] = hn::Zero(df);
    }
  }
  const auto hi_mask = hn::Set(du, 0xffff0000u);
  const size_t full_pairs = k / 2;
  const size_t kpairs = KPairs(k);
  for (size_t kp = 0; kp < kpairs; ++kp) {
    // Per panel: unpack its weights (2 registers per vector), then every row's FMAs. x's pair
    // {x[2kp], x[2kp+1]} is broadcast as one 32-bit value and split like the weights (shift, mask);
    // keeping only one row's x live at a time keeps MR=4 x 2 vectors within AVX2's 16 registers.
    const bool full = kp < full_pairs;
    for (int p = 0; p < NP; ++p) {
      const uint32_t* src =
          reinterpret_cast<const uint32_t*>(panels + p * stride + kp * 2 * kPanelRows);
      // One or two rows (decode) read each weight once, from memory: prefetch ahead in the panel's stream
      // (kt/kernels/prefetch.h). A k-pair of a panel is 16 rows x 2 bf16 = one 64-byte line.
      if (MR <= kDecodePrefetchMaxRows) {
        PrefetchPanelAhead(panels + p * stride, kp * 2 * kPanelRows * sizeof(bf16_t), stride * sizeof(bf16_t), NP);
      }
      VF w_even[kVecsPerPanel], w_odd[kVecsPerPanel];
      for (size_t s = 0; s < kVecsPerPanel; ++s) {
        const auto w = hn::LoadU(du, src + s * kLanes);
        w_even[s] = hn::BitCast(df, hn::ShiftLeft<16>(w));
        w_odd[s] = hn::BitCast(df, hn::And(w, hi_mask));
      }
      for (int m = 0; m < MR; ++m) {
        uint32_t pair;
        if (full) {
          std::memcpy(&pair, x + m * ldx + 2 * kp, sizeof(pair));
        } else {
          pair = x[m * ldx + 2 * kp].bits;  // odd K: the last k alone, no over-read
        }
        const auto xv = hn::Set(du, pair);
        const VF x_even = hn::BitCast(df, hn::ShiftLeft<16>(xv));
        const VF x_odd = hn::BitCast(df, hn::And(xv, hi_mask));
        for (size_t s = 0; s < kVecsPerPanel; ++s) {
          const size_t v = p * kVecsPerPanel + s;
          acc[m][v][0] = hn::MulAdd(x_even, w_even[s], acc[m][v][0]);
          acc[m][v][kAcc - 1] = hn::MulAdd(x_odd, w_odd[s], acc[m][v][kAcc - 1]);
        }
      }
    }
  }
  for (size_t v = 0; v < kV; ++v) {
    const size_t c0 = v * kLanes;
    if (c0 >= cols) break;
    const size_t n = std::min(kLanes, cols - c0);
    for (int m = 0; m < MR; ++m) {
      const VF sum = kSplit ? hn::Add(acc[m][v][0], acc[m][v][kAcc - 1]) : acc[m][v][0];
      gemm_hwy::StoreFirstN(df, sum, n, y + m * ldy + c0);
    }
  }
}

// The bf16 family of the shared driver: one and two rows split the even-k and odd-k products (see Micro).
struct Bf16Family {
  struct Args {
    size_t k;
    const bf16_t* x;
    size_t ldx;
    const bf16_t* panels;
    size_t stride;
    float* y;
    size_t ldy;
  };
  template <int MR, int NP>
  static void Block(const Args& a, size_t i, size_t p, size_t cols) {
    Micro<MR, NP, (MR <= 2)>(a.k, a.x + i * a.ldx, a.ldx, a.panels + p * a.stride, a.stride,
                             a.y + i * a.ldy + p * kPanelRows, a.ldy, cols);
  }
};

void GemmBf16(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels, size_t n_cols,
              float* y, size_t ldy) {
  gemm_hwy::RunBlocks<Bf16Family>({k, x, ldx, panels, PanelStride(k), y, ldy}, m, n_cols);
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace internal {

// The kernel of exactly the Highway target of the Isa (hwy_dispatch.h); nullptr if not compiled in.
GemmBf16Fn GemmBf16Hwy(Isa isa) {
  static constexpr HwyFns<GemmBf16Fn> kGemm = KT_HWY_FNS(GemmBf16Fn, GemmBf16);
  return kGemm.At(HwyTargetOf(isa));
}

}  // namespace internal
}  // namespace kt
#endif  // HWY_ONCE
