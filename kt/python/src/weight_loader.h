// Glue between kt/io (which never depends on kt/moe) and the MoE layer: loads one layer's experts from a
// weight folder (Hugging Face bf16, or kt convert's output) through MoeLayer's streaming per-expert API.
//
// Parallel over (slot, projection) tasks on the layer's pool: each task reads one expert matrix (bf16 into a
// task-local buffer, or its quantized form) and hands it to LoadExpert / LoadExpertQuantized, so at most one
// matrix per thread is held outside the packed weights. A converted layer's checksums are verified first, in
// parallel over 64 MiB chunks, before anything is loaded.
#ifndef KT_PYTHON_SRC_WEIGHT_LOADER_H_
#define KT_PYTHON_SRC_WEIGHT_LOADER_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

struct FolderLoadStats {
  bool converted = false;     // A kt converted folder (else Hugging Face).
  uint64_t file_bytes = 0;    // Expert weight bytes read from the folder.
  double verify_seconds = 0;  // Checksums (converted folders).
  double load_seconds = 0;    // Read + quantize (HF, quantized methods) + pack.
};

// Loads MoE layer `layer` of `dir` into `moe` for `method` (a KTMoEWrapper method; kt/io/method.h gives its
// layout, which must be the layer's: QuantSpecOf(moe.format()) for a quantized method, bf16 for BF16).
// physical_to_logical: int64[E] (slot i holds logical expert map[i]) or nullptr for the identity.
// On error `moe` is left unloaded (Forward refuses it), so a caller that must keep its current weights
// loads into MoeLayer::CreateStaging() and adopts them on success (the Python binding does); the error names
// the file, tensor and expected value (kt/io/layer_experts.h).
absl::StatusOr<FolderLoadStats> LoadLayerFromFolder(MoeLayer& moe, const std::string& dir, int layer,
                                                    const std::string& method, int group_size,
                                                    const int64_t* physical_to_logical, ThreadPool& pool);

}  // namespace kt

#endif  // KT_PYTHON_SRC_WEIGHT_LOADER_H_
