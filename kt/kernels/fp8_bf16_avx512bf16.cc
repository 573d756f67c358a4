// The AMX FP8 prefill's weight conversion (GemmFp8Amx) with AVX512-BF16's two-vector rounding: FP8 panels
// to gemm_bf16.h's bf16 panels of bf16(fp8 * block scale). Its own translation unit with its own flags,
// reached only after CPUID reports AVX512-BF16 (every AMX CPU has it).
//
// One k pair of a panel (2 x 16 codes, contiguous) per step: each 16 codes decode to fp32 as the Highway
// kernels' fast decode does (sign-extended, shifted left by 20, masked: the value times 2^-120; times 2^120,
// then times the 16 rows' block scale: the same two exact-or-once-rounded fp32 multiplies as
// Fp8PanelsToBf16Hwy), vcvtne2ps2bf16 rounds both to nearest even at once, NaN codes become the quiet NaN
// of their sign, 0x7fc0 or 0xffc0, as the portable conversion gives (found on the codes themselves), and
// one vpermw interleaves the two k into the (k, k + 1) pairs of the bf16 panel. About half the instructions of the portable conversion per weight. Exact (the Highway
// conversion's bits) only without MXCSR.DAZ (the fast decode would read subnormal codes as zero) and with no
// scale in (0, 2^-116] (a subnormal product, which the instruction flushes to zero): GemmFp8Amx checks both
// (Fp8ScalesBf16Safe) and otherwise runs the Highway conversion.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "kt/kernels/gemm_fp8.h"

namespace kt {
namespace internal {

void Fp8PanelsToBf16Avx512Bf16(size_t k, const uint8_t* panels, const float* scales, size_t n_panels,
                               bf16_t* out) {
  const size_t stride = Fp8PanelStride(k), blocks = Fp8KBlocks(k), pairs = (k + 1) / 2;
  const __m512i lane_mask = _mm512_set1_epi32(static_cast<int>(0x87f00000u));
  const __m512 pow120 = _mm512_set1_ps(0x1p120f);
  const __m256i mag7 = _mm256_set1_epi8(0x7f);
  const __m512i qnan = _mm512_set1_epi16(0x7fc0);
  const __m512i neg_qnan = _mm512_set1_epi16(static_cast<int16_t>(0xffc0));
  // vcvtne2ps2bf16(b, a) holds a's 16 values in words 0-15 and b's in 16-31; word 2i of a pair is a_i,
  // 2i + 1 is b_i.
  alignas(64) int16_t idx_words[32];
  for (int i = 0; i < 16; ++i) {
    idx_words[2 * i] = static_cast<int16_t>(i);
    idx_words[2 * i + 1] = static_cast<int16_t>(16 + i);
  }
  const __m512i interleave = _mm512_load_si512(idx_words);
  for (size_t p = 0; p < n_panels; ++p) {
    const uint8_t* panel = panels + p * stride;
    const float* ps = scales + p * kFp8PanelRows * blocks;
    __m512i* o = reinterpret_cast<__m512i*>(out + p * pairs * 2 * kFp8PanelRows);
    for (size_t kp = 0; kp < pairs; ++kp) {
      const size_t c = 2 * kp;
      const __m512 scale = _mm512_loadu_ps(ps + (c / kFp8BlockK) * kFp8PanelRows);  // c, c + 1: one block
      // The pair's 32 codes (the second 16 zero past an odd K's end).
      const __m256i codes = c + 1 < k ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + c * kFp8PanelRows))
                                      : _mm256_zextsi128_si256(_mm_loadu_si128(
                                            reinterpret_cast<const __m128i*>(panel + c * kFp8PanelRows)));
      const __m512i ca = _mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes));
      const __m512i cb = _mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1));
      const __m512 a = _mm512_mul_ps(
          _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(ca, 20), lane_mask)), pow120), scale);
      const __m512 b = _mm512_mul_ps(
          _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_slli_epi32(cb, 20), lane_mask)), pow120), scale);
      __m512i r = (__m512i)_mm512_cvtne2ps_pbh(b, a);
      const __mmask32 nan = _mm256_cmpeq_epi8_mask(_mm256_and_si256(codes, mag7), mag7);
      const __mmask32 negative = _mm256_movepi8_mask(codes);
      r = _mm512_mask_mov_epi16(r, nan, qnan);
      r = _mm512_mask_mov_epi16(r, nan & negative, neg_qnan);
      _mm512_storeu_si512(o + kp, _mm512_permutexvar_epi16(interleave, r));
    }
  }
}

}  // namespace internal
}  // namespace kt
