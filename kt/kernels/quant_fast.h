// Fast weight quantization and unpacking for loading and conversion: the same bytes as quant.h's scalar
// Quantize / Dequantize (the truth), only faster.
//
// Why: quant.cc is written for obviousness (std::round, fmin/fmax per element, out of line in libm), an order
// of magnitude too slow for loading a layer quantized online, for `kt convert` and for the SFT engine's
// transposed backward copy (unpack to bf16, transpose, quantize again); docs/perf-log/2026-11-27-weight-io.md
// and 2026-11-27-sft.md have the measurements.
#ifndef KT_KERNELS_QUANT_FAST_H_
#define KT_KERNELS_QUANT_FAST_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"

namespace kt {

// Quantize(spec, w, ldw, n, k), bit for bit (same data, scales and zero points), for every format of
// quant.h, vectorized with Highway on the avx2 / avx512 / avx512_vnni paths (kAvx512Bf16 and kAmx use the
// AVX3_DL code); kScalar is Quantize itself. Every error is Quantize's own: an invalid spec or argument,
// or a non-finite weight (found by a vectorized scan, then named by row and column by Quantize).
// `isa` must be supported by this CPU.
absl::StatusOr<QuantizedMatrix> QuantizeFast(Isa isa, const QuantSpec& spec, const bf16_t* w, size_t ldw,
                                             size_t n, size_t k);

// F32ToBf16 of what Dequantize writes, straight from the kernels' packed layouts (no canonical copy):
// w[N, K] bf16 with row stride ldw >= K.
//
// kt-int4-panel16-kblock8-v1 (gemm_int4.h's PackInt4 output for an int4 spec): a dequantized int4 weight
// depends only on its nibble and its group's scale and zero point, so each group's 16 possible bf16 values
// are computed once (16 fp32 multiplies and roundings, the same arithmetic as Dequantize) and every weight
// is a table lookup; 8 weights come from one 32-bit load of a packed block.
void UnpackInt4ToBf16(const QuantSpec& spec, size_t n, size_t k, const uint8_t* panels, const float* scales,
                      const uint8_t* zeros, bf16_t* w, size_t ldw);

// kt-int8-panel16-kquad-v1 (gemm_int8.h's PackInt8 output): the same with a 256-entry table per row
// (K >= 256 in every supported model, so the table costs at most one multiply per weight).
void UnpackInt8ToBf16(size_t n, size_t k, const int8_t* panels, const float* packed_scales, bf16_t* w,
                      size_t ldw);
// The same values transposed: wt[K, N] with row stride ldt >= N, wt[c][r] = the bf16 of W[r][c]. A panel's
// quad-row (16 rows x 4 k, 64 bytes) becomes 4 runs of 16 consecutive bf16 in wt, so the weights are read
// once, in order, with no row-major copy to transpose afterwards (kt/sft's int8 backward weights).
void UnpackInt8ToBf16Transposed(size_t n, size_t k, const int8_t* panels, const float* packed_scales,
                                bf16_t* wt, size_t ldt);
// The int4 twin: wt[K, N] (row stride ldt >= N) of UnpackInt4ToBf16's values; a 64-byte block (16 rows x 8 k)
// becomes 8 runs of 16 consecutive bf16 in wt.
void UnpackInt4ToBf16Transposed(const QuantSpec& spec, size_t n, size_t k, const uint8_t* panels,
                                const float* scales, const uint8_t* zeros, bf16_t* wt, size_t ldt);

}  // namespace kt

#endif  // KT_KERNELS_QUANT_FAST_H_
