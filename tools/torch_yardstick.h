// `kt bench`'s PyTorch yardstick: tools/torch_moe_bench.py (a bf16 eager loop over experts) run as a child
// process on the same shape, threads and token counts, its JSON lines parsed.
#ifndef KT_TOOLS_TORCH_YARDSTICK_H_
#define KT_TOOLS_TORCH_YARDSTICK_H_

#include <cmath>
#include <cstdint>
#include <string>

namespace kt {
namespace tools {

struct TorchRequest {
  bool enabled = true;       // false: --no-torch
  std::string python;        // the interpreter
  std::string torch_script;  // --torch-script ("" : $KT_TORCH_BENCH, then the runfiles, then the workspace)
  int threads = 1;
  int experts = 0, top_k = 0, hidden = 0, intermediate = 0;
  int qlen_decode = 1, qlen_prefill = 512;
  uint64_t seed = 1;
};

struct TorchResult {
  bool ok = false;
  double decode_seconds = std::nan("");
  double prefill_seconds = std::nan("");
  double prefill_tflops = std::nan("");
  // The prefill's FLOPs as dense GEMMs with balanced routing (torch.bmm bf16; torch._int_mm int8 where the
  // build has it): the GEMM library's ceiling on this machine, beside kt's layer.
  double dense_seconds = std::nan("");
  double dense_tflops = std::nan("");
  double dense_int8_seconds = std::nan("");
  double dense_int8_tops = std::nan("");
};

// Whether `name` is something the shell can run: a path (it has a '/') that is executable, or a bare name
// found executable in a folder of $PATH, as the shell looks it up. RunTorch checks --python with it.
bool Runnable(const std::string& name);

// Runs the script (printing its output, indented) or says why it was skipped: --no-torch, an interpreter
// that is neither an executable path nor a command on $PATH, no torch in it, or no script found.
TorchResult RunTorch(const TorchRequest& request);

// The dense GEMM lines of `result` (if it has them) against kt's prefill time per layer; flushes stdout.
void PrintDenseComparison(const TorchResult& result, double kt_prefill_seconds);

}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_TORCH_YARDSTICK_H_
