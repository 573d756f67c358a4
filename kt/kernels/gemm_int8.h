// INT8 matrix kernels for expert projections in the kt-int8-channel-v1 format (quant.h): weights are
// symmetric int8 per output channel with one fp32 scale per row, activations are quantized per token
// (QuantizeActivationInt8: one fp32 scale per row of x). The kernels compute
//   y[m][n] = (sx[m] * sw[n]) * float(sum_k qx[m][k] * qw[n][k])
// with the integer sum accumulated exactly in int32 and exactly that fp32 expression at the end (every
// path rounds the same three operations in the same order, so all paths agree bit for bit).
//
// Packed layout kt-int8-panel16-kquad-v1 (docs/FORMATS.md): panels of kPanelRows = 16 output rows; K is
// split into quads and interleaved: panel[kq][r][j] = qw[16p + r][4kq + j], j < 4. One 32-bit lane then
// holds four consecutive k of one output row, the operand of vpdpbusd; a 16-row quad-row is 64 bytes (one
// cache line, one zmm), and 16 consecutive quad-rows are exactly an AMX tdpbssd B tile (16 rows x 64
// bytes, a K chunk of 64). K is padded to a multiple of 4 and N to a multiple of 16 with zeros.
// Alongside the panels the packed matrix keeps, per padded row, the fp32 scale and the int32 row sum
// sum_k qw[n][k] (the VNNI kernel multiplies unsigned x + 128 by signed w and subtracts 128 * rowsum).
//
// Exactness: |qx * qw| <= 128 * 128 = 2^14, so the int32 sums are exact for K < 2^17 with any int8
// inputs (K <= 131072 with |q| <= 127, which both quantizers guarantee). The VNNI kernel's intermediate
// sum of (qx + 128) * qw may wrap, but int32 wraps modulo 2^32 and the final value fits, so it is exact.
#ifndef KT_KERNELS_GEMM_INT8_H_
#define KT_KERNELS_GEMM_INT8_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/gemm_path.h"
#include "kt/kernels/quant.h"

namespace kt {

inline constexpr size_t kInt8PanelRows = 16;
// Largest K for which the int32 accumulation is exact for every int8 input.
inline constexpr size_t kInt8MaxK = size_t{1} << 17;

inline constexpr size_t KQuads(size_t k) { return (k + 3) / 4; }
// Bytes of one packed panel.
inline constexpr size_t Int8PanelStride(size_t k) { return KQuads(k) * 4 * kInt8PanelRows; }
inline constexpr size_t Int8NumPanels(size_t n) { return (n + kInt8PanelRows - 1) / kInt8PanelRows; }
// Bytes of a packed [N,K] matrix's panels.
inline constexpr size_t PackedInt8Bytes(size_t n, size_t k) { return Int8NumPanels(n) * Int8PanelStride(k); }
// Entries of the packed scale and row-sum arrays (N rounded up to whole panels; padding rows hold 0).
inline constexpr size_t PackedInt8Rows(size_t n) { return Int8NumPanels(n) * kInt8PanelRows; }

// Packs row-major int8 q[N,K] (row stride ldq bytes) with per-row scales[N] into `panels`
// (PackedInt8Bytes(N,K)), `packed_scales` and `rowsums` (PackedInt8Rows(N) each).
void PackInt8(const int8_t* q, size_t ldq, const float* scales, size_t n, size_t k, int8_t* panels,
              float* packed_scales, int32_t* rowsums);

// The same from quant.h's canonical form; InvalidArgument unless qm is kt-int8-channel-v1 and well formed.
absl::Status PackInt8(const QuantizedMatrix& qm, int8_t* panels, float* packed_scales, int32_t* rowsums);

// Inverse of PackInt8 (tests, copying experts back out): q[N,K] with row stride ldq, scales[N].
void UnpackInt8(const int8_t* panels, const float* packed_scales, size_t n, size_t k, int8_t* q,
                size_t ldq, float* scales);

// Computes y[i][j] = (sx[i] * w_scales[j]) * float(sum_k qx[i][k] * W[j][k]) for i < m and j < n_cols,
// where W's rows are the rows of the panels starting at `panels`, and w_scales/w_rowsums start at the
// same row (a caller covers a column range by offsetting all three by whole panels: panels by
// p * Int8PanelStride(k) bytes, the other two by p * 16 entries; they must hold Int8NumPanels(n_cols) * 16
// entries, as the packed arrays do). qx rows have stride ldqx bytes (any alignment), y rows ldy floats;
// y is overwritten in columns [0, n_cols) only. Requires k < kInt8MaxK. No allocation, no threads.
using GemmInt8Fn = void (*)(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                            const int8_t* panels, const float* w_scales, const int32_t* w_rowsums,
                            size_t n_cols, float* y, size_t ldy);

// Every kernel of the family: scalar, Highway AVX2/AVX3/AVX3_DL, native AVX512-VNNI (vpdpbusd), AMX
// (tdpbssd).
const GemmPaths<GemmInt8Fn>& GemmInt8Paths();

// The kernel of one path, SelectGemmPath over GemmInt8Paths(): scalar, Highway AVX2/AVX3 for
// kAvx2/kAvx512, native AVX512-VNNI for kAvx512Vnni and kAvx512Bf16 (Highway AVX3_DL is tested and
// benchmarked, not selected), AMX for kAmx. The caller must have checked IsaSupported(isa,
// GetCpuFeatures()).
GemmInt8Fn GetGemmInt8(Isa isa);

namespace internal {
// Per-library entry points, listed in GemmInt8Paths().
void GemmInt8Scalar(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                    const int8_t* panels, const float* w_scales, const int32_t* w_rowsums, size_t n_cols,
                    float* y, size_t ldy);
void GemmInt8Vnni(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                  const int8_t* panels, const float* w_scales, const int32_t* w_rowsums, size_t n_cols,
                  float* y, size_t ldy);
// AMX tiles for m >= kAmxInt8MinRows, the VNNI kernel below (16-row tiles would be mostly padding, and
// decode is bound by reading the weights either way).
inline constexpr size_t kAmxInt8MinRows = 8;
void GemmInt8Amx(size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                 const int8_t* panels, const float* w_scales, const int32_t* w_rowsums, size_t n_cols,
                 float* y, size_t ldy);
// The AMX kernel with an explicit K block (bytes of K) for its whole 32 x 32 blocks (0: no K blocking);
// GemmInt8Amx uses kAmxInt8KBlock. For tests and the benchmark's block-size sweep.
inline constexpr size_t kAmxInt8KBlock = 1024;
void GemmInt8AmxKBlocked(size_t kb, size_t m, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                         const int8_t* panels, const float* w_scales, const int32_t* w_rowsums,
                         size_t n_cols, float* y, size_t ldy);
// Highway: the kernel of HwyTargetOf(isa) exactly (AVX2, AVX3 or AVX3_DL); nullptr for kScalar or a target
// not compiled in.
GemmInt8Fn GemmInt8Hwy(Isa isa);
}  // namespace internal

}  // namespace kt

#endif  // KT_KERNELS_GEMM_INT8_H_
