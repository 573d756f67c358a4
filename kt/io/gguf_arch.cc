#include "kt/io/gguf_arch.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kt/io/json.h"
#include "kt/io/status_macros.h"

namespace kt {
namespace {

// As arch.cc's limits, so that nothing the metadata says can overflow what ParseMoeConfig takes.
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxExperts = 65536;
constexpr int64_t kMaxDim = int64_t{1} << 20;

// `<arch>.<key>` metadata of one file, typed, with errors that name the file and the key.
class Meta {
 public:
  Meta(const GgufFile& file, std::string arch) : f_(file), arch_(std::move(arch)) {}

  std::string Key(absl::string_view key) const { return absl::StrCat(arch_, ".", key); }
  bool Has(absl::string_view key) const { return f_.FindMetadata(Key(key)) != nullptr; }

  absl::Status Missing(absl::string_view key, absl::string_view why) const {
    return absl::InvalidArgumentError(
        absl::StrCat("GGUF ", f_.path(), ": metadata \"", Key(key), "\" is missing (", why, ")"));
  }

  // An integer in [lo, hi] (hi_name, when given, says what bounds it); absent: `fallback`, or Missing.
  absl::StatusOr<int64_t> Int(absl::string_view key, int64_t lo, int64_t hi, std::optional<int64_t> fallback,
                              absl::string_view why, absl::string_view hi_name = "") const {
    if (!Has(key)) {
      if (fallback.has_value()) return *fallback;
      return Missing(key, why);
    }
    absl::StatusOr<int64_t> v = f_.GetInt(Key(key));  // names the file and key when not an integer
    if (!v.ok()) return v.status();
    if (*v < lo || *v > hi) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF ", f_.path(), ": metadata \"", Key(key), "\" must be an integer in [", lo, ", ",
          hi_name.empty() ? absl::StrCat(hi) : absl::StrCat(hi_name, " (", hi, ")"), "], got ", *v));
    }
    return *v;
  }

  // A positive finite number; absent: `fallback`, or Missing.
  absl::StatusOr<float> Positive(absl::string_view key, std::optional<float> fallback, absl::string_view why) const {
    if (!Has(key)) {
      if (fallback.has_value()) return *fallback;
      return Missing(key, why);
    }
    absl::StatusOr<double> v = f_.GetFloat(Key(key));
    if (!v.ok()) return v.status();
    if (!(*v > 0) || !std::isfinite(*v) || *v > 3.0e38) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF ", f_.path(), ": metadata \"", Key(key),
                                                     "\" must be a positive finite number, got ", *v));
    }
    return static_cast<float>(*v);
  }

  absl::StatusOr<bool> Bool(absl::string_view key, bool fallback) const {
    if (!Has(key)) return fallback;
    return f_.GetBool(Key(key));
  }

 private:
  const GgufFile& f_;
  std::string arch_;
};

// A float as JSON text that reads back as the same float (9 significant digits always do).
std::string FloatText(float f) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(f));
  return buf;
}

const char* Bool(bool b) { return b ? "true" : "false"; }

// The file holding the model's metadata: the first with general.architecture and <arch>.expert_count, else
// the first with general.architecture (its arch then says what is missing).
const GgufFile* MetadataFile(const GgufCheckpoint& ckpt, std::string* arch) {
  const GgufFile* first = nullptr;
  for (const auto& f : ckpt.files()) {
    absl::StatusOr<std::string> a = f->GetString("general.architecture");
    if (!a.ok()) continue;
    if (f->FindMetadata(absl::StrCat(*a, ".expert_count")) != nullptr) {
      *arch = *a;
      return f.get();
    }
    if (first == nullptr) {
      first = f.get();
      *arch = *a;
    }
  }
  return first;
}

// The Hugging Face config keys of a Qwen2-MoE / Qwen3-MoE GGUF, "architectures" first.
absl::StatusOr<std::string> QwenKeys(const Meta& m, const std::string& arch, int64_t experts, int64_t inter) {
  std::string keys;
  const bool qwen2 = arch == "qwen2moe";
  int64_t shared = 0;
  if (qwen2) {
    KT_ASSIGN_OR_RETURN(shared, m.Int("expert_shared_feed_forward_length", 0, kMaxDim, 0, ""));
  }
  absl::StrAppend(&keys, "\"architectures\": [", qwen2 ? "\"Qwen2MoeForCausalLM\"" : "\"Qwen3MoeForCausalLM\"",
                  "], \"model_type\": ", qwen2 ? "\"qwen2_moe\"" : "\"qwen3_moe\"", ", \"num_experts\": ", experts,
                  ", \"moe_intermediate_size\": ", inter,
                  ", \"decoder_sparse_step\": 1, \"mlp_only_layers\": [], \"norm_topk_prob\": ",
                  // llama.cpp renormalises the top-k weights for qwen3moe (norm_w true) and not for qwen2moe,
                  // as the released configs say.
                  Bool(!qwen2));
  if (qwen2) absl::StrAppend(&keys, ", \"shared_expert_intermediate_size\": ", shared);
  return keys;
}

// The same for a DeepSeek-V2/V3 (deepseek2) or GLM-4 MoE (glm4moe) GGUF.
absl::StatusOr<std::string> DeepseekKeys(const Meta& m, const std::string& arch, int64_t experts, int64_t inter,
                                         int64_t first_moe) {
  std::string keys;
  const bool glm = arch == "glm4moe";
  int64_t gating = 0, shared = 0, groups = 1, groups_used = 1;
  KT_ASSIGN_OR_RETURN(gating, m.Int("expert_gating_func", 0, 2, 0, "", "2 (sigmoid)"));
  // 0 (none, or absent): what llama.cpp assumes then: softmax for DeepSeek-V2/V2.5 files, sigmoid for GLM.
  const bool sigmoid = gating == 2 || (gating == 0 && glm);
  const bool v3 = !glm && sigmoid;
  float scale = 1.0f;
  bool norm = false;
  KT_ASSIGN_OR_RETURN(shared, m.Int("expert_shared_count", 0, 64, 0, ""));
  KT_ASSIGN_OR_RETURN(scale, m.Positive("expert_weights_scale", v3 ? std::nullopt : std::optional<float>(1.0f),
                                             "DeepSeek-V3 scales the routed experts' sum by it"));
  KT_ASSIGN_OR_RETURN(norm, m.Bool("expert_weights_norm", false));
  KT_ASSIGN_OR_RETURN(groups, m.Int("expert_group_count", 1, experts, 1, "", "expert_count"));
  KT_ASSIGN_OR_RETURN(groups_used, m.Int("expert_group_used_count", 1, groups, groups, "",
                                              "expert_group_count"));
  absl::StrAppend(&keys, "\"architectures\": [",
                  glm  ? "\"Glm4MoeForCausalLM\"], \"model_type\": \"glm4_moe\""
                  : v3 ? "\"DeepseekV3ForCausalLM\"], \"model_type\": \"deepseek_v3\""
                       : "\"DeepseekV2ForCausalLM\"], \"model_type\": \"deepseek_v2\"",
                  ", \"n_routed_experts\": ", experts, ", \"moe_intermediate_size\": ", inter,
                  ", \"first_k_dense_replace\": ", first_moe, ", \"n_shared_experts\": ", shared,
                  ", \"routed_scaling_factor\": ", FloatText(scale), ", \"norm_topk_prob\": ", Bool(norm),
                  ", \"scoring_func\": ", sigmoid ? "\"sigmoid\"" : "\"softmax\"", ", \"n_group\": ", groups,
                  ", \"topk_group\": ", groups_used);
  // llama.cpp's deepseek2 has every layer after the leading dense ones MoE.
  if (!glm) absl::StrAppend(&keys, ", \"moe_layer_freq\": 1");
  if (!glm && !v3 && groups > 1) absl::StrAppend(&keys, ", \"topk_method\": \"group_limited_greedy\"");
  return keys;
}

}  // namespace

std::vector<std::string> GgufMoeArchitectures() {
  return {"qwen2moe", "qwen3moe", "deepseek2", "glm4moe", "llama (Mixtral: with llama.expert_count)"};
}

absl::StatusOr<GgufMoeModel> GgufMoeArch(const GgufCheckpoint& ckpt) {
  GgufMoeModel model;
  const GgufFile* file = MetadataFile(ckpt, &model.gguf_architecture);
  if (file == nullptr) {
    std::vector<std::string> paths;
    for (const auto& f : ckpt.files()) paths.push_back(f->path());
    return absl::InvalidArgumentError(absl::StrCat("GGUF checkpoint ", ckpt.path(),
                                                   ": no file has metadata \"general.architecture\" (files: ",
                                                   absl::StrJoin(paths, ", "), ")"));
  }
  model.metadata_file = file->path();
  const std::string& arch = model.gguf_architecture;
  const bool qwen = arch == "qwen2moe" || arch == "qwen3moe";
  const bool deepseek = arch == "deepseek2" || arch == "glm4moe";
  const bool mixtral = arch == "llama";
  if (!qwen && !deepseek && !mixtral) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF ", file->path(), ": general.architecture is \"", arch,
                                                   "\", which kt convert does not map to a MoE model; known: ",
                                                   absl::StrJoin(GgufMoeArchitectures(), ", ")));
  }
  const Meta m(*file, arch);
  if (mixtral && !m.Has("expert_count")) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF ", file->path(),
                                                   ": a dense llama model (no metadata \"llama.expert_count\"): it "
                                                   "has no routed experts to convert"));
  }
  int64_t blocks = 0, nextn = 0, hidden = 0, experts = 0, top_k = 0, first_moe = 0, inter = 0;
  KT_ASSIGN_OR_RETURN(blocks, m.Int("block_count", 1, kMaxLayers, std::nullopt, "the number of decoder layers"));
  // GLM's GGUFs count the multi-token-prediction layers they append in block_count; Hugging Face's
  // num_hidden_layers does not, and kt serves only the decoder layers.
  KT_ASSIGN_OR_RETURN(nextn, m.Int("nextn_predict_layers", 0, blocks - 1, 0, "", "block_count - 1"));
  const int64_t layers = blocks - nextn;
  KT_ASSIGN_OR_RETURN(hidden, m.Int("embedding_length", 1, kMaxDim, std::nullopt, "the hidden size"));
  KT_ASSIGN_OR_RETURN(experts, m.Int("expert_count", 1, kMaxExperts, std::nullopt, "the routed expert count"));
  KT_ASSIGN_OR_RETURN(top_k, m.Int("expert_used_count", 1, experts, std::nullopt,
                                        "how many experts each token uses", "expert_count"));
  if (deepseek) {
    KT_ASSIGN_OR_RETURN(first_moe, m.Int("leading_dense_block_count", 0, layers - 1, std::nullopt,
                                              "how many leading layers are dense", "the layer count - 1"));
  }
  if (mixtral) {
    KT_ASSIGN_OR_RETURN(inter, m.Int("feed_forward_length", 1, kMaxDim, std::nullopt,
                                          "the experts' intermediate size"));
  } else if (m.Has("expert_feed_forward_length")) {
    KT_ASSIGN_OR_RETURN(inter, m.Int("expert_feed_forward_length", 1, kMaxDim, std::nullopt, ""));
  } else {
    // Older conversions omit it; llama.cpp then takes the experts' tensors' shape, as here.
    const std::string gate = absl::StrCat("blk.", first_moe, ".ffn_gate_exps.weight");
    const GgufTensorInfo* t = ckpt.Find(gate).second;
    if (t == nullptr || t->dims.size() != 3 || t->dims[1] < 1 || t->dims[1] > static_cast<uint64_t>(kMaxDim)) {
      return m.Missing("expert_feed_forward_length",
                       absl::StrCat("the experts' intermediate size; nor does tensor ", gate, " give it"));
    }
    inter = static_cast<int64_t>(t->dims[1]);
  }

  // The family's keys; then one object with "architectures" first, as Hugging Face writes it.
  std::string keys;
  if (qwen) {
    KT_ASSIGN_OR_RETURN(keys, QwenKeys(m, arch, experts, inter));
  } else if (deepseek) {
    KT_ASSIGN_OR_RETURN(keys, DeepseekKeys(m, arch, experts, inter, first_moe));
  } else {
    keys = absl::StrCat("\"architectures\": [\"MixtralForCausalLM\"], \"model_type\": \"mixtral\"",
                        ", \"num_local_experts\": ", experts, ", \"intermediate_size\": ", inter);
  }
  model.config_json = absl::StrCat("{", keys, ", \"num_hidden_layers\": ", layers, ", \"hidden_size\": ", hidden,
                                   ", \"num_experts_per_tok\": ", top_k,
                                   ", \"kt_converted_from_gguf\": ", json::Quote(arch), "}\n");
  absl::StatusOr<MoeArch> parsed =
      ParseMoeConfig(model.config_json, absl::StrCat("GGUF ", file->path(), " (its metadata as config.json)"));
  if (!parsed.ok()) return parsed.status();
  model.arch = *std::move(parsed);
  return model;
}

}  // namespace kt
