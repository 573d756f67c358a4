// cuda_stream.cc's ordering against a fake CUDA runtime (fake_cudart.cc: one worker thread per stream
// running what was launched on it in order). The real runtime is exercised on the GPU host
// (kt/python/tests/cuda_stream_test.py).
#include "kt/runtime/cuda_stream.h"

#include <dlfcn.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kt/runtime/task_queue.h"

namespace kt {
namespace {

using SleepFn = void (*)(void*, int);
using SyncFn = void (*)(void*);
using LaunchFn = int (*)(void*, void (*)(void*), void*);

// What a host node launched by the test itself does: copy *from (or true) into *to.
struct CopyFlag {
  std::atomic<bool>* to;
  const std::atomic<bool>* from;
};
void RunCopyFlag(void* data) {
  CopyFlag* c = static_cast<CopyFlag*>(data);
  c->to->store(c->from != nullptr ? c->from->load() : true);
}

std::string FakeRuntimePath() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  return absl::StrCat(srcdir != nullptr ? srcdir : ".", "/", workspace != nullptr ? workspace : "kt",
                      "/kt/runtime/libfake_cudart.so");
}

class CudaStreamTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string path = FakeRuntimePath();
    setenv("KT_CUDART", path.c_str(), 1);
    // The same library kt will load (dlopen returns the one already mapped for the same path).
    handle_ = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    ASSERT_NE(handle_, nullptr) << dlerror();
    sleep_ = reinterpret_cast<SleepFn>(dlsym(handle_, "fake_cuda_launch_sleep"));
    sync_ = reinterpret_cast<SyncFn>(dlsym(handle_, "fake_cuda_stream_synchronize"));
    launch_ = reinterpret_cast<LaunchFn>(dlsym(handle_, "cudaLaunchHostFunc"));
    ASSERT_NE(launch_, nullptr);
    ASSERT_NE(sleep_, nullptr);
    ASSERT_NE(sync_, nullptr);
  }
  // Launches, on the fake stream, a host node setting `to` (to *from, or to true).
  static int LaunchSet(void* stream, CopyFlag& c) { return launch_(stream, &RunCopyFlag, &c); }
  static void* handle_;
  static LaunchFn launch_;
  static SleepFn sleep_;
  static SyncFn sync_;
};
void* CudaStreamTest::handle_ = nullptr;
LaunchFn CudaStreamTest::launch_ = nullptr;
SleepFn CudaStreamTest::sleep_ = nullptr;
SyncFn CudaStreamTest::sync_ = nullptr;

TEST_F(CudaStreamTest, LoadsTheNamedRuntime) {
  absl::StatusOr<std::string> name = CudaRuntimeName();
  ASSERT_TRUE(name.ok()) << name.status();
  EXPECT_NE(name->find("KT_CUDART"), std::string::npos) << *name;
}

TEST_F(CudaStreamTest, TaskStartsOnlyAfterEarlierStreamWork) {
  TaskQueue queue;
  void* stream = reinterpret_cast<void*>(0x1000);
  std::atomic<bool> gpu_done{false};
  std::atomic<bool> saw_gpu_done{false};
  QueuedTask task("moe", [&] {
    saw_gpu_done = gpu_done.load();
    return absl::OkStatus();
  });
  // "GPU work" of 30 ms, then a marker, then the submit: the task must see the marker.
  sleep_(stream, 30000);
  CopyFlag marker{&gpu_done, nullptr};
  ASSERT_EQ(LaunchSet(stream, marker), 0);
  ASSERT_TRUE(SubmitWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), &task).ok());
  // Nothing ran yet on the host side: the submit waits for the stream.
  EXPECT_EQ(task.runs(), 0u);
  ASSERT_TRUE(SyncWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), 0).ok());
  sync_(stream);  // the stream passed the sync point, so the task has finished
  EXPECT_EQ(task.runs(), 1u);
  EXPECT_TRUE(saw_gpu_done.load());
  EXPECT_TRUE(queue.Sync().ok());
}

TEST_F(CudaStreamTest, StreamWaitsForTheCpuTask) {
  TaskQueue queue;
  void* stream = reinterpret_cast<void*>(0x2000);
  std::atomic<bool> cpu_done{false};
  std::atomic<bool> after_saw_cpu_done{false};
  QueuedTask task("slow cpu", [&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    cpu_done = true;
    return absl::OkStatus();
  });
  ASSERT_TRUE(SubmitWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), &task).ok());
  ASSERT_TRUE(SyncWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), 0).ok());
  // Work after the sync point (the copy of kt's output to the GPU) must see the CPU result.
  CopyFlag after{&after_saw_cpu_done, &cpu_done};
  ASSERT_EQ(LaunchSet(stream, after), 0);
  sync_(stream);
  EXPECT_TRUE(after_saw_cpu_done.load());
}

TEST_F(CudaStreamTest, ReplayedTaskRunsEachTime) {
  TaskQueue queue;
  void* stream = reinterpret_cast<void*>(0x3000);
  int value = 0;
  int seen_sum = 0;
  QueuedTask task("replayed", [&] {
    seen_sum += value;  // a per-call value read through memory at run time, as a graph replay needs
    return absl::OkStatus();
  });
  for (int i = 1; i <= 5; ++i) {
    value = i;
    ASSERT_TRUE(SubmitWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), &task).ok());
    ASSERT_TRUE(SyncWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), 0).ok());
    sync_(stream);
  }
  EXPECT_EQ(task.runs(), 5u);
  EXPECT_EQ(seen_sum, 15);
}

TEST_F(CudaStreamTest, TaskErrorReachesTheHostSync) {
  TaskQueue queue;
  void* stream = reinterpret_cast<void*>(0x4000);
  QueuedTask task("failing layer", [] { return absl::InvalidArgumentError("bad ids"); });
  ASSERT_TRUE(SubmitWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), &task).ok());
  ASSERT_TRUE(SyncWithCudaStream(queue, reinterpret_cast<uintptr_t>(stream), 0).ok());
  sync_(stream);
  absl::Status s = queue.Sync();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("failing layer"), absl::string_view::npos) << s;
}

TEST_F(CudaStreamTest, LaunchFailureNamesTheStreamAndError) {
  TaskQueue queue;
  QueuedTask task("t", [] { return absl::OkStatus(); });
  absl::Status s = SubmitWithCudaStream(queue, 0xbad, &task);
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_NE(s.message().find("0xbad"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("invalid resource handle"), absl::string_view::npos) << s;
  EXPECT_EQ(task.runs(), 0u);
}

TEST_F(CudaStreamTest, SyncCountOutOfRangeIsInvalid) {
  TaskQueue queue;
  absl::Status s = SyncWithCudaStream(queue, 0x1000, TaskQueue::kMaxStreamWait + 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("allow_n_pending"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace kt
