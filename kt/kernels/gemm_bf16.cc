// Packing, the scalar paths and the per-Isa kernel table for the BF16 GEMM.
#include "kt/kernels/gemm_bf16.h"

#include <algorithm>
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
  const size_t stride = PanelStride(k);
  for (size_t row = 0; row < n; ++row) {
    const bf16_t* panel = packed + (row / kPanelRows) * stride;
    const size_t r = row % kPanelRows;
    for (size_t kk = 0; kk < k; ++kk) {
      w[row * ldw + kk] = panel[((kk / 2) * kPanelRows + r) * 2 + (kk & 1)];
    }
  }
}

void GemmBf16Reference(size_t m, size_t n, size_t k, const bf16_t* x, size_t ldx, const bf16_t* w,
                       size_t ldw, float* y, size_t ldy) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (size_t kk = 0; kk < k; ++kk) {
        acc += static_cast<double>(Bf16ToF32(x[i * ldx + kk])) * Bf16ToF32(w[j * ldw + kk]);
      }
      y[i * ldy + j] = static_cast<float>(acc);
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

GemmBf16Fn GetGemmBf16(Isa isa) {
  switch (isa) {
    case Isa::kScalar:
      return &internal::GemmBf16Scalar;
    case Isa::kAvx2:
    case Isa::kAvx512:
    case Isa::kAvx512Vnni:
      return internal::GemmBf16Hwy(isa);
    case Isa::kAvx512Bf16:
      return &internal::GemmBf16Avx512Bf16;
    case Isa::kAmx:
      return &internal::GemmBf16Amx;
  }
  return nullptr;
}

}  // namespace kt
