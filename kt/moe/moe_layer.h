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
// Expert weight formats (docs/FORMATS.md):
//   kBf16  the weights as given, packed into kt-bf16-panel16-kpair-v1.
//   kInt8  kt-int8-channel-v1 (symmetric int8 per output channel, quantized at load) packed into
//          kt-int8-panel16-kquad-v1; x_t and h are quantized per row to int8 (absmax/127) right before
//          each product, and the products are exact int32 sums scaled by both scales.
//   kInt4           kt-int4-channel-v1 (symmetric int4 per output channel; the original's AMXINT4).
//   kInt4GroupSym   kt-int4-group{G}-sym-v1 (a scale per G = MoeConfig::group_size consecutive k).
//   kInt4GroupAsym  kt-int4-group{G}-asym-v1 (a scale and zero point per group; AWQ, the original's
//                   AMXINT4_1KGroup). All three are packed into kt-int4-panel16-kblock8-v1 (gemm_int4.h);
//                   x_t and h are quantized to int8 per row (per row and group of G for the group formats)
//                   right before each product.
//   kInt4Asym       kt-int4-channel-asym-v1 (a scale and zero point per output channel; the original's
//                   INT4_1), same kernel and activations as kInt4.
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
#include "kt/kernels/gemm_bf16.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/quant.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

enum class ExpertFormat { kBf16, kInt8, kInt4, kInt4GroupSym, kInt4GroupAsym, kInt4Asym };

// "bf16", "int8", "int4", "int4_group_sym", "int4_group_asym" or "int4_asym".
const char* ExpertFormatName(ExpertFormat format);
// Inverse of ExpertFormatName; InvalidArgument listing the names otherwise.
absl::StatusOr<ExpertFormat> ParseExpertFormat(absl::string_view name);
inline bool IsInt4ExpertFormat(ExpertFormat f) {
  return f == ExpertFormat::kInt4 || f == ExpertFormat::kInt4GroupSym || f == ExpertFormat::kInt4GroupAsym ||
         f == ExpertFormat::kInt4Asym;
}
inline bool IsGroupExpertFormat(ExpertFormat f) {
  return f == ExpertFormat::kInt4GroupSym || f == ExpertFormat::kInt4GroupAsym;
}

// The three projections of an expert: gate and up are [I, H], down is [H, I] (row = output channel).
enum class ExpertProj : int { kGate = 0, kUp = 1, kDown = 2 };
// "gate", "up" or "down".
const char* ExpertProjName(ExpertProj proj);

struct MoeConfig {
  int num_experts = 0;   // E
  int top_k = 0;         // k (experts per token)
  int hidden = 0;        // H
  int intermediate = 0;  // I
  int max_len = 0;       // Largest qlen one Forward accepts; sizes the scratch buffers.
  // G of the group-wise formats (kInt4GroupSym/Asym): 32, 64 or 128, dividing hidden and intermediate.
  // Ignored by the other formats.
  int group_size = 128;
};

// Checks every field (positive, sane) and names the bad one.
absl::Status ValidateMoeConfig(const MoeConfig& config);

// Where the last Forward's time went, in seconds (for benchmarks). route is wall time; gather, gate_up,
// quant_h and down run as one pipeline (a task of one phase starts as soon as what it reads is ready, no
// barrier in between), so theirs is the time the threads spent in that phase's tasks divided by the number
// of threads, which adds up to the pipeline's wall time minus idle time.
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

// The canonical quantized format a quantized ExpertFormat stores (kInt8: kt-int8-channel-v1, kInt4:
// kt-int4-channel-v1, kInt4Asym: kt-int4-channel-asym-v1, kInt4Group*: kt-int4-group{group_size}-{sym,asym}-v1;
// group_size is ignored by
// the per-channel formats). InvalidArgument for kBf16, which stores the weights as given, and for a group
// format with a group_size other than 32, 64, 128.
absl::StatusOr<QuantSpec> QuantSpecOf(ExpertFormat format, int group_size = 0);

namespace moe_internal {
// A 64-byte aligned array of trivially copyable T (contents unspecified after a size change).
template <typename T>
struct AlignedBuffer {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T[], Free> data;
  size_t size = 0;
  void Resize(size_t n);   // exactly n elements
  void Reserve(size_t n);  // at least n: grows, never shrinks
  T* get() const { return data.get(); }
};
}  // namespace moe_internal

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
  Array<bf16_t> xs;          // [rows, ldx] gathered inputs (kBf16)
  Array<bf16_t> hs;          // [rows, ldh] bf16(silu(g) * u)
  Array<int8_t> qxs, qhs;    // quantized formats: the same rows quantized (ldx, ldqh)
  Array<float> sxs, shs;     // their scales, [rows][groups]
  Array<int32_t> xsums, hsums;  // int4: [rows][groups] int32 group sums (Int4ActivationSums)
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
  // Expert `slot`'s `proj` as the transpose of `src`'s, packed to packed (TransposePackedBf16, no
  // row-major copy): both layers bf16, src loaded, and this projection [N, K] = src's [K, N];
  // InvalidArgument / FailedPrecondition naming what differs otherwise. kt/sft builds its backward
  // weights this way.
  absl::Status LoadExpertTransposed(int slot, ExpertProj proj, const MoeLayer& src);
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

  // Low-level access for layers built on these packed experts (kt/sft): one expert's projection applied to
  // rows the caller owns, in the layer's format, without going through Forward's routing and scratch.
  // A new ExpertFormat extends GemmRows (the one per-format dispatch), PrepareRow (e.g. grouped activation
  // quantization) and UnpackExpert, which returns Unimplemented for formats it does not know.
  //
  // Rows prepared for a product with a projection: kBf16 reads bf16 rows `x`; a quantized format reads
  // its quantized rows `qx` with ActivationGroups(proj) scales per row `sx` and, for the int4 formats, the
  // int32 group sums `xsum` (all made by PrepareRow). `ld` is the row stride of x/qx in elements.
  struct ProjInput {
    const bf16_t* x = nullptr;
    const int8_t* qx = nullptr;
    const float* sx = nullptr;
    const int32_t* xsum = nullptr;
    size_t ld = 0;
  };
  // Activation scales (and int4 group sums) per row for `proj`: 1, or K / group_size for group formats.
  size_t ActivationGroups(ExpertProj proj) const { return ActGroups(ProjCols(proj)); }
  // Whether ProjectBlock reads quantized rows (qx, sx) rather than bf16 rows (x).
  bool quantized_activations() const { return format_ != ExpertFormat::kBf16; }
  // Quantizes one row x[K] (K = ProjCols(proj)) the way this format feeds `proj`: q[K],
  // scales[ActivationGroups(proj)] and, for the int4 formats, sums[ActivationGroups(proj)] (may be null
  // otherwise). Only for quantized formats (quantized_activations()).
  void PrepareRow(ExpertProj proj, const bf16_t* x, int8_t* q, float* scales, int32_t* sums = nullptr) const;
  // y[r][j] = sum_k x_r[k] W[c0 + j][k] for r < m, j < cols, with W expert `slot`'s projection `proj`
  // [N, K]; c0 a multiple of kPanelRows and c0 + cols <= N. y is overwritten (row stride ldy). Needs a
  // loaded layer. No allocation, no threads, no shared state: safe to call from several threads at once.
  void ProjectBlock(ExpertProj proj, int slot, size_t c0, size_t cols, const ProjInput& in, size_t m,
                    float* y, size_t ldy) const;
  // Expert `slot`'s projection back in canonical form w[N, K] bf16: exact for kBf16; for a quantized
  // format the dequantized weights rounded to bf16. FailedPrecondition before the layer has loaded.
  absl::Status UnpackExpert(int slot, ExpertProj proj, bf16_t* w) const;
  // The same transposed, wt[K, N] (row stride N), read straight from the packed weights (the same bits as
  // UnpackExpert at [c][r]; kt/sft builds its quantized backward weights from it).
  absl::Status UnpackExpertTransposed(int slot, ExpertProj proj, bf16_t* wt) const;

  const MoeConfig& config() const { return config_; }
  const ForwardProfile& last_profile() const { return profile_; }
  // InvalidArgument unless each field is 0 or in [1, 8].
  absl::Status SetTiling(const MoeTiling& tiling);
  Isa isa() const { return isa_; }
  ExpertFormat format() const { return format_; }
  // The canonical quantized form the layer stores (QuantSpecOf(format(), config().group_size)); for
  // kBf16 an InvalidArgument.
  absl::StatusOr<QuantSpec> quant_spec() const { return QuantSpecOf(format_, config_.group_size); }
  // Safe to read from any thread (an atomic flag).
  bool loaded() const { return loaded_.load(std::memory_order_acquire); }
  // [N, K] of a projection: (I, H) for gate and up, (H, I) for down.
  size_t ProjRows(ExpertProj proj) const;
  size_t ProjCols(ExpertProj proj) const;
  // Bytes of packed expert weights held, scales and row sums included.
  size_t weight_bytes() const;

 private:
  MoeLayer(const MoeConfig& config, Isa isa, ExpertFormat format);
  size_t ScratchPerThread() const;
  size_t RowChunk() const;
  size_t KBlock() const;

  // A 64-byte aligned array: packed panels are read one cache line per load.
  template <typename T>
  using AlignedArray = moe_internal::AlignedBuffer<T>;

  // One projection (gate, up or down) of every expert: [N, K] per expert, packed in the layer's format.
  struct Projection {
    size_t n = 0, k = 0;
    size_t expert_bytes = 0;  // packed bytes per expert
    size_t panel_bytes = 0;   // bytes per 16-row panel, to address a column block
    size_t padded_rows = 0;   // entries per expert of sums (kInt8)
    size_t scale_entries = 0; // entries per expert of scales (and int4 asym zero points)
    size_t group = 0;         // int4: the kernel's group argument (G, or 0 per channel)
    AlignedArray<uint8_t> data;
    AlignedArray<float> scales;   // kInt8: per output channel; int4: [panel][group][16]
    AlignedArray<int32_t> sums;   // kInt8: per output channel, for the VNNI kernel's sign trick
    AlignedArray<uint8_t> zeros;  // kInt4GroupAsym, kInt4Asym: zero points, as scales
    // Packs expert `slot` from canonical bf16 w[N, K] (kBf16) or from its quantized form (others).
    void PackBf16(size_t slot, const bf16_t* w);
    void PackQuantized(size_t slot, const QuantizedMatrix& qm);
    const uint8_t* Panels(size_t e, size_t col) const {
      return data.get() + e * expert_bytes + (col / kPanelRows) * panel_bytes;
    }
  };
  void InitProjection(Projection& p, size_t n, size_t k) const;
  Projection& Proj(ExpertProj proj);
  const Projection& Proj(ExpertProj proj) const;
  // Allocates the packed arrays (at Create: the OS commits pages as they are packed).
  void AllocateWeights();
  absl::Status CheckSlot(const char* fn, int slot) const;
  // UnpackExpert (out[N, K]) and UnpackExpertTransposed (out[K, N]); `fn` names the caller in errors.
  absl::Status Unpack(const char* fn, int slot, ExpertProj proj, bool transposed, bf16_t* out) const;

  // y[m, cols] = x[m, K] * W^T for the rows of `act` starting at row r0 and the columns [c0, c0 + cols) of
  // expert e's projection p, in the layer's format (act: xs_/hs_ for kBf16, their int8 copies for the
  // quantized formats). The one place that dispatches products per format.
  void Gemm(const Projection& p, size_t e, size_t c0, size_t cols, bool hidden_input, size_t r0,
            size_t m, float* y, size_t ldy) const;
  // The same on rows given by `in` (the one per-format dispatch; Gemm and ProjectBlock call it).
  void GemmRows(const Projection& p, size_t e, size_t c0, size_t cols, const ProjInput& in, size_t m,
                float* y, size_t ldy) const;

  MoeConfig config_;
  Isa isa_;
  ExpertFormat format_;
  GemmBf16Fn gemm_bf16_ = nullptr;
  GemmInt8Fn gemm_int8_ = nullptr;
  GemmInt4Fn gemm_int4_ = nullptr;
  std::atomic<bool> loaded_{false};
  ForwardProfile profile_;
  MoeTiling tiling_;
  Projection gate_, up_, down_;
  std::vector<uint8_t> proj_loaded_;  // [E * 3]: (slot, proj) loaded by LoadExpert*

  // Routing and scratch, sized for max_len * top_k rows at Create; the pipeline's task lists below grow to
  // the largest call and pool seen, so Forward allocates nothing after its first calls.
  std::vector<int> expert_count_;    // [E] rows routed to each physical expert
  std::vector<int> expert_begin_;    // [E+1] first row of each expert (rows grouped by expert)
  std::vector<int> row_token_;       // [rows] token of each row
  std::vector<float> row_weight_;    // [rows] routing weight of each row
  std::vector<int> token_slot_row_;  // [max_len * k] row of (token, slot), -1 when skipped
  std::vector<int> active_;          // experts with at least one row
  // Forward's pipeline: per active expert (index into active_), gate/up tasks and h-quantize tasks still
  // to finish.
  std::unique_ptr<std::atomic<int>[]> gu_left_, quant_left_;
  std::vector<std::pair<int, size_t>> quant_blocks_;  // h-quantize tasks: (active index, first row)
  std::vector<double> busy_;                           // [threads][4] busy seconds per phase (profile)
  // Row strides (elements) of the activation arrays: padded past K by one cache line (moe_layer.cc says why).
  size_t ldx_ = 0;                   // scratch xs (bf16) or qxs (int8)
  size_t ldh_ = 0;                   // scratch hs
  size_t ldqh_ = 0;                  // scratch qhs
  size_t ldy_ = 0;                   // scratch acc
  std::shared_ptr<MoeScratch> scratch_;  // Forward's activations and blocks, with this layer's strides

  // Quantizes one activation row of length k into q, its scale(s) and (int4) group sums, per format.
  void QuantizeRow(const bf16_t* x, size_t k, int8_t* q, float* scales, int32_t* sums) const;
  // Activation scales per row for a K of k: 1, or k / G for the group formats.
  size_t ActGroups(size_t k) const;
};

}  // namespace kt

#endif  // KT_MOE_MOE_LAYER_H_
