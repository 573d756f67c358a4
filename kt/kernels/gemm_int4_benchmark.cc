// Single-thread INT4 GEMM kernels per path and format on expert shapes:
//   bazel run -c opt //kt/kernels:gemm_int4_benchmark
// Counters: GOPS (2*M*N*K multiply-adds per call) and weight GB/s (packed nibble bytes plus the fp32 scales
// and, for asym, the zero points streamed per call). Activation quantization and its group sums are not
// timed: they are per token, shared by every expert the token visits.
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_benchmark.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

// range(4): 0 = kt-int4-channel-v1, 1 = group128-sym, 2 = group128-asym, 3 = group32-asym.
QuantSpec SpecOf(int64_t i) {
  switch (i) {
    case 0: return {QuantFormat::kInt4PerChannel, 0};
    case 1: return {QuantFormat::kInt4GroupSym, 128};
    case 2: return {QuantFormat::kInt4GroupAsym, 128};
    default: return {QuantFormat::kInt4GroupAsym, 32};
  }
}

void BM_GemmInt4(benchmark::State& state) {
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  const QuantSpec spec = SpecOf(state.range(4));
  const GemmPath<GemmInt4Fn>* path = gemm_benchmark::PathOf(state, GemmInt4Paths());
  if (path == nullptr) return;
  std::mt19937 rng(1);
  std::normal_distribution<float> wd;
  std::uniform_int_distribution<int> q(-127, 127);
  std::vector<bf16_t> w(n * k);
  for (auto& v : w) v = F32ToBf16(wd(rng));
  const auto qm = Quantize(spec, w.data(), k, n, k);
  if (!qm.ok()) {
    state.SkipWithError("quantize failed");
    return;
  }
  const size_t group = Int4KernelGroup(spec), groups = Int4Groups(k, group);
  std::vector<uint8_t> panels(PackedInt4Bytes(n, k));
  std::vector<float> scales(PackedInt4Scales(n, k, group));
  std::vector<uint8_t> zeros(IsAsymFormat(spec.format) ? scales.size() : 0);
  if (!PackInt4(*qm, panels.data(), scales.data(), zeros.empty() ? nullptr : zeros.data()).ok()) {
    state.SkipWithError("pack failed");
    return;
  }
  std::vector<int8_t> qx(m * k);
  for (auto& v : qx) v = static_cast<int8_t>(q(rng));
  std::vector<float> sx(m * groups, 0.01f);
  std::vector<int32_t> xsum(m * groups);
  Int4ActivationSums(m, k, group, qx.data(), k, xsum.data());
  std::vector<float> y(m * n);
  const GemmInt4Fn fn = path->fn;
  for (auto _ : state) {
    fn(m, k, group, qx.data(), k, sx.data(), xsum.data(), panels.data(), scales.data(),
       zeros.empty() ? nullptr : zeros.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GOPS", m, n, k);
  gemm_benchmark::SetWeightRate(state, panels.size() + scales.size() * 4.0 + zeros.size());
  state.SetLabel(std::string(path->name) + " " + QuantLayoutTag(spec));
}

// Qwen3-30B-A3B gate/up and down, as gemm_int8_benchmark, in each of the 4 formats of SpecOf.
void Shapes(benchmark::internal::Benchmark* b) {
  gemm_benchmark::AddExpertShapes(b, GemmInt4Paths().size(), {1, 4, 32, 256}, 4);
}

BENCHMARK(BM_GemmInt4)->Apply(Shapes)->ArgNames({"path", "M", "N", "K", "fmt"});

}  // namespace
}  // namespace kt
