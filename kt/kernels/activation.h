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

// The gated activation's variants some checkpoints are trained with (the original kt-kernel's constructor
// arguments of the same names):
//   limit > 0: g = min(g, limit) and u = clamp(u, -limit, limit) first (DeepSeek-V4's clamp, gpt-oss');
//   alpha > 0: "swigluoai", h = g * sigmoid(alpha * g) * (u + 1) instead of silu(g) * u (gpt-oss, MiniMax-M3).
// Zero (the default) turns each off. NaN stays NaN through the clamps.
struct SwigluParams {
  float limit = 0.0f;
  float alpha = 0.0f;
  bool plain() const { return limit == 0.0f && alpha == 0.0f; }
};

// h[i] = bf16(swiglu(g[i], u[i])) with `p` applied; g and u are overwritten (clamped, and for alpha > 0
// rescaled: alpha * g and (u + 1) / alpha, whose silu product is the swigluoai value up to two fp32
// roundings), then SiluMulToBf16. p.plain(): SiluMulToBf16 exactly.
void SwigluToBf16(Isa isa, const SwigluParams& p, float* g, float* u, bf16_t* h, size_t n);

}  // namespace kt

#endif  // KT_KERNELS_ACTIVATION_H_
