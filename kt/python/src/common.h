// What the binding files of _kt share: the one compute mutex and the Status -> Python exception mapping.
#ifndef KT_PYTHON_SRC_COMMON_H_
#define KT_PYTHON_SRC_COMMON_H_

#include <cstdint>
#include <mutex>
#include <string>

#include "absl/status/status.h"
#include "kt/moe/layer_loader.h"
#include "pybind11/pybind11.h"

namespace kt {

// Serializes every compute call of the process (a ThreadPool's ParallelFor is not reentrant and layers own
// per-call scratch); taken with the GIL released.
std::mutex& ComputeMutex();

// A pointer the Python side passes as an int (a tensor's data_ptr(), a layer's address).
template <typename T>
T* Ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// load_from_path's result: what a folder load read and how long it took (MoeLayer and TpMoeLayer alike).
inline pybind11::dict LoadStatsDict(const FolderLoadStats& stats) {
  pybind11::dict d;
  d["converted"] = stats.converted;
  d["file_bytes"] = stats.file_bytes;
  d["verify_seconds"] = stats.verify_seconds;
  d["load_seconds"] = stats.load_seconds;
  return d;
}

// The error of a forward on a layer that has no weights yet (MoeLayer and TpMoeLayer alike).
// load_weights_coded's `kind`: "fp8_block" (F32 [E, ceil(N/128), ceil(K/128)]), "fp8_channel" (F32 [E, N]) or
// "e8m0" (U8 [E, N, K/32]); ValueError otherwise.
inline CodeScales ParseCodeScales(const std::string& kind) {
  if (kind == "fp8_block") return CodeScales::kFp8Block128;
  if (kind == "fp8_channel") return CodeScales::kFp8PerChannel;
  if (kind == "e8m0") return CodeScales::kE8M0;
  throw pybind11::value_error("load_weights_coded: kind must be 'fp8_block', 'fp8_channel' or 'e8m0', got '" + kind +
                              "'");
}

inline absl::Status ForwardBeforeLoadError() {
  return absl::FailedPreconditionError(
      "forward called before the expert weights were loaded; call load_weights or load_weights_from_tensors "
      "first");
}

// InvalidArgument/OutOfRange -> ValueError, Unimplemented -> NotImplementedError, else RuntimeError.
[[noreturn]] void ThrowStatus(const absl::Status& status);

// kt/python/src/sft_bindings.cc: SftMoeLayer, SftBackwardWeights, SftWorkspace, SftCachePool.
void RegisterSftBindings(pybind11::module_& m);

// kt/python/src/serving_bindings.cc: TaskQueue, ServingForward, split_deferred_experts, cuda_runtime_name.
void RegisterServingBindings(pybind11::module_& m);

// kt/python/src/tp_bindings.cc: NodePools, TpMoeLayer, numa_available, numa_node_count.
void RegisterTpBindings(pybind11::module_& m);

}  // namespace kt

#endif  // KT_PYTHON_SRC_COMMON_H_
