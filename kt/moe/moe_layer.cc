#include "kt/moe/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "kt/kernels/activation.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

// Work unit of the gate/up and down phases: this many 16-row panels of output columns (48 columns). Small
// enough that a decode step (8 experts x 768/48 gate/up blocks = 128 tasks) balances across threads, big
// enough that the atomic task counter is negligible; 3 panels is also the AVX512-BF16 kernel's register
// block, so a task never splits one.
// AMX works on panel pairs (2 x 16 columns per tile pass). Its tasks are 8 panels (128 columns): at
// >1 TFLOPS, re-reading an expert's A rows for every column block is what costs, and halving the number
// of blocks took the AMX host's Qwen3-30B prefill (qlen 512) from 19.6-20.1 ms to 15.4-15.9 ms and the
// 235B prefill at qlen 4096 from 247 to 207 ms, against 4-panel tasks.
constexpr size_t kPanelsPerTask = 3;
constexpr size_t kPanelsPerTaskAmx = 8;
constexpr size_t kMaxColsPerTask = kPanelsPerTaskAmx * kPanelRows;
// Rows of one expert processed together in the gate/up phase; bounds the per-thread fp32 scratch to
// 2 x 64 x 128 floats (64 KiB) whatever the batch size.
constexpr size_t kRowChunk = 64;

}  // namespace

size_t MoeLayer::ScratchPerThread() const {
  // Gate and up blocks of one task, or one token's fp32 output row in the weighted sum.
  return std::max<size_t>(2 * kRowChunk * kMaxColsPerTask, config_.hidden);
}

template <typename T>
void MoeLayer::AlignedArray<T>::Resize(size_t n) {
  if (n == size) return;
  const size_t bytes = std::max<size_t>(64, (n * sizeof(T) + 63) / 64 * 64);
  T* p = static_cast<T*>(std::aligned_alloc(64, bytes));
  if (p == nullptr) throw std::bad_alloc();
  data.reset(p);
  size = n;
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
  return format == ExpertFormat::kInt8 ? "int8" : "bf16";
}

MoeLayer::MoeLayer(const MoeConfig& config, Isa isa, ExpertFormat format)
    : config_(config), isa_(isa), format_(format) {
  if (format == ExpertFormat::kBf16) {
    gemm_bf16_ = GetGemmBf16(isa);
  } else {
    gemm_int8_ = GetGemmInt8(isa);
  }
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const MoeConfig& config, Isa isa,
                                                           ExpertFormat format) {
  if (absl::Status s = ValidateMoeConfig(config); !s.ok()) return s;
  if (!IsaSupported(isa, GetCpuFeatures())) {
    return absl::FailedPreconditionError(
        absl::StrCat("kernel path ", IsaName(isa), " is not supported by this CPU"));
  }
  const bool int8 = format == ExpertFormat::kInt8;
  if ((int8 ? GetGemmInt8(isa) != nullptr : GetGemmBf16(isa) != nullptr) == false) {
    return absl::UnimplementedError(absl::StrCat("no ", ExpertFormatName(format), " kernel for path ",
                                                 IsaName(isa)));
  }
  if (int8 && (static_cast<size_t>(config.hidden) >= kInt8MaxK ||
               static_cast<size_t>(config.intermediate) >= kInt8MaxK)) {
    return absl::InvalidArgumentError(absl::StrCat("int8 experts need hidden and intermediate < ",
                                                   kInt8MaxK, " (exact int32 sums)"));
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
  moe->row_token_.assign(rows, 0);
  moe->token_slot_row_.assign(rows, -1);
  moe->active_.reserve(e);
  if (!int8) moe->xs_.Resize(rows * h);  // kInt8 gathers straight into its quantized copy
  moe->hs_.Resize(rows * i);
  moe->ys_.Resize(rows * h);
  if (int8) {
    moe->qxs_.Resize(rows * h);
    moe->sxs_.Resize(rows);
    moe->qhs_.Resize(rows * i);
    moe->shs_.Resize(rows);
  }
  return moe;
}

void MoeLayer::InitProjection(Projection& p, size_t n, size_t k) const {
  p.n = n;
  p.k = k;
  if (format_ == ExpertFormat::kBf16) {
    p.panel_bytes = PanelStride(k) * sizeof(bf16_t);
    p.expert_bytes = PackedBf16Size(n, k) * sizeof(bf16_t);
  } else {
    static_assert(kInt8PanelRows == kPanelRows, "column blocks address both layouts alike");
    p.panel_bytes = Int8PanelStride(k);
    p.expert_bytes = PackedInt8Bytes(n, k);
    p.padded_rows = PackedInt8Rows(n);
  }
}

void MoeLayer::Projection::PackBf16(size_t slot, const bf16_t* w) {
  kt::PackBf16(w, k, n, k, reinterpret_cast<bf16_t*>(data.get() + slot * expert_bytes));
}

void MoeLayer::Projection::PackQuantized(size_t slot, const QuantizedMatrix& qm) {
  PackInt8(reinterpret_cast<const int8_t*>(qm.data.data()), k, qm.scales.data(), n, k,
           reinterpret_cast<int8_t*>(data.get() + slot * expert_bytes), scales.get() + slot * padded_rows,
           sums.get() + slot * padded_rows);
}

size_t MoeLayer::weight_bytes() const {
  size_t bytes = 0;
  for (const Projection* p : {&gate_, &up_, &down_}) {
    bytes += p->data.size + p->scales.size * sizeof(float) + p->sums.size * sizeof(int32_t);
  }
  return bytes;
}

void MoeLayer::Gemm(const Projection& p, size_t e, size_t c0, size_t cols, bool hidden_input,
                    size_t r0, size_t m, float* y, size_t ldy) const {
  const size_t k = p.k;
  ProjInput in;
  in.ld = k;
  if (format_ == ExpertFormat::kBf16) {
    in.x = (hidden_input ? hs_.get() : xs_.get()) + r0 * k;
  } else {
    in.qx = (hidden_input ? qhs_.get() : qxs_.get()) + r0 * k;
    in.sx = (hidden_input ? shs_.get() : sxs_.get()) + r0;
  }
  GemmRows(p, e, c0, cols, in, m, y, ldy);
}

void MoeLayer::GemmRows(const Projection& p, size_t e, size_t c0, size_t cols, const ProjInput& in,
                        size_t m, float* y, size_t ldy) const {
  if (format_ == ExpertFormat::kBf16) {
    gemm_bf16_(m, p.k, in.x, in.ld, reinterpret_cast<const bf16_t*>(p.Panels(e, c0)), cols, y, ldy);
  } else {
    const size_t row0 = e * p.padded_rows + c0;
    gemm_int8_(m, p.k, in.qx, in.ld, in.sx, reinterpret_cast<const int8_t*>(p.Panels(e, c0)),
               p.scales.get() + row0, p.sums.get() + row0, cols, y, ldy);
  }
}

void MoeLayer::PrepareRow(ExpertProj proj, const bf16_t* x, int8_t* q, float* scale) const {
  QuantizeActivationInt8(x, ProjCols(proj), q, scale);
}

void MoeLayer::ProjectBlock(ExpertProj proj, int slot, size_t c0, size_t cols, const ProjInput& in,
                            size_t m, float* y, size_t ldy) const {
  GemmRows(Proj(proj), static_cast<size_t>(slot), c0, cols, in, m, y, ldy);
}

absl::Status MoeLayer::UnpackExpert(int slot, ExpertProj proj, bf16_t* w) const {
  if (absl::Status s = CheckSlot("UnpackExpert", slot); !s.ok()) return s;
  if (!loaded_) return absl::FailedPreconditionError("UnpackExpert before the weights are loaded");
  const Projection& p = Proj(proj);
  const size_t e = static_cast<size_t>(slot);
  if (format_ == ExpertFormat::kBf16) {
    UnpackBf16(reinterpret_cast<const bf16_t*>(p.data.get() + e * p.expert_bytes), p.n, p.k, w, p.k);
    return absl::OkStatus();
  }
  if (format_ != ExpertFormat::kInt8) {
    // A format added later must say how its packed weights read back (kt/sft builds its transposed
    // backward copy from this); never reinterpret its bytes as int8.
    return absl::UnimplementedError(
        absl::StrCat("UnpackExpert: not implemented for ", ExpertFormatName(format_), " experts"));
  }
  std::vector<int8_t> q(p.n * p.k);
  std::vector<float> scales(p.n);
  UnpackInt8(reinterpret_cast<const int8_t*>(p.data.get() + e * p.expert_bytes),
             p.scales.get() + e * p.padded_rows, p.n, p.k, q.data(), p.k, scales.data());
  // The same one fp32 multiply as Dequantize (quant.h), then one rounding to bf16.
  for (size_t r = 0; r < p.n; ++r) {
    for (size_t c = 0; c < p.k; ++c) w[r * p.k + c] = F32ToBf16(static_cast<float>(q[r * p.k + c]) * scales[r]);
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
  if (format_ == ExpertFormat::kInt8) {
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
              idx % per_expert, " is not finite; int8 quantization needs finite weights"));
        }
      }
    }
  }
  std::fill(proj_loaded_.begin(), proj_loaded_.end(), 0);
  loaded_ = false;
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

absl::StatusOr<QuantSpec> QuantSpecOf(ExpertFormat format) {
  if (format == ExpertFormat::kInt8) return QuantSpec{QuantFormat::kInt8PerChannel, 0};
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
    if (format_ != ExpertFormat::kBf16) {
      p->scales.Resize(e * p->padded_rows);
      p->sums.Resize(e * p->padded_rows);
    }
  }
  proj_loaded_.assign(e * 3, 0);
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
  absl::StatusOr<QuantSpec> spec = QuantSpecOf(format_);
  if (!spec.ok()) return spec.status();
  absl::StatusOr<QuantizedMatrix> q = Quantize(*spec, w, k, n, k);
  if (!q.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("LoadExpert: ", ExpertProjName(proj),
                                                   " weight of slot ", slot, ": ", q.status().message()));
  }
  return LoadExpertQuantized(slot, proj, *q);
}

absl::Status MoeLayer::LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm) {
  if (absl::Status s = CheckSlot("LoadExpertQuantized", slot); !s.ok()) return s;
  absl::StatusOr<QuantSpec> spec = QuantSpecOf(format_);
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
  const int e_count = config_.num_experts;
  const size_t h = config_.hidden, inter = config_.intermediate;

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
  }
  const size_t rows = static_cast<size_t>(expert_begin_[e_count]);

  // Per-thread fp32 scratch for one gate/up task (grows only when a larger pool is first seen).
  if (pool.num_threads() > scratch_threads_) {
    scratch_threads_ = pool.num_threads();
    gu_scratch_.Resize(static_cast<size_t>(scratch_threads_) * ScratchPerThread());
  }

  if (rows > 0) {
    // 2. Gather each row's token into contiguous per-expert blocks.
    const size_t gather_tasks = (rows + 63) / 64;
    pool.ParallelFor(gather_tasks, [&](size_t task, int) {
      const size_t r1 = std::min(rows, (task + 1) * 64);
      for (size_t r = task * 64; r < r1; ++r) {
        const bf16_t* x = input + static_cast<size_t>(row_token_[r]) * h;
        if (format_ == ExpertFormat::kInt8) {
          QuantizeActivationInt8(x, h, qxs_.get() + r * h, sxs_.get() + r);
        } else {
          std::memcpy(xs_.get() + r * h, x, h * sizeof(bf16_t));
        }
      }
    });

    const size_t cols_per_task =
        (isa_ == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask) * kPanelRows;
    // 3. Gate and up on the same column block, then h = bf16(silu(g) * u) for those columns.
    const size_t inter_blocks = (inter + cols_per_task - 1) / cols_per_task;
    pool.ParallelFor(active_.size() * inter_blocks, [&](size_t task, int thread) {
      const int e = active_[task / inter_blocks];
      const size_t c0 = (task % inter_blocks) * cols_per_task;
      const size_t cols = std::min(cols_per_task, inter - c0);
      float* g = gu_scratch_.get() + static_cast<size_t>(thread) * ScratchPerThread();
      float* u = g + kRowChunk * cols_per_task;
      const size_t r_begin = expert_begin_[e], r_end = expert_begin_[e + 1];
      for (size_t r0 = r_begin; r0 < r_end; r0 += kRowChunk) {
        const size_t m = std::min(kRowChunk, r_end - r0);
        Gemm(gate_, e, c0, cols, /*hidden_input=*/false, r0, m, g, cols_per_task);
        Gemm(up_, e, c0, cols, /*hidden_input=*/false, r0, m, u, cols_per_task);
        for (size_t r = 0; r < m; ++r) {
          SiluMulToBf16(isa_, g + r * cols_per_task, u + r * cols_per_task,
                        hs_.get() + (r0 + r) * inter + c0, cols);
        }
      }
    });

    // 3b. kInt8: quantize each row of h (its absmax spans all I columns, so after the whole phase).
    if (format_ == ExpertFormat::kInt8) {
      pool.ParallelFor((rows + 63) / 64, [&](size_t task, int) {
        const size_t r1 = std::min(rows, (task + 1) * 64);
        for (size_t r = task * 64; r < r1; ++r) {
          QuantizeActivationInt8(hs_.get() + r * inter, inter, qhs_.get() + r * inter, shs_.get() + r);
        }
      });
    }

    // 4. Down projection of every row, column block by column block.
    const size_t hidden_blocks = (h + cols_per_task - 1) / cols_per_task;
    pool.ParallelFor(active_.size() * hidden_blocks, [&](size_t task, int) {
      const int e = active_[task / hidden_blocks];
      const size_t c0 = (task % hidden_blocks) * cols_per_task;
      const size_t cols = std::min(cols_per_task, h - c0);
      const size_t r0 = expert_begin_[e];
      const size_t m = expert_begin_[e + 1] - r0;
      Gemm(down_, e, c0, cols, /*hidden_input=*/true, r0, m, ys_.get() + r0 * h + c0, h);
    });
  }

  // 5. Weighted sum per token in fp32, one rounding to bf16.
  const size_t token_tasks = (static_cast<size_t>(qlen) + 7) / 8;
  pool.ParallelFor(token_tasks, [&](size_t task, int thread) {
    float* acc = gu_scratch_.get() + static_cast<size_t>(thread) * ScratchPerThread();
    const size_t t1 = std::min<size_t>(qlen, (task + 1) * 8);
    for (size_t t = task * 8; t < t1; ++t) {
      std::fill(acc, acc + h, 0.0f);
      for (int j = 0; j < k; ++j) {
        const int row = token_slot_row_[t * k + j];
        if (row < 0) continue;
        const float w = weights[t * k + j];
        const float* y = ys_.get() + static_cast<size_t>(row) * h;
        for (size_t c = 0; c < h; ++c) acc[c] += w * y[c];
      }
      bf16_t* out = output + t * h;
      for (size_t c = 0; c < h; ++c) out[c] = F32ToBf16(acc[c]);
    }
  });
  return absl::OkStatus();
}

namespace {

// Expert e's [n, k] projection as the format sees it: the bf16 values, or their int8 quantization
// dequantized (q * scale).
std::vector<float> ReferenceWeights(ExpertFormat format, const bf16_t* w, size_t n, size_t k) {
  std::vector<float> out(n * k);
  if (format == ExpertFormat::kBf16) {
    for (size_t i = 0; i < n * k; ++i) out[i] = Bf16ToF32(w[i]);
    return out;
  }
  absl::StatusOr<QuantizedMatrix> q = Quantize(QuantSpec{QuantFormat::kInt8PerChannel, 0}, w, k, n, k);
  if (q.ok()) Dequantize(*q, out.data(), k);
  return out;
}

// A row as the format feeds it to a product: the bf16 values, or int8 per-row quantization dequantized.
std::vector<float> ReferenceActivation(ExpertFormat format, const bf16_t* x, size_t k) {
  std::vector<float> out(k);
  if (format == ExpertFormat::kBf16) {
    for (size_t i = 0; i < k; ++i) out[i] = Bf16ToF32(x[i]);
    return out;
  }
  std::vector<int8_t> q(k);
  float scale = 0;
  QuantizeActivationInt8(x, k, q.data(), &scale);
  for (size_t i = 0; i < k; ++i) out[i] = static_cast<float>(q[i]) * scale;
  return out;
}

void MatVec(const std::vector<float>& w, size_t n, size_t k, const std::vector<float>& x, double* y) {
  for (size_t r = 0; r < n; ++r) {
    double acc = 0;
    for (size_t c = 0; c < k; ++c) acc += static_cast<double>(w[r * k + c]) * x[c];
    y[r] = acc;
  }
}

}  // namespace

void MoeForwardReference(const MoeConfig& config, int qlen, int k, const int64_t* ids,
                         const float* weights, const bf16_t* input, const bf16_t* gate,
                         const bf16_t* up, const bf16_t* down, const bool* gpu_experts_mask,
                         float* output, ExpertFormat format) {
  const size_t h = config.hidden, inter = config.intermediate;
  std::vector<double> g(inter), u(inter), y(h);
  std::vector<bf16_t> hb(inter);
  for (int t = 0; t < qlen; ++t) {
    std::vector<double> acc(h, 0.0);
    const std::vector<float> x = ReferenceActivation(format, input + static_cast<size_t>(t) * h, h);
    for (int j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      if (e < 0 || e >= config.num_experts || (gpu_experts_mask && gpu_experts_mask[e])) continue;
      MatVec(ReferenceWeights(format, gate + e * inter * h, inter, h), inter, h, x, g.data());
      MatVec(ReferenceWeights(format, up + e * inter * h, inter, h), inter, h, x, u.data());
      for (size_t c = 0; c < inter; ++c) {
        hb[c] = F32ToBf16(static_cast<float>(g[c] / (1.0 + std::exp(-g[c])) * u[c]));
      }
      MatVec(ReferenceWeights(format, down + e * h * inter, h, inter), h, inter,
             ReferenceActivation(format, hb.data(), inter), y.data());
      for (size_t c = 0; c < h; ++c) acc[c] += static_cast<double>(weights[t * k + j]) * y[c];
    }
    for (size_t c = 0; c < h; ++c) output[static_cast<size_t>(t) * h + c] = static_cast<float>(acc[c]);
  }
}

}  // namespace kt
