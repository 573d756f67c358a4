#include "kt/sft/sft_layer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kt/kernels/activation.h"
#include "kt/kernels/convert.h"
#include "kt/kernels/gemm_bf16.h"  // kPanelRows
#include "kt/kernels/lora_kernels.h"
#include "kt/moe/routing.h"
#include "kt/sft/sft_pass.h"

namespace kt {
namespace {

using sft_internal::kGradRows;
using sft_internal::RowStride;

// Each layer's id for SftBackwardWeights ownership (an address could be reused by a later layer).
std::atomic<uint64_t> g_next_layer_id{1};
// Creation numbers of layers, to name a layer without layer_idx in the cache pool's errors.
std::atomic<uint64_t> g_next_creation_id{0};

}  // namespace

absl::Status ValidateSftConfig(const SftConfig& c) {
  if (absl::Status s = ValidateMoeConfig(c.moe); !s.ok()) return s;
  if (c.moe.swiglu_limit != 0.0f || c.moe.swiglu_alpha != 0.0f) {
    return absl::InvalidArgumentError(absl::StrCat(
        "MoeConfig.swiglu_limit = ", c.moe.swiglu_limit, " and swiglu_alpha = ", c.moe.swiglu_alpha,
        ": SFT's backward differentiates silu(g) * u only; both must be 0"));
  }
  if (!c.skip_lora && c.lora_rank <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("SftConfig.lora_rank must be > 0, got ", c.lora_rank));
  }
  if (!c.skip_lora && !std::isfinite(c.lora_alpha)) {
    return absl::InvalidArgumentError("SftConfig.lora_alpha must be finite");
  }
  if (c.max_cache_depth < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SftConfig.max_cache_depth must be >= 1, got ", c.max_cache_depth));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<SftBackwardWeights>> SftBackwardWeights::Create(const MoeConfig& moe,
                                                                               Isa isa,
                                                                               ExpertFormat format) {
  if (absl::Status s = ValidateMoeConfig(moe); !s.ok()) return s;
  // The transposed shape (hidden and intermediate swapped); the group formats quantize W^T in groups of
  // the same G.
  absl::StatusOr<std::unique_ptr<PackedExperts>> layer = PackedExperts::Create(
      ExpertShape{moe.num_experts, moe.intermediate, moe.hidden, moe.group_size}, isa, format);
  if (!layer.ok()) return layer.status();
  std::shared_ptr<SftBackwardWeights> w(new SftBackwardWeights);
  w->t_ = std::move(*layer);
  w->shape_ = moe;
  w->format_ = format;
  w->isa_ = isa;
  return w;
}

size_t SftWorkspace::bytes() const {
  return rows_h.size() * 2 + q_rows_h.size() + s_rows_h.size() * 4 + f_rows_h.size() * 4 +
         rows_i0.size() * 2 + rows_i1.size() * 2 + q_rows_i0.size() + q_rows_i1.size() +
         (s_rows_i0.size() + s_rows_i1.size() + lora0.size() + lora1.size() + lora2.size() +
          thread_scratch.size()) * 4 +
         (sum_rows_h.size() + sum_rows_i0.size() + sum_rows_i1.size()) * 4 + scratch.bytes();
}

size_t SftForwardCache::bytes() const {
  return input.capacity() * 2 + (g.capacity() + u.capacity()) * 4 + h.capacity() * 2 + y.capacity() * 2 +
         (ax_g.capacity() + ax_u.capacity() + ah.capacity()) * 4 + ids.capacity() * 8 +
         weights.capacity() * 4 +
         (routing.row_slot.capacity() + routing.token_slot_row.capacity() + routing.begin.capacity() +
          routing.active.capacity() + routing.count.capacity()) * 4;
}

absl::StatusOr<std::shared_ptr<SftCachePool>> SftCachePool::Create(int max_cache_depth) {
  if (max_cache_depth < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("SftCachePool: max_cache_depth must be >= 1, got ", max_cache_depth));
  }
  return std::shared_ptr<SftCachePool>(new SftCachePool(max_cache_depth));
}

size_t SftCachePool::bytes() const {
  size_t total = 0;
  for (const auto& holder : holders_) total += holder.second->bytes();
  for (const auto& c : free_) total += c->bytes();
  return total;
}

absl::StatusOr<std::unique_ptr<SftMoeLayer>> SftMoeLayer::Create(
    const SftConfig& config, Isa isa, ExpertFormat format,
    std::shared_ptr<SftBackwardWeights> backward_weights, std::shared_ptr<SftWorkspace> workspace,
    std::shared_ptr<SftCachePool> cache_pool) {
  if (absl::Status s = ValidateSftConfig(config); !s.ok()) return s;
  if (cache_pool != nullptr && cache_pool->max_cache_depth() != config.max_cache_depth) {
    // The pool's capacity is what bounds the layers' caches; a layer expecting another depth would be
    // refused (or allowed) forwards its own setting does not say.
    return absl::InvalidArgumentError(absl::StrCat(
        "share_cache_pool: the shared cache pool holds max_cache_depth = ", cache_pool->max_cache_depth(),
        " cached forwards; this layer has max_cache_depth = ", config.max_cache_depth,
        ": layers sharing a pool must have its max_cache_depth"));
  }
  std::unique_ptr<SftMoeLayer> l(new SftMoeLayer(config, isa));
  l->pool_ = std::move(cache_pool);
  l->id_ = g_next_creation_id.fetch_add(1);
  const MoeConfig& m = config.moe;
  absl::StatusOr<std::unique_ptr<PackedExperts>> moe =
      PackedExperts::Create(ExpertShape{m.num_experts, m.hidden, m.intermediate, m.group_size}, isa, format);
  if (!moe.ok()) return moe.status();
  l->base_ = std::move(*moe);
  l->pipeline_ = std::make_unique<ExpertPipeline>(*l->base_, isa, m.num_experts);
  if (backward_weights != nullptr) {
    const MoeConfig& s = backward_weights->shape_;
    if (s.num_experts != config.moe.num_experts || s.hidden != config.moe.hidden ||
        s.intermediate != config.moe.intermediate || backward_weights->format_ != format ||
        backward_weights->isa_ != isa ||
        (IsGroupExpertFormat(format) && s.group_size != config.moe.group_size)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "shared backward weights are for E = ", s.num_experts, ", H = ", s.hidden, ", I = ",
          s.intermediate, ", ", ExpertFormatName(backward_weights->format_), " (group_size ",
          s.group_size, ") on ", IsaName(backward_weights->isa_), "; this layer is E = ",
          config.moe.num_experts, ", H = ", config.moe.hidden, ", I = ", config.moe.intermediate, ", ",
          ExpertFormatName(format), " (group_size ", config.moe.group_size, ") on ", IsaName(isa)));
    }
    l->bwd_ = std::move(backward_weights);
    l->bwd_shared_ = true;
  } else {
    absl::StatusOr<std::shared_ptr<SftBackwardWeights>> w =
        SftBackwardWeights::Create(config.moe, isa, format);
    if (!w.ok()) return w.status();
    l->bwd_ = std::move(*w);
  }
  if (l->base_->quantized_activations()) {
    l->groups_h_ = l->base_->ActivationGroups(ExpertProj::kGate);  // K = H
    l->groups_i_ = l->base_->ActivationGroups(ExpertProj::kDown);  // K = I
  }
  l->ws_ = workspace != nullptr ? std::move(workspace) : std::make_shared<SftWorkspace>();
  l->rank_ = config.skip_lora ? 0 : config.lora_rank;
  l->scale_ = config.skip_lora ? 0.0f : config.lora_alpha / static_cast<float>(config.lora_rank);
  return l;
}

SftMoeLayer::~SftMoeLayer() {
  while (!stack_.empty()) {
    std::unique_ptr<Cache> c = std::move(stack_.back());
    stack_.pop_back();
    ReleaseEntry(std::move(c));
  }
}

std::string SftMoeLayer::Name() const {
  return config_.layer_idx >= 0 ? absl::StrCat("layer ", config_.layer_idx)
                                : absl::StrCat("unnumbered layer #", id_);
}

SftMoeLayer::Cache& SftMoeLayer::PushEntry() {
  std::vector<std::unique_ptr<Cache>>& from = pool_ != nullptr ? pool_->free_ : free_;
  if (from.empty()) {
    stack_.push_back(std::make_unique<Cache>());
  } else {
    stack_.push_back(std::move(from.back()));
    from.pop_back();
  }
  if (pool_ != nullptr) pool_->holders_.emplace_back(this, stack_.back().get());
  return *stack_.back();
}

SftMoeLayer::Cache& SftMoeLayer::ScratchEntry() {
  return ws_->scratch;
}

void SftMoeLayer::ReleaseEntry(std::unique_ptr<Cache> c) {
  if (pool_ == nullptr) {
    free_.push_back(std::move(c));
    return;
  }
  auto& holders = pool_->holders_;
  for (size_t i = holders.size(); i-- > 0;) {
    if (holders[i].second == c.get()) {
      holders.erase(holders.begin() + i);
      break;
    }
  }
  pool_->free_.push_back(std::move(c));
}

absl::Status SftMoeLayer::LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                                      const int64_t* physical_to_logical, ThreadPool& pool) {
  if (absl::Status s = base_->LoadWeights(gate, up, down, physical_to_logical, pool); !s.ok()) return s;
  weights_version_ = g_next_layer_id.fetch_add(1);
  if (!bwd_shared_) return EnsureBackwardWeights(pool);
  return absl::OkStatus();
}

bool SftMoeLayer::BackwardWeightsCurrent() const {
  return bwd_->owner_ == this && bwd_->owner_version_ == weights_version_;
}

absl::Status SftMoeLayer::EnsureBackwardWeights(ThreadPool& pool) {
  if (BackwardWeightsCurrent()) return absl::OkStatus();
  PrepareRebuild(pool);
  std::vector<absl::Status> failures(static_cast<size_t>(config_.moe.num_experts) * 3);
  pool.ParallelFor(failures.size(), [&](size_t task, int thread) { failures[task] = RebuildTask(task, thread); });
  for (const absl::Status& s : failures) {
    if (!s.ok()) return s;
  }
  return FinishRebuild();
}

void SftMoeLayer::PrepareRebuild(ThreadPool& pool) {
  SftBackwardWeights& w = *bwd_;
  w.owner_ = nullptr;  // a failure before FinishRebuild leaves no owner, so the next call rebuilds
  // One buffer per thread for the quantized formats' transposed bf16, reused by its tasks and kept with the
  // backward weights between rebuilds (a fresh one per task or per rebuild would be page-faulted and
  // zeroed each time: 3 MiB per Qwen3-30B projection).
  const size_t threads = static_cast<size_t>(pool.num_threads());
  if (!base_->transposes_packed() && w.transposed_.size() < threads) w.transposed_.resize(threads);
}

absl::Status SftMoeLayer::RebuildTask(size_t task, int thread) {
  SftBackwardWeights& w = *bwd_;
  const int slot = static_cast<int>(task / 3);
  const auto proj = static_cast<ExpertProj>(task % 3);
  if (base_->transposes_packed()) {
    // The format transposes packed to packed (bf16: each 512-byte block of the forward panels is one
    // 512-byte block of the backward ones, read and written once; about half the time of unpacking,
    // transposing and packing again; docs/perf-log/2026-11-27-session-10.md).
    return w.t_->LoadExpertTransposed(slot, proj, *base_);
  }
  // Other formats (the quantized ones) dequantize straight into the transposed order (one pass over the
  // packed weights; a panel block is a few runs of 16 consecutive values of W^T), then quantize again per
  // row of W^T.
  // (A row-major unpack followed by a tiled transpose would take over half of an int8 rebuild.)
  std::vector<bf16_t>& wt = w.transposed_[thread];
  wt.resize(static_cast<size_t>(config_.moe.hidden) * config_.moe.intermediate);
  if (absl::Status s = base_->UnpackExpertTransposed(slot, proj, wt.data()); !s.ok()) return s;
  // The transposed layer's projection of the same name is this one transposed.
  return w.t_->LoadExpert(slot, proj, wt.data());
}

absl::Status SftMoeLayer::FinishRebuild() {
  SftBackwardWeights& w = *bwd_;
  if (absl::Status s = w.t_->FinishLoad(); !s.ok()) return s;
  w.owner_ = this;
  w.owner_version_ = weights_version_;
  return absl::OkStatus();
}

absl::Status SftMoeLayer::SetLora(const SftLoraTensors& lora) {
  if (rank_ > 0) {
    const void* ptrs[] = {lora.gate_a,      lora.gate_b,      lora.up_a,      lora.up_b,
                          lora.down_a,      lora.down_b,      lora.grad_gate_a, lora.grad_gate_b,
                          lora.grad_up_a,   lora.grad_up_b,   lora.grad_down_a, lora.grad_down_b};
    const char* names[] = {"gate_lora_a",      "gate_lora_b",      "up_lora_a",      "up_lora_b",
                           "down_lora_a",      "down_lora_b",      "grad_gate_lora_a", "grad_gate_lora_b",
                           "grad_up_lora_a",   "grad_up_lora_b",   "grad_down_lora_a", "grad_down_lora_b"};
    for (int i = 0; i < 12; ++i) {
      if (ptrs[i] == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("SetLora: ", names[i], " must not be null"));
      }
    }
  }
  lora_ = lora;
  lora_set_ = true;
  return absl::OkStatus();
}

size_t SftMoeLayer::ScratchPerThread() const {
  const size_t h = config_.moe.hidden, inter = config_.moe.intermediate, r = rank_;
  const size_t cpt = sft_internal::ColsPerTask(isa_);
  const size_t sizes[] = {
      2 * r * h,                              // forward LoRA A of gate and up (fp32)
      2 * r * cpt,                            // forward LoRA B block of gate and up
      r * inter,                              // forward LoRA A of down
      r * cpt,                                // forward LoRA B block of down
      h * r + 2 * h,                          // backward grad_y rows: B_d, one go and y row
      kRowChunk * cpt + r * cpt,              // backward grad_h block, A_d block
      2 * inter * r,                          // backward grad_g B_g, grad_u B_u
      kRowChunk * cpt + 2 * r * cpt,          // backward grad_x block, A_g and A_u blocks
      r * (3 * h + 3 * inter) + kGradRows * std::max(h, inter),  // backward LoRA grads of one expert
      h,                                      // weighted sums
  };
  return *std::max_element(std::begin(sizes), std::end(sizes));
}

void SftMoeLayer::EnsureWorkspace(ThreadPool& pool) {
  SftWorkspace& w = *ws_;
  const size_t rows = static_cast<size_t>(config_.moe.max_len) * config_.moe.top_k;
  const size_t h = config_.moe.hidden, inter = config_.moe.intermediate, r = rank_;
  auto grow = [](auto& v, size_t n) {
    if (v.size() < n) v.resize(n);
  };
  const size_t ldh = RowStride(h), ldi = RowStride(inter);
  grow(w.rows_h, rows * ldh);
  grow(w.f_rows_h, rows * h);
  grow(w.rows_i0, rows * ldi);
  grow(w.rows_i1, rows * ldi);
  if (base_->quantized_activations()) {
    grow(w.q_rows_h, rows * ldh);
    grow(w.s_rows_h, rows * groups_h_);
    grow(w.sum_rows_h, rows * groups_h_);
    grow(w.q_rows_i0, rows * ldi);
    grow(w.q_rows_i1, rows * ldi);
    grow(w.s_rows_i0, rows * groups_i_);
    grow(w.s_rows_i1, rows * groups_i_);
    grow(w.sum_rows_i0, rows * groups_i_);
    grow(w.sum_rows_i1, rows * groups_i_);
  }
  grow(w.lora0, rows * r);
  grow(w.lora1, rows * r);
  grow(w.lora2, rows * r);
  const size_t per_thread = ScratchPerThread();
  if (w.threads < pool.num_threads() || w.thread_scratch.size() < per_thread * pool.num_threads()) {
    w.threads = std::max(w.threads, pool.num_threads());
    grow(w.thread_scratch, per_thread * w.threads);
  }
}

namespace sft_internal {

absl::Status NoCachedForward() {
  return absl::FailedPreconditionError(
      "backward without a cached forward: run forward(..., save_for_backward=True) first (each "
      "backward consumes the newest cached forward)");
}

}  // namespace sft_internal

absl::StatusOr<std::pair<int, int>> SftMoeLayer::NextBackwardShape() const {
  if (stack_.empty()) return sft_internal::NoCachedForward();
  return std::make_pair(stack_.back()->qlen, stack_.back()->k);
}

void SftMoeLayer::Route(Cache& c, int qlen, int k, const int64_t* ids) const {
  c.qlen = qlen;
  c.k = k;
  c.ids.assign(ids, ids + static_cast<size_t>(qlen) * k);
  RouteToExperts(c.ids.data(), qlen, k, config_.moe.num_experts, /*skip=*/nullptr, &c.routing);
  c.rows = static_cast<size_t>(c.routing.rows);
}

size_t SftMoeLayer::CacheBytesPerForward(int qlen) const {
  const size_t rows = static_cast<size_t>(qlen) * config_.moe.top_k;
  const size_t h = config_.moe.hidden, inter = config_.moe.intermediate, r = rank_;
  return static_cast<size_t>(qlen) * h * 2 +                  // input
         rows * (2 * inter * 4 + RowStride(inter) * 2 + h * 2 + 3 * r * 4) +  // g, u, h, y, LoRA A x
         rows * (8 + 4 + 4 + 4) + (config_.moe.num_experts + 1) * 8;  // ids, weights, routing
}

size_t SftMoeLayer::cache_bytes() const {
  // With a pool, stack_'s entries are the pool's (counted by SftCachePool::bytes) and free_ stays empty.
  // The no-save scratch entry is the workspace's (SftWorkspace::bytes).
  size_t total = 0;
  if (pool_ == nullptr) {
    for (const auto& c : stack_) total += c->bytes();
  }
  for (const auto& c : free_) total += c->bytes();
  return total;
}

SftMoeLayer::Pass SftMoeLayer::MakePass(Cache& c, bool quant) const {
  const size_t h = config_.moe.hidden, inter = config_.moe.intermediate;
  return Pass{c,
              *ws_,
              h,
              inter,
              static_cast<size_t>(rank_),
              scale_,
              quant,
              groups_h_,
              groups_i_,
              sft_internal::ColsPerTask(isa_),
              ScratchPerThread(),
              RowStride(h),
              RowStride(inter),
              c.k,
              c.qlen,
              sft_internal::RowChunks(c.routing)};
}

}  // namespace kt
