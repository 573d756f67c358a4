// OCP MX (MXFP4, MXFP8) GEMMs for expert projections: y[M,N] = x[M,K] * W[N,K]^T, bf16 activations, fp32
// accumulation, W[n][k] = element(q[n][k]) * 2^(e[n][k / 32] - 127) (mx.h).
//
// Packed layout kt-mx-panel16-kblock32-v1, per 16-row panel (rows past N are code 0, scale code 127):
//   MXFP8 panels: K rows of 16 bytes, panel[k][r] = q[16p + r][k] (as kt-fp8-panel16-kblock128-v1).
//   MXFP4 panels: K/2 rows of 16 bytes, panel[j][r] = the canonical byte j of row 16p + r: element 2j in the
//                 low nibble, 2j + 1 in the high one (one 16-byte load gives two k of all 16 rows).
//   scales:       per panel, K/32 groups of 16 E8M0 bytes: scales[p][b][r] = e of row 16p + r, k block b
//                 (a byte each, not an fp32: MXFP4's 0.5 byte per weight would otherwise grow by a quarter).
// The kernels decode the codes to fp32 in registers, FMA them with the broadcast activation into a per-block
// accumulator, and add accumulator * 2^(e - 127) once per 32 k. K must be a multiple of 32; N may be
// anything. E8M0 code 0xff (NaN) gives NaN; code 0 (2^-127) is a subnormal fp32 scale, read as 0 when
// MXCSR.DAZ is set.
#ifndef KT_KERNELS_GEMM_MX_H_
#define KT_KERNELS_GEMM_MX_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_path.h"
#include "kt/kernels/quant.h"

namespace kt {

inline constexpr size_t kMxPanelRows = 16;
inline constexpr size_t kMxBlockK = 32;  // k per E8M0 scale

inline constexpr size_t MxNumPanels(size_t n) { return (n + kMxPanelRows - 1) / kMxPanelRows; }
// Bytes of one packed panel (fp4: half a byte per weight), and of a packed [N, K] matrix.
inline constexpr size_t MxPanelStride(bool fp4, size_t k) { return (fp4 ? k / 2 : k) * kMxPanelRows; }
inline constexpr size_t PackedMxBytes(bool fp4, size_t n, size_t k) { return MxNumPanels(n) * MxPanelStride(fp4, k); }
// E8M0 scale bytes of a packed [N, K] matrix (K / 32 per padded row).
inline constexpr size_t PackedMxScales(size_t n, size_t k) { return MxNumPanels(n) * kMxPanelRows * (k / kMxBlockK); }

// Packs a kt-mxfp4-v1 or kt-mxfp8-v1 QuantizedMatrix into panels (PackedMxBytes) and E8M0 scales
// (PackedMxScales). InvalidArgument if qm is not an MX matrix, its arrays do not match its shape, or a scale
// is not a power of two in [2^-127, 2^127] (nor NaN), naming the row and block.
absl::Status PackMx(const QuantizedMatrix& qm, uint8_t* panels, uint8_t* scales);

// bf16 of element * scale (Dequantize's one fp32 multiply, rounded once) straight from the packed layout:
// w[N, K] with row stride ldw >= K, or with `transposed` wt[K, N] with row stride ldw >= N.
void UnpackMxToBf16(bool fp4, size_t n, size_t k, const uint8_t* panels, const uint8_t* scales, bool transposed,
                    bf16_t* w, size_t ldw);

// y[i][j] = sum_k x[i][k] * W[j][k] for i < m, j < n_cols, W's rows those of the panels at `panels` with
// their scales at `scales` (a caller covers a column range by offsetting both by whole panels). x rows have
// stride ldx (elements), y rows ldy; y is overwritten. No allocation, no threads.
using GemmMxFn = void (*)(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels,
                          const uint8_t* scales, size_t n_cols, float* y, size_t ldy);

// The paths of each element type (gemm_path.h): scalar, hwy_avx2, hwy_avx512 (AVX3), hwy_avx512_vnni
// (AVX3_DL), the Highway ones only where compiled in.
const GemmPaths<GemmMxFn>& GemmMxfp4Paths();
const GemmPaths<GemmMxFn>& GemmMxfp8Paths();
// The kernel of one path (every Isa has one; AVX-512 BF16 and AMX run the AVX3_DL kernel). The caller must
// have checked IsaSupported(isa, GetCpuFeatures()).
GemmMxFn GetGemmMx(bool fp4, Isa isa);

namespace internal {
void GemmMxfp4Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels,
                     const uint8_t* scales, size_t n_cols, float* y, size_t ldy);
void GemmMxfp8Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const uint8_t* panels,
                     const uint8_t* scales, size_t n_cols, float* y, size_t ldy);
// Highway: the kernel of exactly HwyTargetOf(isa); nullptr if that target is not compiled in.
GemmMxFn GemmMxHwy(bool fp4, Isa isa);
}  // namespace internal

}  // namespace kt

#endif  // KT_KERNELS_GEMM_MX_H_
