// Packing, unpacking, the scalar paths and the path tables of the MX GEMMs.
#include "kt/kernels/gemm_mx.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kt/kernels/fp8.h"
#include "kt/kernels/mx.h"

namespace kt {
namespace {

// The element value of code byte `b` of a panel row: fp4 holds k = 2j (low nibble) and 2j + 1 (high).
inline float Element(bool fp4, const uint8_t* panel, size_t c, size_t r) {
  if (!fp4) return Fp8E4M3ToF32(panel[c * kMxPanelRows + r]);
  return E2M1ToF32(static_cast<uint8_t>(panel[(c / 2) * kMxPanelRows + r] >> (4 * (c & 1))));
}

// Scalar path: per 32-k block fp32 products of exact values summed in k order, block sum * scale added to
// the total (the vector paths' arithmetic, up to FMA contraction).
template <bool kFp4>
void GemmMxScalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const uint8_t* scales,
                  size_t n_cols, float* y, size_t ldy) {
  const size_t stride = MxPanelStride(kFp4, k), blocks = k / kMxBlockK;
  for (size_t p = 0; p * kMxPanelRows < n_cols; ++p) {
    const uint8_t* panel = panels + p * stride;
    const uint8_t* ps = scales + p * kMxPanelRows * blocks;
    const size_t rows = std::min(kMxPanelRows, n_cols - p * kMxPanelRows);
    for (size_t i = 0; i < m; ++i) {
      const bf16_t* xr = x + i * ldx;
      float acc[kMxPanelRows] = {};
      for (size_t b = 0; b < blocks; ++b) {
        float part[kMxPanelRows] = {};
        for (size_t c = b * kMxBlockK; c < (b + 1) * kMxBlockK; ++c) {
          const float xv = Bf16ToF32(xr[c]);
          for (size_t r = 0; r < kMxPanelRows; ++r) part[r] += xv * Element(kFp4, panel, c, r);
        }
        for (size_t r = 0; r < kMxPanelRows; ++r) acc[r] += part[r] * E8M0ToF32(ps[b * kMxPanelRows + r]);
      }
      std::memcpy(y + i * ldy + p * kMxPanelRows, acc, rows * sizeof(float));
    }
  }
}

}  // namespace

absl::Status PackMx(const QuantizedMatrix& qm, uint8_t* panels, uint8_t* scales) {
  if (!IsMxFormat(qm.spec.format) || qm.spec.group_size != 0 || qm.k % kMxBlockK != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PackMx needs a kt-mxfp4-v1 or kt-mxfp8-v1 matrix with K a "
                                                   "multiple of 32, got ", QuantFormatName(qm.spec.format),
                                                   " with group_size ", qm.spec.group_size, ", K = ", qm.k));
  }
  const bool fp4 = qm.spec.format == QuantFormat::kMxfp4;
  const size_t n = qm.n, k = qm.k, blocks = k / kMxBlockK, row_bytes = fp4 ? k / 2 : k;
  if (qm.data.size() != n * row_bytes || qm.scales.size() != n * blocks) {
    return absl::InvalidArgumentError(absl::StrCat("PackMx: a ", n, " x ", k, " matrix has ", qm.data.size(),
                                                   " code bytes and ", qm.scales.size(), " scales, expected ",
                                                   n * row_bytes, " and ", n * blocks));
  }
  const size_t stride = MxPanelStride(fp4, k);
  for (size_t p = 0; p < MxNumPanels(n); ++p) {
    uint8_t* panel = panels + p * stride;
    uint8_t* ps = scales + p * kMxPanelRows * blocks;
    for (size_t r = 0; r < kMxPanelRows; ++r) {
      const size_t row = p * kMxPanelRows + r;
      for (size_t c = 0; c < row_bytes; ++c) panel[c * kMxPanelRows + r] = row < n ? qm.data[row * row_bytes + c] : 0;
      for (size_t b = 0; b < blocks; ++b) {
        uint8_t e = 127;
        if (row < n && !F32ToE8M0(qm.scales[row * blocks + b], &e)) {
          return absl::InvalidArgumentError(absl::StrCat("PackMx: the scale of row ", row, " block ", b, " is ",
                                                         qm.scales[row * blocks + b],
                                                         ", expected a power of two in [2^-127, 2^127] (E8M0)"));
        }
        ps[b * kMxPanelRows + r] = e;
      }
    }
  }
  return absl::OkStatus();
}

void UnpackMxToBf16(bool fp4, size_t n, size_t k, const uint8_t* panels, const uint8_t* scales, bool transposed,
                    bf16_t* w, size_t ldw) {
  const size_t stride = MxPanelStride(fp4, k), blocks = k / kMxBlockK;
  for (size_t p = 0; p < MxNumPanels(n); ++p) {
    const uint8_t* panel = panels + p * stride;
    const uint8_t* ps = scales + p * kMxPanelRows * blocks;
    const size_t rows = std::min(kMxPanelRows, n - p * kMxPanelRows);
    for (size_t c = 0; c < k; ++c) {
      const uint8_t* s = ps + (c / kMxBlockK) * kMxPanelRows;
      for (size_t r = 0; r < rows; ++r) {
        const bf16_t v = F32ToBf16(Element(fp4, panel, c, r) * E8M0ToF32(s[r]));
        const size_t row = p * kMxPanelRows + r;
        if (transposed) {
          w[c * ldw + row] = v;
        } else {
          w[row * ldw + c] = v;
        }
      }
    }
  }
}

namespace internal {
void GemmMxfp4Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels,
                     const uint8_t* scales, size_t n_cols, float* y, size_t ldy) {
  GemmMxScalar<true>(m, k, x, ldx, panels, scales, n_cols, y, ldy);
}
void GemmMxfp8Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels,
                     const uint8_t* scales, size_t n_cols, float* y, size_t ldy) {
  GemmMxScalar<false>(m, k, x, ldx, panels, scales, n_cols, y, ldy);
}
}  // namespace internal

const GemmPaths<GemmMxFn>& GemmMxfp4Paths() {
  // Built on first use: the Highway entries come from another translation unit.
  static const auto* const paths = new GemmPaths<GemmMxFn>(CompiledGemmPaths<GemmMxFn>({
      {"scalar", Isa::kScalar, &internal::GemmMxfp4Scalar},
      {"hwy_avx2", Isa::kAvx2, internal::GemmMxHwy(true, Isa::kAvx2)},
      {"hwy_avx512", Isa::kAvx512, internal::GemmMxHwy(true, Isa::kAvx512)},
      {"hwy_avx512_vnni", Isa::kAvx512Vnni, internal::GemmMxHwy(true, Isa::kAvx512Vnni)},
  }));
  return *paths;
}

const GemmPaths<GemmMxFn>& GemmMxfp8Paths() {
  static const auto* const paths = new GemmPaths<GemmMxFn>(CompiledGemmPaths<GemmMxFn>({
      {"scalar", Isa::kScalar, &internal::GemmMxfp8Scalar},
      {"hwy_avx2", Isa::kAvx2, internal::GemmMxHwy(false, Isa::kAvx2)},
      {"hwy_avx512", Isa::kAvx512, internal::GemmMxHwy(false, Isa::kAvx512)},
      {"hwy_avx512_vnni", Isa::kAvx512Vnni, internal::GemmMxHwy(false, Isa::kAvx512Vnni)},
  }));
  return *paths;
}

GemmMxFn GetGemmMx(bool fp4, Isa isa) { return SelectGemmPath(fp4 ? GemmMxfp4Paths() : GemmMxfp8Paths(), isa); }

}  // namespace kt
