// The SFT engine's small fp32 kernels, one code path per Isa (Highway AVX2 / AVX3 / AVX3_DL, plain C++ for
// kScalar), so that the LoRA math runs on the same vectors as the base GEMMs instead of baseline x86-64
// (SSE2) loops.
//
// Every LoRA product of forward and backward is one shape: C[m, n] = alpha · A · B (+ C), with the inner
// dimension either long (H or I: A x, grad_y B_d, grad_g B_g) or r (the B (A x) terms), and the LoRA
// gradients the same with A read transposed (dA = s dB^T X, dB = s D^T (A X)). One kernel with strided A
// serves all twelve, so no transposed copies of the activations are needed; B is a row-major fp32 block
// (a LoRA tensor converted once per task, or fp32 activation rows).
//
// Numerics: fp32 products summed in k order into one fp32 accumulator per element (FMA on the vector
// paths, multiply then add on kScalar), alpha applied once at the end. The error is the usual summation
// bound, k · 2^-23 · Σ|a b| per element (lora_kernels_test checks every path against double sums).
#ifndef KT_KERNELS_LORA_KERNELS_H_
#define KT_KERNELS_LORA_KERNELS_H_

#include <cstddef>

#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"

namespace kt {

// For i < m, j < n: c[i * ldc + j] = alpha · Σ_{q < k} A(i, q) · b[q * ldb + j]  (+ c[i * ldc + j] when
// `accumulate`), with A(i, q) = a[i * a_row + q * a_col]. A is fp32 or bf16 (bf16 elements are widened
// exactly), B and C fp32. k = 0 gives alpha · 0 (+ c). No allocation; c must not overlap a or b.
void LoraGemm(Isa isa, size_t m, size_t n, size_t k, float alpha, const float* a, size_t a_row,
              size_t a_col, const float* b, size_t ldb, float* c, size_t ldc, bool accumulate);
void LoraGemm(Isa isa, size_t m, size_t n, size_t k, float alpha, const bf16_t* a, size_t a_row,
              size_t a_col, const float* b, size_t ldb, float* c, size_t ldc, bool accumulate);

// The dot form, for the long inner dimension with both operands stored along it (A_g x, A_d h: the rows of
// x or h against the rows of a LoRA A, no transposed copy of either): for i < m, j < n:
//   c[i * ldc + j] = alpha · Σ_{q < k} a[i * lda + q] · b[j * ldb + q]  (+ c[i * ldc + j] when accumulate).
// Summed in vector lanes and reduced at the end, so the order differs from LoraGemm; same error bound.
void LoraGemmNT(Isa isa, size_t m, size_t n, size_t k, float alpha, const bf16_t* a, size_t lda,
                const float* b, size_t ldb, float* c, size_t ldc, bool accumulate);

// The SiLU gate's backward for i < n: with sigma = 1 / (1 + exp(-g)),
//   dg[i] = bf16(d u sigma (1 + g (1 - sigma)))      (d silu(g) / dg = sigma (1 + g (1 - sigma)))
//   du[i] = bf16(d g sigma)                          (= d silu(g))
// The vector paths use Highway's exp (~1 ulp), so an element may round to the neighbouring bf16 value;
// kScalar uses std::exp.
void SiluBackwardToBf16(Isa isa, const float* d, const float* g, const float* u, bf16_t* dg, bf16_t* du,
                        size_t n);

}  // namespace kt

#endif  // KT_KERNELS_LORA_KERNELS_H_
