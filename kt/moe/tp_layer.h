// Tensor parallelism of one MoE layer along the intermediate dimension (the original's NUMA TP): part p of
// `tp` holds rows [p I/tp, (p+1) I/tp) of every expert's gate and up projections and the same columns of
// its down projection, so each part computes a full-width partial [qlen, H] of every token from its slice
// of h, and the layer's result is the sum of the parts' fp32 partials, rounded once. Each part runs the
// whole batch on its own ThreadPool (one per NUMA node in a serving process, so a part's weights and
// threads stay on one node) and its own scratch; the parts run at the same time.
//
// Slicing happens at load, so weight files stay independent of the TP degree. A quantized format quantizes
// the whole matrix first (or reads it quantized from a converted folder) and slices the quantized form, so
// every part holds exactly the TP = 1 layer's codes and scales: a down row keeps its whole-row scale. With
// bf16 and the group formats (whose h is quantized per group, and groups do not straddle parts) the result
// equals the TP = 1 layer's up to the order of the fp32 additions (within a token, each part sums its experts'
// down products, then the parts are added in part order). The per-channel integer formats quantize h per row;
// the parts exchange each row's max mid-layer (HScaleShare, kt/moe/expert_pipeline.h) and quantize their
// slices against it, so they too equal the TP = 1 layer up to the reduce order (the original's NUMA parts
// each use their slice's own scale instead, a difference of the order of h's int8 step).
//
// NUMA: Create's `numa_nodes` binds each part's packed weights to its node (MoeConfig::numa_node); Forward
// pins the thread driving part p to pools[p]'s CPU set (ThreadPoolOptions::cpu_set, kt/runtime/numa.h).
#ifndef KT_MOE_TP_LAYER_H_
#define KT_MOE_TP_LAYER_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"
#include "kt/moe/expert_format.h"
#include "kt/moe/layer_forward.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

class TpMoeLayer {
 public:
  // `config` is the whole layer's; intermediate must split into `tp` equal parts that the format accepts
  // (e.g. a multiple of group_size for the group formats). InvalidArgument naming tp otherwise.
  // numa_nodes: empty (weights wherever the OS puts them) or one node per part, -1 for none.
  static absl::StatusOr<std::unique_ptr<TpMoeLayer>> Create(const MoeConfig& config, Isa isa, ExpertFormat format,
                                                            int tp, const std::vector<int>& numa_nodes = {});

  // Canonical weights as MoeLayer::LoadWeights (gate/up [E, I, H], down [E, H, I]); part p loads its slice
  // on pools[p]. pools.size() == tp.
  absl::Status LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                           const int64_t* physical_to_logical, const std::vector<ThreadPool*>& pools);

  // Streaming load of the whole layer's matrices (MoeLayer's loaders, same contract): each call slices the
  // matrix for every part. LoadExpert of a quantized format quantizes the whole matrix, then slices it.
  void BeginLoad();
  absl::Status LoadExpert(int slot, ExpertProj proj, const bf16_t* w);
  absl::Status LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm);
  absl::Status FinishLoad();
  // The whole layer's quantized form (the parts': the same spec); InvalidArgument for bf16.
  absl::StatusOr<QuantSpec> quant_spec() const { return parts_[0]->quant_spec(); }

  // Reloading without touching the weights in use, as MoeLayer's (per part).
  absl::StatusOr<std::unique_ptr<TpMoeLayer>> CreateStaging() const;
  absl::Status AdoptWeights(TpMoeLayer& staged);

  // As MoeLayer::Forward; part p runs on pools[p] (pools.size() == tp), all parts at once; then the
  // partials are summed and written as `output` says (bf16, bf16 added to, or fp32).
  absl::Status Forward(const std::vector<ThreadPool*>& pools, int qlen, int k, const int64_t* ids,
                       const float* weights, const bf16_t* input, const MoeLayer::Output& output,
                       const bool* gpu_experts_mask);

  int tp() const { return static_cast<int>(parts_.size()); }
  const MoeConfig& config() const { return config_; }
  const std::vector<int>& numa_nodes() const { return nodes_; }
  Isa isa() const { return parts_[0]->isa(); }
  ExpertFormat format() const { return parts_[0]->format(); }
  size_t weight_bytes() const;
  bool loaded() const;
  MoeLayer& part(int p) { return *parts_[p]; }

 private:
  explicit TpMoeLayer(const MoeConfig& config) : config_(config) {}
  absl::Status CheckPools(const char* fn, const std::vector<ThreadPool*>& pools) const;
  MoeConfig config_;
  std::vector<int> nodes_;  // per part, -1: not bound
  std::vector<std::unique_ptr<MoeLayer>> parts_;
  std::vector<std::vector<float>> partials_;  // [tp][max_len * H]
  std::unique_ptr<HScaleShare> h_share_;      // tp > 1: the parts' per-row h scales
  std::unique_ptr<bool[]> mask_;              // tp > 1: the mask snapshot the parts route by
};

// A TpMoeLayer on its pools (one per part). Holds neither: both must outlive it.
class TpLayerForward final : public LayerForward {
 public:
  TpLayerForward(TpMoeLayer* layer, std::vector<ThreadPool*> pools) : layer_(layer), pools_(std::move(pools)) {}
  const MoeConfig& config() const override { return layer_->config(); }
  bool loaded() const override { return layer_->loaded(); }
  absl::Status Forward(int qlen, int k, const int64_t* ids, const float* weights, const bf16_t* input,
                       const MoeLayer::Output& output, const bool* gpu_experts_mask) override {
    return layer_->Forward(pools_, qlen, k, ids, weights, input, output, gpu_experts_mask);
  }

 private:
  TpMoeLayer* layer_;
  std::vector<ThreadPool*> pools_;
};

// Rows [r0, r0 + rows) and columns [k0, k0 + cols) of a quantized matrix, codes and scales (zero points)
// as stored: a per-channel row keeps its one scale; group and FP8 block scales are cut at k0, which must
// then be a multiple of the group (128 for FP8), and int4 column cuts must be even. InvalidArgument naming
// the misaligned bound otherwise.
absl::Status SliceQuantized(const QuantizedMatrix& qm, size_t r0, size_t rows, size_t k0, size_t cols,
                            QuantizedMatrix* out);

}  // namespace kt

#endif  // KT_MOE_TP_LAYER_H_
