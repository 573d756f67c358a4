// The one expert pipeline of kt: the phases of a routed-experts forward as named functions of one
// scheduler, used by inference (MoeLayer::Forward) and by SFT (SftMoeLayer::Forward, which adds its LoRA
// terms and activation cache through PipelineHooks, and runs its backward phases after it).
//
//   1. route     RouteToExperts (routing.h): (token, slot) pairs sorted by expert, done by the caller
//   2. gather    per expert, blocks of its rows: the token's x copied (bf16) and/or prepared as the
//                format's products read it (int8 + scales); hook Gathered
//   3. gate/up   per expert and column block of I: g = W_g x, u = W_u x in row chunks, hook GateUpRows
//                (SFT's LoRA term), h = bf16(silu(g) u)
//   3b. h-prep   per expert, blocks of its rows, once all of the expert's columns exist: h prepared for
//                the format's products (int8 formats); hook HReady
//   4. down      W_d h and the weighted sum, in the caller's SumOrder
//   5. sum       (SumOrder::kSlotMajor only) per token, its slots in slot order
//
// All phases run as one task list on the pool (one ParallelFor): the pool hands tasks out in index order,
// so a task only ever waits (spinning on a per-expert counter) for tasks handed out before it, which are
// running or done: no deadlock, and no barrier between phases (a decode step has ~16 tasks per phase on 16
// threads; a barrier would cost each phase its slowest task's tail).
//
// What differs between the callers is policy, passed in PipelineCall: the summation order, the column
// block widths, the row chunking of the gate/up products, where g/u and the down rows live (per-thread
// scratch, or the caller's arrays it keeps for the backward). Each caller's results are bit-identical to
// what its own scheduler gave before the pipeline was shared (tools/output_checksums.py).
#ifndef KT_MOE_EXPERT_PIPELINE_H_
#define KT_MOE_EXPERT_PIPELINE_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "kt/kernels/activation.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/packed_experts.h"
#include "kt/moe/routing.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

// The order in which a token's experts are summed (a property of the caller: each keeps its own bits).
enum class SumOrder {
  // Inference: the down phase's tasks are column blocks of the whole output; each adds w * y of every
  // active expert, in expert-id order, into an fp32 accumulator per token and rounds the block once. No
  // [rows, H] array of per-row outputs is written and read back (512 MiB per call at qlen 4096 on the
  // Qwen3-235B shape).
  kExpertMajor,
  // SFT: the down phase writes every row's y (fp32, [rows, H]) into the caller's array, which keeps it
  // for the backward; then the sum phase adds, per token, its slots in slot order and rounds once.
  kSlotMajor,
};

// One set of activation rows (the gathered inputs, K = H; or h, K = I) as the products read them.
struct PipelineRows {
  bf16_t* bf16 = nullptr;    // [rows, ld]: bf16 rows (unused for x when the format reads int8 rows only)
  int8_t* q = nullptr;       // formats reading int8 rows: [rows, ldq] the rows quantized
  float* scales = nullptr;   //   their scales [rows][groups]
  int32_t* sums = nullptr;   //   their int32 group sums [rows][groups] (null: not computed)
  size_t ld = 0, ldq = 0, groups = 1;
};

// Where the result goes (kExpertMajor): exactly one of bf16 (optionally added to, one rounding) or f32.
struct PipelineOutput {
  bf16_t* bf16 = nullptr;
  bool add = false;
  float* f32 = nullptr;
};

// A caller's additions to the phases (SFT: LoRA terms, cache). Called on pool threads; `thread` indexes the
// caller's per-thread scratch. The pipeline itself uses PipelineCall::thread_scratch only in gate/up tasks
// without g_rows, in kExpertMajor down tasks and in sum tasks, so hooks may share that scratch otherwise.
class PipelineHooks {
 public:
  virtual ~PipelineHooks() = default;
  // Rows [r0, r1) of expert e are gathered (gate/up tasks start once every gather task and hook is done).
  virtual void Gathered(int e, size_t r0, size_t r1, int thread) {}
  // A gate/up task on columns [c0, c0 + cols) of expert e begins.
  virtual void BeginGateUp(int e, size_t c0, size_t cols, int thread) {}
  // The base products g, u [m, cols] (stride ld) of rows [r0, r0 + m) exist; the activation follows.
  virtual void GateUpRows(int e, size_t c0, size_t cols, size_t r0, size_t m, float* g, float* u, size_t ld,
                          int thread) {}
  // h rows [r0, r1) of expert e are complete (and prepared); the down phase reads them after this.
  virtual void HReady(int e, size_t r0, size_t r1, int thread) {}
  // kSlotMajor: the base down product y [m, cols] (stride ld) of all m rows of expert e from r0 exists.
  virtual void DownRows(int e, size_t c0, size_t cols, size_t r0, size_t m, float* y, size_t ld, int thread) {}
  // Whether the h-prepare phase runs for formats reading bf16 rows too (to call HReady).
  virtual bool wants_h_ready() const { return false; }
};

// Tensor parallelism (TpMoeLayer) cuts I into parts, each a MoeLayer with its own pipeline. A format that
// quantizes h with one scale per row (per-channel int8/int4) would give each part a scale from its slice's
// max instead of the row's, and so numbers that differ from the whole layer's by the h rounding error. With a
// share, each part's h-prepare task publishes its rows' max |h| here, waits until every part has published
// them, and quantizes its slice against the row's max: the parts' codes are then slices of the whole
// layer's, and TP gives the TP = 1 result up to the order of the fp32 reduce.
// Rows are the routing's rows, the same in every part (same ids, one mask snapshot), so pools of different
// sizes (other task blocks) still meet: a task publishes all its rows before it waits, and tasks are handed
// out in index order, so the lowest unpublished row is always in a task that runs.
class HScaleShare {
 public:
  HScaleShare(int parts, size_t max_rows);
  // Before every forward (not during one): rows [0, rows) unpublished.
  void Reset(size_t rows);
  // Row r's max |h| over one part's slice (NaN: the slice holds a NaN or an infinity).
  void Publish(size_t r, float amax);
  // Waits until every part has published rows [r0, r1), or Abort.
  void Wait(size_t r0, size_t r1) const;
  // The row's max over the parts (NaN if any part's was NaN). After Wait.
  float RowMax(size_t r) const;
  // A part failed before publishing: waiters stop waiting (their layer reports the failure).
  void Abort() { aborted_.store(true, std::memory_order_release); }
  int parts() const { return parts_; }

 private:
  int parts_;
  size_t max_rows_;
  std::unique_ptr<std::atomic<uint32_t>[]> bits_;  // float bits of the max; non-negative, so uint order
  std::unique_ptr<std::atomic<int>[]> arrived_;
  std::atomic<bool> aborted_{false};
};

// One forward through the pipeline: inputs, buffers and the caller's policy.
struct PipelineCall {
  const ExpertRouting* routing = nullptr;
  size_t qlen = 0;
  int k = 0;
  const float* weights = nullptr;  // [qlen, k] routing weights
  const bf16_t* input = nullptr;   // [qlen, H]
  PipelineRows x, h;
  bool keep_bf16_x = false;  // formats reading int8 rows: gather the bf16 rows too (SFT's LoRA reads them)
  // Policy.
  size_t gather_rows = 64;    // rows per gather and h-prepare task (within one expert)
  size_t gate_up_cols = 48;   // columns per gate/up task
  size_t down_cols = 48;      // columns per down task
  size_t row_chunk = kRowChunk;  // rows per gate/up product call
  bool join_short_tail = false;  // a remainder of fewer than 16 rows joins the last chunk (scratch: +15 rows)
  SwigluParams swiglu;           // h's activation variant (plain: silu(g) * u); non-plain overwrites g and u
  float* g_rows = nullptr;    // [rows, ld_gu] where g and u go (kept by the caller); null: per-thread scratch
  float* u_rows = nullptr;
  size_t ld_gu = 0;
  SumOrder order = SumOrder::kExpertMajor;
  float* acc = nullptr;       // kExpertMajor: [qlen, ld_acc] fp32 accumulators
  size_t ld_acc = 0;
  PipelineOutput out;         // kExpertMajor
  float* y_rows = nullptr;    // kSlotMajor: [rows, H] fp32 down rows
  bf16_t* out_bf16 = nullptr;  // kSlotMajor: [qlen, H]
  float* thread_scratch = nullptr;  // per pool thread, scratch_per_thread floats (ScratchFloats)
  size_t scratch_per_thread = 0;
  PipelineHooks* hooks = nullptr;
  HScaleShare* h_share = nullptr;  // a tensor-parallel part of a per-row h format (see HScaleShare)
};

// Busy seconds per phase, summed over threads (gather, gate/up, h-prepare, down + sum).
struct PipelineBusy {
  double phase[4] = {0, 0, 0, 0};
};

// Holds one call's task lists and per-expert counters: one Run at a time per pipeline (MoeLayer runs it under
// its scratch's mutex; SftMoeLayer allows one call at a time anyway).
class ExpertPipeline {
 public:
  // `experts`: the packed weights the products read (kept by reference; AdoptWeights-style swaps of its
  // contents are fine). Sized for `num_experts` experts; allocates nothing per call after the first calls.
  ExpertPipeline(const PackedExperts& experts, Isa isa, int num_experts);

  // Per-thread scratch floats a call needs: gate/up blocks without g_rows ((row_chunk + 15) x gate_up_cols
  // each of g and u), a kExpertMajor down block (at least one row of down_cols), a sum row (H).
  static size_t ScratchFloats(size_t row_chunk, size_t max_cols, size_t hidden);

  // Runs phases 2-5 of `call` on `pool` (routing already done). Adds busy seconds to `busy` (may be null).
  void Run(ThreadPool& pool, const PipelineCall& call, PipelineBusy* busy);

  // out_t = bf16(sum_j w_tj y_tj) over token t's routed slots in slot order, in fp32 (w_tj = 1 when
  // weights is null): the kSlotMajor sum, also used by SFT's backward for grad_input. Tokens in blocks of
  // 8 per task; `scratch`: H floats per thread.
  static void SumSlotRows(Isa isa, ThreadPool& pool, const ExpertRouting& routing, size_t qlen, int k,
                          size_t hidden, const float* weights, const float* rows, float* scratch,
                          size_t scratch_per_thread, bf16_t* out);

 private:
  struct Plan;  // one call's task ranges and counters (expert_pipeline.cc)
  void PlanCall(const PipelineCall& c, Plan& p);
  // The phases, one task each (numbered from the phase's first task).
  void GatherTask(const PipelineCall& c, Plan& p, size_t task, int thread);
  void GateUpTask(const PipelineCall& c, Plan& p, size_t task, int thread);
  void PrepareHTask(const PipelineCall& c, Plan& p, size_t task, int thread);
  void DownTask(const PipelineCall& c, Plan& p, size_t task, int thread);
  void DownExpert(const PipelineCall& c, size_t ai, size_t c0, size_t cols, int thread);
  void SumTask(const PipelineCall& c, Plan& p, size_t task, int thread);
  ProjInput RowsInput(const PipelineRows& rows, ExpertProj proj, size_t r0) const;

  const PackedExperts& experts_;
  Isa isa_;
  // Per active expert (index into routing.active): gate/up tasks and h-prepare tasks still to finish.
  std::unique_ptr<std::atomic<int>[]> gu_left_, prep_left_;
  std::vector<std::pair<int, size_t>> blocks_;  // gather / h-prepare tasks: (active index, first row)
  std::vector<double> busy_;                    // [threads][4]
};

}  // namespace kt

#endif  // KT_MOE_EXPERT_PIPELINE_H_
