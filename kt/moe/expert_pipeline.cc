#include "kt/moe/expert_pipeline.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/base/casts.h"
#include "kt/kernels/act_quant.h"
#include "kt/kernels/activation.h"
#include "kt/kernels/convert.h"
#include "kt/kernels/gemm_int4.h"

namespace kt {
namespace {

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

void WaitFor(const std::atomic<int>& left) {
  while (left.load(std::memory_order_acquire) != 0) Pause();
}

void WaitFor(const std::atomic<size_t>& done, size_t target) {
  while (done.load(std::memory_order_acquire) != target) Pause();
}

// Tokens per sum task.
constexpr size_t kSumTokens = 8;

}  // namespace

// One call's task ranges, in index order: [0, t_gu) gather, [t_gu, t_prep) gate/up, [t_prep, t_down)
// h-prepare, [t_down, t_sum) down, [t_sum, t_end) sum (kSlotMajor).
struct ExpertPipeline::Plan {
  size_t gather_tasks = 0;
  size_t inter_blocks = 0;   // gate/up column blocks per expert
  size_t hidden_blocks = 0;  // down column blocks (of the output, or per expert with kSlotMajor)
  bool prep = false;         // the h-prepare phase runs
  size_t t_gu = 0, t_prep = 0, t_down = 0, t_sum = 0, t_end = 0;
  std::atomic<size_t> gathered{0};  // gather tasks done
  std::atomic<size_t> downs{0};     // down tasks done
};

ExpertPipeline::ExpertPipeline(const PackedExperts& experts, Isa isa, int num_experts)
    : experts_(experts),
      isa_(isa),
      gu_left_(new std::atomic<int>[num_experts]),
      prep_left_(new std::atomic<int>[num_experts]) {
  blocks_.reserve(static_cast<size_t>(num_experts));
}

size_t ExpertPipeline::ScratchFloats(size_t row_chunk, size_t max_cols, size_t hidden) {
  // Gate and up blocks of one task ((row_chunk + 15) x max_cols each: a short remainder joins the last
  // chunk), or a down block of rows (at least 62 rows of the widest column block), or one sum row.
  return std::max(2 * (row_chunk + 15) * max_cols, hidden);
}

HScaleShare::HScaleShare(int parts, size_t max_rows)
    : parts_(parts),
      max_rows_(max_rows),
      bits_(new std::atomic<uint32_t>[max_rows]),
      arrived_(new std::atomic<int>[max_rows]) {
  Reset(max_rows);
}

void HScaleShare::Reset(size_t rows) {
  rows = std::min(rows, max_rows_);
  for (size_t r = 0; r < rows; ++r) {
    bits_[r].store(0, std::memory_order_relaxed);
    arrived_[r].store(0, std::memory_order_relaxed);
  }
  aborted_.store(false, std::memory_order_relaxed);
}

void HScaleShare::Publish(size_t r, float amax) {
  // One NaN (positive, quiet: above +Inf in uint order) for every non-finite slice, so max keeps it.
  const uint32_t bits = std::isnan(amax) ? 0x7fc00000u : absl::bit_cast<uint32_t>(amax);
  uint32_t cur = bits_[r].load(std::memory_order_relaxed);
  while (cur < bits && !bits_[r].compare_exchange_weak(cur, bits, std::memory_order_relaxed)) {
  }
  arrived_[r].fetch_add(1, std::memory_order_release);
}

void HScaleShare::Wait(size_t r0, size_t r1) const {
  for (size_t r = r0; r < r1; ++r) {
    while (arrived_[r].load(std::memory_order_acquire) < parts_) {
      if (aborted_.load(std::memory_order_acquire)) return;
      Pause();
    }
  }
}

float HScaleShare::RowMax(size_t r) const { return absl::bit_cast<float>(bits_[r].load(std::memory_order_relaxed)); }

void ExpertPipeline::PlanCall(const PipelineCall& c, Plan& p) {
  const ExpertRouting& rt = *c.routing;
  const size_t h = experts_.ProjRows(ExpertProj::kDown), inter = experts_.ProjRows(ExpertProj::kGate);
  const bool quant = experts_.quantized_activations();
  p.prep = quant || (c.hooks != nullptr && c.hooks->wants_h_ready());
  p.inter_blocks = (inter + c.gate_up_cols - 1) / c.gate_up_cols;
  p.hidden_blocks = (h + c.down_cols - 1) / c.down_cols;
  const size_t n_active = rt.active.size();
  // Gather and h-prepare tasks: blocks of gather_rows rows within each expert (a row's absmax spans all I
  // columns, or a group that may straddle column blocks, so h is prepared after all of the expert's
  // gate/up blocks; the gather hook works on one expert's rows).
  blocks_.clear();
  for (size_t i = 0; i < n_active; ++i) {
    const int e = rt.active[i];
    const size_t rb = rt.begin[e], re = rt.begin[e + 1];
    for (size_t r = rb; r < re; r += c.gather_rows) blocks_.push_back({static_cast<int>(i), r});
    gu_left_[i].store(static_cast<int>(p.inter_blocks), std::memory_order_relaxed);
    prep_left_[i].store(p.prep ? static_cast<int>((re - rb + c.gather_rows - 1) / c.gather_rows) : 0,
                        std::memory_order_relaxed);
  }
  p.gather_tasks = blocks_.size();
  const bool slots = c.order == SumOrder::kSlotMajor;
  p.t_gu = p.gather_tasks;
  p.t_prep = p.t_gu + n_active * p.inter_blocks;
  p.t_down = p.t_prep + (p.prep ? blocks_.size() : 0);
  p.t_sum = p.t_down + (slots ? n_active : 1) * p.hidden_blocks;
  p.t_end = p.t_sum + (slots ? (c.qlen + kSumTokens - 1) / kSumTokens : 0);
}

void ExpertPipeline::Run(ThreadPool& pool, const PipelineCall& c, PipelineBusy* busy) {
  Plan p;
  PlanCall(c, p);
  const size_t threads = static_cast<size_t>(pool.num_threads());
  busy_.assign(threads * 4, 0.0);
  pool.ParallelFor(p.t_end, [&](size_t task, int thread) {
    const auto start = std::chrono::steady_clock::now();
    int phase;
    if (task < p.t_gu) {
      phase = 0;
      GatherTask(c, p, task, thread);
    } else if (task < p.t_prep) {
      phase = 1;
      GateUpTask(c, p, task - p.t_gu, thread);
    } else if (task < p.t_down) {
      phase = 2;
      PrepareHTask(c, p, task - p.t_prep, thread);
    } else if (task < p.t_sum) {
      phase = 3;
      DownTask(c, p, task - p.t_down, thread);
    } else {
      phase = 3;
      SumTask(c, p, task - p.t_sum, thread);
    }
    busy_[static_cast<size_t>(thread) * 4 + phase] +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  });
  if (busy == nullptr) return;
  for (size_t t = 0; t < threads; ++t) {
    for (int ph = 0; ph < 4; ++ph) busy->phase[ph] += busy_[t * 4 + ph];
  }
}

ProjInput ExpertPipeline::RowsInput(const PipelineRows& rows, ExpertProj proj, size_t r0) const {
  ProjInput in;
  if (!experts_.quantized_activations()) {
    in.ld = rows.ld;
    in.x = rows.bf16 + r0 * in.ld;
    return in;
  }
  in.ld = rows.ldq;
  in.qx = rows.q + r0 * rows.ldq;
  in.sx = rows.scales + r0 * rows.groups;
  if (rows.sums != nullptr) in.xsum = rows.sums + r0 * rows.groups;
  return in;
}

// 2. Gather: each row's token into contiguous per-expert blocks, prepared as the format's products read
// them (int8 for the integer formats), and the bf16 rows where the products (or the caller) read those.
void ExpertPipeline::GatherTask(const PipelineCall& c, Plan& p, size_t task, int thread) {
  const ExpertRouting& rt = *c.routing;
  const PipelineRows& x = c.x;
  const size_t h = experts_.ProjCols(ExpertProj::kGate);
  const auto [ai, r0] = blocks_[task];
  const int e = rt.active[ai];
  const size_t r1 = std::min<size_t>(rt.begin[e + 1], r0 + c.gather_rows);
  const bool quant = experts_.quantized_activations();
  for (size_t r = r0; r < r1; ++r) {
    const bf16_t* src = c.input + static_cast<size_t>(rt.row_slot[r] / c.k) * h;
    if (quant) {
      experts_.PrepareRow(ExpertProj::kGate, src, x.q + r * x.ldq, x.scales + r * x.groups,
                          x.sums != nullptr ? x.sums + r * x.groups : nullptr);
    }
    if (!quant || c.keep_bf16_x) std::memcpy(x.bf16 + r * x.ld, src, h * sizeof(bf16_t));
  }
  if (c.hooks != nullptr) c.hooks->Gathered(e, r0, r1, thread);
  p.gathered.fetch_add(1, std::memory_order_release);
}

// 3. Gate and up on the same column block of one expert, then h = bf16(silu(g) * u) for those columns.
void ExpertPipeline::GateUpTask(const PipelineCall& c, Plan& p, size_t task, int thread) {
  WaitFor(p.gathered, p.gather_tasks);
  const ExpertRouting& rt = *c.routing;
  const size_t inter = experts_.ProjRows(ExpertProj::kGate), cpt = c.gate_up_cols;
  const size_t ai = task / p.inter_blocks;
  const int e = rt.active[ai];
  const size_t c0 = (task % p.inter_blocks) * cpt;
  const size_t cols = std::min(cpt, inter - c0);
  if (c.hooks != nullptr) c.hooks->BeginGateUp(e, c0, cols, thread);
  // The expert's rows in chunks of row_chunk; with join_short_tail a remainder of fewer than 16 rows joins
  // the last whole chunk (the scratch holds row_chunk + 15 rows): no chunk falls below the kernels' 8-row
  // AMX minimum when the expert has more rows, so the kernel, and the bits of a row's result, do not
  // depend on the chunking; and whole chunks stay multiples of the 32-row tile block (equal splits such
  // as 63 + 63 + 62 + 62 would put a partial, staged A tile in every chunk, much slower on AMX).
  float* scratch = c.thread_scratch + static_cast<size_t>(thread) * c.scratch_per_thread;
  const size_t r_end = rt.begin[e + 1];
  size_t r0 = rt.begin[e];
  while (r0 < r_end) {
    size_t m = std::min(c.row_chunk, r_end - r0);
    if (c.join_short_tail && r_end - r0 - m < 16) m = r_end - r0;
    float *g, *u;
    size_t ld;
    if (c.g_rows != nullptr) {
      ld = c.ld_gu;
      g = c.g_rows + r0 * ld + c0;
      u = c.u_rows + r0 * ld + c0;
    } else {
      ld = cpt;
      g = scratch;
      u = g + (c.row_chunk + 15) * cpt;
    }
    const ProjInput in = RowsInput(c.x, ExpertProj::kGate, r0);
    experts_.ProjectBlock(ExpertProj::kGate, e, c0, cols, in, m, g, ld);
    experts_.ProjectBlock(ExpertProj::kUp, e, c0, cols, in, m, u, ld);
    if (c.hooks != nullptr) c.hooks->GateUpRows(e, c0, cols, r0, m, g, u, ld, thread);
    for (size_t r = 0; r < m; ++r) {
      bf16_t* h = c.h.bf16 + (r0 + r) * c.h.ld + c0;
      if (c.swiglu.plain()) {
        SiluMulToBf16(isa_, g + r * ld, u + r * ld, h, cols);
      } else {
        SwigluToBf16(isa_, c.swiglu, g + r * ld, u + r * ld, h, cols);
      }
    }
    r0 += m;
  }
  gu_left_[ai].fetch_sub(1, std::memory_order_acq_rel);
}

// 3b. A block of one expert's h rows, once all its columns exist: prepared for formats reading int8 rows,
// and the HReady hook.
void ExpertPipeline::PrepareHTask(const PipelineCall& c, Plan& p, size_t task, int thread) {
  const ExpertRouting& rt = *c.routing;
  const PipelineRows& hr = c.h;
  const auto [ai, r0] = blocks_[task];
  WaitFor(gu_left_[ai]);
  const int e = rt.active[ai];
  const size_t r1 = std::min<size_t>(rt.begin[e + 1], r0 + c.gather_rows);
  if (c.h_share != nullptr && experts_.traits().activation == ActivationKind::kInt8PerRow) {
    // A tensor-parallel part: h quantized against the whole row's max (HScaleShare).
    const size_t k = experts_.ProjCols(ExpertProj::kDown);
    for (size_t r = r0; r < r1; ++r) c.h_share->Publish(r, RowAbsMax(isa_, hr.bf16 + r * hr.ld, k));
    c.h_share->Wait(r0, r1);
    for (size_t r = r0; r < r1; ++r) {
      int8_t* q = hr.q + r * hr.ldq;
      hr.scales[r * hr.groups] = QuantizeRowInt8WithMax(isa_, hr.bf16 + r * hr.ld, k, c.h_share->RowMax(r), q);
      if (experts_.traits().activation_sums) Int4ActivationSums(1, k, 0, q, k, hr.sums + r * hr.groups);
    }
  } else if (experts_.quantized_activations()) {
    for (size_t r = r0; r < r1; ++r) {
      experts_.PrepareRow(ExpertProj::kDown, hr.bf16 + r * hr.ld, hr.q + r * hr.ldq, hr.scales + r * hr.groups,
                          hr.sums != nullptr ? hr.sums + r * hr.groups : nullptr);
    }
  }
  if (c.hooks != nullptr) c.hooks->HReady(e, r0, r1, thread);
  prep_left_[ai].fetch_sub(1, std::memory_order_acq_rel);
}

// 4. Down. kExpertMajor: one column block of the output for every token: zero the block's fp32
// accumulators, add w * (down projection) of each active expert's rows in expert order as soon as the
// expert's h is ready, round the block. Blocks are disjoint, so no two tasks touch one accumulator.
// kSlotMajor: one (expert, column block): y of all the expert's rows into the caller's rows.
void ExpertPipeline::DownTask(const PipelineCall& c, Plan& p, size_t task, int thread) {
  const ExpertRouting& rt = *c.routing;
  const size_t h = experts_.ProjRows(ExpertProj::kDown), dcpt = c.down_cols;
  if (c.order == SumOrder::kSlotMajor) {
    const size_t ai = task / p.hidden_blocks, c0 = (task % p.hidden_blocks) * dcpt;
    WaitFor(gu_left_[ai]);
    WaitFor(prep_left_[ai]);
    DownExpert(c, ai, c0, std::min(dcpt, h - c0), thread);
    p.downs.fetch_add(1, std::memory_order_release);
    return;
  }
  const size_t c0 = task * dcpt;
  const size_t cols = std::min(dcpt, h - c0);
  for (size_t t = 0; t < c.qlen; ++t) std::fill_n(c.acc + t * c.ld_acc + c0, cols, 0.0f);
  for (size_t ai = 0; ai < rt.active.size(); ++ai) {
    WaitFor(gu_left_[ai]);
    WaitFor(prep_left_[ai]);
    DownExpert(c, ai, c0, cols, thread);
  }
  for (size_t t = 0; t < c.qlen; ++t) {
    const float* acc = c.acc + t * c.ld_acc + c0;
    if (c.out.f32 != nullptr) {
      std::copy_n(acc, cols, c.out.f32 + t * h + c0);
      continue;
    }
    bf16_t* out = c.out.bf16 + t * h + c0;
    if (c.out.add) {
      for (size_t col = 0; col < cols; ++col) out[col] = F32ToBf16(Bf16ToF32(out[col]) + acc[col]);
    } else {
      for (size_t col = 0; col < cols; ++col) out[col] = F32ToBf16(acc[col]);
    }
  }
}

// The down product of active expert ai's rows on columns [c0, c0 + cols): kSlotMajor into the caller's
// rows (one product over all the expert's rows) and the DownRows hook; kExpertMajor in row chunks
// through the thread's scratch, each row's w * y added to its token's accumulators.
void ExpertPipeline::DownExpert(const PipelineCall& c, size_t ai, size_t c0, size_t cols, int thread) {
  const ExpertRouting& rt = *c.routing;
  const int e = rt.active[ai];
  const size_t h = experts_.ProjRows(ExpertProj::kDown), dcpt = c.down_cols;
  const size_t rb = rt.begin[e], r_end = rt.begin[e + 1];
  if (c.order == SumOrder::kSlotMajor) {
    float* y0 = c.y_rows + rb * h + c0;
    experts_.ProjectBlock(ExpertProj::kDown, e, c0, cols, RowsInput(c.h, ExpertProj::kDown, rb), r_end - rb,
                          y0, h);
    if (c.hooks != nullptr) c.hooks->DownRows(e, c0, cols, rb, r_end - rb, y0, h, thread);
    return;
  }
  float* y = c.thread_scratch + static_cast<size_t>(thread) * c.scratch_per_thread;
  const size_t chunk = c.scratch_per_thread / dcpt;  // rows of y per kernel call
  for (size_t r0 = rb; r0 < r_end; r0 += chunk) {
    const size_t m = std::min<size_t>(chunk, r_end - r0);
    experts_.ProjectBlock(ExpertProj::kDown, e, c0, cols, RowsInput(c.h, ExpertProj::kDown, r0), m, y, dcpt);
    for (size_t r = 0; r < m; ++r) {
      const int slot = rt.row_slot[r0 + r];
      const float w = c.weights[slot];
      float* acc = c.acc + static_cast<size_t>(slot / c.k) * c.ld_acc + c0;
      const float* yr = y + r * dcpt;
      for (size_t col = 0; col < cols; ++col) acc[col] += w * yr[col];
    }
  }
}

// Tokens [t0, t1): out_t = bf16(sum_j w_tj rows[row of (t, j)]) in slot order, through acc (H floats).
static void SumTokens(Isa isa, const ExpertRouting& routing, size_t t0, size_t t1, int k, size_t hidden,
                      const float* weights, const float* rows, float* acc, bf16_t* out) {
  for (size_t t = t0; t < t1; ++t) {
    std::fill(acc, acc + hidden, 0.0f);
    for (int j = 0; j < k; ++j) {
      const int row = routing.token_slot_row[t * k + j];
      if (row < 0) continue;
      const float w = weights != nullptr ? weights[t * k + j] : 1.0f;
      const float* y = rows + static_cast<size_t>(row) * hidden;
      for (size_t i = 0; i < hidden; ++i) acc[i] += w * y[i];
    }
    ConvertF32ToBf16(isa, acc, out + t * hidden, hidden);
  }
}

// 5. kSlotMajor: a block of tokens summed once every down task is done.
void ExpertPipeline::SumTask(const PipelineCall& c, Plan& p, size_t task, int thread) {
  WaitFor(p.downs, p.t_sum - p.t_down);
  float* acc = c.thread_scratch + static_cast<size_t>(thread) * c.scratch_per_thread;
  SumTokens(isa_, *c.routing, task * kSumTokens, std::min(c.qlen, (task + 1) * kSumTokens), c.k,
            experts_.ProjRows(ExpertProj::kDown), c.weights, c.y_rows, acc, c.out_bf16);
}

void ExpertPipeline::SumSlotRows(Isa isa, ThreadPool& pool, const ExpertRouting& routing, size_t qlen, int k,
                                 size_t hidden, const float* weights, const float* rows, float* scratch,
                                 size_t scratch_per_thread, bf16_t* out) {
  pool.ParallelFor((qlen + kSumTokens - 1) / kSumTokens, [&](size_t task, int thread) {
    SumTokens(isa, routing, task * kSumTokens, std::min(qlen, (task + 1) * kSumTokens), k, hidden, weights, rows,
              scratch + static_cast<size_t>(thread) * scratch_per_thread, out);
  });
}

}  // namespace kt
