// Per-token int8 quantization of activations for the integer expert kernels, vectorized: the same numbers
// as quant.h's QuantizeActivationInt8 / QuantizeActivationInt8Grouped (the scalar truth), bit for bit, on
// every path. scale = max|x| / 127 (one fp32 division, as the scalar code does), q = round half away from
// zero of x / scale (a true fp32 division, not a multiply by 1/scale, which would differ in the last bit
// and flip roundings), clamped to [-127, 127]; an all-zero row gets scale 0 and q 0; a row (group) holding
// a NaN or an infinity gets scale NaN and q 0, so the products made from it are NaN.
//
// Why it exists: the MoE layer quantizes every gathered input row and every h row per call; in scalar code
// (std::round per element) that takes a large share of an int8 prefill or decode step
// (docs/perf-log/2026-11-27-int8.md).
#ifndef KT_KERNELS_ACT_QUANT_H_
#define KT_KERNELS_ACT_QUANT_H_

#include <cstddef>
#include <cstdint>

#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"

namespace kt {

// One row of k values: q[k], *scale. Same contract as QuantizeActivationInt8.
void QuantizeRowInt8(Isa isa, const bf16_t* x, size_t k, int8_t* q, float* scale);

// One row in groups of `group` consecutive values (group divides k; the caller validates, as
// QuantizeActivationInt8Grouped does): q[k], scales[k / group].
void QuantizeRowInt8Grouped(Isa isa, const bf16_t* x, size_t k, size_t group, int8_t* q, float* scales);

// A row quantized in pieces with the whole row's scale (tensor-parallel parts each hold a slice of h):
// RowAbsMax is max |x[0, k)|, or NaN when some x is NaN or infinite; the max of the slices' RowAbsMax is the
// row's (max is exact in any order, and NaN wins when taken as TpMoeLayer does). QuantizeRowInt8WithMax
// quantizes x[0, k) against amax and returns the scale: QuantizeRowInt8WithMax(x, RowAbsMax(x)) is
// QuantizeRowInt8(x) bit for bit, and a slice quantized against the row's amax equals that slice of the
// whole row's codes.
float RowAbsMax(Isa isa, const bf16_t* x, size_t k);
float QuantizeRowInt8WithMax(Isa isa, const bf16_t* x, size_t k, float amax, int8_t* q);


}  // namespace kt

#endif  // KT_KERNELS_ACT_QUANT_H_
