// The MoE shape of a GGUF checkpoint from its metadata (llama.cpp's keys), for `kt convert` from GGUF.
//
// llama.cpp's convert_hf_to_gguf.py writes the model's hyperparameters as `<arch>.<key>` metadata, <arch> being
// `general.architecture`. kt reads them into the Hugging Face config.json that names the same model (the keys
// ParseMoeConfig reads, kt/io/arch.h), so that a converted folder has the config.json every other input gives
// it (`kt bench --weights`, OpenLayerFromFolder read it) and there is one rule for which layers are MoE.
//
//   general.architecture   HF architecture              keys read (<arch>. omitted)
//   qwen2moe               Qwen2MoeForCausalLM          block_count, embedding_length, expert_count,
//                                                       expert_used_count, expert_feed_forward_length,
//                                                       expert_shared_feed_forward_length (0)
//   qwen3moe               Qwen3MoeForCausalLM          as qwen2moe without the shared expert; norm_topk_prob
//                                                       true (llama.cpp renormalises for qwen3moe)
//   deepseek2              DeepseekV3ForCausalLM when   block_count, embedding_length, expert_count,
//                          expert_gating_func is 2      expert_used_count, expert_feed_forward_length,
//                          (sigmoid), else              leading_dense_block_count, expert_shared_count (0),
//                          DeepseekV2ForCausalLM        expert_weights_scale (V3: required; V2: 1),
//                                                       expert_weights_norm (false), expert_gating_func
//                                                       (1 softmax), expert_group_count / expert_group_used_count (1)
//   glm4moe                Glm4MoeForCausalLM           as deepseek2 (gating default sigmoid); block_count minus
//                                                       nextn_predict_layers (the MTP layers GLM's GGUFs append)
//   llama with expert_count  MixtralForCausalLM         block_count, embedding_length, expert_count,
//                                                       expert_used_count, feed_forward_length (the experts' size)
//
// (The value in parentheses is the one used when the key is absent.) Where expert_feed_forward_length is
// absent the first MoE layer's ffn_gate_exps tensor gives I (its ne[1]). The metadata is read from the first
// file of the checkpoint that has `general.architecture` and `<arch>.expert_count` (a split set keeps it in
// part 1; a folder may also hold an mmproj file). Errors name that file, the key, and expected against found.
#ifndef KT_IO_GGUF_ARCH_H_
#define KT_IO_GGUF_ARCH_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kt/io/arch.h"
#include "kt/io/gguf_experts.h"

namespace kt {

struct GgufMoeModel {
  std::string gguf_architecture;  // general.architecture, e.g. "qwen3moe".
  std::string metadata_file;      // The file the metadata was read from.
  std::string config_json;        // The equivalent Hugging Face config.json (written into converted folders).
  MoeArch arch;                   // ParseMoeConfig(config_json).
};

absl::StatusOr<GgufMoeModel> GgufMoeArch(const GgufCheckpoint& ckpt);

// The general.architecture values GgufMoeArch knows, for its error (and the docs).
std::vector<std::string> GgufMoeArchitectures();

}  // namespace kt

#endif  // KT_IO_GGUF_ARCH_H_
