// AMX INT8 kernel (tdpbssd: signed x signed bytes, int32 accumulation) over the packed quad panels of
// gemm_int8.h.
//
// The panel layout is already AMX's INT8 B layout: a B tile is 16 rows of 64 bytes where row r holds, for
// 16 output columns, the quad {W[c][4(k0/4 + r)] .. W[c][4(k0/4 + r) + 3]}. That is exactly 16
// consecutive quad-rows of one panel (stride 64 bytes), so B tiles load straight from the packed weights.
// A tiles are 16 rows of qx by 64 int8 of K (64 bytes), loaded straight from qx with stride ldqx. Both
// operands are signed, so unlike the VNNI kernel no +128 shift or row-sum correction is needed.
//
// Tile registers (2 x 2 blocking: 32 rows x 32 columns of y per pass over K):
//   tmm0, tmm1  A: qx rows [m, m+16) and [m+16, m+32), k in [k0, k0+64)
//   tmm2, tmm3  B: panels p and p+1, quad-rows [k0/4, k0/4+16)
//   tmm4..tmm7  C: int32 accumulators, C[i][j] = tmm(4 + 2i + j), 16 x 16 each
// Four tdpbssd (16x16x64 each) per two A and two B loads: every loaded tile is used twice.
//
// Tails: rows beyond m, columns beyond n_cols and k beyond K are handled by staging a zero-padded tile in
// a stack buffer (A and B); full tiles never touch the buffers. C always goes through a stack buffer,
// because the int32 sums still need the fp32 epilogue y = (sx * sw) * float(C), done with AVX-512 (masked
// stores keep columns past n_cols untouched). Few rows (decode) gain nothing from 16-row tiles: below
// kAmxInt8MinRows the VNNI kernel runs.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kt/kernels/amx_tiles.h"
#include "kt/kernels/gemm_int8.h"

namespace kt {
namespace internal {
namespace {

constexpr size_t kTileRows = 16;
constexpr size_t kTileK = 64;  // int8 per A-tile row (64 bytes) = 16 quad-rows of B

// Local helper: no out-of-line std::min compiled with AMX/AVX-512 flags for the linker to share.
inline size_t MinSize(size_t a, size_t b) { return a < b ? a : b; }

// Writes rows [0, rn) and columns [0, cn) of one int32 C tile held in c (16 x 16, row-major) to y.
void Epilogue(const int32_t* c, size_t rn, size_t cn, const float* sx, const float* sw, float* y,
              size_t ldy) {
  const __mmask16 mask = static_cast<__mmask16>((1u << cn) - 1u);
  const __m512 w_scale = _mm512_loadu_ps(sw);  // padded to a whole panel: in bounds
  for (size_t r = 0; r < rn; ++r) {
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(sx[r]), w_scale);
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * kInt8PanelRows));
    _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_mul_ps(scale, dot));
  }
}

// One 32x32 block of y (fewer rows/columns at the edges): rows [0, rows) of qx, panels [0, panels).
void Block(size_t rows, size_t panels, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
           const int8_t* panel0, size_t stride, const float* sw, float* y, size_t ldy, size_t cols) {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  alignas(64) int8_t a_buf[2][kTileRows * kTileK];
  alignas(64) int8_t b_buf[2][kTileRows * 4 * kInt8PanelRows];
  const size_t kquads = KQuads(k);
  for (size_t k0 = 0; k0 < k; k0 += kTileK) {
    const size_t kn = MinSize(kTileK, k - k0);
    const size_t kq0 = k0 / 4;
    const size_t quad_rows = MinSize(kTileRows, kquads - kq0);
    const bool full_k = kn == kTileK;
    // A tiles: straight from qx when whole, else the rows' kn bytes in a zeroed buffer.
    for (size_t i = 0; i < 2; ++i) {
      const size_t r0 = i * kTileRows;
      if (r0 >= rows) break;
      const size_t rn = MinSize(kTileRows, rows - r0);
      const int8_t* tile = qx + r0 * ldqx + k0;
      size_t ld = ldqx;
      if (!full_k || rn < kTileRows) {
        // Rows past rn stay zero between chunks (only rows < rn are rewritten, whole 64 bytes in full
        // chunks), so the buffer is cleared only at the first chunk and the short last one.
        if (k0 == 0 || !full_k) std::memset(a_buf[i], 0, sizeof(a_buf[i]));
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
    // B tiles: 16 quad-rows of each panel; the last chunk of K may have fewer (zero the rest so that
    // nothing past the panel is read).
    for (size_t j = 0; j < panels; ++j) {
      const int8_t* src = panel0 + j * stride + kq0 * 4 * kInt8PanelRows;
      const int8_t* tile = src;
      if (quad_rows < kTileRows) {
        std::memset(b_buf[j], 0, sizeof(b_buf[j]));
        std::memcpy(b_buf[j], src, quad_rows * 4 * kInt8PanelRows);
        tile = b_buf[j];
      }
      if (j == 0) {
        _tile_loadd(2, tile, 64);
      } else {
        _tile_loadd(3, tile, 64);
      }
    }
    _tile_dpbssd(4, 0, 2);
    if (panels > 1) _tile_dpbssd(5, 0, 3);
    if (rows > kTileRows) {
      _tile_dpbssd(6, 1, 2);
      if (panels > 1) _tile_dpbssd(7, 1, 3);
    }
  }
  alignas(64) int32_t c_buf[kTileRows * kInt8PanelRows];
  for (size_t i = 0; i < 2; ++i) {
    const size_t r0 = i * kTileRows;
    if (r0 >= rows) break;
    const size_t rn = MinSize(kTileRows, rows - r0);
    for (size_t j = 0; j < panels; ++j) {
      const size_t c0 = j * kInt8PanelRows;
      if (c0 >= cols) break;
      const size_t cn = MinSize(kInt8PanelRows, cols - c0);
      switch (2 * i + j) {
        case 0: _tile_stored(4, c_buf, kInt8PanelRows * sizeof(int32_t)); break;
        case 1: _tile_stored(5, c_buf, kInt8PanelRows * sizeof(int32_t)); break;
        case 2: _tile_stored(6, c_buf, kInt8PanelRows * sizeof(int32_t)); break;
        default: _tile_stored(7, c_buf, kInt8PanelRows * sizeof(int32_t)); break;
      }
      Epilogue(c_buf, rn, cn, sx + r0, sw + c0, y + r0 * ldy + c0, ldy);
    }
  }
}

// The K-blocked schedule for whole 32-row blocks x whole panel pairs, as in gemm_bf16_amx.cc: loops run K
// block (kb) -> 32-row block -> panel pair, so the 32 x kb block of A (32 KiB at kb = 1024) is reused from
// L1 by every panel pair and the kb slice of the call's panels from L2 by every row block. The int32 partial
// sums wait in y's own memory between K blocks (same 4 bytes per element) and get the fp32 epilogue,
// in place, after the last one.
void KBlocked(size_t kb, size_t rows, size_t pairs, size_t k, const int8_t* qx, size_t ldqx,
              const float* sx, const int8_t* panel0, size_t stride, const float* sw, float* y, size_t ldy) {
  const size_t row_blocks = rows / 32;
  const size_t ldy_bytes = ldy * sizeof(float);
  int32_t* acc = reinterpret_cast<int32_t*>(y);
  for (size_t k0b = 0; k0b < k; k0b += kb) {
    const size_t k1b = MinSize(k, k0b + kb);
    const bool first = k0b == 0;
    for (size_t rb = 0; rb < row_blocks; ++rb) {
      const int8_t* xr = qx + rb * 32 * ldqx;
      int32_t* yr = acc + rb * 32 * ldy;
      for (size_t pp = 0; pp < pairs; ++pp) {
        const int8_t* b0 = panel0 + 2 * pp * stride;
        const int8_t* b1 = b0 + stride;
        int32_t* yc = yr + pp * 2 * kInt8PanelRows;
        if (first) {
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
        } else {
          _tile_loadd(4, yc, ldy_bytes);
          _tile_loadd(5, yc + kInt8PanelRows, ldy_bytes);
          _tile_loadd(6, yc + kTileRows * ldy, ldy_bytes);
          _tile_loadd(7, yc + kTileRows * ldy + kInt8PanelRows, ldy_bytes);
        }
        for (size_t k0 = k0b; k0 < k1b; k0 += kTileK) {
          _tile_loadd(0, xr + k0, ldqx);
          _tile_loadd(1, xr + kTileRows * ldqx + k0, ldqx);
          _tile_loadd(2, b0 + k0 * kInt8PanelRows, 64);  // quad-row k0/4, 64 bytes each
          _tile_loadd(3, b1 + k0 * kInt8PanelRows, 64);
          _tile_dpbssd(4, 0, 2);
          _tile_dpbssd(5, 0, 3);
          _tile_dpbssd(6, 1, 2);
          _tile_dpbssd(7, 1, 3);
        }
        _tile_stored(4, yc, ldy_bytes);
        _tile_stored(5, yc + kInt8PanelRows, ldy_bytes);
        _tile_stored(6, yc + kTileRows * ldy, ldy_bytes);
        _tile_stored(7, yc + kTileRows * ldy + kInt8PanelRows, ldy_bytes);
      }
    }
  }
  // Epilogue in place: each row's int32 sums become fp32 (the load happens before the store of the same
  // 64 bytes, so the aliasing is harmless).
  const size_t cols = pairs * 2 * kInt8PanelRows;
  for (size_t r = 0; r < rows; ++r) {
    const __m512 x_scale = _mm512_set1_ps(sx[r]);
    for (size_t c = 0; c < cols; c += kInt8PanelRows) {
      const __m512 scale = _mm512_mul_ps(x_scale, _mm512_loadu_ps(sw + c));
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + r * ldy + c));
      _mm512_storeu_ps(y + r * ldy + c, _mm512_mul_ps(scale, dot));
    }
  }
}

}  // namespace

void GemmInt8AmxKBlocked(size_t kb, size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                         const int8_t* panels, const float* w_scales, const int32_t* w_rowsums,
                         size_t n_cols, float* y, size_t ldy) {
  if (m < kAmxInt8MinRows) {
    GemmInt8Vnni(m, k, qx, ldqx, sx, panels, w_scales, w_rowsums, n_cols, y, ldy);
    return;
  }
  ConfigureFullTiles();
  kb = (kb + kTileK - 1) / kTileK * kTileK;
  const size_t stride = Int8PanelStride(k);
  const size_t num_panels = Int8NumPanels(n_cols);
  // Whole panel pairs x whole 32-row blocks take the K-blocked schedule (K must split into whole A tiles);
  // the rest the plain 32 x 32 blocks.
  const bool blocked = kb > 0 && k % kTileK == 0;
  const size_t full_pairs = blocked ? n_cols / (2 * kInt8PanelRows) : 0;
  const size_t m_full = blocked ? m / 32 * 32 : 0;
  if (full_pairs > 0 && m_full > 0) {
    KBlocked(kb, m_full, full_pairs, k, qx, ldqx, sx, panels, stride, w_scales, y, ldy);
  }
  for (size_t p = 0; p < num_panels; p += 2) {
    const size_t np = MinSize(2, num_panels - p);
    const size_t c0 = p * kInt8PanelRows;
    const size_t cols = MinSize(n_cols - c0, np * kInt8PanelRows);
    for (size_t i = p / 2 < full_pairs ? m_full : 0; i < m; i += 2 * kTileRows) {
      const size_t rows = MinSize(2 * kTileRows, m - i);
      Block(rows, np, k, qx + i * ldqx, ldqx, sx + i, panels + p * stride, stride, w_scales + c0,
            y + i * ldy + c0, ldy, cols);
    }
  }
  _tile_release();
}

void GemmInt8Amx(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                 const int8_t* panels, const float* w_scales, const int32_t* w_rowsums, size_t n_cols,
                 float* y, size_t ldy) {
  // Not K-blocked: with row strides that do not alias in L1 (the MoE layer pads them), the unblocked
  // schedule measured faster in every MoE task shape on the AMX host; K blocking won only on some shapes
  // with unpadded rows. The schedule stays, tested, for `kt bench --sweep-tiling`
  // (docs/perf-log/2026-11-27-int8.md).
  GemmInt8AmxKBlocked(0, m, k, qx, ldqx, sx, panels, w_scales, w_rowsums, n_cols, y, ldy);
}

}  // namespace internal
}  // namespace kt
