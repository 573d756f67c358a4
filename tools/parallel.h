// Runs one function on N fresh threads released together, for the yardstick microbenchmarks of `kt bench`
// (read bandwidth, peak compute). Every thread gets exactly one share of the work, so the wall time is the
// time of the slowest share, unlike a dynamically scheduled pool where one thread could take two shares.
#ifndef KT_TOOLS_PARALLEL_H_
#define KT_TOOLS_PARALLEL_H_

#include <functional>

namespace kt {
namespace tools {

// The number of CPUs this process may run on (its affinity mask), at least 1.
int HardwareThreads();

// Starts `num_threads` threads, waits until all are running, releases them at once and returns the wall
// seconds from the release until the last one finished fn(thread). With `pin`, thread i runs on the i-th
// CPU of the process's affinity mask (the same rule as ThreadPoolOptions::pin).
double RunOnThreads(int num_threads, bool pin, const std::function<void(int thread)>& fn);

}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_PARALLEL_H_
