#include "tools/peak.h"

#include <algorithm>
#include <atomic>
#include <chrono>

#include "tools/parallel.h"

namespace kt {
namespace tools {
namespace internal {
namespace {

// x86-64 baseline: no FMA, so each chain step is one mulss and one addss (2 FLOP). This file is compiled
// with -fno-tree-vectorize -fno-tree-slp-vectorize so that the chains stay scalar.
float ScalarLoop(int64_t iters) {
  volatile float seed = 0.999f;
  const float x = seed;
  const float y = seed * 1e-3f;
  // Distinct starting values (through the volatile) keep the compiler from merging identical chains.
  float a0 = seed * 1, a1 = seed * 2, a2 = seed * 3, a3 = seed * 4, a4 = seed * 5, a5 = seed * 6,
        a6 = seed * 7, a7 = seed * 8, a8 = seed * 9, a9 = seed * 10, a10 = seed * 11, a11 = seed * 12;
  for (int64_t it = 0; it < iters; ++it) {
    a0 = a0 * x + y;
    a1 = a1 * x + y;
    a2 = a2 * x + y;
    a3 = a3 * x + y;
    a4 = a4 * x + y;
    a5 = a5 * x + y;
    a6 = a6 * x + y;
    a7 = a7 * x + y;
    a8 = a8 * x + y;
    a9 = a9 * x + y;
    a10 = a10 * x + y;
    a11 = a11 * x + y;
  }
  return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11;
}

}  // namespace

PeakLoop PeakLoopScalar() { return PeakLoop{ScalarLoop, "mulss+addss", 2, 12}; }

}  // namespace internal

namespace {

using Clock = std::chrono::steady_clock;

std::atomic<float> g_sink{0};

internal::PeakLoop LoopFor(Isa isa, PeakOperands operands) {
  if (operands == PeakOperands::kInt8) {
    switch (isa) {
      case Isa::kAmx:
        return internal::PeakLoopAmxInt8();
      case Isa::kAvx512Bf16:  // the int8 kernel of both is the native VNNI one
      case Isa::kAvx512Vnni:
        return internal::PeakLoopAvx512Vnni();
      case Isa::kAvx512:
        return internal::PeakLoopAvx512Maddwd();
      case Isa::kAvx2:
        return internal::PeakLoopAvx2Maddwd();
      case Isa::kScalar:
        break;
    }
    return internal::PeakLoopScalarInt();
  }
  switch (isa) {
    case Isa::kAmx:
      return internal::PeakLoopAmxBf16();
    case Isa::kAvx512Bf16:
      return internal::PeakLoopAvx512Bf16();
    case Isa::kAvx512Vnni:  // Highway AVX3 paths widen bf16 to fp32 and use fp32 FMA.
    case Isa::kAvx512:
      return internal::PeakLoopAvx512Fma();
    case Isa::kAvx2:
      return internal::PeakLoopAvx2Fma();
    case Isa::kScalar:
      break;
  }
  return internal::PeakLoopScalar();
}

double TimeOne(const internal::PeakLoop& loop, int64_t iters) {
  const Clock::time_point t0 = Clock::now();
  g_sink.store(loop.run(iters), std::memory_order_relaxed);
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace

PeakResult MeasurePeak(Isa isa, int threads, bool pin, double seconds_per_rep, int reps,
                       PeakOperands operands) {
  const internal::PeakLoop loop = LoopFor(isa, operands);
  PeakResult result;
  result.instruction = loop.instruction;
  result.flop_per_instruction = loop.flop_per_instruction;
  result.chains = loop.chains;
  result.threads = threads = std::max(1, threads);
  result.reps = reps = std::max(1, reps);

  // Calibrate on this thread: grow the count until one run takes >= 20 ms, then scale to the target.
  int64_t iters = 1 << 14;
  double t = TimeOne(loop, iters);
  while (t < 0.02) {
    iters *= 4;
    t = TimeOne(loop, iters);
  }
  iters = std::max<int64_t>(1, static_cast<int64_t>(iters * (seconds_per_rep / t)));

  const double flop_per_thread = static_cast<double>(iters) * loop.chains * loop.flop_per_instruction;
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const double seconds =
        RunOnThreads(threads, pin, [&](int) { g_sink.store(loop.run(iters), std::memory_order_relaxed); });
    if (seconds > 0) best = std::max(best, flop_per_thread * threads / seconds);
  }
  result.flops_per_second = best;
  return result;
}

}  // namespace tools
}  // namespace kt
