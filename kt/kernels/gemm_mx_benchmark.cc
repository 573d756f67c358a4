// Single-thread MXFP4 / MXFP8 GEMM kernels per path on expert shapes, beside each other:
//   bazel run -c opt //kt/kernels:gemm_mx_benchmark
// Counters: GFLOPS (2*M*N*K per call) and weight GB/s (codes + E8M0 scale bytes streamed per call).
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_benchmark.h"
#include "kt/kernels/gemm_mx.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

template <bool kFp4>
void BM_GemmMx(benchmark::State& state) {
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  const GemmPath<GemmMxFn>* path = gemm_benchmark::PathOf(state, kFp4 ? GemmMxfp4Paths() : GemmMxfp8Paths());
  if (path == nullptr) return;
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  std::vector<bf16_t> x(m * k), w(n * k);
  for (auto& v : x) v = F32ToBf16(dist(rng));
  for (auto& v : w) v = F32ToBf16(0.02f * dist(rng));
  const auto qm = Quantize(QuantSpec{kFp4 ? QuantFormat::kMxfp4 : QuantFormat::kMxfp8, 0}, w.data(), k, n, k);
  std::vector<uint8_t> panels(PackedMxBytes(kFp4, n, k)), scales(PackedMxScales(n, k));
  if (!qm.ok() || !PackMx(*qm, panels.data(), scales.data()).ok()) {
    state.SkipWithError("quantizing or packing failed");
    return;
  }
  std::vector<float> y(m * n);
  const GemmMxFn fn = path->fn;
  for (auto _ : state) {
    fn(m, k, x.data(), k, panels.data(), scales.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GFLOPS", m, n, k);
  gemm_benchmark::SetWeightRate(state, panels.size() + scales.size());
  state.SetLabel(path->name);
}

// Qwen3-30B-A3B gate/up and down at M = 1 (decode), 8, 32 (prefill rows per expert); DeepSeek-V4-Flash's
// expert gate/up (N = 2048, K = 4096) and down (N = 4096, K = 2048) at M = 1.
void Shapes(benchmark::internal::Benchmark* b) {
  const int paths = static_cast<int>(GemmMxfp4Paths().size());
  gemm_benchmark::AddExpertShapes(b, paths, {1, 2, 4, 8, 32});
  for (int path = 0; path < paths; ++path) {
    b->Args({path, 1, 2048, 4096});
    b->Args({path, 1, 4096, 2048});
  }
}

BENCHMARK(BM_GemmMx<true>)->Name("BM_GemmMxfp4")->Apply(Shapes)->ArgNames({"path", "M", "N", "K"});
BENCHMARK(BM_GemmMx<false>)->Name("BM_GemmMxfp8")->Apply(Shapes)->ArgNames({"path", "M", "N", "K"});

}  // namespace
}  // namespace kt
