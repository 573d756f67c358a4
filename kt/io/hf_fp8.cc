#include "kt/io/hf_fp8.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kt/kernels/dtype.h"

namespace kt {
namespace {

std::string Where(const Checkpoint::Located& loc) {
  return absl::StrCat(loc.file->path(), ": tensor \"", loc.info->name, "\"");
}

}  // namespace

absl::StatusOr<HfFp8Folder> ClassifyHfFp8Folder(const MoeArch& arch, const std::string& config_path,
                                                const MethodLayout& method) {
  const std::string qm = arch.quantization.has_value() ? arch.quantization->quant_method : "";
  const bool per_channel_method = method.method == "FP8_PERCHANNEL";
  const bool block_folder = qm == "fp8" && !arch.quantization->weight_block_size.empty();
  const bool channel_folder =
      (qm == "fp8" && arch.quantization->weight_block_size.empty()) || (qm == "compressed-tensors" && per_channel_method);
  HfFp8Folder out;
  out.fp8 = block_folder || channel_folder;
  out.scales = channel_folder ? HfFp8Scales::kPerChannel : HfFp8Scales::kBlock128;
  if (block_folder) {
    if (arch.quantization->weight_block_size != std::vector<int>{128, 128}) {
      return absl::UnimplementedError(absl::StrCat(
          config_path, ": quantization_config.weight_block_size is [",
          absl::StrJoin(arch.quantization->weight_block_size, ", "),
          "]; kt reads FP8 checkpoints with 128 x 128 block scales ([128, 128]) or per-channel scales only"));
    }
    if (!method.quantized || method.spec.format != QuantFormat::kFp8Block128 || per_channel_method) {
      return absl::InvalidArgumentError(absl::StrCat(
          config_path, ": the checkpoint is FP8 (quantization_config.quant_method \"fp8\"), which method ",
          method.method, " cannot hold; load it with method FP8 (its scales are per 128 x 128 block)"));
    }
  }
  if (channel_folder && !per_channel_method) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": the checkpoint is FP8 with per-channel scales (quantization_config.quant_method \"", qm,
        "\" without weight_block_size), which method ", method.method,
        " cannot hold; load it with method FP8_PERCHANNEL"));
  }
  if (per_channel_method && !channel_folder) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": method FP8_PERCHANNEL reads FP8 checkpoints with per-channel scales (`weight_scale`), "
        "but quantization_config.quant_method is ", qm.empty() ? "absent (bf16 weights)" : "\"" + qm + "\"",
        "; load bf16 weights with BF16, FP8 or an integer method"));
  }
  if (out.fp8 && arch.fused_experts()) {
    return absl::UnimplementedError(absl::StrCat(
        config_path, ": FP8 checkpoints with fused expert tensors are not supported yet (per-expert "
        "weight + scales, as DeepSeek-V3 and GLM-4.x ship them, are)"));
  }
  if (arch.quantization.has_value() && !out.fp8) {
    return absl::UnimplementedError(absl::StrCat(config_path, ": quantization_config.quant_method \"",
                                                 arch.quantization->quant_method,
                                                 "\" is not supported; kt reads bf16 checkpoints",
                                                 qm == "compressed-tensors"
                                                     ? " (FP8 experts with per-channel `weight_scale`, as GLM-4.x "
                                                       "FP8 ships them: load it with method FP8_PERCHANNEL)"
                                                     : ""));
  }
  return out;
}

std::string HfFp8ScaleName(const std::string& name, HfFp8Scales kind) {
  return absl::StrCat(name, kind == HfFp8Scales::kBlock128 ? "_scale_inv" : "_scale");
}

absl::Status CheckHfFp8Tensors(const Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape,
                               HfFp8Scales kind, absl::string_view what, Checkpoint::Located* weight,
                               Checkpoint::Located* scale) {
  const bool block = kind == HfFp8Scales::kBlock128;
  const Checkpoint::Located loc = ckpt.Find(name);
  if (loc.info == nullptr) {
    return absl::NotFoundError(absl::StrCat(ckpt.dir(), ": ", what, ": tensor \"", name,
                                            "\" is missing (expected F8_E4M3 ", ShapeString(shape), ")"));
  }
  if (loc.info->dtype != Dtype::kF8E4M3 || loc.info->shape != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        Where(loc), " (", what, ") is ", DtypeName(loc.info->dtype), " ", ShapeString(loc.info->shape),
        ", expected F8_E4M3 ", ShapeString(shape),
        block ? " (quantization_config.quant_method is \"fp8\")" : " (method FP8_PERCHANNEL reads FP8 weights)"));
  }
  const std::string scale_name = HfFp8ScaleName(name, kind);
  const Checkpoint::Located sloc = ckpt.Find(scale_name);
  const std::vector<int64_t> block_shape = {(shape[0] + 127) / 128, (shape[1] + 127) / 128};
  const std::string want = block ? absl::StrCat("F32 ", ShapeString(block_shape), ": the 128 x 128 block scales of ",
                                                name)
                                 : absl::StrCat("F32 or BF16 [", shape[0], "] or [", shape[0],
                                                ", 1]: the per-channel scales of ", name);
  if (sloc.info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(ckpt.dir(), ": ", what, ": tensor \"", scale_name, "\" is missing (expected ", want, ")"));
  }
  const TensorInfo& s = *sloc.info;
  const bool ok = block ? s.dtype == Dtype::kF32 && s.shape == block_shape
                        : (s.dtype == Dtype::kF32 || s.dtype == Dtype::kBf16) &&
                              (s.shape == std::vector<int64_t>{shape[0]} ||
                               s.shape == std::vector<int64_t>{shape[0], 1});
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(Where(sloc), " (", what, " scales) is ", DtypeName(s.dtype), " ",
                                                   ShapeString(s.shape), ", expected ", want));
  }
  *weight = loc;
  *scale = sloc;
  return absl::OkStatus();
}

void ReadHfFp8(const Checkpoint::Located& weight, const Checkpoint::Located& scale, HfFp8Scales kind, size_t n,
               size_t k, QuantizedMatrix* out) {
  out->spec = QuantSpec{QuantFormat::kFp8Block128, 0};
  out->n = n;
  out->k = k;
  out->data.resize(weight.info->num_bytes());
  std::memcpy(out->data.data(), weight.file->data(*weight.info), weight.info->num_bytes());
  const size_t spr = ScalesPerRow(out->spec, k);
  out->scales.resize(n * spr);
  out->zeros.clear();
  // Safetensors offsets are byte offsets: copy the (small) scale tensor before reading it as numbers.
  const uint8_t* raw = scale.file->data(*scale.info);
  if (kind == HfFp8Scales::kBlock128) {
    std::vector<float> blocks(scale.info->num_bytes() / sizeof(float));
    std::memcpy(blocks.data(), raw, scale.info->num_bytes());
    ExpandFp8BlockScales(blocks.data(), n, k, out->scales.data());
    return;
  }
  const bool bf16 = scale.info->dtype == Dtype::kBf16;
  for (size_t r = 0; r < n; ++r) {
    float s;
    if (bf16) {
      uint16_t bits;
      std::memcpy(&bits, raw + r * 2, 2);
      s = Bf16ToF32(bf16_t{bits});  // exact
    } else {
      std::memcpy(&s, raw + r * 4, 4);
    }
    std::fill_n(out->scales.begin() + r * spr, spr, s);
  }
}

}  // namespace kt
