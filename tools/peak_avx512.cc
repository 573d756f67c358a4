// The peak loop: 24 independent vfmadd231ps zmm per loop iteration, nothing else.
#include <immintrin.h>

#include <cstdint>

#include "tools/peak.h"

namespace kt {
namespace tools {
namespace internal {
namespace {

// Every chain starts from a different value read through a volatile, so the compiler can neither fold
// the loop away nor merge identical chains into one.
float PeakLoopAvx512FmaLoop(int64_t iters) {
  volatile float seed = 0.999f;
  const __m512 x = _mm512_set1_ps(seed);
  const __m512 y = _mm512_set1_ps(seed * 1e-3f);
  __m512 a0 = _mm512_set1_ps(seed * 1);
  __m512 a1 = _mm512_set1_ps(seed * 2);
  __m512 a2 = _mm512_set1_ps(seed * 3);
  __m512 a3 = _mm512_set1_ps(seed * 4);
  __m512 a4 = _mm512_set1_ps(seed * 5);
  __m512 a5 = _mm512_set1_ps(seed * 6);
  __m512 a6 = _mm512_set1_ps(seed * 7);
  __m512 a7 = _mm512_set1_ps(seed * 8);
  __m512 a8 = _mm512_set1_ps(seed * 9);
  __m512 a9 = _mm512_set1_ps(seed * 10);
  __m512 a10 = _mm512_set1_ps(seed * 11);
  __m512 a11 = _mm512_set1_ps(seed * 12);
  __m512 a12 = _mm512_set1_ps(seed * 13);
  __m512 a13 = _mm512_set1_ps(seed * 14);
  __m512 a14 = _mm512_set1_ps(seed * 15);
  __m512 a15 = _mm512_set1_ps(seed * 16);
  __m512 a16 = _mm512_set1_ps(seed * 17);
  __m512 a17 = _mm512_set1_ps(seed * 18);
  __m512 a18 = _mm512_set1_ps(seed * 19);
  __m512 a19 = _mm512_set1_ps(seed * 20);
  __m512 a20 = _mm512_set1_ps(seed * 21);
  __m512 a21 = _mm512_set1_ps(seed * 22);
  __m512 a22 = _mm512_set1_ps(seed * 23);
  __m512 a23 = _mm512_set1_ps(seed * 24);
  for (int64_t it = 0; it < iters; ++it) {
    a0 = _mm512_fmadd_ps(a0, x, y);
    a1 = _mm512_fmadd_ps(a1, x, y);
    a2 = _mm512_fmadd_ps(a2, x, y);
    a3 = _mm512_fmadd_ps(a3, x, y);
    a4 = _mm512_fmadd_ps(a4, x, y);
    a5 = _mm512_fmadd_ps(a5, x, y);
    a6 = _mm512_fmadd_ps(a6, x, y);
    a7 = _mm512_fmadd_ps(a7, x, y);
    a8 = _mm512_fmadd_ps(a8, x, y);
    a9 = _mm512_fmadd_ps(a9, x, y);
    a10 = _mm512_fmadd_ps(a10, x, y);
    a11 = _mm512_fmadd_ps(a11, x, y);
    a12 = _mm512_fmadd_ps(a12, x, y);
    a13 = _mm512_fmadd_ps(a13, x, y);
    a14 = _mm512_fmadd_ps(a14, x, y);
    a15 = _mm512_fmadd_ps(a15, x, y);
    a16 = _mm512_fmadd_ps(a16, x, y);
    a17 = _mm512_fmadd_ps(a17, x, y);
    a18 = _mm512_fmadd_ps(a18, x, y);
    a19 = _mm512_fmadd_ps(a19, x, y);
    a20 = _mm512_fmadd_ps(a20, x, y);
    a21 = _mm512_fmadd_ps(a21, x, y);
    a22 = _mm512_fmadd_ps(a22, x, y);
    a23 = _mm512_fmadd_ps(a23, x, y);
  }
  // Fold the chains (a store instead of the _mm*_reduce_* intrinsics, whose GCC 12 headers warn).
  a0 = _mm512_add_ps(a0, a12);
  a1 = _mm512_add_ps(a1, a13);
  a2 = _mm512_add_ps(a2, a14);
  a3 = _mm512_add_ps(a3, a15);
  a4 = _mm512_add_ps(a4, a16);
  a5 = _mm512_add_ps(a5, a17);
  a6 = _mm512_add_ps(a6, a18);
  a7 = _mm512_add_ps(a7, a19);
  a8 = _mm512_add_ps(a8, a20);
  a9 = _mm512_add_ps(a9, a21);
  a10 = _mm512_add_ps(a10, a22);
  a11 = _mm512_add_ps(a11, a23);
  a0 = _mm512_add_ps(a0, a6);
  a1 = _mm512_add_ps(a1, a7);
  a2 = _mm512_add_ps(a2, a8);
  a3 = _mm512_add_ps(a3, a9);
  a4 = _mm512_add_ps(a4, a10);
  a5 = _mm512_add_ps(a5, a11);
  a0 = _mm512_add_ps(a0, a3);
  a1 = _mm512_add_ps(a1, a4);
  a2 = _mm512_add_ps(a2, a5);
  a0 = _mm512_add_ps(a0, a1);
  a0 = _mm512_add_ps(a0, a2);
  float lanes[16];
  _mm512_storeu_ps(lanes, a0);
  float sum = 0;
  for (float v : lanes) sum += v;
  return sum;
}

}  // namespace

PeakLoop PeakLoopAvx512Fma() { return PeakLoop{PeakLoopAvx512FmaLoop, "vfmadd231ps zmm", 32, 24}; }

}  // namespace internal
}  // namespace tools
}  // namespace kt
