// Single-thread weight quantization and unpacking on a Qwen3-30B-A3B gate/up matrix (N = 768, K = 2048):
//   bazel run -c opt //kt/kernels:quant_fast_benchmark
// BM_Quantize: the path's QuantizeFast (kScalar = quant.cc's Quantize itself, the baseline); counter
// GB/s of bf16 input. BM_Unpack: packed int4 / int8 back to bf16 (the SFT engine's backward copy starts
// there), against BM_UnpackCanonical, the UnpackInt4 + Dequantize + F32ToBf16 route through the
// canonical layout.
#include <random>
#include <vector>

#include "benchmark/benchmark.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/quant.h"
#include "kt/kernels/quant_fast.h"

namespace kt {
namespace {

constexpr size_t kN = 768, kK = 2048;

// range(1): 0 = int8 channel, 1 = int4 channel, 2 = int4 channel asym, 3 = group128 sym, 4 = group128
// asym, 5 = group32 asym.
QuantSpec SpecOf(int64_t i) {
  switch (i) {
    case 0: return {QuantFormat::kInt8PerChannel, 0};
    case 1: return {QuantFormat::kInt4PerChannel, 0};
    case 2: return {QuantFormat::kInt4PerChannelAsym, 0};
    case 3: return {QuantFormat::kInt4GroupSym, 128};
    case 4: return {QuantFormat::kInt4GroupAsym, 128};
    default: return {QuantFormat::kInt4GroupAsym, 32};
  }
}

std::vector<bf16_t> Weights() {
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 0.02f);
  std::vector<bf16_t> w(kN * kK);
  for (auto& v : w) v = F32ToBf16(d(rng));
  return w;
}

void BM_Quantize(benchmark::State& state) {
  const Isa isa = static_cast<Isa>(state.range(0));
  if (!IsaSupported(isa, GetCpuFeatures())) {
    state.SkipWithError("path not supported on this CPU");
    return;
  }
  const QuantSpec spec = SpecOf(state.range(1));
  const std::vector<bf16_t> w = Weights();
  for (auto _ : state) {
    absl::StatusOr<QuantizedMatrix> q = QuantizeFast(isa, spec, w.data(), kK, kN, kK);
    benchmark::DoNotOptimize(q);
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(kN * kK * sizeof(bf16_t)),
                                              benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(IsaName(isa)) + " " + QuantLayoutTag(spec));
}

// range(0): 0 = table-driven (quant_fast.h), 1 = canonical route (UnpackInt4/UnpackInt8 + Dequantize).
void BM_Unpack(benchmark::State& state) {
  const bool canonical = state.range(0) == 1;
  const QuantSpec spec = SpecOf(state.range(1));
  const std::vector<bf16_t> w = Weights();
  const QuantizedMatrix qm = *Quantize(spec, w.data(), kK, kN, kK);
  std::vector<bf16_t> out(kN * kK);
  if (spec.format == QuantFormat::kInt8PerChannel) {
    std::vector<int8_t> panels(PackedInt8Bytes(kN, kK)), q(kN * kK);
    std::vector<float> scales(PackedInt8Rows(kN)), s(kN), deq(kN * kK);
    std::vector<int32_t> sums(PackedInt8Rows(kN));
    PackInt8(reinterpret_cast<const int8_t*>(qm.data.data()), kK, qm.scales.data(), kN, kK, panels.data(),
             scales.data(), sums.data());
    for (auto _ : state) {
      if (canonical) {
        UnpackInt8(panels.data(), scales.data(), kN, kK, q.data(), kK, s.data());
        for (size_t r = 0; r < kN; ++r) {
          for (size_t c = 0; c < kK; ++c) out[r * kK + c] = F32ToBf16(static_cast<float>(q[r * kK + c]) * s[r]);
        }
      } else {
        UnpackInt8ToBf16(kN, kK, panels.data(), scales.data(), out.data(), kK);
      }
      benchmark::DoNotOptimize(out.data());
    }
  } else {
    const size_t entries = PackedInt4Scales(kN, kK, Int4KernelGroup(spec));
    std::vector<uint8_t> panels(PackedInt4Bytes(kN, kK)), zeros(entries);
    std::vector<float> scales(entries), deq(kN * kK);
    (void)PackInt4(qm, panels.data(), scales.data(), zeros.data());
    for (auto _ : state) {
      if (canonical) {
        const QuantizedMatrix back = UnpackInt4(spec, kN, kK, panels.data(), scales.data(), zeros.data());
        Dequantize(back, deq.data(), kK);
        for (size_t i = 0; i < kN * kK; ++i) out[i] = F32ToBf16(deq[i]);
      } else {
        UnpackInt4ToBf16(spec, kN, kK, panels.data(), scales.data(), zeros.data(), out.data(), kK);
      }
      benchmark::DoNotOptimize(out.data());
    }
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(kN * kK * sizeof(bf16_t)),
                                              benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(std::string(canonical ? "canonical " : "table ") + QuantLayoutTag(spec) + " (GB/s of bf16 out)");
}

BENCHMARK(BM_Quantize)
    ->ArgsProduct({{static_cast<int64_t>(Isa::kScalar), static_cast<int64_t>(Isa::kAvx2),
                    static_cast<int64_t>(Isa::kAvx512), static_cast<int64_t>(Isa::kAvx512Vnni)},
                   {0, 1, 2, 3, 4, 5}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Unpack)->ArgsProduct({{0, 1}, {0, 1, 4}})->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace kt
