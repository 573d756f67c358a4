#include <cstdio>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "tools/bandwidth.h"
#include "tools/peak.h"

namespace kt {
namespace tools {
namespace {

TEST(Yardsticks, BandwidthIsPositiveAndPlausible) {
  const BandwidthResult r = MeasureReadBandwidth(size_t{64} << 20, 2, 2, /*pin=*/false);
  EXPECT_EQ(r.buffer_bytes, size_t{64} << 20);
  EXPECT_GT(r.bytes_per_second, 1e8);   // > 0.1 GB/s
  EXPECT_LT(r.bytes_per_second, 1e13);  // < 10 TB/s
  std::printf("read bandwidth (64 MiB, partly cached): %.1f GB/s, %s\n", r.bytes_per_second / 1e9,
              r.method.c_str());
}

TEST(Yardsticks, PeakOfEverySupportedPath) {
  const CpuFeatures& f = GetCpuFeatures();
  for (int i = 0; i <= static_cast<int>(Isa::kAmx); ++i) {
    const Isa isa = static_cast<Isa>(i);
    if (!IsaSupported(isa, f)) continue;
    const PeakResult r = MeasurePeak(isa, 1, /*pin=*/false, 0.05, 1);
    std::printf("%-12s %-16s %2d FLOP x %2d chains: %.1f GFLOPS on 1 thread\n", IsaName(isa),
                r.instruction.c_str(), r.flop_per_instruction, r.chains, r.flops_per_second / 1e9);
    EXPECT_GT(r.flops_per_second, 1e8) << IsaName(isa);
    EXPECT_LT(r.flops_per_second, 1e13) << IsaName(isa);
    const PeakResult q = MeasurePeak(isa, 1, /*pin=*/false, 0.05, 1, PeakOperands::kInt8);
    std::printf("%-12s %-16s %2d ops  x %2d chains: %.1f GOPS on 1 thread\n", IsaName(isa),
                q.instruction.c_str(), q.flop_per_instruction, q.chains, q.flops_per_second / 1e9);
    EXPECT_GT(q.flops_per_second, 1e8) << IsaName(isa);
    EXPECT_LT(q.flops_per_second, 4e13) << IsaName(isa);
  }
}

}  // namespace
}  // namespace tools
}  // namespace kt
