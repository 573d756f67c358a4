// The gated activation of an expert MLP: h = bf16(silu(g) * u), silu(g) = g / (1 + exp(-g)).
#ifndef KT_KERNELS_ACTIVATION_H_
#define KT_KERNELS_ACTIVATION_H_

#include <cstddef>

#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"

namespace kt {

// h[i] = bf16(silu(g[i]) * u[i]) for i < n. The vector paths use Highway's exp (max error ~1 ulp of
// fp32), so an element may round to the neighbouring bf16 value where the exact product sits within an
// ulp of a rounding boundary; the scalar path uses std::exp.
void SiluMulToBf16(Isa isa, const float* g, const float* u, bf16_t* h, size_t n);

}  // namespace kt

#endif  // KT_KERNELS_ACTIVATION_H_
