// Method LLAMAFILE: a MoE layer's routed experts from a GGUF checkpoint (a .gguf file, a split set or a
// folder; kt/io/gguf_experts.h), their ggml blocks copied into the layer as the file stores them
// (ExpertFormat kGguf for the quantized ggml types, kGgufFloat for F32/F16/BF16; kt-gguf-rows-v1).
//
// The layer is created for the file's types: InspectGgufLayer reads them (and checks the shapes) first,
// then MoeConfig::gguf_types and the format come from its answer; LoadGgufLayer then checks that the layer
// matches the file and copies every expert, parallel over (slot, projection).
#ifndef KT_MOE_GGUF_LOADER_H_
#define KT_MOE_GGUF_LOADER_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "kt/moe/expert_format.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

struct GgufLayerInfo {
  int types[3] = {-1, -1, -1};  // ggml type ids of gate, up, down
  ExpertFormat format = ExpertFormat::kGguf;
  uint64_t file_bytes = 0;  // the layer's expert bytes in the file
};

// The types of layer `layer`'s expert tensors, checked against E, H, I (errors name the tensor, the layer
// and the dimension) and against each other: quantized and float projections in one layer are
// InvalidArgument naming both types.
absl::StatusOr<GgufLayerInfo> InspectGgufLayer(const std::string& path, int layer, int num_experts, int hidden,
                                               int intermediate);

struct GgufLoadStats {
  uint64_t file_bytes = 0;
  double load_seconds = 0;
};

// Copies layer `layer`'s experts into `moe` (created with InspectGgufLayer's format and types: otherwise
// InvalidArgument naming what differs). physical_to_logical: int64[E] or nullptr (identity). On error `moe`
// is left unloaded.
absl::StatusOr<GgufLoadStats> LoadGgufLayer(MoeLayer& moe, const std::string& path, int layer,
                                            const int64_t* physical_to_logical, ThreadPool& pool);

}  // namespace kt

#endif  // KT_MOE_GGUF_LOADER_H_
