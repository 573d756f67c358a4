#include "kt/moe/synthetic.h"

#include <algorithm>
#include <cmath>

namespace kt {

void FillRandomBf16(ThreadPool& pool, uint64_t stream, size_t n, float std, bf16_t* out) {
  const float scale = std::sqrt(3.0f) * std * (2.0f / 16777216.0f);
  const float a = std::sqrt(3.0f) * std;
  const uint64_t key = Mix(stream);
  constexpr size_t kChunk = size_t{1} << 20;  // even, so a chunk never splits a hash's two values
  pool.ParallelFor((n + kChunk - 1) / kChunk, [&](size_t task, int) {
    const size_t end = std::min(n, (task + 1) * kChunk);
    for (size_t i = task * kChunk; i < end; i += 2) {
      const uint64_t r = Mix(key ^ i);
      out[i] = F32ToBf16(static_cast<float>(r >> 40) * scale - a);
      if (i + 1 < end) out[i + 1] = F32ToBf16(static_cast<float>((r >> 16) & 0xffffff) * scale - a);
    }
  });
}

Routing RandomRouting(std::mt19937_64& rng, int qlen, int k, int num_experts) {
  return RandomRoutingAvoiding(rng, qlen, k, num_experts, std::vector<char>(num_experts, 0));
}

Routing RandomRoutingAvoiding(std::mt19937_64& rng, int qlen, int k, int num_experts, const std::vector<char>& avoid) {
  std::vector<int> allowed;
  for (int e = 0; e < num_experts; ++e) {
    if (!avoid[e]) allowed.push_back(e);
  }
  const int n = static_cast<int>(allowed.size());
  Routing r;
  r.ids.resize(static_cast<size_t>(qlen) * k);
  r.weights.resize(r.ids.size());
  std::vector<int> perm(n);
  std::vector<char> seen(num_experts, 0);
  std::uniform_real_distribution<float> w(0.1f, 1.0f);
  for (int t = 0; t < qlen; ++t) {
    perm = allowed;
    float sum = 0;
    for (int j = 0; j < k; ++j) {  // Partial Fisher-Yates: k distinct experts.
      std::uniform_int_distribution<int> pick(j, n - 1);
      std::swap(perm[j], perm[pick(rng)]);
      r.ids[t * k + j] = perm[j];
      r.weights[t * k + j] = w(rng);
      sum += r.weights[t * k + j];
      if (!seen[perm[j]]) {
        seen[perm[j]] = 1;
        ++r.distinct_experts;
      }
    }
    for (int j = 0; j < k; ++j) r.weights[t * k + j] /= sum;
  }
  return r;
}

std::vector<Routing> CacheAvoidingRoutings(std::mt19937_64& rng, int count, int qlen, int k, int num_experts,
                                           int copies, int window) {
  const int per_call = qlen * k;
  window = per_call * 2 <= num_experts ? std::min(window, num_experts / per_call - 1) : 0;
  std::vector<Routing> routings;
  for (int i = 0; i < count; ++i) {
    std::vector<char> avoid(static_cast<size_t>(num_experts), 0);
    for (int back = 1; back <= window && i - back * copies >= 0; ++back) {
      for (int64_t id : routings[static_cast<size_t>(i - back * copies)].ids) avoid[static_cast<size_t>(id)] = 1;
    }
    routings.push_back(RandomRoutingAvoiding(rng, qlen, k, num_experts, avoid));
  }
  return routings;
}

}  // namespace kt
