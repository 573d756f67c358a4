// Native int4 Hugging Face checkpoints, read as kt-int4-group{G}-sym-v1 exactly (issue 15):
//
//   - compressed-tensors "pack-quantized" (method RAWINT4; Kimi-K2 ships it): per linear layer
//     `weight_packed` int32 [N, K/8] (8 nibbles per word, element 8i + j in bits 4j..4j+3) or uint8 [N, K/2]
//     (2 per byte, element 2i low), offset binary (stored u = q + 8, q in [-8, 7]); `weight_scale` [N, K/G]
//     (BF16 as shipped; F16 and F32 read too); `weight_shape` int [2] = [N, K]. w = q * scale.
//   - GPTQ (method GPTQ_INT4), sym = true, desc_act = false, bits 4, as AutoGPTQ / GPTQModel write it:
//     `qweight` int32 [K/8, N] (k = 8i + j in bits 4j..4j+3 of row i), unsigned q in [0, 15]; `scales` F16
//     [K/G, N]; `qzeros` int32 [K/G, N/8] (8 nibbles per word along N) when present, which for sym must all
//     be the symmetric zero (8, stored as 7 by checkpoint_format "gptq" and as 8 by "gptq_v2"; absent: 8, as
//     the original kt-kernel reads sym GPTQ); `g_idx` int32 [K] = k / G when present (desc_act false).
//     w = (q - 8) * scale.
//
// Both are w = s * v with an integer v in [-8, 7] per element and one scale per (row, group of G along K):
// exactly kt-int4-group{G}-sym-v1 with the nibble -8 in use (quant.h: two's-complement nibbles, fp32 scales;
// bf16 and fp16 widen to fp32 exactly). So reading is a re-bias of the nibbles (and, for GPTQ, a transpose),
// no rounding anywhere, and every int4 group kernel path (scalar, Highway, VNNI, AMX) runs them unchanged:
// their packed layout stores u = q + 8 with the implicit zero point 8, so u = 0 for q = -8 is in range.
#ifndef KT_IO_HF_INT4_H_
#define KT_IO_HF_INT4_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/io/checkpoint.h"
#include "kt/kernels/quant.h"

namespace kt {

enum class HfInt4Kind { kPackQuantized, kGptq };

struct HfInt4Config {
  HfInt4Kind kind = HfInt4Kind::kPackQuantized;
  // G from quantization_config; 0 when a pack-quantized config gives none (then the scales' shape tells).
  int group_size = 0;
  // GPTQ: the stored qzeros nibble that means the symmetric zero point 8 (7 for "gptq", 8 for "gptq_v2").
  int gptq_stored_zero = 7;
};

// Whether quantization_config.quant_method names a native int4 format: "compressed-tensors" or "gptq".
bool IsHfInt4QuantMethod(absl::string_view quant_method);
// The method that holds it as stored: "RAWINT4" or "GPTQ_INT4".
const char* HfInt4Method(HfInt4Kind kind);

// quantization_config of `config_path` (a config.json whose quant_method is one of the above). Anything kt
// cannot read exactly is InvalidArgument naming the field, its value and what kt reads, e.g.
// "quantization_config.desc_act is true: kt reads GPTQ with desc_act false only (no activation reordering)".
absl::StatusOr<HfInt4Config> ReadHfInt4Config(const std::string& config_path);

// The tensors of one expert matrix [n, k] whose bf16 weight would be called `weight_name` ("<module>.weight").
struct HfInt4Matrix {
  Checkpoint::Located packed;  // weight_packed / qweight
  Checkpoint::Located scale;   // weight_scale / scales
  Checkpoint::Located zeros;   // GPTQ qzeros (info == nullptr when absent)
  Checkpoint::Located g_idx;   // GPTQ g_idx (info == nullptr when absent)
  Checkpoint::Located shape;   // pack-quantized weight_shape
};

// Finds and checks the matrix's tensors: dtypes, shapes, and the values a later read relies on (weight_shape,
// GPTQ qzeros and g_idx). `*group` is the layer's G; 0: take it from the scales' shape (then set). Errors
// name the file, the tensor (`what` says which expert matrix) and what was expected.
absl::Status FindHfInt4Matrix(const Checkpoint& ckpt, const HfInt4Config& config, absl::string_view weight_name,
                              int64_t n, int64_t k, absl::string_view what, int* group, HfInt4Matrix* out);

// The matrix as kt-int4-group{group}-sym-v1 (exact). `out`'s vectors are reused. DataLoss for a non-finite
// scale (named by tensor and element).
absl::Status ReadHfInt4Matrix(const HfInt4Config& config, const HfInt4Matrix& m, size_t n, size_t k, int group,
                              QuantizedMatrix* out);

// compressed-tensors pack-quantized rows as kt-int4-group{group}-sym-v1 (exact): `packed` the weight_packed
// bytes [n, k/2] (int32 words read as little-endian bytes, or the uint8 form), `scale_bits` the bf16
// weight_scale [n, k/group]. ReadHfInt4Matrix's RAWINT4 read, for tensors handed over in memory.
void PackQuantizedToCanonical(const uint8_t* packed, const uint16_t* scale_bits, size_t n, size_t k, int group,
                              QuantizedMatrix* out);

// The group size G of the native int4 checkpoint in `dir` (config.json's, else the first MoE layer's first
// expert's scales' shape), for a RAWINT4 / GPTQ_INT4 layer built before its weights are read.
// InvalidArgument when the folder is not a native int4 checkpoint.
absl::StatusOr<int> HfInt4GroupSize(const std::string& dir);

}  // namespace kt

#endif  // KT_IO_HF_INT4_H_
