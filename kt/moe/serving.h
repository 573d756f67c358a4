// What a serving engine's MoE layer needs from kt beyond MoeLayer::Forward (issue 16): a forward that
// reads everything, the batch size included, from fixed host buffers when it runs (so it can be queued
// from a CUDA stream and replayed by a CUDA graph), accepts int32 or int64 expert ids, splits batches
// longer than the chunked-prefill size, and can add its result into the output already there (the deferred
// experts of the previous layer); and the split of each token's experts into those run now and those
// deferred to the next layer.
#ifndef KT_MOE_SERVING_H_
#define KT_MOE_SERVING_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/layer_forward.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"
#include "kt/runtime/task_queue.h"

namespace kt {

// Host buffers a forward reads and writes, at addresses fixed for the life of the task. Rows are dense:
// ids and weights [capacity, k], input and output [capacity, H].
struct ServingBuffers {
  const int32_t* batch_size = nullptr;  // rows this run, read when the task runs; in [0, capacity]
  int capacity = 0;                     // rows the buffers hold
  int k = 0;                            // slots per row (<= the layer's top_k)
  const void* ids = nullptr;            // int32 or int64 (ids_int32); < 0 or masked: skipped
  bool ids_int32 = false;
  const float* weights = nullptr;
  const bf16_t* input = nullptr;
  bf16_t* output = nullptr;
  const bool* gpu_experts_mask = nullptr;  // bool[E] read every run, or null
  // output = bf16(output + result) instead of bf16(result), rounded once: the previous layer's deferred
  // experts were written there first.
  bool accumulate = false;
  // Deferred experts (max_deferred = D > 0, see SplitDeferredExperts): each run splits its batch, computes
  // the immediate part and writes the deferred part's ids to deferred_ids ([capacity, k] int64, -1 where
  // none), which a second ServingForward over the same rows (ids = deferred_ids, output = the next layer's
  // output buffer, queued right after this one) computes one layer late.
  int max_deferred = 0;
  int64_t* deferred_ids = nullptr;
};

// One layer's forward over ServingBuffers, as a reusable QueuedTask. Batches longer than `chunk` rows
// (the chunked-prefill size, at most the layer's max_len) run as several Forwards. `compute_mutex`, if
// given, is held while computing (the Python binding serializes all compute of a process on one).
class ServingForward {
 public:
  // Any layer on its threads (LayerForward: a MoeLayer on a pool, a TpMoeLayer on its per-node pools).
  static absl::StatusOr<std::unique_ptr<ServingForward>> Create(std::unique_ptr<LayerForward> layer,
                                                                const ServingBuffers& buffers, int chunk,
                                                                std::mutex* compute_mutex = nullptr);
  // A MoeLayer on `pool` (PooledLayerForward).
  static absl::StatusOr<std::unique_ptr<ServingForward>> Create(MoeLayer* layer, ThreadPool* pool,
                                                                const ServingBuffers& buffers, int chunk,
                                                                std::mutex* compute_mutex = nullptr);
  QueuedTask* task() { return &task_; }
  // Runs the forward now, on the calling thread (what the task does).
  absl::Status Run();

 private:
  ServingForward(std::unique_ptr<LayerForward> layer, const ServingBuffers& buffers, int chunk,
                 std::mutex* compute_mutex);
  std::unique_ptr<LayerForward> layer_;
  ServingBuffers b_;
  int chunk_;
  std::mutex* compute_mutex_;
  std::vector<int64_t> ids64_;  // [chunk, k] the chunk's ids widened to int64, or [capacity, k] immediate ids
  QueuedTask task_;
};

// Deferred experts (max_deferred_experts_per_token = D > 0): of each token's k experts, the k - D with
// the largest routing weights are "protected"; every expert protected for some token of the batch runs
// now (immediate), all other (token, slot) pairs run one layer late (deferred). Writes immediate_ids and
// deferred_ids [qlen, k] (int64, -1 where the pair belongs to the other set); every valid id of `ids`
// lands in exactly one of them. `ids` int32 or int64 as ids_int32 says; ids < 0 or >= num_experts are
// -1 in both. Ties in weight keep the earlier slot. InvalidArgument for D outside [0, k).
absl::Status SplitDeferredExperts(const void* ids, bool ids_int32, const float* weights, int qlen, int k,
                                  int num_experts, int max_deferred, int64_t* immediate_ids,
                                  int64_t* deferred_ids);

}  // namespace kt

#endif  // KT_MOE_SERVING_H_
