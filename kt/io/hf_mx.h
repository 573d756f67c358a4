// OCP MX expert tensors of a Hugging Face folder, checked and read into kt's canonical kt-mxfp4-v1 /
// kt-mxfp8-v1 form (methods MXFP4 / MXFP8):
//   MXFP4 (DeepSeek-V4-Flash): `...experts.e.w1.weight` I8 (or U8) [N, K/2], E2M1 nibble pairs, element 2i in
//     the low nibble, with `...experts.e.w1.scale` F8_E8M0 (or U8) [N, K/32];
//   MXFP8 (MiniMax-M3): `weight` F8_E4M3 [N, K] with `weight_scale_inv` U8 (or F8_E8M0) E8M0 codes [N, K/32].
// The scale tensor is found under either name (`<...>.scale` beside `<...>.weight`, or `<weight>_scale_inv`).
#ifndef KT_IO_HF_MX_H_
#define KT_IO_HF_MX_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kt/io/checkpoint.h"
#include "kt/kernels/quant.h"

namespace kt {

// Whether weight `name` is stored MX-coded (I8/U8 for MXFP4, F8_E4M3 for MXFP8) rather than bf16: an MX
// method then reads the folder as stored; a bf16 folder it quantizes.
bool HfMxCoded(const Checkpoint& ckpt, const std::string& name, QuantFormat format);

// Checks weight `name` ([N, K] = shape) and its scale tensor for `format` (kMxfp4 or kMxfp8); sets *weight
// and *scale. NotFound / InvalidArgument naming the tensor, what it is and what was expected.
absl::Status CheckHfMxTensors(const Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape,
                              QuantFormat format, absl::string_view what, Checkpoint::Located* weight,
                              Checkpoint::Located* scale);

// The canonical matrix of a checked pair: the codes as stored, the E8M0 codes as fp32 powers of two.
void ReadHfMx(const Checkpoint::Located& weight, const Checkpoint::Located& scale, QuantFormat format, size_t n,
              size_t k, QuantizedMatrix* out);

}  // namespace kt

#endif  // KT_IO_HF_MX_H_
