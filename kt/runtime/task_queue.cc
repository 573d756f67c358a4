#include "kt/runtime/task_queue.h"

#include <chrono>
#include <exception>
#include <utility>

#include "absl/strings/str_cat.h"

namespace kt {
namespace {

// Waking a thread blocked on a condition variable costs a futex round trip through the kernel (5-20 us on
// the machines measured, docs/PERFORMANCE.md), as much as a small decode layer's whole CPU work. So both
// sides first poll for a short while: the queue's thread for the next task (a serving engine submits the
// next layer's forward soon after syncing the last), Sync for the pending count to drop. Polling is bounded
// (kSpinMicros), so an idle queue still sleeps and costs nothing.
constexpr int kSpinMicros = 50;

template <typename Pred>
bool SpinFor(Pred done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  for (int i = 0;; ++i) {
    if (done()) return true;
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return false;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

}  // namespace

TaskQueue::TaskQueue() {
  for (int n = 0; n <= kMaxStreamWait; ++n) stream_waits_[n] = StreamWait{this, n};
  thread_ = std::thread([this] { Loop(); });
}

TaskQueue::~TaskQueue() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_.notify_one();
  thread_.join();
}

void TaskQueue::Submit(QueuedTask* task) {
  std::unique_lock<std::mutex> lock(mu_);
  if (task->queued_.exchange(true, std::memory_order_acq_rel)) {
    // Queuing the same object twice would run it twice with whatever its inputs hold by then; refuse and
    // let the next Sync say so.
    if (first_error_.ok()) {
      first_error_ = absl::FailedPreconditionError(absl::StrCat(
          "TaskQueue::Submit: task '", task->name(),
          "' was submitted again before it had run; Sync (or sync_forward) after each submit"));
    }
    return;
  }
  queue_.push_back(task);
  pending_.fetch_add(1, std::memory_order_acq_rel);
  lock.unlock();
  work_.notify_one();
}

void TaskQueue::Loop() {
  for (;;) {
    QueuedTask* task = nullptr;
    SpinFor([this] { return pending_.load(std::memory_order_acquire) > 0; });
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      task = queue_.front();
      queue_.pop_front();
    }
    absl::Status status;
    try {
      status = task->body_();
    } catch (const std::exception& e) {
      status = absl::InternalError(absl::StrCat("task '", task->name(), "' threw: ", e.what()));
    } catch (...) {
      status = absl::InternalError(absl::StrCat("task '", task->name(), "' threw a non-standard exception"));
    }
    if (!status.ok() && status.message().find(task->name()) == absl::string_view::npos) {
      status = absl::Status(status.code(), absl::StrCat(task->name(), ": ", status.message()));
    }
    task->runs_.fetch_add(1, std::memory_order_acq_rel);
    task->queued_.store(false, std::memory_order_release);
    Finish(status);
  }
}

void TaskQueue::Finish(const absl::Status& status) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!status.ok() && first_error_.ok()) first_error_ = status;
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
  done_.notify_all();
}

void TaskQueue::WaitPending(int allow_n_pending) {
  SpinFor([&] { return pending_.load(std::memory_order_acquire) <= allow_n_pending; });
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) <= allow_n_pending; });
}

absl::Status TaskQueue::PollError() {
  std::lock_guard<std::mutex> lock(mu_);
  return std::exchange(first_error_, absl::OkStatus());
}

absl::Status TaskQueue::Sync(int allow_n_pending) {
  if (allow_n_pending < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("TaskQueue::Sync: allow_n_pending must be >= 0, got ", allow_n_pending));
  }
  SpinFor([&] { return pending_.load(std::memory_order_acquire) <= allow_n_pending; });
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) <= allow_n_pending; });
  return std::exchange(first_error_, absl::OkStatus());
}

}  // namespace kt
