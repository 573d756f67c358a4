// Per-call cost of kt's serving runtime without CUDA: Submit of an empty task to the TaskQueue and the
// Sync that waits for it (a thread hand-off there and back), and, for scale, the same hand-off through a
// bare mutex + condition variable. The cost through a CUDA stream (cudaLaunchHostFunc both ways) is
// measured on the GPU host by cuda_stream_gpu_test (SubmitSyncOverheadPerCall) and tools/serving_bench.py.
//   bazel run -c opt //kt/runtime:task_queue_benchmark
#include <condition_variable>
#include <mutex>
#include <thread>

#include "absl/status/status.h"
#include "benchmark/benchmark.h"
#include "kt/runtime/task_queue.h"

namespace kt {
namespace {

void BM_SubmitSync(benchmark::State& state) {
  TaskQueue queue;
  QueuedTask empty("empty", [] { return absl::OkStatus(); });
  for (auto _ : state) {
    queue.Submit(&empty);
    if (!queue.Sync().ok()) state.SkipWithError("Sync failed");
  }
}
BENCHMARK(BM_SubmitSync)->UseRealTime();

// A layer's submit + sync with `n` tasks in flight (deferred experts queue two tasks per layer).
void BM_SubmitTwoSyncOne(benchmark::State& state) {
  TaskQueue queue;
  QueuedTask a("a", [] { return absl::OkStatus(); });
  QueuedTask b("b", [] { return absl::OkStatus(); });
  for (auto _ : state) {
    queue.Submit(&a);
    queue.Submit(&b);
    if (!queue.Sync(0).ok()) state.SkipWithError("Sync failed");
  }
}
BENCHMARK(BM_SubmitTwoSyncOne)->UseRealTime();

// The floor: one round trip to a waiting thread and back through a mutex and two condition variables.
void BM_BareHandOff(benchmark::State& state) {
  std::mutex mu;
  std::condition_variable to_worker, to_caller;
  bool work = false, done = false, stop = false;
  std::thread worker([&] {
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      to_worker.wait(lock, [&] { return work || stop; });
      if (stop) return;
      work = false;
      done = true;
      to_caller.notify_one();
    }
  });
  for (auto _ : state) {
    std::unique_lock<std::mutex> lock(mu);
    work = true;
    to_worker.notify_one();
    to_caller.wait(lock, [&] { return done; });
    done = false;
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    stop = true;
  }
  to_worker.notify_one();
  worker.join();
}
BENCHMARK(BM_BareHandOff)->UseRealTime();

}  // namespace
}  // namespace kt

BENCHMARK_MAIN();
