#include "kt/moe/moe_layer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <new>

#include "absl/strings/str_cat.h"
#include "kt/moe/routing.h"
#include "kt/kernels/activation.h"
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

// Spin-wait hint for the forward pipeline's dependencies (waits last a fraction of one task).
inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

size_t MoeLayer::RowChunk() const {
  return tiling_.row_chunk > 0 ? static_cast<size_t>(tiling_.row_chunk) : kRowChunk;
}

size_t MoeLayer::ScratchPerThread() const {
  // Gate and up blocks of one task ((row_chunk + 15) x up to kMaxColsPerTask each: a short remainder joins
  // the last chunk), or a down block of rows (at least 62 rows of the widest column block).
  return 2 * (RowChunk() + 15) * kMaxColsPerTask;
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

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const MoeConfig& config, Isa isa,
                                                           ExpertFormat format,
                                                           std::shared_ptr<MoeScratch> scratch) {
  if (absl::Status s = ValidateMoeConfig(config); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<PackedExperts>> weights = PackedExperts::Create(
      ExpertShape{config.num_experts, config.hidden, config.intermediate, config.group_size, config.numa_node}, isa, format);
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
  moe->gu_left_.reset(new std::atomic<int>[e]);
  moe->quant_left_.reset(new std::atomic<int>[e]);
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

void MoeLayer::Gemm(ExpertProj proj, size_t e, size_t c0, size_t cols, bool hidden_input, size_t r0, size_t m,
                    float* y, size_t ldy) const {
  const PackedExperts& w = *weights_;
  const MoeScratch& sc = *scratch_;
  ProjInput in;
  if (!w.quantized_activations()) {
    in.ld = hidden_input ? ldh_ : ldx_;
    in.x = (hidden_input ? sc.hs.get() : sc.xs.get()) + r0 * in.ld;
  } else {
    const size_t groups = w.ActivationGroups(proj);
    in.ld = hidden_input ? ldqh_ : ldx_;
    in.qx = (hidden_input ? sc.qhs.get() : sc.qxs.get()) + r0 * in.ld;
    in.sx = (hidden_input ? sc.shs.get() : sc.sxs.get()) + r0 * groups;
    if (w.traits().activation_sums) in.xsum = (hidden_input ? sc.hsums.get() : sc.xsums.get()) + r0 * groups;
  }
  w.ProjectBlock(proj, static_cast<int>(e), c0, cols, in, m, y, ldy);
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
      (IsGroupExpertFormat(format()) && a.group_size != b.group_size)) {
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

  // 2-4 run as one pipeline of tasks in this order: gather row blocks, gate/up blocks (expert-major),
  // h-quantize row blocks (formats reading int8 rows), down blocks (column blocks of the output). The pool
  // hands tasks out in index order, so a task only ever waits for tasks handed out before it, which are
  // running or done: no deadlock, and no barrier between phases (a decode step has ~16 tasks per phase on
  // 16 threads, and a barrier would cost each phase its slowest task's tail).
  ForwardPlan plan;
  plan.qlen = static_cast<size_t>(qlen);
  plan.k = k;
  plan.weights = weights;
  plan.input = input;
  plan.output = output;
  PlanForward(static_cast<size_t>(pool.num_threads()), plan);
  const size_t threads = static_cast<size_t>(pool.num_threads());
  busy_.assign(threads * 4, 0.0);  // busy seconds per thread and phase (the profile)
  pool.ParallelFor(plan.t_end, [&](size_t task, int thread) {
    const auto task_start = std::chrono::steady_clock::now();
    int phase;
    if (task < plan.t_gu) {
      phase = 0;
      GatherTask(plan, task);
    } else if (task < plan.t_quant) {
      phase = 1;
      GateUpTask(plan, task - plan.t_gu, thread);
    } else if (task < plan.t_down) {
      phase = 2;
      QuantizeHTask(plan, task - plan.t_quant);
    } else {
      phase = 3;
      DownTask(plan, task - plan.t_down, thread);
    }
    busy_[static_cast<size_t>(thread) * 4 + phase] +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - task_start).count();
  });
  double* phases[] = {&profile_.gather, &profile_.gate_up, &profile_.quant_h, &profile_.down};
  for (size_t t = 0; t < threads; ++t) {
    for (int ph = 0; ph < 4; ++ph) *phases[ph] += busy_[t * 4 + ph] / static_cast<double>(threads);
  }
  return absl::OkStatus();
}

void MoeLayer::PlanForward(size_t threads, ForwardPlan& p) {
  const size_t h = config_.hidden, inter = config_.intermediate;
  const size_t rows = static_cast<size_t>(routing_.rows);
  const PackedExperts& experts = *weights_;
  // Blocks of up to 64 rows, smaller when there are few rows (decode) so every thread gets some.
  p.row_block = std::clamp<size_t>(rows / (2 * threads), 1, 64);
  const size_t gather_tasks = (rows + p.row_block - 1) / p.row_block;
  p.gather_tasks = gather_tasks;
  // Bytes per value of the A rows and (as an estimate for every format: int4 counts as 1) the weights.
  const size_t elem_bytes = ActivationBytes(experts.traits());
  const size_t gate_up_panels = isa_ == Isa::kAmx ? AmxGateUpPanels(h, elem_bytes, elem_bytes) : kPanelsPerTask;
  p.cols_per_task = (tiling_.gate_up_panels > 0 ? tiling_.gate_up_panels : gate_up_panels) * kPanelRows;
  // Down tasks are column blocks of the whole output (all experts); by default halve the block until
  // there are two per thread (a decode step on 16 threads: 32 blocks of 64 columns at H = 2048).
  const size_t default_panels = isa_ == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask;
  size_t down_panels = tiling_.down_panels > 0 ? tiling_.down_panels : default_panels;
  if (tiling_.down_panels == 0) {
    while (down_panels > 1 && (h + down_panels * kPanelRows - 1) / (down_panels * kPanelRows) < 2 * threads) {
      down_panels = (down_panels + 1) / 2;
    }
  }
  p.down_cols_per_task = down_panels * kPanelRows;
  p.inter_blocks = (inter + p.cols_per_task - 1) / p.cols_per_task;
  const size_t hidden_blocks = (h + p.down_cols_per_task - 1) / p.down_cols_per_task;
  const bool quantized = experts.quantized_activations();
  const std::vector<int>& begin = routing_.begin;
  const size_t n_active = routing_.active.size();
  // h-quantize tasks: row blocks within each expert (a row's absmax spans all I columns, or a group that
  // may straddle column blocks, so after all of the expert's gate/up blocks).
  quant_blocks_.clear();
  for (size_t i = 0; i < n_active; ++i) {
    const int e = routing_.active[i];
    if (quantized) {
      for (size_t r = begin[e]; r < static_cast<size_t>(begin[e + 1]); r += p.row_block) {
        quant_blocks_.push_back({static_cast<int>(i), r});
      }
    }
    gu_left_[i].store(static_cast<int>(p.inter_blocks), std::memory_order_relaxed);
    quant_left_[i].store(
        quantized ? static_cast<int>((begin[e + 1] - begin[e] + p.row_block - 1) / p.row_block) : 0,
        std::memory_order_relaxed);
  }
  p.t_gu = gather_tasks;
  p.t_quant = p.t_gu + n_active * p.inter_blocks;
  p.t_down = p.t_quant + quant_blocks_.size();
  p.t_end = p.t_down + hidden_blocks;
}

namespace {
void WaitFor(const std::atomic<int>& left) {
  while (left.load(std::memory_order_acquire) != 0) Pause();
}
}  // namespace

void MoeLayer::GatherTask(ForwardPlan& p, size_t task) {
  // 2. Gather each row's token into contiguous per-expert blocks (prepared as the format's products read
  // them: int8 for the integer formats).
  MoeScratch& sc = *scratch_;
  const PackedExperts& experts = *weights_;
  const size_t h = config_.hidden;
  const size_t rows = static_cast<size_t>(routing_.rows);
  const size_t r1 = std::min(rows, (task + 1) * p.row_block);
  const size_t groups = experts.ActivationGroups(ExpertProj::kGate);
  const bool sums = experts.traits().activation_sums;
  for (size_t r = task * p.row_block; r < r1; ++r) {
    const bf16_t* x = p.input + static_cast<size_t>(routing_.row_slot[r] / p.k) * h;
    if (experts.quantized_activations()) {
      experts.PrepareRow(ExpertProj::kGate, x, sc.qxs.get() + r * ldx_, sc.sxs.get() + r * groups,
                         sums ? sc.xsums.get() + r * groups : nullptr);
    } else {
      std::memcpy(sc.xs.get() + r * ldx_, x, h * sizeof(bf16_t));
    }
  }
  p.gathered.fetch_add(1, std::memory_order_release);
}

void MoeLayer::GateUpTask(ForwardPlan& p, size_t task, int thread) {
  // 3. Gate and up on the same column block of one expert, then h = bf16(silu(g) * u) for those columns.
  while (p.gathered.load(std::memory_order_acquire) != p.gather_tasks) Pause();
  MoeScratch& sc = *scratch_;
  const size_t inter = config_.intermediate, cpt = p.cols_per_task;
  const size_t ai = task / p.inter_blocks;
  const int e = routing_.active[ai];
  const size_t c0 = (task % p.inter_blocks) * cpt;
  const size_t cols = std::min(cpt, inter - c0);
  float* g = sc.per_thread.get() + static_cast<size_t>(thread) * ScratchPerThread();
  const size_t row_chunk = RowChunk();
  float* u = g + (row_chunk + 15) * cpt;
  // The expert's rows in chunks of row_chunk, except that a remainder of fewer than 16 rows joins the last
  // whole chunk (the scratch holds row_chunk + 15 rows): no chunk falls below the kernels' 8-row AMX
  // minimum when the expert has more rows, so the kernel, and the bits of a row's result, do not depend on
  // the chunking; and whole chunks stay multiples of the 32-row tile block (equal splits such as
  // 63 + 63 + 62 + 62 would put a partial, staged A tile in every chunk, which is much slower on the AMX
  // path).
  const size_t r_end = routing_.begin[e + 1];
  size_t r0 = routing_.begin[e];
  while (r0 < r_end) {
    size_t m = std::min(row_chunk, r_end - r0);
    if (r_end - r0 - m < 16) m = r_end - r0;
    Gemm(ExpertProj::kGate, e, c0, cols, /*hidden_input=*/false, r0, m, g, cpt);
    Gemm(ExpertProj::kUp, e, c0, cols, /*hidden_input=*/false, r0, m, u, cpt);
    for (size_t r = 0; r < m; ++r) {
      SiluMulToBf16(isa_, g + r * cpt, u + r * cpt, sc.hs.get() + (r0 + r) * ldh_ + c0, cols);
    }
    r0 += m;
  }
  gu_left_[ai].fetch_sub(1, std::memory_order_acq_rel);
}

void MoeLayer::QuantizeHTask(ForwardPlan& p, size_t task) {
  // 3b. Formats reading int8 rows: prepare a block of one expert's h rows once all its columns exist.
  MoeScratch& sc = *scratch_;
  const PackedExperts& experts = *weights_;
  const auto [ai, r_first] = quant_blocks_[task];
  WaitFor(gu_left_[ai]);
  const int e = routing_.active[ai];
  const size_t groups = experts.ActivationGroups(ExpertProj::kDown);
  const bool sums = experts.traits().activation_sums;
  const size_t r1 = std::min<size_t>(routing_.begin[e + 1], r_first + p.row_block);
  for (size_t r = r_first; r < r1; ++r) {
    experts.PrepareRow(ExpertProj::kDown, sc.hs.get() + r * ldh_, sc.qhs.get() + r * ldqh_,
                       sc.shs.get() + r * groups, sums ? sc.hsums.get() + r * groups : nullptr);
  }
  quant_left_[ai].fetch_sub(1, std::memory_order_acq_rel);
}

void MoeLayer::DownTask(ForwardPlan& p, size_t task, int thread) {
  // 4+5. One column block of the output for every token: zero the block's fp32 accumulators, add
  // w * (down projection) of each active expert's rows in expert order as soon as the expert's h is ready,
  // then round the block to bf16. Blocks are disjoint, so no two tasks touch one accumulator, and no
  // [rows, H] array of per-row outputs is written and read back (512 MiB per call at qlen 4096 on the
  // Qwen3-235B shape).
  MoeScratch& sc = *scratch_;
  const size_t h = config_.hidden, dcpt = p.down_cols_per_task;
  const size_t c0 = task * dcpt;
  const size_t cols = std::min(dcpt, h - c0);
  for (size_t t = 0; t < p.qlen; ++t) std::fill_n(sc.acc.get() + t * ldy_ + c0, cols, 0.0f);
  float* y = sc.per_thread.get() + static_cast<size_t>(thread) * ScratchPerThread();
  const size_t chunk = ScratchPerThread() / dcpt;  // rows of y per kernel call
  for (size_t ai = 0; ai < routing_.active.size(); ++ai) {
    WaitFor(gu_left_[ai]);
    WaitFor(quant_left_[ai]);
    const int e = routing_.active[ai];
    const size_t r_end = routing_.begin[e + 1];
    for (size_t r0 = routing_.begin[e]; r0 < r_end; r0 += chunk) {
      const size_t m = std::min<size_t>(chunk, r_end - r0);
      Gemm(ExpertProj::kDown, e, c0, cols, /*hidden_input=*/true, r0, m, y, dcpt);
      for (size_t r = 0; r < m; ++r) {
        const int slot = routing_.row_slot[r0 + r];
        const float w = p.weights[slot];
        float* acc = sc.acc.get() + static_cast<size_t>(slot / p.k) * ldy_ + c0;
        const float* yr = y + r * dcpt;
        for (size_t c = 0; c < cols; ++c) acc[c] += w * yr[c];
      }
    }
  }
  for (size_t t = 0; t < p.qlen; ++t) {
    const float* acc = sc.acc.get() + t * ldy_ + c0;
    if (p.output.f32 != nullptr) {
      std::copy_n(acc, cols, p.output.f32 + t * h + c0);
      continue;
    }
    bf16_t* out = p.output.bf16 + t * h + c0;
    if (p.output.add) {
      for (size_t c = 0; c < cols; ++c) out[c] = F32ToBf16(Bf16ToF32(out[c]) + acc[c]);
    } else {
      for (size_t c = 0; c < cols; ++c) out[c] = F32ToBf16(acc[c]);
    }
  }
}

}  // namespace kt
