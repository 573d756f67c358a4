#include "kt/moe/moe_layer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <new>

#include "absl/strings/str_cat.h"
#include "kt/kernels/act_quant.h"
#include "kt/kernels/activation.h"
#include "kt/kernels/quant.h"
#include "kt/kernels/quant_fast.h"
#include "kt/runtime/memory.h"

namespace kt {
namespace {

// Work unit of the gate/up and down phases: this many 16-row panels of output columns (48 columns). Small
// enough that a decode step (8 experts x 768/48 gate/up blocks = 128 tasks) balances across threads, big
// enough that the atomic task counter is negligible; 3 panels is also the AVX512-BF16 kernel's register
// block, so a task never splits one.
// AMX works on panel pairs (2 x 16 columns per tile pass) and is fast enough that a task's operands must
// stay in L2 (2 MiB per core on the AMX host): a gate/up task re-reads its gate and up column blocks for
// every 64-row chunk of the expert, so the chunk's A rows plus both blocks should fit in kAmxL2Budget
// (AmxGateUpPanels). On the Qwen3-235B shape (K = 4096, bf16) that is 2 panels, at K = 2048 (Qwen3-30B)
// 8; each measured faster than the other widths tried (`kt bench --tiling`; docs/perf-log/2026-11-27-int8.md
// and 2026-11-27-amx-bf16.md). The down phase keeps 8 panels (128 columns): its blocks are K = I wide and
// fit with all of an expert's rows.
constexpr size_t kPanelsPerTask = 3;
constexpr size_t kPanelsPerTaskAmx = 8;
constexpr size_t kMaxPanelsPerTask = 16;  // MoeTiling's bound
constexpr size_t kMaxColsPerTask = kMaxPanelsPerTask * kPanelRows;
constexpr size_t kMaxRowChunk = 1024;
// Rows of one expert processed together in the gate/up phase; bounds the per-thread fp32 scratch to
// 2 x 64 x 128 floats (64 KiB) whatever the batch size.
constexpr size_t kRowChunk = 64;
constexpr size_t kAmxL2Budget = 1280 * 1024;

// Panels per AMX gate/up task: the largest even count (whole tile pairs), 2 to 8, with
// kRowChunk * K * act_bytes + 2 * cols * K * weight_bytes <= kAmxL2Budget.
size_t AmxGateUpPanels(size_t k, size_t act_bytes, size_t weight_bytes) {
  const size_t per_k = kAmxL2Budget / k;
  const size_t a = kRowChunk * act_bytes;
  const size_t cols = per_k > a ? (per_k - a) / (2 * weight_bytes) : 0;
  const size_t panels = cols / (2 * kPanelRows) * 2;
  return std::min<size_t>(kPanelsPerTaskAmx, std::max<size_t>(2, panels));
}

// Spin-wait hint for the forward pipeline's dependencies (waits last a fraction of one task).
inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Row stride, in elements of `elem_bytes`, of the scratch activation arrays for rows of `k` values: whole
// cache lines plus one. Expert K dimensions are powers of two or small multiples of them, so unpadded rows
// sit 2^n bytes apart and the 16 rows of an AMX A tile (or a kernel's row block) all fall into one L1 set;
// the extra line spreads them over 16 sets, which the AMX tile kernels need to load A tiles at speed
// (docs/perf-log/2026-11-27-int8.md).
size_t PaddedStride(size_t k, size_t elem_bytes) {
  const size_t line_elems = 64 / elem_bytes;
  return (k + line_elems - 1) / line_elems * line_elems + line_elems;
}

}  // namespace

size_t MoeLayer::RowChunk() const {
  return tiling_.row_chunk > 0 ? static_cast<size_t>(tiling_.row_chunk) : kRowChunk;
}

size_t MoeLayer::KBlock() const { return tiling_.k_block > 0 ? static_cast<size_t>(tiling_.k_block) : 0; }

size_t MoeLayer::ScratchPerThread() const {
  // Gate and up blocks of one task ((row_chunk + 15) x up to kMaxColsPerTask each: a short remainder joins
  // the last chunk), or a down block of rows (at least 62 rows of the widest column block).
  return 2 * (RowChunk() + 15) * kMaxColsPerTask;
}

template <typename T>
void moe_internal::AlignedBuffer<T>::Resize(size_t n) {
  if (n == size) return;
  T* p = static_cast<T*>(AllocateArray(n * sizeof(T)));  // huge pages for large arrays (memory.h)
  data.reset(p);
  size = n;
}

template <typename T>
void moe_internal::AlignedBuffer<T>::Reserve(size_t n) {
  if (n > size) Resize(n);
}

std::shared_ptr<MoeScratch> MoeScratch::Shared() {
  static std::mutex* mu = new std::mutex;
  static std::weak_ptr<MoeScratch>* shared = new std::weak_ptr<MoeScratch>;
  std::lock_guard<std::mutex> lock(*mu);
  std::shared_ptr<MoeScratch> s = shared->lock();
  if (s == nullptr) {
    s = std::make_shared<MoeScratch>();
    *shared = s;
  }
  return s;
}

size_t MoeScratch::bytes() const {
  std::lock_guard<std::mutex> lock(mu);
  return xs.size * sizeof(bf16_t) + hs.size * sizeof(bf16_t) + qxs.size + qhs.size +
         (sxs.size + shs.size + acc.size + per_thread.size) * sizeof(float) +
         (xsums.size + hsums.size) * sizeof(int32_t);
}

absl::Status ValidateMoeConfig(const MoeConfig& c) {
  auto positive = [](const char* name, int v) -> absl::Status {
    if (v <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("MoeConfig.", name, " must be > 0, got ", v));
    }
    return absl::OkStatus();
  };
  for (const auto& [name, v] : {std::pair<const char*, int>{"num_experts", c.num_experts},
                                {"top_k", c.top_k},
                                {"hidden", c.hidden},
                                {"intermediate", c.intermediate},
                                {"max_len", c.max_len}}) {
    if (absl::Status s = positive(name, v); !s.ok()) return s;
  }
  if (c.top_k > c.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("MoeConfig.top_k (", c.top_k,
                                                   ") must be <= num_experts (", c.num_experts, ")"));
  }
  return absl::OkStatus();
}

const char* ExpertFormatName(ExpertFormat format) {
  switch (format) {
    case ExpertFormat::kBf16:
      return "bf16";
    case ExpertFormat::kInt8:
      return "int8";
    case ExpertFormat::kInt4:
      return "int4";
    case ExpertFormat::kInt4GroupSym:
      return "int4_group_sym";
    case ExpertFormat::kInt4GroupAsym:
      return "int4_group_asym";
    case ExpertFormat::kInt4Asym:
      return "int4_asym";
  }
  return "unknown";
}

absl::StatusOr<ExpertFormat> ParseExpertFormat(absl::string_view name) {
  for (ExpertFormat f : {ExpertFormat::kBf16, ExpertFormat::kInt8, ExpertFormat::kInt4,
                         ExpertFormat::kInt4GroupSym, ExpertFormat::kInt4GroupAsym, ExpertFormat::kInt4Asym}) {
    if (name == ExpertFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown expert format '", name,
                                                 "'; expected bf16, int8, int4, int4_asym, int4_group_sym "
                                                 "or int4_group_asym"));
}

MoeLayer::MoeLayer(const MoeConfig& config, Isa isa, ExpertFormat format)
    : config_(config), isa_(isa), format_(format) {
  if (format == ExpertFormat::kBf16) {
    gemm_bf16_ = GetGemmBf16(isa);
  } else if (format == ExpertFormat::kInt8) {
    gemm_int8_ = GetGemmInt8(isa);
  } else {
    gemm_int4_ = GetGemmInt4(isa);
  }
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const MoeConfig& config, Isa isa,
                                                           ExpertFormat format,
                                                           std::shared_ptr<MoeScratch> scratch) {
  if (absl::Status s = ValidateMoeConfig(config); !s.ok()) return s;
  if (!IsaSupported(isa, GetCpuFeatures())) {
    return absl::FailedPreconditionError(
        absl::StrCat("kernel path ", IsaName(isa), " is not supported by this CPU"));
  }
  const bool int8 = format == ExpertFormat::kInt8;
  const bool int4 = IsInt4ExpertFormat(format);
  const bool has_kernel = int8 ? GetGemmInt8(isa) != nullptr
                          : int4 ? GetGemmInt4(isa) != nullptr
                                 : GetGemmBf16(isa) != nullptr;
  if (!has_kernel) {
    return absl::UnimplementedError(absl::StrCat("no ", ExpertFormatName(format), " kernel for path ",
                                                 IsaName(isa)));
  }
  if (int8 && (static_cast<size_t>(config.hidden) >= kInt8MaxK ||
               static_cast<size_t>(config.intermediate) >= kInt8MaxK)) {
    return absl::InvalidArgumentError(absl::StrCat("int8 experts need hidden and intermediate < ",
                                                   kInt8MaxK, " (exact int32 sums)"));
  }
  if (int4 && (static_cast<size_t>(config.hidden) >= kInt4MaxK ||
               static_cast<size_t>(config.intermediate) >= kInt4MaxK)) {
    return absl::InvalidArgumentError(absl::StrCat("int4 experts need hidden and intermediate < ",
                                                   kInt4MaxK, " (exact int32 sums)"));
  }
  if (IsGroupExpertFormat(format)) {
    absl::StatusOr<QuantSpec> spec = QuantSpecOf(format, config.group_size);
    if (!spec.ok()) return spec.status();
    for (const auto& [name, v] : {std::pair<const char*, int>{"hidden", config.hidden},
                                  {"intermediate", config.intermediate}}) {
      if (v % config.group_size != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "MoeConfig.", name, " = ", v, " must be a multiple of group_size = ", config.group_size,
            " for ", ExpertFormatName(format), " experts"));
      }
    }
  }
  std::unique_ptr<MoeLayer> moe(new MoeLayer(config, isa, format));
  const size_t e = config.num_experts, h = config.hidden, i = config.intermediate;
  const size_t rows = static_cast<size_t>(config.max_len) * config.top_k;
  moe->InitProjection(moe->gate_, i, h);
  moe->InitProjection(moe->up_, i, h);
  moe->InitProjection(moe->down_, h, i);
  moe->AllocateWeights();
  moe->expert_count_.assign(e, 0);
  moe->expert_begin_.assign(e + 1, 0);
  moe->gu_left_.reset(new std::atomic<int>[e]);
  moe->quant_left_.reset(new std::atomic<int>[e]);
  moe->row_token_.assign(rows, 0);
  moe->row_weight_.assign(rows, 0.0f);
  moe->token_slot_row_.assign(rows, -1);
  moe->active_.reserve(e);
  const bool quantized = format != ExpertFormat::kBf16;
  moe->ldx_ = PaddedStride(h, quantized ? 1 : sizeof(bf16_t));
  moe->ldh_ = PaddedStride(i, sizeof(bf16_t));
  moe->ldqh_ = PaddedStride(i, 1);
  moe->ldy_ = PaddedStride(h, sizeof(float));  // acc_ rows
  moe->scratch_ = scratch != nullptr ? std::move(scratch) : MoeScratch::Shared();
  MoeScratch& sc = *moe->scratch_;
  std::lock_guard<std::mutex> lock(sc.mu);
  if (!quantized) sc.xs.Reserve(rows * moe->ldx_);  // others gather into the int8 copy
  sc.hs.Reserve(rows * moe->ldh_);
  sc.acc.Reserve(static_cast<size_t>(config.max_len) * moe->ldy_);
  if (int8 || int4) {
    sc.qxs.Reserve(rows * moe->ldx_);
    sc.sxs.Reserve(rows * moe->ActGroups(h));
    sc.qhs.Reserve(rows * moe->ldqh_);
    sc.shs.Reserve(rows * moe->ActGroups(i));
  }
  if (int4) {
    sc.xsums.Reserve(rows * moe->ActGroups(h));
    sc.hsums.Reserve(rows * moe->ActGroups(i));
  }
  return moe;
}

void MoeLayer::InitProjection(Projection& p, size_t n, size_t k) const {
  p.n = n;
  p.k = k;
  if (format_ == ExpertFormat::kBf16) {
    p.panel_bytes = PanelStride(k) * sizeof(bf16_t);
    p.expert_bytes = PackedBf16Size(n, k) * sizeof(bf16_t);
  } else if (format_ == ExpertFormat::kInt8) {
    static_assert(kInt8PanelRows == kPanelRows, "column blocks address both layouts alike");
    p.panel_bytes = Int8PanelStride(k);
    p.expert_bytes = PackedInt8Bytes(n, k);
    p.padded_rows = PackedInt8Rows(n);
    p.scale_entries = p.padded_rows;
  } else {
    static_assert(kInt4PanelRows == kPanelRows, "column blocks address all layouts alike");
    p.group = IsGroupExpertFormat(format_) ? static_cast<size_t>(config_.group_size) : 0;
    p.panel_bytes = Int4PanelStride(k);
    p.expert_bytes = PackedInt4Bytes(n, k);
    p.scale_entries = PackedInt4Scales(n, k, p.group);
  }
}

size_t MoeLayer::ActGroups(size_t k) const {
  return IsGroupExpertFormat(format_) ? k / static_cast<size_t>(config_.group_size) : 1;
}

void MoeLayer::QuantizeRow(const bf16_t* x, size_t k, int8_t* q, float* scales, int32_t* sums) const {
  // The vectorized quantizers (act_quant.h), bit-identical to quant.h's; group_size and k were validated
  // at Create.
  if (IsGroupExpertFormat(format_)) {
    QuantizeRowInt8Grouped(isa_, x, k, static_cast<size_t>(config_.group_size), q, scales);
  } else {
    QuantizeRowInt8(isa_, x, k, q, scales);
  }
  if (IsInt4ExpertFormat(format_)) {
    Int4ActivationSums(1, k, IsGroupExpertFormat(format_) ? config_.group_size : 0, q, k, sums);
  }
}

void MoeLayer::Projection::PackBf16(size_t slot, const bf16_t* w) {
  kt::PackBf16(w, k, n, k, reinterpret_cast<bf16_t*>(data.get() + slot * expert_bytes));
}

void MoeLayer::Projection::PackQuantized(size_t slot, const QuantizedMatrix& qm) {
  if (qm.spec.format != QuantFormat::kInt8PerChannel) {
    // The layer checked spec and shape (LoadExpertQuantized), so packing cannot fail.
    (void)PackInt4(qm, data.get() + slot * expert_bytes, scales.get() + slot * scale_entries,
                   zeros.size ? zeros.get() + slot * scale_entries : nullptr);
    return;
  }
  PackInt8(reinterpret_cast<const int8_t*>(qm.data.data()), k, qm.scales.data(), n, k,
           reinterpret_cast<int8_t*>(data.get() + slot * expert_bytes), scales.get() + slot * padded_rows,
           sums.get() + slot * padded_rows);
}

size_t MoeLayer::weight_bytes() const {
  size_t bytes = 0;
  for (const Projection* p : {&gate_, &up_, &down_}) {
    bytes += p->data.size + p->scales.size * sizeof(float) + p->sums.size * sizeof(int32_t) + p->zeros.size;
  }
  return bytes;
}

void MoeLayer::Gemm(const Projection& p, size_t e, size_t c0, size_t cols, bool hidden_input,
                    size_t r0, size_t m, float* y, size_t ldy) const {
  ProjInput in;
  if (format_ == ExpertFormat::kBf16) {
    in.ld = hidden_input ? ldh_ : ldx_;
    in.x = (hidden_input ? scratch_->hs.get() : scratch_->xs.get()) + r0 * in.ld;
  } else {
    const size_t groups = ActGroups(p.k);
    in.ld = hidden_input ? ldqh_ : ldx_;
    const MoeScratch& sc = *scratch_;
    in.qx = (hidden_input ? sc.qhs.get() : sc.qxs.get()) + r0 * in.ld;
    in.sx = (hidden_input ? sc.shs.get() : sc.sxs.get()) + r0 * groups;
    if (IsInt4ExpertFormat(format_)) in.xsum = (hidden_input ? sc.hsums.get() : sc.xsums.get()) + r0 * groups;
  }
  GemmRows(p, e, c0, cols, in, m, y, ldy);
}

void MoeLayer::GemmRows(const Projection& p, size_t e, size_t c0, size_t cols, const ProjInput& in,
                        size_t m, float* y, size_t ldy) const {
  const size_t kb = isa_ == Isa::kAmx ? KBlock() : 0;
  if (format_ == ExpertFormat::kBf16) {
    const auto* panels = reinterpret_cast<const bf16_t*>(p.Panels(e, c0));
    if (kb > 0) {
      internal::GemmBf16AmxKBlocked(kb, m, p.k, in.x, in.ld, panels, cols, y, ldy);
    } else {
      gemm_bf16_(m, p.k, in.x, in.ld, panels, cols, y, ldy);
    }
  } else if (format_ == ExpertFormat::kInt8) {
    const size_t row0 = e * p.padded_rows + c0;
    const auto* panels = reinterpret_cast<const int8_t*>(p.Panels(e, c0));
    if (kb > 0) {
      internal::GemmInt8AmxKBlocked(kb, m, p.k, in.qx, in.ld, in.sx, panels, p.scales.get() + row0,
                                    p.sums.get() + row0, cols, y, ldy);
    } else {
      gemm_int8_(m, p.k, in.qx, in.ld, in.sx, panels, p.scales.get() + row0, p.sums.get() + row0, cols, y,
                 ldy);
    }
  } else {
    // Scales and zero points of a column block start c0 / 16 panels into the expert's [panel][group][16].
    const size_t e0 = e * p.scale_entries + c0 * ActGroups(p.k);
    gemm_int4_(m, p.k, p.group, in.qx, in.ld, in.sx, in.xsum, p.Panels(e, c0), p.scales.get() + e0,
               p.zeros.size ? p.zeros.get() + e0 : nullptr, cols, y, ldy);
  }
}

void MoeLayer::PrepareRow(ExpertProj proj, const bf16_t* x, int8_t* q, float* scales, int32_t* sums) const {
  QuantizeRow(x, ProjCols(proj), q, scales, sums);
}

void MoeLayer::ProjectBlock(ExpertProj proj, int slot, size_t c0, size_t cols, const ProjInput& in,
                            size_t m, float* y, size_t ldy) const {
  GemmRows(Proj(proj), static_cast<size_t>(slot), c0, cols, in, m, y, ldy);
}

absl::Status MoeLayer::UnpackExpert(int slot, ExpertProj proj, bf16_t* w) const {
  return Unpack("UnpackExpert", slot, proj, /*transposed=*/false, w);
}

absl::Status MoeLayer::UnpackExpertTransposed(int slot, ExpertProj proj, bf16_t* wt) const {
  return Unpack("UnpackExpertTransposed", slot, proj, /*transposed=*/true, wt);
}

absl::Status MoeLayer::Unpack(const char* fn, int slot, ExpertProj proj, bool transposed, bf16_t* out) const {
  if (absl::Status s = CheckSlot(fn, slot); !s.ok()) return s;
  if (!loaded_) return absl::FailedPreconditionError(absl::StrCat(fn, " before the weights are loaded"));
  const Projection& p = Proj(proj);
  const size_t e = static_cast<size_t>(slot);
  const uint8_t* data = p.data.get() + e * p.expert_bytes;
  if (format_ == ExpertFormat::kBf16) {
    if (!transposed) {
      UnpackBf16(reinterpret_cast<const bf16_t*>(data), p.n, p.k, out, p.k);
      return absl::OkStatus();
    }
    const bf16_t* panels = reinterpret_cast<const bf16_t*>(data);
    const size_t stride = PanelStride(p.k);
    for (size_t row = 0; row < p.n; ++row) {
      for (size_t kk = 0; kk < p.k; ++kk) {
        out[kk * p.n + row] =
            panels[(row / kPanelRows) * stride + ((kk / 2) * kPanelRows + row % kPanelRows) * 2 + (kk & 1)];
      }
    }
    return absl::OkStatus();
  }
  if (IsInt4ExpertFormat(format_)) {
    // Dequantize's one fp32 multiply per element and one rounding to bf16, straight from the packed
    // panels through a 16-entry table per group (quant_fast.h), with no canonical copy, fp32 buffer or
    // per-nibble loop (UnpackInt4 + Dequantize); kt/sft unpacks every expert (transposed) to build its
    // backward copy.
    absl::StatusOr<QuantSpec> spec = quant_spec();
    if (!spec.ok()) return spec.status();
    const size_t e0 = e * p.scale_entries;
    const uint8_t* zeros = p.zeros.size ? p.zeros.get() + e0 : nullptr;
    if (transposed) {
      UnpackInt4ToBf16Transposed(*spec, p.n, p.k, data, p.scales.get() + e0, zeros, out, p.n);
    } else {
      UnpackInt4ToBf16(*spec, p.n, p.k, data, p.scales.get() + e0, zeros, out, p.k);
    }
    return absl::OkStatus();
  }
  if (format_ != ExpertFormat::kInt8) {
    // A format added later must say how its packed weights read back (kt/sft builds its transposed
    // backward copy from this); never reinterpret its bytes as int8.
    return absl::UnimplementedError(
        absl::StrCat(fn, ": not implemented for ", ExpertFormatName(format_), " experts"));
  }
  // The same one fp32 multiply as Dequantize (quant.h), then one rounding to bf16, through a 256-entry
  // table per row.
  const int8_t* q = reinterpret_cast<const int8_t*>(data);
  const float* scales = p.scales.get() + e * p.padded_rows;
  if (transposed) {
    UnpackInt8ToBf16Transposed(p.n, p.k, q, scales, out, p.n);
  } else {
    UnpackInt8ToBf16(p.n, p.k, q, scales, out, p.k);
  }
  return absl::OkStatus();
}

absl::Status MoeLayer::LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                                  const int64_t* physical_to_logical, ThreadPool& pool) {
  if (gate == nullptr || up == nullptr || down == nullptr) {
    return absl::InvalidArgumentError("LoadWeights: gate, up and down must not be null");
  }
  const int64_t e = config_.num_experts;
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
  const size_t h = config_.hidden, i = config_.intermediate;
  if (format_ != ExpertFormat::kBf16) {
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
              idx % per_expert, " is not finite; ", ExpertFormatName(format_),
              " quantization needs finite weights"));
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

absl::Status MoeLayer::SetTiling(const MoeTiling& tiling) {
  for (const auto& [name, v] : {std::pair<const char*, int>{"gate_up_panels", tiling.gate_up_panels},
                                {"down_panels", tiling.down_panels}}) {
    if (v < 0 || v > static_cast<int>(kMaxPanelsPerTask)) {
      return absl::InvalidArgumentError(absl::StrCat("MoeTiling.", name, " must be 0 (automatic) or in [1, ",
                                                     kMaxPanelsPerTask, "], got ", v));
    }
  }
  if (tiling.row_chunk < 0 || (tiling.row_chunk > 0 && tiling.row_chunk < 16) ||
      tiling.row_chunk > static_cast<int>(kMaxRowChunk)) {
    return absl::InvalidArgumentError(absl::StrCat("MoeTiling.row_chunk must be 0 (automatic) or in [16, ",
                                                   kMaxRowChunk, "], got ", tiling.row_chunk));
  }
  if (tiling.k_block < 0 || tiling.k_block > (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat("MoeTiling.k_block must be 0 (automatic) or in [1, 1048576], got ", tiling.k_block));
  }
  tiling_ = tiling;
  return absl::OkStatus();
}

const char* ExpertProjName(ExpertProj proj) {
  switch (proj) {
    case ExpertProj::kGate:
      return "gate";
    case ExpertProj::kUp:
      return "up";
    case ExpertProj::kDown:
      return "down";
  }
  return "unknown";
}

absl::StatusOr<QuantSpec> QuantSpecOf(ExpertFormat format, int group_size) {
  switch (format) {
    case ExpertFormat::kInt8:
      return QuantSpec{QuantFormat::kInt8PerChannel, 0};
    case ExpertFormat::kInt4:
      return QuantSpec{QuantFormat::kInt4PerChannel, 0};
    case ExpertFormat::kInt4Asym:
      return QuantSpec{QuantFormat::kInt4PerChannelAsym, 0};
    case ExpertFormat::kInt4GroupSym:
    case ExpertFormat::kInt4GroupAsym:
      if (group_size != 32 && group_size != 64 && group_size != 128) {
        return absl::InvalidArgumentError(absl::StrCat("group_size = ", group_size, " for ",
                                                       ExpertFormatName(format),
                                                       " experts; expected 32, 64 or 128"));
      }
      return QuantSpec{format == ExpertFormat::kInt4GroupSym ? QuantFormat::kInt4GroupSym
                                                             : QuantFormat::kInt4GroupAsym,
                       group_size};
    case ExpertFormat::kBf16:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("expert format ", ExpertFormatName(format), " is not a quantized format"));
}

size_t MoeLayer::ProjRows(ExpertProj proj) const {
  return proj == ExpertProj::kDown ? config_.hidden : config_.intermediate;
}
size_t MoeLayer::ProjCols(ExpertProj proj) const {
  return proj == ExpertProj::kDown ? config_.intermediate : config_.hidden;
}

MoeLayer::Projection& MoeLayer::Proj(ExpertProj proj) {
  return proj == ExpertProj::kGate ? gate_ : proj == ExpertProj::kUp ? up_ : down_;
}
const MoeLayer::Projection& MoeLayer::Proj(ExpertProj proj) const {
  return proj == ExpertProj::kGate ? gate_ : proj == ExpertProj::kUp ? up_ : down_;
}

void MoeLayer::AllocateWeights() {
  if (!proj_loaded_.empty()) return;
  const size_t e = config_.num_experts;
  for (Projection* p : {&gate_, &up_, &down_}) {
    p->data.Resize(e * p->expert_bytes);
    if (format_ == ExpertFormat::kInt8) {
      p->scales.Resize(e * p->padded_rows);
      p->sums.Resize(e * p->padded_rows);
    } else if (format_ != ExpertFormat::kBf16) {
      p->scales.Resize(e * p->scale_entries);
      if (format_ == ExpertFormat::kInt4GroupAsym || format_ == ExpertFormat::kInt4Asym) {
        p->zeros.Resize(e * p->scale_entries);
      }
    }
  }
  proj_loaded_.assign(e * 3, 0);
}

void MoeLayer::BeginLoad() {
  std::fill(proj_loaded_.begin(), proj_loaded_.end(), 0);
  loaded_ = false;
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::CreateStaging() const {
  absl::StatusOr<std::unique_ptr<MoeLayer>> staged = Create(config_, isa_, format_, scratch_);
  if (!staged.ok()) return staged.status();
  (*staged)->tiling_ = tiling_;
  return staged;
}

absl::Status MoeLayer::AdoptWeights(MoeLayer& staged) {
  if (&staged == this) return absl::InvalidArgumentError("AdoptWeights: a layer cannot adopt its own weights");
  const MoeConfig& a = config_;
  const MoeConfig& b = staged.config_;
  if (a.num_experts != b.num_experts || a.hidden != b.hidden || a.intermediate != b.intermediate ||
      staged.isa_ != isa_ || staged.format_ != format_ ||
      (IsGroupExpertFormat(format_) && a.group_size != b.group_size)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AdoptWeights: the staged layer (E=", b.num_experts, " H=", b.hidden, " I=", b.intermediate, " ",
        IsaName(staged.isa_), " ", ExpertFormatName(staged.format_), ") differs from this one (E=", a.num_experts,
        " H=", a.hidden, " I=", a.intermediate, " ", IsaName(isa_), " ", ExpertFormatName(format_), ")"));
  }
  if (!staged.loaded()) return absl::FailedPreconditionError("AdoptWeights: the staged layer is not loaded");
  std::swap(gate_, staged.gate_);
  std::swap(up_, staged.up_);
  std::swap(down_, staged.down_);
  proj_loaded_.swap(staged.proj_loaded_);
  const bool was_loaded = loaded();
  loaded_.store(true, std::memory_order_release);
  staged.loaded_.store(was_loaded, std::memory_order_release);
  return absl::OkStatus();
}

absl::Status MoeLayer::CheckSlot(const char* fn, int slot) const {
  if (slot < 0 || slot >= config_.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": slot = ", slot, " is not in [0, num_experts = ",
                                                   config_.num_experts, ")"));
  }
  return absl::OkStatus();
}

absl::Status MoeLayer::LoadExpert(int slot, ExpertProj proj, const bf16_t* w) {
  if (absl::Status s = CheckSlot("LoadExpert", slot); !s.ok()) return s;
  if (w == nullptr) return absl::InvalidArgumentError("LoadExpert: w must not be null");
  const size_t n = ProjRows(proj), k = ProjCols(proj);
  if (format_ == ExpertFormat::kBf16) {
    Proj(proj).PackBf16(slot, w);
    proj_loaded_[static_cast<size_t>(slot) * 3 + static_cast<int>(proj)] = 1;
    return absl::OkStatus();
  }
  absl::StatusOr<QuantSpec> spec = quant_spec();
  if (!spec.ok()) return spec.status();
  // Every quantized format through the vectorized quantizer: quant.h's Quantize bit for bit
  // (quant_fast_test), its errors included (a non-finite weight named by row and column). The scalar
  // Quantize would bound online loading (docs/perf-log/2026-11-27-weight-io.md).
  absl::StatusOr<QuantizedMatrix> q = QuantizeFast(isa_, *spec, w, k, n, k);
  if (!q.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpert: ", ExpertProjName(proj),
                                                   " weight of slot ", slot, ": ", q.status().message()));
  }
  return LoadExpertQuantized(slot, proj, *q);
}

absl::Status MoeLayer::LoadExpertTransposed(int slot, ExpertProj proj, const MoeLayer& src) {
  if (absl::Status s = CheckSlot("LoadExpertTransposed", slot); !s.ok()) return s;
  if (absl::Status s = src.CheckSlot("LoadExpertTransposed (source)", slot); !s.ok()) return s;
  if (format_ != ExpertFormat::kBf16 || src.format_ != ExpertFormat::kBf16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LoadExpertTransposed: both layers must be bf16, got ", ExpertFormatName(format_), " and source ",
        ExpertFormatName(src.format_), " (quantized formats transpose through UnpackExpert + LoadExpert)"));
  }
  if (!src.loaded_) return absl::FailedPreconditionError("LoadExpertTransposed: the source layer is not loaded");
  const size_t n = ProjRows(proj), k = ProjCols(proj);
  if (src.ProjRows(proj) != k || src.ProjCols(proj) != n) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LoadExpertTransposed: ", ExpertProjName(proj), " is [", n, ", ", k, "] here and [", src.ProjRows(proj),
        ", ", src.ProjCols(proj), "] in the source; the source must be its transpose"));
  }
  const Projection& from = src.Proj(proj);
  Projection& to = Proj(proj);
  TransposePackedBf16(reinterpret_cast<const bf16_t*>(from.data.get() + slot * from.expert_bytes), k, n,
                      reinterpret_cast<bf16_t*>(to.data.get() + slot * to.expert_bytes));
  proj_loaded_[static_cast<size_t>(slot) * 3 + static_cast<int>(proj)] = 1;
  return absl::OkStatus();
}

absl::Status MoeLayer::LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm) {
  if (absl::Status s = CheckSlot("LoadExpertQuantized", slot); !s.ok()) return s;
  absl::StatusOr<QuantSpec> spec = quant_spec();
  if (!spec.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: a ", ExpertFormatName(format_),
                                                   " layer takes bf16 weights (LoadExpert)"));
  }
  const size_t n = ProjRows(proj), k = ProjCols(proj);
  const char* name = ExpertProjName(proj);
  if (qm.spec.format != spec->format || qm.spec.group_size != spec->group_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "LoadExpertQuantized: ", name, " of slot ", slot, " is ", QuantLayoutTag(qm.spec),
        ", the layer expects ", QuantLayoutTag(*spec)));
  }
  if (qm.n != n || qm.k != k) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: ", name, " of slot ", slot,
                                                   " is [", qm.n, ", ", qm.k, "], expected [", n, ", ",
                                                   k, "]"));
  }
  const size_t want_zeros = IsAsymFormat(spec->format) ? n * ScalesPerRow(*spec, k) : 0;
  if (qm.zeros.size() != want_zeros) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: ", name, " of slot ", slot,
                                                   " has ", qm.zeros.size(), " zero points, expected ",
                                                   want_zeros));
  }
  if (qm.data.size() != n * QuantizedRowBytes(*spec, k) || qm.scales.size() != n * ScalesPerRow(*spec, k)) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpertQuantized: ", name, " of slot ", slot,
                                                   " has ", qm.data.size(), " data bytes and ",
                                                   qm.scales.size(), " scales, expected ",
                                                   n * QuantizedRowBytes(*spec, k), " and ",
                                                   n * ScalesPerRow(*spec, k)));
  }
  Proj(proj).PackQuantized(slot, qm);
  proj_loaded_[static_cast<size_t>(slot) * 3 + static_cast<int>(proj)] = 1;
  return absl::OkStatus();
}

absl::Status MoeLayer::FinishLoad() {
  for (size_t i = 0; i < proj_loaded_.size(); ++i) {
    if (proj_loaded_[i] == 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("FinishLoad: expert slot ", i / 3, " has no ",
                       ExpertProjName(static_cast<ExpertProj>(i % 3)), " weight loaded"));
    }
  }
  loaded_ = true;
  return absl::OkStatus();
}

absl::Status MoeLayer::Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids,
                              const float* weights, const bf16_t* input, bf16_t* output,
                              const bool* gpu_experts_mask) {
  if (!loaded_) return absl::FailedPreconditionError("Forward before LoadWeights");
  if (qlen < 1 || qlen > config_.max_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "qlen = ", qlen, " must be in [1, max_len = ", config_.max_len,
        "]; split longer batches into chunks of max_len (chunked_prefill_size)"));
  }
  if (k < 1 || k > config_.top_k) {
    return absl::InvalidArgumentError(
        absl::StrCat("k = ", k, " must be in [1, top_k = ", config_.top_k, "]"));
  }
  if (ids == nullptr || weights == nullptr || input == nullptr || output == nullptr) {
    return absl::InvalidArgumentError("Forward: ids, weights, input and output must not be null");
  }
  // The scratch may be shared with other layers: one Forward at a time uses it.
  std::lock_guard<std::mutex> scratch_lock(scratch_->mu);
  const int e_count = config_.num_experts;
  const size_t h = config_.hidden, inter = config_.intermediate;
  profile_ = ForwardProfile{};
  auto mark = std::chrono::steady_clock::now();
  auto lap = [&mark](double& phase) {
    const auto now = std::chrono::steady_clock::now();
    phase = std::chrono::duration<double>(now - mark).count();
    mark = now;
  };

  // 1. Routing: counting sort of (token, slot) pairs by expert; skipped ids get no row.
  std::fill(expert_count_.begin(), expert_count_.end(), 0);
  auto valid = [&](int64_t id) {
    return id >= 0 && id < e_count && !(gpu_experts_mask != nullptr && gpu_experts_mask[id]);
  };
  for (int t = 0; t < qlen * k; ++t) {
    if (valid(ids[t])) ++expert_count_[ids[t]];
  }
  active_.clear();
  expert_begin_[0] = 0;
  for (int e = 0; e < e_count; ++e) {
    expert_begin_[e + 1] = expert_begin_[e] + expert_count_[e];
    if (expert_count_[e] > 0) active_.push_back(e);
  }
  std::vector<int>& fill = expert_count_;  // Reused as the running insert position per expert.
  for (int e = 0; e < e_count; ++e) fill[e] = expert_begin_[e];
  for (int t = 0; t < qlen * k; ++t) {
    token_slot_row_[t] = -1;
    if (!valid(ids[t])) continue;
    const int row = fill[ids[t]]++;
    token_slot_row_[t] = row;
    row_token_[row] = t / k;
    row_weight_[row] = weights[t];
  }
  const size_t rows = static_cast<size_t>(expert_begin_[e_count]);
  lap(profile_.route);

  // Per-thread fp32 blocks (grow only when a larger pool or row chunk is first seen).
  MoeScratch& sc = *scratch_;
  sc.per_thread.Reserve(static_cast<size_t>(pool.num_threads()) * ScratchPerThread());
  const bool int4 = IsInt4ExpertFormat(format_);

  if (rows > 0) {
    // 2-4 run as one pipeline of tasks in this order: gather row blocks, gate/up blocks (expert-major),
    // h-quantize row blocks (quantized formats), down blocks (expert-major). The pool hands tasks out in
    // index order, so a task only ever waits for tasks handed out before it, which are running or done:
    // no deadlock, and no barrier between phases (a decode step has ~16 tasks per phase on 16 threads, and
    // a barrier would cost each phase its slowest task's tail).
    // Blocks of up to 64 rows, smaller when there are few rows (decode) so every thread gets some.
    const size_t threads = static_cast<size_t>(pool.num_threads());
    const size_t row_block = std::clamp<size_t>(rows / (2 * threads), 1, 64);
    const size_t gather_tasks = (rows + row_block - 1) / row_block;

    const size_t default_panels = isa_ == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask;
    const size_t elem_bytes = format_ == ExpertFormat::kBf16 ? sizeof(bf16_t) : 1;
    const size_t gate_up_panels =
        isa_ == Isa::kAmx ? AmxGateUpPanels(h, elem_bytes, elem_bytes) : kPanelsPerTask;
    const size_t cols_per_task =
        (tiling_.gate_up_panels > 0 ? tiling_.gate_up_panels : gate_up_panels) * kPanelRows;
    // Down tasks are column blocks of the whole output (all experts); by default halve the block until
    // there are two per thread (a decode step on 16 threads: 32 blocks of 64 columns at H = 2048).
    size_t down_panels = tiling_.down_panels > 0 ? tiling_.down_panels : default_panels;
    if (tiling_.down_panels == 0) {
      while (down_panels > 1 && (h + down_panels * kPanelRows - 1) / (down_panels * kPanelRows) < 2 * threads) {
        down_panels = (down_panels + 1) / 2;
      }
    }
    const size_t down_cols_per_task = down_panels * kPanelRows;
    const size_t inter_blocks = (inter + cols_per_task - 1) / cols_per_task;
    const size_t hidden_blocks = (h + down_cols_per_task - 1) / down_cols_per_task;
    const size_t row_chunk = RowChunk();
    const bool quantized = format_ != ExpertFormat::kBf16;
    const size_t n_active = active_.size();
    // h-quantize tasks: row blocks within each expert (a row's absmax spans all I columns, or a group
    // that may straddle column blocks, so after all of the expert's gate/up blocks).
    std::vector<std::pair<int, size_t>>& quant_blocks = quant_blocks_;  // (active index, first row)
    quant_blocks.clear();
    if (quantized) {
      for (size_t i = 0; i < n_active; ++i) {
        const int e = active_[i];
        for (size_t r = expert_begin_[e]; r < static_cast<size_t>(expert_begin_[e + 1]); r += row_block) {
          quant_blocks.push_back({static_cast<int>(i), r});
        }
      }
    }
    for (size_t i = 0; i < n_active; ++i) {
      const int e = active_[i];
      gu_left_[i].store(static_cast<int>(inter_blocks), std::memory_order_relaxed);
      quant_left_[i].store(
          quantized ? static_cast<int>((expert_begin_[e + 1] - expert_begin_[e] + row_block - 1) / row_block) : 0,
          std::memory_order_relaxed);
    }
    std::atomic<size_t> gathered{0};
    const size_t t_gu = gather_tasks, t_quant = t_gu + n_active * inter_blocks;
    const size_t t_down = t_quant + quant_blocks.size(), t_end = t_down + hidden_blocks;
    // Busy time per thread and phase (the profile).
    std::vector<double>& busy = busy_;
    busy.assign(threads * 4, 0.0);
    auto wait_for = [](const std::atomic<int>& left) {
      while (left.load(std::memory_order_acquire) != 0) Pause();
    };
    pool.ParallelFor(t_end, [&](size_t task, int thread) {
      const auto start = std::chrono::steady_clock::now();
      int phase;
      if (task < t_gu) {
        // 2. Gather each row's token into contiguous per-expert blocks (quantized for integer formats).
        phase = 0;
        const size_t r1 = std::min(rows, (task + 1) * row_block);
        for (size_t r = task * row_block; r < r1; ++r) {
          const bf16_t* x = input + static_cast<size_t>(row_token_[r]) * h;
          if (quantized) {
            const size_t groups = ActGroups(h);
            QuantizeRow(x, h, sc.qxs.get() + r * ldx_, sc.sxs.get() + r * groups,
                        int4 ? sc.xsums.get() + r * groups : nullptr);
          } else {
            std::memcpy(sc.xs.get() + r * ldx_, x, h * sizeof(bf16_t));
          }
        }
        gathered.fetch_add(1, std::memory_order_release);
      } else if (task < t_quant) {
        // 3. Gate and up on the same column block, then h = bf16(silu(g) * u) for those columns.
        phase = 1;
        while (gathered.load(std::memory_order_acquire) != gather_tasks) Pause();
        const size_t ai = (task - t_gu) / inter_blocks;
        const int e = active_[ai];
        const size_t c0 = ((task - t_gu) % inter_blocks) * cols_per_task;
        const size_t cols = std::min(cols_per_task, inter - c0);
        float* g = sc.per_thread.get() + static_cast<size_t>(thread) * ScratchPerThread();
        float* u = g + (row_chunk + 15) * cols_per_task;
        // The expert's rows in chunks of row_chunk, except that a remainder of fewer than 16 rows joins
        // the last whole chunk (the scratch holds row_chunk + 15 rows): no chunk falls below the kernels'
        // 8-row AMX minimum when the expert has more rows, so the kernel, and the bits of a row's result,
        // do not depend on the chunking; and whole chunks stay multiples of the 32-row tile block (equal
        // splits such as 63 + 63 + 62 + 62 would put a partial, staged A tile in every chunk, which is much
        // slower on the AMX path).
        const size_t r_begin = expert_begin_[e], r_end = expert_begin_[e + 1];
        size_t r0 = r_begin;
        while (r0 < r_end) {
          size_t m = std::min(row_chunk, r_end - r0);
          if (r_end - r0 - m < 16) m = r_end - r0;
          Gemm(gate_, e, c0, cols, /*hidden_input=*/false, r0, m, g, cols_per_task);
          Gemm(up_, e, c0, cols, /*hidden_input=*/false, r0, m, u, cols_per_task);
          for (size_t r = 0; r < m; ++r) {
            SiluMulToBf16(isa_, g + r * cols_per_task, u + r * cols_per_task,
                          sc.hs.get() + (r0 + r) * ldh_ + c0, cols);
          }
          r0 += m;
        }
        gu_left_[ai].fetch_sub(1, std::memory_order_acq_rel);
      } else if (task < t_down) {
        // 3b. Quantized formats: quantize a block of one expert's h rows once all its columns exist.
        phase = 2;
        const auto [ai, r_first] = quant_blocks[task - t_quant];
        wait_for(gu_left_[ai]);
        const int e = active_[ai];
        const size_t groups = ActGroups(inter);
        const size_t r1 = std::min<size_t>(expert_begin_[e + 1], r_first + row_block);
        for (size_t r = r_first; r < r1; ++r) {
          QuantizeRow(sc.hs.get() + r * ldh_, inter, sc.qhs.get() + r * ldqh_, sc.shs.get() + r * groups,
                      int4 ? sc.hsums.get() + r * groups : nullptr);
        }
        quant_left_[ai].fetch_sub(1, std::memory_order_acq_rel);
      } else {
        // 4+5. One column block of the output for every token: zero the block's fp32 accumulators, add
        // w * (down projection) of each active expert's rows in expert order as soon as the expert's h is
        // ready, then round the block to bf16. Blocks are disjoint, so no two tasks touch one accumulator,
        // and no [rows, H] array of per-row outputs is written and read back (512 MiB per call at qlen
        // 4096 on the Qwen3-235B shape).
        phase = 3;
        const size_t c0 = (task - t_down) * down_cols_per_task;
        const size_t cols = std::min(down_cols_per_task, h - c0);
        for (size_t t = 0; t < static_cast<size_t>(qlen); ++t) {
          std::fill_n(sc.acc.get() + t * ldy_ + c0, cols, 0.0f);
        }
        float* y = sc.per_thread.get() + static_cast<size_t>(thread) * ScratchPerThread();
        const size_t chunk = ScratchPerThread() / down_cols_per_task;  // rows of y per kernel call
        for (size_t ai = 0; ai < n_active; ++ai) {
          wait_for(gu_left_[ai]);
          wait_for(quant_left_[ai]);
          const int e = active_[ai];
          for (size_t r0 = expert_begin_[e]; r0 < static_cast<size_t>(expert_begin_[e + 1]); r0 += chunk) {
            const size_t m = std::min<size_t>(chunk, expert_begin_[e + 1] - r0);
            Gemm(down_, e, c0, cols, /*hidden_input=*/true, r0, m, y, down_cols_per_task);
            for (size_t r = 0; r < m; ++r) {
              const float w = row_weight_[r0 + r];
              float* acc = sc.acc.get() + static_cast<size_t>(row_token_[r0 + r]) * ldy_ + c0;
              const float* yr = y + r * down_cols_per_task;
              for (size_t c = 0; c < cols; ++c) acc[c] += w * yr[c];
            }
          }
        }
        for (size_t t = 0; t < static_cast<size_t>(qlen); ++t) {
          const float* acc = sc.acc.get() + t * ldy_ + c0;
          bf16_t* out = output + t * h + c0;
          for (size_t c = 0; c < cols; ++c) out[c] = F32ToBf16(acc[c]);
        }
      }
      busy[static_cast<size_t>(thread) * 4 + phase] +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    });
    double* phases[] = {&profile_.gather, &profile_.gate_up, &profile_.quant_h, &profile_.down};
    for (size_t t = 0; t < threads; ++t) {
      for (int ph = 0; ph < 4; ++ph) *phases[ph] += busy[t * 4 + ph] / static_cast<double>(threads);
    }
    mark = std::chrono::steady_clock::now();
  }

  if (rows == 0) std::fill_n(output, static_cast<size_t>(qlen) * h, bf16_t{});  // no expert on the CPU
  return absl::OkStatus();
}

}  // namespace kt
