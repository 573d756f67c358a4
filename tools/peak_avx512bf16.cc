// The peak loop: 24 independent vdpbf16ps zmm per loop iteration, nothing else.
#include <immintrin.h>

#include <cstdint>

#include "tools/peak.h"
#include "tools/peak_zmm_chains.h"

namespace kt {
namespace tools {
namespace internal {
namespace {

float PeakLoopAvx512Bf16Loop(int64_t iters) {
  volatile float seed = 1e-3f;
  const __m512 s = _mm512_set1_ps(seed);
  const __m512bh x = _mm512_cvtne2ps_pbh(s, s);
  const __m512bh y = _mm512_cvtne2ps_pbh(s, s);
  return RunZmmChains24(iters, seed, [x, y](__m512 a) { return _mm512_dpbf16_ps(a, x, y); });
}

}  // namespace

PeakLoop PeakLoopAvx512Bf16() { return PeakLoop{PeakLoopAvx512Bf16Loop, "vdpbf16ps zmm", 64, 24}; }

}  // namespace internal
}  // namespace tools
}  // namespace kt
