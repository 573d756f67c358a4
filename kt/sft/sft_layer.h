// The SFT engine of one MoE layer: forward with LoRA and an activation cache, backward producing the input
// gradient, the router gradient and the six LoRA gradients, over frozen base weights (kt/sft/README.md
// has the math; sft_reference.h is its plain double-precision version).
//
// Base-weight GEMMs (97% of the flops at rank 16 for Qwen3-30B-A3B) run on kt/moe's packed expert storage
// (PackedExperts::ProjectBlock), so every kernel path and weight format of kt/moe serves SFT too. The layer
// owns its forward weights as one PackedExperts. Backward needs the transposed base weights
// (grad_h = grad_y W_d, grad_x = grad_g W_g + grad_u W_u): they live in an SftBackwardWeights, a second
// PackedExperts of the transposed shape (hidden and intermediate swapped: its gate/up are W_g^T, W_u^T
// [H, I] and its down is W_d^T [I, H]) in the same format. A layer owns one, or several layers share one
// (share_backward_bb): it is rebuilt from the forward weights of whichever layer runs backward (the
// format's packed transpose, or UnpackExpertTransposed and packed again), so only one layer's transposed
// copy exists at a time.
//
// LoRA tensors are the caller's bf16 arrays, read in place at every call (an optimizer step on them is
// seen by the next forward; nothing to repack). The LoRA GEMMs (rank r = 16) are 3% of the flops and run
// in fp32 through lora_kernels.h on the layer's Isa.
//
// Activation caches live per layer by default; with share_cache_pool one SftCachePool serves all layers of
// a model (see SftCachePool): valid only under activation recomputation, when one layer's cache is alive at
// a time.
//
// Thread safety: one call at a time per layer and per shared SftWorkspace/SftBackwardWeights/SftCachePool.
#ifndef KT_SFT_SFT_LAYER_H_
#define KT_SFT_SFT_LAYER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/expert_pipeline.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/packed_experts.h"
#include "kt/moe/routing.h"
#include "kt/runtime/memory.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

struct SftConfig {
  MoeConfig moe;             // E, k, H, I and max_len (largest qlen of one forward)
  int lora_rank = 16;        // r; ignored with skip_lora
  float lora_alpha = 32.0f;  // s = lora_alpha / lora_rank
  int max_cache_depth = 1;   // forwards with save_for_backward that may wait for their backward
  bool skip_lora = false;    // SkipLoRA: no LoRA in forward, backward gives grad_input and grad_weights only
  int layer_idx = -1;        // the model's layer number, for error messages only (-1: not given)
};

absl::Status ValidateSftConfig(const SftConfig& config);

// The caller's LoRA tensors (PEFT orientation, bf16, row-major), read in place:
// A_gate, A_up [E, r, H]; B_gate, B_up [E, I, r]; A_down [E, r, I]; B_down [E, H, r]; grads alike.
struct SftLoraTensors {
  const bf16_t *gate_a = nullptr, *gate_b = nullptr, *up_a = nullptr, *up_b = nullptr,
               *down_a = nullptr, *down_b = nullptr;
  bf16_t *grad_gate_a = nullptr, *grad_gate_b = nullptr, *grad_up_a = nullptr, *grad_up_b = nullptr,
         *grad_down_a = nullptr, *grad_down_b = nullptr;
};

// The transposed base weights backward multiplies by, for one layer at a time (see the file comment).
class SftBackwardWeights {
 public:
  // For layers of shape `moe` (E, H, I) in `format` on path `isa`.
  static absl::StatusOr<std::shared_ptr<SftBackwardWeights>> Create(const MoeConfig& moe, Isa isa,
                                                                    ExpertFormat format);
  size_t bytes() const { return t_->weight_bytes(); }

 private:
  friend class SftMoeLayer;
  SftBackwardWeights() = default;
  std::unique_ptr<PackedExperts> t_;  // transposed shape: gate/up W^T [H, I], down W_d^T [I, H]
  const void* owner_ = nullptr;   // the layer whose weights t_ holds (nullptr: none yet)
  uint64_t owner_version_ = 0;    // that layer's weights version when t_ was built
  MoeConfig shape_;
  ExpertFormat format_ = ExpertFormat::kBf16;
  Isa isa_ = Isa::kScalar;
  // Quantized formats: one transposed-unpack buffer (H x I bf16) per pool thread, kept between rebuilds
  // (not in bytes()): allocating it per rebuild page-faulted and zeroed it every time a layer took the
  // shared copy over.
  std::vector<std::vector<bf16_t>> transposed_;
};

// What one Forward(save_for_backward = true) keeps for its Backward. Internal to SftMoeLayer (declared
// here because SftCachePool holds entries of it); every buffer is sized at each forward (grow-only), so an
// entry serves any layer shape.
struct SftForwardCache {
  int qlen = 0, k = 0;
  size_t rows = 0;
  std::vector<int64_t> ids;
  std::vector<float> weights;
  template <typename T>
  using Buf = std::vector<T, ArrayAllocator<T>>;  // large ones on huge pages (kt/runtime/memory.h)
  Buf<bf16_t> input;               // [qlen, H]
  ExpertRouting routing;           // rows by expert; a row's (token, slot) index is routing.row_slot[row]
  Buf<float> g, u;                 // [rows, I] gate and up outputs (LoRA included)
  Buf<bf16_t> h;                   // [rows, ldi] bf16(silu(g) u), what the down GEMM read
  Buf<bf16_t> y;                   // [rows, H] expert outputs (LoRA included), for grad_weights
  Buf<float> ax_g, ax_u, ah;       // [rows, r] A_g x, A_u x, A_d h
  size_t bytes() const;            // capacity of every buffer
};

// Working memory of forward and backward (gathered rows, GEMM outputs), sized for max_len * k rows and
// grown on demand. Nothing in it outlives a call, so all layers of a model may share one. The bf16 and
// int8 rows the base GEMMs read are padded to ldh = RowStride(H), ldi = RowStride(I) elements (a cache
// line more than H, I: sft_layer.cc says why).
class SftWorkspace {
 public:
  SftWorkspace() = default;
  size_t bytes() const;

 private:
  friend class SftMoeLayer;
  template <typename T>
  using Buf = std::vector<T, ArrayAllocator<T>>;  // large ones on huge pages (kt/runtime/memory.h)
  Buf<bf16_t> rows_h;     // [rows, ldh]: forward gathered x; backward grad_y (bf16)
  Buf<int8_t> q_rows_h;   // quantized formats: the same rows quantized [rows, ldh]
  Buf<float> s_rows_h;    //   and their scales [rows][groups of H] (1 group unless a group format)
  Buf<int32_t> sum_rows_h;  //   and their int32 group sums [rows][groups of H] (the int4 kernels' zero
                            //   point term; kept for every quantized format so row offsets stay simple)
  Buf<float> f_rows_h;    // [rows, H] fp32: forward y; backward grad_x rows
  Buf<bf16_t> rows_i0;    // [rows, ldi]: backward grad_g (bf16)
  Buf<bf16_t> rows_i1;    // [rows, ldi]: backward grad_u (bf16)
  Buf<int8_t> q_rows_i0, q_rows_i1;  // quantized formats [rows, ldi]: forward h / backward grad_g, grad_u
  Buf<float> s_rows_i0, s_rows_i1;      // [rows][groups of I]
  Buf<int32_t> sum_rows_i0, sum_rows_i1;  // [rows][groups of I]
  Buf<float> lora0, lora1, lora2;  // [rows, r]: backward grad_y B_d, grad_g B_g, grad_u B_u
  Buf<float> thread_scratch;       // per thread, ScratchPerThread floats
  // The cache entry of a forward without save_for_backward (e.g. the first, no-grad forward of every layer
  // under activation recomputation): nothing in it outlives the call, so one serves every layer sharing
  // the workspace (one per layer would be 265 MiB each on Qwen3-30B at qlen 4096, 12.4 GiB for 48 layers).
  SftForwardCache scratch;
  int threads = 0;
};

// Where a layer's last Forward and Backward spent their time, for benchmarks (//tools:sft_benchmark prints
// it beside its totals). Wall seconds, except the backward's task kinds: their tasks run mixed in one task
// list (sft_backward.cc), so each is its thread-seconds summed over the pool's threads divided by the
// thread count, i.e. its share of the backward's wall time.
struct SftTimes {
  double forward = 0;    // the last Forward (wall)
  double backward = 0;   // the last Backward (wall), a rebuild of the backward weights included
  // Rebuild of shared backward weights taken over from another layer (0 when none ran): the serial
  // phase's wall time, or, overlapped, its tasks' share.
  double rebuild = 0;
  bool rebuild_overlapped = false;
  // Shares of the backward's tasks: grad_y rows (and grad_y B_d); grad_h -> grad_g, grad_u through W_d^T;
  // their preparation (int8 rows, grad B products); grad_x through W_g^T, W_u^T; the six LoRA gradients;
  // spinning on a task's inputs.
  double grad_y = 0, grad_gate_up = 0, prepare = 0, grad_x = 0, lora_grads = 0, wait = 0;
  double sum = 0;        // grad_input's per-token sum (wall)
};

class SftMoeLayer;

// share_cache_pool: one store of activation caches for several layers, holding at most max_cache_depth
// cached forwards in total, whichever layers they belong to. Per-layer caches cost
// layers x max_cache_depth x (cache of one forward); a pool costs max_cache_depth x (cache of one forward)
// for the whole model (Qwen3-30B-A3B, 48 layers, qlen 4096, depth 1: 48 x 393 MiB = 18.4 GiB -> 393 MiB).
// That is only valid when one layer's caches are alive at a time: activation recomputation, where layer
// L's recompute forward is directly followed by layer L's backward, then layer L-1's. Plain training
// (all forwards, then all backwards) needs per-layer caches; a pooled forward that would exceed the pool
// is FailedPrecondition naming the layers holding its entries, and changes nothing.
//
// Each layer still pops only its own entries (LIFO per layer); an entry popped by a backward goes back to
// the pool with its buffers. Entries are sized per use and grow to the largest forward they served, so
// layers of different shapes may share a pool (each layer's max_cache_depth must equal the pool's).
// Forwards without save_for_backward use the workspace's scratch entry (SftWorkspace::scratch), pool or not.
// Thread safety: one call at a time over all layers sharing the pool (as SftWorkspace).
class SftCachePool {
 public:
  static absl::StatusOr<std::shared_ptr<SftCachePool>> Create(int max_cache_depth);
  int max_cache_depth() const { return max_depth_; }
  int live() const { return static_cast<int>(holders_.size()); }  // entries held by layers' stacks
  // Bytes of every entry: held by layers and free for reuse.
  size_t bytes() const;

 private:
  friend class SftMoeLayer;
  explicit SftCachePool(int max_cache_depth) : max_depth_(max_cache_depth) {}
  int max_depth_;
  // The layer and entry of each live entry, oldest first (the entries themselves are on the layers'
  // stacks; a layer hands its entries back when popped or destroyed, and keeps the pool alive).
  std::vector<std::pair<const SftMoeLayer*, const SftForwardCache*>> holders_;
  std::vector<std::unique_ptr<SftForwardCache>> free_;
};

class SftMoeLayer {
 public:
  // `backward_weights` and `workspace` may be shared with other layers of the same shape, format and
  // path (nullptr: the layer makes its own). `cache_pool` (nullptr: per-layer caches) may be shared by
  // any layers whose max_cache_depth equals the pool's (SftCachePool says when that is valid).
  // `isa` must be supported by this CPU.
  static absl::StatusOr<std::unique_ptr<SftMoeLayer>> Create(
      const SftConfig& config, Isa isa, ExpertFormat format,
      std::shared_ptr<SftBackwardWeights> backward_weights = nullptr,
      std::shared_ptr<SftWorkspace> workspace = nullptr,
      std::shared_ptr<SftCachePool> cache_pool = nullptr);
  // Hands the entries still cached (forwards without their backward) back to a shared pool.
  ~SftMoeLayer();

  // Canonical bf16 base weights gate/up [E, I, H], down [E, H, I] (MoeLayer::LoadWeights). With an
  // unshared SftBackwardWeights the transposed copy is built here; a shared one is built at backward.
  absl::Status LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                           const int64_t* physical_to_logical, ThreadPool& pool);

  // The LoRA tensors (every pointer non-null unless skip_lora). Kept and read at every call.
  absl::Status SetLora(const SftLoraTensors& lora);

  // output[qlen, H] = sum_j w_tj y_tj (bf16). With save_for_backward the activations backward needs are
  // pushed on the cache stack; FailedPrecondition when max_cache_depth caches are already waiting (on this
  // layer, or with a shared pool on all layers sharing it), leaving everything unchanged. qlen 0 is a valid
  // (empty) batch, as in inference: nothing is computed, the pointers may be null, and with
  // save_for_backward an empty entry is cached, whose Backward gives empty gradients and LoRA gradients 0.
  absl::Status Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids, const float* weights,
                       const bf16_t* input, bf16_t* output, bool save_for_backward);

  // Pops the newest cache (LIFO) and computes, for grad_output [qlen, H] bf16 of that forward:
  // grad_input [qlen, H] bf16, grad_weights [qlen, k] fp32 (<grad_output_t, y_tj>, 0 for skipped slots)
  // and, unless skip_lora, the six LoRA gradients into SetLora's grad tensors:
  //   grad = bf16(grad_scale * g)            (accumulate = false; experts without tokens get 0)
  //   grad = bf16(grad + grad_scale * g)     (accumulate = true; experts without tokens unchanged)
  // FailedPrecondition when no forward is cached.
  absl::Status Backward(ThreadPool& pool, const bf16_t* grad_output, bf16_t* grad_input,
                        float* grad_weights, bool accumulate = false, float grad_scale = 1.0f);

  // A shared SftBackwardWeights last built from another layer is rebuilt by Backward. Overlapped (the
  // default): the rebuild of each expert's projections runs as tasks of the backward's own task list, a
  // few tasks ahead of the first task that multiplies by them, so no serial phase remains and the freshly
  // written copy is read while it is still in cache. Serial: one phase before the backward (what kt did
  // before 2026-12-07), kept to compare against (benchmark, bit-identity test). Same bits either way.
  void set_overlapped_rebuild(bool on) { overlapped_rebuild_ = on; }
  bool overlapped_rebuild() const { return overlapped_rebuild_; }
  const SftTimes& last_times() const { return times_; }

  int cache_depth() const { return static_cast<int>(stack_.size()); }
  // (qlen, k) of the forward the next Backward consumes (the newest cached one): the shapes of its
  // grad_output, grad_input and grad_weights. FailedPrecondition, as Backward's, when none is cached.
  absl::StatusOr<std::pair<int, int>> NextBackwardShape() const;
  const SftConfig& config() const { return config_; }
  Isa isa() const { return isa_; }
  ExpertFormat format() const { return base_->format(); }
  int rank() const { return rank_; }
  // Bytes: forward base weights; transposed backward weights (shared ones counted once, by their owner);
  // cached activations this layer owns (entries are kept for reuse after their backward; 0 with a shared
  // pool, which owns every entry); the shared pool's bytes (0 without one; the same object for every
  // layer sharing it, so a model's total counts it once, as the shared workspace).
  size_t weight_bytes() const { return base_->weight_bytes(); }
  size_t backward_weight_bytes() const { return bwd_->bytes(); }
  size_t cache_bytes() const;
  size_t cache_pool_bytes() const { return pool_ != nullptr ? pool_->bytes() : 0; }
  bool shares_cache_pool() const { return pool_ != nullptr; }
  // Cache bytes of one forward of qlen tokens (all k slots routed): what max_cache_depth multiplies.
  size_t CacheBytesPerForward(int qlen) const;
  size_t workspace_bytes() const { return ws_->bytes(); }

 private:
  using Cache = SftForwardCache;

  SftMoeLayer(const SftConfig& config, Isa isa) : config_(config), isa_(isa) {}
  void Route(Cache& c, int qlen, int k, const int64_t* ids) const;

  // What the phases of one forward or backward share: the cache entry, the workspace, sizes and strides
  // (defined in sft_pass.h).
  struct Pass;
  Pass MakePass(Cache& c, bool quant) const;
  absl::Status CheckForward(int qlen, int k, const int64_t* ids, const float* weights, const bf16_t* input,
                            const bf16_t* output, bool save_for_backward) const;
  // Forward runs the expert pipeline shared with inference (kt/moe/expert_pipeline.h) with SFT's hooks
  // (LoRA terms, cache; sft_forward.cc) and this call's buffers and policy.
  class ForwardHooks;
  PipelineCall MakePipelineCall(const Pass& p, bf16_t* output, PipelineHooks* hooks) const;
  // Backward's tasks (sft_backward.cc), in the order of its task list: grad_y rows (by row chunk), grad_g
  // and grad_u (expert, column block of I), their preparation (row chunk), grad_x (expert, column block of
  // H), the LoRA gradients (expert); with an overlapped rebuild, RebuildTask's among them.
  struct BackwardPlan;
  absl::Status RunBackwardTasks(ThreadPool& pool, const Pass& p, bool rebuild, const bf16_t* grad_output,
                                float* grad_weights, bool accumulate, float grad_scale);
  void GradYTask(const Pass& p, size_t task, int thread, const bf16_t* grad_output, float* grad_weights) const;
  void GradGateUpTask(const Pass& p, size_t task, int thread) const;
  void PrepareTask(const Pass& p, size_t task, int thread) const;
  void GradXTask(const Pass& p, size_t task, int thread) const;
  void LoraGradsTask(const Pass& p, size_t e, int thread, bool accumulate, float grad_scale) const;
  void EnsureWorkspace(ThreadPool& pool);
  size_t ScratchPerThread() const;
  // Whether the backward weights hold this layer's current weights (else a rebuild is due).
  bool BackwardWeightsCurrent() const;
  // Rebuild: all of it as one phase, or one (slot, proj) = (task / 3, task % 3) on pool thread `thread`
  // (PrepareRebuild first, FinishRebuild after the last).
  absl::Status EnsureBackwardWeights(ThreadPool& pool);
  void PrepareRebuild(ThreadPool& pool);
  absl::Status RebuildTask(size_t task, int thread);
  absl::Status FinishRebuild();
  std::string Name() const;    // "layer 3" (layer_idx given) or "unnumbered layer #<creation id>"
  Cache& PushEntry();          // a free entry (this layer's or the pool's) onto stack_
  Cache& ScratchEntry();       // the entry of a forward without save_for_backward
  void ReleaseEntry(std::unique_ptr<Cache> c);  // a popped entry back to free_ or the pool

  SftConfig config_;
  Isa isa_;
  int rank_ = 0;       // effective LoRA rank (0 with skip_lora)
  float scale_ = 0;    // lora_alpha / lora_rank
  // Activation scales (and int4 group sums) per quantized row of an H-wide input (forward x, backward
  // grad_y) and of an I-wide one (forward h, backward grad_g/grad_u): 1, or H/G and I/G for the group
  // formats (MoeLayer::ActivationGroups; the transposed layer's K are the same H and I).
  size_t groups_h_ = 1, groups_i_ = 1;
  uint64_t weights_version_ = 0;
  bool overlapped_rebuild_ = true;
  SftTimes times_;
  std::unique_ptr<PackedExperts> base_;  // the forward weights
  std::unique_ptr<ExpertPipeline> pipeline_;  // forward's phases, on base_
  std::shared_ptr<SftBackwardWeights> bwd_;
  bool bwd_shared_ = false;
  std::shared_ptr<SftWorkspace> ws_;
  SftLoraTensors lora_;
  bool lora_set_ = false;
  std::vector<std::unique_ptr<Cache>> stack_;  // pushed forwards, newest last
  std::vector<std::unique_ptr<Cache>> free_;   // popped entries kept for their buffers
  std::shared_ptr<SftCachePool> pool_;         // share_cache_pool: owns the entries instead of free_
                                               // (nullptr: per-layer caches)
  uint64_t id_ = 0;                            // creation number, for Name() without layer_idx
};

}  // namespace kt

#endif  // KT_SFT_SFT_LAYER_H_
