// Software prefetch for the decode kernels' weight streams.
//
// Decode (one or two rows of x) reads each weight byte once, straight from DRAM, and computes little per
// byte, so a kernel's speed is the memory-level parallelism one core sustains. The hardware prefetchers
// restart at every 4 KiB page and a panel is only 16-48 KiB, so the kernels also ask for the line
// kDecodePrefetchBytes ahead in each panel stream (past a panel's end that is the next panel of the same
// matrix, which is what the next call reads; a prefetch never faults, even past the array).
// Dev box (AMD EPYC, AVX2, one thread, 2 MiB pages, M = 1 over a 201 MB matrix in 48-column tasks, 3 runs
// each), a first build with the distance from the environment: int4 10.2-12.0 -> 13.4-15.0 GB/s, int8
// 10.6-12.4 -> 15.1-15.8 GB/s at 1024 bytes (4096 bytes: 12.7-13.9 and 14.0-14.9); this code, later on the
// same box: int4 10.0-10.8 -> 10.3-12.9, int8 9.9-10.9 -> 12.0-13.5. A streaming read: ~15 GB/s per
// thread. AMX host (VNNI kernels, 16 threads, Qwen3-30B decode): int4 82-92 -> 99-106 GB/s.
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

}  // namespace kt

#endif  // KT_KERNELS_PREFETCH_H_
