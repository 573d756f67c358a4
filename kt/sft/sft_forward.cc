// SftMoeLayer::Forward and its phases: gather x (and A_g x, A_u x), gate/up with LoRA and silu, h prepared
// (and A_d h), down with LoRA, the weighted sum per token.
#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/kernels/activation.h"
#include "kt/kernels/convert.h"
#include "kt/kernels/lora_kernels.h"
#include "kt/sft/sft_layer.h"
#include "kt/sft/sft_pass.h"

namespace kt {

using sft_internal::Axpy;
using sft_internal::RowsAt;
using sft_internal::TransposeToF32;

absl::Status SftMoeLayer::CheckForward(int qlen, int k, const int64_t* ids, const float* weights,
                                       const bf16_t* input, const bf16_t* output, bool save_for_backward) const {
  if (!base_->loaded()) return absl::FailedPreconditionError("forward_sft before the weights are loaded");
  if (rank_ > 0 && !lora_set_) {
    return absl::FailedPreconditionError("forward_sft before the LoRA weights are set (init_lora_weights)");
  }
  if (qlen < 0 || qlen > config_.moe.max_len) {
    return absl::InvalidArgumentError(absl::StrCat("qlen = ", qlen, " must be in [0, max_len = ",
                                                   config_.moe.max_len, "]"));
  }
  if (k < 1 || k > config_.moe.top_k) {
    return absl::InvalidArgumentError(
        absl::StrCat("k = ", k, " must be in [1, top_k = ", config_.moe.top_k, "]"));
  }
  if (qlen > 0 && (ids == nullptr || weights == nullptr || input == nullptr || output == nullptr)) {
    return absl::InvalidArgumentError("forward_sft: ids, weights, input and output must not be null");
  }
  if (save_for_backward && static_cast<int>(stack_.size()) >= config_.max_cache_depth) {
    return absl::FailedPreconditionError(absl::StrCat(
        "forward_sft(save_for_backward=True): ", stack_.size(), " forward(s) already wait for their "
        "backward and max_cache_depth = ", config_.max_cache_depth,
        "; run backward first or create the layer with a larger max_cache_depth"));
  }
  if (save_for_backward && pool_ != nullptr && pool_->live() >= pool_->max_cache_depth()) {
    // Name the layers whose caches fill the pool, in the order they cached them.
    std::vector<std::pair<const SftMoeLayer*, int>> held;
    for (const auto& holder : pool_->holders_) {
      auto it = std::find_if(held.begin(), held.end(), [&](const auto& p) { return p.first == holder.first; });
      if (it == held.end()) {
        held.push_back({holder.first, 1});
      } else {
        ++it->second;
      }
    }
    std::string who;
    for (size_t i = 0; i < held.size(); ++i) {
      absl::StrAppend(&who, i == 0 ? "" : (i + 1 == held.size() ? " and " : ", "), held[i].first->Name(),
                      " holds ", held[i].second);
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "forward_sft(save_for_backward=True) on ", Name(), ": the shared cache pool (share_cache_pool) "
        "is full: it holds at most max_cache_depth = ", pool_->max_cache_depth(), " cached forward(s) for "
        "all layers together, and ", who, " (waiting for backward). A shared pool is only valid when one "
        "layer's caches are alive at a time (activation recomputation: each layer's recompute forward "
        "directly followed by its backward). Run the waiting backward first, or create the layers with "
        "per-layer caches (share_cache_pool=False)"));
  }
  return absl::OkStatus();
}

absl::Status SftMoeLayer::Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids,
                                  const float* weights, const bf16_t* input, bf16_t* output,
                                  bool save_for_backward) {
  if (absl::Status s = CheckForward(qlen, k, ids, weights, input, output, save_for_backward); !s.ok()) return s;
  if (qlen == 0) {  // An empty batch: an empty entry for its backward, nothing to compute.
    if (save_for_backward) Route(PushEntry(), 0, k, ids);
    return absl::OkStatus();
  }
  EnsureWorkspace(pool);
  Cache& c = save_for_backward ? PushEntry() : ScratchEntry();
  Route(c, qlen, k, ids);
  const size_t h = config_.moe.hidden, inter = config_.moe.intermediate, r = rank_;
  c.weights.assign(weights, weights + static_cast<size_t>(qlen) * k);
  c.input.assign(input, input + static_cast<size_t>(qlen) * h);
  const size_t rows = c.rows;
  c.g.resize(rows * inter);
  c.u.resize(rows * inter);
  c.h.resize(rows * sft_internal::RowStride(inter));
  c.y.resize(save_for_backward ? rows * h : 0);
  c.ax_g.resize(rows * r);
  c.ax_u.resize(rows * r);
  c.ah.resize(rows * r);
  const Pass p = MakePass(c, base_->quantized_activations());
  if (rows > 0) {
    ForwardGather(pool, p);
    ForwardGateUp(pool, p);
    if (p.quant || r > 0) ForwardPrepareH(pool, p);
    ForwardDown(pool, p, save_for_backward);
  }
  SumTokenRows(pool, p, c.weights.data(), output);
  return absl::OkStatus();
}

// 1. Gather x rows (bf16, or prepared for the format's kernels) and LoRA A products A_g x, A_u x.
void SftMoeLayer::ForwardGather(ThreadPool& pool, const Pass& p) {
  Cache& c = p.c;
  SftWorkspace& w = p.w;
  const size_t h = p.h, r = p.r, ldh = p.ldh, gh = p.gh;
  pool.ParallelFor(p.chunks.size(), [&](size_t task, int thread) {
    const int e = p.chunks.expert(task);
    const size_t r0 = p.chunks.begin(task), r1 = p.chunks.end(task);
    for (size_t row = r0; row < r1; ++row) {
      const bf16_t* x = c.input.data() + static_cast<size_t>(c.routing.row_slot[row] / p.k) * h;
      if (p.quant) {
        base_->PrepareRow(ExpertProj::kGate, x, w.q_rows_h.data() + row * ldh, w.s_rows_h.data() + row * gh,
                          w.sum_rows_h.data() + row * gh);
      }
      // The bf16 rows: what the bf16 GEMM reads, and the LoRA product's contiguous operand.
      if (!p.quant || r > 0) std::memcpy(w.rows_h.data() + row * ldh, x, h * sizeof(bf16_t));
    }
    if (r == 0) return;
    // A x as dot products of the gathered rows with A's rows (both along H: no transposed copy). A in
    // fp32 per task: 2 r H conversions against 4 r H multiply-adds per row of the chunk.
    float* ag = w.thread_scratch.data() + thread * p.scratch;
    float* au = ag + r * h;
    ConvertBf16ToF32(isa_, lora_.gate_a + e * r * h, ag, r * h);
    ConvertBf16ToF32(isa_, lora_.up_a + e * r * h, au, r * h);
    const bf16_t* xr = w.rows_h.data() + r0 * ldh;
    LoraGemmNT(isa_, r1 - r0, r, h, 1.0f, xr, ldh, ag, h, c.ax_g.data() + r0 * r, r, false);
    LoraGemmNT(isa_, r1 - r0, r, h, 1.0f, xr, ldh, au, h, c.ax_u.data() + r0 * r, r, false);
  });
}

// 2. g = W_g x + s B_g (A_g x), u likewise, then h = bf16(silu(g) u), by column blocks of I.
void SftMoeLayer::ForwardGateUp(ThreadPool& pool, const Pass& p) {
  Cache& c = p.c;
  SftWorkspace& w = p.w;
  const size_t inter = p.inter, r = p.r, cpt = p.cpt, ldh = p.ldh, ldi = p.ldi;
  const float s = p.s;
  const size_t inter_blocks = (inter + cpt - 1) / cpt;
  pool.ParallelFor(c.routing.active.size() * inter_blocks, [&](size_t task, int thread) {
    const int e = c.routing.active[task / inter_blocks];
    const size_t c0 = (task % inter_blocks) * cpt;
    const size_t cols = std::min(cpt, inter - c0);
    // B_g, B_u rows c0..c0+cols transposed to [r, cols]: the LoRA term of a row is then r axpys of length
    // cols (vectorized), not cols dot products of length r (a horizontal sum per element, which makes the
    // LoRA term cost a large share of the forward).
    float* bg = w.thread_scratch.data() + thread * p.scratch;
    float* bu = bg + r * cpt;
    TransposeToF32(lora_.gate_b + (e * inter + c0) * r, cols, r, bg);
    TransposeToF32(lora_.up_b + (e * inter + c0) * r, cols, r, bu);
    const size_t rb = c.routing.begin[e], re = c.routing.begin[e + 1];
    for (size_t r0 = rb; r0 < re; r0 += kRowChunk) {
      const size_t m = std::min(kRowChunk, re - r0);
      const ProjInput in = RowsAt(r0, ldh, w.rows_h.data(), p.quant, w.q_rows_h.data(), w.s_rows_h.data(),
                                  w.sum_rows_h.data(), p.gh);
      float* g = c.g.data() + r0 * inter + c0;
      float* u = c.u.data() + r0 * inter + c0;
      base_->ProjectBlock(ExpertProj::kGate, e, c0, cols, in, m, g, inter);
      base_->ProjectBlock(ExpertProj::kUp, e, c0, cols, in, m, u, inter);
      if (r > 0) {
        // [m, cols] += s [m, r] [r, cols]
        LoraGemm(isa_, m, cols, r, s, c.ax_g.data() + r0 * r, r, 1, bg, cols, g, inter, true);
        LoraGemm(isa_, m, cols, r, s, c.ax_u.data() + r0 * r, r, 1, bu, cols, u, inter, true);
      }
      for (size_t row = r0; row < r0 + m; ++row) {
        SiluMulToBf16(isa_, c.g.data() + row * inter + c0, c.u.data() + row * inter + c0,
                      c.h.data() + row * ldi + c0, cols);
      }
    }
  });
}

// 3. h rows prepared for the format's kernels; LoRA A_d h.
void SftMoeLayer::ForwardPrepareH(ThreadPool& pool, const Pass& p) {
  Cache& c = p.c;
  SftWorkspace& w = p.w;
  const size_t inter = p.inter, r = p.r, ldi = p.ldi, gi = p.gi;
  pool.ParallelFor(p.chunks.size(), [&](size_t task, int thread) {
    const int e = p.chunks.expert(task);
    const size_t r0 = p.chunks.begin(task), r1 = p.chunks.end(task);
    if (p.quant) {
      for (size_t row = r0; row < r1; ++row) {
        base_->PrepareRow(ExpertProj::kDown, c.h.data() + row * ldi, w.q_rows_i0.data() + row * ldi,
                          w.s_rows_i0.data() + row * gi, w.sum_rows_i0.data() + row * gi);
      }
    }
    if (r == 0) return;
    float* ad = w.thread_scratch.data() + thread * p.scratch;  // A_d [r, I] fp32
    ConvertBf16ToF32(isa_, lora_.down_a + e * r * inter, ad, r * inter);
    LoraGemmNT(isa_, r1 - r0, r, inter, 1.0f, c.h.data() + r0 * ldi, ldi, ad, inter, c.ah.data() + r0 * r, r,
               false);
  });
}

// 4. y = W_d h + s B_d (A_d h), by column blocks of H; kept as bf16 for the router gradient.
void SftMoeLayer::ForwardDown(ThreadPool& pool, const Pass& p, bool save_for_backward) {
  Cache& c = p.c;
  SftWorkspace& w = p.w;
  const size_t h = p.h, r = p.r, cpt = p.cpt, ldi = p.ldi;
  const size_t hidden_blocks = (h + cpt - 1) / cpt;
  pool.ParallelFor(c.routing.active.size() * hidden_blocks, [&](size_t task, int thread) {
    const int e = c.routing.active[task / hidden_blocks];
    const size_t c0 = (task % hidden_blocks) * cpt;
    const size_t cols = std::min(cpt, h - c0);
    float* bd = w.thread_scratch.data() + thread * p.scratch;  // B_d rows c0.. transposed, [r, cols]
    TransposeToF32(lora_.down_b + (e * h + c0) * r, cols, r, bd);
    const size_t r0 = c.routing.begin[e], m = c.routing.begin[e + 1] - r0;
    const ProjInput in = RowsAt(r0, ldi, c.h.data(), p.quant, w.q_rows_i0.data(), w.s_rows_i0.data(),
                                w.sum_rows_i0.data(), p.gi);
    float* y0 = w.f_rows_h.data() + r0 * h + c0;
    base_->ProjectBlock(ExpertProj::kDown, e, c0, cols, in, m, y0, h);
    if (r > 0) LoraGemm(isa_, m, cols, r, p.s, c.ah.data() + r0 * r, r, 1, bd, cols, y0, h, true);
    if (save_for_backward) {
      for (size_t i = 0; i < m; ++i) ConvertF32ToBf16(isa_, y0 + i * h, c.y.data() + (r0 + i) * h + c0, cols);
    }
  });
}

// 5. out_t = bf16(sum_j w_tj y_tj) in fp32, in slot order, from the fp32 rows in f_rows_h; with weights
// null, w_tj = 1 (the backward's grad_input_t = sum_j grad_x rows of t uses it too).
void SftMoeLayer::SumTokenRows(ThreadPool& pool, const Pass& p, const float* weights, bf16_t* output) {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const size_t h = p.h, qlen = static_cast<size_t>(p.qlen);
  const int k = p.k;
  pool.ParallelFor((qlen + 7) / 8, [&](size_t task, int thread) {
    float* acc = w.thread_scratch.data() + thread * p.scratch;
    const size_t t1 = std::min<size_t>(qlen, (task + 1) * 8);
    for (size_t t = task * 8; t < t1; ++t) {
      std::fill(acc, acc + h, 0.0f);
      for (int j = 0; j < k; ++j) {
        const int row = c.routing.token_slot_row[t * k + j];
        if (row < 0) continue;
        Axpy(weights != nullptr ? weights[t * k + j] : 1.0f, w.f_rows_h.data() + static_cast<size_t>(row) * h,
             acc, h);
      }
      ConvertF32ToBf16(isa_, acc, output + t * h, h);
    }
  });
}

}  // namespace kt
