// LayerExperts::OpenGguf (kt convert from a GGUF checkpoint): a layer's expert-stacked ggml tensors, each expert
// matrix dequantized row by row (DequantizeGgufRow: ggml's dequantize_row formulas in fp32) and rounded once
// to bf16, which the method then quantizes (or keeps, for BF16) as it does any bf16 checkpoint. One matrix at
// a time: nothing of the layer is held beyond the matrix being converted.
//
// Layout: a GGUF expert tensor has ne = [K, N, E] (ne[0] contiguous), i.e. row-major [E][N][K]: expert e's
// matrix is N consecutive rows of K values in ggml blocks, exactly the canonical [N, K] (gate/up [I, H],
// down [H, I]) once dequantized; no transpose.
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "kt/io/gguf.h"
#include "kt/io/gguf_experts.h"
#include "kt/io/layer_experts.h"
#include "kt/kernels/gguf_quants.h"

namespace kt {

absl::StatusOr<std::unique_ptr<LayerExperts>> LayerExperts::OpenGguf(std::shared_ptr<const GgufCheckpoint> ckpt,
                                                                     const MoeArch& arch, const LayerRequest& want) {
  if (!arch.IsMoeLayer(want.layer)) {
    return absl::InvalidArgumentError(absl::StrCat("GGUF checkpoint ", ckpt->path(), ": layer ", want.layer,
                                                   " is not a MoE layer of this ", arch.architecture, " (",
                                                   arch.moe_layers.size(), " MoE layers of ", arch.num_layers, ")"));
  }
  const int have[3] = {arch.num_experts, arch.hidden, arch.intermediate};
  const int asked[3] = {want.num_experts, want.hidden, want.intermediate};
  static const char* kNames[3] = {"num_experts", "hidden_size", "moe_intermediate_size"};
  for (int f = 0; f < 3; ++f) {
    if (asked[f] >= 0 && asked[f] != have[f]) {
      return absl::InvalidArgumentError(absl::StrCat("GGUF checkpoint ", ckpt->path(), ": ", kNames[f], " = ",
                                                     have[f], ", but the layer was created with ", kNames[f],
                                                     " = ", asked[f]));
    }
  }
  std::unique_ptr<LayerExperts> le(new LayerExperts());
  le->layer_ = want.layer;
  le->e_ = arch.num_experts;
  le->h_ = arch.hidden;
  le->i_ = arch.intermediate;
  le->layout_ = want.method;
  le->arch_ = arch;
  static const char* kProj[3] = {"gate", "up", "down"};
  for (int p = 0; p < 3; ++p) {
    // The type first, with kt convert's own message (FindGgufExperts speaks for method LLAMAFILE).
    const std::string name = absl::StrCat("blk.", want.layer, ".ffn_", kProj[p], "_exps.weight");
    const auto [file, info] = ckpt->Find(name);
    if (info != nullptr && !IsGgufTypeId(static_cast<int>(info->type))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "GGUF ", file->path(), ": tensor ", name, " is ", GgmlTypeName(info->type), ", which kt convert cannot "
          "dequantize; it reads the expert types ", kGgufSupportedTypes));
    }
    absl::StatusOr<GgufExpertTensor> t =
        FindGgufExperts(*ckpt, want.layer, p, arch.num_experts, arch.hidden, arch.intermediate);
    if (!t.ok()) return t.status();
    le->gguf_tensors_[p] = *std::move(t);
    le->weight_bytes_ += le->gguf_tensors_[p].expert_bytes * le->gguf_tensors_[p].experts;
  }
  le->gguf_ = std::move(ckpt);
  return le;
}

absl::Status LayerExperts::ReadGgufBf16(int expert, ExpertMatrix m, bf16_t* out) const {
  const GgufExpertTensor& t = gguf_tensors_[static_cast<int>(m)];
  const auto type = static_cast<GgufType>(t.type_id);
  const size_t n = t.n, k = t.k, row_bytes = GgufRowBytes(type, k);
  const uint8_t* base = t.data + t.expert_bytes * static_cast<uint64_t>(expert);
  std::vector<float> row(k);
  for (size_t r = 0; r < n; ++r) {
    DequantizeGgufRow(type, base + r * row_bytes, k, row.data());
    for (size_t c = 0; c < k; ++c) {
      // An inf or NaN (an F16/F32/BF16 value, or a block factor) would become a scale of inf or NaN.
      if (!std::isfinite(row[c])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "GGUF ", t.file, ": tensor ", t.name, " expert ", expert, " element [", r, "][", c, "] is ", row[c],
            " (its ", GgufTypeName(type), " value); method ", layout_.method, " needs finite weights"));
      }
      out[r * k + c] = F32ToBf16(row[c]);
    }
  }
  return absl::OkStatus();
}

}  // namespace kt
