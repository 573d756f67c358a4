// AMX BF16 kernel (tdpbf16ps) over the packed panels of gemm_bf16.h.
//
// The panel layout is already AMX's "VNNI" B layout: a B tile is 16 rows of 64 bytes where row r holds,
// for 16 output columns, the bf16 pair {W[c][2(k0/2 + r)], W[c][2(k0/2 + r) + 1]}. That is exactly 16
// consecutive pair-rows of one panel (stride 64 bytes), so B tiles load straight from the packed weights.
// A tiles are 16 rows of x by 32 bf16 of K (64 bytes), loaded straight from x with stride ldx.
//
// Tile registers (2 x 2 blocking: 32 rows x 32 columns of y per pass over K):
//   tmm0, tmm1  A: x rows [m, m+16) and [m+16, m+32), k in [k0, k0+32)
//   tmm2, tmm3  B: panels p and p+1, pair-rows [k0/2, k0/2+16)
//   tmm4..tmm7  C: fp32 accumulators, C[i][j] = tmm(4 + 2i + j), 16 x 16 each
// Four tdpbf16ps (16x16x32 each) per two A and two B loads: every loaded tile is used twice.
// A pass holds 2 panels x K of weights (128 KiB at K = 2048) and 32 rows of x, both L2-resident (2 MiB
// per core on the AMX host), so the panel pair is streamed from memory once per 32 rows.
//
// Tails: rows beyond m, columns beyond n_cols and k beyond K are handled by staging a zero-padded tile in
// a stack buffer (A and B) and by storing C through a stack buffer; full tiles never touch the buffers.
// Few rows (decode) gain nothing from 16-row tiles: below kAmxMinRows the AVX512-BF16 kernel runs.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kt/kernels/amx_tiles.h"
#include "kt/kernels/gemm_bf16.h"

namespace kt {
namespace internal {
namespace {

constexpr size_t kTileRows = 16;
constexpr size_t kTileK = 32;  // bf16 per A-tile row (64 bytes)

// One 32x32 block of y (fewer rows/columns at the edges): rows [0, rows) of x, panels [0, panels).
void Block(size_t rows, size_t panels, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panel0,
           size_t stride, float* y, size_t ldy, size_t cols) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  alignas(64) bf16_t a_buf[2][kTileRows * kTileK];
  alignas(64) bf16_t b_buf[2][kTileRows * 2 * kPanelRows];
  const size_t kpairs = KPairs(k);
  for (size_t k0 = 0; k0 < k; k0 += kTileK) {
    const size_t kn = std::min(kTileK, k - k0);
    const size_t kp0 = k0 / 2;
    const size_t pair_rows = std::min<size_t>(kTileRows, kpairs - kp0);
    const bool full_k = kn == kTileK;
    // A tiles.
    for (size_t i = 0; i < 2; ++i) {
      const size_t r0 = i * kTileRows;
      if (r0 >= rows) break;
      const size_t rn = std::min(kTileRows, rows - r0);
      if (full_k && rn == kTileRows) {
        if (i == 0) {
          _tile_loadd(0, x + r0 * ldx + k0, ldx * sizeof(bf16_t));
        } else {
          _tile_loadd(1, x + r0 * ldx + k0, ldx * sizeof(bf16_t));
        }
      } else {
        std::memset(a_buf[i], 0, sizeof(a_buf[i]));
        for (size_t r = 0; r < rn; ++r) {
          std::memcpy(a_buf[i] + r * kTileK, x + (r0 + r) * ldx + k0, kn * sizeof(bf16_t));
        }
        if (i == 0) {
          _tile_loadd(0, a_buf[0], kTileK * sizeof(bf16_t));
        } else {
          _tile_loadd(1, a_buf[1], kTileK * sizeof(bf16_t));
        }
      }
    }
    // B tiles: 16 pair-rows of each panel; the last chunk of K may have fewer (zero the rest so that
    // nothing past the panel is read).
    for (size_t j = 0; j < panels; ++j) {
      const bf16_t* src = panel0 + j * stride + kp0 * 2 * kPanelRows;
      const bf16_t* tile = src;
      if (pair_rows < kTileRows) {
        std::memset(b_buf[j], 0, sizeof(b_buf[j]));
        std::memcpy(b_buf[j], src, pair_rows * 2 * kPanelRows * sizeof(bf16_t));
        tile = b_buf[j];
      }
      if (j == 0) {
        _tile_loadd(2, tile, 64);
      } else {
        _tile_loadd(3, tile, 64);
      }
    }
    _tile_dpbf16ps(4, 0, 2);
    if (panels > 1) _tile_dpbf16ps(5, 0, 3);
    if (rows > kTileRows) {
      _tile_dpbf16ps(6, 1, 2);
      if (panels > 1) _tile_dpbf16ps(7, 1, 3);
    }
  }
  // Store C: straight into y when the tile is whole, through a buffer at the edges.
  alignas(64) float c_buf[kTileRows * kPanelRows];
  for (size_t i = 0; i < 2; ++i) {
    const size_t r0 = i * kTileRows;
    if (r0 >= rows) break;
    const size_t rn = std::min(kTileRows, rows - r0);
    for (size_t j = 0; j < panels; ++j) {
      const size_t c0 = j * kPanelRows;
      if (c0 >= cols) break;
      const size_t cn = std::min(kPanelRows, cols - c0);
      float* dst = y + r0 * ldy + c0;
      const bool whole = rn == kTileRows && cn == kPanelRows;
      float* out = whole ? dst : c_buf;
      const size_t ld = whole ? ldy : kPanelRows;
      switch (2 * i + j) {
        case 0: _tile_stored(4, out, ld * sizeof(float)); break;
        case 1: _tile_stored(5, out, ld * sizeof(float)); break;
        case 2: _tile_stored(6, out, ld * sizeof(float)); break;
        default: _tile_stored(7, out, ld * sizeof(float)); break;
      }
      if (!whole) {
        for (size_t r = 0; r < rn; ++r) std::memcpy(dst + r * ldy, c_buf + r * kPanelRows, cn * 4);
      }
    }
  }
}

// The K-blocked schedule for whole 32-row blocks x whole panel pairs (the bulk of a prefill GEMM).
// Block() above walks all of K for one 32 x 32 block, so per K step it loads 2 A and 2 B tiles (4 KiB) for 4
// tdpbf16ps (64 cycles): 64 B/cycle. At K = 4096 neither operand fits L1 (32 A rows are 256 KiB, a panel
// pair 256 KiB), so both stream from L2, which cannot deliver that.
// Here the loops run K block (kb) -> 32-row block -> panel pair, so that
//   - the 32 x kb block of A (32 KiB at kb = 512) is reused from L1 by every panel pair of the call;
//   - the kb slice of all the call's panels (n_cols x kb x 2 bytes: 128 KiB for 128 columns at kb = 512)
//     is reused from L2 by every 32-row block; only B tiles come from L2 (32 B/cycle at peak);
//   - the fp32 partial sums wait in y itself between K blocks (4 tile loads + 4 stores per panel pair and K
//     block: 8 KiB per 4 * kb / 32 tdpbf16ps, ~12% extra traffic at kb = 512, all L1/L2-resident).
void KBlocked(size_t kb, size_t rows, size_t pairs, size_t k, const bf16_t* x, size_t ldx,
              const bf16_t* panel0, size_t stride, float* y, size_t ldy) {
  const size_t row_blocks = rows / 32;
  const size_t ldy_bytes = ldy * sizeof(float);
  for (size_t k0b = 0; k0b < k; k0b += kb) {
    const size_t k1b = std::min(k, k0b + kb);
    const bool first = k0b == 0;
    for (size_t rb = 0; rb < row_blocks; ++rb) {
      const bf16_t* xr = x + rb * 32 * ldx;
      float* yr = y + rb * 32 * ldy;
      for (size_t pp = 0; pp < pairs; ++pp) {
        const bf16_t* b0 = panel0 + 2 * pp * stride;
        const bf16_t* b1 = b0 + stride;
        float* yc = yr + pp * 2 * kPanelRows;
        if (first) {
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
        } else {
          _tile_loadd(4, yc, ldy_bytes);
          _tile_loadd(5, yc + kPanelRows, ldy_bytes);
          _tile_loadd(6, yc + kTileRows * ldy, ldy_bytes);
          _tile_loadd(7, yc + kTileRows * ldy + kPanelRows, ldy_bytes);
        }
        for (size_t k0 = k0b; k0 < k1b; k0 += kTileK) {
          _tile_loadd(0, xr + k0, ldx * sizeof(bf16_t));
          _tile_loadd(1, xr + kTileRows * ldx + k0, ldx * sizeof(bf16_t));
          _tile_loadd(2, b0 + k0 * kPanelRows, 64);  // pair-row k0/2, 32 bf16 each
          _tile_loadd(3, b1 + k0 * kPanelRows, 64);
          _tile_dpbf16ps(4, 0, 2);
          _tile_dpbf16ps(5, 0, 3);
          _tile_dpbf16ps(6, 1, 2);
          _tile_dpbf16ps(7, 1, 3);
        }
        _tile_stored(4, yc, ldy_bytes);
        _tile_stored(5, yc + kPanelRows, ldy_bytes);
        _tile_stored(6, yc + kTileRows * ldy, ldy_bytes);
        _tile_stored(7, yc + kTileRows * ldy + kPanelRows, ldy_bytes);
      }
    }
  }
}

}  // namespace

void GemmBf16AmxKBlocked(size_t kb, size_t m, size_t k, const bf16_t* x, size_t ldx,
                         const bf16_t* panels, size_t n_cols, float* y, size_t ldy) {
  if (m < kAmxMinRows) {
    GemmBf16Avx512Bf16(m, k, x, ldx, panels, n_cols, y, ldy);
    return;
  }
  ConfigureFullTiles();
  kb = (kb + kTileK - 1) / kTileK * kTileK;
  const size_t stride = PanelStride(k);
  const size_t num_panels = NumPanels(n_cols);
  // Whole panel pairs x whole 32-row blocks take the K-blocked schedule (K must split into whole A tiles);
  // the rest (row remainder, a last single or partial panel, odd K) the plain 32 x 32 blocks.
  const bool blocked = kb > 0 && k % kTileK == 0;
  const size_t full_pairs = blocked ? n_cols / (2 * kPanelRows) : 0;
  const size_t m_full = blocked ? m / 32 * 32 : 0;
  if (full_pairs > 0 && m_full > 0) KBlocked(kb, m_full, full_pairs, k, x, ldx, panels, stride, y, ldy);
  for (size_t p = 0; p < num_panels; p += 2) {
    const size_t np = std::min<size_t>(2, num_panels - p);
    const size_t c0 = p * kPanelRows;
    const size_t cols = std::min(n_cols - c0, np * kPanelRows);
    for (size_t i = p / 2 < full_pairs ? m_full : 0; i < m; i += 2 * kTileRows) {
      const size_t rows = std::min(2 * kTileRows, m - i);
      Block(rows, np, k, x + i * ldx, ldx, panels + p * stride, stride, y + i * ldy + c0, ldy, cols);
    }
  }
  _tile_release();
}

void GemmBf16Amx(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels,
                 size_t n_cols, float* y, size_t ldy) {
  // Not K-blocked: with A rows padded as the MoE layer pads them, the K-blocked schedule measured slower for
  // bf16 in every MoE task shape on the AMX host; the padding, not the blocking, is what keeps A tile loads
  // fast (docs/perf-log/2026-11-27-int8.md).
  GemmBf16AmxKBlocked(0, m, k, x, ldx, panels, n_cols, y, ldy);
}

}  // namespace internal
}  // namespace kt
