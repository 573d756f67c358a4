// Software prefetch for the decode kernels' weight streams.
//
// Decode (one or two rows of x) reads each weight byte once, straight from DRAM, and computes little per
// byte, so a kernel's speed is the memory-level parallelism one core sustains. The hardware prefetchers
// restart at every 4 KiB page and a panel is only 16-48 KiB, so the kernels also ask for the line
// kDecodePrefetchBytes ahead in each panel stream (past a panel's end that is the next panel of the same
// matrix, which is what the next call reads; a prefetch never faults, even past the array).
// 1 KiB ahead measured faster than no prefetch for int4 and int8 decode on both the AVX2 dev box and the
// AMX host; 2, 4 and 8 KiB were no better (docs/perf-log/2026-11-27-session-09.md, -session-10.md).
#ifndef KT_KERNELS_PREFETCH_H_
#define KT_KERNELS_PREFETCH_H_

#include <cstddef>

namespace kt {

inline constexpr size_t kDecodePrefetchBytes = 1024;
// Row counts up to which the kernels prefetch: with more rows the panel is reused from cache.
inline constexpr int kDecodePrefetchMaxRows = 2;

// Prefetches the line kDecodePrefetchBytes past p into all cache levels (read). Always inlined: called from
// a function compiled for another target (Highway's per-target code), GCC 12 kept it out of line, found it
// free of side effects and deleted the call, prefetch and all.
__attribute__((always_inline)) inline void PrefetchAhead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + kDecodePrefetchBytes, 0, 3);
}

// The same for a kernel that walks `np` panels side by side (panel j at panel_j = base + j * stride bytes),
// now at byte `offset` of each: the line kDecodePrefetchBytes ahead in panel j's stream. Past the panel's end
// that stream goes on in panel j + np, the same panel of the next block of np panels the caller walks, not in
// panel j + 1, which this block is reading now: PrefetchAhead there fetched lines already asked for and left
// the first kDecodePrefetchBytes of every later block's panels but one to demand misses. On the dev box's
// EPYC a loop reading 6 KiB panels in pairs (the Qwen3-30B down projection's, K = 768 int4) went from 11.1
// to 12.9 GB/s with the jump, 16 KiB panels from 16.2 to 17.2 GB/s (1 thread; a 4-stream plain read: 19-21).
__attribute__((always_inline)) inline void PrefetchPanelAhead(const void* panel_j, size_t offset, size_t stride,
                                                              size_t np) {
  size_t ahead = offset + kDecodePrefetchBytes;
  if (ahead >= stride) ahead += (np - 1) * stride;
  __builtin_prefetch(static_cast<const char*>(panel_j) + ahead, 0, 3);
}

}  // namespace kt

#endif  // KT_KERNELS_PREFETCH_H_
