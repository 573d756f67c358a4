// Statistics and formatting of `kt bench`'s timed runs, and the machine facts they are judged against.
#ifndef KT_TOOLS_BENCH_STATS_H_
#define KT_TOOLS_BENCH_STATS_H_

#include <chrono>
#include <cstddef>
#include <string>
#include <vector>

#include "kt/moe/moe_layer.h"

namespace kt {
namespace tools {

using Clock = std::chrono::steady_clock;

inline double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The p-quantile (0..1) of `v`, interpolated between neighbours.
double Percentile(std::vector<double> v, double p);
std::string FormatTime(double seconds);  // "12.3 us", "4.56 ms", "1.234 s"
std::string FormatBytes(double bytes);   // "12.3 MB", "4.56 GB"

// The size of the largest cache level cpu0 reports in sysfs (sysconf's value can be the host's in a VM), else
// sysconf's; 0 if unknown.
size_t LastLevelCacheBytes();

struct TimedRuns {
  std::vector<double> seconds;
  std::vector<double> bytes;  // Distinct expert weight bytes touched by each call.
  ForwardProfile phases;      // summed over the timed calls
};

// Adds one call's profile to `sum`.
void AddProfile(const ForwardProfile& p, ForwardProfile* sum);

// Where the calls' time went, phase by phase (MoeLayer::last_profile summed over the timed calls).
void PrintPhases(const TimedRuns& runs);

}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_BENCH_STATS_H_
