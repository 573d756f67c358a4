#include "kt/io/gguf_experts.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <regex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kt/kernels/gguf_quants.h"

namespace kt {
namespace {

const char* const kProjNames[3] = {"gate", "up", "down"};

// The parts of a split set named like `path` (llama.cpp's gguf-split: <prefix>-00001-of-00003.gguf), or
// just `path`.
std::vector<std::string> SplitParts(const std::string& path) {
  static const std::regex kSplit(R"((.*)-(\d{5})-of-(\d{5})\.gguf)");
  std::smatch m;
  if (!std::regex_match(path, m, kSplit)) return {path};
  const int count = std::stoi(m[3].str());
  std::vector<std::string> parts;
  for (int i = 1; i <= count; ++i) {
    char suffix[32];
    std::snprintf(suffix, sizeof(suffix), "-%05d-of-%05d.gguf", i, count);
    parts.push_back(m[1].str() + suffix);
  }
  return parts;
}

}  // namespace

absl::StatusOr<std::unique_ptr<GgufCheckpoint>> GgufCheckpoint::Open(const std::string& path) {
  std::error_code ec;
  std::vector<std::string> paths;
  if (std::filesystem::is_directory(path, ec)) {
    for (const auto& entry : std::filesystem::directory_iterator(path, ec)) {
      if (entry.is_regular_file() && absl::EndsWith(entry.path().filename().string(), ".gguf")) {
        paths.push_back(entry.path().string());
      }
    }
    std::sort(paths.begin(), paths.end());
    if (paths.empty()) {
      return absl::NotFoundError(absl::StrCat("GGUF checkpoint ", path, ": the folder holds no .gguf file"));
    }
  } else {
    if (!std::filesystem::exists(path, ec)) {
      return absl::NotFoundError(absl::StrCat("GGUF checkpoint ", path, ": no such file or folder"));
    }
    paths = SplitParts(path);
  }
  auto ckpt = std::make_unique<GgufCheckpoint>();
  ckpt->path_ = path;
  for (const std::string& p : paths) {
    if (!std::filesystem::exists(p, ec)) {
      return absl::NotFoundError(absl::StrCat("GGUF checkpoint ", path, ": part ", p, " of the split set is missing"));
    }
    absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(p);
    if (!f.ok()) return f.status();
    ckpt->files_.push_back(std::move(*f));
  }
  std::map<std::string, const std::string*> seen;
  for (const auto& f : ckpt->files_) {
    for (const GgufTensorInfo& t : f->tensors()) {
      auto [it, fresh] = seen.emplace(t.name, &f->path());
      if (!fresh) {
        return absl::InvalidArgumentError(absl::StrCat("GGUF checkpoint ", path, ": tensor ", t.name, " is in both ",
                                                       *it->second, " and ", f->path(),
                                                       "; pass one model's file (or split set)"));
      }
    }
  }
  return ckpt;
}

std::pair<const GgufFile*, const GgufTensorInfo*> GgufCheckpoint::Find(const std::string& name) const {
  for (const auto& f : files_) {
    if (const GgufTensorInfo* t = f->Find(name)) return {f.get(), t};
  }
  return {nullptr, nullptr};
}

absl::StatusOr<GgufExpertTensor> FindGgufExperts(const GgufCheckpoint& ckpt, int layer, int proj,
                                                 uint64_t num_experts, uint64_t hidden, uint64_t intermediate) {
  const std::string name = absl::StrCat("blk.", layer, ".ffn_", kProjNames[proj], "_exps.weight");
  const auto [file, info] = ckpt.Find(name);
  if (info == nullptr) {
    std::vector<std::string> present;
    const std::string prefix = absl::StrCat("blk.", layer, ".");
    for (const auto& f : ckpt.files()) {
      for (const GgufTensorInfo& t : f->tensors()) {
        if (absl::StartsWith(t.name, prefix) && present.size() < 16) present.push_back(t.name);
      }
    }
    return absl::NotFoundError(absl::StrCat(
        "GGUF checkpoint ", ckpt.path(), ": layer ", layer, " has no ", kProjNames[proj], " experts (tensor ", name,
        " not found); ",
        present.empty() ? std::string("the checkpoint has no tensor of that layer (past the last layer?)")
                        : absl::StrCat("the layer's tensors: ", absl::StrJoin(present, ", "),
                                       " (a dense layer has no _exps tensors)")));
  }
  const std::string where = absl::StrCat("GGUF ", file->path(), ": tensor ", name);
  const int type_id = static_cast<int>(info->type);
  if (!IsGgufTypeId(type_id)) {
    return absl::InvalidArgumentError(absl::StrCat(where, " is ", GgmlTypeName(info->type),
                                                   "; method LLAMAFILE runs ", kGgufSupportedTypes));
  }
  const bool down = proj == 2;
  const uint64_t want_k = down ? intermediate : hidden, want_n = down ? hidden : intermediate;
  const char* k_name = down ? "moe_intermediate_size" : "hidden_size";
  const char* n_name = down ? "hidden_size" : "moe_intermediate_size";
  if (info->dims.size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(where, " has ", info->dims.size(), " dims, expected 3 (ne = [",
                                                   k_name, ", ", n_name, ", num_experts])"));
  }
  const struct {
    int i;
    const char* what;
    uint64_t want;
  } checks[] = {{0, k_name, want_k}, {1, n_name, want_n}, {2, "num_experts", num_experts}};
  for (const auto& c : checks) {
    if (info->dims[c.i] != c.want) {
      std::string more;
      if (c.i == 2 && info->dims[2] < num_experts) {
        more = absl::StrCat(": experts ", info->dims[2], "..", num_experts - 1, " of layer ", layer, " are missing");
      }
      return absl::InvalidArgumentError(absl::StrCat(where, ": ne[", c.i, "] (", c.what, ") = ", info->dims[c.i],
                                                     ", the layer has ", c.what, " = ", c.want, more));
    }
  }
  GgufExpertTensor out;
  out.name = name;
  out.file = file->path();
  out.type_id = type_id;
  out.experts = info->dims[2];
  out.n = info->dims[1];
  out.k = info->dims[0];
  out.expert_bytes = info->nbytes / out.experts;
  out.data = file->data(*info);
  return out;
}

}  // namespace kt
