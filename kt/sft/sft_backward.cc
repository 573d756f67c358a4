// SftMoeLayer::Backward and its tasks: grad_y (and the router gradient, grad_y B_d), grad_g and grad_u
// through the transposed down weights and silu's derivative, their preparation (and grad B products),
// grad_x through the transposed gate/up weights, the six LoRA gradients (one task list, below), then
// grad_input per token.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "kt/kernels/activation.h"
#include "kt/kernels/convert.h"
#include "kt/kernels/lora_kernels.h"
#include "kt/sft/sft_layer.h"
#include "kt/sft/sft_pass.h"

namespace kt {

using sft_internal::Axpy;
using sft_internal::Dot;
using sft_internal::kGradRows;
using sft_internal::RowsAt;

namespace {

using Clock = std::chrono::steady_clock;

double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A task over (active expert, column block of `width` columns, `cpt` per block): task = a * blocks + b.
struct ColumnBlock {
  int e;
  size_t c0, cols;
};
ColumnBlock BlockOfTask(const std::vector<int>& active, size_t task, size_t width, size_t cpt) {
  const size_t blocks = (width + cpt - 1) / cpt;
  const size_t c0 = (task % blocks) * cpt;
  return {active[task / blocks], c0, std::min(cpt, width - c0)};
}

// Columns [b.c0, b.c0 + b.cols) of expert b.e's LoRA A ([E][r][width] bf16) as fp32 [r][b.cols]: the slice a
// column-block task multiplies with its rows' (grad B) products.
void LoraASlice(Isa isa, const bf16_t* a, size_t r, size_t width, const ColumnBlock& b, float* out) {
  for (size_t i = 0; i < r; ++i) {
    ConvertBf16ToF32(isa, a + (static_cast<size_t>(b.e) * r + i) * width + b.c0, out + i * b.cols, b.cols);
  }
}

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Pauses (~20-60 ns each) a waiting task spins before it yields its CPU at every further check.
constexpr int kSpinsBeforeYield = 1024;

// The kinds of the backward's tasks (SftTimes names each), and the slot of the time spent spinning.
enum Kind : uint8_t { kRebuild, kGradY, kGradGateUp, kPrepare, kGradX, kLoraGrads, kWait, kKinds };
// Per-thread time accumulators, one cache line per thread.
constexpr size_t kTimeStride = 8;
static_assert(kKinds <= kTimeStride, "one cache line of doubles per thread");

// The per-thread task times (kTimeStride per thread) into `t`, as shares of the wall time.
void AddTaskTimes(const std::vector<double>& seconds, size_t threads, bool rebuild, SftTimes* t) {
  double total[kKinds] = {};
  for (size_t i = 0; i < threads; ++i) {
    for (int k = 0; k < kKinds; ++k) total[k] += seconds[i * kTimeStride + k] / static_cast<double>(threads);
  }
  if (rebuild) {
    t->rebuild = total[kRebuild];
    t->rebuild_overlapped = true;
  }
  t->grad_y = total[kGradY];
  t->grad_gate_up = total[kGradGateUp];
  t->prepare = total[kPrepare];
  t->grad_x = total[kGradX];
  t->lora_grads = total[kLoraGrads];
  t->wait = total[kWait];
}

}  // namespace

absl::Status SftMoeLayer::Backward(ThreadPool& pool, const bf16_t* grad_output, bf16_t* grad_input,
                                   float* grad_weights, bool accumulate, float grad_scale) {
  if (stack_.empty()) return sft_internal::NoCachedForward();
  if (stack_.back()->qlen > 0 && (grad_output == nullptr || grad_input == nullptr || grad_weights == nullptr)) {
    return absl::InvalidArgumentError("backward: grad_output, grad_input and grad_weights must not be null");
  }
  if (!std::isfinite(grad_scale)) return absl::InvalidArgumentError("backward: grad_scale must be finite");
  const Clock::time_point start = Clock::now();
  const double forward = times_.forward;
  times_ = SftTimes{};
  times_.forward = forward;
  // A shared copy built from another layer (or older weights) is rebuilt: as one phase before the backward
  // (serial), or inside its task list (overlapped; RunBackwardTasks places each expert's rebuild a few tasks
  // ahead of its first use).
  const bool rebuild = !BackwardWeightsCurrent();
  if (rebuild && !overlapped_rebuild_) {
    if (absl::Status st = EnsureBackwardWeights(pool); !st.ok()) return st;
    times_.rebuild = Since(start);
  }
  EnsureWorkspace(pool);
  // Pop now: whatever happens below, this forward's cache is consumed (kept for its buffers).
  std::unique_ptr<Cache> owned = std::move(stack_.back());
  stack_.pop_back();
  Cache& c = *owned;
  const Pass p = MakePass(c, bwd_->t_->quantized_activations());
  std::fill(grad_weights, grad_weights + static_cast<size_t>(c.qlen) * c.k, 0.0f);
  // An overlapped rebuild that fails (it cannot for weights that loaded: the shapes and formats were checked
  // at Create) still consumes the cache entry; its status is returned.
  absl::Status st = RunBackwardTasks(pool, p, rebuild && overlapped_rebuild_, grad_output, grad_weights,
                                     accumulate, grad_scale);
  // 6. grad_input_t = sum_j grad_x rows, in slot order (the pipeline's kSlotMajor sum, weights 1).
  const Clock::time_point sum = Clock::now();
  ExpertPipeline::SumSlotRows(isa_, pool, c.routing, static_cast<size_t>(c.qlen), c.k, p.h, /*weights=*/nullptr,
                              p.w.f_rows_h.data(), p.w.thread_scratch.data(), p.scratch, grad_input);
  times_.sum = Since(sum);
  ReleaseEntry(std::move(owned));
  times_.backward = Since(start);
  return st;
}

// The backward's tasks, in index order (the pool hands tasks out in that order): grad_y row chunks, grad_g/
// grad_u (expert, column block of I), their preparation (row chunks), grad_x (expert, column block of H), the
// LoRA gradients (every expert), as one ParallelFor. A task waits, spinning on a per-expert counter, only for
// tasks of the same expert handed out before it (running or done), as kt/moe's ExpertPipeline does: no
// deadlock, and no barrier between phases (each would cost its slowest task's tail).
//
// An overlapped rebuild adds the rebuild of each (expert, projection) as a task placed kRebuildLead tasks
// per pool thread before the first task multiplying by it (down: the expert's first grad_g/grad_u task;
// gate and up: its first grad_x task; experts without rows at the end), so the threads rebuild a few experts
// ahead while the others compute, instead of all rebuilding in a phase of its own: the rebuild's memory
// traffic runs beside the GEMMs' compute, the copy is read soon after it was written (still in cache), and
// the phase's tail and barrier are gone. A thread that would spin on a task's inputs runs the next rebuild
// nobody has claimed yet instead (an int8 rebuild of one projection costs as much as 30 grad_g/grad_u
// tasks on the dev box, so a fixed lead alone left threads spinning). Each rebuild runs once, whoever
// claims it; the tasks compute what the serial phase computes (RebuildTask), so the weights and results are
// the same bits.
struct SftMoeLayer::BackwardPlan {
  static constexpr size_t kRebuildLead = 2;
  struct Task {
    Kind kind;
    uint32_t i;  // index within its kind: chunk, (active expert, block), expert, or slot * 3 + proj
  };
  std::vector<Task> tasks;
  size_t inter_blocks = 0, hidden_blocks = 0;
  bool prepare = false;
  // Per expert id: tasks still to run of grad_y, grad_g/grad_u, preparation; rebuilds of W_d^T and of
  // W_g^T, W_u^T.
  std::unique_ptr<std::atomic<int>[]> grad_y, grad_gate_up, prepared, down_rebuilt, gate_up_rebuilt;
  // Rebuilds (slot * 3 + proj) in list order, whether each is claimed, and where the first unclaimed one
  // may be (a hint: every rebuild before it is claimed).
  std::vector<uint32_t> rebuilds;
  std::unique_ptr<std::atomic<bool>[]> claimed;
  std::atomic<size_t> next_unclaimed{0};

  BackwardPlan(const Pass& p, size_t num_experts, bool rebuild, size_t threads);
  bool Claim(uint32_t id);
  int64_t ClaimNext();
  // Adds `n` to counter e of `a`.
  static void Add(std::unique_ptr<std::atomic<int>[]>& a, size_t e, int n) {
    a[e].store(a[e].load(std::memory_order_relaxed) + n, std::memory_order_relaxed);
  }
};

SftMoeLayer::BackwardPlan::BackwardPlan(const Pass& p, size_t num_experts, bool rebuild, size_t threads)
    : grad_y(new std::atomic<int>[num_experts]),
      grad_gate_up(new std::atomic<int>[num_experts]),
      prepared(new std::atomic<int>[num_experts]),
      down_rebuilt(new std::atomic<int>[num_experts]),
      gate_up_rebuilt(new std::atomic<int>[num_experts]),
      claimed(new std::atomic<bool>[num_experts * 3]) {
  for (size_t i = 0; i < num_experts * 3; ++i) claimed[i].store(false, std::memory_order_relaxed);
  for (size_t e = 0; e < num_experts; ++e) {
    for (auto* a : {&grad_y, &grad_gate_up, &prepared, &down_rebuilt, &gate_up_rebuilt}) {
      (*a)[e].store(0, std::memory_order_relaxed);
    }
  }
  const ExpertRouting& rt = p.c.routing;
  inter_blocks = (p.inter + p.cpt - 1) / p.cpt;
  hidden_blocks = (p.h + p.cpt - 1) / p.cpt;
  prepare = p.quant || p.r > 0;
  // Where each expert's first grad_g/grad_u and grad_x tasks are, to place its rebuilds before them.
  std::vector<size_t> first_gate_up(num_experts, SIZE_MAX), first_grad_x(num_experts, SIZE_MAX);
  std::vector<Task> compute;
  if (p.c.rows > 0) {
    for (size_t t = 0; t < p.chunks.size(); ++t) {
      compute.push_back({kGradY, static_cast<uint32_t>(t)});
      Add(grad_y, p.chunks.expert(t), 1);
    }
    for (size_t a = 0; a < rt.active.size(); ++a) {
      first_gate_up[rt.active[a]] = compute.size();
      Add(grad_gate_up, rt.active[a], static_cast<int>(inter_blocks));
      for (size_t b = 0; b < inter_blocks; ++b) {
        compute.push_back({kGradGateUp, static_cast<uint32_t>(a * inter_blocks + b)});
      }
    }
    for (size_t t = 0; prepare && t < p.chunks.size(); ++t) {
      compute.push_back({kPrepare, static_cast<uint32_t>(t)});
      Add(prepared, p.chunks.expert(t), 1);
    }
    for (size_t a = 0; a < rt.active.size(); ++a) {
      first_grad_x[rt.active[a]] = compute.size();
      for (size_t b = 0; b < hidden_blocks; ++b) {
        compute.push_back({kGradX, static_cast<uint32_t>(a * hidden_blocks + b)});
      }
    }
  }
  for (size_t e = 0; p.r > 0 && e < num_experts; ++e) compute.push_back({kLoraGrads, static_cast<uint32_t>(e)});
  if (!rebuild) {
    tasks = std::move(compute);
    return;
  }
  // before[i]: the rebuilds handed out just before compute task i (i = compute.size(): at the end).
  std::vector<std::vector<Task>> before(compute.size() + 1);
  const size_t lead = kRebuildLead * threads;
  auto at = [&](size_t first) { return first == SIZE_MAX ? compute.size() : first - std::min(first, lead); };
  for (size_t e = 0; e < num_experts; ++e) {
    const auto slot = static_cast<uint32_t>(e * 3);
    before[at(first_gate_up[e])].push_back({kRebuild, slot + static_cast<uint32_t>(ExpertProj::kDown)});
    before[at(first_grad_x[e])].push_back({kRebuild, slot + static_cast<uint32_t>(ExpertProj::kGate)});
    before[at(first_grad_x[e])].push_back({kRebuild, slot + static_cast<uint32_t>(ExpertProj::kUp)});
    Add(down_rebuilt, e, 1);
    Add(gate_up_rebuilt, e, 2);
  }
  tasks.reserve(compute.size() + num_experts * 3);
  for (size_t i = 0; i <= compute.size(); ++i) {
    tasks.insert(tasks.end(), before[i].begin(), before[i].end());
    for (const Task& t : before[i]) rebuilds.push_back(t.i);
    if (i < compute.size()) tasks.push_back(compute[i]);
  }
}

// Claims rebuild `id` for the caller: false when another thread has it.
bool SftMoeLayer::BackwardPlan::Claim(uint32_t id) {
  return !claimed[id].load(std::memory_order_relaxed) && !claimed[id].exchange(true, std::memory_order_acq_rel);
}

// The first rebuild in list order that nobody has claimed, claimed for the caller; -1 when none is left.
int64_t SftMoeLayer::BackwardPlan::ClaimNext() {
  for (size_t i = next_unclaimed.load(std::memory_order_relaxed); i < rebuilds.size(); ++i) {
    if (Claim(rebuilds[i])) {
      next_unclaimed.store(i + 1, std::memory_order_relaxed);
      return rebuilds[i];
    }
  }
  return -1;
}

absl::Status SftMoeLayer::RunBackwardTasks(ThreadPool& pool, const Pass& p, bool rebuild,
                                           const bf16_t* grad_output, float* grad_weights, bool accumulate,
                                           float grad_scale) {
  const size_t num_experts = static_cast<size_t>(config_.moe.num_experts);
  const size_t threads = static_cast<size_t>(pool.num_threads());
  BackwardPlan plan(p, num_experts, rebuild, threads);
  if (rebuild) PrepareRebuild(pool);
  std::vector<absl::Status> failures(rebuild ? num_experts * 3 : 0);
  std::vector<double> seconds(threads * kTimeStride, 0.0);
  const ExpertRouting& rt = p.c.routing;
  // Rebuild `id` on `thread` (once claimed), then count it done for its consumers.
  auto rebuild_one = [&](uint32_t id, int thread) {
    failures[id] = RebuildTask(id, thread);
    const size_t e = id / 3;
    (static_cast<ExpertProj>(id % 3) == ExpertProj::kDown ? plan.down_rebuilt : plan.gate_up_rebuilt)[e].fetch_sub(
        1, std::memory_order_release);
  };
  pool.ParallelFor(plan.tasks.size(), [&](size_t i, int thread) {
    const BackwardPlan::Task task = plan.tasks[i];
    double* acc = seconds.data() + static_cast<size_t>(thread) * kTimeStride;
    const Clock::time_point t0 = Clock::now();
    double aside = 0;  // seconds of this task spent waiting or helping: not the task's own
    // Until counter `left` is 0: runs unclaimed rebuilds (their own kind's time) while there are any,
    // then spins (wait time), yielding the CPU after kSpinsBeforeYield pauses: on a machine with more
    // runnable threads than CPUs (the dev box under other builds) the task waited for may be preempted,
    // and a thread spinning on its CPU only delays it.
    auto wait_for = [&](const std::atomic<int>& left) {
      if (left.load(std::memory_order_acquire) == 0) return;
      const Clock::time_point w0 = Clock::now();
      double helped = 0;
      int spins = 0;
      while (left.load(std::memory_order_acquire) != 0) {
        const int64_t id = rebuild ? plan.ClaimNext() : -1;
        if (id < 0) {
          if (++spins < kSpinsBeforeYield) {
            Pause();
          } else {
            std::this_thread::yield();
          }
          continue;
        }
        const Clock::time_point h0 = Clock::now();
        rebuild_one(static_cast<uint32_t>(id), thread);
        helped += Since(h0);
      }
      const double all = Since(w0);
      acc[kRebuild] += helped;
      acc[kWait] += all - helped;
      aside += all;
    };
    int e = 0;
    switch (task.kind) {
      case kRebuild:
        if (plan.Claim(task.i)) rebuild_one(task.i, thread);
        break;
      case kGradY:
        GradYTask(p, task.i, thread, grad_output, grad_weights);
        plan.grad_y[p.chunks.expert(task.i)].fetch_sub(1, std::memory_order_release);
        break;
      case kGradGateUp:
        e = rt.active[task.i / plan.inter_blocks];
        wait_for(plan.grad_y[e]);
        wait_for(plan.down_rebuilt[e]);
        GradGateUpTask(p, task.i, thread);
        plan.grad_gate_up[e].fetch_sub(1, std::memory_order_release);
        break;
      case kPrepare:
        e = p.chunks.expert(task.i);
        wait_for(plan.grad_gate_up[e]);
        PrepareTask(p, task.i, thread);
        plan.prepared[e].fetch_sub(1, std::memory_order_release);
        break;
      case kGradX:
        e = rt.active[task.i / plan.hidden_blocks];
        wait_for(plan.grad_gate_up[e]);
        wait_for(plan.prepared[e]);
        wait_for(plan.gate_up_rebuilt[e]);
        GradXTask(p, task.i, thread);
        break;
      case kLoraGrads:
        // Reads grad_y, grad_g, grad_u rows and their B products (the preparation tasks, which run whenever
        // r > 0, wait for the grad_g/grad_u tasks).
        wait_for(plan.grad_y[task.i]);
        wait_for(plan.prepared[task.i]);
        LoraGradsTask(p, task.i, thread, accumulate, grad_scale);
        break;
      default:
        break;
    }
    acc[task.kind] += Since(t0) - aside;
  });
  AddTaskTimes(seconds, threads, rebuild, &times_);
  for (const absl::Status& s : failures) {
    if (!s.ok()) return s;
  }
  return rebuild ? FinishRebuild() : absl::OkStatus();
}

// Buffers of the workspace in backward: grad_y = w_tj grad_out_t (bf16, [rows, ldh]) in rows_h, grad_g and
// grad_u (bf16, [rows, ldi]) in rows_i0 / rows_i1, grad_y B_d, grad_g B_g, grad_u B_u ([rows, r]) in
// lora0..2, grad_x rows ([rows, H]) in f_rows_h.

// 1. grad_y rows, the router gradient <grad_out_t, y_tj>, and grad_y B_d.
void SftMoeLayer::GradYTask(const Pass& p, size_t task, int thread, const bf16_t* grad_output,
                            float* grad_weights) const {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t h = p.h, r = p.r, ldh = p.ldh, gh = p.gh;
  const int k = p.k;
  bf16_t* dy_b = w.rows_h.data();
  const int e = p.chunks.expert(task);
  const size_t r0 = p.chunks.begin(task), r1 = p.chunks.end(task);
  float* bd = w.thread_scratch.data() + thread * p.scratch;  // B_d [H, r] fp32
  float* go = bd + h * r;
  float* yf = go + h;
  for (size_t row = r0; row < r1; ++row) {
    const size_t tj = c.routing.row_slot[row];
    ConvertBf16ToF32(isa_, grad_output + (tj / k) * h, go, h);
    ConvertBf16ToF32(isa_, c.y.data() + row * h, yf, h);
    grad_weights[tj] = Dot(go, yf, h);
    const float wt = c.weights[tj];
    bf16_t* dy = dy_b + row * ldh;
    for (size_t i = 0; i < h; ++i) dy[i] = F32ToBf16(wt * go[i]);
    if (p.quant) {
      t.PrepareRow(ExpertProj::kDown, dy, w.q_rows_h.data() + row * ldh, w.s_rows_h.data() + row * gh,
                   w.sum_rows_h.data() + row * gh);
    }
  }
  if (r == 0) return;
  // grad_y B_d from the bf16 grad_y rows the base GEMM reads too: [m, r] = [m, H] [H, r].
  ConvertBf16ToF32(isa_, lora_.down_b + e * h * r, bd, h * r);
  LoraGemm(isa_, r1 - r0, r, h, 1.0f, dy_b + r0 * ldh, ldh, 1, bd, r, w.lora0.data() + r0 * r, r, false);
}

// 2. grad_h = grad_y W_d + s (grad_y B_d) A_d, then grad_g and grad_u, by column blocks of I.
void SftMoeLayer::GradGateUpTask(const Pass& p, size_t task, int thread) const {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t inter = p.inter, r = p.r, cpt = p.cpt, ldh = p.ldh, ldi = p.ldi;
  const ColumnBlock block = BlockOfTask(c.routing.active, task, inter, cpt);
  const auto [e, c0, cols] = block;
  float* dh = w.thread_scratch.data() + thread * p.scratch;
  float* ad = dh + kRowChunk * cpt;  // A_d[:, c0:c0+cols], [r, cols]
  LoraASlice(isa_, lora_.down_a, r, inter, block, ad);
  const size_t rb = c.routing.begin[e], re = c.routing.begin[e + 1];
  for (size_t r0 = rb; r0 < re; r0 += kRowChunk) {
    const size_t m = std::min(kRowChunk, re - r0);
    const ProjInput in = RowsAt(r0, ldh, w.rows_h.data(), p.quant, w.q_rows_h.data(), w.s_rows_h.data(),
                                w.sum_rows_h.data(), p.gh);
    t.ProjectBlock(ExpertProj::kDown, e, c0, cols, in, m, dh, cpt);
    if (r > 0) LoraGemm(isa_, m, cols, r, p.s, w.lora0.data() + r0 * r, r, 1, ad, cols, dh, cpt, true);
    for (size_t i = 0; i < m; ++i) {
      const size_t at = (r0 + i) * inter + c0, bt = (r0 + i) * ldi + c0;
      SiluBackwardToBf16(isa_, dh + i * cpt, c.g.data() + at, c.u.data() + at, w.rows_i0.data() + bt,
                         w.rows_i1.data() + bt, cols);
    }
  }
}

// 3. grad_g, grad_u rows prepared for the format's kernels; grad_g B_g and grad_u B_u.
void SftMoeLayer::PrepareTask(const Pass& p, size_t task, int thread) const {
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t inter = p.inter, r = p.r, ldi = p.ldi, gi = p.gi;
  const bf16_t* dg_b = w.rows_i0.data();
  const bf16_t* du_b = w.rows_i1.data();
  const int e = p.chunks.expert(task);
  const size_t r0 = p.chunks.begin(task), r1 = p.chunks.end(task);
  for (size_t row = r0; p.quant && row < r1; ++row) {
    t.PrepareRow(ExpertProj::kGate, dg_b + row * ldi, w.q_rows_i0.data() + row * ldi,
                 w.s_rows_i0.data() + row * gi, w.sum_rows_i0.data() + row * gi);
    t.PrepareRow(ExpertProj::kUp, du_b + row * ldi, w.q_rows_i1.data() + row * ldi,
                 w.s_rows_i1.data() + row * gi, w.sum_rows_i1.data() + row * gi);
  }
  if (r == 0) return;
  float* bg = w.thread_scratch.data() + thread * p.scratch;  // B_g [I, r] fp32
  float* bu = bg + inter * r;
  ConvertBf16ToF32(isa_, lora_.gate_b + e * inter * r, bg, inter * r);
  ConvertBf16ToF32(isa_, lora_.up_b + e * inter * r, bu, inter * r);
  LoraGemm(isa_, r1 - r0, r, inter, 1.0f, dg_b + r0 * ldi, ldi, 1, bg, r, w.lora1.data() + r0 * r, r, false);
  LoraGemm(isa_, r1 - r0, r, inter, 1.0f, du_b + r0 * ldi, ldi, 1, bu, r, w.lora2.data() + r0 * r, r, false);
}

// 4. grad_x rows = grad_g W_g + grad_u W_u + s ((grad_g B_g) A_g + (grad_u B_u) A_u), by column blocks of H.
void SftMoeLayer::GradXTask(const Pass& p, size_t task, int thread) const {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t h = p.h, r = p.r, cpt = p.cpt, ldi = p.ldi;
  const ColumnBlock block = BlockOfTask(c.routing.active, task, h, cpt);
  const auto [e, c0, cols] = block;
  float* tmp = w.thread_scratch.data() + thread * p.scratch;
  float* ag = tmp + kRowChunk * cpt;  // A_g[:, c0:c0+cols], [r, cols]
  float* au = ag + r * cols;
  LoraASlice(isa_, lora_.gate_a, r, h, block, ag);
  LoraASlice(isa_, lora_.up_a, r, h, block, au);
  const size_t rb = c.routing.begin[e], re = c.routing.begin[e + 1];
  for (size_t r0 = rb; r0 < re; r0 += kRowChunk) {
    const size_t m = std::min(kRowChunk, re - r0);
    const ProjInput ing = RowsAt(r0, ldi, w.rows_i0.data(), p.quant, w.q_rows_i0.data(), w.s_rows_i0.data(),
                                 w.sum_rows_i0.data(), p.gi);
    const ProjInput inu = RowsAt(r0, ldi, w.rows_i1.data(), p.quant, w.q_rows_i1.data(), w.s_rows_i1.data(),
                                 w.sum_rows_i1.data(), p.gi);
    float* out = w.f_rows_h.data() + r0 * h + c0;
    t.ProjectBlock(ExpertProj::kGate, e, c0, cols, ing, m, out, h);
    t.ProjectBlock(ExpertProj::kUp, e, c0, cols, inu, m, tmp, cpt);
    for (size_t i = 0; i < m; ++i) Axpy(1.0f, tmp + i * cpt, out + i * h, cols);
    if (r > 0) {
      LoraGemm(isa_, m, cols, r, p.s, w.lora1.data() + r0 * r, r, 1, ag, cols, out, h, true);
      LoraGemm(isa_, m, cols, r, p.s, w.lora2.data() + r0 * r, r, 1, au, cols, out, h, true);
    }
  }
}

// 5. The six LoRA gradients, one expert per task (experts without rows: zeros, or unchanged when
//    accumulating).
void SftMoeLayer::LoraGradsTask(const Pass& p, size_t e, int thread, bool accumulate, float grad_scale) const {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const size_t h = p.h, inter = p.inter, r = p.r, ldh = p.ldh, ldi = p.ldi;
  const float s = p.s;
  const int k = p.k;
  const size_t rb = c.routing.begin[e], re = c.routing.begin[e + 1];
  struct Out {
    bf16_t* dst;
    size_t n;
  } outs[6] = {{lora_.grad_gate_a + e * r * h, r * h},      {lora_.grad_gate_b + e * inter * r, inter * r},
               {lora_.grad_up_a + e * r * h, r * h},        {lora_.grad_up_b + e * inter * r, inter * r},
               {lora_.grad_down_a + e * r * inter, r * inter}, {lora_.grad_down_b + e * h * r, h * r}};
  if (rb == re) {
    if (!accumulate) {
      for (const Out& o : outs) std::fill(o.dst, o.dst + o.n, bf16_t{0});
    }
    return;
  }
  float* ga = w.thread_scratch.data() + thread * p.scratch;  // [r, H]
  float* gb = ga + r * h;                                     // [I, r]
  float* ua = gb + inter * r;                                 // [r, H]
  float* ub = ua + r * h;                                     // [I, r]
  float* da = ub + inter * r;                                 // [r, I]
  float* db = da + r * inter;                                 // [H, r]
  float* rows_f = db + h * r;  // [kGradRows, H or I]: fp32 x rows, then h rows
  std::fill(ga, rows_f, 0.0f);
  // Each product is a small GEMM over kGradRows rows with the row index as its inner dimension: the
  // [rows, r] factors (grad B, A x) are read transposed through LoraGemm's strides, and grad_g, grad_u,
  // grad_y straight from their bf16 rows.
  const float* dyB = w.lora0.data();
  const float* dgB = w.lora1.data();
  const float* duB = w.lora2.data();
  for (size_t r0 = rb; r0 < re; r0 += kGradRows) {
    const size_t m = std::min(kGradRows, re - r0);
    for (size_t i = 0; i < m; ++i) {
      ConvertBf16ToF32(isa_, c.input.data() + (c.routing.row_slot[r0 + i] / k) * h, rows_f + i * h, h);
    }
    // gate/up A: s (grad B)^T x, [r, H] += s [r, m] [m, H]
    LoraGemm(isa_, r, h, m, s, dgB + r0 * r, 1, r, rows_f, h, ga, h, true);
    LoraGemm(isa_, r, h, m, s, duB + r0 * r, 1, r, rows_f, h, ua, h, true);
    // gate/up B: s grad^T (A x), [I, r] += s [I, m] [m, r]
    LoraGemm(isa_, inter, r, m, s, w.rows_i0.data() + r0 * ldi, 1, ldi, c.ax_g.data() + r0 * r, r, gb, r, true);
    LoraGemm(isa_, inter, r, m, s, w.rows_i1.data() + r0 * ldi, 1, ldi, c.ax_u.data() + r0 * r, r, ub, r, true);
    // down A: s (grad_y B_d)^T h, [r, I]; down B: s grad_y^T (A_d h), [H, r]
    for (size_t i = 0; i < m; ++i) {
      ConvertBf16ToF32(isa_, c.h.data() + (r0 + i) * ldi, rows_f + i * inter, inter);
    }
    LoraGemm(isa_, r, inter, m, s, dyB + r0 * r, 1, r, rows_f, inter, da, inter, true);
    LoraGemm(isa_, h, r, m, s, w.rows_h.data() + r0 * ldh, 1, ldh, c.ah.data() + r0 * r, r, db, r, true);
  }
  const float* src[6] = {ga, gb, ua, ub, da, db};
  for (int j = 0; j < 6; ++j) {
    bf16_t* dst = outs[j].dst;
    for (size_t i = 0; i < outs[j].n; ++i) {
      const float v = grad_scale * src[j][i];
      dst[i] = F32ToBf16(accumulate ? Bf16ToF32(dst[i]) + v : v);
    }
  }
}

}  // namespace kt
