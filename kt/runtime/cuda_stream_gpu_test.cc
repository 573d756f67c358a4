// SubmitWithCudaStream / SyncWithCudaStream against the real CUDA runtime, on a machine with a GPU (the
// GPU host: tools/amx_host/run_tests.sh); skipped, saying why, where there is no CUDA runtime or device.
// The test reaches CUDA the way kt does, through dlopen, so the build needs no CUDA headers: the handful
// of entry points it uses are declared below with their C signatures (cudaStream_t, cudaGraph_t and
// cudaGraphExec_t are opaque pointers; enums are ints).
//
// What it checks: (1) the stream's work before the submit is visible to the CPU task, and the work after
// the sync sees the task's result; (2) a CUDA graph capturing that sequence replays it with values read at
// replay time (the batch size through a pointer, as a serving engine's graphs do), several times; (3) the
// per-call cost of submit + sync through a stream, printed (the goal lives in docs/PERFORMANCE.md).
#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kt/runtime/cuda_stream.h"
#include "kt/runtime/task_queue.h"

namespace kt {
namespace {

struct Cuda {
  int (*GetDeviceCount)(int*) = nullptr;
  int (*StreamCreate)(void**) = nullptr;
  int (*StreamDestroy)(void*) = nullptr;
  int (*StreamSynchronize)(void*) = nullptr;
  int (*Malloc)(void**, size_t) = nullptr;
  int (*Free)(void*) = nullptr;
  int (*HostAlloc)(void**, size_t, unsigned) = nullptr;
  int (*FreeHost)(void*) = nullptr;
  int (*MemcpyAsync)(void*, const void*, size_t, int, void*) = nullptr;
  int (*StreamBeginCapture)(void*, int) = nullptr;
  int (*StreamEndCapture)(void*, void**) = nullptr;
  int (*GraphInstantiateWithFlags)(void**, void*, unsigned long long) = nullptr;
  int (*GraphLaunch)(void*, void*) = nullptr;
  int (*GraphExecDestroy)(void*) = nullptr;
  int (*GraphDestroy)(void*) = nullptr;
  std::string skip;  // why the test cannot run here, or empty
};
constexpr int kHostToDevice = 1, kDeviceToHost = 2, kCaptureModeRelaxed = 2;

template <typename F>
bool Sym(void* h, const char* name, F& f, std::string& skip) {
  f = reinterpret_cast<F>(dlsym(h, name));
  if (f == nullptr && skip.empty()) skip = absl::StrCat("the CUDA runtime has no ", name);
  return f != nullptr;
}

const Cuda& GetCuda() {
  static const Cuda* cuda = [] {
    Cuda* c = new Cuda;
    void* h = nullptr;
    // KT_TEST_CUDART: the test's own runtime only, so kt's search (KT_CUDART, loaded, library path, the
    // driver API) can be exercised separately.
    const char* test_env = std::getenv("KT_TEST_CUDART");
    const char* kt_env = std::getenv("KT_CUDART");
    for (const char* name : {test_env, kt_env, "libcudart.so.13", "libcudart.so.12", "libcudart.so"}) {
      if (name != nullptr && *name != '\0' && (h = dlopen(name, RTLD_NOW | RTLD_LOCAL)) != nullptr) break;
    }
    if (h == nullptr) {
      c->skip = "no CUDA runtime (libcudart) on this machine; set KT_CUDART to run this test";
      return c;
    }
    std::string& s = c->skip;
    Sym(h, "cudaGetDeviceCount", c->GetDeviceCount, s);
    Sym(h, "cudaStreamCreate", c->StreamCreate, s);
    Sym(h, "cudaStreamDestroy", c->StreamDestroy, s);
    Sym(h, "cudaStreamSynchronize", c->StreamSynchronize, s);
    Sym(h, "cudaMalloc", c->Malloc, s);
    Sym(h, "cudaFree", c->Free, s);
    Sym(h, "cudaHostAlloc", c->HostAlloc, s);
    Sym(h, "cudaFreeHost", c->FreeHost, s);
    Sym(h, "cudaMemcpyAsync", c->MemcpyAsync, s);
    Sym(h, "cudaStreamBeginCapture", c->StreamBeginCapture, s);
    Sym(h, "cudaStreamEndCapture", c->StreamEndCapture, s);
    Sym(h, "cudaGraphInstantiateWithFlags", c->GraphInstantiateWithFlags, s);
    Sym(h, "cudaGraphLaunch", c->GraphLaunch, s);
    Sym(h, "cudaGraphExecDestroy", c->GraphExecDestroy, s);
    Sym(h, "cudaGraphDestroy", c->GraphDestroy, s);
    int devices = 0;
    if (s.empty() && (c->GetDeviceCount(&devices) != 0 || devices == 0)) s = "no CUDA device";
    return c;
  }();
  return *cuda;
}

#define CUDA_OK(call) ASSERT_EQ((call), 0) << #call

// One round trip: src (pinned) -> device -> in (pinned) on the stream; the CPU task computes
// out = 2 * in + *bsz; out -> device -> check (pinned). Everything in pinned memory is plain host memory
// to the task.
struct RoundTrip {
  static constexpr int kN = 4096;
  float *src = nullptr, *in = nullptr, *out = nullptr, *check = nullptr;
  int* bsz = nullptr;
  void *d_in = nullptr, *d_out = nullptr;
};

class CudaStreamGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!GetCuda().skip.empty()) GTEST_SKIP() << GetCuda().skip;
    const Cuda& c = GetCuda();
    ASSERT_EQ(c.StreamCreate(&stream_), 0);
    const size_t bytes = RoundTrip::kN * sizeof(float);
    for (float** p : {&rt_.src, &rt_.in, &rt_.out, &rt_.check}) {
      ASSERT_EQ(c.HostAlloc(reinterpret_cast<void**>(p), bytes, 0), 0);
    }
    ASSERT_EQ(c.HostAlloc(reinterpret_cast<void**>(&rt_.bsz), sizeof(int), 0), 0);
    ASSERT_EQ(c.Malloc(&rt_.d_in, bytes), 0);
    ASSERT_EQ(c.Malloc(&rt_.d_out, bytes), 0);
  }
  void TearDown() override {
    if (!GetCuda().skip.empty()) return;
    const Cuda& c = GetCuda();
    c.StreamSynchronize(stream_);
    for (float* p : {rt_.src, rt_.in, rt_.out, rt_.check}) c.FreeHost(p);
    c.FreeHost(rt_.bsz);
    c.Free(rt_.d_in);
    c.Free(rt_.d_out);
    c.StreamDestroy(stream_);
  }
  // Enqueues the round trip on the stream (also while capturing).
  void Enqueue(TaskQueue& queue, QueuedTask& task) {
    const Cuda& c = GetCuda();
    const size_t bytes = RoundTrip::kN * sizeof(float);
    const uintptr_t s = reinterpret_cast<uintptr_t>(stream_);
    CUDA_OK(c.MemcpyAsync(rt_.d_in, rt_.src, bytes, kHostToDevice, stream_));
    CUDA_OK(c.MemcpyAsync(rt_.in, rt_.d_in, bytes, kDeviceToHost, stream_));
    ASSERT_TRUE(SubmitWithCudaStream(queue, s, &task).ok());
    ASSERT_TRUE(SyncWithCudaStream(queue, s, 0).ok());
    CUDA_OK(c.MemcpyAsync(rt_.d_out, rt_.out, bytes, kHostToDevice, stream_));
    CUDA_OK(c.MemcpyAsync(rt_.check, rt_.d_out, bytes, kDeviceToHost, stream_));
  }
  QueuedTask MakeTask() {
    return QueuedTask("round trip", [this] {
      for (int i = 0; i < RoundTrip::kN; ++i) rt_.out[i] = 2 * rt_.in[i] + static_cast<float>(*rt_.bsz);
      return absl::OkStatus();
    });
  }
  void Fill(int round) {
    for (int i = 0; i < RoundTrip::kN; ++i) rt_.src[i] = static_cast<float>(i % 97 + round);
    *rt_.bsz = round;
  }
  void ExpectResult(int round) {
    for (int i = 0; i < RoundTrip::kN; ++i) {
      ASSERT_EQ(rt_.check[i], 2.0f * static_cast<float>(i % 97 + round) + round) << "i=" << i << " round=" << round;
    }
  }
  void* stream_ = nullptr;
  RoundTrip rt_;
};

TEST_F(CudaStreamGpuTest, StreamOrdersTheCpuTaskBothWays) {
  absl::StatusOr<std::string> name = CudaRuntimeName();
  ASSERT_TRUE(name.ok()) << name.status();
  std::printf("CUDA runtime: %s\n", name->c_str());
  TaskQueue queue;
  QueuedTask task = MakeTask();
  for (int round = 1; round <= 3; ++round) {
    Fill(round);
    Enqueue(queue, task);
    CUDA_OK(GetCuda().StreamSynchronize(stream_));
    ExpectResult(round);
  }
  EXPECT_TRUE(queue.Sync().ok());
  EXPECT_EQ(task.runs(), 3u);
}

TEST_F(CudaStreamGpuTest, CapturedGraphReplaysWithValuesReadAtReplay) {
  const Cuda& c = GetCuda();
  TaskQueue queue;
  QueuedTask task = MakeTask();
  Fill(0);
  void* graph = nullptr;
  void* exec = nullptr;
  CUDA_OK(c.StreamBeginCapture(stream_, kCaptureModeRelaxed));
  Enqueue(queue, task);
  CUDA_OK(c.StreamEndCapture(stream_, &graph));
  CUDA_OK(c.GraphInstantiateWithFlags(&exec, graph, 0));
  EXPECT_EQ(task.runs(), 0u);  // capturing runs nothing
  for (int round = 1; round <= 4; ++round) {
    Fill(round * 10);
    CUDA_OK(c.GraphLaunch(exec, stream_));
    CUDA_OK(c.StreamSynchronize(stream_));
    ExpectResult(round * 10);
  }
  EXPECT_EQ(task.runs(), 4u);
  EXPECT_TRUE(queue.Sync().ok());
  c.GraphExecDestroy(exec);
  c.GraphDestroy(graph);
}

TEST_F(CudaStreamGpuTest, SubmitSyncOverheadPerCall) {
  const Cuda& c = GetCuda();
  TaskQueue queue;
  QueuedTask empty("empty", [] { return absl::OkStatus(); });
  const uintptr_t s = reinterpret_cast<uintptr_t>(stream_);
  constexpr int kCalls = 2000;
  for (int i = 0; i < 100; ++i) {  // warm-up
    ASSERT_TRUE(SubmitWithCudaStream(queue, s, &empty).ok());
    ASSERT_TRUE(SyncWithCudaStream(queue, s, 0).ok());
  }
  CUDA_OK(c.StreamSynchronize(stream_));
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kCalls; ++i) {
    ASSERT_TRUE(SubmitWithCudaStream(queue, s, &empty).ok());
    ASSERT_TRUE(SyncWithCudaStream(queue, s, 0).ok());
  }
  CUDA_OK(c.StreamSynchronize(stream_));
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  std::printf("submit+sync through a CUDA stream: %.1f us per call (%d calls)\n", us / kCalls, kCalls);
  EXPECT_EQ(empty.runs(), static_cast<uint64_t>(kCalls + 100));
}

}  // namespace
}  // namespace kt
