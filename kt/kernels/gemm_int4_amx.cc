// AMX kernel for the INT4 GEMM (tdpbssd: signed x signed bytes, int32 accumulation). AMX has no nibble
// operand, so each B tile is expanded from the packed kt-int4-panel16-kblock8-v1 blocks into a stack
// buffer: a 64-byte block b holds the kt-int8-panel16-kquad-v1 quad-rows 2b (low nibbles) and 2b + 1 (high
// nibbles), so B tile row 2c = block & 0x0F and row 2c + 1 = (block >> 4) & 0x0F, 8 blocks per 64-k tile.
// u in [0, 15] is a valid non-negative signed byte, so tdpbssd multiplies it with signed qx directly.
// That costs 8 loads, 16 AND/shift and 16 stores per 1 KiB B tile, against 2 x 16-row tdpbssd per tile
// use (each 16 cycles on Sapphire/Emerald Rapids): small next to the tile work.
//
// Tile registers (2 x 2 blocking: 32 rows x 32 columns of y per pass over one group):
//   tmm0, tmm1  A: qx rows [i, i+16) and [i+16, i+32), k chunk of 64 (32 for G = 32, rest zero)
//   tmm2, tmm3  B: expanded panels p and p+1, 16 quad-rows of the chunk
//   tmm4..tmm7  C: int32 sums of the current group, C[i][j] = tmm(4 + 2i + j), 16 x 16 each
// Groups: the C tiles restart at every group (G = 32: one tdpbssd per group with the B rows of the other
// half zero; G = 64, 128: one or two full chunks); per-channel is one group over all of K. After each group
// the C tiles go through the fp32 epilogue t = (sx * sw) * float(C - z * xsum) into fp32 partial results,
// added left to right over groups as every other path does (-ffp-contract=off).
// A and C tiles go through zero-padded stack buffers at the edges (rows past m, k past the chunk); below
// kAmxInt4MinRows rows the VNNI kernel runs instead (decode gains nothing from 16-row tiles).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kt/kernels/amx_tiles.h"
#include "kt/kernels/gemm_int4.h"

namespace kt {
namespace internal {
namespace {

constexpr size_t kTileRows = 16;
constexpr size_t kTileK = 64;

inline size_t MinSize(size_t a, size_t b) { return a < b ? a : b; }

// Expands blocks [b0, b0 + nb) of one panel into a 16 x 64-byte B tile; rows past 2 * nb are zeroed.
inline void ExpandB(const uint8_t* panel, size_t b0, size_t nb, int8_t* tile) {
  const __m512i mask4 = _mm512_set1_epi8(0x0F);
  for (size_t c = 0; c < nb; ++c) {
    const __m512i w = _mm512_loadu_si512(panel + (b0 + c) * 64);
    _mm512_store_si512(tile + (2 * c) * 64, _mm512_and_si512(w, mask4));
    _mm512_store_si512(tile + (2 * c + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(w, 4), mask4));
  }
  if (2 * nb < kTileRows) std::memset(tile + 2 * nb * 64, 0, (kTileRows - 2 * nb) * 64);
}

void Block(size_t rows, size_t panels, size_t k, size_t group, const int8_t* qx, size_t ldqx,
           const float* sx, const int32_t* xsum, const uint8_t* panel0, size_t stride, const float* sw,
           const uint8_t* zw, float* y, size_t ldy, size_t cols) {
  const size_t groups = Int4Groups(k, group);
  const size_t len = group == 0 ? k : group;
  const size_t chunk = MinSize(kTileK, group == 0 ? kTileK : group);
  alignas(64) int8_t a_buf[2][kTileRows * kTileK];
  alignas(64) int8_t b_buf[2][kTileRows * 64];
  alignas(64) int32_t c_buf[kTileRows * kInt4PanelRows];
  alignas(64) float out[2 * kTileRows][2 * kInt4PanelRows];
  for (size_t g = 0; g < groups; ++g) {
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    const size_t kend = group == 0 ? k : (g + 1) * len;
    for (size_t k0 = g * len; k0 < kend; k0 += chunk) {
      const size_t kn = MinSize(chunk, kend - k0);
      for (size_t i = 0; i < 2; ++i) {
        const size_t r0 = i * kTileRows;
        if (r0 >= rows) break;
        const size_t rn = MinSize(kTileRows, rows - r0);
        const int8_t* tile = qx + r0 * ldqx + k0;
        size_t ld = ldqx;
        if (kn < kTileK || rn < kTileRows) {
          std::memset(a_buf[i], 0, sizeof(a_buf[i]));
          for (size_t r = 0; r < rn; ++r) std::memcpy(a_buf[i] + r * kTileK, qx + (r0 + r) * ldqx + k0, kn);
          tile = a_buf[i];
          ld = kTileK;
        }
        if (i == 0) {
          _tile_loadd(0, tile, ld);
        } else {
          _tile_loadd(1, tile, ld);
        }
      }
      const size_t nb = (kn + 7) / 8;
      for (size_t j = 0; j < panels; ++j) ExpandB(panel0 + j * stride, k0 / 8, nb, b_buf[j]);
      _tile_loadd(2, b_buf[0], 64);
      if (panels > 1) _tile_loadd(3, b_buf[1], 64);
      _tile_dpbssd(4, 0, 2);
      if (panels > 1) _tile_dpbssd(5, 0, 3);
      if (rows > kTileRows) {
        _tile_dpbssd(6, 1, 2);
        if (panels > 1) _tile_dpbssd(7, 1, 3);
      }
    }
    for (size_t i = 0; i < 2; ++i) {
      const size_t r0 = i * kTileRows;
      if (r0 >= rows) break;
      const size_t rn = MinSize(kTileRows, rows - r0);
      for (size_t j = 0; j < panels; ++j) {
        switch (2 * i + j) {
          case 0: _tile_stored(4, c_buf, kInt4PanelRows * sizeof(int32_t)); break;
          case 1: _tile_stored(5, c_buf, kInt4PanelRows * sizeof(int32_t)); break;
          case 2: _tile_stored(6, c_buf, kInt4PanelRows * sizeof(int32_t)); break;
          default: _tile_stored(7, c_buf, kInt4PanelRows * sizeof(int32_t)); break;
        }
        const size_t e = (j * groups + g) * kInt4PanelRows;
        const __m512 w_scale = _mm512_loadu_ps(sw + e);
        const __m512i z = zw ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zw + e)))
                             : _mm512_set1_epi32(kInt4SymZero);
        for (size_t r = 0; r < rn; ++r) {
          const size_t row = r0 + r;
          const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(c_buf + r * kInt4PanelRows),
                                               _mm512_mullo_epi32(z, _mm512_set1_epi32(xsum[row * groups + g])));
          const __m512 t = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(sx[row * groups + g]), w_scale),
                                         _mm512_cvtepi32_ps(dot));
          float* o = out[row] + j * kInt4PanelRows;
          _mm512_store_ps(o, g == 0 ? t : _mm512_add_ps(_mm512_load_ps(o), t));
        }
      }
    }
  }
  for (size_t j = 0; j < panels; ++j) {
    const size_t c0 = j * kInt4PanelRows;
    if (c0 >= cols) break;
    const size_t cn = MinSize(kInt4PanelRows, cols - c0);
    const __mmask16 mask = static_cast<__mmask16>((1u << cn) - 1u);
    for (size_t r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + r * ldy + c0, mask, _mm512_load_ps(out[r] + c0));
  }
}

}  // namespace

void GemmInt4Amx(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx,
                 const int32_t* xsum, const uint8_t* panels, const float* w_scales,
                 const uint8_t* w_zeros, size_t n_cols, float* y, size_t ldy) {
  if (m < kAmxInt4MinRows) {
    GemmInt4Vnni(m, k, group, qx, ldqx, sx, xsum, panels, w_scales, w_zeros, n_cols, y, ldy);
    return;
  }
  ConfigureFullTiles();
  const size_t stride = Int4PanelStride(k);
  const size_t groups = Int4Groups(k, group);
  const size_t num_panels = Int4NumPanels(n_cols);
  for (size_t p = 0; p < num_panels; p += 2) {
    const size_t np = MinSize(2, num_panels - p);
    const size_t c0 = p * kInt4PanelRows;
    const size_t cols = MinSize(n_cols - c0, np * kInt4PanelRows);
    const size_t e0 = p * kInt4PanelRows * groups;
    for (size_t i = 0; i < m; i += 2 * kTileRows) {
      const size_t rows = MinSize(2 * kTileRows, m - i);
      Block(rows, np, k, group, qx + i * ldqx, ldqx, sx + i * groups, xsum + i * groups, panels + p * stride,
            stride, w_scales + e0, w_zeros ? w_zeros + e0 : nullptr, y + i * ldy + c0, ldy, cols);
    }
  }
  _tile_release();
}

}  // namespace internal
}  // namespace kt
