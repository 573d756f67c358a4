#include "tools/bandwidth.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "kt/kernels/cpu_features.h"
#include "kt/runtime/memory.h"
#include "tools/parallel.h"

namespace kt {
namespace tools {
namespace {

// Each reader sums [p, p + bytes) with four independent accumulators and returns the sum, which the caller
// publishes so that no load can be dropped. The range is read as `streams` equal parts in turn, 256 bytes of
// each (bytes is a multiple of 256 * streams): more concurrent streams per core, as a decode call reading
// several experts' rows at once has, can draw more bandwidth than one sequential stream.
__attribute__((target("avx512f"))) uint64_t SumAvx512(const uint8_t* p, size_t bytes, size_t streams) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  const size_t part = bytes / streams;
  for (size_t i = 0; i < part; i += 256) {
    for (size_t s = 0; s < streams; ++s) {
      const uint8_t* q = p + s * part + i;
      a0 = _mm512_add_epi64(a0, _mm512_load_si512(reinterpret_cast<const void*>(q)));
      a1 = _mm512_add_epi64(a1, _mm512_load_si512(reinterpret_cast<const void*>(q + 64)));
      a2 = _mm512_add_epi64(a2, _mm512_load_si512(reinterpret_cast<const void*>(q + 128)));
      a3 = _mm512_add_epi64(a3, _mm512_load_si512(reinterpret_cast<const void*>(q + 192)));
    }
  }
  a0 = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
  alignas(64) uint64_t lanes[8];
  _mm512_store_si512(reinterpret_cast<void*>(lanes), a0);
  uint64_t sum = 0;
  for (uint64_t v : lanes) sum += v;
  return sum;
}

__attribute__((target("avx2"))) uint64_t SumAvx2(const uint8_t* p, size_t bytes, size_t streams) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  const size_t part = bytes / streams;
  for (size_t i = 0; i < part; i += 128) {
    for (size_t s = 0; s < streams; ++s) {
      const uint8_t* q = p + s * part + i;
      a0 = _mm256_add_epi64(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(q)));
      a1 = _mm256_add_epi64(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 32)));
      a2 = _mm256_add_epi64(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 64)));
      a3 = _mm256_add_epi64(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(q + 96)));
    }
  }
  a0 = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a0);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

uint64_t SumScalar(const uint8_t* p, size_t bytes, size_t streams) {
  uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  const size_t part = bytes / streams / 8;
  for (size_t i = 0; i < part; i += 4) {
    for (size_t s = 0; s < streams; ++s) {
      const uint64_t* q = reinterpret_cast<const uint64_t*>(p) + s * part + i;
      a0 += q[0];
      a1 += q[1];
      a2 += q[2];
      a3 += q[3];
    }
  }
  return a0 + a1 + a2 + a3;
}

// Streams per thread tried; the yardstick is the best of them.
constexpr size_t kStreamCounts[] = {1, 2, 4, 8};

std::atomic<uint64_t> g_sink{0};

}  // namespace

uint64_t SumReadStreams(const uint8_t* p, size_t bytes, size_t streams) {
  const CpuFeatures& f = GetCpuFeatures();
  streams = std::max<size_t>(1, streams);
  bytes = bytes / (256 * streams) * (256 * streams);
  if (f.avx512f && f.os_avx512) return SumAvx512(p, bytes, streams);
  if (f.avx2) return SumAvx2(p, bytes, streams);
  return SumScalar(p, bytes, streams);
}

BandwidthResult MeasureReadBandwidth(size_t buffer_bytes, int threads, int reps, bool pin) {
  BandwidthResult result;
  threads = std::max(1, threads);
  reps = std::max(1, reps);
  const size_t quantum = size_t{4096} * 8 * threads;  // every thread's slice splits into 8 streams
  buffer_bytes = std::max(quantum, buffer_bytes / quantum * quantum);
  const size_t slice = buffer_bytes / threads;

  const CpuFeatures& f = GetCpuFeatures();
  uint64_t (*sum)(const uint8_t*, size_t, size_t) = SumScalar;
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
  size_t best_streams = 1;
  for (int r = 0; r < reps; ++r) {
    for (size_t streams : kStreamCounts) {
      const double seconds = RunOnThreads(threads, pin, [&](int t) {
        g_sink.fetch_add(sum(buf + t * slice, slice, streams), std::memory_order_relaxed);
      });
      if (seconds > 0 && static_cast<double>(buffer_bytes) / seconds > best) {
        best = static_cast<double>(buffer_bytes) / seconds;
        best_streams = streams;
      }
    }
  }
  std::free(mem);
  result.method += ", " + std::to_string(best_streams) + " stream" + (best_streams == 1 ? "" : "s") +
                   " per thread (best of 1, 2, 4, 8)";
  result.bytes_per_second = best;
  result.buffer_bytes = buffer_bytes;
  result.threads = threads;
  result.reps = reps;
  return result;
}

}  // namespace tools
}  // namespace kt
