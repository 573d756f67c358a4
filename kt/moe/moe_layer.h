// The routed-experts forward of one MoE layer over BF16 expert weights.
//
// For each token t and slot j with a valid expert e = ids[t][j]:
//   g = W_gate[e] x_t, u = W_up[e] x_t              (fp32 accumulation)
//   h = bf16(silu(g) * u)                            (rounded to bf16, as the original does)
//   y = W_down[e] h                                  (fp32)
//   out_t = bf16( sum_j weights[t][j] * y )          (fp32 sum, one rounding at the end)
// An id < 0, >= num_experts, or with gpu_experts_mask[id] set contributes nothing.
#ifndef KT_MOE_MOE_LAYER_H_
#define KT_MOE_MOE_LAYER_H_

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_bf16.h"
#include "kt/moe/thread_pool.h"

namespace kt {

struct MoeConfig {
  int num_experts = 0;   // E
  int top_k = 0;         // k (experts per token)
  int hidden = 0;        // H
  int intermediate = 0;  // I
  int max_len = 0;       // Largest qlen one Forward accepts; sizes the scratch buffers.
};

// Checks every field (positive, sane) and names the bad one.
absl::Status ValidateMoeConfig(const MoeConfig& config);

class MoeLayer {
 public:
  // `isa` must be supported by this CPU (see ResolveIsa).
  static absl::StatusOr<std::unique_ptr<MoeLayer>> Create(const MoeConfig& config, Isa isa);

  // Canonical weights: gate and up [E, I, H], down [E, H, I], row-major bf16. Physical slot i (the id used
  // at Forward) holds logical expert physical_to_logical[i] of these arrays; nullptr means the identity.
  // Packs into the kernel layout using `pool`; the inputs can be freed afterwards.
  absl::Status LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                           const int64_t* physical_to_logical, ThreadPool& pool);

  // qlen in [1, max_len], k == top_k (or smaller). ids [qlen, k] int64, weights [qlen, k] fp32,
  // input/output [qlen, H] bf16. gpu_experts_mask: bool[E] read on every call, or nullptr.
  absl::Status Forward(ThreadPool& pool, int qlen, int k, const int64_t* ids, const float* weights,
                       const bf16_t* input, bf16_t* output, const bool* gpu_experts_mask);

  const MoeConfig& config() const { return config_; }
  Isa isa() const { return isa_; }
  bool loaded() const { return loaded_; }
  // Bytes of packed expert weights held.
  size_t weight_bytes() const;

 private:
  MoeLayer(const MoeConfig& config, Isa isa);
  size_t ScratchPerThread() const;

  // A 64-byte aligned array: packed panels are read one cache line per load.
  template <typename T>
  struct AlignedArray {
    struct Free {
      void operator()(T* p) const { std::free(p); }
    };
    std::unique_ptr<T[], Free> data;
    size_t size = 0;
    void Resize(size_t n);
    T* get() const { return data.get(); }
  };

  MoeConfig config_;
  Isa isa_;
  GemmBf16Fn gemm_;
  bool loaded_ = false;
  size_t gate_stride_ = 0;  // Elements per expert of packed gate (and of up): PackedBf16Size(I, H).
  size_t down_stride_ = 0;  // Elements per expert of packed down: PackedBf16Size(H, I).
  AlignedArray<bf16_t> gate_, up_, down_;

  // Routing and scratch, sized for max_len * top_k rows at Create (Forward never allocates).
  std::vector<int> expert_count_;    // [E] rows routed to each physical expert
  std::vector<int> expert_begin_;    // [E+1] first row of each expert (rows grouped by expert)
  std::vector<int> row_token_;       // [rows] token of each row
  std::vector<int> token_slot_row_;  // [max_len * k] row of (token, slot), -1 when skipped
  std::vector<int> active_;          // experts with at least one row
  AlignedArray<bf16_t> xs_;          // [rows, H] gathered inputs
  AlignedArray<bf16_t> hs_;          // [rows, I] bf16(silu(g) * u)
  AlignedArray<float> ys_;           // [rows, H] down projections
  AlignedArray<float> gu_scratch_;   // per thread: ScratchPerThread() floats
  int scratch_threads_ = 0;
};

// The plain reference of the same computation on canonical weights (double accumulation), for tests and
// for `kt bench`'s accuracy line.
void MoeForwardReference(const MoeConfig& config, int qlen, int k, const int64_t* ids,
                         const float* weights, const bf16_t* input, const bf16_t* gate,
                         const bf16_t* up, const bf16_t* down, const bool* gpu_experts_mask,
                         float* output);

}  // namespace kt

#endif  // KT_MOE_MOE_LAYER_H_
