// Google Benchmark of the routed-experts forward on Qwen3 layer shapes, in any expert format.
//
//   bazel run -c opt //kt/moe:moe_benchmark
//   bazel run -c opt //kt/moe:moe_benchmark -- --benchmark_filter=30B --threads=2
//
// Benchmarks (names): Qwen3_30B_A3B/decode/qlen:1, Qwen3_30B_A3B/prefill/qlen:512, and the same for
// Qwen3_235B_A22B (4.8 GB of weights, allocated only when one of its benchmarks runs).
// Weights are deterministic random bf16 with standard deviation 1/sqrt(fan_in); every token is routed to
// top_k distinct random experts; each iteration uses the next of several routing patterns so that
// consecutive calls touch different experts. Counters (per second of real time):
//   GB/s    bytes of the DISTINCT experts routed to in each call (the packed bytes per expert, scales
//           and zero points included: weight_bytes() / E), counted exactly from the generated ids
//   TFLOPS  2 * 3 * H * I * top_k * qlen floating-point operations per call
//   experts distinct experts per call (mean)
// The label names the kernel path (KT_ISA caps it) and the thread count.
//
// Flags besides Google Benchmark's: --threads=N (default: CPUs in the affinity mask), --pin,
// --format=F (bf16, int8, int4, int4_asym, int4_group_sym, int4_group_asym; default bf16),
// --group-size=G (32, 64, 128; default 128, for the int4_group_* formats).
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/synthetic.h"
#include "kt/runtime/thread_pool.h"

namespace kt {
namespace {

int g_threads = 0;
bool g_pin = false;
Isa g_isa = Isa::kScalar;
ExpertFormat g_format = ExpertFormat::kBf16;
int g_group_size = 128;

struct Shape {
  const char* name;
  int experts, top_k, hidden, intermediate;
};

constexpr Shape kQwen3_30B{"Qwen3_30B_A3B", 128, 8, 2048, 768};
constexpr Shape kQwen3_235B{"Qwen3_235B_A22B", 128, 8, 4096, 1536};
constexpr int kMaxLen = 512;
constexpr int kPatterns = 16;

int HardwareThreads() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// One loaded layer at a time: switching shape frees the previous one (the 235B layer alone is 4.8 GB).
struct Layer {
  const Shape* shape = nullptr;
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<MoeLayer> moe;
};

Layer& GetLayer(const Shape& shape) {
  static Layer* layer = new Layer;
  if (layer->shape == &shape) return *layer;
  layer->moe.reset();
  if (!layer->pool) layer->pool = std::make_unique<ThreadPool>(ThreadPoolOptions{g_threads, g_pin});
  MoeConfig config;
  config.num_experts = shape.experts;
  config.top_k = shape.top_k;
  config.hidden = shape.hidden;
  config.intermediate = shape.intermediate;
  config.max_len = kMaxLen;
  config.group_size = g_group_size;
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(config, g_isa, g_format);
  if (!moe.ok()) {
    std::fprintf(stderr, "MoeLayer::Create: %s\n", moe.status().ToString().c_str());
    std::exit(1);
  }
  const size_t E = shape.experts, H = shape.hidden, I = shape.intermediate;
  const size_t n = E * I * H;
  std::unique_ptr<bf16_t[]> gate(new bf16_t[n]), up(new bf16_t[n]), down(new bf16_t[n]);
  ThreadPool& pool = *layer->pool;
  FillRandomBf16(pool, 1, n, 1.0f / std::sqrt(static_cast<float>(H)), gate.get());
  FillRandomBf16(pool, 2, n, 1.0f / std::sqrt(static_cast<float>(H)), up.get());
  FillRandomBf16(pool, 3, n, 1.0f / std::sqrt(static_cast<float>(I)), down.get());
  const absl::Status st = (*moe)->LoadWeights(gate.get(), up.get(), down.get(), nullptr, pool);
  if (!st.ok()) {
    std::fprintf(stderr, "LoadWeights: %s\n", st.ToString().c_str());
    std::exit(1);
  }
  layer->moe = std::move(*moe);
  layer->shape = &shape;
  return *layer;
}

void BM_Moe(benchmark::State& state, const Shape* shape, int qlen) {
  Layer& layer = GetLayer(*shape);
  const int k = shape->top_k;
  const size_t H = shape->hidden;
  const double expert_bytes = static_cast<double>(layer.moe->weight_bytes()) / shape->experts;
  const double flop = 2.0 * 3.0 * shape->hidden * shape->intermediate * k * qlen;

  std::mt19937_64 rng(1000 + qlen);
  std::vector<Routing> patterns;
  for (int p = 0; p < kPatterns; ++p) patterns.push_back(RandomRouting(rng, qlen, k, shape->experts));
  std::vector<bf16_t> x(static_cast<size_t>(qlen) * H), y(x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = F32ToBf16(std::sqrt(3.0f) * UniformSym(Mix(7), i));

  double bytes = 0;
  int64_t calls = 0;
  size_t p = 0;
  // Rates are over wall time (the pool's threads do the work, not only this one), measured here so that
  // the counters print as plain GB/s and TFLOPS.
  const auto start = std::chrono::steady_clock::now();
  for (auto _ : state) {
    const Routing& r = patterns[p];
    const absl::Status st =
        layer.moe->Forward(*layer.pool, qlen, k, r.ids.data(), r.weights.data(), x.data(), y.data(), nullptr);
    if (!st.ok()) {
      state.SkipWithError(st.ToString().c_str());
      break;
    }
    bytes += r.distinct_experts * expert_bytes;
    ++calls;
    p = (p + 1) % patterns.size();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  benchmark::DoNotOptimize(y.data());
  if (calls > 0 && seconds > 0) {
    state.counters["GB/s"] = bytes / seconds / 1e9;
    state.counters["TFLOPS"] = flop * calls / seconds / 1e12;
    state.counters["experts"] = bytes / expert_bytes / calls;  // Distinct experts per call (mean).
  }
  state.counters["threads"] = layer.pool->num_threads();
  state.SetLabel(std::string("isa=") + IsaName(g_isa) + " format=" + ExpertFormatName(g_format));
}

void Register(const Shape& shape) {
  const std::string base = shape.name;
  benchmark::RegisterBenchmark((base + "/decode/qlen:1").c_str(), BM_Moe, &shape, 1)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(1.0);
  benchmark::RegisterBenchmark((base + "/prefill/qlen:512").c_str(), BM_Moe, &shape, 512)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(3.0);
}

}  // namespace
}  // namespace kt

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  kt::g_threads = kt::HardwareThreads();
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    if (std::strncmp(a, "--threads=", 10) == 0) {
      char* end = nullptr;
      const long v = std::strtol(a + 10, &end, 10);
      if (*end != '\0' || v < 1 || v > 4096) {
        std::fprintf(stderr, "moe_benchmark: --threads wants a positive integer, got '%s'\n", a + 10);
        return 2;
      }
      kt::g_threads = static_cast<int>(v);
    } else if (std::strcmp(a, "--pin") == 0) {
      kt::g_pin = true;
    } else if (std::strncmp(a, "--format=", 9) == 0) {
      const absl::StatusOr<kt::ExpertFormat> f = kt::ParseExpertFormat(a + 9);
      if (!f.ok()) {
        std::fprintf(stderr, "moe_benchmark: --format: %s\n", std::string(f.status().message()).c_str());
        return 2;
      }
      kt::g_format = *f;
    } else if (std::strncmp(a, "--group-size=", 13) == 0) {
      const int g = std::atoi(a + 13);
      if (g != 32 && g != 64 && g != 128) {
        std::fprintf(stderr, "moe_benchmark: --group-size wants 32, 64 or 128, got '%s'\n", a + 13);
        return 2;
      }
      kt::g_group_size = g;
    } else {
      std::fprintf(stderr, "moe_benchmark: unknown flag '%s' (besides --benchmark_*: --threads=N, --pin, --format=F, --group-size=G)\n",
                   a);
      return 2;
    }
  }
  const char* env = std::getenv("KT_ISA");
  const absl::StatusOr<kt::Isa> isa = kt::ResolveIsa(env == nullptr ? "" : env, kt::GetCpuFeatures());
  if (!isa.ok()) {
    std::fprintf(stderr, "moe_benchmark: %s\n", std::string(isa.status().message()).c_str());
    return 2;
  }
  kt::g_isa = *isa;
  benchmark::AddCustomContext("kt_isa", kt::IsaName(kt::g_isa));
  benchmark::AddCustomContext("kt_threads", std::to_string(kt::g_threads));
  benchmark::AddCustomContext("cpu_brand", kt::GetCpuFeatures().brand);
  kt::Register(kt::kQwen3_30B);
  kt::Register(kt::kQwen3_235B);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
