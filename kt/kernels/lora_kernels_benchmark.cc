// kt's LoRA kernels (lora_kernels.h) on each of their paths, with Eigen's fp32 products beside them as the
// yardstick, on the small shapes of the SFT engine (docs/LIBRARIES.md has the numbers that decided kt
// keeps its own kernels). A path this CPU lacks is skipped.
// Shapes of Qwen3-30B-A3B (H = 2048, I = 768) at LoRA rank r = 16, with m rows of one expert:
//   Expand:  C[m, I] += s * AX[m, r] B[r, I]        (B (A x) of gate/up: inner dimension r)
//   GradA:   dA[r, H] += s * dB[m, r]^T X[m, H]     (the LoRA gradient: A read transposed)
//   Down:    AX[m, r] = X[m, H] A[r, H]^T, X bf16  (the dot form along H; Eigen first widens X to fp32)
// Built twice: with the default flags (Eigen at SSE2, what a portable build gets) and with -mavx2 -mfma;
// the Eigen rows' label says which. kt's avx512_bf16 and amx paths run the avx512_vnni (AVX3_DL) code
// (hwy_dispatch.h), so they are not repeated.
#include <cstddef>
#include <iterator>
#include <string>
#include <random>
#include <vector>

#include "Eigen/Core"
#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/eigen_views.h"
#include "kt/kernels/lora_kernels.h"

namespace kt {
namespace {

constexpr size_t kHidden = 2048, kInter = 768, kRank = 16;
constexpr float kScale = 2.0f;

#ifdef __AVX2__
constexpr const char* kEigenBuild = "eigen -mavx2 -mfma";
#else
constexpr const char* kEigenBuild = "eigen baseline x86-64 (SSE2)";
#endif

std::vector<float> Random(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (float& e : v) e = nd(rng);
  return v;
}

std::vector<bf16_t> RandomBf16(size_t n, uint32_t seed) {
  std::vector<bf16_t> v(n);
  const std::vector<float> f = Random(n, seed);
  for (size_t i = 0; i < n; ++i) v[i] = F32ToBf16(f[i]);
  return v;
}

// The second benchmark argument: one of kt's paths, or Eigen.
struct Path {
  const char* name;
  Isa isa;
  bool eigen;
};
constexpr Path kPaths[] = {
    {"eigen", Isa::kScalar, true},   {"scalar", Isa::kScalar, false},
    {"avx2", Isa::kAvx2, false},     {"avx512", Isa::kAvx512, false},
    {"avx512_vnni", Isa::kAvx512Vnni, false},
};

// The path of state.range(1), or nullptr (with the benchmark skipped) if this CPU cannot run it.
const Path* PathOf(benchmark::State& state) {
  const Path& path = kPaths[state.range(1)];
  if (!IsaSupported(path.isa, GetCpuFeatures())) {
    state.SkipWithError("path not supported on this CPU");
    return nullptr;
  }
  return &path;
}

// Times kt(isa) or eigen(), as state.range(1) says, and labels the run with the side and its GFLOPS.
template <typename Kt, typename Eig>
void Run(benchmark::State& state, double flop, Kt kt, Eig eigen) {
  const Path* path = PathOf(state);
  if (path == nullptr) return;
  for (auto _ : state) {
    if (path->eigen) {
      eigen();
    } else {
      kt(path->isa);
    }
    benchmark::ClobberMemory();
  }
  state.SetLabel(path->eigen ? kEigenBuild : std::string("kt ") + path->name);
  state.counters["GFLOPS"] = benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate,
                                                benchmark::Counter::kIs1000);
}

void BM_Expand(benchmark::State& state) {
  const size_t m = state.range(0);
  const std::vector<float> ax = Random(m * kRank, 1), b = Random(kRank * kInter, 2);
  std::vector<float> c(m * kInter, 0.0f);
  Run(
      state, 2.0 * m * kInter * kRank,
      [&](Isa isa) {
        LoraGemm(isa, m, kInter, kRank, kScale, ax.data(), kRank, 1, b.data(), kInter, c.data(), kInter,
                 true);
      },
      [&] {
        eigen::MapRows(c.data(), m, kInter).noalias() +=
            kScale * eigen::MapRows(ax.data(), m, kRank) * eigen::MapRows(b.data(), kRank, kInter);
      });
}

void BM_GradA(benchmark::State& state) {
  const size_t m = state.range(0);
  const std::vector<float> db = Random(m * kRank, 3), x = Random(m * kHidden, 4);
  std::vector<float> da(kRank * kHidden, 0.0f);
  Run(
      state, 2.0 * m * kHidden * kRank,
      [&](Isa isa) {
        LoraGemm(isa, kRank, kHidden, m, kScale, db.data(), 1, kRank, x.data(), kHidden, da.data(), kHidden,
                 true);
      },
      [&] {
        eigen::MapRows(da.data(), kRank, kHidden).noalias() +=
            kScale * eigen::MapRows(db.data(), m, kRank).transpose() * eigen::MapRows(x.data(), m, kHidden);
      });
}

void BM_Down(benchmark::State& state) {
  const size_t m = state.range(0);
  const std::vector<bf16_t> x = RandomBf16(m * kHidden, 5);
  const std::vector<float> a = Random(kRank * kHidden, 6);
  std::vector<float> ax(m * kRank), x32(m * kHidden);
  Run(
      state, 2.0 * m * kHidden * kRank,
      [&](Isa isa) {
        LoraGemmNT(isa, m, kRank, kHidden, 1.0f, x.data(), kHidden, a.data(), kHidden, ax.data(), kRank,
                   false);
      },
      [&] {
        for (size_t i = 0; i < x.size(); ++i) x32[i] = Bf16ToF32(x[i]);
        eigen::MapRows(ax.data(), m, kRank).noalias() =
            eigen::MapRows(x32.data(), m, kHidden) * eigen::MapRows(a.data(), kRank, kHidden).transpose();
      });
}

// Args: rows m of one expert (decode-sized to prefill-sized), then the path (kPaths: 0 = Eigen, 1.. kt's).
void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgsProduct({{16, 128, 512}, benchmark::CreateDenseRange(0, std::size(kPaths) - 1, 1)});
  b->ArgNames({"m", "path"});
}
BENCHMARK(BM_Expand)->Apply(Shapes);
BENCHMARK(BM_GradA)->Apply(Shapes);
BENCHMARK(BM_Down)->Apply(Shapes);

}  // namespace
}  // namespace kt

BENCHMARK_MAIN();
