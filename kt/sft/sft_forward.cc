// SftMoeLayer::Forward: the expert pipeline shared with inference (kt/moe/expert_pipeline.h) with SFT's
// hooks: gather x (and A_g x, A_u x), gate/up with LoRA and silu, h prepared (and A_d h), down with LoRA,
// the weighted sum per token in slot order; the activations the backward needs kept in the cache entry.
#include <algorithm>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/kernels/convert.h"
#include "kt/kernels/lora_kernels.h"
#include "kt/sft/sft_layer.h"
#include "kt/sft/sft_pass.h"

namespace kt {

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

// SFT's additions to the shared expert pipeline's phases (kt/moe/expert_pipeline.h): the LoRA terms, and the
// activations the backward reads kept in the cache entry (g, u, h, A x, A_d h and y).
class SftMoeLayer::ForwardHooks : public PipelineHooks {
 public:
  ForwardHooks(const SftMoeLayer& layer, const Pass& p, bool save_for_backward)
      : l_(layer), p_(p), save_(save_for_backward) {}

  // 2. LoRA A products of the gathered rows, A_g x and A_u x, as dot products of the rows with A's rows
  // (both along H: no transposed copy). A in fp32 per task: 2 r H conversions against 4 r H multiply-adds
  // per row of the chunk.
  void Gathered(int e, size_t r0, size_t r1, int thread) override {
    const size_t h = p_.h, r = p_.r, ldh = p_.ldh;
    if (r == 0) return;
    float* ag = Scratch(thread);
    float* au = ag + r * h;
    ConvertBf16ToF32(l_.isa_, l_.lora_.gate_a + e * r * h, ag, r * h);
    ConvertBf16ToF32(l_.isa_, l_.lora_.up_a + e * r * h, au, r * h);
    const bf16_t* xr = p_.w.rows_h.data() + r0 * ldh;
    LoraGemmNT(l_.isa_, r1 - r0, r, h, 1.0f, xr, ldh, ag, h, p_.c.ax_g.data() + r0 * r, r, false);
    LoraGemmNT(l_.isa_, r1 - r0, r, h, 1.0f, xr, ldh, au, h, p_.c.ax_u.data() + r0 * r, r, false);
  }

  // 3. B_g, B_u rows c0..c0+cols transposed to [r, cols]: the LoRA term of a row is then r axpys of length
  // cols (vectorized), not cols dot products of length r (a horizontal sum per element, which makes the
  // LoRA term cost a large share of the forward).
  void BeginGateUp(int e, size_t c0, size_t cols, int thread) override {
    const size_t inter = p_.inter, r = p_.r;
    float* bg = Scratch(thread);
    TransposeToF32(l_.lora_.gate_b + (e * inter + c0) * r, cols, r, bg);
    TransposeToF32(l_.lora_.up_b + (e * inter + c0) * r, cols, r, bg + r * p_.cpt);
  }

  // g += s (A_g x) B_g^T, u likewise: [m, cols] += s [m, r] [r, cols].
  void GateUpRows(int e, size_t c0, size_t cols, size_t r0, size_t m, float* g, float* u, size_t ld,
                  int thread) override {
    const size_t r = p_.r;
    if (r == 0) return;
    const float* bg = Scratch(thread);
    const float* bu = bg + r * p_.cpt;
    LoraGemm(l_.isa_, m, cols, r, p_.s, p_.c.ax_g.data() + r0 * r, r, 1, bg, cols, g, ld, true);
    LoraGemm(l_.isa_, m, cols, r, p_.s, p_.c.ax_u.data() + r0 * r, r, 1, bu, cols, u, ld, true);
  }

  // 3b. A_d h of the h rows [r0, r1).
  void HReady(int e, size_t r0, size_t r1, int thread) override {
    const size_t inter = p_.inter, r = p_.r, ldi = p_.ldi;
    if (r == 0) return;
    float* ad = Scratch(thread);  // A_d [r, I] fp32
    ConvertBf16ToF32(l_.isa_, l_.lora_.down_a + e * r * inter, ad, r * inter);
    LoraGemmNT(l_.isa_, r1 - r0, r, inter, 1.0f, p_.c.h.data() + r0 * ldi, ldi, ad, inter,
               p_.c.ah.data() + r0 * r, r, false);
  }
  bool wants_h_ready() const override { return p_.r > 0; }

  // 4. y += s (A_d h) B_d^T on the column block; y kept as bf16 for the router gradient.
  void DownRows(int e, size_t c0, size_t cols, size_t r0, size_t m, float* y, size_t ld, int thread) override {
    const size_t h = p_.h, r = p_.r;
    float* bd = Scratch(thread);  // B_d rows c0.. transposed, [r, cols]
    TransposeToF32(l_.lora_.down_b + (e * h + c0) * r, cols, r, bd);
    if (r > 0) LoraGemm(l_.isa_, m, cols, r, p_.s, p_.c.ah.data() + r0 * r, r, 1, bd, cols, y, ld, true);
    if (save_) {
      for (size_t i = 0; i < m; ++i) ConvertF32ToBf16(l_.isa_, y + i * ld, p_.c.y.data() + (r0 + i) * h + c0, cols);
    }
  }

 private:
  float* Scratch(int thread) const { return p_.w.thread_scratch.data() + thread * p_.scratch; }
  const SftMoeLayer& l_;
  const Pass& p_;
  bool save_;
};

absl::Status SftMoeLayer::Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids,
                                  const float* weights, const bf16_t* input, bf16_t* output,
                                  bool save_for_backward) {
  if (absl::Status s = CheckForward(qlen, k, ids, weights, input, output, save_for_backward); !s.ok()) return s;
  if (qlen == 0) {  // An empty batch: an empty entry for its backward, nothing to compute.
    if (save_for_backward) Route(PushEntry(), 0, k, ids);
    return absl::OkStatus();
  }
  const auto start = std::chrono::steady_clock::now();
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
  ForwardHooks hooks(*this, p, save_for_backward);
  pipeline_->Run(pool, MakePipelineCall(p, output, &hooks), /*busy=*/nullptr);
  times_.forward = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return absl::OkStatus();
}

// The shared pipeline's call for a forward: SFT's buffers (the cache entry keeps g, u, h; the workspace
// the gathered and prepared rows and y) and policy: one column width (ColsPerTask) for gate/up and down,
// row chunks of kRowChunk, gather and h-prepare blocks of kRowChunk rows (the LoRA A products' blocks),
// the token sums in slot order (SumOrder::kSlotMajor).
PipelineCall SftMoeLayer::MakePipelineCall(const Pass& p, bf16_t* output, PipelineHooks* hooks) const {
  Cache& c = p.c;
  SftWorkspace& w = p.w;
  PipelineCall call;
  call.routing = &c.routing;
  call.qlen = static_cast<size_t>(c.qlen);
  call.k = c.k;
  call.weights = c.weights.data();
  call.input = c.input.data();
  call.x = PipelineRows{w.rows_h.data(), w.q_rows_h.data(), w.s_rows_h.data(), w.sum_rows_h.data(),
                        p.ldh, p.ldh, p.gh};
  call.h = PipelineRows{c.h.data(), w.q_rows_i0.data(), w.s_rows_i0.data(), w.sum_rows_i0.data(),
                        p.ldi, p.ldi, p.gi};
  call.keep_bf16_x = p.r > 0;
  call.gather_rows = kRowChunk;
  call.gate_up_cols = p.cpt;
  call.down_cols = p.cpt;
  call.row_chunk = kRowChunk;
  call.join_short_tail = false;
  call.g_rows = c.g.data();
  call.u_rows = c.u.data();
  call.ld_gu = p.inter;
  call.order = SumOrder::kSlotMajor;
  call.y_rows = w.f_rows_h.data();
  call.out_bf16 = output;
  call.thread_scratch = w.thread_scratch.data();
  call.scratch_per_thread = p.scratch;
  call.hooks = hooks;
  return call;
}

}  // namespace kt
