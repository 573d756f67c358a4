// NUMA placement: on this project's machines there is one node (node 0), so the tests check that a node
// pool's workers really run restricted to node 0's CPUs, that memory bound to node 0 is on node 0 (asked of
// the kernel page by page), and the errors for nodes that do not exist. Skipped where NUMA is unavailable,
// except the errors, which then must name numa_nodes.
#include "kt/runtime/numa.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "kt/runtime/memory.h"
#include "kt/runtime/thread_pool.h"

namespace kt {
namespace {

TEST(NumaTest, NodeCpusArePartOfTheProcessAffinity) {
  if (!NumaAvailable()) GTEST_SKIP() << "NUMA not available";
  ASSERT_GE(NumaNodeCount(), 1);
  absl::StatusOr<std::vector<int>> cpus = NumaNodeCpus(0);
  ASSERT_TRUE(cpus.ok()) << cpus.status();
  const std::vector<int> allowed = CurrentThreadCpus();
  for (int cpu : *cpus) EXPECT_TRUE(std::count(allowed.begin(), allowed.end(), cpu) == 1) << cpu;
}

TEST(NumaTest, PoolWorkersRunOnlyOnTheirNodesCpus) {
  if (!NumaAvailable()) GTEST_SKIP() << "NUMA not available";
  absl::StatusOr<NodePools> pools = CreateNodePools(2, 4, {0, 0});
  ASSERT_TRUE(pools.ok()) << pools.status();
  const std::vector<int> node_cpus = *NumaNodeCpus(0);
  const std::set<int> want(node_cpus.begin(), node_cpus.end());
  for (ThreadPool* pool : pools->raw()) {
    ASSERT_EQ(pool->num_threads(), 2);
    EXPECT_EQ(pool->cpu_set(), node_cpus);
    std::mutex mu;
    std::vector<std::vector<int>> seen;
    std::atomic<int> arrived{0};
    // Two tasks, each waiting for the other, so both threads (caller and worker) take one.
    pool->ParallelFor(2, [&](size_t, int thread) {
      arrived.fetch_add(1);
      while (arrived.load() < 2) {
      }
      if (thread == 0) return;  // the caller: the pool does not pin it
      std::lock_guard<std::mutex> lock(mu);
      seen.push_back(CurrentThreadCpus());
    });
    ASSERT_EQ(seen.size(), 1u);
    EXPECT_EQ(std::set<int>(seen[0].begin(), seen[0].end()), want);
  }
}

TEST(NumaTest, ScopedAffinityRestoresTheCallersMask) {
  const std::vector<int> before = CurrentThreadCpus();
  ASSERT_FALSE(before.empty());
  {
    ScopedCpuAffinity pin({before.front()});
    EXPECT_EQ(CurrentThreadCpus(), std::vector<int>{before.front()});
  }
  EXPECT_EQ(CurrentThreadCpus(), before);
}

TEST(NumaTest, MemoryBoundToANodeIsOnIt) {
  if (!NumaAvailable()) GTEST_SKIP() << "NUMA not available";
  for (size_t bytes : {size_t{100}, size_t{3} << 20, size_t{33} << 20}) {
    auto* p = static_cast<unsigned char*>(AllocateArrayOnNode(bytes, 0));
    ASSERT_EQ(reinterpret_cast<uintptr_t>(p) % 4096, 0u);
    std::memset(p, 1, bytes);  // first touch, from this (unpinned) thread
    for (size_t off = 0; off < bytes; off += 4096) {
      absl::StatusOr<int> node = NodeOfAddress(p + off);
      ASSERT_TRUE(node.ok()) << node.status();
      ASSERT_EQ(*node, 0) << "page at offset " << off << " of " << bytes;
    }
    std::free(p);
  }
}

TEST(NumaTest, ThreadsAreSplitOverThePools) {
  absl::StatusOr<NodePools> pools = CreateNodePools(3, 7, {});
  ASSERT_TRUE(pools.ok()) << pools.status();
  ASSERT_EQ(pools->pools.size(), 3u);
  EXPECT_EQ(pools->pools[0]->num_threads(), 3);
  EXPECT_EQ(pools->pools[1]->num_threads(), 2);
  EXPECT_EQ(pools->pools[2]->num_threads(), 2);
  for (size_t i = 0; i < 3; ++i) {
    // Default placement: node i mod the node count; unplaced (-1) only without NUMA.
    EXPECT_EQ(pools->nodes[i], NumaAvailable() ? static_cast<int>(i) % NumaNodeCount() : -1);
  }
}

TEST(NumaTest, BadRequestsNameTheArgument) {
  absl::StatusOr<NodePools> few = CreateNodePools(4, 3, {});
  ASSERT_FALSE(few.ok());
  EXPECT_NE(few.status().message().find("cpuinfer_threads = 3"), std::string::npos) << few.status();
  EXPECT_NE(few.status().message().find("threadpool_count = 4"), std::string::npos) << few.status();

  absl::StatusOr<NodePools> len = CreateNodePools(2, 4, {0});
  ASSERT_FALSE(len.ok());
  EXPECT_NE(len.status().message().find("numa_nodes must list one node per sub-pool"), std::string::npos);

  const int missing = std::max(NumaNodeCount(), 1) + 7;
  absl::StatusOr<NodePools> bad = CreateNodePools(2, 4, {0, missing});
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find(NumaAvailable() ? "numa_nodes[1] = " : "numa_nodes[0]"),
            std::string::npos)
      << bad.status();

  EXPECT_THROW(AllocateArrayOnNode(4096, missing), std::invalid_argument);
}

}  // namespace
}  // namespace kt
