#include "kt/moe/layer_loader.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/io/arch.h"
#include "kt/io/hf_int4.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"
#include "kt/kernels/mx.h"
#include "kt/kernels/quant.h"
#include "kt/moe/gguf_loader.h"

namespace kt {
namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

}  // namespace

ExpertFormat ExpertFormatOfLayout(const MethodLayout& layout) {
  if (!layout.quantized) return ExpertFormat::kBf16;
  switch (layout.spec.format) {
    case QuantFormat::kInt8PerChannel:
      return ExpertFormat::kInt8;
    case QuantFormat::kInt4PerChannel:
      return ExpertFormat::kInt4;
    case QuantFormat::kInt4GroupSym:
      return ExpertFormat::kInt4GroupSym;
    case QuantFormat::kInt4GroupAsym:
      return ExpertFormat::kInt4GroupAsym;
    case QuantFormat::kInt4PerChannelAsym:
      return ExpertFormat::kInt4Asym;
    case QuantFormat::kFp8Block128:
      return ExpertFormat::kFp8Block;
    case QuantFormat::kMxfp4:
      return ExpertFormat::kMxfp4;
    case QuantFormat::kMxfp8:
      return ExpertFormat::kMxfp8;
  }
  return ExpertFormat::kBf16;  // Unreachable: every QuantFormat is listed above.
}

namespace {

// The loaders for a MoeLayer and for a TpMoeLayer, which slices each matrix for its parts: both have the same
// streaming loaders (BeginLoad, LoadExpert, LoadExpertQuantized, FinishLoad), config() and quant_spec().
template <typename Layer>
absl::StatusOr<FolderLoadStats> LoadFolderInto(Layer& moe, const std::string& dir, int layer,
                                               const std::string& method, int group_size,
                                               const int64_t* physical_to_logical, ThreadPool& pool) {
  absl::StatusOr<MethodLayout> layout = LayoutOfMethod(method, group_size);
  if (!layout.ok()) return layout.status();
  const absl::StatusOr<QuantSpec> held = moe.quant_spec();
  const std::string held_tag = held.ok() ? QuantLayoutTag(*held) : kBf16LayoutTag;
  if (held_tag != layout->tag) {
    return absl::InvalidArgumentError(absl::StrCat("method ", method, " stores \"", layout->tag,
                                                   "\" but this layer holds \"", held_tag, "\""));
  }
  const MoeConfig& cfg = moe.config();
  if (physical_to_logical != nullptr) {
    for (int i = 0; i < cfg.num_experts; ++i) {
      if (physical_to_logical[i] < 0 || physical_to_logical[i] >= cfg.num_experts) {
        return absl::InvalidArgumentError(absl::StrCat("physical_to_logical[", i, "] = ", physical_to_logical[i],
                                                       " is not in [0, ", cfg.num_experts, ")"));
      }
    }
  }
  // A checkpoint whose experts compute a SwiGLU variant kt's arch mapping reads (MiniMax-M3: swiglu_alpha,
  // swiglu_limit) needs a layer created with it; loading it into a plain one would compute another function.
  // (DeepSeek-V4's swiglu_limit is not read there yet: its caller passes it.)
  if (absl::StatusOr<MoeArch> arch = LoadMoeConfig(dir);
      arch.ok() && (arch->swiglu_alpha != 0 || arch->swiglu_limit != 0) &&
      (arch->swiglu_alpha != cfg.swiglu_alpha || arch->swiglu_limit != cfg.swiglu_limit)) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, "/config.json: the ", arch->architecture, " experts compute swiglu_alpha = ", arch->swiglu_alpha,
        ", swiglu_limit = ", arch->swiglu_limit, ", but this layer was created with swiglu_alpha = ",
        cfg.swiglu_alpha, ", swiglu_limit = ", cfg.swiglu_limit, " (KTMoEWrapper(swiglu_alpha=",
        arch->swiglu_alpha, ", swiglu_limit=", arch->swiglu_limit, ") with method MXFP4 or MXFP8)"));
  }
  LayerRequest want;
  want.layer = layer;
  want.num_experts = cfg.num_experts;
  want.hidden = cfg.hidden;
  want.intermediate = cfg.intermediate;
  want.method = *layout;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  if (!le.ok()) return le.status();

  FolderLoadStats stats;
  stats.converted = (*le)->converted();
  stats.file_bytes = (*le)->weight_bytes();
  moe.BeginLoad();

  Clock::time_point t0 = Clock::now();
  const size_t chunks = (*le)->num_verify_tasks();
  std::vector<absl::Status> verify(chunks);
  if (chunks > 0) {
    pool.ParallelFor(chunks, [&](size_t i, int) { verify[i] = (*le)->Verify(i); });
  }
  for (const absl::Status& s : verify) {
    if (!s.ok()) return s;
  }
  stats.verify_seconds = Since(t0);

  t0 = Clock::now();
  const size_t tasks = static_cast<size_t>(cfg.num_experts) * 3;
  std::vector<absl::Status> status(tasks);
  const bool quantized = (*le)->quantized();
  // One scratch matrix per thread, reused across tasks: a fresh multi-MB vector per task would cost page
  // faults and zeroing on every expert.
  std::vector<QuantizedMatrix> qscratch(pool.num_threads());
  std::vector<std::vector<bf16_t>> bscratch(pool.num_threads());
  pool.ParallelFor(tasks, [&](size_t task, int thread) {
    const int slot = static_cast<int>(task / 3);
    const auto m = static_cast<ExpertMatrix>(task % 3);
    const auto proj = static_cast<ExpertProj>(task % 3);
    const int logical = physical_to_logical ? static_cast<int>(physical_to_logical[slot]) : slot;
    absl::Status s;
    if (quantized) {
      QuantizedMatrix& qm = qscratch[thread];
      s = (*le)->ReadQuantized(logical, m, &qm);
      if (s.ok()) s = moe.LoadExpertQuantized(slot, proj, qm);
    } else if (const bf16_t* mapped = (*le)->MappedBf16(logical, m); mapped != nullptr) {
      s = moe.LoadExpert(slot, proj, mapped);  // Packed straight from the page cache.
    } else {
      std::vector<bf16_t>& w = bscratch[thread];
      w.resize((*le)->Rows(m) * (*le)->Cols(m));
      s = (*le)->ReadBf16(logical, m, w.data());
      if (s.ok()) s = moe.LoadExpert(slot, proj, w.data());
    }
    if (!s.ok()) {
      status[task] = absl::Status(s.code(), absl::StrCat(dir, ": layer ", layer, " expert ", logical, " ",
                                                         ExpertMatrixName(m), " (slot ", slot, "): ", s.message()));
    }
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  if (absl::Status s = moe.FinishLoad(); !s.ok()) return s;
  stats.load_seconds = Since(t0);
  return stats;
}

// One expert matrix's canonical form from codes and scales as `kind` stores them (the codes copied, the
// scales expanded to kt's per-row form: quant.h).
void CodedMatrix(CodeScales kind, QuantFormat format, const uint8_t* codes, const void* scales, size_t e, size_t n,
                 size_t k, QuantizedMatrix* qm) {
  qm->spec = QuantSpec{format, 0};
  qm->n = n;
  qm->k = k;
  const size_t bytes = n * QuantizedRowBytes(qm->spec, k), spr = ScalesPerRow(qm->spec, k);
  qm->data.assign(codes + e * bytes, codes + (e + 1) * bytes);
  qm->scales.resize(n * spr);
  switch (kind) {
    case CodeScales::kFp8Block128: {
      const size_t block_scales = ((n + 127) / 128) * spr;
      ExpandFp8BlockScales(static_cast<const float*>(scales) + e * block_scales, n, k, qm->scales.data());
      break;
    }
    case CodeScales::kFp8PerChannel: {
      // A row's one scale is the scale of each of its 128-k blocks: the same weights, exactly.
      const float* s = static_cast<const float*>(scales) + e * n;
      for (size_t r = 0; r < n; ++r) std::fill_n(qm->scales.begin() + r * spr, spr, s[r]);
      break;
    }
    case CodeScales::kE8M0: {
      const uint8_t* s = static_cast<const uint8_t*>(scales) + e * n * spr;
      for (size_t i = 0; i < n * spr; ++i) qm->scales[i] = E8M0ToF32(s[i]);
      break;
    }
  }
}

template <typename Layer>
absl::Status LoadCodedInto(Layer& moe, CodeScales kind, const uint8_t* const (&codes)[3],
                           const void* const (&scales)[3], const int64_t* physical_to_logical, ThreadPool& pool) {
  const absl::StatusOr<QuantSpec> spec = moe.quant_spec();
  const bool mx_kind = kind == CodeScales::kE8M0;
  if (!spec.ok() || IsMxFormat(spec->format) != mx_kind ||
      (!mx_kind && spec->format != QuantFormat::kFp8Block128)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LoadCodedExperts: the layer holds ", spec.ok() ? QuantLayoutTag(*spec) : std::string(kBf16LayoutTag),
        "; ", mx_kind ? "E8M0 scales go with an MX layer (mxfp4, mxfp8)" : "FP8 scales go with an fp8_block layer"));
  }
  const MoeConfig& c = moe.config();
  const size_t h = c.hidden, inter = c.intermediate;
  moe.BeginLoad();
  const size_t tasks = static_cast<size_t>(c.num_experts) * 3;
  std::vector<absl::Status> status(tasks);
  pool.ParallelFor(tasks, [&](size_t task, int) {
    const int slot = static_cast<int>(task / 3), p = static_cast<int>(task % 3);
    const size_t e = physical_to_logical ? static_cast<size_t>(physical_to_logical[slot]) : slot;
    QuantizedMatrix qm;
    CodedMatrix(kind, spec->format, codes[p], scales[p], e, p == 2 ? h : inter, p == 2 ? inter : h, &qm);
    status[task] = moe.LoadExpertQuantized(slot, static_cast<ExpertProj>(p), qm);
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return moe.FinishLoad();
}

template <typename Layer>
absl::Status LoadRawInt4Into(Layer& moe, const uint8_t* const (&packed)[3], const uint16_t* const (&scales)[3],
                             const int64_t* physical_to_logical, ThreadPool& pool) {
  const MoeConfig& c = moe.config();
  const size_t h = c.hidden, inter = c.intermediate, g = static_cast<size_t>(c.group_size);
  moe.BeginLoad();
  const size_t tasks = static_cast<size_t>(c.num_experts) * 3;
  std::vector<absl::Status> status(tasks);
  pool.ParallelFor(tasks, [&](size_t task, int) {
    const int slot = static_cast<int>(task / 3), p = static_cast<int>(task % 3);
    const size_t e = physical_to_logical ? static_cast<size_t>(physical_to_logical[slot]) : slot;
    const size_t n = p == 2 ? h : inter, k = p == 2 ? inter : h;
    QuantizedMatrix qm;
    PackQuantizedToCanonical(packed[p] + e * n * (k / 2), scales[p] + e * n * (k / g), n, k, c.group_size, &qm);
    status[task] = moe.LoadExpertQuantized(slot, static_cast<ExpertProj>(p), qm);
  });
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return moe.FinishLoad();
}

}  // namespace

absl::Status LoadRawInt4Experts(MoeLayer& moe, const uint8_t* const (&packed)[3], const uint16_t* const (&scales)[3],
                                const int64_t* physical_to_logical, ThreadPool& pool) {
  return LoadRawInt4Into(moe, packed, scales, physical_to_logical, pool);
}

absl::Status LoadRawInt4Experts(TpMoeLayer& moe, const uint8_t* const (&packed)[3],
                                const uint16_t* const (&scales)[3], const int64_t* physical_to_logical,
                                ThreadPool& pool) {
  return LoadRawInt4Into(moe, packed, scales, physical_to_logical, pool);
}

absl::StatusOr<FolderLoadStats> LoadLayerFromFolder(MoeLayer& moe, const std::string& dir, int layer,
                                                    const std::string& method, int group_size,
                                                    const int64_t* physical_to_logical, ThreadPool& pool) {
  if (method == "LLAMAFILE") {  // a GGUF checkpoint, its blocks as stored (gguf_loader.h)
    absl::StatusOr<GgufLoadStats> g = LoadGgufLayer(moe, dir, layer, physical_to_logical, pool);
    if (!g.ok()) return g.status();
    FolderLoadStats stats;
    stats.file_bytes = g->file_bytes;
    stats.load_seconds = g->load_seconds;
    return stats;
  }
  return LoadFolderInto(moe, dir, layer, method, group_size, physical_to_logical, pool);
}

absl::StatusOr<FolderLoadStats> LoadLayerFromFolder(TpMoeLayer& moe, const std::string& dir, int layer,
                                                    const std::string& method, int group_size,
                                                    const int64_t* physical_to_logical, ThreadPool& pool) {
  if (method == "LLAMAFILE") {
    return absl::UnimplementedError("method LLAMAFILE runs on one pool (threadpool_count = 1) for now");
  }
  return LoadFolderInto(moe, dir, layer, method, group_size, physical_to_logical, pool);
}

absl::Status LoadFp8Experts(MoeLayer& moe, const uint8_t* const (&codes)[3], const float* const (&scales)[3],
                            const int64_t* physical_to_logical, ThreadPool& pool) {
  const void* const s[3] = {scales[0], scales[1], scales[2]};
  return LoadCodedInto(moe, CodeScales::kFp8Block128, codes, s, physical_to_logical, pool);
}

absl::Status LoadFp8Experts(TpMoeLayer& moe, const uint8_t* const (&codes)[3], const float* const (&scales)[3],
                            const int64_t* physical_to_logical, ThreadPool& pool) {
  const void* const s[3] = {scales[0], scales[1], scales[2]};
  return LoadCodedInto(moe, CodeScales::kFp8Block128, codes, s, physical_to_logical, pool);
}

absl::Status LoadCodedExperts(MoeLayer& moe, CodeScales kind, const uint8_t* const (&codes)[3],
                              const void* const (&scales)[3], const int64_t* physical_to_logical, ThreadPool& pool) {
  return LoadCodedInto(moe, kind, codes, scales, physical_to_logical, pool);
}

absl::Status LoadCodedExperts(TpMoeLayer& moe, CodeScales kind, const uint8_t* const (&codes)[3],
                              const void* const (&scales)[3], const int64_t* physical_to_logical, ThreadPool& pool) {
  return LoadCodedInto(moe, kind, codes, scales, physical_to_logical, pool);
}

absl::StatusOr<FolderLayer> OpenLayerFromFolder(const std::string& dir, const FolderLayerOptions& in_options,
                                                ThreadPool& pool) {
  // RAWINT4 / GPTQ_INT4 hold the checkpoint's groups: a converted folder's manifest group_size, a native int4
  // checkpoint's (hf_int4.h); options.group_size for a bf16 one.
  FolderLayerOptions options = in_options;
  if (options.method == "RAWINT4" || options.method == "GPTQ_INT4") {
    if (absl::StatusOr<Manifest> m = ReadManifest(dir); m.ok() && m->group_size > 0) {
      options.group_size = m->group_size;
    } else if (absl::StatusOr<int> g = HfInt4GroupSize(dir); g.ok()) {
      options.group_size = *g;
    }
  }
  absl::StatusOr<MethodLayout> layout = LayoutOfMethod(options.method, options.group_size);
  if (!layout.ok()) return layout.status();
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(dir);
  if (!arch.ok()) return arch.status();
  if (arch->moe_layers.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(dir, "/config.json: the model has no MoE layer"));
  }
  FolderLayer out;
  out.layer = options.layer < 0 ? arch->moe_layers.front() : options.layer;
  out.architecture = arch->architecture;
  if (!arch->IsMoeLayer(out.layer)) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": layer ", out.layer, " is not a MoE layer of this ", arch->architecture, " (MoE layers ",
        arch->moe_layers.front(), "..", arch->moe_layers.back(), " of ", arch->num_layers, ")"));
  }
  MoeConfig config;
  config.num_experts = arch->num_experts;
  config.top_k = arch->top_k;
  config.hidden = arch->hidden;
  config.intermediate = arch->intermediate;
  config.max_len = options.max_len;
  // The per-channel layouts have no groups (spec.group_size 0); MoeConfig ignores the field for them.
  config.group_size = layout->spec.group_size > 0 ? layout->spec.group_size : options.group_size;
  config.swiglu_alpha = arch->swiglu_alpha;  // MiniMax-M3's "swigluoai" (MX methods only: Create says so)
  config.swiglu_limit = arch->swiglu_limit;
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe =
      MoeLayer::Create(config, options.isa, ExpertFormatOfLayout(*layout));
  if (!moe.ok()) return moe.status();
  absl::StatusOr<FolderLoadStats> stats =
      LoadLayerFromFolder(**moe, dir, out.layer, options.method, options.group_size, nullptr, pool);
  if (!stats.ok()) return stats.status();
  out.moe = std::move(*moe);
  out.stats = *stats;
  return out;
}

}  // namespace kt
