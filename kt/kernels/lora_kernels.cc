#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/lora_kernels.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include <cmath>

#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/lora_kernels.h"

#ifndef KT_KERNELS_LORA_KERNELS_SCALAR_
#define KT_KERNELS_LORA_KERNELS_SCALAR_
namespace kt {
namespace {

inline float Widen(float v) { return v; }
inline float Widen(bf16_t v) { return Bf16ToF32(v); }

// The plain C++ truth of the kScalar path (also the column tail of the vector paths).
template <typename TA>
void GemmScalar(size_t m, size_t j0, size_t j1, size_t k, float alpha, const TA* a, size_t a_row,
                size_t a_col, const float* b, size_t ldb, float* c, size_t ldc, bool accumulate) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = j0; j < j1; ++j) {
      float acc = 0.0f;
      for (size_t q = 0; q < k; ++q) acc += Widen(a[i * a_row + q * a_col]) * b[q * ldb + j];
      float& out = c[i * ldc + j];
      out = accumulate ? out + alpha * acc : alpha * acc;
    }
  }
}

void GemmNTScalar(size_t m, size_t n, size_t k, float alpha, const bf16_t* a, size_t lda, const float* b,
                  size_t ldb, float* c, size_t ldc, bool accumulate) {
  for (size_t i = 0; i < m; ++i) {
    for (size_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (size_t q = 0; q < k; ++q) acc += Bf16ToF32(a[i * lda + q]) * b[j * ldb + q];
      float& out = c[i * ldc + j];
      out = accumulate ? out + alpha * acc : alpha * acc;
    }
  }
}

}  // namespace
}  // namespace kt
#endif  // KT_KERNELS_LORA_KERNELS_SCALAR_

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// An R x (V vectors) block of C held in registers over the whole k loop: per step V loads of a B row and
// R broadcasts of A feed R·V FMAs. R·V = 8 accumulators (4 x 2 or 8 x 1) leaves registers for the B
// vectors and the broadcast on AVX2's 16; C is read and written once per block.
template <size_t R, size_t V, typename TA>
HWY_INLINE void Tile(size_t k, float alpha, const TA* HWY_RESTRICT a, size_t a_row, size_t a_col,
                     const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c, size_t ldc,
                     bool accumulate) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  using VF = hn::Vec<decltype(df)>;
  VF acc[R][V];
  for (size_t r = 0; r < R; ++r) {
    for (size_t v = 0; v < V; ++v) acc[r][v] = hn::Zero(df);
  }
  for (size_t q = 0; q < k; ++q) {
    VF bv[V];
    for (size_t v = 0; v < V; ++v) bv[v] = hn::LoadU(df, b + q * ldb + v * lanes);
    for (size_t r = 0; r < R; ++r) {
      const VF av = hn::Set(df, Widen(a[r * a_row + q * a_col]));
      for (size_t v = 0; v < V; ++v) acc[r][v] = hn::MulAdd(av, bv[v], acc[r][v]);
    }
  }
  const VF va = hn::Set(df, alpha);
  for (size_t r = 0; r < R; ++r) {
    for (size_t v = 0; v < V; ++v) {
      float* p = c + r * ldc + v * lanes;
      const VF out = accumulate ? hn::MulAdd(va, acc[r][v], hn::LoadU(df, p)) : hn::Mul(va, acc[r][v]);
      hn::StoreU(out, df, p);
    }
  }
}

// Columns j .. j + V·lanes of C, all m rows: 8-row blocks with one vector per row (n = r = 16 on AVX3 is
// one vector), 4-row blocks with two (AVX2, and the wide blocks of the B (A x) terms), then single rows.
template <size_t V, typename TA>
HWY_INLINE void Strip(size_t m, size_t j, size_t k, float alpha, const TA* HWY_RESTRICT a, size_t a_row,
                      size_t a_col, const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c,
                      size_t ldc, bool accumulate) {
  constexpr size_t kRows = V == 1 ? 8 : 4;
  size_t i = 0;
  for (; i + kRows <= m; i += kRows) {
    Tile<kRows, V>(k, alpha, a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc, accumulate);
  }
  for (; i < m; ++i) {
    Tile<1, V>(k, alpha, a + i * a_row, a_row, a_col, b + j, ldb, c + i * ldc + j, ldc, accumulate);
  }
}

template <typename TA>
void Gemm(size_t m, size_t n, size_t k, float alpha, const TA* HWY_RESTRICT a, size_t a_row, size_t a_col,
          const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c, size_t ldc, bool accumulate) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  size_t j = 0;
  for (; j + 2 * lanes <= n; j += 2 * lanes) {
    Strip<2>(m, j, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
  for (; j + lanes <= n; j += lanes) Strip<1>(m, j, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  // Fewer than `lanes` columns left (a rank or block width not a multiple of the vector): plain code.
  if (j < n) GemmScalar(m, j, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

void GemmF32(size_t m, size_t n, size_t k, float alpha, const float* a, size_t a_row, size_t a_col,
             const float* b, size_t ldb, float* c, size_t ldc, bool accumulate) {
  Gemm(m, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

void GemmBf16A(size_t m, size_t n, size_t k, float alpha, const bf16_t* a, size_t a_row, size_t a_col,
               const float* b, size_t ldb, float* c, size_t ldc, bool accumulate) {
  Gemm(m, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

// R rows of a against C rows of b: R·C vector accumulators along k (2 x 4 = 8: per step 2 widened a loads
// and 4 b loads feed 8 FMAs), each reduced across lanes once at the end; k's tail (< lanes) in plain code.
template <size_t R, size_t C>
HWY_INLINE void TileNT(size_t k, float alpha, const bf16_t* HWY_RESTRICT a, size_t lda,
                       const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c, size_t ldc,
                       bool accumulate) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  using VF = hn::Vec<decltype(df)>;
  VF acc[R][C];
  for (size_t r = 0; r < R; ++r) {
    for (size_t j = 0; j < C; ++j) acc[r][j] = hn::Zero(df);
  }
  size_t q = 0;
  for (; q + lanes <= k; q += lanes) {
    VF av[R];
    for (size_t r = 0; r < R; ++r) av[r] = LoadBf16(df, a + r * lda + q);
    for (size_t j = 0; j < C; ++j) {
      const VF bv = hn::LoadU(df, b + j * ldb + q);
      for (size_t r = 0; r < R; ++r) acc[r][j] = hn::MulAdd(av[r], bv, acc[r][j]);
    }
  }
  for (size_t r = 0; r < R; ++r) {
    for (size_t j = 0; j < C; ++j) {
      float sum = hn::GetLane(hn::SumOfLanes(df, acc[r][j]));
      for (size_t t = q; t < k; ++t) sum += Bf16ToF32(a[r * lda + t]) * b[j * ldb + t];
      float& out = c[r * ldc + j];
      out = accumulate ? out + alpha * sum : alpha * sum;
    }
  }
}

template <size_t R>
HWY_INLINE void RowsNT(size_t n, size_t k, float alpha, const bf16_t* HWY_RESTRICT a, size_t lda,
                       const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c, size_t ldc,
                       bool accumulate) {
  size_t j = 0;
  for (; j + 4 <= n; j += 4) TileNT<R, 4>(k, alpha, a, lda, b + j * ldb, ldb, c + j, ldc, accumulate);
  for (; j < n; ++j) TileNT<R, 1>(k, alpha, a, lda, b + j * ldb, ldb, c + j, ldc, accumulate);
}

void GemmNT(size_t m, size_t n, size_t k, float alpha, const bf16_t* HWY_RESTRICT a, size_t lda,
            const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c, size_t ldc, bool accumulate) {
  size_t i = 0;
  for (; i + 2 <= m; i += 2) RowsNT<2>(n, k, alpha, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
  if (i < m) RowsNT<1>(n, k, alpha, a + i * lda, lda, b, ldb, c + i * ldc, ldc, accumulate);
}

void SiluBackward(const float* HWY_RESTRICT d, const float* HWY_RESTRICT g, const float* HWY_RESTRICT u,
                  bf16_t* HWY_RESTRICT dg, bf16_t* HWY_RESTRICT du, size_t n) {
  const hn::ScalableTag<float> df;
  const hn::ScalableTag<uint32_t> du32;
  const hn::Rebind<uint16_t, decltype(du32)> du16;
  const size_t lanes = hn::Lanes(df);
  // exp(88) is near FLT_MAX; below g = -88 sigma is < 1e-38 and both results are 0 to bf16 precision.
  const auto kMaxNegExp = hn::Set(df, 88.0f);
  const auto one = hn::Set(df, 1.0f);
  uint16_t* dg_bits = reinterpret_cast<uint16_t*>(dg);
  uint16_t* du_bits = reinterpret_cast<uint16_t*>(du);
  size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto gv = hn::LoadU(df, g + i);
    const auto dv = hn::LoadU(df, d + i);
    const auto sig = hn::Div(one, hn::Add(one, hn::Exp(df, hn::Min(hn::Neg(gv), kMaxNegExp))));
    // The scalar expression's order: ((d u) sigma) (1 + g (1 - sigma)) and (d g) sigma.
    const auto dsilu = hn::MulAdd(gv, hn::Sub(one, sig), one);
    const auto dgv = hn::Mul(hn::Mul(hn::Mul(dv, hn::LoadU(df, u + i)), sig), dsilu);
    const auto duv = hn::Mul(hn::Mul(dv, gv), sig);
    hn::StoreU(hn::TruncateTo(du16, RoundToBf16Bits(du32, dgv)), du16, dg_bits + i);
    hn::StoreU(hn::TruncateTo(du16, RoundToBf16Bits(du32, duv)), du16, du_bits + i);
  }
  for (; i < n; ++i) {
    const float sig = 1.0f / (1.0f + std::exp(-g[i]));
    dg[i] = F32ToBf16(d[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig)));
    du[i] = F32ToBf16(d[i] * g[i] * sig);
  }
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace {

using GemmF32Fn = void (*)(size_t, size_t, size_t, float, const float*, size_t, size_t, const float*, size_t,
                           float*, size_t, bool);
using GemmBf16AFn = void (*)(size_t, size_t, size_t, float, const bf16_t*, size_t, size_t, const float*,
                             size_t, float*, size_t, bool);
using GemmNTFn = void (*)(size_t, size_t, size_t, float, const bf16_t*, size_t, const float*, size_t, float*,
                          size_t, bool);
using SiluBackwardFn = void (*)(const float*, const float*, const float*, bf16_t*, bf16_t*, size_t);

// The native AVX512-BF16 and AMX paths have no fp32 kernels of their own: they run the AVX3_DL code (same
// CPUs), as every Highway module does (hwy_dispatch.h).
const HwyFns<GemmF32Fn> kGemmF32 = KT_HWY_FNS(GemmF32Fn, GemmF32);
const HwyFns<GemmBf16AFn> kGemmBf16A = KT_HWY_FNS(GemmBf16AFn, GemmBf16A);
const HwyFns<GemmNTFn> kGemmNT = KT_HWY_FNS(GemmNTFn, GemmNT);
const HwyFns<SiluBackwardFn> kSiluBackward = KT_HWY_FNS(SiluBackwardFn, SiluBackward);

}  // namespace

void LoraGemm(Isa isa, size_t m, size_t n, size_t k, float alpha, const float* a, size_t a_row,
              size_t a_col, const float* b, size_t ldb, float* c, size_t ldc, bool accumulate) {
  if (const GemmF32Fn fn = kGemmF32.For(isa)) {
    return fn(m, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
  GemmScalar(m, 0, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

void LoraGemm(Isa isa, size_t m, size_t n, size_t k, float alpha, const bf16_t* a, size_t a_row,
              size_t a_col, const float* b, size_t ldb, float* c, size_t ldc, bool accumulate) {
  if (const GemmBf16AFn fn = kGemmBf16A.For(isa)) {
    return fn(m, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
  }
  GemmScalar(m, 0, n, k, alpha, a, a_row, a_col, b, ldb, c, ldc, accumulate);
}

void LoraGemmNT(Isa isa, size_t m, size_t n, size_t k, float alpha, const bf16_t* a, size_t lda,
                const float* b, size_t ldb, float* c, size_t ldc, bool accumulate) {
  if (const GemmNTFn fn = kGemmNT.For(isa)) return fn(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
  GemmNTScalar(m, n, k, alpha, a, lda, b, ldb, c, ldc, accumulate);
}

void SiluBackwardToBf16(Isa isa, const float* d, const float* g, const float* u, bf16_t* dg, bf16_t* du,
                        size_t n) {
  if (const SiluBackwardFn fn = kSiluBackward.For(isa)) return fn(d, g, u, dg, du, n);
  for (size_t i = 0; i < n; ++i) {
    const float sig = 1.0f / (1.0f + std::exp(-g[i]));
    dg[i] = F32ToBf16(d[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig)));
    du[i] = F32ToBf16(d[i] * g[i] * sig);
  }
}

}  // namespace kt
#endif  // HWY_ONCE
