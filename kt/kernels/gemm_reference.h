// The slow, obvious truth of each GEMM format, on unpacked row-major weights and in double precision
// (Eigen products over Eigen::Map views of the buffers): every kernel path is judged against these with a
// bound derived from fp32 rounding. They share no code with the kernels they check.
#ifndef KT_KERNELS_GEMM_REFERENCE_H_
#define KT_KERNELS_GEMM_REFERENCE_H_

#include <cstddef>
#include <cstdint>

#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"

namespace kt {

// Y = X W^T for bf16 X [m, k] (row stride ldx) and W [n, k] (row stride ldw): the exact products summed in
// double, rounded once to fp32 into y (row stride ldy).
void GemmBf16Reference(size_t m, size_t n, size_t k, const bf16_t* x, size_t ldx, const bf16_t* w,
                       size_t ldw, float* y, size_t ldy);

// Y = diag(sx) (Qx Qw^T) diag(sw) for int8 qx [m, k] (row stride ldqx) and qw [n, k] (row stride ldqw) with
// scales sx[m], sw[n]: the integer product in int64 (exact), then sx * sw * sum in double, rounded once to
// fp32.
void GemmInt8Reference(size_t m, size_t n, size_t k, const int8_t* qx, size_t ldqx, const float* sx,
                       const int8_t* qw, size_t ldqw, const float* sw, float* y, size_t ldy);

// Y = X D^T with X[i][k] = sx[i][g(k)] qx[i][k] (the activations' own quantization dequantized) and D the
// weights Dequantize(qm) writes (fp32), in double, rounded once to fp32. qm is the canonical int4 matrix; sx
// is [m][ScalesPerRow(qm.spec, k)].
void GemmInt4Reference(size_t m, const int8_t* qx, size_t ldqx, const float* sx, const QuantizedMatrix& qm,
                       float* y, size_t ldy);

}  // namespace kt

#endif  // KT_KERNELS_GEMM_REFERENCE_H_
