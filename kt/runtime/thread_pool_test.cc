#include "kt/runtime/thread_pool.h"

#include <sched.h>

#include <atomic>
#include <numeric>
#include <set>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

TEST(ThreadPool, EveryTaskRunsExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    for (size_t n : {0, 1, 2, 7, 1000}) {
      std::vector<std::atomic<int>> hits(n);
      pool.ParallelFor(n, [&](size_t task, int thread) {
        ASSERT_GE(thread, 0);
        ASSERT_LT(thread, threads);
        hits[task].fetch_add(1);
      });
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "threads=" << threads;
    }
  }
}

TEST(ThreadPool, ReusableManyTimesAndSums) {
  ThreadPool pool(4);
  for (int round = 0; round < 200; ++round) {
    std::atomic<long> sum{0};
    pool.ParallelFor(100, [&](size_t task, int) { sum += static_cast<long>(task); });
    ASSERT_EQ(sum.load(), 4950);
  }
}

TEST(ThreadPool, DynamicSchedulingBalancesUnevenTasks) {
  // One slow task must not hold the others hostage: with 2 threads, the fast tasks all run on the
  // thread that did not take the slow one.
  ThreadPool pool(2);
  std::vector<int> owner(50, -1);
  pool.ParallelFor(50, [&](size_t task, int thread) {
    if (task == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    owner[task] = thread;
  });
  const int slow_owner = owner[0];
  int others_on_slow = 0;
  for (size_t i = 1; i < owner.size(); ++i) others_on_slow += owner[i] == slow_owner;
  EXPECT_LT(others_on_slow, 10) << "the thread stuck in the slow task should not get most of the rest";
}

TEST(ThreadPool, PinnedThreadsLandOnDifferentCpus) {
  const unsigned cpus = std::thread::hardware_concurrency();
  if (cpus < 2) GTEST_SKIP() << "needs 2 CPUs";
  // Run in a separate thread so pinning does not affect the rest of the test binary.
  std::thread([] {
    ThreadPool pool(ThreadPoolOptions{2, true});
    std::vector<int> cpu_of_thread(2, -1);
    std::atomic<int> arrived{0};
    pool.ParallelFor(2, [&](size_t, int thread) {
      // Both tasks wait for each other, so each thread runs exactly one.
      ++arrived;
      while (arrived.load() < 2) std::this_thread::yield();
      cpu_of_thread[thread] = sched_getcpu();
    });
    EXPECT_NE(cpu_of_thread[0], -1);
    EXPECT_NE(cpu_of_thread[0], cpu_of_thread[1]) << "pinned threads share one CPU";
  }).join();
}

}  // namespace
}  // namespace kt
