// Measures the machine's memory read bandwidth the way the decode path reads expert weights: every
// thread streams its own contiguous slice of one buffer much larger than the last-level cache with
// 64-byte vector loads (AVX-512 where the CPU has it, else AVX2, else 8-byte scalar loads), read as 1, 2,
// 4 and 8 interleaved streams per thread (a decode call reads several experts' rows at once); the best
// pass of any stream count is the yardstick.
#ifndef KT_TOOLS_BANDWIDTH_H_
#define KT_TOOLS_BANDWIDTH_H_

#include <cstddef>
#include <string>

namespace kt {
namespace tools {

struct BandwidthResult {
  double bytes_per_second = 0;  // Best repetition.
  size_t buffer_bytes = 0;
  int threads = 0;
  int reps = 0;
  std::string method;  // e.g. "AVX-512 64-byte loads, 4 streams per thread (best of 1, 2, 4, 8)".
};

// Allocates and touches `buffer_bytes` (rounded down to a multiple of 32 KiB * threads), then runs `reps`
// timed passes per stream count on `threads` threads and keeps the fastest. The buffer is freed before returning.
BandwidthResult MeasureReadBandwidth(size_t buffer_bytes, int threads, int reps, bool pin);

// The reader MeasureReadBandwidth uses on this CPU, for one thread's part of a yardstick timed elsewhere
// (tools/decode_probe): sums [p, p + bytes) read as `streams` interleaved parts, `bytes` rounded down to a
// multiple of 256 * streams; p 64-byte aligned. Publish the sum (e.g. into an atomic) so no load is dropped.
uint64_t SumReadStreams(const uint8_t* p, size_t bytes, size_t streams);

}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_BANDWIDTH_H_
