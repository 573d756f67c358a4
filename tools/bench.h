// `kt bench`: the routed experts of one MoE layer timed at decode and prefill, every rate printed beside a
// yardstick measured in the same run (read bandwidth, the kernel path's peak, PyTorch). The layer is either
// synthetic (a named shape, random weights, --format) or a real one read from a weight folder (--weights,
// kt/moe/layer_loader.h).
#ifndef KT_TOOLS_BENCH_H_
#define KT_TOOLS_BENCH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "kt/moe/moe_layer.h"

namespace kt {
namespace tools {

struct BenchShape {
  std::string name;
  int experts = 0, top_k = 0, hidden = 0, intermediate = 0;
  int layers = 0;  // MoE layers of the model (for the per-model extrapolation)
};

// The synthetic shapes --shape names.
const std::vector<BenchShape>& BenchShapes();

struct BenchFlags {
  BenchShape shape = BenchShapes()[0];
  int threads = 0;  // 0: the CPUs of this process's affinity mask
  bool pin = false;
  int qlen_decode = 1;
  int qlen_prefill = 512;
  int iters = 100;
  int prefill_iters = 5;
  int bandwidth_mib = 1024;
  int layers = 0;  // 0: enough copies of the layer to exceed 4x the last-level cache.
  uint64_t seed = 1;
  bool torch = true;
  ExpertFormat format = ExpertFormat::kBf16;
  MoeTiling tiling;              // 0, 0: the layer's own choice
  std::vector<MoeTiling> sweep;  // --sweep-tiling: prefill re-timed under each
  int group_size = 128;
  std::string python;
  std::string torch_script;
  // A real layer instead of a synthetic one: the folder (Hugging Face or kt convert), the MoE layer (-1: the
  // first) and the KTMoEWrapper method ("": the converted folder's own, BF16 for a Hugging Face folder).
  std::string weights;
  int layer = -1;
  std::string method;
};

// Runs the benchmark; the process's exit code (0, 1 for a failed run, 2 for a kernel path KT_ISA asks for
// that this CPU cannot run).
int RunBench(BenchFlags flags);

}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_BENCH_H_
