#include "kt/io/method.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_join.h"

namespace kt {
namespace {

struct Entry {
  const char* method;
  bool quantized;
  QuantFormat format;
  bool grouped;  // takes group_size
};

// Why each mapping (the original kt-kernel's formats, see docs/FORMATS.md):
// - AMXINT8 / MOE_INT8: symmetric int8 per output row, scale = absmax / 127 (the original's exactly).
// - AMXINT4 / MOE_INT4: symmetric int4 per output row, no groups (the original's AMXINT4 has no group size).
// - RAWINT4 (compressed-tensors pack-quantized, Kimi-K2: groups of 32) and GPTQ_INT4 (sym, desc_act false):
//   w = q * scale with q in [-8, 7] and a scale per group of K, which kt-int4-group{G}-sym-v1 holds exactly
//   (kt/io/hf_int4.h); G is the checkpoint's (KTMoEWrapper reads it from weight_path).
// - AMXINT4_KGroup / AMXINT4_1KGroup: the original's k-group kernels, symmetric / asymmetric (INT4_1:
//   scale and zero point per group), group size chosen by the caller.
constexpr Entry kEntries[] = {
    {"BF16", false, QuantFormat::kInt8PerChannel, false},
    {"AMXINT8", true, QuantFormat::kInt8PerChannel, false},
    {"MOE_INT8", true, QuantFormat::kInt8PerChannel, false},
    {"AMXINT4", true, QuantFormat::kInt4PerChannel, false},
    {"MOE_INT4", true, QuantFormat::kInt4PerChannel, false},
    {"RAWINT4", true, QuantFormat::kInt4GroupSym, true},
    {"GPTQ_INT4", true, QuantFormat::kInt4GroupSym, true},
    {"AMXINT4_KGroup", true, QuantFormat::kInt4GroupSym, true},
    {"AMXINT4_1KGroup", true, QuantFormat::kInt4GroupAsym, true},
    // kt's extensions (docs/FORMATS.md): the portable kernels' names for the group layouts, and INT4_1
    // (the original's per-row asymmetric int4, scale and zero point per row).
    {"MOE_INT4_KGroup", true, QuantFormat::kInt4GroupSym, true},
    {"MOE_INT4_1KGroup", true, QuantFormat::kInt4GroupAsym, true},
    {"AMXINT4_1", true, QuantFormat::kInt4PerChannelAsym, false},
    {"MOE_INT4_1", true, QuantFormat::kInt4PerChannelAsym, false},
    // FP8 E4M3 with 128 x 128 block scales (DeepSeek-V3/R1, Qwen3-FP8, MiniMax-M2 as shipped), held as read.
    {"FP8", true, QuantFormat::kFp8Block128, false},
    // FP8 E4M3 with one scale per output channel (GLM-4.x FP8's `weight_scale` [N] or [N, 1]): the same
    // layout, each row's scale repeated over its 128-k blocks (exact: the same weights, the FP8 kernels).
    {"FP8_PERCHANNEL", true, QuantFormat::kFp8Block128, false},
    // OCP MX: E2M1 / E4M3 codes with an E8M0 scale per 32 k (DeepSeek-V4-Flash, MiniMax-M3), held as read.
    {"MXFP4", true, QuantFormat::kMxfp4, false},
    {"MXFP8", true, QuantFormat::kMxfp8, false},
};

}  // namespace

std::vector<std::string> ConvertibleMethods() {
  std::vector<std::string> out;
  for (const Entry& e : kEntries) out.push_back(e.method);
  return out;
}

bool MethodTakesGroupSize(absl::string_view method) {
  for (const Entry& e : kEntries) {
    if (method == e.method) return e.grouped;
  }
  return false;
}

std::string MethodNotLoadableReason(absl::string_view method) {
  (void)method;  // Every method of the table has a kernel today.
  return "";
}

absl::StatusOr<std::string> SftBaseMethod(absl::string_view sft_method) {
  absl::string_view base = sft_method;
  absl::ConsumeSuffix(&base, "_SkipLoRA");
  // The original's SFT names are the AMX inference names with "_SFT" (AMXBF16 for BF16).
  if (absl::ConsumeSuffix(&base, "_SFT") && absl::StartsWith(base, "AMX")) {
    if (base == "AMXBF16") return std::string("BF16");
    for (const Entry& e : kEntries) {
      if (base == e.method) return std::string(base);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown SFT method \"", sft_method,
                                                 "\"; SFT methods are AMXBF16_SFT, AMXINT8_SFT, AMXINT4_SFT, "
                                                 "AMXINT4_1_SFT, AMXINT4_KGroup_SFT, AMXINT4_1KGroup_SFT and "
                                                 "their _SkipLoRA variants"));
}

absl::StatusOr<MethodLayout> LayoutOfMethod(absl::string_view method, int group_size) {
  if (method == "LLAMAFILE") {
    return absl::UnimplementedError(
        "method LLAMAFILE runs a GGUF checkpoint's expert blocks as stored (KTMoEWrapper(method=\"LLAMAFILE\", "
        "weight_path=<the .gguf>)) and has no converted layout; kt convert turns Hugging Face or GGUF checkpoints "
        "into the other methods' folders");
  }
  for (const Entry& e : kEntries) {
    if (method != e.method) continue;
    MethodLayout out;
    out.method = e.method;
    out.quantized = e.quantized;
    if (!e.quantized) {
      out.tag = kBf16LayoutTag;
      return out;
    }
    out.spec.format = e.format;
    if (e.format == QuantFormat::kInt4GroupSym || e.format == QuantFormat::kInt4GroupAsym) {
      out.spec.group_size = e.grouped ? group_size : 128;
      bool ok = false;
      for (int g : kQuantGroupSizes) ok = ok || g == out.spec.group_size;
      if (!ok) {
        return absl::InvalidArgumentError(absl::StrCat("method ", method, ": group_size must be 32, 64 or 128, got ",
                                                       out.spec.group_size));
      }
    }
    out.tag = QuantLayoutTag(out.spec);
    return out;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown method \"", method, "\"; kt can store: ",
                                                 absl::StrJoin(ConvertibleMethods(), ", "),
                                                 " (and LLAMAFILE, which runs GGUF checkpoints as stored)"));
}

}  // namespace kt
