// What the single-thread GEMM benchmarks (gemm_{bf16,int8,int4}_benchmark.cc) share: the path of a
// family's table and the skip on a CPU without it, the expert shapes they run, and their rate counters. Plain C++: no ISA flags.
#ifndef KT_KERNELS_GEMM_BENCHMARK_H_
#define KT_KERNELS_GEMM_BENCHMARK_H_

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/gemm_path.h"

namespace kt {
namespace gemm_benchmark {

// The path state.range(0) indexes in a family's table (GemmBf16Paths(), ...), or nullptr, with the
// benchmark skipped, if this CPU cannot run it.
template <typename Fn>
const GemmPath<Fn>* PathOf(benchmark::State& state, const GemmPaths<Fn>& table) {
  const size_t i = static_cast<size_t>(state.range(0));
  if (i < table.size() && IsaSupported(table[i].isa, GetCpuFeatures())) return &table[i];
  state.SkipWithError("path not supported on this CPU");
  return nullptr;
}

// False, with the benchmark skipped, unless this CPU has AMX (for the AMX-only K-block benchmarks).
inline bool AmxRunsHere(benchmark::State& state) {
  if (IsaSupported(Isa::kAmx, GetCpuFeatures())) return true;
  state.SkipWithError("AMX not supported on this CPU");
  return false;
}

// For every path of a family's table (`paths` entries), Qwen3-30B-A3B gate/up (N=I=768, K=H=2048) and down
// (N=2048, K=768) at each M of `ms`, as arguments {path, M, N, K}; with formats > 0, {path, M, N, K, fmt}
// for each fmt in [0, formats) (per path, outside M).
inline void AddExpertShapes(benchmark::internal::Benchmark* b, size_t paths, std::initializer_list<int> ms,
                            int formats = 0) {
  for (int path = 0; path < static_cast<int>(paths); ++path) {
    for (int fmt = 0; fmt < (formats > 0 ? formats : 1); ++fmt) {
      for (int m : ms) {
        if (formats > 0) {
          b->Args({path, m, 768, 2048, fmt});
          b->Args({path, m, 2048, 768, fmt});
        } else {
          b->Args({path, m, 768, 2048});
          b->Args({path, m, 2048, 768});
        }
      }
    }
  }
}

// The arithmetic rate of one M x N x K product per iteration: 2*M*N*K per call (a multiply-add counts 2),
// as counter `name` ("GFLOPS" for the float kernels, "GOPS" for the integer ones).
inline void SetOpsRate(benchmark::State& state, const char* name, size_t m, size_t n, size_t k) {
  state.counters[name] = benchmark::Counter(2.0 * m * n * k * static_cast<double>(state.iterations()) * 1e-9,
                                            benchmark::Counter::kIsRate);
}

// "weightGB/s": the packed weight bytes one call streams, per second.
inline void SetWeightRate(benchmark::State& state, double weight_bytes) {
  state.counters["weightGB/s"] = benchmark::Counter(
      weight_bytes * static_cast<double>(state.iterations()) * 1e-9, benchmark::Counter::kIsRate);
}

}  // namespace gemm_benchmark
}  // namespace kt

#endif  // KT_KERNELS_GEMM_BENCHMARK_H_
