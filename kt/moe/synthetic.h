// Deterministic synthetic MoE inputs for benchmarks and `kt bench`: random bf16 weights and activations,
// and random top-k routing. Values depend only on (stream, index), never on how work is split across
// threads, so every run and every thread count sees the same layer.
#ifndef KT_MOE_SYNTHETIC_H_
#define KT_MOE_SYNTHETIC_H_

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include "kt/kernels/dtype.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

// SplitMix64's finaliser: a counter-based hash, value i of stream s is Mix(Mix(s) ^ i).
inline uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in [-1, 1): value i of stream `key` (key = Mix(stream)).
inline float UniformSym(uint64_t key, uint64_t i) {
  return static_cast<float>(Mix(key ^ i) >> 40) * (2.0f / 16777216.0f) - 1.0f;
}

// n bf16 values with standard deviation `std` (uniform in [-sqrt(3) std, sqrt(3) std)), filled in
// parallel on `pool`; one hash gives two values.
void FillRandomBf16(ThreadPool& pool, uint64_t stream, size_t n, float std, bf16_t* out);

// qlen tokens, each routed to k distinct experts with positive weights summing to 1.
struct Routing {
  std::vector<int64_t> ids;    // [qlen, k]
  std::vector<float> weights;  // [qlen, k]
  int distinct_experts = 0;    // experts with at least one token: the weight bytes a call touches
};
Routing RandomRouting(std::mt19937_64& rng, int qlen, int k, int num_experts);
// As RandomRouting, with every expert drawn from those whose `avoid` entry is 0 ([num_experts]; at least k
// of them): benchmarks use it so a decode call does not find its experts in the cache from recent calls.
Routing RandomRoutingAvoiding(std::mt19937_64& rng, int qlen, int k, int num_experts, const std::vector<char>& avoid);
// `count` routings for calls i = 0, 1, ... that run routing i on layer copy i % copies: each avoids the experts
// of the `window` calls before it on the same copy, the window cut to what leaves a call enough experts to
// pick from (0: plain RandomRouting, as for calls that touch most experts anyway).
std::vector<Routing> CacheAvoidingRoutings(std::mt19937_64& rng, int count, int qlen, int k, int num_experts,
                                           int copies, int window);

}  // namespace kt

#endif  // KT_MOE_SYNTHETIC_H_
