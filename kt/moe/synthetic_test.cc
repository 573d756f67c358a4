// The benchmarks' synthetic routing: k distinct experts per token with weights summing to 1, avoided experts
// never drawn, and no avoidance drawing exactly what RandomRouting draws (kt bench's routings stay the same
// sequence as before the cache-avoiding decode patterns).
#include "kt/moe/synthetic.h"

#include <cmath>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

TEST(SyntheticRoutingTest, AvoidedExpertsAreNeverDrawn) {
  std::mt19937_64 rng(7);
  constexpr int kE = 32, kK = 4;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<char> avoid(kE, 0);
    for (int e = 0; e < kE; ++e) avoid[e] = (e * 7 + trial) % 3 == 0;
    const int qlen = 1 + trial % 3;
    const Routing r = RandomRoutingAvoiding(rng, qlen, kK, kE, avoid);
    ASSERT_EQ(r.ids.size(), size_t(qlen * kK));
    std::set<int64_t> all;
    for (int t = 0; t < qlen; ++t) {
      std::set<int64_t> token;
      float sum = 0;
      for (int j = 0; j < kK; ++j) {
        const int64_t id = r.ids[t * kK + j];
        ASSERT_GE(id, 0);
        ASSERT_LT(id, kE);
        EXPECT_FALSE(avoid[id]) << "expert " << id << " was to be avoided";
        token.insert(id);
        all.insert(id);
        sum += r.weights[t * kK + j];
      }
      EXPECT_EQ(token.size(), size_t(kK)) << "a token's experts are distinct";
      EXPECT_NEAR(sum, 1.0f, 1e-5f);
    }
    EXPECT_EQ(r.distinct_experts, static_cast<int>(all.size()));
  }
}

TEST(SyntheticRoutingTest, NothingAvoidedIsRandomRouting) {
  std::mt19937_64 a(11), b(11);
  for (int i = 0; i < 20; ++i) {
    const Routing x = RandomRouting(a, 3, 8, 128);
    const Routing y = RandomRoutingAvoiding(b, 3, 8, 128, std::vector<char>(128, 0));
    EXPECT_EQ(x.ids, y.ids);
    EXPECT_EQ(x.weights, y.weights);
  }
}

// kt bench's decode routings: no expert of call i recurs in the `window` calls on the same copy before it
// (here 3 copies, window 4: 4 x 8 = 32 of 64 experts avoided per call), and a window too large for the
// experts left is cut rather than starving a call.
TEST(SyntheticRoutingTest, CacheAvoidingRoutingsKeepTheirWindow) {
  std::mt19937_64 rng(5);
  constexpr int kCopies = 3, kWindow = 4;
  const std::vector<Routing> r = CacheAvoidingRoutings(rng, 60, 1, 8, 64, kCopies, kWindow);
  ASSERT_EQ(r.size(), 60u);
  for (size_t i = 0; i < r.size(); ++i) {
    for (int back = 1; back <= kWindow && i >= size_t(back * kCopies); ++back) {
      for (int64_t id : r[i].ids) {
        for (int64_t old : r[i - back * kCopies].ids) EXPECT_NE(id, old) << "call " << i << " back " << back;
      }
    }
  }
  const std::vector<Routing> cut = CacheAvoidingRoutings(rng, 40, 1, 8, 64, 1, 100);  // cut to 7
  for (size_t i = 7; i < cut.size(); ++i) {
    std::set<int64_t> recent;
    for (size_t j = i - 7; j < i; ++j) recent.insert(cut[j].ids.begin(), cut[j].ids.end());
    EXPECT_EQ(recent.size(), 56u);
    for (int64_t id : cut[i].ids) EXPECT_EQ(recent.count(id), 0u) << i;
  }
}

}  // namespace
}  // namespace kt
