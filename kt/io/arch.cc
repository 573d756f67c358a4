#include "kt/io/arch.h"

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "kt/io/json.h"
#include "kt/io/status_macros.h"

namespace kt {
namespace {

// config.json files are a few KB; anything near this is not a config.
constexpr size_t kMaxConfigBytes = size_t{16} << 20;
constexpr int64_t kMaxLayers = 4096;
constexpr int64_t kMaxExperts = 65536;
constexpr int64_t kMaxDim = int64_t{1} << 20;

// ---- Typed access with messages that name the key ------------------------------------------------------

// A fractional number as an error message shows it: the shortest text that reads back as the same double,
// with ".0" where that would look like an integer ("got 64.0" for hidden_size 64.0, not "got 64").
std::string DoubleText(double d) {
  char buf[64];
  const std::to_chars_result r = std::to_chars(buf, buf + sizeof(buf), d);
  std::string text(buf, r.ec == std::errc() ? r.ptr : buf);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

class Reader {
 public:
  Reader(absl::string_view origin, const json::Value* object, std::string path)
      : origin_(origin), object_(object), path_(std::move(path)) {}

  const json::Value* object() const { return object_; }
  const std::string& path() const { return path_; }
  std::string Key(absl::string_view key) const { return absl::StrCat(path_, key); }
  bool Has(absl::string_view key) const {
    const json::Value* v = object_->Find(key);
    return v != nullptr && !v->is_null();
  }
  const json::Value* Get(absl::string_view key) const { return object_->Find(key); }

  std::string Describe(const json::Value& v) const {
    switch (v.type()) {
      case json::Value::Type::kNull:
        return "null";
      case json::Value::Type::kBool:
        return v.as_bool() ? "true" : "false";
      case json::Value::Type::kInt:
        return absl::StrCat(v.as_int());
      case json::Value::Type::kDouble:
        return DoubleText(v.as_double());
      case json::Value::Type::kString: {
        const std::string& s = v.as_string();
        if (s.size() > 48) return absl::StrCat("a string ", json::Quote(s.substr(0, 48)), "...");
        return absl::StrCat("the string ", json::Quote(s));
      }
      case json::Value::Type::kArray:
        return absl::StrCat("an array of ", v.elements().size());
      case json::Value::Type::kObject:
        return "an object";
    }
    return "?";
  }

  absl::Status Error(absl::string_view key, absl::string_view expected, const json::Value& got) const {
    return absl::InvalidArgumentError(
        absl::StrCat(origin_, ": ", Key(key), " must be ", expected, ", got ", Describe(got)));
  }
  absl::Status Missing(absl::string_view key, absl::string_view why) const {
    return absl::InvalidArgumentError(absl::StrCat(origin_, ": ", Key(key), " is missing (", why, ")"));
  }

  static std::string RangeText(int64_t lo, int64_t hi, absl::string_view hi_name) {
    const std::string bound = hi_name.empty() ? absl::StrCat(hi) : absl::StrCat(hi_name, " (", hi, ")");
    if (lo == 1) return absl::StrCat("a positive integer <= ", bound);
    if (lo == 0) return absl::StrCat("a non-negative integer <= ", bound);
    return absl::StrCat("an integer in [", lo, ", ", bound, "]");
  }

  // An integer in [lo, hi]. Absent or null: `fallback`, or an error when there is none.
  absl::StatusOr<int> Int(absl::string_view key, int64_t lo, int64_t hi, std::optional<int> fallback,
                          absl::string_view why_required = "", absl::string_view hi_name = "") const {
    const json::Value* v = Get(key);
    if (v == nullptr || v->is_null()) {
      if (fallback.has_value()) return *fallback;
      return Missing(key, why_required);
    }
    return IntValue(key, *v, lo, hi, hi_name);
  }

  absl::StatusOr<int> IntValue(absl::string_view key, const json::Value& v, int64_t lo, int64_t hi,
                               absl::string_view hi_name = "") const {
    if (!v.is_int() || v.as_int() < lo || v.as_int() > hi) return Error(key, RangeText(lo, hi, hi_name), v);
    return static_cast<int>(v.as_int());
  }

  // A finite number (integer or fractional) > 0.
  absl::StatusOr<float> PositiveNumber(absl::string_view key, std::optional<float> fallback,
                                       absl::string_view why_required = "") const {
    const json::Value* v = Get(key);
    if (v == nullptr || v->is_null()) {
      if (fallback.has_value()) return *fallback;
      return Missing(key, why_required);
    }
    double d = 0;
    if (v->is_int()) {
      d = static_cast<double>(v->as_int());
    } else if (v->is_double()) {
      d = v->as_double();  // Finite: the parser rejects literals that overflow a double.
    } else {
      return Error(key, "a positive number", *v);
    }
    if (!(d > 0) || !std::isfinite(d) || d > 3.0e38) return Error(key, "a positive finite number", *v);
    return static_cast<float>(d);
  }

  absl::StatusOr<bool> Bool(absl::string_view key, bool fallback) const {
    const json::Value* v = Get(key);
    if (v == nullptr || v->is_null()) return fallback;
    if (!v->is_bool()) return Error(key, "true or false", *v);
    return v->as_bool();
  }

  // A string; "" when absent or null.
  absl::StatusOr<std::string> String(absl::string_view key) const {
    const json::Value* v = Get(key);
    if (v == nullptr || v->is_null()) return std::string();
    if (!v->is_string()) return Error(key, "a string", *v);
    return v->as_string();
  }

 private:
  absl::string_view origin_;
  const json::Value* object_;
  std::string path_;
};

// ---- The families ---------------------------------------------------------------------------------------

struct ArchSpec {
  const char* name;
  MoeFamily family;
  bool text_config;  // MoE keys under "text_config", layers under model.language_model.layers.
};

// The order of the unknown-architecture error.
constexpr ArchSpec kArchs[] = {
    {"Qwen2MoeForCausalLM", MoeFamily::kQwen2Moe, false},
    {"Qwen3MoeForCausalLM", MoeFamily::kQwen3Moe, false},
    {"Qwen3NextForCausalLM", MoeFamily::kQwen3Next, false},
    {"Qwen3VLMoeForConditionalGeneration", MoeFamily::kQwen3VlMoe, true},
    {"Qwen3_5MoeForConditionalGeneration", MoeFamily::kQwen35Moe, true},
    {"Qwen3_5MoeForCausalLM", MoeFamily::kQwen35Moe, false},
    {"DeepseekV2ForCausalLM", MoeFamily::kDeepseekV2, false},
    {"DeepseekV3ForCausalLM", MoeFamily::kDeepseekV3, false},
    {"DeepseekV32ForCausalLM", MoeFamily::kDeepseekV3, false},
    {"Glm4MoeForCausalLM", MoeFamily::kGlm4Moe, false},
    {"Glm4MoeLiteForCausalLM", MoeFamily::kGlm4Moe, false},
    {"GlmMoeDsaForCausalLM", MoeFamily::kGlm4Moe, false},
    {"Glm4vMoeForConditionalGeneration", MoeFamily::kGlm4Moe, true},
    {"MixtralForCausalLM", MoeFamily::kMixtral, false},
    {"MiniMaxForCausalLM", MoeFamily::kMiniMax, false},
    {"MiniMaxText01ForCausalLM", MoeFamily::kMiniMax, false},
    {"MiniMaxM1ForCausalLM", MoeFamily::kMiniMax, false},
    {"MiniMaxM2ForCausalLM", MoeFamily::kMiniMax, false},
    {"DeepseekV4ForCausalLM", MoeFamily::kDeepseekV4, false},
    {"MiniMaxM3SparseForConditionalGeneration", MoeFamily::kMiniMaxM3, true},
};

bool IsQwen(MoeFamily f) {
  return f == MoeFamily::kQwen2Moe || f == MoeFamily::kQwen3Moe || f == MoeFamily::kQwen3Next ||
         f == MoeFamily::kQwen3VlMoe || f == MoeFamily::kQwen35Moe;
}
bool IsDeepseekStyle(MoeFamily f) {
  return f == MoeFamily::kDeepseekV2 || f == MoeFamily::kDeepseekV3 || f == MoeFamily::kGlm4Moe;
}
bool IsMiniMax(MoeFamily f) { return f == MoeFamily::kMiniMax || f == MoeFamily::kMiniMaxM3; }
bool IsMixtralStyle(MoeFamily f) { return f == MoeFamily::kMixtral || IsMiniMax(f); }

// The routed-expert keys a family reads: the expert count (one of `count_keys`), top-k, intermediate size.
struct MoeKeys {
  std::vector<const char*> count_keys;
  const char* top_k_key = "num_experts_per_tok";
  const char* intermediate_key = "moe_intermediate_size";
};

MoeKeys KeysFor(MoeFamily f) {
  MoeKeys keys;
  if (IsQwen(f)) {
    // Qwen's own configs say num_experts; transformers 5 writes num_local_experts instead (the qwen3_moe
    // fixture, saved by transformers 5.17, has only num_local_experts). Both are accepted; if both are
    // present they must agree.
    keys.count_keys = {"num_experts", "num_local_experts"};
  } else if (IsDeepseekStyle(f) || f == MoeFamily::kDeepseekV4) {
    keys.count_keys = {"n_routed_experts"};
  } else {
    keys.count_keys = {"num_local_experts"};
    keys.intermediate_key = "intermediate_size";  // Mixtral and MiniMax: the experts' size, no dense MLP.
  }
  return keys;
}

std::string LookedFor(const MoeKeys& keys) {
  return absl::StrCat(absl::StrJoin(keys.count_keys, " or "), ", ", keys.top_k_key, ", ",
                      keys.intermediate_key);
}

absl::Status CheckRoutingGroups(const Reader& r, MoeArch* arch) {
  KT_ASSIGN_OR_RETURN(arch->n_group, r.Int("n_group", 1, arch->num_experts, 1, "", "n_routed_experts"));
  KT_ASSIGN_OR_RETURN(arch->topk_group, r.Int("topk_group", 1, arch->n_group, arch->n_group, "", "n_group"));
  if (arch->num_experts % arch->n_group != 0) {
    return r.Error("n_group", absl::StrCat("a divisor of n_routed_experts (", arch->num_experts, ")"),
                   *r.Get("n_group"));
  }
  return absl::OkStatus();
}

absl::Status ParseQuantization(absl::string_view origin, const json::Value& root, MoeArch* arch) {
  const json::Value* q = root.Find("quantization_config");
  if (q == nullptr || q->is_null()) return absl::OkStatus();
  Reader top(origin, &root, "");
  if (!q->is_object()) return top.Error("quantization_config", "an object", *q);
  Reader r(origin, q, "quantization_config.");
  MoeQuantization quant;
  KT_ASSIGN_OR_RETURN(quant.quant_method, r.String("quant_method"));
  if (quant.quant_method.empty()) return r.Missing("quant_method", "a quantization_config names its method");
  if (quant.quant_method == "fp8") {
    KT_ASSIGN_OR_RETURN(quant.fmt, r.String("fmt"));
    KT_ASSIGN_OR_RETURN(quant.activation_scheme, r.String("activation_scheme"));
    const json::Value* bs = r.Get("weight_block_size");
    if (bs != nullptr && !bs->is_null()) {
      const std::string expected = "an array of 2 positive integers <= 65536 ([rows, columns])";
      if (!bs->is_array() || bs->elements().size() != 2) return r.Error("weight_block_size", expected, *bs);
      for (const json::Value& e : bs->elements()) {
        if (!e.is_int() || e.as_int() < 1 || e.as_int() > 65536) {
          return r.Error("weight_block_size", expected, e);
        }
        quant.weight_block_size.push_back(static_cast<int>(e.as_int()));
      }
    }
  }
  arch->quantization = std::move(quant);
  return absl::OkStatus();
}

// ---- ParseMoeConfig's steps ------------------------------------------------------------------------------

// transformers' Qwen rule: MoE iff the layer is not in mlp_only_layers and (layer + 1) % decoder_sparse_step
// == 0. Fills is_moe; returns the rule as the no-MoE-layer error states it.
absl::StatusOr<std::string> QwenMoeLayers(const Reader& r, const MoeArch& arch, std::vector<bool>* is_moe) {
  std::vector<bool>& moe = *is_moe;
  int step = 1;
  KT_ASSIGN_OR_RETURN(step, r.Int("decoder_sparse_step", 1, kMaxLayers, 1));
  const json::Value* only = r.Get("mlp_only_layers");
  std::vector<int> dense;
  if (only != nullptr && !only->is_null()) {
    const std::string expected =
        absl::StrCat("an array of layer indices in [0, num_hidden_layers (", arch.num_layers, "))");
    if (!only->is_array()) return r.Error("mlp_only_layers", expected, *only);
    for (const json::Value& e : only->elements()) {
      if (!e.is_int() || e.as_int() < 0 || e.as_int() >= arch.num_layers) {
        return r.Error("mlp_only_layers", expected, e);
      }
      dense.push_back(static_cast<int>(e.as_int()));
    }
  }
  for (int i = 0; i < arch.num_layers; ++i) moe[i] = (i + 1) % step == 0;
  for (int d : dense) moe[d] = false;
  return absl::StrCat("decoder_sparse_step = ", step, ", mlp_only_layers = [", absl::StrJoin(dense, ", "),
                      "]");
}

absl::StatusOr<std::string> MlpLayerTypes(const Reader& r, absl::string_view origin, const MoeArch& arch,
                                          std::vector<bool>* is_moe) {
  std::vector<bool>& moe = *is_moe;
  // transformers' newer DeepSeek/GLM configs (DeepSeek-V3.2, GLM-4.7-Flash, GLM-5) list each layer's MLP,
  // "dense" or "sparse", and their models follow that list; first_k_dense_replace, where also given, must
  // say the same.
  const json::Value& types = *r.Get("mlp_layer_types");
  const std::string expected = absl::StrCat("an array of num_hidden_layers (", arch.num_layers,
                                            ") strings, each \"dense\" or \"sparse\"");
  if (!types.is_array() || types.elements().size() != static_cast<size_t>(arch.num_layers)) {
    return r.Error("mlp_layer_types", expected, types);
  }
  for (int i = 0; i < arch.num_layers; ++i) {
    const json::Value& t = types.elements()[i];
    if (!t.is_string() || (t.as_string() != "dense" && t.as_string() != "sparse")) {
      return r.Error("mlp_layer_types", expected, t);
    }
    moe[i] = t.as_string() == "sparse";
  }
  if (r.Has("first_k_dense_replace")) {
    int first_dense = 0;
    KT_ASSIGN_OR_RETURN(first_dense, r.Int("first_k_dense_replace", 0, arch.num_layers, std::nullopt));
    for (int i = 0; i < arch.num_layers; ++i) {
      if (moe[i] != (i >= first_dense)) {
        return absl::InvalidArgumentError(absl::StrCat(
            origin, ": ", r.Key("mlp_layer_types"), " says layer ", i, " is ", moe[i] ? "sparse" : "dense",
            " but ", r.Key("first_k_dense_replace"), " = ", first_dense, " says ", moe[i] ? "dense" : "MoE",
            "; which layers are MoE is ambiguous"));
      }
    }
  }
  return std::string("mlp_layer_types");
}

absl::StatusOr<std::string> DeepseekMoeLayers(const Reader& r, const MoeArch& arch, std::vector<bool>* is_moe) {
  const MoeFamily f = arch.family;
  // transformers: MoE iff layer >= first_k_dense_replace (and, DeepSeek only, layer % moe_layer_freq == 0).
  // first_k_dense_replace is required: its transformers default differs by family (V2 0, V3 3, GLM 1),
  // and every released config states it.
  int first_dense = 0, freq = 1;
  KT_ASSIGN_OR_RETURN(first_dense, r.Int("first_k_dense_replace", 0, arch.num_layers, std::nullopt,
                                         absl::StrCat(arch.architecture,
                                                      " configs state how many leading layers are dense"),
                                         "num_hidden_layers"));
  if (f == MoeFamily::kGlm4Moe) {
    // Glm4Moe has no moe_layer_freq; a config that sets it to something else means something kt does not
    // know.
    KT_ASSIGN_OR_RETURN(freq, r.Int("moe_layer_freq", 1, 1, 1));
  } else {
    KT_ASSIGN_OR_RETURN(freq, r.Int("moe_layer_freq", 1, kMaxLayers, 1));
  }
  for (int i = 0; i < arch.num_layers; ++i) (*is_moe)[i] = i >= first_dense && i % freq == 0;
  return absl::StrCat("first_k_dense_replace = ", first_dense, ", moe_layer_freq = ", freq);
}

// MiniMax-M3 (transformers' MiniMaxM3VLTextConfig): mlp_layer_types where given, else moe_layer_freq (one 0 or
// 1 per layer, 1 = MoE; the released config's first 3 layers are dense), else every layer.
absl::StatusOr<std::string> MiniMaxM3MoeLayers(const Reader& r, const MoeArch& arch, std::vector<bool>* is_moe) {
  if (!r.Has("moe_layer_freq")) return std::string("every layer");
  const json::Value& freq = *r.Get("moe_layer_freq");
  const std::string expected =
      absl::StrCat("an array of num_hidden_layers (", arch.num_layers, ") integers, each 0 (dense) or 1 (MoE)");
  if (!freq.is_array() || freq.elements().size() != static_cast<size_t>(arch.num_layers)) {
    return r.Error("moe_layer_freq", expected, freq);
  }
  for (int i = 0; i < arch.num_layers; ++i) {
    const json::Value& v = freq.elements()[i];
    if (!v.is_int() || (v.as_int() != 0 && v.as_int() != 1)) return r.Error("moe_layer_freq", expected, v);
    (*is_moe)[i] = v.as_int() == 1;
  }
  return std::string("moe_layer_freq");
}

// arch.moe_layers, by the family's rule.
absl::Status ReadMoeLayers(const Reader& r, absl::string_view origin, absl::string_view path, MoeArch* arch) {
  const MoeFamily f = arch->family;
  std::vector<bool> is_moe(static_cast<size_t>(arch->num_layers), true);
  absl::StatusOr<std::string> rule = std::string("every layer");
  if (IsQwen(f)) {
    rule = QwenMoeLayers(r, *arch, &is_moe);
  } else if ((IsDeepseekStyle(f) || f == MoeFamily::kMiniMaxM3) && r.Has("mlp_layer_types")) {
    rule = MlpLayerTypes(r, origin, *arch, &is_moe);
  } else if (IsDeepseekStyle(f)) {
    rule = DeepseekMoeLayers(r, *arch, &is_moe);
  } else if (f == MoeFamily::kMiniMaxM3) {
    rule = MiniMaxM3MoeLayers(r, *arch, &is_moe);
  }
  if (!rule.ok()) return rule.status();
  for (int i = 0; i < arch->num_layers; ++i) {
    if (is_moe[i]) arch->moe_layers.push_back(i);
  }
  if (arch->moe_layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": no MoE layer among the ", arch->num_layers,
                                                   " layers (", path, *rule, ")"));
  }
  return absl::OkStatus();
}

// E from whichever of the family's count keys the config has (they must agree), then k and I.
absl::Status ReadExpertShape(const Reader& r, absl::string_view origin, const MoeKeys& keys,
                             const std::string& needed, MoeArch* arch) {
  MoeArch& a = *arch;
  const char* count_key = nullptr;
  for (const char* k : keys.count_keys) {
    if (!r.Has(k)) continue;
    int n = 0;
    KT_ASSIGN_OR_RETURN(n, r.Int(k, 1, kMaxExperts, std::nullopt));
    if (count_key != nullptr && n != a.num_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": ", r.Key(count_key), " (", a.num_experts, ") and ", r.Key(k), " (", n,
                       ") disagree; which one is the expert count is ambiguous"));
    }
    count_key = k;
    a.num_experts = n;
  }
  if (count_key == nullptr) return r.Missing(keys.count_keys[0], needed);
  KT_ASSIGN_OR_RETURN(a.top_k,
                      r.Int(keys.top_k_key, 1, a.num_experts, std::nullopt, needed, count_key));
  KT_ASSIGN_OR_RETURN(a.intermediate, r.Int(keys.intermediate_key, 1, kMaxDim, std::nullopt, needed));
  return absl::OkStatus();
}

absl::Status ReadSharedExperts(const Reader& r, MoeArch* arch) {
  MoeArch& a = *arch;
  const MoeFamily f = a.family;
  if (f == MoeFamily::kQwen2Moe || f == MoeFamily::kQwen3Next || f == MoeFamily::kQwen35Moe) {
    KT_ASSIGN_OR_RETURN(a.shared_intermediate, r.Int("shared_expert_intermediate_size", 0, kMaxDim, 0));
    a.num_shared_experts = a.shared_intermediate > 0 ? 1 : 0;
  } else if (IsDeepseekStyle(f) || f == MoeFamily::kDeepseekV4) {
    KT_ASSIGN_OR_RETURN(a.num_shared_experts, r.Int("n_shared_experts", 0, 64, 0));
    a.shared_intermediate = a.num_shared_experts * a.intermediate;  // <= 2^6 * 2^20: fits.
  } else if (f == MoeFamily::kMiniMaxM3) {  // MiniMaxM3VLTextConfig's default: one of 3072
    KT_ASSIGN_OR_RETURN(a.shared_intermediate, r.Int("shared_intermediate_size", 0, kMaxDim, 3072));
    a.num_shared_experts = a.shared_intermediate > 0 ? 1 : 0;
  }
  return absl::OkStatus();
}

// Scoring, top-k renormalisation, scaling and groups. The defaults, used when a key is absent, are
// transformers' config-class defaults.
absl::Status ReadRouting(const Reader& r, MoeArch* arch) {
  MoeArch& a = *arch;
  const MoeFamily f = a.family;
  if (f == MoeFamily::kMixtral) {
    a.norm_topk_prob = true;  // Mixtral always renormalises the top-k softmax weights.
  } else {
    // false for Qwen2-MoE, Qwen3-MoE and DeepSeek-V2; true for Qwen3-Next, Qwen3.5-MoE, Qwen3-VL-MoE (whose
    // block renormalises; the key is honoured if present), DeepSeek-V3, GLM-4-MoE and MiniMax.
    const bool fallback =
        !(f == MoeFamily::kQwen2Moe || f == MoeFamily::kQwen3Moe || f == MoeFamily::kDeepseekV2);
    KT_ASSIGN_OR_RETURN(a.norm_topk_prob, r.Bool("norm_topk_prob", fallback));
  }
  const bool sigmoid_default = f == MoeFamily::kDeepseekV3 || f == MoeFamily::kGlm4Moe ||
                               a.architecture == "MiniMaxM2ForCausalLM" || f == MoeFamily::kMiniMaxM3;
  a.scoring = sigmoid_default ? MoeScoring::kSigmoid : MoeScoring::kSoftmax;
  if (f == MoeFamily::kDeepseekV4) a.scoring = MoeScoring::kSqrtSoftplus;  // DeepseekV4Config's default
  if (IsDeepseekStyle(f) || IsMiniMax(f) || f == MoeFamily::kDeepseekV4) {
    std::string scoring;
    KT_ASSIGN_OR_RETURN(scoring, r.String("scoring_func"));
    if (scoring == "softmax") {
      a.scoring = MoeScoring::kSoftmax;
    } else if (scoring == "sigmoid") {
      a.scoring = MoeScoring::kSigmoid;
    } else if (scoring == "sqrtsoftplus" && f == MoeFamily::kDeepseekV4) {
      a.scoring = MoeScoring::kSqrtSoftplus;
    } else if (!scoring.empty()) {
      return r.Error("scoring_func", "\"softmax\" or \"sigmoid\"", *r.Get("scoring_func"));
    }
  }
  if (f == MoeFamily::kDeepseekV3) {
    // Required: transformers' DeepseekV3Config defaults it to 2.5, not 1, so an absent key is ambiguous.
    KT_ASSIGN_OR_RETURN(a.routed_scaling_factor,
                        r.PositiveNumber("routed_scaling_factor", std::nullopt,
                                         "DeepSeek-V3 scales the routed experts' sum by it"));
  } else if (IsDeepseekStyle(f)) {
    KT_ASSIGN_OR_RETURN(a.routed_scaling_factor, r.PositiveNumber("routed_scaling_factor", 1.0f));
  } else if (f == MoeFamily::kDeepseekV4) {
    KT_ASSIGN_OR_RETURN(a.routed_scaling_factor, r.PositiveNumber("routed_scaling_factor", 1.5f));
  } else if (f == MoeFamily::kMiniMaxM3) {  // MiniMaxM3VLTextConfig's defaults
    KT_ASSIGN_OR_RETURN(a.routed_scaling_factor, r.PositiveNumber("routed_scaling_factor", 2.0f));
    KT_ASSIGN_OR_RETURN(a.swiglu_alpha, r.PositiveNumber("swiglu_alpha", 1.702f));
    KT_ASSIGN_OR_RETURN(a.swiglu_limit, r.PositiveNumber("swiglu_limit", 7.0f));
    // vLLM reads (up + swiglu_beta); kt computes (up + 1), as transformers does.
    const json::Value* beta = r.Get("swiglu_beta");
    if (beta != nullptr && !beta->is_null() && !(beta->is_int() ? beta->as_int() == 1 : beta->as_double() == 1.0)) {
      return r.Error("swiglu_beta", "1 (kt computes gate * sigmoid(alpha * gate) * (up + 1))", *beta);
    }
  }
  if (f == MoeFamily::kDeepseekV3 || f == MoeFamily::kGlm4Moe) {
    absl::Status s = CheckRoutingGroups(r, arch);
    if (!s.ok()) return s;
  } else if (f == MoeFamily::kDeepseekV2) {
    std::string method;
    KT_ASSIGN_OR_RETURN(method, r.String("topk_method"));
    if (method == "group_limited_greedy") {
      absl::Status s = CheckRoutingGroups(r, arch);
      if (!s.ok()) return s;
    } else if (!method.empty() && method != "greedy") {
      return r.Error("topk_method", "\"greedy\" or \"group_limited_greedy\"", *r.Get("topk_method"));
    }
  }
  return absl::OkStatus();
}

// "architectures": exactly one known name; its spec.
absl::StatusOr<const ArchSpec*> ReadArchitecture(const Reader& top, const json::Value& root,
                                                 absl::string_view origin, MoeArch* arch) {
  const json::Value* archs = root.Find("architectures");
  if (archs == nullptr || archs->is_null()) {
    return top.Missing("architectures", "it names the model class, e.g. [\"Qwen3MoeForCausalLM\"]");
  }
  if (!archs->is_array() || archs->elements().size() != 1 || !archs->elements()[0].is_string()) {
    return top.Error("architectures", "an array of one string",
                     archs->is_array() && archs->elements().size() == 1 ? archs->elements()[0] : *archs);
  }
  arch->architecture = archs->elements()[0].as_string();
  for (const ArchSpec& a : kArchs) {
    if (arch->architecture == a.name) {
      arch->family = a.family;
      return &a;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(origin, ": unknown architecture ",
                                                 json::Quote(arch->architecture), "; known: ",
                                                 absl::StrJoin(KnownMoeArchitectures(), ", ")));
}

}  // namespace

absl::StatusOr<MoeArch> ParseMoeConfig(absl::string_view text, absl::string_view origin) {
  if (text.size() > kMaxConfigBytes) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": ", text.size(), " bytes; a config.json over ",
                                                   kMaxConfigBytes, " bytes is not a config"));
  }
  // config.json has fractional numbers (rms_norm_eps 1e-06, rope_theta 1000000.0, routed_scaling_factor 2.5).
  json::ParseOptions options;
  options.allow_fractions = true;
  absl::StatusOr<json::Value> parsed = json::Parse(text, options);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": ", parsed.status().message()));
  }
  const json::Value& root = *parsed;
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": expected a JSON object, found ", json::TypeName(root.type())));
  }
  Reader top(origin, &root, "");

  MoeArch arch;
  const ArchSpec* spec = nullptr;
  KT_ASSIGN_OR_RETURN(spec, ReadArchitecture(top, root, origin, &arch));
  KT_ASSIGN_OR_RETURN(arch.model_type, top.String("model_type"));

  // Where the text model's keys are.
  const json::Value* keys_object = &root;
  std::string path;
  if (spec->text_config) {
    const json::Value* tc = root.Find("text_config");
    if (tc == nullptr || tc->is_null()) {
      return top.Missing("text_config",
                         absl::StrCat(arch.architecture, " keeps the language model's keys there"));
    }
    if (!tc->is_object()) return top.Error("text_config", "an object", *tc);
    keys_object = tc;
    path = "text_config.";
    arch.layer_prefix =  // MiniMax-M3 ships it under language_model.model (transformers renames it on load)
        spec->family == MoeFamily::kMiniMaxM3 ? "language_model.model.layers" : "model.language_model.layers";
  } else {
    // DeepSeek-V4 checkpoints keep DeepSeek's own names (transformers renames them on load).
    arch.layer_prefix = spec->family == MoeFamily::kDeepseekV4 ? "layers" : "model.layers";
  }
  const Reader r(origin, keys_object, path);
  const MoeFamily f = arch.family;
  arch.block = IsMixtralStyle(f) ? "block_sparse_moe" : f == MoeFamily::kDeepseekV4 ? "ffn" : "mlp";
  arch.layout = f == MoeFamily::kQwen3VlMoe  ? ExpertLayout::kFusedGateUpInOut
                : f == MoeFamily::kQwen35Moe ? ExpertLayout::kFusedGateUpOutIn
                                             : ExpertLayout::kPerExpert;

  // The MoE keys: all missing is "not an MoE config"; one missing is that key.
  const MoeKeys keys = KeysFor(f);
  bool any = r.Has(keys.top_k_key) || r.Has(keys.intermediate_key);
  for (const char* k : keys.count_keys) any = any || r.Has(k);
  if (!any) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": no MoE fields for ", arch.architecture, ": looked for ", LookedFor(keys),
                     path.empty() ? "" : absl::StrCat(" under ", path.substr(0, path.size() - 1))));
  }
  const std::string needed = absl::StrCat(arch.architecture, " needs ", LookedFor(keys));

  KT_ASSIGN_OR_RETURN(arch.num_layers, r.Int("num_hidden_layers", 1, kMaxLayers, std::nullopt, needed));
  KT_ASSIGN_OR_RETURN(arch.hidden, r.Int("hidden_size", 1, kMaxDim, std::nullopt, needed));
  if (absl::Status s = ReadExpertShape(r, origin, keys, needed, &arch); !s.ok()) return s;
  if (absl::Status s = ReadMoeLayers(r, origin, path, &arch); !s.ok()) return s;
  if (absl::Status s = ReadSharedExperts(r, &arch); !s.ok()) return s;
  if (absl::Status s = ReadRouting(r, &arch); !s.ok()) return s;
  if (absl::Status s = ParseQuantization(origin, root, &arch); !s.ok()) return s;
  return arch;
}

std::vector<std::string> KnownMoeArchitectures() {
  std::vector<std::string> names;
  for (const ArchSpec& a : kArchs) names.push_back(a.name);
  return names;
}

}  // namespace kt
