// Single-thread FP8 block-scaled GEMM kernels per path on expert shapes:
//   bazel run -c opt //kt/kernels:gemm_fp8_benchmark
// Counters: GFLOPS (2*M*N*K per call) and weight GB/s (fp8 codes + block scales streamed per call).
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_benchmark.h"
#include "kt/kernels/gemm_fp8.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

void BM_GemmFp8(benchmark::State& state) {
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  const GemmPath<GemmFp8Fn>* path = gemm_benchmark::PathOf(state, GemmFp8Paths());
  if (path == nullptr) return;
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  std::vector<bf16_t> x(m * k), w(n * k);
  for (auto& v : x) v = F32ToBf16(dist(rng));
  for (auto& v : w) v = F32ToBf16(0.02f * dist(rng));
  const auto qm = Quantize(QuantSpec{QuantFormat::kFp8Block128, 0}, w.data(), k, n, k);
  std::vector<uint8_t> panels(PackedFp8Bytes(n, k));
  std::vector<float> scales(PackedFp8Scales(n, k));
  if (!qm.ok() || !PackFp8(*qm, panels.data(), scales.data()).ok()) {
    state.SkipWithError("quantizing or packing failed");
    return;
  }
  std::vector<float> y(m * n);
  const GemmFp8Fn fn = path->fn;
  for (auto _ : state) {
    fn(m, k, x.data(), k, panels.data(), scales.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GFLOPS", m, n, k);
  gemm_benchmark::SetWeightRate(state, panels.size() + scales.size() * 4.0);
  state.SetLabel(path->name);
}

// Qwen3-30B-A3B gate/up and down at M = 1 (decode), 8, 32 (prefill rows per expert); DeepSeek-V3's expert
// gate/up (N = 2048, K = 7168) and down (N = 7168, K = 2048) at M = 1.
void Shapes(benchmark::internal::Benchmark* b) {
  gemm_benchmark::AddExpertShapes(b, GemmFp8Paths().size(), {1, 2, 4, 8, 32});
  for (int path = 0; path < static_cast<int>(GemmFp8Paths().size()); ++path) {
    b->Args({path, 1, 2048, 7168});
    b->Args({path, 1, 7168, 2048});
  }
}

BENCHMARK(BM_GemmFp8)->Apply(Shapes)->ArgNames({"path", "M", "N", "K"});

}  // namespace
}  // namespace kt
