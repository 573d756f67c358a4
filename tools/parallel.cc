#include "tools/parallel.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace kt {
namespace tools {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<int> AllowedCpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
    }
  }
  return cpus;
}

void PinSelf(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

}  // namespace

int HardwareThreads() {
  const std::vector<int> cpus = AllowedCpus();
  if (!cpus.empty()) return static_cast<int>(cpus.size());
  return std::max(1u, std::thread::hardware_concurrency());
}

double RunOnThreads(int num_threads, bool pin, const std::function<void(int thread)>& fn) {
  num_threads = std::max(1, num_threads);
  const std::vector<int> cpus = pin ? AllowedCpus() : std::vector<int>();
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<Clock::time_point> end(num_threads);
  std::vector<std::thread> threads;
  threads.reserve(num_threads);
  for (int t = 0; t < num_threads; ++t) {
    threads.emplace_back([&, t] {
      if (!cpus.empty()) PinSelf(cpus[t % cpus.size()]);
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      fn(t);
      end[t] = Clock::now();
    });
  }
  while (ready.load() < num_threads) std::this_thread::yield();
  const Clock::time_point start = Clock::now();
  go.store(true, std::memory_order_release);
  for (std::thread& th : threads) th.join();
  Clock::time_point last = start;
  for (const Clock::time_point& e : end) last = std::max(last, e);
  return std::chrono::duration<double>(last - start).count();
}

}  // namespace tools
}  // namespace kt
