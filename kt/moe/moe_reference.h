// The plain reference of MoeLayer::Forward on canonical weights, in double precision (Eigen), for tests and
// for `kt bench`'s accuracy line. Per token t and slot j with expert e = ids[t][j]:
//   g = W_g x,  u = W_u x,  h = bf16(silu(g) u),  y = W_d h,  out_t = sum_j w_tj y
// (h with config.swiglu_limit's clamps and swiglu_alpha's g sigmoid(alpha g) (u + 1) when they are set)
// (the bf16 rounding of h is the layer's contract: the down projection reads bf16). An id < 0, >= E or masked
// to the GPU contributes nothing. With a quantized format the format is applied in plain code: weights
// quantized and dequantized (quant.h; group size from config), x and h quantized per row (per row and group
// for the group formats) and dequantized, then the same double arithmetic; a kernel path must match it up
// to fp32 rounding, i.e. adds nothing to the format's error. Shares no code with the kernels.
#ifndef KT_MOE_MOE_REFERENCE_H_
#define KT_MOE_MOE_REFERENCE_H_

#include <cstdint>

#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"

namespace kt {

// input [qlen, H] bf16; ids, weights [qlen, k]; gate, up [E, I, H], down [E, H, I] bf16; output [qlen, H].
void MoeForwardReference(const MoeConfig& config, int qlen, int k, const int64_t* ids,
                         const float* weights, const bf16_t* input, const bf16_t* gate,
                         const bf16_t* up, const bf16_t* down, const bool* gpu_experts_mask,
                         float* output, ExpertFormat format = ExpertFormat::kBf16);

}  // namespace kt

#endif  // KT_MOE_MOE_REFERENCE_H_
