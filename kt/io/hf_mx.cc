#include "kt/io/hf_mx.h"

#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "kt/kernels/mx.h"

namespace kt {
namespace {

std::string Where(const Checkpoint::Located& loc) {
  return absl::StrCat(loc.file->path(), ": tensor \"", loc.info->name, "\"");
}

bool CodeDtype(Dtype d, QuantFormat format) {
  return format == QuantFormat::kMxfp4 ? d == Dtype::kI8 || d == Dtype::kU8 : d == Dtype::kF8E4M3;
}

// DeepSeek-V4's `<...>.scale` beside `<...>.weight`, then `<weight>_scale_inv` (MiniMax-M3).
std::vector<std::string> ScaleNames(const std::string& name) {
  std::vector<std::string> out;
  if (absl::EndsWith(name, ".weight")) out.push_back(absl::StrCat(name.substr(0, name.size() - 6), "scale"));
  out.push_back(absl::StrCat(name, "_scale_inv"));
  return out;
}

}  // namespace

bool HfMxCoded(const Checkpoint& ckpt, const std::string& name, QuantFormat format) {
  const Checkpoint::Located loc = ckpt.Find(name);
  return loc.info != nullptr && CodeDtype(loc.info->dtype, format);
}

absl::Status CheckHfMxTensors(const Checkpoint& ckpt, const std::string& name, const std::vector<int64_t>& shape,
                              QuantFormat format, absl::string_view what, Checkpoint::Located* weight,
                              Checkpoint::Located* scale) {
  const bool fp4 = format == QuantFormat::kMxfp4;
  const std::vector<int64_t> code_shape = {shape[0], fp4 ? shape[1] / 2 : shape[1]};
  const std::string want = fp4 ? absl::StrCat("I8 or U8 ", ShapeString(code_shape), " (E2M1 nibble pairs)")
                               : absl::StrCat("F8_E4M3 ", ShapeString(code_shape));
  const Checkpoint::Located loc = ckpt.Find(name);
  if (loc.info == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(ckpt.dir(), ": ", what, ": tensor \"", name, "\" is missing (expected ", want, ")"));
  }
  if (!CodeDtype(loc.info->dtype, format) || loc.info->shape != code_shape || shape[1] % kMxBlock != 0) {
    return absl::InvalidArgumentError(absl::StrCat(Where(loc), " (", what, ") is ", DtypeName(loc.info->dtype), " ",
                                                   ShapeString(loc.info->shape), ", expected ", want, " for method ",
                                                   fp4 ? "MXFP4" : "MXFP8", " (K = ", shape[1],
                                                   ", a multiple of 32)"));
  }
  const std::vector<int64_t> scale_shape = {shape[0], shape[1] / kMxBlock};
  const std::vector<std::string> names = ScaleNames(name);
  Checkpoint::Located sloc;
  for (const std::string& n : names) {
    sloc = ckpt.Find(n);
    if (sloc.info != nullptr) break;
  }
  const std::string swant = absl::StrCat("F8_E8M0 or U8 ", ShapeString(scale_shape), ": the E8M0 scales of ", name);
  if (sloc.info == nullptr) {
    return absl::NotFoundError(absl::StrCat(ckpt.dir(), ": ", what, ": tensor \"", names[0], "\" is missing (expected ",
                                            swant, ")"));
  }
  if ((sloc.info->dtype != Dtype::kF8E8M0 && sloc.info->dtype != Dtype::kU8) || sloc.info->shape != scale_shape) {
    return absl::InvalidArgumentError(absl::StrCat(Where(sloc), " (", what, " scales) is ",
                                                   DtypeName(sloc.info->dtype), " ", ShapeString(sloc.info->shape),
                                                   ", expected ", swant));
  }
  *weight = loc;
  *scale = sloc;
  return absl::OkStatus();
}

void ReadHfMx(const Checkpoint::Located& weight, const Checkpoint::Located& scale, QuantFormat format, size_t n,
              size_t k, QuantizedMatrix* out) {
  out->spec = QuantSpec{format, 0};
  out->n = n;
  out->k = k;
  out->data.resize(weight.info->num_bytes());
  std::memcpy(out->data.data(), weight.file->data(*weight.info), weight.info->num_bytes());
  const uint8_t* codes = scale.file->data(*scale.info);
  out->scales.resize(scale.info->num_bytes());
  for (size_t i = 0; i < out->scales.size(); ++i) out->scales[i] = E8M0ToF32(codes[i]);
  out->zeros.clear();
}

}  // namespace kt
