#include "tools/bandwidth.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "kt/kernels/cpu_features.h"
#include "kt/runtime/memory.h"
#include "tools/parallel.h"

namespace kt {
namespace tools {
namespace {

// Each reader sums [p, p + bytes) with four independent accumulators and returns the sum, which the caller
// publishes so that no load can be dropped. bytes is a multiple of 256.
__attribute__((target("avx512f"))) uint64_t SumAvx512(const uint8_t* p, size_t bytes) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < bytes; i += 256) {
    a0 = _mm512_add_epi64(a0, _mm512_load_si512(reinterpret_cast<const void*>(p + i)));
    a1 = _mm512_add_epi64(a1, _mm512_load_si512(reinterpret_cast<const void*>(p + i + 64)));
    a2 = _mm512_add_epi64(a2, _mm512_load_si512(reinterpret_cast<const void*>(p + i + 128)));
    a3 = _mm512_add_epi64(a3, _mm512_load_si512(reinterpret_cast<const void*>(p + i + 192)));
  }
  a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(reinterpret_cast<void*>(lanes), a0);
  uint64_t sum = 0;
  for (uint64_t v : lanes) sum += v;
  return sum;
}

__attribute__((target("avx2"))) uint64_t SumAvx2(const uint8_t* p, size_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < bytes; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a0);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

uint64_t SumScalar(const uint8_t* p, size_t bytes) {
  const uint64_t* q = reinterpret_cast<const uint64_t*>(p);
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  for (size_t i = 0; i < bytes / 8; i += 4) {
    a0 += q[i];
    a1 += q[i + 1];
    a2 += q[i + 2];
    a3 += q[i + 3];
  }
  return a0 + a1 + a2 + a3;
}

std::atomic<uint64_t> g_sink{0};

}  // namespace

BandwidthResult MeasureReadBandwidth(size_t buffer_bytes, int threads, int reps, bool pin) {
  BandwidthResult result;
  threads = std::max(1, threads);
  reps = std::max(1, reps);
  const size_t quantum = size_t{4096} * threads;
  buffer_bytes = std::max(quantum, buffer_bytes / quantum * quantum);
  const size_t slice = buffer_bytes / threads;

  const CpuFeatures& f = GetCpuFeatures();
  uint64_t (*sum)(const uint8_t*, size_t) = SumScalar;
  result.method = "scalar 8-byte loads";
  if (f.avx512f && f.os_avx512) {
    sum = SumAvx512;
    result.method = "AVX-512 64-byte loads";
  } else if (f.avx2) {
    sum = SumAvx2;
    result.method = "AVX2 32-byte loads";
  }

  // The layer's own allocator (kt/runtime/memory.h): the buffer gets the pages the weights get (huge pages
  // unless KT_HUGE_PAGES=0), so the yardstick and the decode rate stay comparable.
  void* mem = nullptr;
  try {
    mem = AllocateArray(buffer_bytes);
  } catch (const std::bad_alloc&) {
    return result;
  }
  uint8_t* buf = static_cast<uint8_t*>(mem);
  // Touch every page from the thread that will read it (first-touch placement), with non-zero data.
  RunOnThreads(threads, pin, [&](int t) { std::memset(buf + t * slice, 1 + t, slice); });

  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const double seconds = RunOnThreads(threads, pin, [&](int t) {
      g_sink.fetch_add(sum(buf + t * slice, slice), std::memory_order_relaxed);
    });
    if (seconds > 0) best = std::max(best, static_cast<double>(buffer_bytes) / seconds);
  }
  std::free(mem);
  result.bytes_per_second = best;
  result.buffer_bytes = buffer_bytes;
  result.threads = threads;
  result.reps = reps;
  return result;
}

}  // namespace tools
}  // namespace kt
