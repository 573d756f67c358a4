// FP8 E4M3 block-scaled GEMM for expert projections: y[M,N] = x[M,K] * W[N,K]^T, bf16 activations, fp32
// accumulation, W[n][k] = fp8(q[n][k]) * scale[n][k / 128].
//
// Checkpoints (DeepSeek-V3/R1, Qwen3-FP8, MiniMax-M2) store W as E4M3 codes with one fp32 scale per 128 x 128
// block (`weight_scale_inv` [ceil(N/128), ceil(K/128)]). The canonical form (quant.h, kt-fp8-block128-v1)
// expands that to one scale per row and 128-wide k block, and the packed layout kt-fp8-panel16-kblock128-v1
// keeps the same per-row scales, so a per-channel FP8 format can share this kernel:
//   panels: per 16-row panel, K rows of 16 bytes: panel[k][r] = q[16p + r][k] (one 16-byte load gives one k
//           of all 16 rows; rows past N are code 0).
//   scales: per panel, ceil(K/128) groups of 16 fp32: scales[p][b][r] = scale of row 16p + r, k block b
//           (0 for rows past N).
// The kernels decode 16 codes of one k to fp32 in registers, FMA them with the broadcast activation into a
// per-block accumulator, and add accumulator * block scale once per 128 k. K and N may be anything; the last
// k block is shorter when K % 128 != 0.
#ifndef KT_KERNELS_GEMM_FP8_H_
#define KT_KERNELS_GEMM_FP8_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_path.h"
#include "kt/kernels/quant.h"

namespace kt {

inline constexpr size_t kFp8PanelRows = 16;
inline constexpr size_t kFp8BlockK = 128;  // k per scale block

inline constexpr size_t Fp8KBlocks(size_t k) { return (k + kFp8BlockK - 1) / kFp8BlockK; }
inline constexpr size_t Fp8NumPanels(size_t n) { return (n + kFp8PanelRows - 1) / kFp8PanelRows; }
// Bytes of one packed panel, and of a packed [N, K] matrix.
inline constexpr size_t Fp8PanelStride(size_t k) { return k * kFp8PanelRows; }
inline constexpr size_t PackedFp8Bytes(size_t n, size_t k) { return Fp8NumPanels(n) * Fp8PanelStride(k); }
// fp32 scale entries of a packed [N, K] matrix (Fp8KBlocks(K) per padded row).
inline constexpr size_t PackedFp8Scales(size_t n, size_t k) {
  return Fp8NumPanels(n) * kFp8PanelRows * Fp8KBlocks(k);
}

// Packs a kt-fp8-block128-v1 QuantizedMatrix into panels (PackedFp8Bytes) and scales (PackedFp8Scales).
// InvalidArgument if qm is not that format or its arrays do not match its shape.
absl::Status PackFp8(const QuantizedMatrix& qm, uint8_t* panels, float* scales);

// bf16 of fp8 * scale (one fp32 multiply, one rounding: Dequantize's value rounded to bf16) straight from the
// packed layout: w[N, K] with row stride ldw >= K, or with `transposed` wt[K, N] with row stride ldw >= N.
void UnpackFp8ToBf16(size_t n, size_t k, const uint8_t* panels, const float* scales, bool transposed,
                     bf16_t* w, size_t ldw);

// y[i][j] = sum_k x[i][k] * W[j][k] for i < m, j < n_cols, W's rows those of the panels at `panels` with
// their scales at `scales` (a caller covers a column range by offsetting both by whole panels). x rows have
// stride ldx (elements), y rows ldy; y is overwritten. No allocation, no threads.
using GemmFp8Fn = void (*)(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels,
                           const float* scales, size_t n_cols, float* y, size_t ldy);

// The family's paths (gemm_path.h): scalar, hwy_avx2, hwy_avx512 (AVX3), hwy_avx512_vnni (AVX3_DL), the
// Highway ones only where compiled in, and amx: prefill (m >= kAmxMinRows) converts the panels to bf16
// panels (bf16(fp8 * scale), one more rounding: at most 2^-8 relative per weight) in a per-thread buffer and
// runs the BF16 AMX kernel on them; fewer rows run the AVX3_DL kernel.
const GemmPaths<GemmFp8Fn>& GemmFp8Paths();

// The kernel of one path, SelectGemmPath over GemmFp8Paths() (every Isa has one: the AVX-512 BF16 and AMX
// Isas run the AVX3_DL kernel). The caller must have checked IsaSupported(isa, GetCpuFeatures()).
GemmFp8Fn GetGemmFp8(Isa isa);

namespace internal {
void GemmFp8Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const float* scales,
                   size_t n_cols, float* y, size_t ldy);
// Highway: the kernel of exactly HwyTargetOf(isa) (hwy_dispatch.h); nullptr if that target is not compiled
// in.
GemmFp8Fn GemmFp8Hwy(Isa isa);
// The AMX path (see GemmFp8Paths).
void GemmFp8Amx(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels, const float* scales,
                size_t n_cols, float* y, size_t ldy);
// n_panels packed FP8 panels to gemm_bf16.h's bf16 panels (PanelStride(k) elements each) of bf16(fp8 * scale),
// exactly UnpackFp8ToBf16's values; Highway, nullptr where HwyTargetOf(isa) is not compiled in.
using Fp8PanelsToBf16Fn = void (*)(size_t k, const uint8_t* panels, const float* scales, size_t n_panels,
                                   bf16_t* out);
Fp8PanelsToBf16Fn Fp8PanelsToBf16Hwy(Isa isa);
// The same with AVX512-BF16's vcvtne2ps2bf16 (fp8_bf16_avx512bf16.cc; only where CPUID reports AVX512-BF16):
// the same bits when MXCSR.DAZ is clear and Fp8ScalesBf16Safe(the call's scales) holds.
void Fp8PanelsToBf16Avx512Bf16(size_t k, const uint8_t* panels, const float* scales, size_t n_panels,
                               bf16_t* out);
// No scale of `count` in (0, 2^-116] in magnitude: then no fp8 * scale product is a subnormal fp32 (the
// smallest E4M3 magnitude is 2^-9), which vcvtne2ps2bf16 would flush to zero.
bool Fp8ScalesBf16Safe(const float* scales, size_t count);
// Whether MXCSR.DAZ (denormals are zero) is set on this thread: the Highway kernels then decode with integer
// operations only (gemm_fp8_hwy.cc), as their fast decode multiplies a subnormal fp32.
bool Fp8DenormalsAreZero();
}  // namespace internal

}  // namespace kt

#endif  // KT_KERNELS_GEMM_FP8_H_
