// The GEMM of method LLAMAFILE: weights as GGUF stores them (ggml blocks, gguf_quants.h), one row of
// GgufRowBytes(type, k) bytes per output channel, rows consecutive ("kt-gguf-rows-v1": the file's bytes of
// one expert, unchanged; docs/FORMATS.md). A column block starting at row c0 starts c0 rows in.
//
// y[r][j] = sum_k x_r[k] W[j][k] for r < m, j < cols, K <= kGgufMaxK, fp32 accumulation:
// - quantized types read the rows quantized to the type's dot partner (GgufActivationBlock: Q8_0 per 32 or
//   Q8_K per 256 values; qx[m][ld], sx[m][k / block]) and sum int8 x int8 products exactly per block or
//   sub-block, then scale in fp32, as ggml's vec_dot does;
// - F32, F16, BF16 read bf16 rows x[m][ld] and multiply in fp32.
// Paths: scalar (the truth, gguf_quants.h's dots), Highway AVX2/AVX3/AVX3_DL (a vector kernel per type).
#ifndef KT_KERNELS_GEMM_GGUF_H_
#define KT_KERNELS_GEMM_GGUF_H_

#include <cstddef>
#include <cstdint>

#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_path.h"
#include "kt/kernels/gguf_quants.h"

namespace kt {

// The rows a GGUF product reads: x (float types) or qx + sx (quantized types); `ld` is their row stride in
// elements; sx has k / GgufActivationBlock(type) scales per row.
struct GgufRows {
  const bf16_t* x = nullptr;
  const int8_t* qx = nullptr;
  const float* sx = nullptr;
  size_t ld = 0;
};

using GemmGgufFn = void (*)(GgufType type, size_t m, size_t k, const GgufRows& in, const uint8_t* w,
                            size_t cols, float* y, size_t ldy);

const GemmPaths<GemmGgufFn>& GemmGgufPaths();
GemmGgufFn GetGemmGguf(Isa isa);  // every Isa has one (AVX-512 BF16 and AMX run the AVX3_DL kernel)

namespace internal {
void GemmGgufScalar(GgufType type, size_t m, size_t k, const GgufRows& in, const uint8_t* w, size_t cols,
                    float* y, size_t ldy);
GemmGgufFn GemmGgufHwy(Isa isa);  // nullptr if that Highway target is not compiled in
}  // namespace internal

}  // namespace kt

#endif  // KT_KERNELS_GEMM_GGUF_H_
