// A pool of persistent worker threads with a dynamically scheduled parallel-for. Passed explicitly to
// whoever needs threads: kt has no hidden global pool in C++.
#ifndef KT_RUNTIME_THREAD_POOL_H_
#define KT_RUNTIME_THREAD_POOL_H_

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

struct ThreadPoolOptions {
  int num_threads = 1;  // Total threads including the caller of ParallelFor.
  // Pin thread i to the i-th CPU of the process's affinity mask at construction. Thread 0 is the thread that
  // constructs the pool (it runs tasks in ParallelFor), so it is pinned too: threads it starts later
  // inherit that one-CPU mask.
  bool pin = false;
  // Non-empty: every worker thread may run only on these CPUs (a NUMA node's, kt/runtime/numa.h), and the
  // OS places it among them. The caller of ParallelFor (thread 0) is not touched: whoever drives the pool
  // pins itself if it should (ScopedCpuAffinity). Overrides `pin`.
  std::vector<int> cpu_set;
};

// Restricts the calling thread to `cpus` until destruction, then restores its previous affinity. Empty:
// does nothing.
class ScopedCpuAffinity {
 public:
  explicit ScopedCpuAffinity(const std::vector<int>& cpus);
  ~ScopedCpuAffinity();
  ScopedCpuAffinity(const ScopedCpuAffinity&) = delete;
  ScopedCpuAffinity& operator=(const ScopedCpuAffinity&) = delete;

 private:
  bool active_ = false;
  std::vector<int> saved_;
};

// The calling thread's allowed CPUs (sched_getaffinity), in order.
std::vector<int> CurrentThreadCpus();

class ThreadPool {
 public:
  explicit ThreadPool(const ThreadPoolOptions& options);
  explicit ThreadPool(int num_threads) : ThreadPool(ThreadPoolOptions{num_threads, false}) {}
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }
  // ThreadPoolOptions::cpu_set (empty: workers not restricted to a set).
  const std::vector<int>& cpu_set() const { return cpu_set_; }

  // Runs fn(task, thread) for every task in [0, num_tasks), thread in [0, num_threads()). Tasks are
  // claimed one at a time from a shared atomic counter (dynamic scheduling: a thread that finishes early
  // takes the next task, so uneven tasks balance). The calling thread works too and this returns when every
  // task is done. Not reentrant: fn must not call ParallelFor on the same pool.
  void ParallelFor(size_t num_tasks, const std::function<void(size_t task, int thread)>& fn);

 private:
  void WorkerLoop(int thread);
  void RunTasks(int thread);

  const int num_threads_;
  const std::vector<int> cpu_set_;
  std::vector<std::thread> workers_;

  // Hand-off: ParallelFor publishes fn_/num_tasks_, then bumps generation_ (release). Workers spin on
  // generation_ for up to kSpinMicros before sleeping on wake_; the caller likewise spins on busy_workers_
  // before sleeping on done_. A MoE decode step is one short ParallelFor (MoeLayer::Forward runs gather,
  // gate/up, h-quantize and down as one task pipeline, without barriers between them), and the SFT layer
  // calls ParallelFor several times per forward and backward; a futex wake-up per call and thread would
  // cost a large share of calls that short.
  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> busy_workers_{0};

  const std::function<void(size_t, int)>* fn_ = nullptr;
  size_t num_tasks_ = 0;
  std::atomic<size_t> next_task_{0};
};

}  // namespace kt

#endif  // KT_RUNTIME_THREAD_POOL_H_
