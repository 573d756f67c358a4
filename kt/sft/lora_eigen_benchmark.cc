// kt's LoRA kernels (lora_kernels.h, the best Isa of this CPU) against Eigen's fp32 products on the small
// shapes of the SFT engine, to decide whether Eigen should serve them (docs/LIBRARIES.md has the numbers).
// Shapes of Qwen3-30B-A3B (H = 2048, I = 768) at LoRA rank r = 16, with m rows of one expert:
//   Expand:  C[m, I] += s * AX[m, r] B[r, I]        (B (A x) of gate/up: inner dimension r)
//   GradA:   dA[r, H] += s * dB[m, r]^T X[m, H]     (the LoRA gradient: A read transposed)
//   Down:    AX[m, r] = X[m, H] A[r, H]^T, X bf16  (the dot form along H; Eigen first widens X to fp32)
// Built twice: with the default flags (Eigen at SSE2, what a portable build gets) and with -mavx2 -mfma;
// the label says which.
#include <cstddef>
#include <random>
#include <vector>

#include "Eigen/Core"
#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/eigen_views.h"
#include "kt/sft/lora_kernels.h"

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

Isa Best() { return BestIsa(GetCpuFeatures()); }

// Times kt() (state.range(1) == 0) or eigen() and labels the run with the side and its GFLOPS.
template <typename Kt, typename Eig>
void Run(benchmark::State& state, double flop, Kt kt, Eig eigen) {
  const bool use_eigen = state.range(1) != 0;
  for (auto _ : state) {
    if (use_eigen) {
      eigen();
    } else {
      kt();
    }
    benchmark::ClobberMemory();
  }
  state.SetLabel(use_eigen ? kEigenBuild : std::string("kt ") + IsaName(Best()));
  state.counters["GFLOPS"] = benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate,
                                                benchmark::Counter::kIs1000);
}

void BM_Expand(benchmark::State& state) {
  const size_t m = state.range(0);
  const std::vector<float> ax = Random(m * kRank, 1), b = Random(kRank * kInter, 2);
  std::vector<float> c(m * kInter, 0.0f);
  const Isa isa = Best();
  Run(
      state, 2.0 * m * kInter * kRank,
      [&] {
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
  const Isa isa = Best();
  Run(
      state, 2.0 * m * kHidden * kRank,
      [&] {
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
  const Isa isa = Best();
  Run(
      state, 2.0 * m * kHidden * kRank,
      [&] {
        LoraGemmNT(isa, m, kRank, kHidden, 1.0f, x.data(), kHidden, a.data(), kHidden, ax.data(), kRank,
                   false);
      },
      [&] {
        for (size_t i = 0; i < x.size(); ++i) x32[i] = Bf16ToF32(x[i]);
        eigen::MapRows(ax.data(), m, kRank).noalias() =
            eigen::MapRows(x32.data(), m, kHidden) * eigen::MapRows(a.data(), kRank, kHidden).transpose();
      });
}

// Args: rows m of one expert (decode-sized to prefill-sized), then 0 = kt, 1 = Eigen.
#define KT_LORA_SHAPES ArgsProduct({{16, 128, 512}, {0, 1}})
BENCHMARK(BM_Expand)->KT_LORA_SHAPES;
BENCHMARK(BM_GradA)->KT_LORA_SHAPES;
BENCHMARK(BM_Down)->KT_LORA_SHAPES;

}  // namespace
}  // namespace kt

BENCHMARK_MAIN();
