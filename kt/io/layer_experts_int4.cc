// LayerExperts over a native int4 checkpoint (hf_int4.h): compressed-tensors pack-quantized (RAWINT4) or GPTQ
// sym (GPTQ_INT4).
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/io/layer_experts.h"

namespace kt {

absl::Status LayerExperts::OpenHfInt4(const Checkpoint& ckpt, const HfInt4Config& config,
                                      const std::string& config_path) {
  hf_int4_config_ = config;
  // The layer's G: the method's when it holds kt-int4-group{G}-sym-v1 (then the scales must match it, and the
  // read is exact); else the checkpoint's (config.json, or its scales' shape), and ReadBf16 dequantizes.
  const bool sym_group = layout_.quantized && layout_.spec.format == QuantFormat::kInt4GroupSym;
  hf_int4_group_ = config.group_size;
  if (sym_group && (hf_int4_group_ == 0 || hf_int4_group_ == layout_.spec.group_size)) {
    hf_int4_group_ = layout_.spec.group_size;
    hf_int4_exact_ = true;
  }
  if (sym_group && !hf_int4_exact_ && (layout_.method == "RAWINT4" || layout_.method == "GPTQ_INT4")) {
    return absl::InvalidArgumentError(absl::StrCat(
        config_path, ": the checkpoint's int4 groups are ", hf_int4_group_, " wide (quantization_config), but the "
        "layer holds ", layout_.tag, "; create it with group_size=", hf_int4_group_, " (KTMoEWrapper reads it from "
        "the folder when weight_path is given)"));
  }
  const size_t count = static_cast<size_t>(e_) * 3;
  hf_int4_.assign(count, HfInt4Matrix());
  per_expert_.assign(count, Checkpoint::Located());
  for (int e = 0; e < e_; ++e) {
    absl::StatusOr<ExpertNames> names = ExpertTensorNames(arch_, layer_, e);
    if (!names.ok()) return names.status();
    const std::string* n3[3] = {&names->gate, &names->up, &names->down};
    for (int p = 0; p < 3; ++p) {
      const auto m = static_cast<ExpertMatrix>(p);
      const std::string what = absl::StrCat("layer ", layer_, " expert ", e, " ", ExpertMatrixName(m), " (",
                                            HfInt4Method(config.kind), ")");
      HfInt4Matrix& mat = hf_int4_[static_cast<size_t>(e) * 3 + p];
      if (absl::Status s = FindHfInt4Matrix(ckpt, config, *n3[p], static_cast<int64_t>(Rows(m)),
                                            static_cast<int64_t>(Cols(m)), what, &hf_int4_group_, &mat);
          !s.ok()) {
        return s;
      }
      per_expert_[static_cast<size_t>(e) * 3 + p] = mat.packed;
      for (const Checkpoint::Located& t : {mat.packed, mat.scale, mat.zeros, mat.g_idx, mat.shape}) {
        if (t.info != nullptr) weight_bytes_ += t.info->num_bytes();
      }
    }
  }
  return absl::OkStatus();
}

absl::Status LayerExperts::ReadHfInt4Bf16(int expert, ExpertMatrix m, bf16_t* out) const {
  QuantizedMatrix q;
  const int p = static_cast<int>(m);
  if (absl::Status s = ReadHfInt4Matrix(hf_int4_config_, hf_int4_[static_cast<size_t>(expert) * 3 + p], Rows(m),
                                        Cols(m), hf_int4_group_, &q);
      !s.ok()) {
    return s;
  }
  const size_t n = Rows(m), k = Cols(m);
  std::vector<float> w(n * k);
  Dequantize(q, w.data(), k);  // q * scale: exact in fp32 (a 4-bit integer times a bf16 / fp16 scale)
  for (size_t i = 0; i < n * k; ++i) out[i] = F32ToBf16(w[i]);
  return absl::OkStatus();
}

}  // namespace kt
