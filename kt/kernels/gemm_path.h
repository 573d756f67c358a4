// The kernel paths of a GEMM family (bf16, int8, int4, fp8) as one table: each family exports its table
// (GemmBf16Paths, GemmInt8Paths, GemmInt4Paths, GemmFp8Paths), and its GetGemm* lookup, its tests and its benchmark all
// read that table, so a path added to it is selected, tested and timed with no other edit.
#ifndef KT_KERNELS_GEMM_PATH_H_
#define KT_KERNELS_GEMM_PATH_H_

#include <initializer_list>
#include <vector>

#include "kt/kernels/cpu_features.h"

namespace kt {

// One kernel of a family.
template <typename Fn>
struct GemmPath {
  const char* name;  // "scalar", "hwy_avx2", "vnni", "amx", ...: test suffixes and benchmark labels.
  Isa isa;           // What the CPU must support to run fn.
  Fn fn;             // Never null in a table (a Highway target not compiled in has no entry).
};

// A family's paths in increasing order of preference. Two paths may need the same Isa (int8's Highway
// AVX3_DL kernel and its native VNNI kernel): the later one is the one GetGemm* selects.
template <typename Fn>
using GemmPaths = std::vector<GemmPath<Fn>>;

// The kernel a family selects for `isa`: the last path of `paths` whose Isa `isa` covers (Isa values are
// ordered: each path needs what the lower ones need); nullptr if none.
template <typename Fn>
Fn SelectGemmPath(const GemmPaths<Fn>& paths, Isa isa) {
  Fn fn = nullptr;
  for (const GemmPath<Fn>& path : paths) {
    if (path.isa <= isa) fn = path.fn;
  }
  return fn;
}

// The table without the paths whose fn is null (Highway targets not compiled in).
template <typename Fn>
GemmPaths<Fn> CompiledGemmPaths(std::initializer_list<GemmPath<Fn>> paths) {
  GemmPaths<Fn> out;
  for (const GemmPath<Fn>& path : paths) {
    if (path.fn != nullptr) out.push_back(path);
  }
  return out;
}

}  // namespace kt

#endif  // KT_KERNELS_GEMM_PATH_H_
