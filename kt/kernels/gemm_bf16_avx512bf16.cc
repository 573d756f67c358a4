// Native AVX512-BF16 kernel: vdpbf16ps multiplies one 32-bit lane's two bf16 of x by the two bf16 of a
// weight lane and adds both products to an fp32 accumulator. With the packed panels (gemm_bf16.h) one
// 64-byte load is 16 output rows x 2 k, and x's pair {x[2kp], x[2kp+1]} is broadcast to all lanes.
//
// Blocks and driver: gemm_avx512_blocks.h.
// Register blocking: MR rows of x times NV panels -> MR*NV zmm accumulators. 8 x 3 = 24 accumulators +
// 3 weight registers + 1 broadcast fit the 32 zmm registers; per k-pair that is 24 vdpbf16ps against
// 3 weight loads and 8 broadcasts, enough independent work to hide the instruction's latency and keep
// the two dot-product pipes of a Zen 5 core busy. A block of 3 panels of K = 2048 is 192 KiB and stays
// in L2 while successive row blocks of x (8 rows x 4 KiB) stream from L1.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kt/kernels/gemm_avx512_blocks.h"
#include "kt/kernels/gemm_bf16.h"
#include "kt/kernels/prefetch.h"

namespace kt {
namespace internal {
namespace {

inline __m512bh BroadcastPair(const bf16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return (__m512bh)_mm512_set1_epi32(v);
}

template <int MR, int NV>
void Micro(size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels, size_t stride, float* y,
           size_t ldy, size_t cols) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  }
  const size_t full_pairs = k / 2;
  const bf16_t* w = panels;
  for (size_t kp = 0; kp < full_pairs; ++kp) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) {
      if (MR <= kDecodePrefetchMaxRows) {
        PrefetchPanelAhead(w + v * stride, kp * 2 * kPanelRows * sizeof(bf16_t), stride * sizeof(bf16_t), NV);
      }
      b[v] = (__m512bh)_mm512_loadu_si512(w + v * stride + kp * 2 * kPanelRows);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = BroadcastPair(x + m * ldx + 2 * kp);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
  if (k & 1) {  // Last k alone: the packed pair's second half is zero, x's must be too (no over-read).
    const size_t kp = full_pairs;
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) {
      b[v] = (__m512bh)_mm512_loadu_si512(w + v * stride + kp * 2 * kPanelRows);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(x[m * ldx + k - 1].bits);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], a, b[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const size_t c0 = static_cast<size_t>(v) * kPanelRows;
    if (c0 >= cols) break;
    const size_t n = std::min(kPanelRows, cols - c0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * ldy + c0, mask, acc[m][v]);
  }
}

// The bf16 family of the shared AVX-512 driver: blocks of up to 8 rows x 3 panels.
struct Bf16Family {
  static constexpr size_t kMaxPanels = 3;
  struct Args {
    size_t k;
    const bf16_t* x;
    size_t ldx;
    const bf16_t* panels;
    size_t stride;
    float* y;
    size_t ldy;
  };
  template <int MR, int NV>
  static void Block(const Args& a, size_t i, size_t p, size_t cols) {
    Micro<MR, NV>(a.k, a.x + i * a.ldx, a.ldx, a.panels + p * a.stride, a.stride,
                  a.y + i * a.ldy + p * kPanelRows, a.ldy, cols);
  }
};

}  // namespace

void GemmBf16Avx512Bf16(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels,
                        size_t n_cols, float* y, size_t ldy) {
  avx512_blocks::RunBlocks<Bf16Family>({k, x, ldx, panels, PanelStride(k), y, ldy}, m, n_cols);
}

}  // namespace internal
}  // namespace kt
