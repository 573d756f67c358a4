// FP8 expert tensors of a Hugging Face folder, checked and read into kt's canonical kt-fp8-block128-v1 form:
//   block scales (method FP8: DeepSeek-V3/R1, Qwen3-FP8, MiniMax-M2): F8_E4M3 `weight` [N, K] + F32
//     `weight_scale_inv` [ceil(N/128), ceil(K/128)];
//   per-channel scales (method FP8_PERCHANNEL: GLM-4.x FP8, compressed-tensors "channel" strategy): F8_E4M3
//     `weight` [N, K] + `weight_scale` [N] or [N, 1], F32 or BF16 (llm-compressor keeps the model's dtype).
// A per-channel scale is the scale of each of its row's 128-k blocks: the same weights, held exactly.
#ifndef KT_IO_HF_FP8_H_
#define KT_IO_HF_FP8_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/status/statusor.h"
#include "kt/io/arch.h"
#include "kt/io/checkpoint.h"
#include "kt/io/method.h"
#include "kt/kernels/quant.h"

namespace kt {

enum class HfFp8Scales { kBlock128, kPerChannel };

// What an HF folder's config says its experts are, for loading with `method`: FP8 or not, and which scales.
struct HfFp8Folder {
  bool fp8 = false;
  HfFp8Scales scales = HfFp8Scales::kBlock128;
};
// Block FP8 is quant_method "fp8" with weight_block_size [128, 128] (another size: Unimplemented); per-channel
// FP8 is "fp8" without a block size, or "compressed-tensors" read by FP8_PERCHANNEL. The method must fit the
// folder (InvalidArgument naming the method to use: FP8 for block scales, FP8_PERCHANNEL for per-channel
// ones; FP8_PERCHANNEL refuses a bf16 folder); another quant_method, or FP8 experts in fused tensors, are
// Unimplemented.
absl::StatusOr<HfFp8Folder> ClassifyHfFp8Folder(const MoeArch& arch, const std::string& config_path,
                                                const MethodLayout& method);

// The scale tensor's name beside weight `name`: name + "_scale_inv" (block) or name + "_scale" (per channel).
std::string HfFp8ScaleName(const std::string& name, HfFp8Scales kind);

// Checks that `name` is F8_E4M3 `shape` [N, K] and that its scale tensor is there with the kind's dtype and
// shape; sets *weight and *scale. NotFound / InvalidArgument naming the tensor, what it is and what was
// expected (`what`: e.g. "layer 1 expert 3 gate").
absl::Status CheckHfFp8Tensors(const Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape,
                               HfFp8Scales kind, absl::string_view what, Checkpoint::Located* weight,
                               Checkpoint::Located* scale);

// The canonical kt-fp8-block128-v1 matrix of a checked pair: the codes as stored, the scales expanded to
// one per row and 128-k block.
void ReadHfFp8(const Checkpoint::Located& weight, const Checkpoint::Located& scale, HfFp8Scales kind, size_t n,
               size_t k, QuantizedMatrix* out);

}  // namespace kt

#endif  // KT_IO_HF_FP8_H_
