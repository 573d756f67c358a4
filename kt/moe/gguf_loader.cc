#include "kt/moe/gguf_loader.h"

#include <chrono>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/io/gguf_experts.h"
#include "kt/kernels/gguf_quants.h"

namespace kt {
namespace {

struct OpenLayer {
  std::unique_ptr<GgufCheckpoint> ckpt;
  GgufExpertTensor proj[3];
};

absl::StatusOr<OpenLayer> Open(const std::string& path, int layer, int e, int h, int i) {
  OpenLayer out;
  absl::StatusOr<std::unique_ptr<GgufCheckpoint>> ckpt = GgufCheckpoint::Open(path);
  if (!ckpt.ok()) return ckpt.status();
  out.ckpt = std::move(*ckpt);
  for (int p = 0; p < 3; ++p) {
    absl::StatusOr<GgufExpertTensor> t = FindGgufExperts(*out.ckpt, layer, p, e, h, i);
    if (!t.ok()) return t.status();
    out.proj[p] = *t;
  }
  return out;
}

}  // namespace

absl::StatusOr<GgufLayerInfo> InspectGgufLayer(const std::string& path, int layer, int num_experts, int hidden,
                                               int intermediate) {
  absl::StatusOr<OpenLayer> open = Open(path, layer, num_experts, hidden, intermediate);
  if (!open.ok()) return open.status();
  GgufLayerInfo info;
  int floats = 0;
  for (int p = 0; p < 3; ++p) {
    info.types[p] = open->proj[p].type_id;
    floats += GgufIsFloat(static_cast<GgufType>(info.types[p])) ? 1 : 0;
    info.file_bytes += open->proj[p].expert_bytes * open->proj[p].experts;
  }
  if (floats != 0 && floats != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        "GGUF ", path, ": layer ", layer, " mixes float and quantized expert tensors (gate ",
        GgufTypeName(static_cast<GgufType>(info.types[0])), ", up ", GgufTypeName(static_cast<GgufType>(info.types[1])),
        ", down ", GgufTypeName(static_cast<GgufType>(info.types[2])),
        "); method LLAMAFILE runs all-quantized or all-float (F32/F16/BF16) layers"));
  }
  info.format = floats == 3 ? ExpertFormat::kGgufFloat : ExpertFormat::kGguf;
  return info;
}

absl::StatusOr<GgufLoadStats> LoadGgufLayer(MoeLayer& moe, const std::string& path, int layer,
                                            const int64_t* physical_to_logical, ThreadPool& pool) {
  const MoeConfig& cfg = moe.config();
  absl::StatusOr<OpenLayer> open = Open(path, layer, cfg.num_experts, cfg.hidden, cfg.intermediate);
  if (!open.ok()) return open.status();
  if (!moe.experts().traits().stored_blocks) {
    return absl::InvalidArgumentError(absl::StrCat("method LLAMAFILE loads GGUF blocks, but this layer holds ",
                                                   ExpertFormatName(moe.format()), " weights"));
  }
  for (int p = 0; p < 3; ++p) {
    if (open->proj[p].type_id != cfg.gguf_types[p]) {
      const int want = cfg.gguf_types[p];
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF ", open->proj[p].file, ": ", open->proj[p].name, " is ",
          GgufTypeName(static_cast<GgufType>(open->proj[p].type_id)), " but the layer was made for ",
          IsGgufTypeId(want) ? GgufTypeName(static_cast<GgufType>(want)) : "no type",
          " (MoeConfig.gguf_types); create it from InspectGgufLayer's types"));
    }
  }
  const int e = cfg.num_experts;
  if (physical_to_logical != nullptr) {
    for (int s = 0; s < e; ++s) {
      if (physical_to_logical[s] < 0 || physical_to_logical[s] >= e) {
        return absl::InvalidArgumentError(absl::StrCat("physical_to_logical[", s, "] = ", physical_to_logical[s],
                                                       " is not in [0, ", e, ")"));
      }
    }
  }
  const auto t0 = std::chrono::steady_clock::now();
  moe.BeginLoad();
  std::vector<absl::Status> status(static_cast<size_t>(e) * 3);
  pool.ParallelFor(status.size(), [&](size_t task, int) {
    const int slot = static_cast<int>(task / 3), p = static_cast<int>(task % 3);
    const int64_t logical = physical_to_logical ? physical_to_logical[slot] : slot;
    const GgufExpertTensor& t = open->proj[p];
    absl::Status s = moe.LoadExpertBlocks(slot, static_cast<ExpertProj>(p),
                                          t.data + static_cast<uint64_t>(logical) * t.expert_bytes, t.expert_bytes);
    if (!s.ok()) {
      status[task] = absl::Status(s.code(), absl::StrCat(t.file, ": layer ", layer, " expert ", logical, " ",
                                                         t.name, " (slot ", slot, "): ", s.message()));
    }
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  if (absl::Status s = moe.FinishLoad(); !s.ok()) return s;
  GgufLoadStats stats;
  for (const GgufExpertTensor& t : open->proj) stats.file_bytes += t.expert_bytes * t.experts;
  stats.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace kt
