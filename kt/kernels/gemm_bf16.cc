// Packing, the scalar paths and the per-Isa kernel table for the BF16 GEMM.
#include "kt/kernels/gemm_bf16.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace kt {

void PackBf16(const bf16_t* w, size_t ldw, size_t n, size_t k, bf16_t* packed) {
  const size_t kpairs = KPairs(k);
  const size_t stride = PanelStride(k);
  for (size_t p = 0; p < NumPanels(n); ++p) {
    bf16_t* panel = packed + p * stride;
    for (size_t kp = 0; kp < kpairs; ++kp) {
      for (size_t r = 0; r < kPanelRows; ++r) {
        const size_t row = p * kPanelRows + r;
        bf16_t* dst = panel + (kp * kPanelRows + r) * 2;
        const size_t k0 = 2 * kp;
        dst[0] = (row < n) ? w[row * ldw + k0] : bf16_t{0};
        dst[1] = (row < n && k0 + 1 < k) ? w[row * ldw + k0 + 1] : bf16_t{0};
      }
    }
  }
}

void UnpackBf16(const bf16_t* packed, size_t n, size_t k, bf16_t* w, size_t ldw) {
  // Tiles of 64 pair-rows (4 KB of a panel) are read for all 16 rows while in L1: a row at a time over the
  // whole panel would stream it from L2 16 times (a 7168-wide panel is 229 KB). Each pair is one 4-byte move.
  constexpr size_t kTilePairs = 64;
  const size_t stride = PanelStride(k), full_pairs = k / 2;
  for (size_t q = 0; q * kPanelRows < n; ++q) {
    const bf16_t* panel = packed + q * stride;
    const size_t rows = std::min(kPanelRows, n - q * kPanelRows);
    for (size_t p0 = 0; p0 < full_pairs; p0 += kTilePairs) {
      const size_t p1 = std::min(p0 + kTilePairs, full_pairs);
      for (size_t r = 0; r < rows; ++r) {
        bf16_t* out = w + (q * kPanelRows + r) * ldw;
        for (size_t p = p0; p < p1; ++p) std::memcpy(out + 2 * p, panel + (p * kPanelRows + r) * 2, 2 * sizeof(bf16_t));
      }
    }
    if (k % 2 != 0) {  // the last k sits alone in its pair
      for (size_t r = 0; r < rows; ++r) w[(q * kPanelRows + r) * ldw + k - 1] = panel[(full_pairs * kPanelRows + r) * 2];
    }
  }
}

void TransposePackedBf16(const bf16_t* packed, size_t n, size_t k, bf16_t* packed_t) {
  const size_t src_stride = PanelStride(k), dst_stride = PanelStride(n);
  const bool whole = n % kPanelRows == 0 && k % kPanelRows == 0;
  if (!whole) std::memset(packed_t, 0, PackedBf16Size(k, n) * sizeof(bf16_t));
  for (size_t q = 0; q < NumPanels(n); ++q) {      // source panel: rows [16q, 16q + 16) of W
    for (size_t b = 0; b < NumPanels(k); ++b) {    // columns [16b, 16b + 16) of W: destination panel b
      const bf16_t* src = packed + q * src_stride + b * 8 * 2 * kPanelRows;
      bf16_t* dst = packed_t + b * dst_stride + q * 8 * 2 * kPanelRows;
      if ((q + 1) * kPanelRows <= n && (b + 1) * kPanelRows <= k) {
        // Source word (s, g) = elements 4g..4g+3 of pair-row s = {W[2g][2s], W[2g][2s+1], W[2g+1][2s],
        // W[2g+1][2s+1]} (block-relative); destination word (j, g') must hold {T[2g'][2j], T[2g'][2j+1],
        // T[2g'+1][2j], T[2g'+1][2j+1]} = {W[2j][2g'], W[2j+1][2g'], W[2j][2g'+1], W[2j+1][2g'+1]}: source
        // word (g', j) with its elements 1 and 2 swapped (little endian: bits 16-31 and 32-47).
        uint64_t in[64], out[64];
        std::memcpy(in, src, sizeof(in));
        for (size_t j = 0; j < 8; ++j) {
          for (size_t g = 0; g < 8; ++g) {
            const uint64_t x = in[g * 8 + j];
            out[j * 8 + g] = (x & 0xFFFF00000000FFFFull) | ((x >> 16) & 0x00000000FFFF0000ull) |
                             ((x << 16) & 0x0000FFFF00000000ull);
          }
        }
        std::memcpy(dst, out, sizeof(out));
        continue;
      }
      // Partial block: T[c][r] = W[r][c] for the real rows r < n and columns c < k only.
      for (size_t r = q * kPanelRows; r < std::min(n, (q + 1) * kPanelRows); ++r) {
        for (size_t c = b * kPanelRows; c < std::min(k, (b + 1) * kPanelRows); ++c) {
          const bf16_t v = packed[q * src_stride + ((c / 2) * kPanelRows + r % kPanelRows) * 2 + (c & 1)];
          packed_t[b * dst_stride + ((r / 2) * kPanelRows + c % kPanelRows) * 2 + (r & 1)] = v;
        }
      }
    }
  }
}

namespace internal {

// Scalar path over the packed layout: fp32 accumulation in the same pair order as the vector paths.
void GemmBf16Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels,
                    size_t n_cols, float* y, size_t ldy) {
  const size_t kpairs = KPairs(k);
  const size_t stride = PanelStride(k);
  for (size_t p = 0; p * kPanelRows < n_cols; ++p) {
    const bf16_t* panel = panels + p * stride;
    const size_t rows = std::min(kPanelRows, n_cols - p * kPanelRows);
    for (size_t i = 0; i < m; ++i) {
      float acc[kPanelRows] = {};
      const bf16_t* xr = x + i * ldx;
      for (size_t kp = 0; kp < kpairs; ++kp) {
        const float x0 = Bf16ToF32(xr[2 * kp]);
        const float x1 = (2 * kp + 1 < k) ? Bf16ToF32(xr[2 * kp + 1]) : 0.0f;
        const bf16_t* wp = panel + kp * kPanelRows * 2;
        for (size_t r = 0; r < kPanelRows; ++r) {
          acc[r] += x0 * Bf16ToF32(wp[2 * r]) + x1 * Bf16ToF32(wp[2 * r + 1]);
        }
      }
      std::memcpy(y + i * ldy + p * kPanelRows, acc, rows * sizeof(float));
    }
  }
}

}  // namespace internal

const GemmPaths<GemmBf16Fn>& GemmBf16Paths() {
  // Built on first use: the Highway entries come from another translation unit.
  static const auto* const paths = new GemmPaths<GemmBf16Fn>(CompiledGemmPaths<GemmBf16Fn>({
      {"scalar", Isa::kScalar, &internal::GemmBf16Scalar},
      {"hwy_avx2", Isa::kAvx2, internal::GemmBf16Hwy(Isa::kAvx2)},
      {"hwy_avx512", Isa::kAvx512, internal::GemmBf16Hwy(Isa::kAvx512)},
      {"hwy_avx512_vnni", Isa::kAvx512Vnni, internal::GemmBf16Hwy(Isa::kAvx512Vnni)},
      {"avx512_bf16", Isa::kAvx512Bf16, &internal::GemmBf16Avx512Bf16},
      {"amx", Isa::kAmx, &internal::GemmBf16Amx},
  }));
  return *paths;
}

GemmBf16Fn GetGemmBf16(Isa isa) { return SelectGemmPath(GemmBf16Paths(), isa); }

}  // namespace kt
