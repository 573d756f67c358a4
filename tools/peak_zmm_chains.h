// The 24-chain zmm loop shared by the fp32-accumulating AVX-512 peak yardsticks (vfmadd231ps in
// peak_avx512.cc, vdpbf16ps in peak_avx512bf16.cc). Include ONLY from translation units compiled with
// -mavx512f (their libraries in tools/BUILD): the loop and its fold are AVX-512 code, and every caller is
// reached only after a CPUID check.
#ifndef KT_TOOLS_PEAK_ZMM_CHAINS_H_
#define KT_TOOLS_PEAK_ZMM_CHAINS_H_

#include <immintrin.h>

#include <cstdint>

namespace kt {
namespace tools {
namespace internal {

// Runs `iters` iterations of 24 independent `a = step(a)` on zmm accumulators and returns the sum of all
// their lanes. Every chain starts from a different value read through the volatile `seed` (seed * 1 ..
// seed * 24), so the compiler can neither fold the loop away nor merge identical chains into one. `step`
// is one instruction on one accumulator; it is inlined, so the loop holds nothing but those 24.
template <typename Step>
__attribute__((always_inline)) inline float RunZmmChains24(int64_t iters, const volatile float& seed,
                                                           Step step) {
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
    a0 = step(a0);
    a1 = step(a1);
    a2 = step(a2);
    a3 = step(a3);
    a4 = step(a4);
    a5 = step(a5);
    a6 = step(a6);
    a7 = step(a7);
    a8 = step(a8);
    a9 = step(a9);
    a10 = step(a10);
    a11 = step(a11);
    a12 = step(a12);
    a13 = step(a13);
    a14 = step(a14);
    a15 = step(a15);
    a16 = step(a16);
    a17 = step(a17);
    a18 = step(a18);
    a19 = step(a19);
    a20 = step(a20);
    a21 = step(a21);
    a22 = step(a22);
    a23 = step(a23);
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

}  // namespace internal
}  // namespace tools
}  // namespace kt

#endif  // KT_TOOLS_PEAK_ZMM_CHAINS_H_
