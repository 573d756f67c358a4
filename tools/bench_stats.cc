#include "tools/bench_stats.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kt {
namespace tools {

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  const double pos = p * (v.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(v.size() - 1, lo + 1);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

std::string FormatTime(double s) {
  if (s < 1e-3) return absl::StrFormat("%.1f us", s * 1e6);
  if (s < 1.0) return absl::StrFormat("%.2f ms", s * 1e3);
  return absl::StrFormat("%.3f s", s);
}

std::string FormatBytes(double b) {
  if (b >= 1e9) return absl::StrFormat("%.2f GB", b / 1e9);
  return absl::StrFormat("%.1f MB", b / 1e6);
}

size_t LastLevelCacheBytes() {
  int best_level = 0;
  size_t best = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = absl::StrCat("/sys/devices/system/cpu/cpu0/cache/index", index, "/");
    FILE* level_file = std::fopen((dir + "level").c_str(), "r");
    if (level_file == nullptr) break;
    int level = 0;
    const bool have_level = std::fscanf(level_file, "%d", &level) == 1;
    std::fclose(level_file);
    FILE* size_file = std::fopen((dir + "size").c_str(), "r");
    if (size_file == nullptr) continue;
    unsigned long long size = 0;
    char unit = 0;
    const int n = std::fscanf(size_file, "%llu%c", &size, &unit);
    std::fclose(size_file);
    if (!have_level || n < 1) continue;
    if (n == 2 && (unit == 'K' || unit == 'k')) size <<= 10;
    if (n == 2 && (unit == 'M' || unit == 'm')) size <<= 20;
    if (level > best_level || (level == best_level && size > best)) {
      best_level = level;
      best = size;
    }
  }
  if (best > 0) return best;
  const long v = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return v > 0 ? static_cast<size_t>(v) : 0;
}

void AddProfile(const ForwardProfile& p, ForwardProfile* sum) {
  sum->route += p.route;
  sum->gather += p.gather;
  sum->gate_up += p.gate_up;
  sum->quant_h += p.quant_h;
  sum->down += p.down;
}

void PrintPhases(const TimedRuns& runs) {
  const ForwardProfile& p = runs.phases;
  const double n = static_cast<double>(std::max<size_t>(1, runs.seconds.size()));
  std::printf("  phases      mean per call (threads' busy time / threads): route %s, gather %s, "
              "gate/up+silu %s, quantize h %s, down+weighted sum %s\n",
              FormatTime(p.route / n).c_str(), FormatTime(p.gather / n).c_str(),
              FormatTime(p.gate_up / n).c_str(), FormatTime(p.quant_h / n).c_str(),
              FormatTime(p.down / n).c_str());
}

}  // namespace tools
}  // namespace kt
