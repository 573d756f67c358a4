// The blocking and driver skeleton the Highway GEMM families (gemm_bf16_hwy.cc, gemm_int8_hwy.cc,
// gemm_int4_hwy.cc) share, per target. The weights of all three are packed in panels of 16 output rows;
// a family supplies only its micro-kernel (how its operands are loaded and widened, and its epilogue)
// as a traits class, and this file walks the output in blocks of up to kMaxRows rows x kMaxPanels
// panels, choosing for each block the micro-kernel instance compiled for exactly its row count.
//
// Register blocking per target: AVX3 has 32 vector registers, enough for 8 rows x 2 panels of
// accumulators plus the widened weights and broadcasts; AVX2 has 16, so 4 rows x 1 panel (a panel is 2
// ymm). Decode (m <= 2) takes 2 panels on every target: few rows leave registers free, and the second
// panel adds independent FMA chains and memory streams.
//
// A family's traits class Family provides:
//   using Args = ...;                      the kernel's arguments (one struct, passed by reference)
//   template <int MR, int NP> static void Block(const Args& args, size_t row0, size_t panel0, size_t cols);
//       y rows [row0, row0 + MR) and columns [16 panel0, 16 panel0 + cols) from NP panels (cols <= 16 NP).
// Toggle guard: this header is re-included once per Highway target (foreach_target.h).
#if defined(KT_KERNELS_GEMM_HWY_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef KT_KERNELS_GEMM_HWY_INL_H_
#undef KT_KERNELS_GEMM_HWY_INL_H_
#else
#define KT_KERNELS_GEMM_HWY_INL_H_
#endif

#include <hwy/highway.h>

#include <algorithm>
#include <cstddef>

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace gemm_hwy {
namespace hn = hwy::HWY_NAMESPACE;

// Output rows of one panel, in every family's packed layout.
inline constexpr size_t kPanelRows16 = 16;
inline constexpr int kRegs = HWY_MAX_BYTES >= 64 ? 32 : 16;
inline constexpr int kMaxRows = kRegs >= 32 ? 8 : 4;
inline constexpr int kMaxPanels = kRegs >= 32 ? 2 : 1;

// Stores the first n (<= Lanes(d)) lanes of v at out: a plain store when the vector is whole, else
// through an aligned buffer (out has only n floats of the block's columns).
template <class D, class V>
HWY_INLINE void StoreFirstN(D d, V v, size_t n, float* HWY_RESTRICT out) {
  constexpr size_t kLanes = HWY_MAX_BYTES / sizeof(float);
  if (n == kLanes) {
    hn::StoreU(v, d, out);
  } else {
    HWY_ALIGN float tmp[kLanes];
    hn::Store(v, d, tmp);
    std::copy(tmp, tmp + n, out);
  }
}

template <class Family>
using BlockFn = void (*)(const typename Family::Args&, size_t, size_t, size_t);

// The Block instance for `rows` (1 .. kMaxRows) rows of NP panels: exactly `rows` rows, so the driver
// never runs padding rows (instances the target cannot hold in registers are never asked for).
template <class Family, int NP>
BlockFn<Family> PickRows(size_t rows) {
  if (rows >= 8 && kMaxRows >= 8) return &Family::template Block<kMaxRows, NP>;
  switch (rows) {
    case 1: return &Family::template Block<1, NP>;
    case 2: return &Family::template Block<2, NP>;
    case 3: return &Family::template Block<3, NP>;
    case 5: return &Family::template Block<(kMaxRows >= 5 ? 5 : 1), NP>;
    case 6: return &Family::template Block<(kMaxRows >= 6 ? 6 : 1), NP>;
    case 7: return &Family::template Block<(kMaxRows >= 7 ? 7 : 1), NP>;
    default: return &Family::template Block<4, NP>;
  }
}

// y[0, m) x [0, n_cols) in blocks: panel groups of up to kMaxPanels (2 for m <= 2), and within each,
// row blocks of up to kMaxRows.
template <class Family>
void RunBlocks(const typename Family::Args& args, size_t m, size_t n_cols) {
  const size_t num_panels = (n_cols + kPanelRows16 - 1) / kPanelRows16;
  const size_t max_panels = m <= 2 ? 2 : kMaxPanels;
  for (size_t p = 0; p < num_panels; p += max_panels) {
    const size_t np = std::min<size_t>(max_panels, num_panels - p);
    const size_t cols = std::min(n_cols - p * kPanelRows16, np * kPanelRows16);
    for (size_t i = 0; i < m;) {
      const size_t rows = std::min<size_t>(kMaxRows, m - i);
      const BlockFn<Family> fn = np == 2 ? PickRows<Family, 2>(rows) : PickRows<Family, 1>(rows);
      fn(args, i, p, cols);
      i += rows;  // rows <= kMaxRows, so PickRows returned a block of exactly `rows` rows
    }
  }
}

}  // namespace gemm_hwy
// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#endif  // KT_KERNELS_GEMM_HWY_INL_H_
