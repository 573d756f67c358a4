// Native AVX512-VNNI kernel: vpdpbusd multiplies, in each 32-bit lane, four unsigned bytes of its first
// operand by four signed bytes of its second and adds the four products to an int32 accumulator. With the
// packed quad panels (gemm_int8.h) one 64-byte load is 16 output rows x 4 k of signed weights, and x's quad
// {qx[4kq] .. qx[4kq+3]} is broadcast to all lanes. x is signed, so it enters as u = qx + 128 (flipping
// each byte's sign bit, qx ^ 0x80, maps -128..127 onto 0..255 for any int8), and
//   sum_k u_k w_k = sum_k qx_k w_k + 128 * sum_k w_k,
// so the kernel subtracts 128 * rowsum[n] at the end. Padded k (x and w both zero-filled) contribute
// 128 * 0. Intermediate sums may wrap in int32; the wrap is modulo 2^32 and the final value fits.
//
// Blocks and driver: gemm_avx512_blocks.h.
// Register blocking: MR rows of x times NV panels -> MR*NV zmm accumulators. 8 x 3 = 24 accumulators +
// 3 weight registers + 1 broadcast fit the 32 zmm registers; per quad-row that is 24 vpdpbusd against 3
// weight loads and 8 broadcasts.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kt/kernels/gemm_avx512_blocks.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/prefetch.h"

namespace kt {
namespace internal {
namespace {

// Local helper: this translation unit is compiled with AVX-512 flags, so it must not emit out-of-line
// copies of shared inline templates (std::min) that the linker could pick for non-AVX-512 callers.
inline size_t MinSize(size_t a, size_t b) { return a < b ? a : b; }

// x's quad as unsigned bytes (qx + 128), zeros (then 128) past k: no over-read of the row.
inline __m512i BroadcastQuadU8(const int8_t* row, size_t kq, size_t k) {
  int32_t quad = 0;
  const size_t k0 = 4 * kq;
  std::memcpy(&quad, row + k0, MinSize(4, k - k0));
  return _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(quad) ^ 0x80808080u));
}

inline __m512i BroadcastFullQuadU8(const int8_t* p) {
  uint32_t quad;
  std::memcpy(&quad, p, sizeof(quad));
  return _mm512_set1_epi32(static_cast<int32_t>(quad ^ 0x80808080u));
}

template <int MR, int NV>
void Micro(size_t k, const int8_t* qx, size_t ldqx, const float* sx, const int8_t* panels, size_t stride,
           const float* sw, const int32_t* rowsums, float* y, size_t ldy, size_t cols) {
  __m512i acc[MR][NV];
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
  }
  // Whole quads: one 4-byte load per row; the last partial quad (k % 4 != 0) reads only the row's bytes.
  const size_t full_quads = k / 4;
  for (size_t kq = 0; kq < KQuads(k); ++kq) {
    const bool full = kq < full_quads;
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) {
      if (MR <= kDecodePrefetchMaxRows) {
        PrefetchPanelAhead(panels + v * stride, kq * 4 * kInt8PanelRows, stride, NV);
      }
      b[v] = _mm512_loadu_si512(panels + v * stride + kq * 4 * kInt8PanelRows);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i a = full ? BroadcastFullQuadU8(qx + m * ldqx + 4 * kq)
                             : BroadcastQuadU8(qx + m * ldqx, kq, k);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], a, b[v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    const size_t c0 = static_cast<size_t>(v) * kInt8PanelRows;
    if (c0 >= cols) break;
    const size_t n = MinSize(kInt8PanelRows, cols - c0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    // Scales and row sums are padded to whole panels: full loads stay in bounds.
    const __m512 w_scale = _mm512_loadu_ps(sw + c0);
    const __m512i bias = _mm512_slli_epi32(_mm512_loadu_si512(rowsums + c0), 7);  // 128 * rowsum, mod 2^32
    for (int m = 0; m < MR; ++m) {
      const __m512i dot = _mm512_sub_epi32(acc[m][v], bias);
      const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(sx[m]), w_scale);
      _mm512_mask_storeu_ps(y + m * ldy + c0, mask, _mm512_mul_ps(scale, _mm512_cvtepi32_ps(dot)));
    }
  }
}

// The int8 family of the shared AVX-512 driver: blocks of up to 8 rows x 3 panels.
struct Int8Family {
  static constexpr size_t kMaxPanels = 3;
  struct Args {
    size_t k;
    const int8_t* qx;
    size_t ldqx;
    const float* sx;
    const int8_t* panels;
    size_t stride;
    const float* w_scales;
    const int32_t* w_rowsums;
    float* y;
    size_t ldy;
  };
  template <int MR, int NV>
  static void Block(const Args& a, size_t i, size_t p, size_t cols) {
    const size_t c0 = p * kInt8PanelRows;
    Micro<MR, NV>(a.k, a.qx + i * a.ldqx, a.ldqx, a.sx + i, a.panels + p * a.stride, a.stride,
                  a.w_scales + c0, a.w_rowsums + c0, a.y + i * a.ldy + c0, a.ldy, cols);
  }
};

}  // namespace

void GemmInt8Vnni(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                  const int8_t* panels, const float* w_scales, const int32_t* w_rowsums, size_t n_cols,
                  float* y, size_t ldy) {
  avx512_blocks::RunBlocks<Int8Family>(
      {k, qx, ldqx, sx, panels, Int8PanelStride(k), w_scales, w_rowsums, y, ldy}, m, n_cols);
}

}  // namespace internal
}  // namespace kt
