// Single-thread GGUF GEMM kernels per path and ggml type on expert shapes:
//   bazel run -c opt //kt/kernels:gemm_gguf_benchmark [-- --benchmark_filter=...]
// Counters: GOPS (2*M*N*K per call) and weight GB/s (the type's own bytes streamed per call). The prepared
// activation rows (Q8_0 / Q8_K, or bf16) are made once, outside the timed loop, as the layer does per row.
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_benchmark.h"
#include "kt/kernels/gemm_gguf.h"
#include "kt/kernels/gguf_quants.h"

namespace kt {
namespace {

void BM_GemmGguf(benchmark::State& state) {
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  const GgufType type = kGgufTypes[state.range(4)];
  const GemmPath<GemmGgufFn>* path = gemm_benchmark::PathOf(state, GemmGgufPaths());
  if (path == nullptr) return;
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> w(n * GgufRowBytes(type, k));
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  // Finite fp16/bf16/f32 everywhere: clear the exponent's top bit of every 16-bit word (the values stay
  // random; the kernels' speed does not depend on them).
  for (size_t i = 1; i < w.size(); i += 2) w[i] &= 0xbf;
  std::normal_distribution<float> dist;
  std::vector<bf16_t> x(m * k);
  for (auto& v : x) v = F32ToBf16(dist(rng));
  const size_t ab = GgufActivationBlock(type);
  std::vector<int8_t> qx(m * k);
  std::vector<float> sx(ab ? m * (k / ab) : 0);
  for (size_t r = 0; ab && r < m; ++r) QuantizeGgufActivationRow(&x[r * k], k, ab, &qx[r * k], &sx[r * (k / ab)]);
  GgufRows in;
  in.x = x.data();
  in.qx = qx.data();
  in.sx = sx.data();
  in.ld = k;
  std::vector<float> y(m * n);
  const GemmGgufFn fn = path->fn;
  for (auto _ : state) {
    fn(type, m, k, in, w.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GOPS", m, n, k);
  gemm_benchmark::SetWeightRate(state, static_cast<double>(w.size()));
  state.SetLabel(std::string(path->name) + " " + GgufTypeName(type));
}

// Qwen3-30B-A3B gate/up and down at M = 1 (decode), 8 and 32 (an expert's rows in a 512-token prefill of
// top-8 of 128 experts), every type on every path.
void Shapes(benchmark::internal::Benchmark* b) {
  gemm_benchmark::AddExpertShapes(b, GemmGgufPaths().size(), {1, 8, 32}, static_cast<int>(std::size(kGgufTypes)));
}

BENCHMARK(BM_GemmGguf)->Apply(Shapes)->ArgNames({"path", "M", "N", "K", "type"});

}  // namespace
}  // namespace kt
