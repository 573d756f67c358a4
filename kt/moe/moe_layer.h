// The routed-experts forward of one MoE layer.
//
// For each token t and slot j with a valid expert e = ids[t][j]:
//   g = W_gate[e] x_t, u = W_up[e] x_t              (fp32 accumulation)
//   h = bf16(silu(g) * u)                            (rounded to bf16, as the original does)
//   y = W_down[e] h                                  (fp32)
//   out_t = bf16( sum_j weights[t][j] * y )          (fp32 sum over t's experts in expert-id order, one
//                                                     rounding at the end)
// An id < 0, >= num_experts, or with gpu_experts_mask[id] set contributes nothing.
//
// The experts' weights are a PackedExperts in one ExpertFormat (expert_format.h: one table describes every
// format; docs/FORMATS.md the layouts): bf16 products read the gathered bf16 rows, the integer formats'
// read x_t and h quantized to int8 right before each product (per row, or per row and group).
#ifndef KT_MOE_MOE_LAYER_H_
#define KT_MOE_MOE_LAYER_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"
#include "kt/moe/aligned_buffer.h"
#include "kt/moe/expert_format.h"
#include "kt/moe/expert_pipeline.h"
#include "kt/moe/packed_experts.h"
#include "kt/moe/routing.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

struct MoeConfig {
  int num_experts = 0;   // E
  int top_k = 0;         // k (experts per token)
  int hidden = 0;        // H
  int intermediate = 0;  // I
  int max_len = 0;       // Largest qlen one Forward accepts; sizes the scratch buffers.
  // G of the group-wise formats (kInt4GroupSym/Asym): 32, 64 or 128, dividing hidden and intermediate.
  // Ignored by the other formats.
  int group_size = 128;
  // >= 0: the packed expert weights live on this NUMA node (bound at allocation, kt/runtime/memory.h), as a
  // tensor-parallel part's do (kt/moe/tp_layer.h). -1: wherever the OS puts them.
  int numa_node = -1;
  // The GGUF formats (gguf, gguf_float; method LLAMAFILE): the ggml type id of the gate, up and down
  // tensors (kt/kernels/gguf_quants.h), as the file stores them. Ignored by the other formats.
  int gguf_types[3] = {-1, -1, -1};
  // The gated activation's variants (kt/kernels/activation.h, SwigluParams): > 0 clamps g <= limit and
  // |u| <= limit; alpha > 0 computes g sigmoid(alpha g) (u + 1) ("swigluoai"). 0: off (silu(g) * u).
  // Finite and >= 0; SFT refuses non-zero values (its backward is silu(g) * u's).
  float swiglu_limit = 0.0f;
  float swiglu_alpha = 0.0f;
};

// Checks every field (positive, sane) and names the bad one.
absl::Status ValidateMoeConfig(const MoeConfig& config);

// Where the last Forward's time went, in seconds (for benchmarks). route is wall time; gather, gate_up,
// quant_h and down run as one pipeline (kt/moe/expert_pipeline.h: a task of one phase starts as soon as
// what it reads is ready, no barrier in between), so theirs is the time the threads spent in that phase's
// tasks divided by the number of threads, which adds up to the pipeline's wall time minus idle time.
struct ForwardProfile {
  double route = 0;    // counting sort of (token, slot) pairs by expert
  double gather = 0;   // gathered (and for quantized formats, quantized) input rows
  double gate_up = 0;  // gate and up GEMMs + silu(g) * u
  double quant_h = 0;  // quantized formats: h rows quantized
  double down = 0;     // down GEMMs, the weighted sum per token and its rounding to bf16
};

// Work-unit sizes of the gate/up and down phases, in 16-column panels per task (1..16); 0 keeps the
// built-in choice (3 panels; on the AMX path 2-8 for gate/up, sized to L2, and 8 for down, halved for
// down until there are two tasks per thread). row_chunk: rows
// of one expert per gate/up kernel call (0: built-in, 64; else 16..1024; a remainder of fewer than 16 rows
// joins the last chunk). k_block: the AMX kernels' K block
// (GemmBf16AmxKBlocked / GemmInt8AmxKBlocked; 0: built-in; other paths ignore it). A tuning knob for
// benchmarks, like the original's tiling setters; results do not depend on it.
struct MoeTiling {
  int gate_up_panels = 0;
  int down_panels = 0;
  int row_chunk = 0;
  int k_block = 0;
};


// Forward's working memory: gathered (and quantized) activations, h, the fp32 output accumulators and the
// per-thread blocks, sized for max_len * top_k rows. Layers run one at a time in a model, so they can share
// one: by default every layer of the process shares MoeScratch::Shared(), which keeps a 94-layer
// Qwen3-235B at one layer's scratch (~0.44 GB at max_len 4096, bf16) instead of 94 of them. Forward holds
// the scratch's mutex for the whole call, so layers sharing one never run at the same time; give layers
// that must run concurrently their own (std::make_shared<MoeScratch>()).
class MoeScratch {
 public:
  // The process-wide scratch: the one every live layer created without an explicit scratch uses (a new one
  // once they are all gone).
  static std::shared_ptr<MoeScratch> Shared();
  // Bytes allocated (grows to the largest layer that uses it).
  size_t bytes() const;

 private:
  friend class MoeLayer;
  template <typename T>
  using Array = moe_internal::AlignedBuffer<T>;
  mutable std::mutex mu;
  Array<bf16_t> xs;          // [rows, ldx] gathered inputs (formats reading bf16 rows)
  Array<bf16_t> hs;          // [rows, ldh] bf16(silu(g) * u)
  Array<int8_t> qxs, qhs;    // formats reading int8 rows: the same rows quantized (ldx, ldqh)
  Array<float> sxs, shs;     // their scales, [rows][groups]
  Array<int32_t> xsums, hsums;  // formats with activation sums: [rows][groups] int32 group sums
  Array<float> acc;          // [max_len, ldy] fp32 weighted sums of the down projections
  Array<float> per_thread;   // per pool thread: one gate/up task's g and u blocks, or one down block
};

class MoeLayer {
 public:
  // `isa` must be supported by this CPU (see ResolveIsa).
  // `scratch`: Forward's working memory (see MoeScratch); nullptr shares MoeScratch::Shared().
  static absl::StatusOr<std::unique_ptr<MoeLayer>> Create(const MoeConfig& config, Isa isa,
                                                          ExpertFormat format = ExpertFormat::kBf16,
                                                          std::shared_ptr<MoeScratch> scratch = nullptr);

  // Canonical weights: gate and up [E, I, H], down [E, H, I], row-major bf16. Physical slot i (the id used
  // at Forward) holds logical expert physical_to_logical[i] of these arrays; nullptr means the identity.
  // Quantizes (kInt8) and packs into the kernel layout using `pool`; the inputs can be freed afterwards.
  absl::Status LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                           const int64_t* physical_to_logical, ThreadPool& pool);

  // Streaming load, one expert projection at a time (a loader reading a checkpoint keeps one expert in
  // memory, not E). Each (slot, proj) must be loaded once, then FinishLoad() makes the layer usable.
  // Calls for different (slot, proj) may run concurrently on different threads; a failed call changes
  // nothing and the layer stays unusable until every projection has loaded.
  // BeginLoad() first marks every projection unloaded (loaded() turns false), so that a reload that fails
  // half-way leaves a layer that refuses Forward rather than one mixing old and new experts.
  void BeginLoad();
  // From canonical bf16 w[N, K] (N, K of `proj`), quantized here if the format is quantized.
  absl::Status LoadExpert(int slot, ExpertProj proj, const bf16_t* w);
  // From a matrix already in the layer's quantized format (a converted checkpoint): spec, n and k must
  // match (quant_spec()); InvalidArgument naming the mismatch otherwise, and for a kBf16 layer.
  absl::Status LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm);
  // GGUF formats: the projection's ggml blocks as the file stores them (PackedExperts::LoadExpertBlocks).
  absl::Status LoadExpertBlocks(int slot, ExpertProj proj, const uint8_t* bytes, size_t size);
  // OK once every (slot, proj) has loaded; FailedPrecondition naming the first missing one otherwise.
  absl::Status FinishLoad();

  // Reloading without risking the weights in use: CreateStaging() makes an empty layer of the same
  // configuration, path, format and tiling, sharing this layer's scratch; load into it (any of the loaders
  // above), then AdoptWeights(*staged) swaps the packed weights in, and the staged layer (holding the old
  // ones) is dropped. A load that fails leaves this layer exactly as it was. Peak memory: two layers'
  // weights while the staged one loads. AdoptWeights needs `staged` loaded and of the same configuration,
  // path and format (FailedPrecondition / InvalidArgument naming what differs otherwise); it must not run
  // concurrently with a Forward of this layer.
  absl::StatusOr<std::unique_ptr<MoeLayer>> CreateStaging() const;
  absl::Status AdoptWeights(MoeLayer& staged);

  // qlen in [1, max_len], k == top_k (or smaller). ids [qlen, k] int64, weights [qlen, k] fp32,
  // input/output [qlen, H] bf16. gpu_experts_mask: bool[E] read on every call, or nullptr.
  absl::Status Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids, const float* weights,
                       const bf16_t* input, bf16_t* output, const bool* gpu_experts_mask);

  // Where a Forward puts the layer's result [qlen, H] (exactly one of bf16 / f32):
  //   bf16, add = false: bf16(result), as Forward above;
  //   bf16, add = true:  bf16(float(bf16) + result), one rounding: the output already holds the previous
  //                      layer's deferred experts (kt/moe/serving.h);
  //   f32:               the fp32 result, unrounded: a tensor-parallel part, summed by its caller.
  struct Output {
    bf16_t* bf16 = nullptr;
    bool add = false;
    float* f32 = nullptr;
  };
  absl::Status Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids, const float* weights,
                       const bf16_t* input, const Output& output, const bool* gpu_experts_mask);

  // This layer is one tensor-parallel part of a TpMoeLayer, which owns `share` (nullptr: not a part): h is
  // quantized against the whole row's max, exchanged with the other parts (HScaleShare). Not during a Forward.
  void set_h_share(HScaleShare* share) { h_share_ = share; }

  // The packed experts (kt/moe/packed_experts.h): the storage Forward multiplies by, for code that applies
  // an expert's projection to rows it owns or reads the weights back.
  const PackedExperts& experts() const { return *weights_; }
  PackedExperts& experts() { return *weights_; }

  const MoeConfig& config() const { return config_; }
  const ForwardProfile& last_profile() const { return profile_; }
  // InvalidArgument unless each field is 0 or in [1, 8].
  absl::Status SetTiling(const MoeTiling& tiling);
  Isa isa() const { return isa_; }
  ExpertFormat format() const { return weights_->format(); }
  // The canonical quantized form the layer stores (QuantSpecOf(format(), config().group_size)); for
  // kBf16 an InvalidArgument.
  absl::StatusOr<QuantSpec> quant_spec() const { return weights_->quant_spec(); }
  // Safe to read from any thread (an atomic flag).
  bool loaded() const { return weights_->loaded(); }
  // [N, K] of a projection: (I, H) for gate and up, (H, I) for down.
  size_t ProjRows(ExpertProj proj) const { return weights_->ProjRows(proj); }
  size_t ProjCols(ExpertProj proj) const { return weights_->ProjCols(proj); }
  // Bytes of packed expert weights held, scales and row sums included.
  size_t weight_bytes() const { return weights_->weight_bytes(); }

 private:
  MoeLayer(const MoeConfig& config, Isa isa) : config_(config), isa_(isa) {}
  size_t ScratchPerThread() const;
  size_t RowChunk() const;

  MoeConfig config_;
  Isa isa_;
  std::unique_ptr<PackedExperts> weights_;
  ForwardProfile profile_;
  MoeTiling tiling_;

  // Forward's phases 2-5 (gather, gate/up, h-quantize, down + weighted sum) run on the expert pipeline
  // shared with SFT (kt/moe/expert_pipeline.h), summing a token's experts in expert-id order per column
  // block (SumOrder::kExpertMajor). This builds one call's buffers and policy (task widths, row chunks).
  PipelineCall MakePipelineCall(size_t threads, int qlen, int k, const float* weights, const bf16_t* input,
                                const Output& output);

  // Routing, sized for max_len * top_k rows at Create; the pipeline's task lists grow to the largest call
  // and pool seen, so Forward allocates nothing after its first calls.
  ExpertRouting routing_;
  std::unique_ptr<ExpertPipeline> pipeline_;
  HScaleShare* h_share_ = nullptr;
  // Row strides (elements) of the activation arrays: padded past K by one cache line (PaddedStride, routing.h).
  size_t ldx_ = 0;                   // scratch xs (bf16) or qxs (int8)
  size_t ldh_ = 0;                   // scratch hs
  size_t ldqh_ = 0;                  // scratch qhs
  size_t ldy_ = 0;                   // scratch acc
  std::shared_ptr<MoeScratch> scratch_;  // Forward's activations and blocks, with this layer's strides
};

}  // namespace kt

#endif  // KT_MOE_MOE_LAYER_H_
