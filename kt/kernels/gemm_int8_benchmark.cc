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
#include "kt/kernels/gemm_benchmark.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

// Random int8 activations (m rows `ldx` apart) and an n x k int8 weight matrix packed for the kernels, with
// per-token and per-row scales: drawn from [1e-3, 1e-2) after the values, or all 1e-3.
struct Operands {
  std::vector<int8_t> qx, panels;
  std::vector<float> sx, scales;
  std::vector<int32_t> rowsums;
  double weight_bytes() const { return panels.size() + scales.size() * 4.0 + rowsums.size() * 4.0; }
};

Operands RandomOperands(size_t m, size_t ldx, size_t n, size_t k, bool random_scales) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> q(-127, 127);
  std::uniform_real_distribution<float> s(1e-3f, 1e-2f);
  Operands o{std::vector<int8_t>(m * ldx), std::vector<int8_t>(PackedInt8Bytes(n, k)),
             std::vector<float>(m, 1e-3f), std::vector<float>(PackedInt8Rows(n)),
             std::vector<int32_t>(PackedInt8Rows(n))};
  std::vector<int8_t> qw(n * k);
  std::vector<float> sw(n, 1e-3f);
  for (auto& v : o.qx) v = static_cast<int8_t>(q(rng));
  for (auto& v : qw) v = static_cast<int8_t>(q(rng));
  if (random_scales) {
    for (auto& v : o.sx) v = s(rng);
    for (auto& v : sw) v = s(rng);
  }
  PackInt8(qw.data(), k, sw.data(), n, k, o.panels.data(), o.scales.data(), o.rowsums.data());
  return o;
}

void BM_GemmInt8(benchmark::State& state) {
  const size_t m = state.range(1), n = state.range(2), k = state.range(3);
  const GemmPath<GemmInt8Fn>* path = gemm_benchmark::PathOf(state, GemmInt8Paths());
  if (path == nullptr) return;
  const Operands o = RandomOperands(m, k, n, k, /*random_scales=*/true);
  std::vector<float> y(m * n);
  const GemmInt8Fn fn = path->fn;
  for (auto _ : state) {
    fn(m, k, o.qx.data(), k, o.sx.data(), o.panels.data(), o.scales.data(), o.rowsums.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GOPS", m, n, k);
  gemm_benchmark::SetWeightRate(state, o.weight_bytes());
  state.SetLabel(path->name);
}

// Same shapes as gemm_bf16_benchmark: Qwen3-30B-A3B gate/up and down; M = 1 (decode), 8 and 16 (AMX tiles
// start), 32 (mean rows per expert at qlen 512) and 256.
void Shapes(benchmark::internal::Benchmark* b) {
  gemm_benchmark::AddExpertShapes(b, GemmInt8Paths().size(), {1, 8, 16, 32, 256});
}

BENCHMARK(BM_GemmInt8)->Apply(Shapes)->ArgNames({"path", "M", "N", "K"});

// The AMX kernel's K block on MoE task shapes (see gemm_bf16_benchmark): 128 and 256 columns of the
// Qwen3-235B-A22B gate/up (K=4096) and down (K=1536), 64 and 256 rows, padded rows. kb = 0 is unblocked.
void BM_GemmInt8AmxKBlock(benchmark::State& state) {
  const size_t kb = state.range(0), m = state.range(1), n = state.range(2), k = state.range(3);
  const size_t ldx = k + state.range(4);  // padded row stride: rows 2^n bytes apart share an L1 set
  if (!gemm_benchmark::AmxRunsHere(state)) return;
  const Operands o = RandomOperands(m, ldx, n, k, /*random_scales=*/false);
  std::vector<float> y(m * n);
  for (auto _ : state) {
    internal::GemmInt8AmxKBlocked(kb, m, k, o.qx.data(), ldx, o.sx.data(), o.panels.data(), o.scales.data(),
                                  o.rowsums.data(), n, y.data(), n);
    benchmark::DoNotOptimize(y.data());
  }
  gemm_benchmark::SetOpsRate(state, "GOPS", m, n, k);
}
BENCHMARK(BM_GemmInt8AmxKBlock)
    ->ArgsProduct({{0, 512, 1024, 2048}, {64, 256}, {128, 256}, {4096, 1536}, {64}})
    ->ArgNames({"kb", "M", "N", "K", "pad"});

}  // namespace
}  // namespace kt
