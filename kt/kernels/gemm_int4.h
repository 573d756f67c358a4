// INT4 matrix kernels for expert projections in the int4 formats of quant.h: kt-int4-channel-v1 (symmetric,
// one scale per row; the original's AMXINT4), kt-int4-channel-asym-v1 (a scale and zero point per row; the
// original's INT4_1), kt-int4-group{G}-sym-v1 and kt-int4-group{G}-asym-v1 (a scale, and for asym a zero
// point, per G = 32/64/128 consecutive k of a row; AWQ / the original's INT4_1 K-group). Activations are int8
// per token (QuantizeActivationInt8) for the per-channel formats and per token and group
// (QuantizeActivationInt8Grouped) for the group formats.
//
// One kernel serves all four formats. Every weight nibble is stored unsigned, u in [0, 15], with a zero
// point z: the asym formats store their own q and z; the symmetric ones store u = q + 8 with the implicit
// z = 8 (q in [-7, 7] -> u in [1, 15]). Per group g of row n and token m the kernels compute
//   acc = sum_k u[n][k] * qx[m][k]            exact in int32 (|u qx| <= 15 * 127)
//   t_g = (sx[m][g] * sw[n][g]) * float(acc - z[n][g] * xsum[m][g])
//   y   = t_0 + t_1 + ... (left to right, fp32)
// where xsum[m][g] = sum_k qx[m][k] over the group (Int4ActivationSums). acc - z * xsum equals
// sum_k (u - z) * qx = sum_k q * qx exactly, so the integer part is the same on every path; the fp32 part
// is the same sequence of multiplies and adds, never fused (the libraries build with -ffp-contract=off),
// so every path (scalar, Highway AVX2/AVX3/AVX3_DL, AVX512-VNNI, AMX) agrees bit for bit.
// The per-channel formats are one group spanning K (group = 0 below).
//
// Unsigned u in [0, 15] is what the instructions want: vpdpbusd multiplies unsigned bytes (u) by signed
// bytes (qx) with no +128 shift; AMX tdpbssd takes u as a non-negative signed byte; the Highway paths
// use vpmaddubsw (unsigned u times signed qx) on AVX2/AVX3.
//
// Packed layout kt-int4-panel16-kblock8-v1 (docs/FORMATS.md): panels of 16 output rows; K is cut into
// blocks of 8 (two k-quads, K padded with u = 0 to a multiple of 8). One block of a panel is 64 bytes:
//   byte 4r + j = u[16p + r][8b + j] | u[16p + r][8b + 4 + j] << 4,   r < 16, j < 4
// so `byte & 0xF` is exactly the kt-int8-panel16-kquad-v1 quad-row of quad 2b and `byte >> 4` that of
// quad 2b + 1: one AND (and one shift) turn 64 packed bytes into two 64-byte int8 operand rows of vpdpbusd
// or two rows of an AMX B tile. Panel p starts at byte p * Int4PanelStride(K).
// Beside the panels: fp32 scales as [panel][group][16 rows] (a panel's 16 scales of one group are one
// 64-byte vector) and, for the asym formats only, uint8 zero points in the same order; padding rows hold 0.
#ifndef KT_KERNELS_GEMM_INT4_H_
#define KT_KERNELS_GEMM_INT4_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/gemm_path.h"
#include "kt/kernels/quant.h"

namespace kt {

inline constexpr size_t kInt4PanelRows = 16;
// Zero point of the symmetric formats (u = q + 8).
inline constexpr int kInt4SymZero = 8;
// Largest K for exact int32 accumulation of one group: |acc| <= 15 * 127 * K and |z * xsum| <= 15 * 127
// * K, so |acc - z * xsum| < 2^31 needs K < 2^31 / (2 * 1905); 2^19 keeps a margin.
inline constexpr size_t kInt4MaxK = size_t{1} << 19;

inline constexpr size_t KBlocks8(size_t k) { return (k + 7) / 8; }
inline constexpr size_t Int4PanelStride(size_t k) { return KBlocks8(k) * 64; }  // bytes per panel
inline constexpr size_t Int4NumPanels(size_t n) { return (n + kInt4PanelRows - 1) / kInt4PanelRows; }
inline constexpr size_t PackedInt4Bytes(size_t n, size_t k) { return Int4NumPanels(n) * Int4PanelStride(k); }
// Groups per row: K / group for the group formats, 1 for per-channel (group == 0).
inline constexpr size_t Int4Groups(size_t k, size_t group) { return group == 0 ? 1 : k / group; }
// Entries of the packed scale (and zero point) arrays.
inline constexpr size_t PackedInt4Scales(size_t n, size_t k, size_t group) {
  return Int4NumPanels(n) * kInt4PanelRows * Int4Groups(k, group);
}

// The kernel's `group` for a spec: G for the group formats, 0 for kt-int4-channel-v1.
inline size_t Int4KernelGroup(const QuantSpec& spec) { return IsGroupFormat(spec.format) ? spec.group_size : 0; }
inline bool IsInt4Format(QuantFormat f) {
  return f == QuantFormat::kInt4PerChannel || f == QuantFormat::kInt4PerChannelAsym || IsGroupFormat(f);
}

// Repacks quant.h's canonical int4 form into kt-int4-panel16-kblock8-v1: `panels` (PackedInt4Bytes),
// `scales` (PackedInt4Scales) and, for the asym formats only, `zeros` (PackedInt4Scales; may be null
// otherwise). InvalidArgument unless qm is a well-formed int4 matrix with K < kInt4MaxK.
absl::Status PackInt4(const QuantizedMatrix& qm, uint8_t* panels, float* scales, uint8_t* zeros);

// Inverse of PackInt4: the canonical QuantizedMatrix (tests, copying experts back out).
QuantizedMatrix UnpackInt4(const QuantSpec& spec, size_t n, size_t k, const uint8_t* panels,
                           const float* scales, const uint8_t* zeros);

// xsum[i][g] = sum of qx[i][k] over group g (whole row for group == 0), for i < m; xsum rows have
// Int4Groups(k, group) entries.
void Int4ActivationSums(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, int32_t* xsum);

// Computes y[i][j] for i < m, j < n_cols as described above. `group` is G (32, 64, 128; K a multiple of
// it) or 0 for per-channel. sx and xsum are [m][Int4Groups(k, group)] row-major. panels/scales/zeros start
// at the first panel of the column range (a caller covers a range by offsetting panels by
// p * Int4PanelStride(k) bytes and scales/zeros by p * 16 * groups entries); zeros == nullptr means the
// symmetric formats' z = 8. qx rows have stride ldqx bytes (any alignment), y rows ldy floats; y is
// overwritten in columns [0, n_cols) only. Requires k < kInt4MaxK. No allocation, no threads.
using GemmInt4Fn = void (*)(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx,
                            const float* sx, const int32_t* xsum, const uint8_t* panels,
                            const float* w_scales, const uint8_t* w_zeros, size_t n_cols, float* y,
                            size_t ldy);

// Every kernel of the family: scalar, Highway AVX2/AVX3/AVX3_DL, native AVX512-VNNI (vpdpbusd), AMX
// (tdpbssd on expanded nibbles).
const GemmPaths<GemmInt4Fn>& GemmInt4Paths();

// The kernel of one path, SelectGemmPath over GemmInt4Paths(): scalar, Highway AVX2/AVX3 for
// kAvx2/kAvx512, native AVX512-VNNI for kAvx512Vnni and kAvx512Bf16 (Highway AVX3_DL is tested and
// benchmarked, not selected), AMX for kAmx. The caller must have checked IsaSupported(isa,
// GetCpuFeatures()).
GemmInt4Fn GetGemmInt4(Isa isa);

namespace internal {
void GemmInt4Scalar(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx,
                    const int32_t* xsum, const uint8_t* panels, const float* w_scales,
                    const uint8_t* w_zeros, size_t n_cols, float* y, size_t ldy);
void GemmInt4Vnni(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx,
                  const int32_t* xsum, const uint8_t* panels, const float* w_scales,
                  const uint8_t* w_zeros, size_t n_cols, float* y, size_t ldy);
// AMX tiles for m >= kAmxInt4MinRows, the VNNI kernel below (decode reads the weights once either way).
inline constexpr size_t kAmxInt4MinRows = 8;
void GemmInt4Amx(size_t m, size_t k, size_t group, const int8_t* qx, size_t ldqx, const float* sx,
                 const int32_t* xsum, const uint8_t* panels, const float* w_scales,
                 const uint8_t* w_zeros, size_t n_cols, float* y, size_t ldy);
// Highway: the kernel of HwyTargetOf(isa) exactly (AVX2, AVX3 or AVX3_DL); nullptr for kScalar or a target
// not compiled in.
GemmInt4Fn GemmInt4Hwy(Isa isa);
}  // namespace internal

}  // namespace kt

#endif  // KT_KERNELS_GEMM_INT4_H_
