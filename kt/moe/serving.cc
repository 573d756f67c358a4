#include "kt/moe/serving.h"

#include <algorithm>
#include <numeric>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kt {

absl::StatusOr<std::unique_ptr<ServingForward>> ServingForward::Create(MoeLayer* layer, ThreadPool* pool,
                                                                       const ServingBuffers& b, int chunk,
                                                                       std::mutex* compute_mutex) {
  if (layer == nullptr || pool == nullptr) {
    return absl::InvalidArgumentError("ServingForward: layer and pool must not be null");
  }
  return Create(std::make_unique<PooledLayerForward>(layer, pool), b, chunk, compute_mutex);
}

absl::StatusOr<std::unique_ptr<ServingForward>> ServingForward::Create(std::unique_ptr<LayerForward> layer,
                                                                       const ServingBuffers& b, int chunk,
                                                                       std::mutex* compute_mutex) {
  if (layer == nullptr) return absl::InvalidArgumentError("ServingForward: layer must not be null");
  const MoeConfig& c = layer->config();
  if (b.batch_size == nullptr || b.ids == nullptr || b.weights == nullptr || b.input == nullptr ||
      b.output == nullptr) {
    return absl::InvalidArgumentError(
        "ServingForward: batch_size, ids, weights, input and output buffers must all be given");
  }
  if (b.capacity < 1) {
    return absl::InvalidArgumentError(absl::StrCat("ServingForward: capacity must be >= 1, got ", b.capacity));
  }
  if (b.k < 1 || b.k > c.top_k) {
    return absl::InvalidArgumentError(
        absl::StrCat("ServingForward: k = ", b.k, " must be in [1, num_experts_per_tok = ", c.top_k, "]"));
  }
  if (b.max_deferred < 0 || (b.max_deferred > 0 && (b.max_deferred >= b.k || b.deferred_ids == nullptr))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ServingForward: max_deferred_experts_per_token = ", b.max_deferred, " must be 0, or in [1, k = ", b.k,
        ") with a deferred_ids buffer"));
  }
  if (chunk < 1) {
    return absl::InvalidArgumentError(absl::StrCat("ServingForward: chunk (chunked_prefill_size) must be >= 1, got ",
                                                   chunk));
  }
  const int max_len = c.max_len;
  return std::unique_ptr<ServingForward>(
      new ServingForward(std::move(layer), b, std::min(chunk, max_len), compute_mutex));
}

ServingForward::ServingForward(std::unique_ptr<LayerForward> layer, const ServingBuffers& b, int chunk,
                               std::mutex* compute_mutex)
    : layer_(std::move(layer)),
      b_(b),
      chunk_(chunk),
      compute_mutex_(compute_mutex),
      task_(absl::StrCat("moe forward (", b.capacity, " rows)"), [this] { return Run(); }) {
  ids64_.resize(static_cast<size_t>(b_.max_deferred > 0 ? b_.capacity : chunk_) * b_.k);
}

absl::Status ServingForward::Run() {
  const int qlen = *b_.batch_size;
  if (qlen < 0 || qlen > b_.capacity) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch size ", qlen, " read at run time is outside [0, ", b_.capacity,
                     "], the rows this layer's buffers hold"));
  }
  std::unique_lock<std::mutex> lock;
  if (compute_mutex_ != nullptr) lock = std::unique_lock<std::mutex>(*compute_mutex_);
  if (!layer_->loaded()) {
    return absl::FailedPreconditionError("forward before the layer's weights were loaded");
  }
  const size_t h = static_cast<size_t>(layer_->config().hidden);
  const size_t k = static_cast<size_t>(b_.k);
  if (b_.max_deferred > 0) {
    absl::Status s = SplitDeferredExperts(b_.ids, b_.ids_int32, b_.weights, qlen, b_.k,
                                          layer_->config().num_experts, b_.max_deferred, ids64_.data(),
                                          b_.deferred_ids);
    if (!s.ok()) return s;
  }
  for (int t0 = 0; t0 < qlen; t0 += chunk_) {
    const int n = std::min(chunk_, qlen - t0);
    const int64_t* ids = nullptr;
    if (b_.max_deferred > 0) {
      ids = ids64_.data() + t0 * k;
    } else if (b_.ids_int32) {
      const int32_t* src = static_cast<const int32_t*>(b_.ids) + t0 * k;
      std::copy(src, src + n * k, ids64_.begin());
      ids = ids64_.data();
    } else {
      ids = static_cast<const int64_t*>(b_.ids) + t0 * k;
    }
    MoeLayer::Output out;
    out.bf16 = b_.output + t0 * h;
    out.add = b_.accumulate;
    absl::Status s = layer_->Forward(n, b_.k, ids, b_.weights + t0 * k, b_.input + t0 * h, out,
                                     b_.gpu_experts_mask);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status SplitDeferredExperts(const void* ids, bool ids_int32, const float* weights, int qlen, int k,
                                  int num_experts, int max_deferred, int64_t* immediate_ids,
                                  int64_t* deferred_ids) {
  if (max_deferred < 0 || max_deferred >= k) {
    return absl::InvalidArgumentError(absl::StrCat("max_deferred_experts_per_token = ", max_deferred,
                                                   " must be in [0, num_experts_per_tok = ", k, ")"));
  }
  auto id_at = [&](size_t i) -> int64_t {
    const int64_t id = ids_int32 ? static_cast<const int32_t*>(ids)[i] : static_cast<const int64_t*>(ids)[i];
    return id >= 0 && id < num_experts ? id : -1;
  };
  const int protect = k - max_deferred;
  std::vector<uint8_t> protected_expert(num_experts, 0);
  std::vector<int> order(k);
  for (int t = 0; t < qlen; ++t) {
    const size_t row = static_cast<size_t>(t) * k;
    std::iota(order.begin(), order.end(), 0);
    // Valid ids first, by weight, descending; stable so equal weights keep slot order.
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      const bool va = id_at(row + a) >= 0, vb = id_at(row + b) >= 0;
      if (va != vb) return va;
      return weights[row + a] > weights[row + b];
    });
    for (int j = 0; j < protect; ++j) {
      const int64_t id = id_at(row + order[j]);
      if (id >= 0) protected_expert[id] = 1;
    }
  }
  for (size_t i = 0; i < static_cast<size_t>(qlen) * k; ++i) {
    const int64_t id = id_at(i);
    const bool now = id >= 0 && protected_expert[id];
    immediate_ids[i] = now ? id : -1;
    deferred_ids[i] = id >= 0 && !now ? id : -1;
  }
  return absl::OkStatus();
}

}  // namespace kt
