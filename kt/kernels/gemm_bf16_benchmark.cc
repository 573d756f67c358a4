// Single-thread BF16 GEMM kernels per path on expert shapes:
//   bazel run -c opt //kt/kernels:gemm_bf16_benchmark
// Counters: GFLOPS (2*M*N*K per call) and weight GB/s (packed bytes streamed per call).
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_bf16.h"

namespace kt {
namespace {

void BM_GemmBf16(benchmark::State& state) {
  const Isa isa = static_cast<Isa>(state.range(0));
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  if (!IsaSupported(isa, GetCpuFeatures()) || GetGemmBf16(isa) == nullptr) {
    state.SkipWithError("path not supported on this CPU");
    return;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  std::vector<bf16_t> x(m * k), w(n * k), packed(PackedBf16Size(n, k));
  for (auto& v : x) v = F32ToBf16(dist(rng));
  for (auto& v : w) v = F32ToBf16(dist(rng));
  PackBf16(w.data(), k, n, k, packed.data());
  std::vector<float> y(m * n);
  const GemmBf16Fn fn = GetGemmBf16(isa);
  for (auto _ : state) {
    fn(m, k, x.data(), k, packed.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  const double calls = static_cast<double>(state.iterations());
  state.counters["GFLOPS"] = benchmark::Counter(2.0 * m * n * k * calls * 1e-9,
                                                benchmark::Counter::kIsRate);
  state.counters["weightGB/s"] = benchmark::Counter(packed.size() * 2.0 * calls * 1e-9,
                                                    benchmark::Counter::kIsRate);
  state.SetLabel(IsaName(isa));
}

void Shapes(benchmark::internal::Benchmark* b) {
  for (int isa = 0; isa <= static_cast<int>(Isa::kAmx); ++isa) {
    // Qwen3-30B-A3B gate/up (N=I=768, K=H=2048) and down (N=2048, K=768); M = 1 (decode), 8 and 16 (where
    // AMX tiles start to pay), 32 (the mean rows per expert at qlen 512, k=8, E=128) and 256 (qlen 4096).
    for (int m : {1, 8, 16, 32, 256}) {
      b->Args({isa, m, 768, 2048});
      b->Args({isa, m, 2048, 768});
    }
  }
}

BENCHMARK(BM_GemmBf16)->Apply(Shapes)->ArgNames({"isa", "M", "N", "K"});

// The AMX kernel's K block on MoE task shapes: 128 and 256 output columns of the Qwen3-235B-A22B gate/up
// (K=H=4096) and down (K=I=1536) projections, 64 rows (the default gate/up row chunk) and 256 (an expert's
// rows at qlen 4096), rows padded by a cache line as the layer pads them. kb = 0 is the unblocked schedule.
void BM_GemmBf16AmxKBlock(benchmark::State& state) {
  const size_t kb = state.range(0), m = state.range(1), n = state.range(2), k = state.range(3);
  const size_t ldx = k + state.range(4);  // padded row stride: rows 2^n bytes apart share an L1 set
  if (!IsaSupported(Isa::kAmx, GetCpuFeatures())) {
    state.SkipWithError("AMX not supported on this CPU");
    return;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  std::vector<bf16_t> x(m * ldx), w(n * k), packed(PackedBf16Size(n, k));
  for (auto& v : x) v = F32ToBf16(dist(rng));
  for (auto& v : w) v = F32ToBf16(dist(rng));
  PackBf16(w.data(), k, n, k, packed.data());
  std::vector<float> y(m * n);
  for (auto _ : state) {
    internal::GemmBf16AmxKBlocked(kb, m, k, x.data(), ldx, packed.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOPS"] = benchmark::Counter(2.0 * m * n * k * state.iterations() * 1e-9,
                                                benchmark::Counter::kIsRate);
}
BENCHMARK(BM_GemmBf16AmxKBlock)
    ->ArgsProduct({{0, 256, 512, 1024}, {64, 256}, {128, 256}, {4096, 1536}, {32}})
    ->ArgNames({"kb", "M", "N", "K", "pad"});

}  // namespace
}  // namespace kt
