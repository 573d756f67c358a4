#include "kt/runtime/task_queue.h"

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

// A gate a task waits on until the test opens it, so the test controls what is pending.
class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

TEST(TaskQueueTest, RunsTasksInSubmissionOrderOnOneThread) {
  TaskQueue queue;
  std::vector<int> order;  // written only by the queue's thread, read after Sync
  std::vector<std::thread::id> threads;
  std::vector<std::unique_ptr<QueuedTask>> tasks;
  for (int i = 0; i < 100; ++i) {
    tasks.push_back(std::make_unique<QueuedTask>("t", [&, i] {
      order.push_back(i);
      threads.push_back(std::this_thread::get_id());
      return absl::OkStatus();
    }));
  }
  for (auto& t : tasks) queue.Submit(t.get());
  ASSERT_TRUE(queue.Sync().ok());
  ASSERT_EQ(order.size(), 100u);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(order[i], i);
  for (const auto& id : threads) {
    EXPECT_EQ(id, threads[0]);
    EXPECT_NE(id, std::this_thread::get_id());
  }
  EXPECT_EQ(queue.pending(), 0);
}

TEST(TaskQueueTest, SyncAllowsNPending) {
  TaskQueue queue;
  Gate gate;
  std::atomic<int> finished{0};
  QueuedTask blocked("blocked", [&] {
    gate.Wait();
    finished.fetch_add(1);
    return absl::OkStatus();
  });
  QueuedTask after("after", [&] {
    finished.fetch_add(1);
    return absl::OkStatus();
  });
  queue.Submit(&blocked);
  queue.Submit(&after);
  EXPECT_EQ(queue.pending(), 2);
  // Two pending are allowed: returns at once although nothing has run.
  ASSERT_TRUE(queue.Sync(2).ok());
  EXPECT_EQ(finished.load(), 0);
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    gate.Open();
  });
  ASSERT_TRUE(queue.Sync(0).ok());
  EXPECT_EQ(finished.load(), 2);
  opener.join();
}

TEST(TaskQueueTest, ErrorIsReturnedByTheNextSyncOnly) {
  TaskQueue queue;
  int ran_after = 0;
  QueuedTask failing("layer 3 forward", [] { return absl::InvalidArgumentError("qlen 0 is not in [1, 64]"); });
  QueuedTask later("later", [&] {
    ++ran_after;
    return absl::OkStatus();
  });
  queue.Submit(&failing);
  queue.Submit(&later);
  absl::Status s = queue.Sync();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("layer 3 forward"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("qlen 0"), absl::string_view::npos) << s;
  EXPECT_EQ(ran_after, 1);  // tasks after a failure still run
  EXPECT_TRUE(queue.Sync().ok());  // reported once
}

TEST(TaskQueueTest, PollErrorReturnsWithoutWaiting) {
  TaskQueue queue;
  Gate gate;
  QueuedTask failing("failing", [] { return absl::InternalError("bad"); });
  QueuedTask blocked("blocked", [&] {
    gate.Wait();
    return absl::OkStatus();
  });
  EXPECT_TRUE(queue.PollError().ok());
  queue.Submit(&failing);
  queue.Submit(&blocked);
  // The failing task finishes while the blocked one holds the queue; PollError must not wait for it.
  absl::Status s;
  for (int i = 0; i < 2000 && s.ok(); ++i) {
    s = queue.PollError();
    if (s.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_EQ(queue.pending(), 1);
  gate.Open();
  EXPECT_TRUE(queue.Sync().ok());  // already taken
}

TEST(TaskQueueTest, FirstOfSeveralErrorsIsKept) {
  TaskQueue queue;
  QueuedTask a("a", [] { return absl::InternalError("first"); });
  QueuedTask b("b", [] { return absl::InternalError("second"); });
  queue.Submit(&a);
  queue.Submit(&b);
  absl::Status s = queue.Sync();
  EXPECT_NE(s.message().find("first"), absl::string_view::npos) << s;
}

TEST(TaskQueueTest, ExceptionBecomesAStatusNamingTheTask) {
  TaskQueue queue;
  QueuedTask throwing("throwing task", []() -> absl::Status { throw std::runtime_error("boom"); });
  queue.Submit(&throwing);
  absl::Status s = queue.Sync();
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("throwing task"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("boom"), absl::string_view::npos) << s;
  // The queue keeps working.
  int ran = 0;
  QueuedTask ok("ok", [&] {
    ++ran;
    return absl::OkStatus();
  });
  queue.Submit(&ok);
  EXPECT_TRUE(queue.Sync().ok());
  EXPECT_EQ(ran, 1);
}

TEST(TaskQueueTest, ReusedTaskRunsOncePerSubmit) {
  TaskQueue queue;
  int runs = 0;
  QueuedTask t("reused", [&] {
    ++runs;
    return absl::OkStatus();
  });
  for (int i = 0; i < 10; ++i) {
    queue.Submit(&t);
    ASSERT_TRUE(queue.Sync().ok());
  }
  EXPECT_EQ(runs, 10);
  EXPECT_EQ(t.runs(), 10u);
}

TEST(TaskQueueTest, SubmittingAPendingTaskAgainIsRefused) {
  TaskQueue queue;
  Gate gate;
  int runs = 0;
  QueuedTask t("forward", [&] {
    gate.Wait();
    ++runs;
    return absl::OkStatus();
  });
  queue.Submit(&t);
  queue.Submit(&t);  // still pending
  gate.Open();
  absl::Status s = queue.Sync();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("forward"), absl::string_view::npos) << s;
  EXPECT_EQ(runs, 1);
}

TEST(TaskQueueTest, NegativeAllowNPendingIsInvalid) {
  TaskQueue queue;
  absl::Status s = queue.Sync(-1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("allow_n_pending"), absl::string_view::npos) << s;
}

TEST(TaskQueueTest, DestructorRunsWhatIsQueued) {
  std::atomic<int> runs{0};
  std::vector<std::unique_ptr<QueuedTask>> tasks;
  for (int i = 0; i < 20; ++i) {
    tasks.push_back(std::make_unique<QueuedTask>("t", [&] {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      runs.fetch_add(1);
      return absl::OkStatus();
    }));
  }
  {
    TaskQueue queue;
    for (auto& t : tasks) queue.Submit(t.get());
  }
  EXPECT_EQ(runs.load(), 20);
}

TEST(TaskQueueTest, SubmitFromManyThreads) {
  TaskQueue queue;
  std::atomic<int> runs{0};
  constexpr int kThreads = 4, kPerThread = 50;
  std::vector<std::unique_ptr<QueuedTask>> tasks;
  for (int i = 0; i < kThreads * kPerThread; ++i) {
    tasks.push_back(std::make_unique<QueuedTask>("t", [&] {
      runs.fetch_add(1);
      return absl::OkStatus();
    }));
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) queue.Submit(tasks[t * kPerThread + i].get());
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_TRUE(queue.Sync().ok());
  EXPECT_EQ(runs.load(), kThreads * kPerThread);
}

}  // namespace
}  // namespace kt
