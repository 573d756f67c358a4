// libFuzzer entry point for ParseMoeConfig (and through it the JSON parser, fractions allowed) over
// config.json text. Build it outside Bazel as the safetensors one (kt/io/README.md), with kt/io/arch.cc and
// kt/io/json.cc; arch_fuzz_test runs it over a deterministic corpus under ASan/UBSan on every test run.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/io/arch.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // An exactly-sized copy, so that reading one byte past the end hits ASan's redzone.
  std::unique_ptr<char[]> copy(new char[size == 0 ? 1 : size]);
  for (size_t i = 0; i < size; ++i) copy[i] = static_cast<char>(data[i]);
  absl::StatusOr<kt::MoeArch> arch = kt::ParseMoeConfig(absl::string_view(copy.get(), size), "<fuzz>");
  if (!arch.ok()) return 0;
  // What a parsed config promises; a violation is a bug the fuzzer should report.
  const kt::MoeArch& a = *arch;
  if (a.num_layers < 1 || a.num_experts < 1 || a.top_k < 1 || a.top_k > a.num_experts || a.hidden < 1 ||
      a.intermediate < 1 || a.moe_layers.empty()) {
    std::abort();
  }
  int previous = -1;
  for (int layer : a.moe_layers) {
    if (layer <= previous || layer >= a.num_layers || !a.IsMoeLayer(layer)) std::abort();
    previous = layer;
    if (a.fused_experts()) {
      if (!kt::FusedExpertTensorNames(a, layer).ok()) std::abort();
    } else if (!kt::ExpertTensorNames(a, layer, 0).ok() ||
               !kt::ExpertTensorNames(a, layer, a.num_experts - 1).ok()) {
      std::abort();
    }
    if (!kt::RouterTensorName(a, layer).ok()) std::abort();
  }
  return 0;
}
