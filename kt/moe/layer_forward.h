// What runs one MoE layer's forward on its own threads, whatever the layer is: a MoeLayer on one pool, or a
// tensor-parallel TpMoeLayer on its per-node pools (kt/moe/tp_layer.h). The serving path (kt/moe/serving.h)
// and the Python binding hold layers through this, so one runtime path serves both.
#ifndef KT_MOE_LAYER_FORWARD_H_
#define KT_MOE_LAYER_FORWARD_H_

#include <cstdint>

#include "absl/status/status.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

class LayerForward {
 public:
  virtual ~LayerForward() = default;
  // The whole layer's configuration (a TP layer's, not a part's).
  virtual const MoeConfig& config() const = 0;
  virtual bool loaded() const = 0;
  // As MoeLayer::Forward, on the threads this object was given.
  virtual absl::Status Forward(int qlen, int k, const int64_t* ids, const float* weights, const bf16_t* input,
                               const MoeLayer::Output& output, const bool* gpu_experts_mask) = 0;
};

// A MoeLayer on one pool. Holds neither: both must outlive it.
class PooledLayerForward final : public LayerForward {
 public:
  PooledLayerForward(MoeLayer* layer, ThreadPool* pool) : layer_(layer), pool_(pool) {}
  const MoeConfig& config() const override { return layer_->config(); }
  bool loaded() const override { return layer_->loaded(); }
  absl::Status Forward(int qlen, int k, const int64_t* ids, const float* weights, const bf16_t* input,
                       const MoeLayer::Output& output, const bool* gpu_experts_mask) override {
    return layer_->Forward(*pool_, qlen, k, ids, weights, input, output, gpu_experts_mask);
  }

 private:
  MoeLayer* layer_;
  ThreadPool* pool_;
};

}  // namespace kt

#endif  // KT_MOE_LAYER_FORWARD_H_
