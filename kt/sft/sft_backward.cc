// SftMoeLayer::Backward and its phases: grad_y (and the router gradient, grad_y B_d), grad_g and grad_u
// through the transposed down weights and silu's derivative, their preparation (and grad B products),
// grad_x through the transposed gate/up weights, the six LoRA gradients, grad_input per token.
#include <algorithm>
#include <cmath>
#include <memory>
#include <utility>

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

absl::Status SftMoeLayer::Backward(ThreadPool& pool, const bf16_t* grad_output, bf16_t* grad_input,
                                   float* grad_weights, bool accumulate, float grad_scale) {
  if (stack_.empty()) return sft_internal::NoCachedForward();
  if (stack_.back()->qlen > 0 && (grad_output == nullptr || grad_input == nullptr || grad_weights == nullptr)) {
    return absl::InvalidArgumentError("backward: grad_output, grad_input and grad_weights must not be null");
  }
  if (!std::isfinite(grad_scale)) return absl::InvalidArgumentError("backward: grad_scale must be finite");
  if (absl::Status st = EnsureBackwardWeights(pool); !st.ok()) return st;
  EnsureWorkspace(pool);
  // Pop now: whatever happens below, this forward's cache is consumed (kept for its buffers).
  std::unique_ptr<Cache> owned = std::move(stack_.back());
  stack_.pop_back();
  Cache& c = *owned;
  const Pass p = MakePass(c, bwd_->t_->quantized_activations());
  std::fill(grad_weights, grad_weights + static_cast<size_t>(c.qlen) * c.k, 0.0f);
  if (c.rows > 0) {
    BackwardGradY(pool, p, grad_output, grad_weights);
    BackwardGradGateUp(pool, p);
    if (p.quant || p.r > 0) BackwardPrepareGradGateUp(pool, p);
    BackwardGradX(pool, p);
  }
  if (p.r > 0) BackwardLoraGrads(pool, p, accumulate, grad_scale);
  // 6. grad_input_t = sum_j grad_x rows, in slot order (the pipeline's kSlotMajor sum, weights 1).
  ExpertPipeline::SumSlotRows(isa_, pool, c.routing, static_cast<size_t>(c.qlen), c.k, p.h, /*weights=*/nullptr,
                              p.w.f_rows_h.data(), p.w.thread_scratch.data(), p.scratch, grad_input);
  ReleaseEntry(std::move(owned));
  return absl::OkStatus();
}

// Buffers of the workspace in backward: grad_y = w_tj grad_out_t (bf16, [rows, ldh]) in rows_h, grad_g and
// grad_u (bf16, [rows, ldi]) in rows_i0 / rows_i1, grad_y B_d, grad_g B_g, grad_u B_u ([rows, r]) in
// lora0..2, grad_x rows ([rows, H]) in f_rows_h.

// 1. grad_y rows, the router gradient <grad_out_t, y_tj>, and grad_y B_d.
void SftMoeLayer::BackwardGradY(ThreadPool& pool, const Pass& p, const bf16_t* grad_output, float* grad_weights) {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t h = p.h, r = p.r, ldh = p.ldh, gh = p.gh;
  const int k = p.k;
  bf16_t* dy_b = w.rows_h.data();
  pool.ParallelFor(p.chunks.size(), [&](size_t task, int thread) {
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
  });
}

// 2. grad_h = grad_y W_d + s (grad_y B_d) A_d, then grad_g and grad_u, by column blocks of I.
void SftMoeLayer::BackwardGradGateUp(ThreadPool& pool, const Pass& p) {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t inter = p.inter, r = p.r, cpt = p.cpt, ldh = p.ldh, ldi = p.ldi;
  const size_t inter_blocks = (inter + cpt - 1) / cpt;
  pool.ParallelFor(c.routing.active.size() * inter_blocks, [&](size_t task, int thread) {
    const int e = c.routing.active[task / inter_blocks];
    const size_t c0 = (task % inter_blocks) * cpt;
    const size_t cols = std::min(cpt, inter - c0);
    float* dh = w.thread_scratch.data() + thread * p.scratch;
    float* ad = dh + kRowChunk * cpt;  // A_d[:, c0:c0+cols], [r, cols]
    for (size_t i = 0; i < r; ++i) {
      ConvertBf16ToF32(isa_, lora_.down_a + (e * r + i) * inter + c0, ad + i * cols, cols);
    }
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
  });
}

// 3. grad_g, grad_u rows prepared for the format's kernels; grad_g B_g and grad_u B_u.
void SftMoeLayer::BackwardPrepareGradGateUp(ThreadPool& pool, const Pass& p) {
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t inter = p.inter, r = p.r, ldi = p.ldi, gi = p.gi;
  const bf16_t* dg_b = w.rows_i0.data();
  const bf16_t* du_b = w.rows_i1.data();
  pool.ParallelFor(p.chunks.size(), [&](size_t task, int thread) {
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
  });
}

// 4. grad_x rows = grad_g W_g + grad_u W_u + s ((grad_g B_g) A_g + (grad_u B_u) A_u), by column blocks of H.
void SftMoeLayer::BackwardGradX(ThreadPool& pool, const Pass& p) {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const PackedExperts& t = *bwd_->t_;
  const size_t h = p.h, r = p.r, cpt = p.cpt, ldi = p.ldi;
  const size_t hidden_blocks = (h + cpt - 1) / cpt;
  pool.ParallelFor(c.routing.active.size() * hidden_blocks, [&](size_t task, int thread) {
    const int e = c.routing.active[task / hidden_blocks];
    const size_t c0 = (task % hidden_blocks) * cpt;
    const size_t cols = std::min(cpt, h - c0);
    float* tmp = w.thread_scratch.data() + thread * p.scratch;
    float* ag = tmp + kRowChunk * cpt;  // A_g[:, c0:c0+cols], [r, cols]
    float* au = ag + r * cols;
    for (size_t i = 0; i < r; ++i) {
      ConvertBf16ToF32(isa_, lora_.gate_a + (e * r + i) * h + c0, ag + i * cols, cols);
      ConvertBf16ToF32(isa_, lora_.up_a + (e * r + i) * h + c0, au + i * cols, cols);
    }
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
  });
}

// 5. The six LoRA gradients, one expert per task (experts without rows: zeros, or unchanged when
//    accumulating).
void SftMoeLayer::BackwardLoraGrads(ThreadPool& pool, const Pass& p, bool accumulate, float grad_scale) {
  const Cache& c = p.c;
  SftWorkspace& w = p.w;
  const size_t h = p.h, inter = p.inter, r = p.r, ldh = p.ldh, ldi = p.ldi;
  const float s = p.s;
  const int k = p.k;
  pool.ParallelFor(config_.moe.num_experts, [&](size_t e, int thread) {
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
  });
}

}  // namespace kt
