#include "kt/moe/moe_reference.h"

#include <vector>

#include "Eigen/Core"
#include "absl/status/statusor.h"
#include "kt/kernels/eigen_views.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using eigen::MapRows;
using eigen::MatrixD;
using eigen::VectorD;

// An expert's [n, k] projection as the format sees it: the bf16 values, or their quantization dequantized
// (quant.h's Quantize and Dequantize).
MatrixD ReferenceWeights(ExpertFormat format, int group_size, const bf16_t* w, size_t n, size_t k) {
  if (!FormatTraits(format).quantized) return eigen::Bf16ToDouble(w, n, k, k);
  std::vector<float> deq(n * k, 0.0f);
  const absl::StatusOr<QuantSpec> spec = QuantSpecOf(format, group_size);
  if (spec.ok()) {
    const absl::StatusOr<QuantizedMatrix> q = Quantize(*spec, w, k, n, k);
    if (q.ok()) Dequantize(*q, deq.data(), k);
  }
  return MapRows(deq.data(), n, k).cast<double>();
}

// h of g and u: silu(g) u, with the config's clamp (g <= L, |u| <= L) and swigluoai (g sigmoid(a g) (u + 1)).
VectorD SwigluReference(const MoeConfig& c, VectorD g, VectorD u) {
  if (c.swiglu_limit > 0) {
    const double l = c.swiglu_limit;
    g = g.array().min(l).matrix();
    u = u.array().max(-l).min(l).matrix();
  }
  if (c.swiglu_alpha > 0) {
    return (g.array() / (1.0 + (-c.swiglu_alpha * g.array()).exp()) * (u.array() + 1.0)).matrix();
  }
  return (g.array() / (1.0 + (-g.array()).exp()) * u.array()).matrix();
}

// A row as the format feeds it to a product (its ActivationKind, in quant.h's scalar quantizers): the bf16
// values, or its int8 quantization per row (per row and group) dequantized to fp32.
VectorD ReferenceActivation(ExpertFormat format, int group_size, const bf16_t* x, size_t k) {
  const ActivationKind kind = FormatTraits(format).activation;
  if (kind == ActivationKind::kBf16Rows) return eigen::Bf16ToDouble(x, 1, k, k).transpose();
  std::vector<int8_t> q(k);
  const bool grouped = kind == ActivationKind::kInt8PerGroup;
  const size_t len = grouped ? static_cast<size_t>(group_size) : k;
  std::vector<float> scales(k / len), deq(k, 0.0f);
  bool ok = true;
  if (grouped) {
    ok = QuantizeActivationInt8Grouped(x, k, group_size, q.data(), scales.data()).ok();
  } else {
    QuantizeActivationInt8(x, k, q.data(), scales.data());
  }
  for (size_t i = 0; ok && i < k; ++i) deq[i] = static_cast<float>(q[i]) * scales[i / len];
  return MapRows(deq.data(), k, 1).cast<double>();
}

}  // namespace

void MoeForwardReference(const MoeConfig& config, int qlen, int k, const int64_t* ids,
                         const float* weights, const bf16_t* input, const bf16_t* gate,
                         const bf16_t* up, const bf16_t* down, const bool* gpu_experts_mask,
                         float* output, ExpertFormat format) {
  const size_t hidden = config.hidden, inter = config.intermediate;
  const int gs = config.group_size;
  std::vector<bf16_t> h_bf16(inter);
  for (int t = 0; t < qlen; ++t) {
    const VectorD x = ReferenceActivation(format, gs, input + static_cast<size_t>(t) * hidden, hidden);
    VectorD out = VectorD::Zero(static_cast<Eigen::Index>(hidden));
    for (int j = 0; j < k; ++j) {
      const int64_t e = ids[t * k + j];
      if (e < 0 || e >= config.num_experts || (gpu_experts_mask && gpu_experts_mask[e])) continue;
      const VectorD g = ReferenceWeights(format, gs, gate + e * inter * hidden, inter, hidden) * x;
      const VectorD u = ReferenceWeights(format, gs, up + e * inter * hidden, inter, hidden) * x;
      const VectorD h = SwigluReference(config, g, u);
      for (size_t c = 0; c < inter; ++c) h_bf16[c] = F32ToBf16(static_cast<float>(h[c]));
      const VectorD y = ReferenceWeights(format, gs, down + e * hidden * inter, hidden, inter) *
                        ReferenceActivation(format, gs, h_bf16.data(), inter);
      out += static_cast<double>(weights[t * k + j]) * y;
    }
    MapRows(output + static_cast<size_t>(t) * hidden, 1, hidden) = out.transpose().cast<float>();
  }
}

}  // namespace kt
