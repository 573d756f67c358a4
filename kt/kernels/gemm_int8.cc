// Packing, the reference, the scalar path and the per-Isa kernel table for the INT8 GEMM.
#include "kt/kernels/gemm_int8.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace kt {

void PackInt8(const int8_t* q, size_t ldq, const float* scales, size_t n, size_t k, int8_t* panels,
              float* packed_scales, int32_t* rowsums) {
  const size_t kquads = KQuads(k);
  const size_t full_quads = k / 4;
  const size_t stride = Int8PanelStride(k);
  // Row by row: each row's whole quads move as 4-byte words to their slots 64 bytes apart (a load pass
  // over the row, the packed panel written in place), the ragged last quad and padding rows byte-wise
  // zero-filled; the row sum comes from the same pass. Loading a converted int8 layer spends its time here.
  for (size_t row = 0; row < PackedInt8Rows(n); ++row) {
    int8_t* base = panels + (row / kInt8PanelRows) * stride + (row % kInt8PanelRows) * 4;
    int32_t sum = 0;
    if (row < n) {
      const int8_t* src = q + row * ldq;
      for (size_t kq = 0; kq < full_quads; ++kq) {
        std::memcpy(base + kq * kInt8PanelRows * 4, src + 4 * kq, 4);
      }
      for (size_t kk = 0; kk < k; ++kk) sum += src[kk];
      for (size_t kq = full_quads; kq < kquads; ++kq) {
        int8_t* dst = base + kq * kInt8PanelRows * 4;
        for (size_t j = 0; j < 4; ++j) dst[j] = 4 * kq + j < k ? src[4 * kq + j] : int8_t{0};
      }
    } else {
      for (size_t kq = 0; kq < kquads; ++kq) std::memset(base + kq * kInt8PanelRows * 4, 0, 4);
    }
    rowsums[row] = sum;
    packed_scales[row] = row < n ? scales[row] : 0.0f;
  }
}

absl::Status PackInt8(const QuantizedMatrix& qm, int8_t* panels, float* packed_scales, int32_t* rowsums) {
  if (qm.spec.format != QuantFormat::kInt8PerChannel || qm.spec.group_size != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("PackInt8 needs kt-int8-channel-v1, got ", QuantFormatName(qm.spec.format),
                     " with group_size = ", qm.spec.group_size));
  }
  if (qm.data.size() != qm.n * qm.k || qm.scales.size() != qm.n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "malformed int8_channel matrix: N = ", qm.n, ", K = ", qm.k, ", data bytes = ", qm.data.size(),
        " (want N*K), scales = ", qm.scales.size(), " (want N)"));
  }
  if (qm.k >= kInt8MaxK) {
    return absl::InvalidArgumentError(
        absl::StrCat("K = ", qm.k, " is too large for exact int32 accumulation (limit ", kInt8MaxK, ")"));
  }
  PackInt8(reinterpret_cast<const int8_t*>(qm.data.data()), qm.k, qm.scales.data(), qm.n, qm.k, panels,
           packed_scales, rowsums);
  return absl::OkStatus();
}

void UnpackInt8(const int8_t* panels, const float* packed_scales, size_t n, size_t k, int8_t* q,
                size_t ldq, float* scales) {
  const size_t stride = Int8PanelStride(k);
  for (size_t row = 0; row < n; ++row) {
    const int8_t* panel = panels + (row / kInt8PanelRows) * stride;
    const size_t r = row % kInt8PanelRows;
    for (size_t kk = 0; kk < k; ++kk) {
      q[row * ldq + kk] = panel[((kk / 4) * kInt8PanelRows + r) * 4 + (kk % 4)];
    }
    scales[row] = packed_scales[row];
  }
}

namespace internal {

// Scalar path over the packed layout: int32 accumulation, then the same fp32 epilogue as every path.
void GemmInt8Scalar(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                    const int8_t* panels, const float* w_scales, const int32_t* /*w_rowsums*/,
                    size_t n_cols, float* y, size_t ldy) {
  const size_t kquads = KQuads(k);
  const size_t stride = Int8PanelStride(k);
  for (size_t p = 0; p * kInt8PanelRows < n_cols; ++p) {
    const int8_t* panel = panels + p * stride;
    const float* sw = w_scales + p * kInt8PanelRows;
    const size_t rows = std::min(kInt8PanelRows, n_cols - p * kInt8PanelRows);
    for (size_t i = 0; i < m; ++i) {
      int32_t acc[kInt8PanelRows] = {};
      const int8_t* xr = qx + i * ldqx;
      for (size_t kq = 0; kq < kquads; ++kq) {
        int32_t xq[4];
        for (size_t j = 0; j < 4; ++j) xq[j] = (4 * kq + j < k) ? xr[4 * kq + j] : 0;  // no over-read
        const int8_t* wq = panel + kq * kInt8PanelRows * 4;
        for (size_t r = 0; r < kInt8PanelRows; ++r) {
          acc[r] += xq[0] * wq[4 * r] + xq[1] * wq[4 * r + 1] + xq[2] * wq[4 * r + 2] +
                    xq[3] * wq[4 * r + 3];
        }
      }
      float* yr = y + i * ldy + p * kInt8PanelRows;
      for (size_t r = 0; r < rows; ++r) yr[r] = (sx[i] * sw[r]) * static_cast<float>(acc[r]);
    }
  }
}

}  // namespace internal

const GemmPaths<GemmInt8Fn>& GemmInt8Paths() {
  // Built on first use: the Highway entries come from another translation unit.
  static const auto* const paths = new GemmPaths<GemmInt8Fn>(CompiledGemmPaths<GemmInt8Fn>({
      {"scalar", Isa::kScalar, &internal::GemmInt8Scalar},
      {"hwy_avx2", Isa::kAvx2, internal::GemmInt8Hwy(Isa::kAvx2)},
      {"hwy_avx512", Isa::kAvx512, internal::GemmInt8Hwy(Isa::kAvx512)},
      {"hwy_avx512_vnni", Isa::kAvx512Vnni, internal::GemmInt8Hwy(Isa::kAvx512Vnni)},
      {"vnni", Isa::kAvx512Vnni, &internal::GemmInt8Vnni},
      {"amx", Isa::kAmx, &internal::GemmInt8Amx},
  }));
  return *paths;
}

GemmInt8Fn GetGemmInt8(Isa isa) { return SelectGemmPath(GemmInt8Paths(), isa); }

}  // namespace kt
