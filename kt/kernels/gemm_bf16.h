// BF16 matrix kernels for expert projections: y[M,N] = x[M,K] * W[N,K]^T with fp32 accumulation.
//
// Weights are packed once at load into panels of kPanelRows output rows. Inside a panel the K axis is
// split into pairs and interleaved: panel[kp][r][2] = {W[r][2kp], W[r][2kp+1]}. One 32-bit lane then
// holds two consecutive k of one output row, which is exactly the operand of vdpbf16ps, and a Highway
// path recovers both fp32 values with one shift and one mask. A 16-row panel pair-row is 64 bytes, one
// cache line and one zmm register, so a panel streams linearly through memory for any M (decode reads
// every weight byte once; prefill re-reads a few panels from L2 while reusing x rows held in L1).
// K is padded to even and N to a multiple of kPanelRows with zeros.
#ifndef KT_KERNELS_GEMM_BF16_H_
#define KT_KERNELS_GEMM_BF16_H_

#include <cstddef>

#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_path.h"

namespace kt {

inline constexpr size_t kPanelRows = 16;

inline constexpr size_t KPairs(size_t k) { return (k + 1) / 2; }
// Elements of one packed panel.
inline constexpr size_t PanelStride(size_t k) { return KPairs(k) * 2 * kPanelRows; }
inline constexpr size_t NumPanels(size_t n) { return (n + kPanelRows - 1) / kPanelRows; }
// Elements of a packed [N,K] matrix.
inline constexpr size_t PackedBf16Size(size_t n, size_t k) { return NumPanels(n) * PanelStride(k); }

// Packs row-major w[N,K] (row stride ldw elements) into `packed` (PackedBf16Size(N,K) elements).
void PackBf16(const bf16_t* w, size_t ldw, size_t n, size_t k, bf16_t* packed);

// Inverse of PackBf16 (for tests and for copying experts back out).
void UnpackBf16(const bf16_t* packed, size_t n, size_t k, bf16_t* w, size_t ldw);

// Packs W^T [K,N] straight from packed W[N,K]: `packed_t` (PackedBf16Size(K,N) elements) ends up exactly as
// PackBf16 of the transposed matrix would leave it, with no row-major copy in between (kt/sft builds the
// backward weights this way). A 16 x 16 block of W (source panel q, k in [16b, 16b + 16)) is 512 contiguous
// bytes, and so is its image (destination panel b, pair-rows [8q, 8q + 8)); inside, 4-element groups move
// as a transpose of 8 x 8 64-bit words with the two middle elements of each swapped. Blocks that are not
// whole (N or K not a multiple of 16) go element by element, with the padding zeroed.
void TransposePackedBf16(const bf16_t* packed, size_t n, size_t k, bf16_t* packed_t);

// Computes y[m][j] = sum_k x[m][k] * W[j][k] for m < M and j < n_cols, where W's rows are the rows of the
// panels starting at `panels` (so a caller covers a column range by offsetting `panels` by whole panels).
// x rows have stride ldx (elements, any alignment), y rows stride ldy. y is overwritten. No allocation,
// no threads: the caller splits work across panels.
using GemmBf16Fn = void (*)(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels,
                            size_t n_cols, float* y, size_t ldy);

// Every kernel of the family: scalar, Highway AVX2/AVX3/AVX3_DL, native AVX512-BF16 (vdpbf16ps), AMX.
const GemmPaths<GemmBf16Fn>& GemmBf16Paths();

// The kernel of one path: SelectGemmPath over GemmBf16Paths() (Highway for kAvx2, kAvx512 and kAvx512Vnni).
// The caller must have checked IsaSupported(isa, GetCpuFeatures()).
GemmBf16Fn GetGemmBf16(Isa isa);

namespace internal {
// Per-library entry points, listed in GemmBf16Paths().
void GemmBf16Scalar(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels,
                    size_t n_cols, float* y, size_t ldy);
void GemmBf16Avx512Bf16(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels,
                        size_t n_cols, float* y, size_t ldy);
// AMX tiles for m >= kAmxMinRows, the AVX512-BF16 kernel below (a 16-row tile would be mostly padding
// and decode is bound by reading the weights either way).
inline constexpr size_t kAmxMinRows = 8;
void GemmBf16Amx(size_t m, size_t k, const bf16_t* x, size_t ldx, const bf16_t* panels, size_t n_cols,
                 float* y, size_t ldy);
// The AMX kernel with an explicit K block for its whole 32 x 32 blocks (0: no K blocking, each block walks
// all of K; GemmBf16Amx uses 0, see gemm_bf16_amx.cc). For tests and the benchmark's block-size sweep.
void GemmBf16AmxKBlocked(size_t kb, size_t m, size_t k, const bf16_t* x, size_t ldx,
                         const bf16_t* panels, size_t n_cols, float* y, size_t ldy);
// Highway: the kernel of HwyTargetOf(isa) exactly (AVX2, AVX3 or AVX3_DL); nullptr for kScalar or a target
// not compiled in.
GemmBf16Fn GemmBf16Hwy(Isa isa);
}  // namespace internal

}  // namespace kt

#endif  // KT_KERNELS_GEMM_BF16_H_
