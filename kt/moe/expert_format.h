// The weight formats of the MoE layer's experts, each described once in one table (expert_format.cc).
//
// Everything that differs between formats lives in an ExpertFormatTraits entry: how a projection is packed
// (from bf16, or from its canonical quantized form), how much memory one expert takes, which activation
// preparation a product needs (bf16 rows, int8 per row, int8 per row and group, with or without int32 group
// sums), the product kernel of each kernel path (bound once, when the storage is created), how the packed
// weights read back (plain or transposed, for SFT's backward copy) and the layout tags. The storage
// (PackedExperts), the inference pipeline (MoeLayer) and SFT (SftMoeLayer) read the table and never branch on
// the format themselves. docs/ADDING-A-FORMAT.md says how to add one.
//
// The formats (docs/FORMATS.md has the layouts):
//   kBf16           the weights as given, packed into kt-bf16-panel16-kpair-v1; products read bf16 rows.
//   kInt8           kt-int8-channel-v1 (symmetric int8 per output channel, quantized at load) packed into
//                   kt-int8-panel16-kquad-v1; x_t and h are quantized per row to int8 (absmax/127) right
//                   before each product, and the products are exact int32 sums scaled by both scales.
//   kInt4           kt-int4-channel-v1 (symmetric int4 per output channel; the original's AMXINT4).
//   kInt4GroupSym   kt-int4-group{G}-sym-v1 (a scale per G = MoeConfig::group_size consecutive k).
//   kInt4GroupAsym  kt-int4-group{G}-asym-v1 (a scale and zero point per group; AWQ, the original's
//                   AMXINT4_1KGroup).
//   kInt4Asym       kt-int4-channel-asym-v1 (a scale and zero point per output channel; the original's
//                   INT4_1).
//   The int4 formats are packed into kt-int4-panel16-kblock8-v1 (gemm_int4.h); x_t and h are quantized to
//   int8 per row (per row and group of G for the group formats) with int32 group sums.
//   kFp8Block       kt-fp8-block128-v1 (FP8 E4M3 with a scale per 128 x 128 block: DeepSeek-V3/R1, Qwen3-FP8,
//                   MiniMax-M2 checkpoints as shipped) packed into kt-fp8-panel16-kblock128-v1 (gemm_fp8.h);
//                   products read bf16 rows.
//   kGguf           GGUF blocks as stored (method LLAMAFILE: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K; the
//                   projections may differ in type, ExpertShape::gguf_types), kt-gguf-rows-v1 (gemm_gguf.h);
//                   x_t and h are quantized to the type's ggml dot partner, int8 per 32 (Q8_0) or per 256
//                   (Q8_K) values.
//   kGgufFloat      GGUF F32 / F16 / BF16 tensors as stored (kt-gguf-rows-v1); products read bf16 rows.
//   kMxfp4, kMxfp8  kt-mxfp4-v1 / kt-mxfp8-v1 (OCP MX: E2M1 / E4M3 codes with an E8M0 scale per 32 k;
//                   DeepSeek-V4-Flash, MiniMax-M3) packed into kt-mx-panel16-kblock32-v1 (gemm_mx.h), the E8M0
//                   codes in the uint8 array; products read bf16 rows.
#ifndef KT_MOE_EXPERT_FORMAT_H_
#define KT_MOE_EXPERT_FORMAT_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"

namespace kt {

enum class ExpertFormat {
  kBf16,
  kInt8,
  kInt4,
  kInt4GroupSym,
  kInt4GroupAsym,
  kInt4Asym,
  kFp8Block,
  kGguf,
  kGgufFloat,
  kMxfp4,
  kMxfp8,
};

// The three projections of an expert: gate and up are [I, H], down is [H, I] (row = output channel).
enum class ExpertProj : int { kGate = 0, kUp = 1, kDown = 2 };
// "gate", "up" or "down".
const char* ExpertProjName(ExpertProj proj);

// What the rows multiplied by a format's weights are turned into before the product.
enum class ActivationKind {
  kBf16Rows,      // the bf16 rows as they are
  kInt8PerRow,    // int8 per row: scale = absmax / 127, one fp32 scale per row (act_quant.h)
  kInt8PerGroup,  // int8 per row and group of G consecutive k: a scale per group
};

// Rows prepared for a product with a projection of K columns: kBf16Rows reads bf16 rows `x`; the int8
// kinds read quantized rows `qx` with ActivationGroups scales per row `sx` and, where the format needs them
// (activation_sums), the int32 group sums `xsum`. `ld` is the row stride of x/qx in elements.
struct ProjInput {
  const bf16_t* x = nullptr;
  const int8_t* qx = nullptr;
  const float* sx = nullptr;
  const int32_t* xsum = nullptr;
  size_t ld = 0;
};

// Sizes of one expert's packed projection [N, K] (entries per expert of each array; 0: the format does
// not use the array).
struct PackedLayout {
  size_t expert_bytes = 0;    // packed panels
  size_t panel_bytes = 0;     // per 16-row panel, to address a column block
  size_t scale_entries = 0;   // fp32 scales
  size_t sum_entries = 0;     // int32 row sums
  size_t zero_entries = 0;    // uint8 zero points (the MX formats: their E8M0 scale codes)
  size_t scales_per_col = 0;  // scale (and zero point) entries per output column: 1, or K / G
  size_t group = 0;           // the kernel's group argument (G, or 0 per channel; the ggml type id for GGUF)
  size_t act_group = 0;       // kInt8PerGroup's group when it is not MoeConfig::group_size (GGUF: 32 or 256)
};

// One expert's packed arrays (data, scales, sums, zeros at that expert; a null pointer for an array the
// format does not use).
struct PackedExpert {
  const uint8_t* data = nullptr;
  const float* scales = nullptr;
  const int32_t* sums = nullptr;
  const uint8_t* zeros = nullptr;
};
struct MutablePackedExpert {
  uint8_t* data = nullptr;
  float* scales = nullptr;
  int32_t* sums = nullptr;
  uint8_t* zeros = nullptr;
};

// A format's product on one kernel path, bound once (ExpertFormatTraits::bind_gemm):
// y[r][j] = sum_k x_r[k] W[c0 + j][k] for r < m, j < cols, with `w` the packed arrays addressed at the
// block's first column c0 (a multiple of 16) and `k` the projection's K.
struct FormatGemm {
  using RunFn = void (*)(const FormatGemm& self, const PackedExpert& w, size_t k, size_t group,
                         const ProjInput& in, size_t m, size_t cols, float* y, size_t ldy);
  RunFn run = nullptr;
  void (*kernel)() = nullptr;  // the path's kernel (GetGemm*(isa)), cast back by `run`
  size_t k_block = 0;          // AMX K block for the formats that have a K-blocked AMX kernel (0: none)
};

struct ExpertFormatTraits {
  ExpertFormat format;
  const char* name;           // ExpertFormatName: "bf16", "int8", ...
  const char* packed_layout;  // the kernel layout it packs into (docs/FORMATS.md)
  const char* kernel_family;  // "bf16", "int8", "int4", "fp8" or "mx": the GEMM family (kt/kernels/gemm_*.h), in errors
  // The canonical quantized form stored (QuantSpecOf); quantized == false: the bf16 weights as given.
  bool quantized;
  QuantFormat quant_format;
  bool grouped;  // takes MoeConfig::group_size (32, 64 or 128, dividing H and I)
  // Activation preparation for its products.
  ActivationKind activation;
  bool activation_sums;  // the int4 kernels' zero-point term: int32 sums of the quantized activations
  size_t max_k;          // K must stay below this (exact int32 sums); 0: no bound
  // Sizes of a packed [n, k] projection (group: G of the group formats, else ignored).
  PackedLayout (*layout)(size_t n, size_t k, size_t group);
  // The product kernel of `isa` into `out`; false when the format has no kernel on that path. `k_block`
  // is the AMX K block asked for (MoeTiling::k_block; 0 or ignored where the format has none).
  bool (*bind_gemm)(Isa isa, size_t k_block, FormatGemm* out);
  // Packs canonical bf16 w[n, k] (unquantized formats only; nullptr for quantized ones, which are
  // quantized with QuantizeFast and packed by pack_quantized).
  void (*pack_bf16)(const bf16_t* w, size_t n, size_t k, const MutablePackedExpert& dst);
  // Packs a checked QuantizedMatrix of this format (quantized formats only).
  void (*pack_quantized)(const QuantizedMatrix& qm, const MutablePackedExpert& dst);
  // Canonical bf16 back from the packed expert: out[n, k] (row stride k), or with `transposed` out[k, n]
  // (row stride n). `spec` is the format's QuantSpec (unused by unquantized formats).
  void (*unpack)(const QuantSpec& spec, const PackedExpert& w, size_t n, size_t k, bool transposed,
                 bf16_t* out);
  // Packed [k, n] written straight from packed [n, k] (the transpose, without a canonical copy); nullptr
  // when the format has none (its transpose is unpack(transposed) + pack).
  void (*transpose_packed)(const PackedExpert& from, size_t n, size_t k, const MutablePackedExpert& to);
  // GGUF formats: the packed bytes are the checkpoint's own ggml blocks, loaded as they are
  // (PackedExperts::LoadExpertBlocks; nothing is packed from bf16). `layout`, `unpack` (spec.group_size) and
  // the kernel's group argument then carry the projection's ggml type id (ExpertShape::gguf_types).
  bool stored_blocks = false;
  // stored_blocks formats: OK when a projection [n, k] of ggml type `type_id` runs in this format, else
  // InvalidArgument naming `what` (e.g. "gate"), the type and what is expected. nullptr for the others.
  absl::Status (*check_projection)(const char* what, size_t n, size_t k, int type_id) = nullptr;
  // The AMX kernel converts each call's weight block to bf16 panels before multiplying (gemm_fp8.h): the
  // layer then gives each gate/up call more rows (kRowChunkConverting), so a block is converted once per
  // expert's rows rather than once per 64 of them.
  bool amx_converts_weights = false;
};

// The table's entry of `format` (every ExpertFormat has one).
const ExpertFormatTraits& FormatTraits(ExpertFormat format);

// "bf16", "int8", "int4", "int4_group_sym", "int4_group_asym", "int4_asym", "fp8_block", "gguf",
// "gguf_float", "mxfp4" or "mxfp8".
const char* ExpertFormatName(ExpertFormat format);
// Inverse of ExpertFormatName; InvalidArgument listing the names otherwise.
absl::StatusOr<ExpertFormat> ParseExpertFormat(absl::string_view name);
// Whether the format's products read int4 weights with activation sums (the int4 family), and whether it
// takes a group size.
inline bool IsInt4ExpertFormat(ExpertFormat f) { return FormatTraits(f).activation_sums; }
inline bool IsGroupExpertFormat(ExpertFormat f) { return FormatTraits(f).grouped; }

// The canonical quantized format a quantized ExpertFormat stores (kInt8: kt-int8-channel-v1, kInt4:
// kt-int4-channel-v1, kInt4Asym: kt-int4-channel-asym-v1, kInt4Group*: kt-int4-group{group_size}-{sym,asym}-v1;
// group_size is ignored by the per-channel formats). InvalidArgument for kBf16, which stores the weights as
// given, and for a group format with a group_size other than 32, 64, 128.
absl::StatusOr<QuantSpec> QuantSpecOf(ExpertFormat format, int group_size = 0);

// Activation scales (and group sums) per prepared row of K = k values: k / group for kInt8PerGroup, else 1.
size_t ActivationGroupsOf(const ExpertFormatTraits& traits, size_t k, size_t group);
// Bytes per element of the prepared rows: 2 for bf16 rows, 1 for int8.
size_t ActivationBytes(const ExpertFormatTraits& traits);
// Prepares one row x[k] the way `traits` feeds its products: q[k], scales[ActivationGroupsOf] and, with
// activation_sums, sums[ActivationGroupsOf] (may be null otherwise). Nothing for kBf16Rows.
void PrepareActivationRow(const ExpertFormatTraits& traits, Isa isa, const bf16_t* x, size_t k, size_t group,
                          int8_t* q, float* scales, int32_t* sums);

}  // namespace kt

#endif  // KT_MOE_EXPERT_FORMAT_H_
