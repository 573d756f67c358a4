// Architecture mapping from a Hugging Face config.json: which decoder layers are MoE, the expert count E,
// top-k, hidden size H, expert intermediate size I, the routing options the kernels need, and the names of
// the routed-expert tensors in the checkpoint.
//
// Known families (the "architectures" entry of config.json; the keys each reads are listed in arch.cc):
//
//   Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, Qwen3NextForCausalLM
//       model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight
//   Qwen3VLMoeForConditionalGeneration (keys under text_config)
//       model.language_model.layers.L.mlp.experts.gate_up_proj [E, H, 2I] + down_proj [E, I, H]
//   Qwen3_5MoeForConditionalGeneration (keys under text_config), Qwen3_5MoeForCausalLM (text only: keys at
//   the top level, layers under model.layers)
//       <layers>.L.mlp.experts.gate_up_proj [E, 2I, H] + down_proj [E, H, I] as Qwen ships them, or per
//       expert <layers>.L.mlp.experts.e.{gate,up,down}_proj.weight as transformers re-saves them: the
//       loader takes whichever the checkpoint holds (ResolveExpertLayout)
//   DeepseekV2ForCausalLM, DeepseekV3ForCausalLM (also Kimi-K2, which ships as DeepseekV3ForCausalLM with
//   model_type "kimi_k2"), DeepseekV32ForCausalLM, Glm4MoeForCausalLM, Glm4MoeLiteForCausalLM,
//   GlmMoeDsaForCausalLM (MoE layers from mlp_layer_types where the config has it, else
//   first_k_dense_replace)
//       model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight
//   Glm4vMoeForConditionalGeneration (keys under text_config)
//       model.language_model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight
//   MixtralForCausalLM, MiniMaxForCausalLM, MiniMaxText01ForCausalLM, MiniMaxM1ForCausalLM,
//   MiniMaxM2ForCausalLM
//       model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}.weight  (w1 = gate, w3 = up, w2 = down)
//   MiniMaxM3SparseForConditionalGeneration (MiniMax-M3; keys under text_config, MoE layers from
//   moe_layer_freq [0/1 per layer] or mlp_layer_types; swiglu_alpha, swiglu_limit)
//       language_model.model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}.weight as MiniMax ships them
//       (transformers' conversion_mapping renames them on load); MiniMax-M3-MXFP8: F8_E4M3 + U8 E8M0
//       `.weight_scale_inv` [N, K/32] (kt/io/hf_mx.h)
//
// In a fused layout the gate rows (or columns) come first, then the up ones: gate_up[e][0:I] is gate and
// gate_up[e][I:2I] is up ([E, 2I, H]), or gate_up[e][:, 0:I] / [:, I:2I] ([E, H, 2I]).
//
// Strict, as the rest of kt/io: a key with the wrong type or an out-of-range value, two keys that could
// each be the expert count and disagree, an unknown architecture, or a config without the MoE keys is an
// error naming the origin (the file), the key (with its "text_config." path where it is nested) and the
// expected against the found value. config.json holds fractional numbers (rms_norm_eps, 2.5 for
// routed_scaling_factor), which kt::json rejects by default; ParseMoeConfig parses with
// json::ParseOptions::allow_fractions, so they are numbers (a literal that overflows a double is a JSON
// error at its offset), and a key that wants a float also takes an integer (routed_scaling_factor: 1).
#ifndef KT_IO_ARCH_H_
#define KT_IO_ARCH_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kt {

enum class MoeFamily {
  kQwen2Moe,    // Qwen2MoeForCausalLM (Qwen1.5-MoE, Qwen2-57B-A14B): one shared expert with a sigmoid gate.
  kQwen3Moe,    // Qwen3MoeForCausalLM: no shared expert.
  kQwen3Next,   // Qwen3NextForCausalLM: one shared expert.
  kQwen3VlMoe,  // Qwen3VLMoeForConditionalGeneration: fused [E, H, 2I], no shared expert.
  kQwen35Moe,   // Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeForCausalLM: fused [E, 2I, H] (or per
                //   expert), one shared expert.
  kDeepseekV2,  // DeepseekV2ForCausalLM.
  kDeepseekV3,  // DeepseekV3ForCausalLM (DeepSeek-V3/R1, Kimi-K2), DeepseekV32ForCausalLM.
  kGlm4Moe,     // Glm4MoeForCausalLM (GLM-4.5/4.6), Glm4vMoeForConditionalGeneration,
                //   Glm4MoeLiteForCausalLM, GlmMoeDsaForCausalLM.
  kMixtral,     // MixtralForCausalLM.
  kMiniMax,     // MiniMaxForCausalLM, MiniMaxText01ForCausalLM, MiniMaxM1ForCausalLM, MiniMaxM2ForCausalLM.
  kDeepseekV4,  // DeepseekV4ForCausalLM (DeepSeek-V4-Flash/Pro): every layer MoE (hash or learned routing),
                //   experts as DeepSeek ships them: layers.L.ffn.experts.e.{w1,w3,w2} (MXFP4 + E8M0 `.scale`).
  kMiniMaxM3,   // MiniMaxM3SparseForConditionalGeneration: sigmoid routing, one shared expert, "swigluoai".
};

const char* MoeFamilyName(MoeFamily family);

enum class ExpertLayout {
  kPerExpert,         // One tensor per expert and projection: gate/up [I, H], down [H, I].
  kFusedGateUpOutIn,  // <block>.experts.gate_up_proj [E, 2I, H] and <block>.experts.down_proj [E, H, I].
  kFusedGateUpInOut,  // <block>.experts.gate_up_proj [E, H, 2I] and <block>.experts.down_proj [E, I, H].
};

enum class MoeScoring { kSoftmax, kSigmoid, kSqrtSoftplus };

// quantization_config, when config.json has one (it sits at the top level, also for VL models).
struct MoeQuantization {
  std::string quant_method;  // "fp8", "compressed-tensors", ...: as written; kt decides what it can read.
  // "fp8" only: weight_block_size ([128, 128] for DeepSeek-V3 / Kimi-K2 FP8: one F32 `<weight>_scale_inv`
  // per block of 128 output rows x 128 input columns); empty when the config gives none (per-tensor).
  std::vector<int> weight_block_size;
  std::string fmt;                // "e4m3" where given, else "".
  std::string activation_scheme;  // "dynamic" where given, else "".
};

struct MoeArch {
  std::string architecture;  // config.json "architectures"[0], e.g. "DeepseekV3ForCausalLM".
  std::string model_type;    // Top-level "model_type" ("kimi_k2" for Kimi-K2); "" when absent.
  MoeFamily family = MoeFamily::kQwen3Moe;

  int num_layers = 0;           // num_hidden_layers (decoder layers; DeepSeek MTP layers are not counted).
  std::vector<int> moe_layers;  // Ascending; the others are dense.
  int num_experts = 0;          // E, routed experts.
  int top_k = 0;                // k, num_experts_per_tok.
  int hidden = 0;               // H, hidden_size.
  int intermediate = 0;         // I, one routed expert's intermediate size.

  int num_shared_experts = 0;   // Shared (always-on) experts; 0 when none.
  int shared_intermediate = 0;  // Their combined intermediate size; 0 when none.

  MoeScoring scoring = MoeScoring::kSoftmax;
  bool norm_topk_prob = false;         // Whether the k chosen weights are renormalised to sum to 1.
  float routed_scaling_factor = 1.0f;  // Multiplies the routed experts' sum (DeepSeek, GLM); 1 elsewhere.
  int n_group = 1, topk_group = 1;     // Group-limited routing (DeepSeek-V3, GLM); 1/1 means none.
  // The experts' activation variant (MoeConfig::swiglu_alpha / swiglu_limit; 0: off): MiniMax-M3's
  // "swigluoai" gate * sigmoid(alpha * gate) * (up + 1) with gate <= limit, |up| <= limit.
  float swiglu_alpha = 0.0f, swiglu_limit = 0.0f;

  std::string layer_prefix;  // "model.layers", "model.language_model.layers", ... (as the checkpoint names them)
  std::string block;         // "mlp" or "block_sparse_moe".
  ExpertLayout layout = ExpertLayout::kPerExpert;
  std::optional<MoeQuantization> quantization;

  bool fused_experts() const { return layout != ExpertLayout::kPerExpert; }
  bool IsMoeLayer(int layer) const;
};

// Parses config.json text. `origin` (usually the file's path) starts every error message.
absl::StatusOr<MoeArch> ParseMoeConfig(absl::string_view config_json_text, absl::string_view origin);

// Reads and parses `<dir>/config.json` (errors name that path).
absl::StatusOr<MoeArch> LoadMoeConfig(const std::string& dir);

// The per-expert tensor names of routed expert `expert` in MoE layer `layer`. An error for a fused layout,
// a dense layer, or an index out of range.
struct ExpertNames {
  std::string gate, up, down;
};
absl::StatusOr<ExpertNames> ExpertTensorNames(const MoeArch& arch, int layer, int expert);

// The fused tensors of MoE layer `layer` (see ExpertLayout for their shapes); an error for a per-expert
// layout, a dense layer, or a layer out of range.
struct FusedExpertNames {
  std::string gate_up, down;
};
absl::StatusOr<FusedExpertNames> FusedExpertTensorNames(const MoeArch& arch, int layer);

// The router's weight [E, H] of MoE layer `layer`: "<prefix>.L.<block>.gate.weight".
absl::StatusOr<std::string> RouterTensorName(const MoeArch& arch, int layer);

// The block-scale tensor of an FP8 weight, as DeepSeek ships it: "<weight name>_scale_inv".
std::string Fp8ScaleInvName(absl::string_view weight_name);

// The names of every architecture ParseMoeConfig knows, in the order the unknown-architecture error lists.
std::vector<std::string> KnownMoeArchitectures();

}  // namespace kt

#endif  // KT_IO_ARCH_H_
