#include "kt/io/arch.h"

#include <cstdio>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"

// Names and layer queries of a parsed MoeArch (arch.h): families, MoE layers, checkpoint tensor names.
// arch.cc parses the config.
namespace kt {
namespace {

std::string LayerList(const std::vector<int>& layers) {
  if (layers.empty()) return "none";
  // Runs of consecutive layers as "a..b".
  std::vector<std::string> parts;
  for (size_t i = 0; i < layers.size();) {
    size_t j = i;
    while (j + 1 < layers.size() && layers[j + 1] == layers[j] + 1) ++j;
    parts.push_back(j == i ? absl::StrCat(layers[i]) : absl::StrCat(layers[i], "..", layers[j]));
    i = j + 1;
  }
  return absl::StrJoin(parts, ", ");
}

absl::Status CheckMoeLayer(const MoeArch& arch, int layer) {
  if (layer < 0 || layer >= arch.num_layers) {
    return absl::OutOfRangeError(
        absl::StrCat(arch.architecture, ": layer ", layer, " out of range [0, ", arch.num_layers, ")"));
  }
  if (!arch.IsMoeLayer(layer)) {
    return absl::InvalidArgumentError(
        absl::StrCat(arch.architecture, ": layer ", layer,
                     " is dense, not MoE (MoE layers: ", LayerList(arch.moe_layers), ")"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* MoeFamilyName(MoeFamily family) {
  switch (family) {
    case MoeFamily::kQwen2Moe:
      return "Qwen2-MoE";
    case MoeFamily::kQwen3Moe:
      return "Qwen3-MoE";
    case MoeFamily::kQwen3Next:
      return "Qwen3-Next";
    case MoeFamily::kQwen3VlMoe:
      return "Qwen3-VL-MoE";
    case MoeFamily::kQwen35Moe:
      return "Qwen3.5-MoE";
    case MoeFamily::kDeepseekV2:
      return "DeepSeek-V2";
    case MoeFamily::kDeepseekV3:
      return "DeepSeek-V3";
    case MoeFamily::kGlm4Moe:
      return "GLM-4-MoE";
    case MoeFamily::kMixtral:
      return "Mixtral";
    case MoeFamily::kMiniMax:
      return "MiniMax";
    case MoeFamily::kDeepseekV4:
      return "DeepSeek-V4";
    case MoeFamily::kMiniMaxM3:
      return "MiniMax-M3";
  }
  return "?";
}

bool MoeArch::IsMoeLayer(int layer) const {
  // moe_layers is ascending.
  size_t lo = 0, hi = moe_layers.size();
  while (lo < hi) {
    const size_t mid = lo + (hi - lo) / 2;
    if (moe_layers[mid] < layer) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < moe_layers.size() && moe_layers[lo] == layer;
}

absl::StatusOr<ExpertNames> ExpertTensorNames(const MoeArch& arch, int layer, int expert) {
  absl::Status s = CheckMoeLayer(arch, layer);
  if (!s.ok()) return s;
  if (arch.fused_experts()) {
    return absl::InvalidArgumentError(
        absl::StrCat(arch.architecture,
                     ": experts are fused (one gate_up_proj and one down_proj per layer), not stored "
                     "per expert; use FusedExpertTensorNames"));
  }
  if (expert < 0 || expert >= arch.num_experts) {
    return absl::OutOfRangeError(
        absl::StrCat(arch.architecture, ": expert ", expert, " out of range [0, ", arch.num_experts, ")"));
  }
  const std::string base =
      absl::StrCat(arch.layer_prefix, ".", layer, ".", arch.block, ".experts.", expert, ".");
  ExpertNames names;
  if (arch.block == "block_sparse_moe" || arch.block == "ffn") {
    names.gate = absl::StrCat(base, "w1.weight");
    names.up = absl::StrCat(base, "w3.weight");
    names.down = absl::StrCat(base, "w2.weight");
  } else {
    names.gate = absl::StrCat(base, "gate_proj.weight");
    names.up = absl::StrCat(base, "up_proj.weight");
    names.down = absl::StrCat(base, "down_proj.weight");
  }
  return names;
}

absl::StatusOr<FusedExpertNames> FusedExpertTensorNames(const MoeArch& arch, int layer) {
  absl::Status s = CheckMoeLayer(arch, layer);
  if (!s.ok()) return s;
  if (!arch.fused_experts()) {
    return absl::InvalidArgumentError(
        absl::StrCat(arch.architecture, ": experts are stored one tensor per expert; use ExpertTensorNames"));
  }
  // No ".weight" suffix: these are bare nn.Parameters in transformers (as Qwen3-VL-MoE's index lists them).
  const std::string base = absl::StrCat(arch.layer_prefix, ".", layer, ".", arch.block, ".experts.");
  return FusedExpertNames{absl::StrCat(base, "gate_up_proj"), absl::StrCat(base, "down_proj")};
}

absl::StatusOr<std::string> RouterTensorName(const MoeArch& arch, int layer) {
  absl::Status s = CheckMoeLayer(arch, layer);
  if (!s.ok()) return s;
  return absl::StrCat(arch.layer_prefix, ".", layer, ".", arch.block, ".gate.weight");
}

std::string Fp8ScaleInvName(absl::string_view weight_name) { return absl::StrCat(weight_name, "_scale_inv"); }

absl::StatusOr<MoeArch> LoadMoeConfig(const std::string& dir) {
  const std::string path = absl::StrCat(dir, "/config.json");
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::string text;
  char buf[65536];
  size_t got = 0;
  while ((got = std::fread(buf, 1, sizeof(buf), file)) > 0) {
    text.append(buf, got);
    if (text.size() > (size_t{16} << 20)) break;  // ParseMoeConfig refuses it
  }
  const bool failed = std::ferror(file) != 0;
  std::fclose(file);
  if (failed) return absl::DataLossError(absl::StrCat(path, ": read error"));
  return ParseMoeConfig(text, path);
}

}  // namespace kt
