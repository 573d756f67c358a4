#include "kt/moe/packed_experts.h"

#include <stdexcept>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kt/kernels/gemm_bf16.h"  // kPanelRows
#include "kt/kernels/gemm_fp8.h"   // the fp8 panel layout (ExpertFp8Codes)
#include "kt/kernels/gemm_int4.h"  // UnpackInt4 (ExpertInt4GroupSymRows)
#include "kt/kernels/gguf_quants.h"  // GgufTypeName
#include "kt/kernels/quant_fast.h"

namespace kt {

PackedExpert PackedExperts::Projection::Expert(size_t e) const {
  PackedExpert w;
  w.data = data.get() + e * layout.expert_bytes;
  if (scales.size) w.scales = scales.get() + e * layout.scale_entries;
  if (sums.size) w.sums = sums.get() + e * layout.sum_entries;
  if (zeros.size) w.zeros = zeros.get() + e * layout.zero_entries;
  return w;
}

MutablePackedExpert PackedExperts::Projection::MutableExpert(size_t e) {
  MutablePackedExpert w;
  w.data = data.get() + e * layout.expert_bytes;
  if (scales.size) w.scales = scales.get() + e * layout.scale_entries;
  if (sums.size) w.sums = sums.get() + e * layout.sum_entries;
  if (zeros.size) w.zeros = zeros.get() + e * layout.zero_entries;
  return w;
}

PackedExpert PackedExperts::Projection::Block(size_t e, size_t c0) const {
  // Scales and zero points are [panel][group][16] per expert (one group: per output channel), sums one
  // per output channel, so a block's start is c0 columns in.
  PackedExpert w = Expert(e);
  w.data += (c0 / kPanelRows) * layout.panel_bytes;
  if (w.scales != nullptr) w.scales += c0 * layout.scales_per_col;
  if (w.sums != nullptr) w.sums += c0;
  if (w.zeros != nullptr) w.zeros += c0 * layout.scales_per_col;
  return w;
}

absl::StatusOr<std::unique_ptr<PackedExperts>> PackedExperts::Create(const ExpertShape& shape, Isa isa,
                                                                     ExpertFormat format) {
  for (const auto& [name, v] : {std::pair<const char*, int>{"num_experts", shape.num_experts},
                                {"hidden", shape.hidden},
                                {"intermediate", shape.intermediate}}) {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat("MoeConfig.", name, " must be > 0, got ", v));
  }
  if (!IsaSupported(isa, GetCpuFeatures())) {
    return absl::FailedPreconditionError(
        absl::StrCat("kernel path ", IsaName(isa), " is not supported by this CPU"));
  }
  const ExpertFormatTraits& traits = FormatTraits(format);
  FormatGemm gemm;
  if (!traits.bind_gemm(isa, 0, &gemm)) {
    return absl::UnimplementedError(absl::StrCat("no ", traits.name, " kernel for path ", IsaName(isa)));
  }
  if (traits.max_k != 0 && (static_cast<size_t>(shape.hidden) >= traits.max_k ||
                            static_cast<size_t>(shape.intermediate) >= traits.max_k)) {
    return absl::InvalidArgumentError(absl::StrCat(traits.kernel_family, " experts need hidden and intermediate < ",
                                                   traits.max_k, " (exact int32 sums)"));
  }
  if (traits.grouped) {
    absl::StatusOr<QuantSpec> spec = QuantSpecOf(format, shape.group_size);
    if (!spec.ok()) return spec.status();
    for (const auto& [name, v] : {std::pair<const char*, int>{"hidden", shape.hidden},
                                  {"intermediate", shape.intermediate}}) {
      if (v % shape.group_size != 0) {
        return absl::InvalidArgumentError(absl::StrCat("MoeConfig.", name, " = ", v,
                                                       " must be a multiple of group_size = ", shape.group_size,
                                                       " for ", traits.name, " experts"));
      }
    }
  }
  if (traits.stored_blocks) {
    for (int p = 0; p < 3; ++p) {
      const auto proj = static_cast<ExpertProj>(p);
      const bool down = proj == ExpertProj::kDown;
      const size_t n = down ? shape.hidden : shape.intermediate, k = down ? shape.intermediate : shape.hidden;
      if (absl::Status s = traits.check_projection(ExpertProjName(proj), n, k, shape.gguf_types[p]); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("MoeConfig.gguf_types: ", s.message()));
      }
    }
  }
  if (traits.quantized) {
    // Formats whose scales cover fixed k blocks (MX: 32) need K a multiple of the block, for both K's.
    absl::StatusOr<QuantSpec> spec = QuantSpecOf(format, shape.group_size);
    for (const auto& [name, v] : {std::pair<const char*, int>{"hidden", shape.hidden},
                                  {"intermediate", shape.intermediate}}) {
      if (absl::Status s = spec.ok() ? ValidateQuantSpec(*spec, static_cast<size_t>(v)) : spec.status(); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("MoeConfig.", name, " = ", v, " does not fit ", traits.name,
                                                       " experts: ", s.message()));
      }
    }
  }
  std::unique_ptr<PackedExperts> w(new PackedExperts(shape, isa, traits));
  w->gemm_ = gemm;
  const size_t e = shape.num_experts, h = shape.hidden, i = shape.intermediate;
  const size_t group = static_cast<size_t>(shape.group_size);
  for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
    Projection& p = w->Proj(proj);
    p.n = proj == ExpertProj::kDown ? h : i;
    p.k = proj == ExpertProj::kDown ? i : h;
    p.layout = traits.layout(p.n, p.k,
                             traits.stored_blocks ? static_cast<size_t>(shape.gguf_types[static_cast<int>(proj)])
                                                  : group);
    p.data.numa_node = p.scales.numa_node = p.sums.numa_node = p.zeros.numa_node = shape.numa_node;
    try {
      p.data.Resize(e * p.layout.expert_bytes);
      p.scales.Resize(e * p.layout.scale_entries);
      p.sums.Resize(e * p.layout.sum_entries);
      p.zeros.Resize(e * p.layout.zero_entries);
    } catch (const std::invalid_argument& bad_node) {  // AllocateArrayOnNode: a node it cannot bind to
      return absl::InvalidArgumentError(absl::StrCat("MoeConfig.numa_node: ", bad_node.what()));
    }
  }
  // Gate and up multiply the same prepared x rows (one preparation per row): their ggml dot partners
  // must agree (Q8_0 for the 32-value types, Q8_K for the K-quants).
  if (traits.stored_blocks && w->Proj(ExpertProj::kGate).layout.act_group != w->Proj(ExpertProj::kUp).layout.act_group) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoeConfig.gguf_types: gate (", GgufTypeName(static_cast<GgufType>(shape.gguf_types[0])), ") and up (",
        GgufTypeName(static_cast<GgufType>(shape.gguf_types[1])), ") quantize their shared input differently (Q8_0 vs Q8_K partners); both must be 32-value types or both "
        "K-quants"));
  }
  w->proj_loaded_.assign(e * 3, 0);
  return w;
}

void PackedExperts::SetKBlock(size_t k_block) { traits_->bind_gemm(isa_, k_block, &gemm_); }

size_t PackedExperts::ProjRows(ExpertProj proj) const {
  return proj == ExpertProj::kDown ? shape_.hidden : shape_.intermediate;
}

size_t PackedExperts::ProjCols(ExpertProj proj) const {
  return proj == ExpertProj::kDown ? shape_.intermediate : shape_.hidden;
}

size_t PackedExperts::ActGroup(ExpertProj proj) const {
  const size_t g = Proj(proj).layout.act_group;
  return g != 0 ? g : static_cast<size_t>(shape_.group_size);
}

size_t PackedExperts::ActivationGroups(ExpertProj proj) const {
  return ActivationGroupsOf(*traits_, ProjCols(proj), ActGroup(proj));
}

size_t PackedExperts::weight_bytes() const {
  size_t bytes = 0;
  for (const Projection& p : proj_) {
    bytes += p.data.size + p.scales.size * sizeof(float) + p.sums.size * sizeof(int32_t) + p.zeros.size;
  }
  return bytes;
}

void PackedExperts::PrepareRow(ExpertProj proj, const bf16_t* x, int8_t* q, float* scales, int32_t* sums) const {
  PrepareActivationRow(*traits_, isa_, x, ProjCols(proj), ActGroup(proj), q, scales, sums);
}

void PackedExperts::ProjectBlock(ExpertProj proj, int slot, size_t c0, size_t cols, const ProjInput& in,
                                 size_t m, float* y, size_t ldy) const {
  const Projection& p = Proj(proj);
  gemm_.run(gemm_, p.Block(static_cast<size_t>(slot), c0), p.k, p.layout.group, in, m, cols, y, ldy);
}

absl::Status PackedExperts::CheckSlot(const char* fn, int slot) const {
  if (slot < 0 || slot >= shape_.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": slot = ", slot, " is not in [0, num_experts = ",
                                                   shape_.num_experts, ")"));
  }
  return absl::OkStatus();
}

absl::Status PackedExperts::UnpackExpert(int slot, ExpertProj proj, bf16_t* w) const {
  return Unpack("UnpackExpert", slot, proj, /*transposed=*/false, w);
}

absl::Status PackedExperts::UnpackExpertTransposed(int slot, ExpertProj proj, bf16_t* wt) const {
  return Unpack("UnpackExpertTransposed", slot, proj, /*transposed=*/true, wt);
}

absl::Status PackedExperts::UnpackExpertRows(int slot, ExpertProj proj, size_t r0, size_t rows,
                                             bf16_t* out) const {
  if (absl::Status s = CheckSlot("UnpackExpertRows", slot); !s.ok()) return s;
  if (!loaded()) return absl::FailedPreconditionError("UnpackExpertRows before the weights are loaded");
  const Projection& p = Proj(proj);
  if (r0 % kPanelRows != 0 || r0 + rows > p.n) {
    return absl::InvalidArgumentError(absl::StrCat("UnpackExpertRows: rows [", r0, ", ", r0 + rows, ") of ",
                                                   ExpertProjName(proj), " [", p.n, ", ", p.k,
                                                   "]: the start must be a multiple of 16 and the end <= N"));
  }
  absl::StatusOr<QuantSpec> spec = UnpackSpec(proj);
  if (!spec.ok()) return spec.status();
  // A panel's layout does not depend on the rows after it, so the block at r0 unpacks as a matrix of `rows`.
  traits_->unpack(*spec, p.Block(static_cast<size_t>(slot), r0), rows, p.k, /*transposed=*/false, out);
  return absl::OkStatus();
}

absl::StatusOr<QuantSpec> PackedExperts::UnpackSpec(ExpertProj proj) const {
  QuantSpec spec;
  if (traits_->stored_blocks) {
    spec.group_size = static_cast<int>(Proj(proj).layout.group);
  } else if (traits_->quantized) {
    return quant_spec();
  }
  return spec;
}

absl::Status PackedExperts::CheckFp8(const char* fn, int slot) const {
  if (absl::Status s = CheckSlot(fn, slot); !s.ok()) return s;
  if (format() != ExpertFormat::kFp8Block) {
    return absl::FailedPreconditionError(
        absl::StrCat(fn, ": the weights are ", traits_->name, ", not fp8_block: they hold no E4M3 codes"));
  }
  if (!loaded()) return absl::FailedPreconditionError(absl::StrCat(fn, " before the weights are loaded"));
  return absl::OkStatus();
}

// kt-fp8-panel16-kblock128-v1 (gemm_fp8.h): panel q, byte 16 k + r is row 16 q + r's code at column k; the
// scales are [panel][k block][16 rows].
absl::Status PackedExperts::ExpertFp8Codes(int slot, ExpertProj proj, size_t r0, size_t rows,
                                           uint8_t* codes) const {
  if (absl::Status s = CheckFp8("ExpertFp8Codes", slot); !s.ok()) return s;
  const Projection& p = Proj(proj);
  if (r0 + rows > p.n) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExpertFp8Codes: rows [", r0, ", ", r0 + rows, ") past N = ", p.n));
  }
  const PackedExpert w = p.Expert(static_cast<size_t>(slot));
  const size_t k = p.k;
  for (size_t i = 0; i < rows; ++i) {
    const size_t row = r0 + i;
    const uint8_t* panel = w.data + (row / kFp8PanelRows) * Fp8PanelStride(k) + row % kFp8PanelRows;
    uint8_t* out = codes + i * k;
    for (size_t c = 0; c < k; ++c) out[c] = panel[c * kFp8PanelRows];
  }
  return absl::OkStatus();
}

absl::Status PackedExperts::ExpertFp8BlockScales(int slot, ExpertProj proj, float* block_scales) const {
  if (absl::Status s = CheckFp8("ExpertFp8BlockScales", slot); !s.ok()) return s;
  const Projection& p = Proj(proj);
  const PackedExpert w = p.Expert(static_cast<size_t>(slot));
  const size_t kb = Fp8KBlocks(p.k);
  for (size_t bn = 0; bn * kFp8BlockK < p.n; ++bn) {
    const size_t row = bn * kFp8BlockK;
    const float* s = w.scales + (row / kFp8PanelRows) * kb * kFp8PanelRows + row % kFp8PanelRows;
    for (size_t bk = 0; bk < kb; ++bk) block_scales[bn * kb + bk] = s[bk * kFp8PanelRows];
  }
  return absl::OkStatus();
}

absl::Status PackedExperts::ExpertInt4GroupSymRows(int slot, ExpertProj proj, size_t r0, size_t rows,
                                                   QuantizedMatrix* out) const {
  if (absl::Status s = CheckSlot("ExpertInt4GroupSymRows", slot); !s.ok()) return s;
  if (format() != ExpertFormat::kInt4GroupSym) {
    return absl::FailedPreconditionError(absl::StrCat("ExpertInt4GroupSymRows: the weights are ", traits_->name,
                                                      ", not int4_group_sym"));
  }
  if (!loaded()) return absl::FailedPreconditionError("ExpertInt4GroupSymRows before the weights are loaded");
  const Projection& p = Proj(proj);
  if (r0 % kPanelRows != 0 || r0 + rows > p.n) {
    return absl::InvalidArgumentError(absl::StrCat("ExpertInt4GroupSymRows: rows [", r0, ", ", r0 + rows, ") of ",
                                                   ExpertProjName(proj), " [", p.n, ", ", p.k,
                                                   "]: the start must be a multiple of 16 and the end <= N"));
  }
  absl::StatusOr<QuantSpec> spec = quant_spec();
  if (!spec.ok()) return spec.status();
  // A panel's layout does not depend on the rows after it, so the block at r0 unpacks as a matrix of `rows`.
  const PackedExpert w = p.Block(static_cast<size_t>(slot), r0);
  *out = UnpackInt4(*spec, rows, p.k, w.data, w.scales, nullptr);
  return absl::OkStatus();
}

absl::Status PackedExperts::Unpack(const char* fn, int slot, ExpertProj proj, bool transposed,
                                   bf16_t* out) const {
  if (absl::Status s = CheckSlot(fn, slot); !s.ok()) return s;
  if (!loaded()) return absl::FailedPreconditionError(absl::StrCat(fn, " before the weights are loaded"));
  absl::StatusOr<QuantSpec> spec = UnpackSpec(proj);
  if (!spec.ok()) return spec.status();
  const Projection& p = Proj(proj);
  traits_->unpack(*spec, p.Expert(static_cast<size_t>(slot)), p.n, p.k, transposed, out);
  return absl::OkStatus();
}

absl::Status PackedExperts::LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                                        const int64_t* physical_to_logical, ThreadPool& pool) {
  if (gate == nullptr || up == nullptr || down == nullptr) {
    return absl::InvalidArgumentError("LoadWeights: gate, up and down must not be null");
  }
  const int64_t e = shape_.num_experts;
  if (physical_to_logical != nullptr) {
    for (int64_t slot = 0; slot < e; ++slot) {
      const int64_t logical = physical_to_logical[slot];
      if (logical < 0 || logical >= e) {
        return absl::InvalidArgumentError(
            absl::StrCat("physical_to_logical_map[", slot, "] = ", logical,
                         " is not a logical expert id in [0, ", e, ")"));
      }
    }
  }
  const size_t h = shape_.hidden, i = shape_.intermediate;
  if (traits_->quantized) {
    // Quantization needs finite weights; check before packing anything so a bad tensor loses nothing.
    const struct {
      const char* name;
      const bf16_t* w;
      size_t count;
    } inputs[] = {{"gate", gate, e * i * h}, {"up", up, e * i * h}, {"down", down, e * h * i}};
    for (const auto& in : inputs) {
      for (size_t idx = 0; idx < in.count; ++idx) {
        if ((in.w[idx].bits & 0x7f80u) == 0x7f80u) {
          const size_t per_expert = in.count / e;
          return absl::InvalidArgumentError(absl::StrCat(
              "LoadWeights: ", in.name, " weight of expert ", idx / per_expert, " at flat index ",
              idx % per_expert, " is not finite; ", traits_->name, " quantization needs finite weights"));
        }
      }
    }
  }
  BeginLoad();
  std::vector<absl::Status> failures(static_cast<size_t>(e) * 3);
  pool.ParallelFor(static_cast<size_t>(e) * 3, [&](size_t task, int) {
    const size_t slot = task / 3;
    const auto proj = static_cast<ExpertProj>(task % 3);
    const size_t logical = physical_to_logical ? static_cast<size_t>(physical_to_logical[slot]) : slot;
    const bf16_t* base = proj == ExpertProj::kGate ? gate : proj == ExpertProj::kUp ? up : down;
    failures[task] = LoadExpert(static_cast<int>(slot), proj, base + logical * i * h);
  });
  for (const absl::Status& s : failures) {
    if (!s.ok()) return s;
  }
  return FinishLoad();
}

void PackedExperts::BeginLoad() {
  std::fill(proj_loaded_.begin(), proj_loaded_.end(), 0);
  loaded_ = false;
}

absl::Status PackedExperts::LoadExpert(int slot, ExpertProj proj, const bf16_t* w) {
  if (absl::Status s = CheckSlot("LoadExpert", slot); !s.ok()) return s;
  if (w == nullptr) return absl::InvalidArgumentError("LoadExpert: w must not be null");
  if (traits_->stored_blocks) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpert: a ", traits_->name,
                                                   " layer holds a GGUF file's blocks as stored and takes no bf16 "
                                                   "weights; load it from the file (method LLAMAFILE, weight_path)"));
  }
  const size_t n = ProjRows(proj), k = ProjCols(proj);
  if (!traits_->quantized) {
    traits_->pack_bf16(w, n, k, Proj(proj).MutableExpert(static_cast<size_t>(slot)));
    MarkLoaded(slot, proj);
    return absl::OkStatus();
  }
  absl::StatusOr<QuantSpec> spec = quant_spec();
  if (!spec.ok()) return spec.status();
  // Every quantized format through the vectorized quantizer: quant.h's Quantize bit for bit
  // (quant_fast_test), its errors included (a non-finite weight named by row and column). The scalar
  // Quantize would bound online loading (docs/perf-log/2026-11-27-weight-io.md).
  absl::StatusOr<QuantizedMatrix> q = QuantizeFast(isa_, *spec, w, k, n, k);
  if (!q.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpert: ", ExpertProjName(proj), " weight of slot ", slot,
                                                   ": ", q.status().message()));
  }
  return LoadExpertQuantized(slot, proj, *q);
}

absl::Status PackedExperts::LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm) {
  if (absl::Status s = CheckSlot("LoadExpertQuantized", slot); !s.ok()) return s;
  absl::StatusOr<QuantSpec> spec = quant_spec();
  if (!spec.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: a ", traits_->name,
                                                   " layer takes bf16 weights (LoadExpert)"));
  }
  const size_t n = ProjRows(proj), k = ProjCols(proj);
  const char* name = ExpertProjName(proj);
  if (qm.spec.format != spec->format || qm.spec.group_size != spec->group_size) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: ", name, " of slot ", slot, " is ",
                                                   QuantLayoutTag(qm.spec), ", the layer expects ",
                                                   QuantLayoutTag(*spec)));
  }
  if (qm.n != n || qm.k != k) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: ", name, " of slot ", slot, " is [",
                                                   qm.n, ", ", qm.k, "], expected [", n, ", ", k, "]"));
  }
  const size_t want_zeros = IsAsymFormat(spec->format) ? n * ScalesPerRow(*spec, k) : 0;
  if (qm.zeros.size() != want_zeros) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: ", name, " of slot ", slot, " has ",
                                                   qm.zeros.size(), " zero points, expected ", want_zeros));
  }
  if (qm.data.size() != n * QuantizedRowBytes(*spec, k) || qm.scales.size() != n * ScalesPerRow(*spec, k)) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: ", name, " of slot ", slot, " has ",
                                                   qm.data.size(), " data bytes and ", qm.scales.size(),
                                                   " scales, expected ", n * QuantizedRowBytes(*spec, k),
                                                   " and ", n * ScalesPerRow(*spec, k)));
  }
  traits_->pack_quantized(qm, Proj(proj).MutableExpert(static_cast<size_t>(slot)));
  MarkLoaded(slot, proj);
  return absl::OkStatus();
}

absl::Status PackedExperts::LoadExpertBlocks(int slot, ExpertProj proj, const uint8_t* bytes, size_t size) {
  if (absl::Status s = CheckSlot("LoadExpertBlocks", slot); !s.ok()) return s;
  if (!traits_->stored_blocks) {
    return absl::InvalidArgumentError(
        absl::StrCat("LoadExpertBlocks: a ", traits_->name, " layer does not hold GGUF blocks"));
  }
  Projection& p = Proj(proj);
  if (bytes == nullptr || size != p.layout.expert_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LoadExpertBlocks: ", ExpertProjName(proj), " of slot ", slot, " is ", size, " bytes, expected ",
        p.layout.expert_bytes, " (", p.n, " rows of ", p.layout.expert_bytes / p.n, " bytes of ",
        GgufTypeName(static_cast<GgufType>(static_cast<int>(p.layout.group))), " blocks)"));
  }
  std::memcpy(p.MutableExpert(static_cast<size_t>(slot)).data, bytes, size);
  MarkLoaded(slot, proj);
  return absl::OkStatus();
}

absl::Status PackedExperts::LoadExpertTransposed(int slot, ExpertProj proj, const PackedExperts& src) {
  if (absl::Status s = CheckSlot("LoadExpertTransposed", slot); !s.ok()) return s;
  if (absl::Status s = src.CheckSlot("LoadExpertTransposed (source)", slot); !s.ok()) return s;
  if (format() != src.format() || !transposes_packed()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LoadExpertTransposed: both layers must be of one format with a packed transpose (bf16), got ",
        traits_->name, " and source ", src.traits_->name,
        " (the other formats transpose through UnpackExpertTransposed + LoadExpert)"));
  }
  if (!src.loaded()) return absl::FailedPreconditionError("LoadExpertTransposed: the source layer is not loaded");
  const size_t n = ProjRows(proj), k = ProjCols(proj);
  if (src.ProjRows(proj) != k || src.ProjCols(proj) != n) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertTransposed: ", ExpertProjName(proj), " is [", n, ", ",
                                                   k, "] here and [", src.ProjRows(proj), ", ", src.ProjCols(proj),
                                                   "] in the source; the source must be its transpose"));
  }
  traits_->transpose_packed(src.Proj(proj).Expert(static_cast<size_t>(slot)), k, n,
                            Proj(proj).MutableExpert(static_cast<size_t>(slot)));
  MarkLoaded(slot, proj);
  return absl::OkStatus();
}

absl::Status PackedExperts::FinishLoad() {
  for (size_t i = 0; i < proj_loaded_.size(); ++i) {
    if (proj_loaded_[i] == 0) {
      return absl::FailedPreconditionError(absl::StrCat("FinishLoad: expert slot ", i / 3, " has no ",
                                                        ExpertProjName(static_cast<ExpertProj>(i % 3)),
                                                        " weight loaded"));
    }
  }
  loaded_ = true;
  return absl::OkStatus();
}

void PackedExperts::SwapWeights(PackedExperts& other) {
  for (int p = 0; p < 3; ++p) std::swap(proj_[p], other.proj_[p]);
  proj_loaded_.swap(other.proj_loaded_);
  const bool mine = loaded();
  loaded_.store(other.loaded(), std::memory_order_release);
  other.loaded_.store(mine, std::memory_order_release);
}

}  // namespace kt
