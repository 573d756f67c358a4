// An ordered queue of host tasks run one after another by one dedicated thread: the asynchronous half of
// kt's serving runtime. A serving engine submits a layer's MoE forward, goes on with its GPU work, and
// later waits for it (Sync). Tasks run in submission order, never two at once, so a task may use the
// process's compute ThreadPool and the layers' shared scratch without further locking.
//
// Errors: a task returns absl::Status (a C++ exception escaping it is caught and turned into an Internal
// status naming it). The first failure is kept and returned by the next Sync, which then clears it; tasks
// submitted after a failure still run (each reads only its own inputs), as the original's queue does.
//
// Tasks are `QueuedTask` objects the caller owns and may submit again and again (a CUDA graph replays the
// same host node with the same pointer, so the task itself must outlive every replay and read any
// per-call value, such as the batch size, through memory at run time). Submitting a task that is still
// pending is an error the next Sync reports (it would be one object queued twice).
#ifndef KT_RUNTIME_TASK_QUEUE_H_
#define KT_RUNTIME_TASK_QUEUE_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/status.h"

namespace kt {

class TaskQueue;

// A reusable unit of work: `body` runs on the queue's thread each time the task is submitted.
class QueuedTask {
 public:
  QueuedTask(std::string name, std::function<absl::Status()> body)
      : name_(std::move(name)), body_(std::move(body)) {}
  const std::string& name() const { return name_; }
  // Times the body has finished (successfully or not); for tests and diagnostics.
  uint64_t runs() const { return runs_.load(std::memory_order_acquire); }

 private:
  friend class TaskQueue;
  std::string name_;
  std::function<absl::Status()> body_;
  std::atomic<bool> queued_{false};
  std::atomic<uint64_t> runs_{0};
  // The queue a CUDA host callback submits this task to (SubmitWithCudaStream): the callback gets only
  // this object's address, which a captured graph keeps for every replay.
  TaskQueue* stream_queue_ = nullptr;
  friend struct CudaStreamBridge;
};

class TaskQueue {
 public:
  TaskQueue();
  // Runs what is queued, then joins the thread.
  ~TaskQueue();
  TaskQueue(const TaskQueue&) = delete;
  TaskQueue& operator=(const TaskQueue&) = delete;

  // Appends `task` (not owned; it must live until it has run). Never blocks on running tasks; safe from any
  // thread, including a CUDA host callback (it takes a mutex and signals a condition variable, nothing
  // that calls into CUDA).
  void Submit(QueuedTask* task);

  // Blocks until at most `allow_n_pending` tasks are queued or running, then returns the first error of a
  // task finished since the last Sync (and forgets it), or OK. InvalidArgument for a negative count.
  absl::Status Sync(int allow_n_pending = 0);

  // Like Sync but leaves the first error in place for the next Sync (a CUDA host callback cannot return
  // one; the host side reports it at its next Sync).
  void WaitPending(int allow_n_pending);

  // Without waiting: the first error since the last Sync/PollError (and forgets it), or OK. For callers
  // that order their waits on a CUDA stream and so never call Sync: they poll at their next call.
  absl::Status PollError();

  // Tasks queued or running.
  int pending() const { return pending_.load(std::memory_order_acquire); }

  // A stable object standing for "wait until at most n pending" on this queue, for C callbacks that take
  // one pointer (SyncWithCudaStream); n in [0, kMaxStreamWait].
  struct StreamWait {
    TaskQueue* queue = nullptr;
    int allow_n_pending = 0;
  };
  static constexpr int kMaxStreamWait = 7;
  StreamWait* stream_wait(int allow_n_pending) { return &stream_waits_[allow_n_pending]; }

 private:
  void Loop();
  void Finish(const absl::Status& status);

  std::mutex mu_;
  std::condition_variable work_;  // a task was queued, or stop_
  std::condition_variable done_;  // pending_ decreased
  std::deque<QueuedTask*> queue_;
  std::atomic<int> pending_{0};
  bool stop_ = false;
  absl::Status first_error_;
  StreamWait stream_waits_[kMaxStreamWait + 1];
  std::thread thread_;
};

}  // namespace kt

#endif  // KT_RUNTIME_TASK_QUEUE_H_
