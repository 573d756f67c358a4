// RouteToExperts: rows grouped by expert in (token, slot) order, skipped ids (negative, too large, masked)
// without a row, and buffers reused across batches of different sizes.
#include "kt/moe/routing.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

TEST(RoutingTest, CountingSortByExpertInTokenSlotOrder) {
  // 3 tokens x 2 slots over 4 experts; -1, 4 (>= E) and expert 3 (masked) get no row.
  const std::vector<int64_t> ids = {2, 0, -1, 2, 3, 4};
  const bool skip[4] = {false, false, false, true};
  ExpertRouting r;
  RouteToExperts(ids.data(), 3, 2, 4, skip, &r);
  EXPECT_EQ(r.rows, 3);
  EXPECT_EQ(r.begin, (std::vector<int>{0, 1, 1, 3, 3}));
  EXPECT_EQ(r.active, (std::vector<int>{0, 2}));
  // Expert 0: (token 0, slot 1); expert 2: (0, 0) then (1, 1).
  EXPECT_EQ(r.row_slot[0], 1);
  EXPECT_EQ(r.row_slot[1], 0);
  EXPECT_EQ(r.row_slot[2], 3);
  const std::vector<int> want_rows = {1, 0, -1, 2, -1, -1};
  for (size_t t = 0; t < ids.size(); ++t) EXPECT_EQ(r.token_slot_row[t], want_rows[t]) << t;
}

TEST(RoutingTest, ReusedForSmallerAndLargerBatches) {
  ExpertRouting r;
  const std::vector<int64_t> big = {0, 1, 1, 0, 1, 1, 0, 0};
  RouteToExperts(big.data(), 4, 2, 2, nullptr, &r);
  EXPECT_EQ(r.rows, 8);
  EXPECT_EQ(r.begin, (std::vector<int>{0, 4, 8}));
  const std::vector<int64_t> small = {1, -5};
  RouteToExperts(small.data(), 1, 2, 2, nullptr, &r);
  EXPECT_EQ(r.rows, 1);
  EXPECT_EQ(r.begin, (std::vector<int>{0, 0, 1}));
  EXPECT_EQ(r.active, (std::vector<int>{1}));
  EXPECT_EQ(r.row_slot[0], 0);
  EXPECT_EQ(r.token_slot_row[0], 0);
  EXPECT_EQ(r.token_slot_row[1], -1);
}

TEST(RoutingTest, PaddedStrideAddsOneCacheLine) {
  EXPECT_EQ(PaddedStride(2048, 2), 2048u + 32);
  EXPECT_EQ(PaddedStride(100, 1), 128u + 64);
  EXPECT_EQ(PaddedStride(40, 4), 48u + 16);
}

}  // namespace
}  // namespace kt
