// Packing, activation sums, the reference, the scalar path and the per-Isa kernel table for the INT4 GEMM.
#include "kt/kernels/gemm_int4.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace kt {
namespace {

// Canonical nibble of element kk of a row (low nibble for even kk).
inline uint8_t Nibble(const uint8_t* row, size_t kk) {
  const uint8_t byte = row[kk / 2];
  return (kk & 1) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0xF);
}

}  // namespace

absl::Status PackInt4(const QuantizedMatrix& qm, uint8_t* panels, float* scales, uint8_t* zeros) {
  const QuantSpec& spec = qm.spec;
  if (!IsInt4Format(spec.format)) {
    return absl::InvalidArgumentError(
        absl::StrCat("PackInt4 needs an int4 format, got ", QuantFormatName(spec.format)));
  }
  if (absl::Status s = ValidateQuantSpec(spec, qm.k); !s.ok()) return s;
  const size_t groups = ScalesPerRow(spec, qm.k);
  const size_t row_bytes = QuantizedRowBytes(spec, qm.k);
  const bool asym = IsAsymFormat(spec.format);
  if (qm.data.size() != qm.n * row_bytes || qm.scales.size() != qm.n * groups ||
      qm.zeros.size() != (asym ? qm.n * groups : 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "malformed ", QuantLayoutTag(spec), " matrix: N = ", qm.n, ", K = ", qm.k, ", data bytes = ",
        qm.data.size(), " (want ", qm.n * row_bytes, "), scales = ", qm.scales.size(), " (want ",
        qm.n * groups, "), zeros = ", qm.zeros.size(), " (want ", asym ? qm.n * groups : 0, ")"));
  }
  if (qm.k >= kInt4MaxK) {
    return absl::InvalidArgumentError(
        absl::StrCat("K = ", qm.k, " is too large for exact int32 accumulation (limit ", kInt4MaxK, ")"));
  }
  if (asym && zeros == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("PackInt4: ", QuantFormatName(spec.format), " needs a zero-point buffer, got null"));
  }
  const size_t n = qm.n, k = qm.k;
  const size_t stride = Int4PanelStride(k);
  std::memset(panels, 0, PackedInt4Bytes(n, k));
  // Whole blocks of 8 k a word at a time: the row's 4 canonical bytes of block b hold nibbles n0..n7 of
  // k = 8b..8b+7 (n_i at bit 4i); the packed block wants byte j = n_j | n_{j+4} << 4. Spreading the low and
  // high 16 bits over 4 bytes does that with shifts and masks; the per-nibble loop below handles only the
  // K tail (done per nibble for every k, it would bound the load of a converted int4 layer).
  const uint32_t flip = asym ? 0u : 0x88888888u;  // u = q + 8: bit 3 of every nibble flipped
  auto spread = [](uint32_t x) {  // 16 bits n3 n2 n1 n0 -> bytes n0, n1, n2, n3
    x = (x | (x << 8)) & 0x00FF00FFu;
    return (x | (x << 4)) & 0x0F0F0F0Fu;
  };
  const size_t full_blocks = k / 8;
  for (size_t row = 0; row < n; ++row) {
    const uint8_t* src = qm.data.data() + row * row_bytes;
    uint8_t* panel = panels + (row / kInt4PanelRows) * stride;
    const size_t r = row % kInt4PanelRows;
    for (size_t b = 0; b < full_blocks; ++b) {
      uint32_t w;
      std::memcpy(&w, src + 4 * b, 4);
      w ^= flip;
      const uint32_t out = spread(w & 0xFFFFu) | (spread(w >> 16) << 4);
      std::memcpy(panel + b * 64 + 4 * r, &out, 4);
    }
    for (size_t kk = full_blocks * 8; kk < k; ++kk) {
      // Symmetric nibbles are two's complement q in [-7, 7]; u = q + 8 is the nibble with bit 3 flipped.
      const uint8_t u = asym ? Nibble(src, kk) : static_cast<uint8_t>(Nibble(src, kk) ^ 0x8);
      const size_t b = kk / 8, j = kk % 4, high = (kk % 8) / 4;
      panel[b * 64 + 4 * r + j] |= static_cast<uint8_t>(u << (4 * high));
    }
  }
  const size_t entries = PackedInt4Scales(n, k, Int4KernelGroup(spec));
  for (size_t e = 0; e < entries; ++e) {
    const size_t p = e / (kInt4PanelRows * groups), g = (e / kInt4PanelRows) % groups;
    const size_t row = p * kInt4PanelRows + e % kInt4PanelRows;
    scales[e] = row < n ? qm.scales[row * groups + g] : 0.0f;
    if (zeros != nullptr) zeros[e] = (asym && row < n) ? qm.zeros[row * groups + g] : uint8_t{0};
  }
  return absl::OkStatus();
}

QuantizedMatrix UnpackInt4(const QuantSpec& spec, size_t n, size_t k, const uint8_t* panels,
                           const float* scales, const uint8_t* zeros) {
  QuantizedMatrix qm;
  qm.spec = spec;
  qm.n = n;
  qm.k = k;
  const size_t groups = ScalesPerRow(spec, k);
  const size_t row_bytes = QuantizedRowBytes(spec, k);
  const bool asym = IsAsymFormat(spec.format);
  qm.data.assign(n * row_bytes, 0);
  qm.scales.resize(n * groups);
  if (asym) qm.zeros.resize(n * groups);
  const size_t stride = Int4PanelStride(k);
  for (size_t row = 0; row < n; ++row) {
    const uint8_t* panel = panels + (row / kInt4PanelRows) * stride;
    const size_t p = row / kInt4PanelRows, r = row % kInt4PanelRows;
    for (size_t kk = 0; kk < k; ++kk) {
      const size_t b = kk / 8, j = kk % 4, high = (kk % 8) / 4;
      uint8_t u = (panel[b * 64 + 4 * r + j] >> (4 * high)) & 0xF;
      if (!asym) u ^= 0x8;
      qm.data[row * row_bytes + kk / 2] |= static_cast<uint8_t>(u << (4 * (kk & 1)));
    }
    for (size_t g = 0; g < groups; ++g) {
      const size_t e = (p * groups + g) * kInt4PanelRows + r;
      qm.scales[row * groups + g] = scales[e];
      if (asym) qm.zeros[row * groups + g] = zeros[e];
    }
  }
  return qm;
}

void Int4ActivationSums(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, int32_t* xsum) {
  const size_t groups = Int4Groups(k, group);
  const size_t len = group == 0 ? k : group;
  for (size_t i = 0; i < m; ++i) {
    for (size_t g = 0; g < groups; ++g) {
      int32_t s = 0;
      for (size_t kk = g * len; kk < (g + 1) * len; ++kk) s += qx[i * ldqx + kk];
      xsum[i * groups + g] = s;
    }
  }
}

namespace internal {

// Scalar path over the packed layout: the integer sums and the fp32 epilogue every path evaluates.
void GemmInt4Scalar(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx,
                    const int32_t* xsum, const uint8_t* panels, const float* w_scales,
                    const uint8_t* w_zeros, size_t n_cols, float* y, size_t ldy) {
  const size_t groups = Int4Groups(k, group);
  const size_t blocks = KBlocks8(k);
  const size_t blocks_per_group = group == 0 ? blocks : group / 8;
  const size_t stride = Int4PanelStride(k);
  for (size_t p = 0; p * kInt4PanelRows < n_cols; ++p) {
    const uint8_t* panel = panels + p * stride;
    const size_t rows = std::min(kInt4PanelRows, n_cols - p * kInt4PanelRows);
    for (size_t i = 0; i < m; ++i) {
      const int8_t* xr = qx + i * ldqx;
      float out[kInt4PanelRows] = {};
      for (size_t g = 0; g < groups; ++g) {
        int32_t acc[kInt4PanelRows] = {};
        for (size_t b = g * blocks_per_group; b < std::min(blocks, (g + 1) * blocks_per_group); ++b) {
          int32_t x8[8];
          for (size_t j = 0; j < 8; ++j) x8[j] = (8 * b + j < k) ? xr[8 * b + j] : 0;  // no over-read
          const uint8_t* wb = panel + b * 64;
          for (size_t r = 0; r < kInt4PanelRows; ++r) {
            for (size_t j = 0; j < 4; ++j) {
              const uint8_t byte = wb[4 * r + j];
              acc[r] += (byte & 0xF) * x8[j] + (byte >> 4) * x8[4 + j];
            }
          }
        }
        const float* sw = w_scales + (p * groups + g) * kInt4PanelRows;
        const uint8_t* zw = w_zeros ? w_zeros + (p * groups + g) * kInt4PanelRows : nullptr;
        const int32_t xs = xsum[i * groups + g];
        const float sxg = sx[i * groups + g];
        for (size_t r = 0; r < kInt4PanelRows; ++r) {
          const int32_t z = zw ? zw[r] : kInt4SymZero;
          const float t = (sxg * sw[r]) * static_cast<float>(acc[r] - z * xs);
          out[r] = g == 0 ? t : out[r] + t;
        }
      }
      std::copy(out, out + rows, y + i * ldy + p * kInt4PanelRows);
    }
  }
}

}  // namespace internal

const GemmPaths<GemmInt4Fn>& GemmInt4Paths() {
  // Built on first use: the Highway entries come from another translation unit.
  static const auto* const paths = new GemmPaths<GemmInt4Fn>(CompiledGemmPaths<GemmInt4Fn>({
      {"scalar", Isa::kScalar, &internal::GemmInt4Scalar},
      {"hwy_avx2", Isa::kAvx2, internal::GemmInt4Hwy(Isa::kAvx2)},
      {"hwy_avx512", Isa::kAvx512, internal::GemmInt4Hwy(Isa::kAvx512)},
      {"hwy_avx512_vnni", Isa::kAvx512Vnni, internal::GemmInt4Hwy(Isa::kAvx512Vnni)},
      {"vnni", Isa::kAvx512Vnni, &internal::GemmInt4Vnni},
      {"amx", Isa::kAmx, &internal::GemmInt4Amx},
  }));
  return *paths;
}

GemmInt4Fn GetGemmInt4(Isa isa) { return SelectGemmPath(GemmInt4Paths(), isa); }

}  // namespace kt
