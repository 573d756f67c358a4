#include "kt/sft/sft_layer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kt/kernels/activation.h"
#include "kt/kernels/convert.h"
#include "kt/sft/lora_kernels.h"

namespace kt {
namespace {

// Work units, as in MoeLayer::Forward: column blocks of 3 panels (48 columns; the AVX512-BF16 kernel's
// register block), 8 panels (128 columns) on AMX where re-reading A rows per block is what costs; rows of
// one expert in chunks of 64 so the per-thread scratch stays small (64 x 128 x 4 B = 32 KiB per block).
constexpr size_t kPanelsPerTask = 3;
constexpr size_t kPanelsPerTaskAmx = 8;
constexpr size_t kRowChunk = 64;
// Rows per step of the LoRA-gradient pass: the fp32 copy of their x (or h) rows, 32 x H x 4 B = 256 KiB
// at H = 2048, stays in L2 while the r = 16 rows of dA_g and dA_u (2 x 128 KiB) stream past it.
constexpr size_t kGradRows = 32;

// The LoRA products themselves run in lora_kernels (per Isa). What is left here is O(rows x H) work per
// call (router gradient, weighted sums), plain loops with 8 independent partial sums that GCC vectorizes
// at -O3 without reassociating anything itself (the order is fixed by the code).
inline float Dot(const float* a, const float* b, size_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (size_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[i % 8] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline void Axpy(float alpha, const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// out[c][rr] = b[rr][c] for b [rows, cols] bf16 (a LoRA B block [cols_out, r] turned into [r, cols_out]).
inline void TransposeToF32(const bf16_t* b, size_t rows, size_t cols, float* out) {
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = 0; j < cols; ++j) out[j * rows + i] = Bf16ToF32(b[i * cols + j]);
  }
}

// Row stride, in elements, of the bf16 and int8 rows the base GEMMs read (x and grad_y rows, H wide; h,
// grad_g, grad_u rows, I wide): whole cache lines of bf16 plus one. H and I are powers of two or small
// multiples of them, so unpadded rows sit 2^n bytes apart and the 16 rows of an AMX A tile fall into one
// L1 set; MoeLayer pads its own rows the same way for that reason (PaddedStride in kt/moe/moe_layer.cc).
// One stride serves the bf16 and the int8 copy of a row (ProjInput has one ld): 2 (H + 32) or H + 32
// bytes, never a multiple of 4 KiB either.
size_t RowStride(size_t k) { return (k + 31) / 32 * 32 + 32; }

// Each layer's id for SftBackwardWeights ownership (an address could be reused by a later layer).
std::atomic<uint64_t> g_next_layer_id{1};
// Creation numbers of layers, to name a layer without layer_idx in the cache pool's errors.
std::atomic<uint64_t> g_next_creation_id{0};

}  // namespace

absl::Status ValidateSftConfig(const SftConfig& c) {
  if (absl::Status s = ValidateMoeConfig(c.moe); !s.ok()) return s;
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
  // The transposed shape; it never runs Forward, so its routing scratch is sized for one row.
  MoeConfig t;
  t.num_experts = moe.num_experts;
  t.top_k = 1;
  t.hidden = moe.intermediate;
  t.intermediate = moe.hidden;
  t.max_len = 1;
  t.group_size = moe.group_size;  // the group formats quantize W^T in groups of the same G
  absl::StatusOr<std::unique_ptr<MoeLayer>> layer = MoeLayer::Create(t, isa, format);
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
         (row_token.capacity() + token_slot_row.capacity() + expert_begin.capacity() + active.capacity()) * 4;
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
  // The layer's own forward scratch is never used (SFT gathers into the workspace): one row.
  MoeConfig base = config.moe;
  base.max_len = 1;
  base.top_k = 1;
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(base, isa, format);
  if (!moe.ok()) return moe.status();
  l->base_ = std::move(*moe);
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

absl::Status SftMoeLayer::EnsureBackwardWeights(ThreadPool& pool) {
  SftBackwardWeights& w = *bwd_;
  if (w.owner_ == this && w.owner_version_ == weights_version_) return absl::OkStatus();
  w.owner_ = nullptr;  // a failure below leaves no owner, so the next call rebuilds
  const size_t e_count = config_.moe.num_experts;
  std::vector<absl::Status> failures(e_count * 3);
  // One buffer per thread for the quantized formats' transposed bf16, reused by its tasks and kept with the
  // backward weights between rebuilds (a fresh one per task or per rebuild would be page-faulted and
  // zeroed each time: 3 MiB per Qwen3-30B projection).
  const size_t max_elems = static_cast<size_t>(config_.moe.hidden) * config_.moe.intermediate;
  const size_t threads = static_cast<size_t>(pool.num_threads());
  if (w.transposed_.size() < threads) w.transposed_.resize(threads);
  pool.ParallelFor(e_count * 3, [&](size_t task, int thread) {
    const int slot = static_cast<int>(task / 3);
    const auto proj = static_cast<ExpertProj>(task % 3);
    if (base_->format() == ExpertFormat::kBf16) {
      // bf16 transposes packed to packed: each 512-byte block of the forward panels is one 512-byte block
      // of the backward ones, read and written once (about half the time of unpacking, transposing and
      // packing again; docs/perf-log/2026-11-27-session-10.md).
      failures[task] = w.t_->LoadExpertTransposed(slot, proj, *base_);
      return;
    }
    // Quantized formats dequantize straight into the transposed order (one pass over the packed weights;
    // a panel block is a few runs of 16 consecutive values of W^T), then quantize again per row of W^T.
    // (A row-major unpack followed by a tiled transpose would take over half of an int8 rebuild.)
    std::vector<bf16_t>& wt = w.transposed_[thread];
    wt.resize(max_elems);
    failures[task] = base_->UnpackExpertTransposed(slot, proj, wt.data());
    if (!failures[task].ok()) return;
    // The transposed layer's projection of the same name is this one transposed.
    failures[task] = w.t_->LoadExpert(slot, proj, wt.data());
  });
  for (const absl::Status& s : failures) {
    if (!s.ok()) return s;
  }
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
  const size_t cpt = (isa_ == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask) * kPanelRows;
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

namespace {

absl::Status NoCachedForward() {
  return absl::FailedPreconditionError(
      "backward without a cached forward: run forward(..., save_for_backward=True) first (each "
      "backward consumes the newest cached forward)");
}

}  // namespace

void SftMoeLayer::Route(Cache& c, int qlen, int k, const int64_t* ids) const {
  const int e_count = config_.moe.num_experts;
  c.qlen = qlen;
  c.k = k;
  c.ids.assign(ids, ids + static_cast<size_t>(qlen) * k);
  std::vector<int> count(e_count, 0);
  auto valid = [&](int64_t id) { return id >= 0 && id < e_count; };
  for (int64_t id : c.ids) {
    if (valid(id)) ++count[id];
  }
  c.expert_begin.assign(e_count + 1, 0);
  c.active.clear();
  for (int e = 0; e < e_count; ++e) {
    c.expert_begin[e + 1] = c.expert_begin[e] + count[e];
    if (count[e] > 0) c.active.push_back(e);
  }
  c.rows = c.expert_begin[e_count];
  c.row_token.resize(c.rows);
  c.token_slot_row.assign(c.ids.size(), -1);
  for (int e = 0; e < e_count; ++e) count[e] = c.expert_begin[e];
  for (size_t tj = 0; tj < c.ids.size(); ++tj) {
    if (!valid(c.ids[tj])) continue;
    const int row = count[c.ids[tj]]++;
    c.token_slot_row[tj] = row;
    c.row_token[row] = static_cast<int>(tj);  // (token, slot) index; token = tj / k
  }
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

absl::Status SftMoeLayer::Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids,
                                  const float* weights, const bf16_t* input, bf16_t* output,
                                  bool save_for_backward) {
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
  if (qlen == 0) {  // An empty batch: an empty entry for its backward, nothing to compute.
    if (save_for_backward) Route(PushEntry(), 0, k, ids);
    return absl::OkStatus();
  }
  EnsureWorkspace(pool);
  Cache& c = save_for_backward ? PushEntry() : ScratchEntry();
  SftWorkspace& w = *ws_;
  const size_t h = config_.moe.hidden, inter = config_.moe.intermediate, r = rank_;
  const float s = scale_;
  const bool quant = base_->quantized_activations();
  const size_t gh = groups_h_, gi = groups_i_;  // activation scales per quantized row (H- / I-wide)
  const size_t cpt = (isa_ == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask) * kPanelRows;
  const size_t scratch = ScratchPerThread();
  const size_t ldh = RowStride(h), ldi = RowStride(inter);  // x rows (bf16 and int8); h rows

  Route(c, qlen, k, ids);
  c.weights.assign(weights, weights + static_cast<size_t>(qlen) * k);
  c.input.assign(input, input + static_cast<size_t>(qlen) * h);
  const size_t rows = c.rows;
  c.g.resize(rows * inter);
  c.u.resize(rows * inter);
  c.h.resize(rows * ldi);
  c.y.resize(save_for_backward ? rows * h : 0);
  c.ax_g.resize(rows * r);
  c.ax_u.resize(rows * r);
  c.ah.resize(rows * r);
  auto x_row = [&](size_t row) {
    return c.input.data() + static_cast<size_t>(c.row_token[row] / k) * h;
  };

  // Tasks over (expert, chunk of kRowChunk rows).
  std::vector<std::pair<int, int>> chunks;  // (expert, first row)
  for (int e : c.active) {
    for (int r0 = c.expert_begin[e]; r0 < c.expert_begin[e + 1]; r0 += kRowChunk) chunks.push_back({e, r0});
  }
  auto chunk_end = [&](const std::pair<int, int>& ch) {
    return std::min<size_t>(c.expert_begin[ch.first + 1], ch.second + kRowChunk);
  };

  if (rows > 0) {
    // 1. Gather x rows (bf16, or quantized for the integer kernels) and LoRA A products A_g x, A_u x.
    pool.ParallelFor(chunks.size(), [&](size_t task, int thread) {
      const int e = chunks[task].first;
      const size_t r0 = chunks[task].second, r1 = chunk_end(chunks[task]);
      for (size_t row = r0; row < r1; ++row) {
        const bf16_t* x = x_row(row);
        if (quant) {
          base_->PrepareRow(ExpertProj::kGate, x, w.q_rows_h.data() + row * ldh,
                            w.s_rows_h.data() + row * gh, w.sum_rows_h.data() + row * gh);
        }
        // The bf16 rows: what the bf16 GEMM reads, and the LoRA product's contiguous operand.
        if (!quant || r > 0) std::memcpy(w.rows_h.data() + row * ldh, x, h * sizeof(bf16_t));
      }
      if (r == 0) return;
      // A x as dot products of the gathered rows with A's rows (both along H: no transposed copy). A in
      // fp32 per task: 2 r H conversions against 4 r H multiply-adds per row of the chunk.
      float* ag = w.thread_scratch.data() + thread * scratch;
      float* au = ag + r * h;
      ConvertBf16ToF32(isa_, lora_.gate_a + e * r * h, ag, r * h);
      ConvertBf16ToF32(isa_, lora_.up_a + e * r * h, au, r * h);
      const bf16_t* xr = w.rows_h.data() + r0 * ldh;
      LoraGemmNT(isa_, r1 - r0, r, h, 1.0f, xr, ldh, ag, h, c.ax_g.data() + r0 * r, r, false);
      LoraGemmNT(isa_, r1 - r0, r, h, 1.0f, xr, ldh, au, h, c.ax_u.data() + r0 * r, r, false);
    });

    // 2. g = W_g x + s B_g (A_g x), u likewise, then h = bf16(silu(g) u), by column blocks of I.
    const size_t inter_blocks = (inter + cpt - 1) / cpt;
    pool.ParallelFor(c.active.size() * inter_blocks, [&](size_t task, int thread) {
      const int e = c.active[task / inter_blocks];
      const size_t c0 = (task % inter_blocks) * cpt;
      const size_t cols = std::min(cpt, inter - c0);
      // B_g, B_u rows c0..c0+cols transposed to [r, cols]: the LoRA term of a row is then r axpys of
      // length cols (vectorized), not cols dot products of length r (a horizontal sum per element, which
      // makes the LoRA term cost a large share of the forward).
      float* bg = w.thread_scratch.data() + thread * scratch;
      float* bu = bg + r * cpt;
      TransposeToF32(lora_.gate_b + (e * inter + c0) * r, cols, r, bg);
      TransposeToF32(lora_.up_b + (e * inter + c0) * r, cols, r, bu);
      const size_t rb = c.expert_begin[e], re = c.expert_begin[e + 1];
      for (size_t r0 = rb; r0 < re; r0 += kRowChunk) {
        const size_t m = std::min(kRowChunk, re - r0);
        MoeLayer::ProjInput in;
        in.ld = ldh;
        in.x = w.rows_h.data() + r0 * ldh;
        if (quant) {
          in.qx = w.q_rows_h.data() + r0 * ldh;
          in.sx = w.s_rows_h.data() + r0 * gh;
          in.xsum = w.sum_rows_h.data() + r0 * gh;
        }
        base_->ProjectBlock(ExpertProj::kGate, e, c0, cols, in, m, c.g.data() + r0 * inter + c0, inter);
        base_->ProjectBlock(ExpertProj::kUp, e, c0, cols, in, m, c.u.data() + r0 * inter + c0, inter);
        if (r > 0) {
          // [m, cols] += s [m, r] [r, cols]
          LoraGemm(isa_, m, cols, r, s, c.ax_g.data() + r0 * r, r, 1, bg, cols, c.g.data() + r0 * inter + c0,
                   inter, true);
          LoraGemm(isa_, m, cols, r, s, c.ax_u.data() + r0 * r, r, 1, bu, cols, c.u.data() + r0 * inter + c0,
                   inter, true);
        }
        for (size_t row = r0; row < r0 + m; ++row) {
          SiluMulToBf16(isa_, c.g.data() + row * inter + c0, c.u.data() + row * inter + c0,
                        c.h.data() + row * ldi + c0, cols);
        }
      }
    });

    // 3. Quantize h rows for the integer kernels; LoRA A_d h.
    if (quant || r > 0) {
      pool.ParallelFor(chunks.size(), [&](size_t task, int thread) {
        const int e = chunks[task].first;
        const size_t r0 = chunks[task].second, r1 = chunk_end(chunks[task]);
        if (quant) {
          for (size_t row = r0; row < r1; ++row) {
            base_->PrepareRow(ExpertProj::kDown, c.h.data() + row * ldi, w.q_rows_i0.data() + row * ldi,
                              w.s_rows_i0.data() + row * gi, w.sum_rows_i0.data() + row * gi);
          }
        }
        if (r == 0) return;
        float* ad = w.thread_scratch.data() + thread * scratch;  // A_d [r, I] fp32
        ConvertBf16ToF32(isa_, lora_.down_a + e * r * inter, ad, r * inter);
        LoraGemmNT(isa_, r1 - r0, r, inter, 1.0f, c.h.data() + r0 * ldi, ldi, ad, inter,
                   c.ah.data() + r0 * r, r, false);
      });
    }

    // 4. y = W_d h + s B_d (A_d h), by column blocks of H; kept as bf16 for the router gradient.
    const size_t hidden_blocks = (h + cpt - 1) / cpt;
    pool.ParallelFor(c.active.size() * hidden_blocks, [&](size_t task, int thread) {
      const int e = c.active[task / hidden_blocks];
      const size_t c0 = (task % hidden_blocks) * cpt;
      const size_t cols = std::min(cpt, h - c0);
      float* bd = w.thread_scratch.data() + thread * scratch;  // B_d rows c0.. transposed, [r, cols]
      TransposeToF32(lora_.down_b + (e * h + c0) * r, cols, r, bd);
      const size_t r0 = c.expert_begin[e], m = c.expert_begin[e + 1] - r0;
      MoeLayer::ProjInput in;
      in.ld = ldi;
      in.x = c.h.data() + r0 * ldi;
      if (quant) {
        in.qx = w.q_rows_i0.data() + r0 * ldi;
        in.sx = w.s_rows_i0.data() + r0 * gi;
        in.xsum = w.sum_rows_i0.data() + r0 * gi;
      }
      float* y0 = w.f_rows_h.data() + r0 * h + c0;
      base_->ProjectBlock(ExpertProj::kDown, e, c0, cols, in, m, y0, h);
      if (r > 0) LoraGemm(isa_, m, cols, r, s, c.ah.data() + r0 * r, r, 1, bd, cols, y0, h, true);
      if (save_for_backward) {
        for (size_t i = 0; i < m; ++i) {
          ConvertF32ToBf16(isa_, y0 + i * h, c.y.data() + (r0 + i) * h + c0, cols);
        }
      }
    });
  }

  // 5. out_t = bf16(sum_j w_tj y_tj) in fp32.
  pool.ParallelFor((static_cast<size_t>(qlen) + 7) / 8, [&](size_t task, int thread) {
    float* acc = w.thread_scratch.data() + thread * scratch;
    const size_t t1 = std::min<size_t>(qlen, (task + 1) * 8);
    for (size_t t = task * 8; t < t1; ++t) {
      std::fill(acc, acc + h, 0.0f);
      for (int j = 0; j < k; ++j) {
        const int row = c.token_slot_row[t * k + j];
        if (row < 0) continue;
        Axpy(weights[t * k + j], w.f_rows_h.data() + static_cast<size_t>(row) * h, acc, h);
      }
      ConvertF32ToBf16(isa_, acc, output + t * h, h);
    }
  });
  return absl::OkStatus();
}

absl::StatusOr<std::pair<int, int>> SftMoeLayer::NextBackwardShape() const {
  if (stack_.empty()) return NoCachedForward();
  return std::make_pair(stack_.back()->qlen, stack_.back()->k);
}

absl::Status SftMoeLayer::Backward(ThreadPool& pool, const bf16_t* grad_output, bf16_t* grad_input,
                                   float* grad_weights, bool accumulate, float grad_scale) {
  if (stack_.empty()) return NoCachedForward();
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
  SftWorkspace& w = *ws_;
  const MoeLayer& t = *bwd_->t_;
  const int k = c.k, qlen = c.qlen;
  const size_t h = config_.moe.hidden, inter = config_.moe.intermediate, r = rank_;
  const size_t e_count = config_.moe.num_experts;
  const float s = scale_;
  const bool quant = t.quantized_activations();
  const size_t gh = groups_h_, gi = groups_i_;  // t's down reads H-wide grad_y, its gate/up I-wide rows
  const size_t cpt = (isa_ == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask) * kPanelRows;
  const size_t scratch = ScratchPerThread();
  const size_t rows = c.rows;
  const size_t ldh = RowStride(h), ldi = RowStride(inter);  // grad_y rows; grad_g, grad_u and h rows

  std::vector<std::pair<int, int>> chunks;
  for (int e : c.active) {
    for (int r0 = c.expert_begin[e]; r0 < c.expert_begin[e + 1]; r0 += kRowChunk) chunks.push_back({e, r0});
  }
  auto chunk_end = [&](const std::pair<int, int>& ch) {
    return std::min<size_t>(c.expert_begin[ch.first + 1], ch.second + kRowChunk);
  };
  std::fill(grad_weights, grad_weights + static_cast<size_t>(qlen) * k, 0.0f);
  bf16_t* dy_b = w.rows_h.data();  // [rows, ldh] grad_y = w_tj grad_out_t, bf16
  float* dyB = w.lora0.data();     // [rows, r] grad_y B_d
  float* dgB = w.lora1.data();     // [rows, r] grad_g B_g
  float* duB = w.lora2.data();     // [rows, r] grad_u B_u
  bf16_t* dg_b = w.rows_i0.data();
  bf16_t* du_b = w.rows_i1.data();
  float* gx = w.f_rows_h.data();   // [rows, H] grad_x per row

  if (rows > 0) {
    // 1. grad_y rows, the router gradient <grad_out_t, y_tj>, and grad_y B_d.
    pool.ParallelFor(chunks.size(), [&](size_t task, int thread) {
      const int e = chunks[task].first;
      const size_t r0 = chunks[task].second, r1 = chunk_end(chunks[task]);
      float* bd = w.thread_scratch.data() + thread * scratch;  // B_d [H, r] fp32
      float* go = bd + h * r;
      float* yf = go + h;
      for (size_t row = r0; row < r1; ++row) {
        const size_t tj = c.row_token[row];
        ConvertBf16ToF32(isa_, grad_output + (tj / k) * h, go, h);
        ConvertBf16ToF32(isa_, c.y.data() + row * h, yf, h);
        grad_weights[tj] = Dot(go, yf, h);
        const float wt = c.weights[tj];
        bf16_t* dy = dy_b + row * ldh;
        for (size_t i = 0; i < h; ++i) dy[i] = F32ToBf16(wt * go[i]);
        if (quant) {
          t.PrepareRow(ExpertProj::kDown, dy, w.q_rows_h.data() + row * ldh, w.s_rows_h.data() + row * gh,
                       w.sum_rows_h.data() + row * gh);
        }
      }
      if (r == 0) return;
      // grad_y B_d from the bf16 grad_y rows the base GEMM reads too: [m, r] = [m, H] [H, r].
      ConvertBf16ToF32(isa_, lora_.down_b + e * h * r, bd, h * r);
      LoraGemm(isa_, r1 - r0, r, h, 1.0f, dy_b + r0 * ldh, ldh, 1, bd, r, dyB + r0 * r, r, false);
    });

    // 2. grad_h = grad_y W_d + s (grad_y B_d) A_d, then grad_g and grad_u, by column blocks of I.
    const size_t inter_blocks = (inter + cpt - 1) / cpt;
    pool.ParallelFor(c.active.size() * inter_blocks, [&](size_t task, int thread) {
      const int e = c.active[task / inter_blocks];
      const size_t c0 = (task % inter_blocks) * cpt;
      const size_t cols = std::min(cpt, inter - c0);
      float* dh = w.thread_scratch.data() + thread * scratch;
      float* ad = dh + kRowChunk * cpt;  // A_d[:, c0:c0+cols], [r, cols]
      for (size_t i = 0; i < r; ++i) {
        ConvertBf16ToF32(isa_, lora_.down_a + (e * r + i) * inter + c0, ad + i * cols, cols);
      }
      const size_t rb = c.expert_begin[e], re = c.expert_begin[e + 1];
      for (size_t r0 = rb; r0 < re; r0 += kRowChunk) {
        const size_t m = std::min(kRowChunk, re - r0);
        MoeLayer::ProjInput in;
        in.ld = ldh;
        in.x = dy_b + r0 * ldh;
        if (quant) {
          in.qx = w.q_rows_h.data() + r0 * ldh;
          in.sx = w.s_rows_h.data() + r0 * gh;
          in.xsum = w.sum_rows_h.data() + r0 * gh;
        }
        t.ProjectBlock(ExpertProj::kDown, e, c0, cols, in, m, dh, cpt);
        if (r > 0) LoraGemm(isa_, m, cols, r, s, dyB + r0 * r, r, 1, ad, cols, dh, cpt, true);
        for (size_t i = 0; i < m; ++i) {
          const size_t at = (r0 + i) * inter + c0, bt = (r0 + i) * ldi + c0;
          SiluBackwardToBf16(isa_, dh + i * cpt, c.g.data() + at, c.u.data() + at, dg_b + bt, du_b + bt,
                             cols);
        }
      }
    });

    // 3. Quantize grad_g, grad_u rows for the integer kernels; grad_g B_g and grad_u B_u.
    if (quant || r > 0) {
      pool.ParallelFor(chunks.size(), [&](size_t task, int thread) {
        const int e = chunks[task].first;
        const size_t r0 = chunks[task].second, r1 = chunk_end(chunks[task]);
        for (size_t row = r0; quant && row < r1; ++row) {
          t.PrepareRow(ExpertProj::kGate, dg_b + row * ldi, w.q_rows_i0.data() + row * ldi,
                       w.s_rows_i0.data() + row * gi, w.sum_rows_i0.data() + row * gi);
          t.PrepareRow(ExpertProj::kUp, du_b + row * ldi, w.q_rows_i1.data() + row * ldi,
                       w.s_rows_i1.data() + row * gi, w.sum_rows_i1.data() + row * gi);
        }
        if (r == 0) return;
        float* bg = w.thread_scratch.data() + thread * scratch;  // B_g [I, r] fp32
        float* bu = bg + inter * r;
        ConvertBf16ToF32(isa_, lora_.gate_b + e * inter * r, bg, inter * r);
        ConvertBf16ToF32(isa_, lora_.up_b + e * inter * r, bu, inter * r);
        LoraGemm(isa_, r1 - r0, r, inter, 1.0f, dg_b + r0 * ldi, ldi, 1, bg, r, dgB + r0 * r, r, false);
        LoraGemm(isa_, r1 - r0, r, inter, 1.0f, du_b + r0 * ldi, ldi, 1, bu, r, duB + r0 * r, r, false);
      });
    }

    // 4. grad_x rows = grad_g W_g + grad_u W_u + s ((grad_g B_g) A_g + (grad_u B_u) A_u), by column blocks
    //    of H.
    const size_t hidden_blocks = (h + cpt - 1) / cpt;
    pool.ParallelFor(c.active.size() * hidden_blocks, [&](size_t task, int thread) {
      const int e = c.active[task / hidden_blocks];
      const size_t c0 = (task % hidden_blocks) * cpt;
      const size_t cols = std::min(cpt, h - c0);
      float* tmp = w.thread_scratch.data() + thread * scratch;
      float* ag = tmp + kRowChunk * cpt;  // A_g[:, c0:c0+cols], [r, cols]
      float* au = ag + r * cols;
      for (size_t i = 0; i < r; ++i) {
        ConvertBf16ToF32(isa_, lora_.gate_a + (e * r + i) * h + c0, ag + i * cols, cols);
        ConvertBf16ToF32(isa_, lora_.up_a + (e * r + i) * h + c0, au + i * cols, cols);
      }
      const size_t rb = c.expert_begin[e], re = c.expert_begin[e + 1];
      for (size_t r0 = rb; r0 < re; r0 += kRowChunk) {
        const size_t m = std::min(kRowChunk, re - r0);
        MoeLayer::ProjInput ing, inu;
        ing.ld = inu.ld = ldi;
        ing.x = dg_b + r0 * ldi;
        inu.x = du_b + r0 * ldi;
        if (quant) {
          ing.qx = w.q_rows_i0.data() + r0 * ldi;
          ing.sx = w.s_rows_i0.data() + r0 * gi;
          ing.xsum = w.sum_rows_i0.data() + r0 * gi;
          inu.qx = w.q_rows_i1.data() + r0 * ldi;
          inu.sx = w.s_rows_i1.data() + r0 * gi;
          inu.xsum = w.sum_rows_i1.data() + r0 * gi;
        }
        float* out = gx + r0 * h + c0;
        t.ProjectBlock(ExpertProj::kGate, e, c0, cols, ing, m, out, h);
        t.ProjectBlock(ExpertProj::kUp, e, c0, cols, inu, m, tmp, cpt);
        for (size_t i = 0; i < m; ++i) Axpy(1.0f, tmp + i * cpt, out + i * h, cols);
        if (r > 0) {
          LoraGemm(isa_, m, cols, r, s, dgB + r0 * r, r, 1, ag, cols, out, h, true);
          LoraGemm(isa_, m, cols, r, s, duB + r0 * r, r, 1, au, cols, out, h, true);
        }
      }
    });
  }

  // 5. The six LoRA gradients, one expert per task (experts without rows: zeros, or unchanged when
  //    accumulating).
  if (r > 0) {
    pool.ParallelFor(e_count, [&](size_t e, int thread) {
      const size_t rb = c.expert_begin[e], re = c.expert_begin[e + 1];
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
      float* ga = w.thread_scratch.data() + thread * scratch;  // [r, H]
      float* gb = ga + r * h;                                   // [I, r]
      float* ua = gb + inter * r;                               // [r, H]
      float* ub = ua + r * h;                                   // [I, r]
      float* da = ub + inter * r;                               // [r, I]
      float* db = da + r * inter;                               // [H, r]
      float* rows_f = db + h * r;  // [kGradRows, H or I]: fp32 x rows, then h rows
      std::fill(ga, rows_f, 0.0f);
      // Each product is a small GEMM over kGradRows rows with the row index as its inner dimension: the
      // [rows, r] factors (grad B, A x) are read transposed through LoraGemm's strides, and grad_g, grad_u,
      // grad_y straight from their bf16 rows.
      for (size_t r0 = rb; r0 < re; r0 += kGradRows) {
        const size_t m = std::min(kGradRows, re - r0);
        for (size_t i = 0; i < m; ++i) {
          ConvertBf16ToF32(isa_, c.input.data() + (c.row_token[r0 + i] / k) * h, rows_f + i * h, h);
        }
        // gate/up A: s (grad B)^T x, [r, H] += s [r, m] [m, H]
        LoraGemm(isa_, r, h, m, s, dgB + r0 * r, 1, r, rows_f, h, ga, h, true);
        LoraGemm(isa_, r, h, m, s, duB + r0 * r, 1, r, rows_f, h, ua, h, true);
        // gate/up B: s grad^T (A x), [I, r] += s [I, m] [m, r]
        LoraGemm(isa_, inter, r, m, s, dg_b + r0 * ldi, 1, ldi, c.ax_g.data() + r0 * r, r, gb, r, true);
        LoraGemm(isa_, inter, r, m, s, du_b + r0 * ldi, 1, ldi, c.ax_u.data() + r0 * r, r, ub, r, true);
        // down A: s (grad_y B_d)^T h, [r, I]; down B: s grad_y^T (A_d h), [H, r]
        for (size_t i = 0; i < m; ++i) {
          ConvertBf16ToF32(isa_, c.h.data() + (r0 + i) * ldi, rows_f + i * inter, inter);
        }
        LoraGemm(isa_, r, inter, m, s, dyB + r0 * r, 1, r, rows_f, inter, da, inter, true);
        LoraGemm(isa_, h, r, m, s, dy_b + r0 * ldh, 1, ldh, c.ah.data() + r0 * r, r, db, r, true);
      }
      const float* src[6] = {ga, gb, ua, ub, da, db};
      for (int p = 0; p < 6; ++p) {
        bf16_t* dst = outs[p].dst;
        for (size_t i = 0; i < outs[p].n; ++i) {
          const float v = grad_scale * src[p][i];
          dst[i] = F32ToBf16(accumulate ? Bf16ToF32(dst[i]) + v : v);
        }
      }
    });
  }

  // 6. grad_input_t = sum_j grad_x rows of t, one rounding to bf16.
  pool.ParallelFor((static_cast<size_t>(qlen) + 7) / 8, [&](size_t task, int thread) {
    float* acc = w.thread_scratch.data() + thread * scratch;
    const size_t t1 = std::min<size_t>(qlen, (task + 1) * 8);
    for (size_t tok = task * 8; tok < t1; ++tok) {
      std::fill(acc, acc + h, 0.0f);
      for (int j = 0; j < k; ++j) {
        const int row = c.token_slot_row[tok * k + j];
        if (row >= 0) Axpy(1.0f, gx + static_cast<size_t>(row) * h, acc, h);
      }
      ConvertF32ToBf16(isa_, acc, grad_input + tok * h, h);
    }
  });
  ReleaseEntry(std::move(owned));
  return absl::OkStatus();
}

}  // namespace kt
