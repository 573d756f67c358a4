// Tensor parallelism of one MoE layer along the intermediate dimension (the original's NUMA TP): part p of
// `tp` holds rows [p I/tp, (p+1) I/tp) of every expert's gate and up projections and the same columns of
// its down projection, so each part computes a full-width partial [qlen, H] of every token from its slice
// of h, and the layer's result is the sum of the parts' fp32 partials, rounded once. Each part runs the
// whole batch on its own ThreadPool (one per NUMA node in a serving process, so a part's weights and
// threads stay on one node) and its own scratch; the parts run at the same time.
//
// Slicing happens at load (from the canonical bf16 weights), so weight files stay independent of the TP
// degree. The result equals the TP = 1 layer's up to the order of the fp32 additions (within a token, each
// part sums its experts' down products, then the parts are added in part order).
#ifndef KT_MOE_TP_LAYER_H_
#define KT_MOE_TP_LAYER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

class TpMoeLayer {
 public:
  // `config` is the whole layer's; intermediate must split into `tp` equal parts that the format accepts
  // (e.g. a multiple of group_size for the group formats). InvalidArgument naming tp otherwise.
  static absl::StatusOr<std::unique_ptr<TpMoeLayer>> Create(const MoeConfig& config, Isa isa, ExpertFormat format,
                                                            int tp);

  // Canonical weights as MoeLayer::LoadWeights (gate/up [E, I, H], down [E, H, I]); part p loads its slice
  // on pools[p]. pools.size() == tp.
  absl::Status LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                           const int64_t* physical_to_logical, const std::vector<ThreadPool*>& pools);

  // As MoeLayer::Forward; part p runs on pools[p] (pools.size() == tp), all parts at once; then the
  // partials are summed and written as `output` says (bf16, bf16 added to, or fp32).
  absl::Status Forward(const std::vector<ThreadPool*>& pools, int qlen, int k, const int64_t* ids,
                       const float* weights, const bf16_t* input, const MoeLayer::Output& output,
                       const bool* gpu_experts_mask);

  int tp() const { return static_cast<int>(parts_.size()); }
  const MoeConfig& config() const { return config_; }
  bool loaded() const;
  MoeLayer& part(int p) { return *parts_[p]; }

 private:
  TpMoeLayer(const MoeConfig& config) : config_(config) {}
  absl::Status CheckPools(const char* fn, const std::vector<ThreadPool*>& pools) const;
  MoeConfig config_;
  std::vector<std::unique_ptr<MoeLayer>> parts_;
  std::vector<std::vector<float>> partials_;  // [tp][max_len * H]
};

}  // namespace kt

#endif  // KT_MOE_TP_LAYER_H_
