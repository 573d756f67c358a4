// KTMoEWrapper method names -> the canonical weight layout kt stores for them (what `kt convert --method`
// writes and what load_weights(weight_path) expects). docs/FORMATS.md has the table.
//
// A method names a kernel family; the layout names the bytes. Several methods share one layout (AMXINT8 and
// MOE_INT8 both store kt-int8-channel-v1), so a converted folder is checked against the layout of the method
// it is loaded with, and its manifest still records which method it was converted for.
#ifndef KT_IO_METHOD_H_
#define KT_IO_METHOD_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/kernels/quant.h"

namespace kt {

// The layout tag of unquantized bf16 experts (canonical [N, K] bf16, row-major, as in the checkpoint).
inline constexpr char kBf16LayoutTag[] = "kt-bf16-v1";

struct MethodLayout {
  std::string method;      // As given, e.g. "AMXINT8".
  bool quantized = false;  // false: bf16 weights; true: `spec`.
  QuantSpec spec;          // Only when quantized.
  std::string tag;         // kBf16LayoutTag or QuantLayoutTag(spec).
};

// The layout of `method`. `group_size` is used only by the group methods (AMXINT4_KGroup, AMXINT4_1KGroup,
// RAWINT4, GPTQ_INT4: the native int4 checkpoints' G) and must then be 32, 64 or 128. Errors: Unimplemented
// for methods kt cannot store yet (LLAMAFILE: GGUF; FP8 and FP8_PERCHANNEL are kt-fp8-block128-v1, MXFP4 /
// MXFP8 kt-mxfp4-v1 / kt-mxfp8-v1), InvalidArgument for an unknown name (listing the known ones) or a bad
// group size.
absl::StatusOr<MethodLayout> LayoutOfMethod(absl::string_view method, int group_size = 128);

// Whether `method` takes a group size (the K-group int4 methods: AMXINT4_KGroup, AMXINT4_1KGroup,
// MOE_INT4_KGroup, MOE_INT4_1KGroup).
bool MethodTakesGroupSize(absl::string_view method);

// Why no KTMoEWrapper method can load what `method` would convert to ("" when one can; every method of the
// table has a kernel today). `kt convert` refuses such a method rather than write an unusable folder.
std::string MethodNotLoadableReason(absl::string_view method);

// Every method LayoutOfMethod maps, in documentation order.
std::vector<std::string> ConvertibleMethods();

// The inference method whose frozen base weights an SFT method holds: AMXBF16_SFT -> BF16, AMXINT8_SFT ->
// AMXINT8, AMXINT4_KGroup_SFT -> AMXINT4_KGroup, ...; a "_SkipLoRA" suffix (the same base without LoRA) is
// dropped first. InvalidArgument naming the method for anything else.
absl::StatusOr<std::string> SftBaseMethod(absl::string_view sft_method);

}  // namespace kt

#endif  // KT_IO_METHOD_H_
