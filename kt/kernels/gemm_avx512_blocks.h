// The blocking/driver skeleton of the native AVX-512 GEMM kernels (gemm_bf16_avx512bf16.cc,
// gemm_int8_vnni.cc, gemm_int4_vnni.cc), as gemm_hwy-inl.h is for the Highway ones. All three walk
// 16-row weight panels with one zmm per panel and up to 8 rows of x: MR x NV zmm accumulators
// (8 x 3 = 24 for bf16 and int8, 8 x 2 = 16 for int4, whose nibbles take more registers to expand)
// plus the weights and broadcasts fit the 32 zmm registers. A family supplies its micro-kernel as a
// traits class:
//   static constexpr size_t kMaxPanels;    panels per block (2 or 3)
//   using Args = ...;                      the kernel's arguments
//   template <int MR, int NV> static void Block(const Args& args, size_t row0, size_t panel0, size_t cols);
//
// Include only from translation units compiled with AVX-512 flags. Everything here has internal linkage
// (an unnamed namespace), so no out-of-line copy compiled with those flags can be shared by the linker
// with code that runs on CPUs without them.
#ifndef KT_KERNELS_GEMM_AVX512_BLOCKS_H_
#define KT_KERNELS_GEMM_AVX512_BLOCKS_H_

#include <cstddef>

namespace kt {
namespace internal {
namespace {  // NOLINT(build/namespaces): internal linkage on purpose, see above.
namespace avx512_blocks {

inline constexpr size_t kPanelRows16 = 16;
inline constexpr size_t kMaxRows = 8;

inline size_t MinSize(size_t a, size_t b) { return a < b ? a : b; }

template <class Family>
using BlockFn = void (*)(const typename Family::Args&, size_t, size_t, size_t);

// The Block instance of exactly `rows` (1 .. 8) rows of NV panels.
template <class Family, int NV>
BlockFn<Family> PickRows(size_t rows) {
  switch (rows) {
    case 1: return &Family::template Block<1, NV>;
    case 2: return &Family::template Block<2, NV>;
    case 3: return &Family::template Block<3, NV>;
    case 4: return &Family::template Block<4, NV>;
    case 5: return &Family::template Block<5, NV>;
    case 6: return &Family::template Block<6, NV>;
    case 7: return &Family::template Block<7, NV>;
    default: return &Family::template Block<8, NV>;
  }
}

// y[0, m) x [0, n_cols): panel groups of up to Family::kMaxPanels, row blocks of up to 8 rows.
template <class Family>
void RunBlocks(const typename Family::Args& args, size_t m, size_t n_cols) {
  static_assert(Family::kMaxPanels == 2 || Family::kMaxPanels == 3, "blocks of 1 .. 3 panels");
  const size_t num_panels = (n_cols + kPanelRows16 - 1) / kPanelRows16;
  for (size_t p = 0; p < num_panels; p += Family::kMaxPanels) {
    const size_t np = MinSize(Family::kMaxPanels, num_panels - p);
    const size_t cols = MinSize(n_cols - p * kPanelRows16, np * kPanelRows16);
    for (size_t i = 0; i < m; i += kMaxRows) {
      const size_t rows = MinSize(kMaxRows, m - i);
      BlockFn<Family> fn;
      if constexpr (Family::kMaxPanels >= 3) {
        fn = np >= 3   ? PickRows<Family, 3>(rows)
             : np == 2 ? PickRows<Family, 2>(rows)
                       : PickRows<Family, 1>(rows);
      } else {
        fn = np == 2 ? PickRows<Family, 2>(rows) : PickRows<Family, 1>(rows);
      }
      fn(args, i, p, cols);
    }
  }
}

}  // namespace avx512_blocks
}  // namespace
}  // namespace internal
}  // namespace kt

#endif  // KT_KERNELS_GEMM_AVX512_BLOCKS_H_
