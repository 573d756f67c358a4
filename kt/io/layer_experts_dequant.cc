// LayerRequest::dequantize_stored (kt convert from FP8 and MX checkpoints to another method): the folder
// opened as stored, each matrix read quantized and dequantized to bf16, which the other method then
// quantizes (or keeps) as it does any bf16 checkpoint. One matrix at a time: nothing of the layer is held
// beyond the matrix being converted (streaming, as every conversion).
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/io/hf_fp8.h"
#include "kt/io/hf_mx.h"
#include "kt/io/layer_experts.h"
#include "kt/kernels/quant.h"

namespace kt {

absl::StatusOr<std::unique_ptr<LayerExperts>> LayerExperts::OpenHf(std::shared_ptr<const Checkpoint> ckpt,
                                                                   const MoeArch& arch,
                                                                   const std::string& config_path,
                                                                   const LayerRequest& want) {
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = OpenHfAsRequested(ckpt, arch, config_path, want);
  if (le.ok() || !want.dequantize_stored) return le;
  // The methods that read a folder as stored: the first that opens it (each checks the tensors' dtypes and
  // scales, so at most one does) is the folder's format. Anything else keeps the requested method's error.
  for (const char* stored : {"FP8", "FP8_PERCHANNEL", "MXFP4", "MXFP8"}) {
    if (want.method.method == stored) continue;
    absl::StatusOr<MethodLayout> layout = LayoutOfMethod(stored);
    if (!layout.ok()) continue;
    LayerRequest as = want;
    as.method = *layout;
    as.dequantize_stored = false;
    absl::StatusOr<std::unique_ptr<LayerExperts>> opened = OpenHfAsRequested(ckpt, arch, config_path, as);
    if (!opened.ok() || !((*opened)->hf_fp8_ || (*opened)->hf_mx_)) continue;
    (*opened)->hf_dequantize_ = true;
    (*opened)->stored_layout_ = *layout;
    (*opened)->layout_ = want.method;
    return opened;
  }
  return le;
}

absl::Status LayerExperts::ReadDequantizedBf16(int expert, ExpertMatrix m, bf16_t* out) const {
  const size_t i = static_cast<size_t>(expert) * 3 + static_cast<int>(m);
  const size_t n = Rows(m), k = Cols(m);
  QuantizedMatrix q;
  if (hf_mx_) {
    ReadHfMx(per_expert_[i], per_expert_scales_[i], stored_layout_.spec.format, n, k, &q);
  } else {
    ReadHfFp8(per_expert_[i], per_expert_scales_[i], hf_fp8_scales_, n, k, &q);
  }
  std::vector<float> w(n * k);
  Dequantize(q, w.data(), k);  // code value times a power of two (MX) or an fp32 scale (FP8): one multiply
  for (size_t j = 0; j < n * k; ++j) {
    if (!std::isfinite(w[j])) {
      return absl::InvalidArgumentError(absl::StrCat(
          per_expert_[i].file->path(), ": tensor \"", per_expert_[i].info->name, "\" element [", j / k, "][",
          j % k, "] is ", w[j], " (", stored_layout_.method, " code ", static_cast<int>(q.data[j]),
          " times its scale); ", layout_.method, " needs finite weights"));
    }
    out[j] = F32ToBf16(w[j]);
  }
  return absl::OkStatus();
}

}  // namespace kt
