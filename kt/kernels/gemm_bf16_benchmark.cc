// Single-thread BF16 GEMM kernels per path on expert shapes:
//   bazel run -c opt //kt/kernels:gemm_bf16_benchmark
// Counters: GFLOPS (2*M*N*K per call) and weight GB/s (packed bytes streamed per call).
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_benchmark.h"
#include "kt/kernels/gemm_bf16.h"

namespace kt {
namespace {

// N(0,1) bf16 activations (m rows `ldx` apart) and an n x k weight matrix packed for the kernels.
struct Operands {
  std::vector<bf16_t> x, packed;
};

Operands RandomOperands(size_t m, size_t ldx, size_t n, size_t k) {
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  Operands o{std::vector<bf16_t>(m * ldx), std::vector<bf16_t>(PackedBf16Size(n, k))};
  std::vector<bf16_t> w(n * k);
  for (auto& v : o.x) v = F32ToBf16(dist(rng));
  for (auto& v : w) v = F32ToBf16(dist(rng));
  PackBf16(w.data(), k, n, k, o.packed.data());
  return o;
}

void BM_GemmBf16(benchmark::State& state) {
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  const GemmPath<GemmBf16Fn>* path = gemm_benchmark::PathOf(state, GemmBf16Paths());
  if (path == nullptr) return;
  const Operands o = RandomOperands(m, k, n, k);
  std::vector<float> y(m * n);
  const GemmBf16Fn fn = path->fn;
  for (auto _ : state) {
    fn(m, k, o.x.data(), k, o.packed.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GFLOPS", m, n, k);
  gemm_benchmark::SetWeightRate(state, o.packed.size() * 2.0);
  state.SetLabel(path->name);
}

// Qwen3-30B-A3B gate/up and down; M = 1 (decode), 8 and 16 (where AMX tiles start to pay), 32 (the mean
// rows per expert at qlen 512, k=8, E=128) and 256 (qlen 4096).
void Shapes(benchmark::internal::Benchmark* b) {
  gemm_benchmark::AddExpertShapes(b, GemmBf16Paths().size(), {1, 8, 16, 32, 256});
}

BENCHMARK(BM_GemmBf16)->Apply(Shapes)->ArgNames({"path", "M", "N", "K"});

// The AMX kernel's K block on MoE task shapes: 128 and 256 output columns of the Qwen3-235B-A22B gate/up
// (K=H=4096) and down (K=I=1536) projections, 64 rows (the default gate/up row chunk) and 256 (an expert's
// rows at qlen 4096), rows padded by a cache line as the layer pads them. kb = 0 is the unblocked schedule.
void BM_GemmBf16AmxKBlock(benchmark::State& state) {
  const size_t kb = state.range(0), m = state.range(1), n = state.range(2), k = state.range(3);
  const size_t ldx = k + state.range(4);  // padded row stride: rows 2^n bytes apart share an L1 set
  if (!gemm_benchmark::AmxRunsHere(state)) return;
  const Operands o = RandomOperands(m, ldx, n, k);
  std::vector<float> y(m * n);
  for (auto _ : state) {
    internal::GemmBf16AmxKBlocked(kb, m, k, o.x.data(), ldx, o.packed.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GFLOPS", m, n, k);
}
BENCHMARK(BM_GemmBf16AmxKBlock)
    ->ArgsProduct({{0, 256, 512, 1024}, {64, 256}, {128, 256}, {4096, 1536}, {32}})
    ->ArgNames({"kb", "M", "N", "K", "pad"});

}  // namespace
}  // namespace kt
