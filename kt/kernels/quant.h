// Quantization formats of the integer expert kernels: the scalar truth that the SIMD/AMX kernels are tested
// against, and the canonical (unpacked-for-kernels) storage that they repack at load time.
//
// A weight matrix W[N, K] is row-major with one row per output channel. Every format is symmetric or
// zero-point affine per output channel or per (channel, group of K), with fp32 scales, and dequantizes by
// exactly one fp32 multiply: w' = q * scale, or (q - z) * scale. Rounding is half away from zero
// (std::round, not the ties-to-even of torch.round); ties matter only for values exactly on a .5 step,
// which the tests construct on purpose. docs/FORMATS.md has the byte layout and a version tag per format.
#ifndef KT_KERNELS_QUANT_H_
#define KT_KERNELS_QUANT_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/dtype.h"

namespace kt {

enum class QuantFormat : int {
  kInt8PerChannel = 0,  // kt-int8-channel-v1: int8 q in [-127, 127], one scale per row.
  kInt4PerChannel = 1,  // kt-int4-channel-v1: int4 q in [-7, 7], one scale per row.
  kInt4GroupSym = 2,    // kt-int4-group{G}-sym-v1: int4 q in [-7, 7], one scale per G elements of a row.
  kInt4GroupAsym = 3,   // kt-int4-group{G}-asym-v1: uint4 q in [0, 15], scale and zero point per group.
  kInt4PerChannelAsym = 4,  // kt-int4-channel-asym-v1: uint4 q in [0, 15], scale and zero point per row
                            // (the original's INT4_1).
  kFp8Block128 = 5,  // kt-fp8-block128-v1: FP8 E4M3 codes (fp8.h), one scale per 128 x 128 block, held per
                     // row and 128-wide k block (DeepSeek-V3's `weight` + `weight_scale_inv`).
  kMxfp4 = 6,  // kt-mxfp4-v1: OCP MXFP4, E2M1 codes (mx.h) two per byte, one power-of-two scale (E8M0) per
               // 32 consecutive k of a row (DeepSeek-V4-Flash, gpt-oss).
  kMxfp8 = 7,  // kt-mxfp8-v1: OCP MXFP8, E4M3 codes, one E8M0 scale per 32 consecutive k (MiniMax-M3).
};

// The MX formats: a power-of-two scale per 32 k, K a multiple of 32.
inline bool IsMxFormat(QuantFormat f) { return f == QuantFormat::kMxfp4 || f == QuantFormat::kMxfp8; }

// "int8_channel", "int4_channel", "int4_group_sym", "int4_group_asym", "int4_channel_asym", "fp8_block128",
// "mxfp4", "mxfp8";
// "unknown" for anything else.
const char* QuantFormatName(QuantFormat format);

// Group sizes the group formats accept. 32 is the smallest group whose packed nibbles fill a 16-byte
// vector; all three divide the expert K dimensions of the supported models.
inline constexpr int kQuantGroupSizes[] = {32, 64, 128};

struct QuantSpec {
  QuantFormat format = QuantFormat::kInt8PerChannel;
  int group_size = 0;  // G for the group formats (32, 64 or 128); must be 0 for the per-channel formats.
};

inline bool IsGroupFormat(QuantFormat f) {
  return f == QuantFormat::kInt4GroupSym || f == QuantFormat::kInt4GroupAsym;
}
// The zero-point formats (unsigned nibbles, a zero point per scale).
inline bool IsAsymFormat(QuantFormat f) {
  return f == QuantFormat::kInt4GroupAsym || f == QuantFormat::kInt4PerChannelAsym;
}

// The layout tag of docs/FORMATS.md, e.g. "kt-int4-group128-asym-v1". Empty if the spec is invalid.
std::string QuantLayoutTag(const QuantSpec& spec);

// OK iff `spec` is a known format with a group size it accepts and K fits it: the group formats need
// G in {32, 64, 128} and K a multiple of G; the per-channel formats need group_size == 0 and take any K.
// Errors are InvalidArgument naming the offending value and what was expected.
absl::Status ValidateQuantSpec(const QuantSpec& spec, size_t k);

// Storage of one row, for a spec valid for k (ValidateQuantSpec); 0 otherwise.
size_t QuantizedRowBytes(const QuantSpec& spec, size_t k);  // bytes of `data` per row
size_t ScalesPerRow(const QuantSpec& spec, size_t k);       // 1, K / G for the group formats, ceil(K / 128)
                                                            // for kFp8Block128, K / 32 for the MX formats

// A quantized matrix in canonical form (row-major, what kernels repack from):
// - data:   N rows of QuantizedRowBytes(spec, K) bytes. int8: one two's-complement byte per element.
//           int4: two elements per byte, element 2i in the low nibble and 2i+1 in the high nibble of byte i;
//           signed nibbles (sym formats) are two's complement, asym nibbles are unsigned. Odd K (per-channel
//           int4 only) leaves the last high nibble 0. fp8, mxfp8: one E4M3 code per element. mxfp4: E2M1
//           codes, two per byte in the int4 order (as OCP MX checkpoints pack them).
// - scales: N * ScalesPerRow(spec, K) fp32, row-major [n][group]. kFp8Block128: [n][k / 128], and rows of
//           one 128-row block hold the same scales (the checkpoint's block scale, repeated per row); the
//           last k block may be shorter than 128. MX: [n][k / 32], each a power of two 2^(e - 127) with e
//           in [0, 254] (the E8M0 code, exact in fp32), or NaN (code 0xff).
// - zeros:  asym only, one uint8 zero point in [0, 15] per scale, same order; empty otherwise.
struct QuantizedMatrix {
  QuantSpec spec;
  size_t n = 0;
  size_t k = 0;
  std::vector<uint8_t> data;
  std::vector<float> scales;
  std::vector<uint8_t> zeros;
};

// Quantizes row-major bf16 w[N, K] (row stride ldw elements). InvalidArgument for an invalid spec, ldw < K,
// a null w with N*K > 0, or a non-finite weight (named by row and column: an Inf would zero its whole row
// or group silently).
absl::StatusOr<QuantizedMatrix> Quantize(const QuantSpec& spec, const bf16_t* w, size_t ldw, size_t n,
                                         size_t k);

// kFp8Block128 (DeepSeek's quantizer): per 128 x 128 block (the last ones may be smaller) scale = amax / 448
// and q = the E4M3 code nearest to w / scale (ties to even); an all-zero block gets scale 0 and codes 0.

// MX (OCP MX v1.0, mx.h): per 32 k of a row, scale = 2^(floor(log2(amax)) - emax) and q = the nearest
// element code of w / scale (ties to even, saturating).

// Writes q * scale (sym), (q - z) * scale (asym) or fp8(q) * scale as one fp32 multiply per element into w[N, K] (row
// stride ldw >= K). `qm` must be well formed (as Quantize returns it).
void Dequantize(const QuantizedMatrix& qm, float* w, size_t ldw);

// Row scales of kt-fp8-block128-v1 from a checkpoint's block scales: block_scales[ceil(N/128)][ceil(K/128)]
// (`weight_scale_inv`, row-major) -> row_scales[N][ceil(K/128)].
void ExpandFp8BlockScales(const float* block_scales, size_t n, size_t k, float* row_scales);

// Bytes the format stores for an [N, K] matrix: data + 4 * scales + zeros (what a kernel streams per
// token, for bandwidth accounting). 0 if the spec is invalid for k.
size_t QuantizedBytes(const QuantSpec& spec, size_t n, size_t k);

// Per-token activation quantization for the integer kernels: scale = max|x| / 127 (0 for an all-zero
// token, whose q are all 0), q = round_half_away(x / scale) clamped to [-127, 127]. A token holding a NaN
// or an infinity gets scale NaN and q all 0, so whatever is computed from it is NaN (as the unquantized
// product would be) instead of finite numbers.
void QuantizeActivationInt8(const bf16_t* x, size_t k, int8_t* q, float* scale);

// The same per group of `group_size` consecutive elements (a group holding a NaN or an infinity gets scale
// NaN and q 0): scales[k / group_size], one per group, for the
// group-wise weight formats (the activation group matches the weight group, so a kernel combines
// sum(q_x * q_w) of a group with one scale product). InvalidArgument unless group_size is in {32, 64, 128}
// and divides k.
absl::Status QuantizeActivationInt8Grouped(const bf16_t* x, size_t k, int group_size, int8_t* q,
                                           float* scales);

}  // namespace kt

#endif  // KT_KERNELS_QUANT_H_
