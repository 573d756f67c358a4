// Bulk BF16 <-> FP32 conversion. Highway dispatch picks the widest vectors the CPU has; results are
// bit-identical to the scalar Bf16ToF32 / F32ToBf16 in dtype.h (round to nearest even, NaN kept).
#ifndef KT_KERNELS_CONVERT_H_
#define KT_KERNELS_CONVERT_H_

#include <cstddef>

#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"

namespace kt {

void ConvertBf16ToF32(Isa isa, const bf16_t* in, float* out, size_t n);
void ConvertF32ToBf16(Isa isa, const float* in, bf16_t* out, size_t n);

}  // namespace kt

#endif  // KT_KERNELS_CONVERT_H_
