// Integer peak loops: the instruction each int8 kernel path is built on, in independent chains, nothing else.
// Each function carries its own target attribute (the translation unit has no ISA flags), and is called only
// after the CPU reported the path.
//
//   path                      instruction      ops per instruction (int8 multiply-add = 2 ops)
//   avx512_vnni, avx512_bf16  vpdpbusd zmm     128: 16 lanes x 4 byte products x 2
//   avx512                    vpmaddwd zmm      64: 32 int16 products x 2 (Highway widens int8 to int16)
//   avx2                      vpmaddwd ymm      32: 16 int16 products x 2
//   scalar                    imul + add         2
// vpmaddwd's chains feed each result back as the next multiplicand (the kernel adds it to an accumulator
// instead), so the loop measures the multiply's throughput, which is what bounds the kernel.
#include <immintrin.h>

#include <cstdint>

#include "tools/peak.h"

namespace kt {
namespace tools {
namespace internal {
namespace {

constexpr int kChains = 12;

__attribute__((target("avx2"))) float Avx2MaddwdLoop(int64_t iters) {
  volatile int16_t seed = 3;
  const __m256i y = _mm256_set1_epi16(seed);
  __m256i a[kChains];
  for (int c = 0; c < kChains; ++c) a[c] = _mm256_set1_epi16(static_cast<int16_t>(seed + c));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) a[c] = _mm256_madd_epi16(a[c], y);
  }
  __m256i s = a[0];
  for (int c = 1; c < kChains; ++c) s = _mm256_xor_si256(s, a[c]);
  return static_cast<float>(_mm256_extract_epi32(s, 0) & 0xff);
}

__attribute__((target("avx512f,avx512bw"))) float Avx512MaddwdLoop(int64_t iters) {
  volatile int16_t seed = 3;
  const __m512i y = _mm512_set1_epi16(seed);
  __m512i a[kChains];
  for (int c = 0; c < kChains; ++c) a[c] = _mm512_set1_epi16(static_cast<int16_t>(seed + c));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) a[c] = _mm512_madd_epi16(a[c], y);
  }
  __m512i s = a[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_xor_si512(s, a[c]);
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, s);
  return static_cast<float>(lanes[0] & 0xff);
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) float Avx512VnniLoop(int64_t iters) {
  volatile int8_t seed = 3;
  const __m512i x = _mm512_set1_epi8(seed);
  const __m512i y = _mm512_set1_epi8(static_cast<int8_t>(seed - 5));
  __m512i a[kChains];
  for (int c = 0; c < kChains; ++c) a[c] = _mm512_set1_epi32(seed + c);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) a[c] = _mm512_dpbusd_epi32(a[c], x, y);
  }
  __m512i s = a[0];
  for (int c = 1; c < kChains; ++c) s = _mm512_xor_si512(s, a[c]);
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, s);
  return static_cast<float>(lanes[0] & 0xff);
}

float ScalarIntLoop(int64_t iters) {
  volatile uint32_t seed = 3;
  const uint32_t x = seed, y = seed + 7;  // unsigned: wrap-around is defined
  uint32_t a[kChains];
  for (int c = 0; c < kChains; ++c) a[c] = seed + c;
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int c = 0; c < kChains; ++c) a[c] = a[c] * x + y;
  }
  uint32_t s = 0;
  for (int c = 0; c < kChains; ++c) s ^= a[c];
  return static_cast<float>(s & 0xff);
}

}  // namespace

PeakLoop PeakLoopAvx2Maddwd() { return PeakLoop{Avx2MaddwdLoop, "vpmaddwd ymm", 32, kChains}; }
PeakLoop PeakLoopAvx512Maddwd() { return PeakLoop{Avx512MaddwdLoop, "vpmaddwd zmm", 64, kChains}; }
PeakLoop PeakLoopAvx512Vnni() { return PeakLoop{Avx512VnniLoop, "vpdpbusd zmm", 128, kChains}; }
PeakLoop PeakLoopScalarInt() { return PeakLoop{ScalarIntLoop, "imul+add", 2, kChains}; }

}  // namespace internal
}  // namespace tools
}  // namespace kt
