// Packing, unpacking, the scalar path and the path table of the FP8 block-scaled GEMM.
#include "kt/kernels/gemm_fp8.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "absl/strings/str_cat.h"
#include "kt/kernels/fp8.h"
#include "kt/kernels/gemm_bf16.h"

namespace kt {

absl::Status PackFp8(const QuantizedMatrix& qm, uint8_t* panels, float* scales) {
  if (qm.spec.format != QuantFormat::kFp8Block128 || qm.spec.group_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat("PackFp8 needs a kt-fp8-block128-v1 matrix, got ",
                                                   QuantFormatName(qm.spec.format), " with group_size ",
                                                   qm.spec.group_size));
  }
  const size_t n = qm.n, k = qm.k, blocks = Fp8KBlocks(k);
  if (qm.data.size() != n * k || qm.scales.size() != n * blocks) {
    return absl::InvalidArgumentError(absl::StrCat("PackFp8: a ", n, " x ", k, " matrix has ", qm.data.size(),
                                                   " codes and ", qm.scales.size(), " scales, expected ", n * k,
                                                   " and ", n * blocks));
  }
  const size_t stride = Fp8PanelStride(k);
  for (size_t p = 0; p < Fp8NumPanels(n); ++p) {
    uint8_t* panel = panels + p * stride;
    float* ps = scales + p * kFp8PanelRows * blocks;
    for (size_t r = 0; r < kFp8PanelRows; ++r) {
      const size_t row = p * kFp8PanelRows + r;
      for (size_t c = 0; c < k; ++c) panel[c * kFp8PanelRows + r] = row < n ? qm.data[row * k + c] : 0;
      for (size_t b = 0; b < blocks; ++b) ps[b * kFp8PanelRows + r] = row < n ? qm.scales[row * blocks + b] : 0.0f;
    }
  }
  return absl::OkStatus();
}

void UnpackFp8ToBf16(size_t n, size_t k, const uint8_t* panels, const float* scales, bool transposed,
                     bf16_t* w, size_t ldw) {
  const size_t stride = Fp8PanelStride(k), blocks = Fp8KBlocks(k);
  // Panel order: the packed bytes are read once, in order; 16 consecutive codes (one k of 16 rows) land in
  // 16 consecutive outputs of the transposed copy.
  for (size_t p = 0; p < Fp8NumPanels(n); ++p) {
    const uint8_t* panel = panels + p * stride;
    const float* ps = scales + p * kFp8PanelRows * blocks;
    const size_t rows = std::min(kFp8PanelRows, n - p * kFp8PanelRows);
    for (size_t c = 0; c < k; ++c) {
      const float* s = ps + (c / kFp8BlockK) * kFp8PanelRows;
      for (size_t r = 0; r < rows; ++r) {
        const bf16_t v = F32ToBf16(Fp8E4M3ToF32(panel[c * kFp8PanelRows + r]) * s[r]);
        const size_t row = p * kFp8PanelRows + r;
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

bool Fp8DenormalsAreZero() {
#if defined(__SSE__)
  return (_mm_getcsr() & 0x0040u) != 0;  // MXCSR bit 6: DAZ
#else
  return false;
#endif
}

// Scalar path: the same arithmetic as the vector paths (fp32 products of exact values summed per k block,
// then block sum * scale added to the total), in k order.
void GemmFp8Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const float* scales,
                   size_t n_cols, float* y, size_t ldy) {
  float table[256];
  for (int c = 0; c < 256; ++c) table[c] = Fp8E4M3ToF32(static_cast<uint8_t>(c));
  const size_t stride = Fp8PanelStride(k), blocks = Fp8KBlocks(k);
  for (size_t p = 0; p * kFp8PanelRows < n_cols; ++p) {
    const uint8_t* panel = panels + p * stride;
    const float* ps = scales + p * kFp8PanelRows * blocks;
    const size_t rows = std::min(kFp8PanelRows, n_cols - p * kFp8PanelRows);
    for (size_t i = 0; i < m; ++i) {
      const bf16_t* xr = x + i * ldx;
      float acc[kFp8PanelRows] = {};
      for (size_t b = 0; b < blocks; ++b) {
        float part[kFp8PanelRows] = {};
        for (size_t c = b * kFp8BlockK; c < std::min(k, (b + 1) * kFp8BlockK); ++c) {
          const float xv = Bf16ToF32(xr[c]);
          for (size_t r = 0; r < kFp8PanelRows; ++r) part[r] += xv * table[panel[c * kFp8PanelRows + r]];
        }
        for (size_t r = 0; r < kFp8PanelRows; ++r) acc[r] += part[r] * ps[b * kFp8PanelRows + r];
      }
      std::memcpy(y + i * ldy + p * kFp8PanelRows, acc, rows * sizeof(float));
    }
  }
}

bool Fp8ScalesBf16Safe(const float* scales, size_t count) {
  bool safe = true;
  for (size_t i = 0; i < count; ++i) {
    const float s = std::fabs(scales[i]);
    safe &= !(s != 0.0f && s <= 0x1p-116f);
  }
  return safe;
}

void GemmFp8Amx(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const float* scales,
                size_t n_cols, float* y, size_t ldy) {
  static const GemmFp8Fn vec = GemmFp8Hwy(Isa::kAvx512Vnni);
  static const Fp8PanelsToBf16Fn portable = Fp8PanelsToBf16Hwy(Isa::kAvx512Vnni);
  // Every AMX CPU has AVX512-BF16; the check keeps a CPU that reports AMX without it correct.
  static const bool native = GetCpuFeatures().avx512_bf16 && GetCpuFeatures().os_avx512;
  if (m < kAmxMinRows || vec == nullptr || portable == nullptr) {
    // Decode reads every weight once whatever the kernel: the AVX3_DL one, with exact fp8 * scale products.
    return (vec != nullptr ? vec : &GemmFp8Scalar)(m, k, x, ldx, panels, scales, n_cols, y, ldy);
  }
  // The caller's column block (a few panels: 32-128 columns of K) as bf16 panels, reused by every row of
  // the call; 64-byte aligned as the bf16 kernels' own packed weights are.
  const size_t n_panels = Fp8NumPanels(n_cols);
  const size_t elems = n_panels * PanelStride(k);
  thread_local std::unique_ptr<bf16_t[], decltype(&std::free)> buf(nullptr, &std::free);
  thread_local size_t capacity = 0;
  if (capacity < elems) {
    const size_t bytes = (elems * sizeof(bf16_t) + 63) / 64 * 64;
    buf.reset(static_cast<bf16_t*>(std::aligned_alloc(64, bytes)));
    if (buf == nullptr) throw std::bad_alloc();
    capacity = elems;
  }
  const bool fast = native && !Fp8DenormalsAreZero() &&
                    Fp8ScalesBf16Safe(scales, n_panels * kFp8PanelRows * Fp8KBlocks(k));
  (fast ? &Fp8PanelsToBf16Avx512Bf16 : portable)(k, panels, scales, n_panels, buf.get());
  GemmBf16Amx(m, k, x, ldx, buf.get(), n_cols, y, ldy);
}

}  // namespace internal

const GemmPaths<GemmFp8Fn>& GemmFp8Paths() {
  // Built on first use: the Highway entries come from another translation unit.
  static const auto* const paths = new GemmPaths<GemmFp8Fn>(CompiledGemmPaths<GemmFp8Fn>({
      {"scalar", Isa::kScalar, &internal::GemmFp8Scalar},
      {"hwy_avx2", Isa::kAvx2, internal::GemmFp8Hwy(Isa::kAvx2)},
      {"hwy_avx512", Isa::kAvx512, internal::GemmFp8Hwy(Isa::kAvx512)},
      {"hwy_avx512_vnni", Isa::kAvx512Vnni, internal::GemmFp8Hwy(Isa::kAvx512Vnni)},
      {"amx", Isa::kAmx, &internal::GemmFp8Amx},
  }));
  return *paths;
}

GemmFp8Fn GetGemmFp8(Isa isa) { return SelectGemmPath(GemmFp8Paths(), isa); }

}  // namespace kt
