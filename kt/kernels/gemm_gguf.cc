// The scalar path and the path table of the GGUF GEMM.
#include "kt/kernels/gemm_gguf.h"

namespace kt {
namespace internal {

void GemmGgufScalar(GgufType type, size_t m, size_t k, const GgufRows& in, const uint8_t* w, size_t cols,
                    float* y, size_t ldy) {
  const size_t row_bytes = GgufRowBytes(type, k);
  const size_t ab = GgufActivationBlock(type);
  for (size_t r = 0; r < m; ++r) {
    for (size_t j = 0; j < cols; ++j) {
      const uint8_t* wr = w + j * row_bytes;
      y[r * ldy + j] = ab == 0 ? GgufDotBf16(type, wr, k, in.x + r * in.ld)
                               : GgufDotQ8(type, wr, k, in.qx + r * in.ld, in.sx + r * (k / ab));
    }
  }
}

}  // namespace internal

const GemmPaths<GemmGgufFn>& GemmGgufPaths() {
  // Built on first use: the Highway entries come from another translation unit.
  static const auto* const paths = new GemmPaths<GemmGgufFn>(CompiledGemmPaths<GemmGgufFn>({
      {"scalar", Isa::kScalar, &internal::GemmGgufScalar},
      {"hwy_avx2", Isa::kAvx2, internal::GemmGgufHwy(Isa::kAvx2)},
      {"hwy_avx512", Isa::kAvx512, internal::GemmGgufHwy(Isa::kAvx512)},
      {"hwy_avx512_vnni", Isa::kAvx512Vnni, internal::GemmGgufHwy(Isa::kAvx512Vnni)},
  }));
  return *paths;
}

GemmGgufFn GetGemmGguf(Isa isa) { return SelectGemmPath(GemmGgufPaths(), isa); }

}  // namespace kt
