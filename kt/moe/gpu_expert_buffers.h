// One expert's weights written into host buffers in the layout of a GPU MoE kernel split over `tp` GPU
// tensor-parallel ranks: the serving engine's "GPU prefill of CPU experts" (SGLang's kt fallback path copies
// every CPU expert of a layer to the GPU this way, double-buffered, for long prefills), the original
// kt-kernel's write_weight_scale_to_buffer.
//
// Layout per rank r of tp, with n = I / tp (the GPU kernel's intermediate_size_per_partition; SGLang's
// fused-MoE parameters w13_weight [E, 2n, H] and w2_weight [E, H, n], one expert of them per buffer):
//   w13_weight[r]: gate rows [r n, (r+1) n) as [n, H], then up rows [r n, (r+1) n) as [n, H]
//   w2_weight[r]:  down columns [r n, (r+1) n) as [H, n] (row-major, row stride n)
// in the stored element type: bf16 for the bf16 format, E4M3 bytes for fp8_block. Scales (fp8_block only;
// the bf16 format has none and ignores the scale lists, as the original does):
//   w13_scale[r]: gate's weight_scale_inv block rows [r n/128, (r+1) n/128) as [n/128, ceil(H/128)] fp32,
//                 then up's the same
//   w2_scale[r]:  down's block columns [r n/128, (r+1) n/128) as [ceil(H/128), n/128] fp32
// (with tp = 1, ceil(I/128) blocks: the checkpoint's own scale_inv). The fp8 codes and block scales are the
// ones loaded (a checkpoint's bytes as shipped), read back exactly; nothing is re-quantized.
// int4_group_sym (method RAWINT4) in compressed-tensors' pack-quantized layout, G the group size: weights as
// offset-binary nibbles u = q + 8, element 2i in the low nibble of byte i (= little-endian int32 words of 8,
// `weight_packed`), scales bf16 (`weight_scale`), n a multiple of G:
//   w13_weight[r]: gate rows [r n, (r+1) n) as [n, H/2] bytes, then up's;  w13_scale[r]: [n, H/G] bf16 each
//   w2_weight[r]:  down columns [r n, (r+1) n) as [H, n/2] bytes;          w2_scale[r]:  [H, n/G] bf16
// The bytes and scales of a RAWINT4 checkpoint come back exactly; a scale that is not a bf16 value (weights
// quantized by kt, or GPTQ's fp16 scales) is FailedPrecondition (the pieces before it are written). The
// other integer formats have no GPU layout here (the original implements it for none of its AMXINT8/AMXINT4
// kernels): Unimplemented.
//
// `expert_id` is a physical slot of the layer (slot i holds logical expert physical_to_logical[i] of the
// load), the index of the GPU layer's expert arrays.
#ifndef KT_MOE_GPU_EXPERT_BUFFERS_H_
#define KT_MOE_GPU_EXPERT_BUFFERS_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/packed_experts.h"
#include "kt/runtime/task_queue.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

// Addresses of host buffers, one per GPU TP rank (each points at this expert's place in its buffer).
struct GpuExpertBuffers {
  std::vector<std::uintptr_t> w13_weight, w13_scale, w2_weight, w2_scale;
};

// Whether the format has a GPU layout here (bf16, fp8_block, int4_group_sym).
bool HasGpuExpertLayout(ExpertFormat format);

// Checks everything WriteExpertToGpuBuffers needs, writing nothing: the format has a GPU layout
// (Unimplemented otherwise), the weights have loaded (FailedPrecondition), tp >= 1 divides I and, for
// fp8_block with tp > 1, I / tp is a multiple of the 128-wide block (InvalidArgument), expert_id in [0, E)
// (OutOfRange), each list used has tp non-null addresses (InvalidArgument naming the list and the index);
// int4_group_sym: I / tp a multiple of the group size (InvalidArgument).
absl::Status CheckGpuExpertWrite(const PackedExperts& experts, int tp, int expert_id, const GpuExpertBuffers& b);

// Checks as above, then writes expert `expert_id` into the buffers (the layout at the top of this file),
// one 16-row panel at a time straight from the packed weights (16 rows of scratch per thread, allocated per
// call), on `pool` when given (nobody else may be using it), else on the calling thread.
absl::Status WriteExpertToGpuBuffers(const PackedExperts& experts, int tp, int expert_id,
                                     const GpuExpertBuffers& b, ThreadPool* pool = nullptr);

// WriteExpertToGpuBuffers of one layer as a QueuedTask (one per submit: the arguments are its own). The
// layer (and `pool`, may be null) must outlive the task's run; `compute_mutex`, if given, is held while
// writing (a reload swaps the weights under it, and the forwards share the pool under it).
class GpuExpertWrite {
 public:
  GpuExpertWrite(const MoeLayer* layer, ThreadPool* pool, int tp, int expert_id, GpuExpertBuffers buffers,
                 std::mutex* compute_mutex = nullptr);
  QueuedTask* task() { return &task_; }
  absl::Status Run();

 private:
  const MoeLayer* layer_;
  ThreadPool* pool_;
  int tp_, expert_id_;
  GpuExpertBuffers b_;
  std::mutex* compute_mutex_;
  QueuedTask task_;
};

}  // namespace kt

#endif  // KT_MOE_GPU_EXPERT_BUFFERS_H_
