// The peak loop: 12 independent vfmadd231ps ymm per loop iteration, nothing else.
#include <immintrin.h>

#include <cstdint>

#include "tools/peak.h"

namespace kt {
namespace tools {
namespace internal {
namespace {

// Every chain starts from a different value read through a volatile, so the compiler can neither fold
// the loop away nor merge identical chains into one.
float PeakLoopAvx2FmaLoop(int64_t iters) {
  volatile float seed = 0.999f;
  const __m256 x = _mm256_set1_ps(seed);
  const __m256 y = _mm256_set1_ps(seed * 1e-3f);
  __m256 a0 = _mm256_set1_ps(seed * 1);
  __m256 a1 = _mm256_set1_ps(seed * 2);
  __m256 a2 = _mm256_set1_ps(seed * 3);
  __m256 a3 = _mm256_set1_ps(seed * 4);
  __m256 a4 = _mm256_set1_ps(seed * 5);
  __m256 a5 = _mm256_set1_ps(seed * 6);
  __m256 a6 = _mm256_set1_ps(seed * 7);
  __m256 a7 = _mm256_set1_ps(seed * 8);
  __m256 a8 = _mm256_set1_ps(seed * 9);
  __m256 a9 = _mm256_set1_ps(seed * 10);
  __m256 a10 = _mm256_set1_ps(seed * 11);
  __m256 a11 = _mm256_set1_ps(seed * 12);
  for (int64_t it = 0; it < iters; ++it) {
    a0 = _mm256_fmadd_ps(a0, x, y);
    a1 = _mm256_fmadd_ps(a1, x, y);
    a2 = _mm256_fmadd_ps(a2, x, y);
    a3 = _mm256_fmadd_ps(a3, x, y);
    a4 = _mm256_fmadd_ps(a4, x, y);
    a5 = _mm256_fmadd_ps(a5, x, y);
    a6 = _mm256_fmadd_ps(a6, x, y);
    a7 = _mm256_fmadd_ps(a7, x, y);
    a8 = _mm256_fmadd_ps(a8, x, y);
    a9 = _mm256_fmadd_ps(a9, x, y);
    a10 = _mm256_fmadd_ps(a10, x, y);
    a11 = _mm256_fmadd_ps(a11, x, y);
  }
  // Fold the chains (a store instead of the _mm*_reduce_* intrinsics, whose GCC 12 headers warn).
  a0 = _mm256_add_ps(a0, a6);
  a1 = _mm256_add_ps(a1, a7);
  a2 = _mm256_add_ps(a2, a8);
  a3 = _mm256_add_ps(a3, a9);
  a4 = _mm256_add_ps(a4, a10);
  a5 = _mm256_add_ps(a5, a11);
  a0 = _mm256_add_ps(a0, a3);
  a1 = _mm256_add_ps(a1, a4);
  a2 = _mm256_add_ps(a2, a5);
  a0 = _mm256_add_ps(a0, a1);
  a0 = _mm256_add_ps(a0, a2);
  float lanes[8];
  _mm256_storeu_ps(lanes, a0);
  float sum = 0;
  for (float v : lanes) sum += v;
  return sum;
}

}  // namespace

PeakLoop PeakLoopAvx2Fma() { return PeakLoop{PeakLoopAvx2FmaLoop, "vfmadd231ps ymm", 16, 12}; }

}  // namespace internal
}  // namespace tools
}  // namespace kt
