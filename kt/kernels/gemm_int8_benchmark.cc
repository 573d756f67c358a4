// Single-thread INT8 GEMM kernels per path on expert shapes:
//   bazel run -c opt //kt/kernels:gemm_int8_benchmark
// Counters: GOPS (2*M*N*K integer multiply-adds counted as 2 ops per call) and weight GB/s (packed panel
// bytes plus the fp32 scales and int32 row sums streamed per call). Activation quantization is not timed:
// it is per token, shared by every expert the token visits.
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

void BM_GemmInt8(benchmark::State& state) {
  const Isa isa = static_cast<Isa>(state.range(0));
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  if (!IsaSupported(isa, GetCpuFeatures()) || GetGemmInt8(isa) == nullptr) {
    state.SkipWithError("path not supported on this CPU");
    return;
  }
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> q(-127, 127);
  std::uniform_real_distribution<float> s(1e-3f, 1e-2f);
  std::vector<int8_t> qx(m * k), qw(n * k), panels(PackedInt8Bytes(n, k));
  std::vector<float> sx(m), sw(n), scales(PackedInt8Rows(n));
  std::vector<int32_t> rowsums(PackedInt8Rows(n));
  for (auto& v : qx) v = static_cast<int8_t>(q(rng));
  for (auto& v : qw) v = static_cast<int8_t>(q(rng));
  for (auto& v : sx) v = s(rng);
  for (auto& v : sw) v = s(rng);
  PackInt8(qw.data(), k, sw.data(), n, k, panels.data(), scales.data(), rowsums.data());
  std::vector<float> y(m * n);
  const GemmInt8Fn fn = GetGemmInt8(isa);
  for (auto _ : state) {
    fn(m, k, qx.data(), k, sx.data(), panels.data(), scales.data(), rowsums.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  const double calls = static_cast<double>(state.iterations());
  const double weight_bytes = panels.size() + scales.size() * 4.0 + rowsums.size() * 4.0;
  state.counters["GOPS"] = benchmark::Counter(2.0 * m * n * k * calls * 1e-9, benchmark::Counter::kIsRate);
  state.counters["weightGB/s"] = benchmark::Counter(weight_bytes * calls * 1e-9, benchmark::Counter::kIsRate);
  state.SetLabel(IsaName(isa));
}

void Shapes(benchmark::internal::Benchmark* b) {
  for (int isa = 0; isa <= static_cast<int>(Isa::kAmx); ++isa) {
    // Same shapes as gemm_bf16_benchmark: Qwen3-30B-A3B gate/up (N=I=768, K=H=2048) and down (N=2048,
    // K=768); M = 1 (decode), 8 and 16 (AMX tiles start), 32 (mean rows per expert at qlen 512) and 256.
    for (int m : {1, 8, 16, 32, 256}) {
      b->Args({isa, m, 768, 2048});
      b->Args({isa, m, 2048, 768});
    }
  }
}

BENCHMARK(BM_GemmInt8)->Apply(Shapes)->ArgNames({"isa", "M", "N", "K"});

// The AMX kernel's K block on MoE task shapes (see gemm_bf16_benchmark): 128 and 256 columns of the
// Qwen3-235B-A22B gate/up (K=4096) and down (K=1536), 64 and 256 rows, padded rows. kb = 0 is unblocked.
void BM_GemmInt8AmxKBlock(benchmark::State& state) {
  const size_t kb = state.range(0), m = state.range(1), n = state.range(2), k = state.range(3);
  const size_t ldx = k + state.range(4);  // padded row stride: rows 2^n bytes apart share an L1 set
  if (!IsaSupported(Isa::kAmx, GetCpuFeatures())) {
    state.SkipWithError("AMX not supported on this CPU");
    return;
  }
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> q(-127, 127);
  std::vector<int8_t> qx(m * ldx), qw(n * k), panels(PackedInt8Bytes(n, k));
  std::vector<float> sx(m, 1e-3f), sw(n, 1e-3f), scales(PackedInt8Rows(n));
  std::vector<int32_t> rowsums(PackedInt8Rows(n));
  for (auto& v : qx) v = static_cast<int8_t>(q(rng));
  for (auto& v : qw) v = static_cast<int8_t>(q(rng));
  PackInt8(qw.data(), k, sw.data(), n, k, panels.data(), scales.data(), rowsums.data());
  std::vector<float> y(m * n);
  for (auto _ : state) {
    internal::GemmInt8AmxKBlocked(kb, m, k, qx.data(), ldx, sx.data(), panels.data(), scales.data(),
                                  rowsums.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GOPS"] = benchmark::Counter(2.0 * m * n * k * state.iterations() * 1e-9,
                                              benchmark::Counter::kIsRate);
}
BENCHMARK(BM_GemmInt8AmxKBlock)
    ->ArgsProduct({{0, 512, 1024, 2048}, {64, 256}, {128, 256}, {4096, 1536}, {64}})
    ->ArgNames({"kb", "M", "N", "K", "pad"});

}  // namespace
}  // namespace kt
