#include "kt/moe/moe_layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "absl/strings/str_cat.h"
#include "kt/kernels/activation.h"

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

MoeLayer::MoeLayer(const MoeConfig& config, Isa isa)
    : config_(config), isa_(isa), gemm_(GetGemmBf16(isa)) {}

absl::StatusOr<std::unique_ptr<MoeLayer>> MoeLayer::Create(const MoeConfig& config, Isa isa) {
  if (absl::Status s = ValidateMoeConfig(config); !s.ok()) return s;
  if (!IsaSupported(isa, GetCpuFeatures())) {
    return absl::FailedPreconditionError(
        absl::StrCat("kernel path ", IsaName(isa), " is not supported by this CPU"));
  }
  if (GetGemmBf16(isa) == nullptr) {
    return absl::UnimplementedError(absl::StrCat("no BF16 kernel for path ", IsaName(isa)));
  }
  std::unique_ptr<MoeLayer> moe(new MoeLayer(config, isa));
  const size_t e = config.num_experts, h = config.hidden, i = config.intermediate;
  const size_t rows = static_cast<size_t>(config.max_len) * config.top_k;
  moe->gate_stride_ = PackedBf16Size(i, h);
  moe->down_stride_ = PackedBf16Size(h, i);
  moe->expert_count_.assign(e, 0);
  moe->expert_begin_.assign(e + 1, 0);
  moe->row_token_.assign(rows, 0);
  moe->token_slot_row_.assign(rows, -1);
  moe->active_.reserve(e);
  moe->xs_.Resize(rows * h);
  moe->hs_.Resize(rows * i);
  moe->ys_.Resize(rows * h);
  return moe;
}

size_t MoeLayer::weight_bytes() const {
  return (gate_.size + up_.size + down_.size) * sizeof(bf16_t);
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
  gate_.Resize(e * gate_stride_);
  up_.Resize(e * gate_stride_);
  down_.Resize(e * down_stride_);
  pool.ParallelFor(static_cast<size_t>(e) * 3, [&](size_t task, int) {
    const size_t slot = task / 3, which = task % 3;
    const size_t logical = physical_to_logical ? static_cast<size_t>(physical_to_logical[slot]) : slot;
    if (which == 0) PackBf16(gate + logical * i * h, h, i, h, gate_.get() + slot * gate_stride_);
    if (which == 1) PackBf16(up + logical * i * h, h, i, h, up_.get() + slot * gate_stride_);
    if (which == 2) PackBf16(down + logical * h * i, i, h, i, down_.get() + slot * down_stride_);
  });
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
        std::memcpy(xs_.get() + r * h, input + static_cast<size_t>(row_token_[r]) * h,
                    h * sizeof(bf16_t));
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
      const size_t panel_offset = (c0 / kPanelRows) * PanelStride(h);
      const bf16_t* gate_panels = gate_.get() + e * gate_stride_ + panel_offset;
      const bf16_t* up_panels = up_.get() + e * gate_stride_ + panel_offset;
      float* g = gu_scratch_.get() + static_cast<size_t>(thread) * ScratchPerThread();
      float* u = g + kRowChunk * cols_per_task;
      const size_t r_begin = expert_begin_[e], r_end = expert_begin_[e + 1];
      for (size_t r0 = r_begin; r0 < r_end; r0 += kRowChunk) {
        const size_t m = std::min(kRowChunk, r_end - r0);
        const bf16_t* x = xs_.get() + r0 * h;
        gemm_(m, h, x, h, gate_panels, cols, g, cols_per_task);
        gemm_(m, h, x, h, up_panels, cols, u, cols_per_task);
        for (size_t r = 0; r < m; ++r) {
          SiluMulToBf16(isa_, g + r * cols_per_task, u + r * cols_per_task,
                        hs_.get() + (r0 + r) * inter + c0, cols);
        }
      }
    });

    // 4. Down projection of every row, column block by column block.
    const size_t hidden_blocks = (h + cols_per_task - 1) / cols_per_task;
    pool.ParallelFor(active_.size() * hidden_blocks, [&](size_t task, int) {
      const int e = active_[task / hidden_blocks];
      const size_t c0 = (task % hidden_blocks) * cols_per_task;
      const size_t cols = std::min(cols_per_task, h - c0);
      const bf16_t* panels =
          down_.get() + e * down_stride_ + (c0 / kPanelRows) * PanelStride(inter);
      const size_t r0 = expert_begin_[e];
      const size_t m = expert_begin_[e + 1] - r0;
      gemm_(m, inter, hs_.get() + r0 * inter, inter, panels, cols, ys_.get() + r0 * h + c0, h);
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

void MoeForwardReference(const MoeConfig& config, int qlen, int k, const int64_t* ids,
                         const float* weights, const bf16_t* input, const bf16_t* gate,
                         const bf16_t* up, const bf16_t* down, const bool* gpu_experts_mask,
                         float* output) {
  const size_t h = config.hidden, inter = config.intermediate;
  std::vector<float> g(inter), u(inter), y(h);
  std::vector<bf16_t> hb(inter);
  for (int t = 0; t < qlen; ++t) {
    std::vector<double> acc(h, 0.0);
    for (int j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      if (e < 0 || e >= config.num_experts || (gpu_experts_mask && gpu_experts_mask[e])) continue;
      const bf16_t* x = input + static_cast<size_t>(t) * h;
      GemmBf16Reference(1, inter, h, x, h, gate + e * inter * h, h, g.data(), inter);
      GemmBf16Reference(1, inter, h, x, h, up + e * inter * h, h, u.data(), inter);
      for (size_t c = 0; c < inter; ++c) {
        const double gd = g[c];
        hb[c] = F32ToBf16(static_cast<float>(gd / (1.0 + std::exp(-gd)) * u[c]));
      }
      GemmBf16Reference(1, h, inter, hb.data(), inter, down + e * h * inter, inter, y.data(), h);
      for (size_t c = 0; c < h; ++c) acc[c] += static_cast<double>(weights[t * k + j]) * y[c];
    }
    for (size_t c = 0; c < h; ++c) output[static_cast<size_t>(t) * h + c] = static_cast<float>(acc[c]);
  }
}

}  // namespace kt
