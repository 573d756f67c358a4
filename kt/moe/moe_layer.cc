#include "kt/moe/moe_layer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <new>

#include "absl/strings/str_cat.h"
#include "kt/moe/routing.h"
#include "kt/kernels/gemm_bf16.h"

namespace kt {
namespace {

// The gate/up task width on AMX (kPanelsPerTask and kPanelsPerTaskAmx, routing.h, are the defaults
// elsewhere): a gate/up task re-reads its gate and up column blocks for every 64-row chunk of the expert, so
// the chunk's A rows plus both blocks should fit in kAmxL2Budget (AmxGateUpPanels). On the Qwen3-235B shape
// (K = 4096, bf16) that is 2 panels, at K = 2048 (Qwen3-30B) 8; each measured faster than the other widths
// tried (`kt bench --tiling`; docs/perf-log/2026-11-27-int8.md and 2026-11-27-amx-bf16.md). The down phase
// keeps 8 panels (128 columns): its blocks are K = I wide and fit with all of an expert's rows.
constexpr size_t kMaxPanelsPerTask = 16;  // MoeTiling's bound
constexpr size_t kMaxColsPerTask = kMaxPanelsPerTask * kPanelRows;
constexpr size_t kMaxRowChunk = 1024;
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

// Decode: at most this many rows per active expert. The vector kernels then read each weight once per task
// from memory (no row chunk re-reads a block), and AMX tiles (8 rows and more) are not used.
constexpr int kDecodeMaxRows = 7;
// Decode gate/up tasks per thread: enough that dynamic scheduling evens out the threads' ends (a thread's
// last task is at most a quarter of its share), few enough that each task streams long runs of contiguous
// weights. The down phase keeps its two tasks per thread (each reads a column block of every active
// expert: more tasks would cut those runs shorter still).
constexpr size_t kDecodeGateUpTasksPerThread = 4;
constexpr size_t kDecodeDownTasksPerThread = 2;

bool DecodeRows(const ExpertRouting& r) {
  for (int e : r.active) {
    if (r.begin[e + 1] - r.begin[e] > kDecodeMaxRows) return false;
  }
  return true;
}

// Panels (of 16 columns) per decode task over `units` x `cols` columns (gate/up: each active expert's I
// columns; down: the H output columns, all experts at once): about `per_thread` tasks per thread,
// between 2 and kMaxPanelsPerTask panels, even (the one- and two-row kernels walk two panels at a time, two
// memory streams; an odd panel count leaves a one-stream panel in every task), preferring a width that
// divides `cols` (no short block per expert); one panel when two would leave threads without tasks (many
// threads, as the old halving rule allowed).
size_t DecodePanels(size_t cols, size_t units, size_t threads, size_t per_thread) {
  const size_t panels = (cols + kPanelRows - 1) / kPanelRows;
  const size_t want = units * panels / (per_thread * std::max<size_t>(1, threads));
  if (want < 2) return 1;
  const size_t cap = std::clamp<size_t>(want / 2 * 2, 2, kMaxPanelsPerTask);
  for (size_t p = cap; p >= 2; p -= 2) {
    if (panels % p == 0) return p;
  }
  return cap;
}
}  // namespace

size_t MoeLayer::RowChunk() const {
  if (tiling_.row_chunk > 0) return static_cast<size_t>(tiling_.row_chunk);
  return isa_ == Isa::kAmx && weights_->traits().amx_converts_weights ? kRowChunkConverting : kRowChunk;
}

size_t MoeLayer::ScratchPerThread() const {
  // Gate and up blocks of one task ((row_chunk + 15) x up to kMaxColsPerTask each: a short remainder joins
  // the last chunk), or a down block of rows (at least 62 rows of the widest column block).
  return ExpertPipeline::ScratchFloats(RowChunk(), kMaxColsPerTask, /*hidden=*/0);
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
  for (const auto& [name, v] : {std::pair<const char*, float>{"swiglu_limit", c.swiglu_limit},
                                {"swiglu_alpha", c.swiglu_alpha}}) {
    if (!(std::isfinite(v) && v >= 0.0f)) {
      return absl::InvalidArgumentError(absl::StrCat("MoeConfig.", name, " must be finite and >= 0 (0: off), got ", v));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const MoeConfig& config, Isa isa,
                                                           ExpertFormat format,
                                                           std::shared_ptr<MoeScratch> scratch) {
  if (absl::Status s = ValidateMoeConfig(config); !s.ok()) return s;
  ExpertShape shape{config.num_experts, config.hidden, config.intermediate, config.group_size, config.numa_node};
  for (int p = 0; p < 3; ++p) shape.gguf_types[p] = config.gguf_types[p];
  absl::StatusOr<std::unique_ptr<PackedExperts>> weights = PackedExperts::Create(shape, isa, format);
  if (!weights.ok()) return weights.status();
  std::unique_ptr<MoeLayer> moe(new MoeLayer(config, isa));
  moe->weights_ = std::move(*weights);
  const PackedExperts& w = *moe->weights_;
  const ExpertFormatTraits& traits = w.traits();
  const size_t e = config.num_experts, h = config.hidden, i = config.intermediate;
  const size_t rows = static_cast<size_t>(config.max_len) * config.top_k;
  // Routing sized for max_len * top_k rows, so Forward allocates nothing.
  moe->routing_.count.assign(e, 0);
  moe->routing_.begin.assign(e + 1, 0);
  moe->routing_.row_slot.assign(rows, 0);
  moe->routing_.token_slot_row.assign(rows, -1);
  moe->routing_.active.reserve(e);
  moe->pipeline_ = std::make_unique<ExpertPipeline>(w, isa, config.num_experts);
  const bool quantized = w.quantized_activations();
  moe->ldx_ = PaddedStride(h, ActivationBytes(traits));
  moe->ldh_ = PaddedStride(i, sizeof(bf16_t));
  moe->ldqh_ = PaddedStride(i, 1);
  moe->ldy_ = PaddedStride(h, sizeof(float));  // acc_ rows
  moe->scratch_ = scratch != nullptr ? std::move(scratch) : MoeScratch::Shared();
  MoeScratch& sc = *moe->scratch_;
  std::lock_guard<std::mutex> lock(sc.mu);
  if (!quantized) sc.xs.Reserve(rows * moe->ldx_);  // others gather into the int8 copy
  sc.hs.Reserve(rows * moe->ldh_);
  sc.acc.Reserve(static_cast<size_t>(config.max_len) * moe->ldy_);
  const size_t groups_h = w.ActivationGroups(ExpertProj::kGate), groups_i = w.ActivationGroups(ExpertProj::kDown);
  if (quantized) {
    sc.qxs.Reserve(rows * moe->ldx_);
    sc.sxs.Reserve(rows * groups_h);
    sc.qhs.Reserve(rows * moe->ldqh_);
    sc.shs.Reserve(rows * groups_i);
  }
  if (traits.activation_sums) {
    sc.xsums.Reserve(rows * groups_h);
    sc.hsums.Reserve(rows * groups_i);
  }
  return moe;
}

absl::Status MoeLayer::LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                                  const int64_t* physical_to_logical, ThreadPool& pool) {
  return weights_->LoadWeights(gate, up, down, physical_to_logical, pool);
}

void MoeLayer::BeginLoad() { weights_->BeginLoad(); }

absl::Status MoeLayer::LoadExpert(int slot, ExpertProj proj, const bf16_t* w) {
  return weights_->LoadExpert(slot, proj, w);
}

absl::Status MoeLayer::LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm) {
  return weights_->LoadExpertQuantized(slot, proj, qm);
}

absl::Status MoeLayer::LoadExpertBlocks(int slot, ExpertProj proj, const uint8_t* bytes, size_t size) {
  return weights_->LoadExpertBlocks(slot, proj, bytes, size);
}

absl::Status MoeLayer::FinishLoad() { return weights_->FinishLoad(); }

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
  weights_->SetKBlock(static_cast<size_t>(tiling.k_block));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::CreateStaging() const {
  absl::StatusOr<std::unique_ptr<MoeLayer>> staged = Create(config_, isa_, format(), scratch_);
  if (!staged.ok()) return staged.status();
  if (absl::Status st = (*staged)->SetTiling(tiling_); !st.ok()) return st;
  return staged;
}

absl::Status MoeLayer::AdoptWeights(MoeLayer& staged) {
  if (&staged == this) return absl::InvalidArgumentError("AdoptWeights: a layer cannot adopt its own weights");
  const MoeConfig& a = config_;
  const MoeConfig& b = staged.config_;
  if (a.num_experts != b.num_experts || a.hidden != b.hidden || a.intermediate != b.intermediate ||
      staged.isa_ != isa_ || staged.format() != format() ||
      (IsGroupExpertFormat(format()) && a.group_size != b.group_size) ||
      (weights_->traits().stored_blocks && !std::equal(a.gguf_types, a.gguf_types + 3, b.gguf_types))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "AdoptWeights: the staged layer (E=", b.num_experts, " H=", b.hidden, " I=", b.intermediate, " ",
        IsaName(staged.isa_), " ", ExpertFormatName(staged.format()), ") differs from this one (E=", a.num_experts,
        " H=", a.hidden, " I=", a.intermediate, " ", IsaName(isa_), " ", ExpertFormatName(format()), ")"));
  }
  if (!staged.loaded()) return absl::FailedPreconditionError("AdoptWeights: the staged layer is not loaded");
  weights_->SwapWeights(*staged.weights_);
  return absl::OkStatus();
}

absl::Status MoeLayer::Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids,
                              const float* weights, const bf16_t* input, bf16_t* output,
                              const bool* gpu_experts_mask) {
  Output out;
  out.bf16 = output;
  return Forward(pool, qlen, k, ids, weights, input, out, gpu_experts_mask);
}

absl::Status MoeLayer::Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids,
                              const float* weights, const bf16_t* input, const Output& output,
                              const bool* gpu_experts_mask) {
  if (!loaded()) return absl::FailedPreconditionError("Forward before LoadWeights");
  if (qlen < 1 || qlen > config_.max_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "qlen = ", qlen, " must be in [1, max_len = ", config_.max_len,
        "]; split longer batches into chunks of max_len (chunked_prefill_size)"));
  }
  if (k < 1 || k > config_.top_k) {
    return absl::InvalidArgumentError(
        absl::StrCat("k = ", k, " must be in [1, top_k = ", config_.top_k, "]"));
  }
  if (ids == nullptr || weights == nullptr || input == nullptr ||
      (output.bf16 == nullptr) == (output.f32 == nullptr) || (output.add && output.bf16 == nullptr)) {
    return absl::InvalidArgumentError(
        "Forward: ids, weights and input must not be null, and the output must be exactly one of a bf16 "
        "array (optionally added to) or an fp32 array");
  }
  // The scratch may be shared with other layers: one Forward at a time uses it.
  std::lock_guard<std::mutex> scratch_lock(scratch_->mu);
  profile_ = ForwardProfile{};
  const auto start = std::chrono::steady_clock::now();

  // 1. Routing: counting sort of (token, slot) pairs by expert; skipped ids get no row.
  RouteToExperts(ids, qlen, k, config_.num_experts, gpu_experts_mask, &routing_);
  profile_.route = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (routing_.rows == 0) {  // no expert on the CPU: the result is zero
    const size_t n = static_cast<size_t>(qlen) * config_.hidden;
    if (output.f32 != nullptr) std::fill_n(output.f32, n, 0.0f);
    if (output.bf16 != nullptr && !output.add) std::fill_n(output.bf16, n, bf16_t{});
    return absl::OkStatus();
  }
  // Per-thread fp32 blocks (grow only when a larger pool or row chunk is first seen).
  scratch_->per_thread.Reserve(static_cast<size_t>(pool.num_threads()) * ScratchPerThread());

  // 2-5 run on the expert pipeline shared with SFT (kt/moe/expert_pipeline.h) as one list of tasks,
  // without barriers between the phases.
  const size_t threads = static_cast<size_t>(pool.num_threads());
  const PipelineCall call = MakePipelineCall(threads, qlen, k, weights, input, output);
  PipelineBusy busy;
  pipeline_->Run(pool, call, &busy);
  double* phases[] = {&profile_.gather, &profile_.gate_up, &profile_.quant_h, &profile_.down};
  for (int ph = 0; ph < 4; ++ph) *phases[ph] = busy.phase[ph] / static_cast<double>(threads);
  return absl::OkStatus();
}

PipelineCall MoeLayer::MakePipelineCall(size_t threads, int qlen, int k, const float* weights,
                                        const bf16_t* input, const Output& output) {
  const size_t h = config_.hidden;
  const size_t rows = static_cast<size_t>(routing_.rows);
  const PackedExperts& experts = *weights_;
  MoeScratch& sc = *scratch_;
  PipelineCall c;
  c.routing = &routing_;
  c.qlen = static_cast<size_t>(qlen);
  c.k = k;
  c.weights = weights;
  c.input = input;
  const bool quantized = experts.quantized_activations();
  const bool sums = experts.traits().activation_sums;
  c.x = PipelineRows{quantized ? nullptr : sc.xs.get(), sc.qxs.get(), sc.sxs.get(),
                     sums ? sc.xsums.get() : nullptr, ldx_, ldx_, experts.ActivationGroups(ExpertProj::kGate)};
  c.h = PipelineRows{sc.hs.get(), sc.qhs.get(), sc.shs.get(), sums ? sc.hsums.get() : nullptr, ldh_, ldqh_,
                     experts.ActivationGroups(ExpertProj::kDown)};
  // Blocks of up to 64 rows, smaller when there are few rows (decode) so every thread gets some.
  c.gather_rows = std::clamp<size_t>(rows / (2 * threads), 1, 64);
  // Bytes per value of the A rows and (as an estimate for every format: int4 counts as 1) the weights.
  const size_t elem_bytes = ActivationBytes(experts.traits());
  size_t gate_up_panels = isa_ == Isa::kAmx ? AmxGateUpPanels(h, elem_bytes, elem_bytes) : kPanelsPerTask;
  // Down tasks are column blocks of the whole output (all experts); by default halve the block until
  // there are two per thread (a decode step on 16 threads: 32 blocks of 64 columns at H = 2048).
  size_t down_panels = isa_ == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask;
  while (down_panels > 1 && (h + down_panels * kPanelRows - 1) / (down_panels * kPanelRows) < 2 * threads) {
    down_panels = (down_panels + 1) / 2;
  }
  if (DecodeRows(routing_)) {
    // Decode: every task streams its weights from memory once, so the widths are set by the memory
    // streams and the balance, not by L2 (DecodePanels).
    gate_up_panels = DecodePanels(config_.intermediate, routing_.active.size(), threads, kDecodeGateUpTasksPerThread);
    down_panels = DecodePanels(h, 1, threads, kDecodeDownTasksPerThread);
  }
  c.gate_up_cols = (tiling_.gate_up_panels > 0 ? tiling_.gate_up_panels : gate_up_panels) * kPanelRows;
  c.down_cols = (tiling_.down_panels > 0 ? tiling_.down_panels : down_panels) * kPanelRows;
  c.row_chunk = RowChunk();
  c.join_short_tail = true;
  c.swiglu = SwigluParams{config_.swiglu_limit, config_.swiglu_alpha};
  c.order = SumOrder::kExpertMajor;
  c.acc = sc.acc.get();
  c.ld_acc = ldy_;
  c.out = PipelineOutput{output.bf16, output.add, output.f32};
  c.thread_scratch = sc.per_thread.get();
  c.scratch_per_thread = ScratchPerThread();
  c.h_share = h_share_;
  return c;
}

}  // namespace kt
