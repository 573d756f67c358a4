// The peak loop: 24 independent vfmadd231ps zmm per loop iteration, nothing else.
#include <immintrin.h>

#include <cstdint>

#include "tools/peak.h"
#include "tools/peak_zmm_chains.h"

namespace kt {
namespace tools {
namespace internal {
namespace {

float PeakLoopAvx512FmaLoop(int64_t iters) {
  volatile float seed = 0.999f;
  const __m512 x = _mm512_set1_ps(seed);
  const __m512 y = _mm512_set1_ps(seed * 1e-3f);
  return RunZmmChains24(iters, seed, [x, y](__m512 a) { return _mm512_fmadd_ps(a, x, y); });
}

}  // namespace

PeakLoop PeakLoopAvx512Fma() { return PeakLoop{PeakLoopAvx512FmaLoop, "vfmadd231ps zmm", 32, 24}; }

}  // namespace internal
}  // namespace tools
}  // namespace kt
