// Native AVX512-VNNI kernel for the INT4 GEMM: vpdpbusd multiplies, per 32-bit lane, four unsigned bytes
// of its first operand by four signed bytes of its second. The weights are unsigned u in [0, 15] and the
// activations signed, so they go in as they are: no +128 shift and no row-sum correction beyond the
// format's own z * xsum. One 64-byte packed block (kt-int4-panel16-kblock8-v1) gives both operand rows:
//   lo = v & 0x0F       u of quad 2b (k = 8b .. 8b+3), lane r = output row r
//   hi = (v >> 4) & 0x0F u of quad 2b + 1 (k = 8b+4 .. 8b+7)
// against x's quads 2b and 2b + 1 broadcast to all lanes: two vpdpbusd per row and panel per 8 k.
//
// Blocks and driver: gemm_avx512_blocks.h.
// Register blocking: 8 rows x 2 panels = 16 accumulators + 4 expanded weight vectors + 2 broadcasts.
// Per group, the int32 sums go through t = (sx * sw) * float(acc - z * xsum) into fp32 partial results in a
// stack array, added left to right over groups (compiled with -ffp-contract=off, as the other paths).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kt/kernels/gemm_avx512_blocks.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/prefetch.h"

namespace kt {
namespace internal {
namespace {

// Local helper: no out-of-line std::min compiled with AVX-512 flags for the linker to share.
inline size_t MinSize(size_t a, size_t b) { return a < b ? a : b; }

// x's quad q broadcast, zeros past k: no over-read of the row.
inline __m512i BroadcastQuad(const int8_t* row, size_t q, size_t k) {
  int32_t quad = 0;
  const size_t k0 = 4 * q;
  if (k0 < k) std::memcpy(&quad, row + k0, MinSize(4, k - k0));
  return _mm512_set1_epi32(quad);
}

inline __m512i BroadcastFullQuad(const int8_t* p) {
  int32_t quad;
  std::memcpy(&quad, p, sizeof(quad));
  return _mm512_set1_epi32(quad);
}

template <int MR, int NV>
void Micro(size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx, const int32_t* xsum,
           const uint8_t* panels, size_t stride, const float* sw, const uint8_t* zw, float* y, size_t ldy,
           size_t cols) {
  const size_t groups = Int4Groups(k, group);
  const size_t blocks = KBlocks8(k);
  const size_t full_blocks = k / 8;
  const size_t blocks_per_group = group == 0 ? blocks : group / 8;
  const __m512i mask4 = _mm512_set1_epi8(0x0F);
  alignas(64) float out[MR][NV * kInt4PanelRows];
  for (size_t g = 0; g < groups; ++g) {
    __m512i acc[MR][NV];
    for (int m = 0; m < MR; ++m) {
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_si512();
    }
    const size_t b_end = MinSize(blocks, (g + 1) * blocks_per_group);
    for (size_t b = g * blocks_per_group; b < b_end; ++b) {
      const bool full = b < full_blocks;
      __m512i lo[NV], hi[NV];
      for (int v = 0; v < NV; ++v) {
        if (MR <= kDecodePrefetchMaxRows) PrefetchPanelAhead(panels + v * stride, b * 64, stride, NV);
        const __m512i w = _mm512_loadu_si512(panels + v * stride + b * 64);
        lo[v] = _mm512_and_si512(w, mask4);
        hi[v] = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask4);
      }
      for (int m = 0; m < MR; ++m) {
        const int8_t* xr = qx + m * ldqx;
        const __m512i x0 = full ? BroadcastFullQuad(xr + 8 * b) : BroadcastQuad(xr, 2 * b, k);
        const __m512i x1 = full ? BroadcastFullQuad(xr + 8 * b + 4) : BroadcastQuad(xr, 2 * b + 1, k);
        for (int v = 0; v < NV; ++v) {
          acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], lo[v], x0);
          acc[m][v] = _mm512_dpbusd_epi32(acc[m][v], hi[v], x1);
        }
      }
    }
    for (int v = 0; v < NV; ++v) {
      const size_t e = (v * groups + g) * kInt4PanelRows;
      const __m512 w_scale = _mm512_loadu_ps(sw + e);
      const __m512i z = zw ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zw + e)))
                           : _mm512_set1_epi32(kInt4SymZero);
      for (int m = 0; m < MR; ++m) {
        const __m512i dot = _mm512_sub_epi32(acc[m][v], _mm512_mullo_epi32(z, _mm512_set1_epi32(xsum[m * groups + g])));
        const __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(sx[m * groups + g]), w_scale),
                                       _mm512_cvtepi32_ps(dot));
        float* o = out[m] + v * kInt4PanelRows;
        _mm512_store_ps(o, g == 0 ? t : _mm512_add_ps(_mm512_load_ps(o), t));
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const size_t c0 = static_cast<size_t>(v) * kInt4PanelRows;
    if (c0 >= cols) break;
    const size_t n = MinSize(kInt4PanelRows, cols - c0);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(y + m * ldy + c0, mask, _mm512_load_ps(out[m] + c0));
  }
}

// The int4 family of the shared AVX-512 driver: blocks of up to 8 rows x 2 panels; scales and zero points
// are [panel][group][16], so a block's start in them moves by 16 groups entries per panel.
struct Int4Family {
  static constexpr size_t kMaxPanels = 2;
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
  template <int MR, int NV>
  static void Block(const Args& a, size_t i, size_t p, size_t cols) {
    const size_t c0 = p * kInt4PanelRows;
    const size_t e0 = p * kInt4PanelRows * a.groups;
    Micro<MR, NV>(a.k, a.group, a.qx + i * a.ldqx, a.ldqx, a.sx + i * a.groups, a.xsum + i * a.groups,
                  a.panels + p * a.stride, a.stride, a.w_scales + e0, a.w_zeros ? a.w_zeros + e0 : nullptr,
                  a.y + i * a.ldy + c0, a.ldy, cols);
  }
};

}  // namespace

void GemmInt4Vnni(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx,
                  const int32_t* xsum, const uint8_t* panels, const float* w_scales,
                  const uint8_t* w_zeros, size_t n_cols, float* y, size_t ldy) {
  const Int4Family::Args args{k, group, Int4Groups(k, group), qx, ldqx, sx, xsum, panels,
                              Int4PanelStride(k), w_scales, w_zeros, y, ldy};
  avx512_blocks::RunBlocks<Int4Family>(args, m, n_cols);
}

}  // namespace internal
}  // namespace kt
