#include "kt/runtime/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <chrono>

namespace kt {
namespace {

// The CPUs this process may run on (cgroup/taskset aware), in order.
std::vector<int> AllowedCpus() {
  std::vector<int> cpus;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &allowed)) cpus.push_back(cpu);
  }
  return cpus;
}

void SetCurrentThreadCpus(const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int cpu : cpus) {
    if (cpu >= 0 && cpu < CPU_SETSIZE) CPU_SET(cpu, &set);
  }
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

void PinCurrentThread(int cpu) { SetCurrentThreadCpus({cpu}); }

}  // namespace

std::vector<int> CurrentThreadCpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (pthread_getaffinity_np(pthread_self(), sizeof(set), &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  }
  return cpus;
}

ScopedCpuAffinity::ScopedCpuAffinity(const std::vector<int>& cpus) {
  if (cpus.empty()) return;
  saved_ = CurrentThreadCpus();
  SetCurrentThreadCpus(cpus);
  active_ = true;
}

ScopedCpuAffinity::~ScopedCpuAffinity() {
  if (active_ && !saved_.empty()) SetCurrentThreadCpus(saved_);
}

ThreadPool::ThreadPool(const ThreadPoolOptions& options)
    : num_threads_(options.num_threads < 1 ? 1 : options.num_threads), cpu_set_(options.cpu_set) {
  // Read the allowed CPUs before pinning anything: a pinned caller's mask would be inherited by the workers.
  const bool pin_one = options.pin && cpu_set_.empty();
  const std::vector<int> cpus = pin_one ? AllowedCpus() : std::vector<int>();
  for (int t = 1; t < num_threads_; ++t) {
    const int cpu = cpus.empty() ? -1 : cpus[t % cpus.size()];
    workers_.emplace_back([this, t, cpu] {
      if (cpu >= 0) PinCurrentThread(cpu);
      if (!cpu_set_.empty()) SetCurrentThreadCpus(cpu_set_);
      WorkerLoop(t);
    });
  }
  // The caller is thread 0 of every ParallelFor; pinning it is part of the option (documented in the header).
  if (!cpus.empty()) PinCurrentThread(cpus[0]);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

namespace {

// How long an idle thread spins before sleeping: longer than the gap between the phases of one MoE
// forward, short enough that a pool between layers does not hold cores for long.
constexpr auto kSpin = std::chrono::microseconds(200);

// Spins until pred() or kSpin elapsed; returns pred().
template <typename Pred>
bool SpinUntil(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 0;; ++i) {
    if (pred()) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
    if ((i & 255) == 255 && std::chrono::steady_clock::now() > deadline) return pred();
  }
}

}  // namespace

void ThreadPool::RunTasks(int thread) {
  const auto& fn = *fn_;
  for (;;) {
    const size_t task = next_task_.fetch_add(1, std::memory_order_relaxed);
    if (task >= num_tasks_) return;
    fn(task, thread);
  }
}

void ThreadPool::WorkerLoop(int thread) {
  uint64_t seen = 0;
  for (;;) {
    auto fresh = [&] {
      return stop_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen;
    };
    if (!SpinUntil(fresh)) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, fresh);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = generation_.load(std::memory_order_acquire);
    RunTasks(thread);
    if (busy_workers_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      // Under the lock, so a caller between its check and its wait cannot miss this.
      std::lock_guard<std::mutex> lock(mu_);
      done_.notify_one();
    }
  }
}

void ThreadPool::ParallelFor(size_t num_tasks, const std::function<void(size_t, int)>& fn) {
  if (num_tasks == 0) return;
  if (num_threads_ == 1 || num_tasks == 1) {
    for (size_t t = 0; t < num_tasks; ++t) fn(t, 0);
    return;
  }
  fn_ = &fn;
  num_tasks_ = num_tasks;
  next_task_.store(0, std::memory_order_relaxed);
  busy_workers_.store(num_threads_ - 1, std::memory_order_relaxed);
  {
    // Under the lock, so a worker between its check and its wait cannot miss the new generation.
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  RunTasks(0);
  auto done = [&] { return busy_workers_.load(std::memory_order_acquire) == 0; };
  if (!SpinUntil(done)) {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, done);
  }
  fn_ = nullptr;
}

}  // namespace kt
