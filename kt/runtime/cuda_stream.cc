#include "kt/runtime/cuda_stream.h"

#include <dlfcn.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace kt {
namespace {

// The two entry points kt needs have the same shape in the runtime and the driver API:
//   cudaError_t cudaLaunchHostFunc(cudaStream_t, cudaHostFn_t, void*)
//   CUresult    cuLaunchHostFunc(CUstream, CUhostFn, void*)
// (a cudaStream_t is a CUstream; both error types are C enums, 0 meaning success).
using HostFn = void (*)(void*);
using LaunchHostFn = int (*)(void* stream, HostFn fn, void* data);
using RuntimeErrorString = const char* (*)(int error);                // cudaGetErrorString
using DriverErrorString = int (*)(int error, const char** message);  // cuGetErrorString

struct CudaApi {
  std::string name;  // empty when none was found
  LaunchHostFn launch = nullptr;
  RuntimeErrorString runtime_error = nullptr;
  DriverErrorString driver_error = nullptr;
  absl::Status status;

  std::string ErrorString(int code) const {
    const char* message = nullptr;
    if (runtime_error != nullptr) message = runtime_error(code);
    if (driver_error != nullptr && driver_error(code, &message) != 0) message = nullptr;
    return absl::StrCat("error ", code, message != nullptr ? absl::StrCat(" (", message, ")") : "");
  }
};

// Binds `api` to the library `handle` holds; false (with `why`) if it lacks the entry point.
bool Bind(void* handle, bool driver, CudaApi& api, std::string& why) {
  const char* launch = driver ? "cuLaunchHostFunc" : "cudaLaunchHostFunc";
  api.launch = reinterpret_cast<LaunchHostFn>(dlsym(handle, launch));
  if (api.launch == nullptr) {
    why = absl::StrCat("no ", launch);
    return false;
  }
  if (driver) {
    api.driver_error = reinterpret_cast<DriverErrorString>(dlsym(handle, "cuGetErrorString"));
  } else {
    api.runtime_error = reinterpret_cast<RuntimeErrorString>(dlsym(handle, "cudaGetErrorString"));
  }
  return true;
}

CudaApi Load() {
  CudaApi api;
  std::vector<std::string> tried;
  // Opens `name` with `flags` and binds it; the handle is kept for the life of the process.
  auto attempt = [&](const std::string& name, int flags, bool driver, const char* note) {
    void* handle = dlopen(name.c_str(), flags);
    if (handle == nullptr) {
      const char* err = dlerror();
      tried.push_back(absl::StrCat(name, note, ": ", err != nullptr ? err : "not found"));
      return false;
    }
    std::string why;
    if (!Bind(handle, driver, api, why)) {
      tried.push_back(absl::StrCat(name, note, ": ", why));
      dlclose(handle);
      return false;
    }
    api.name = absl::StrCat(name, note);
    return true;
  };
  if (const char* path = std::getenv("KT_CUDART"); path != nullptr && *path != '\0') {
    // A library the user named is the only one tried: falling back would hide their mistake.
    if (attempt(path, RTLD_NOW | RTLD_LOCAL, false, " (KT_CUDART)")) return api;
    api.status = absl::UnavailableError(absl::StrCat("KT_CUDART=", path, " is not a usable CUDA runtime: ",
                                                     absl::StrJoin(tried, "; ")));
    return api;
  }
  const std::vector<std::string> runtimes = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                                             "libcudart.so"};
  // The runtime PyTorch (or the engine) already loaded first: its streams, its context.
  for (const std::string& name : runtimes) {
    if (attempt(name, RTLD_NOW | RTLD_NOLOAD, false, " (already loaded)")) return api;
  }
  tried.clear();  // "not loaded" is expected; say only why the real attempts failed
  for (const std::string& name : runtimes) {
    if (attempt(name, RTLD_NOW | RTLD_LOCAL, false, "")) return api;
  }
  if (attempt("libcuda.so.1", RTLD_NOW | RTLD_LOCAL, true, " (driver API)")) return api;
  api.status = absl::UnavailableError(absl::StrCat(
      "a CUDA stream was passed but no CUDA runtime could be loaded (tried ", absl::StrJoin(tried, "; "),
      "); on a machine without CUDA pass cuda_stream=None, or set KT_CUDART to the libcudart to use"));
  return api;
}

const CudaApi& Api() {
  static const CudaApi* api = new CudaApi(Load());
  return *api;
}

}  // namespace

// Friend of QueuedTask: the callbacks the stream runs.
struct CudaStreamBridge {
  static void SubmitCallback(void* data) {
    QueuedTask* task = static_cast<QueuedTask*>(data);
    task->stream_queue_->Submit(task);
  }
  static void WaitCallback(void* data) {
    const TaskQueue::StreamWait* wait = static_cast<const TaskQueue::StreamWait*>(data);
    wait->queue->WaitPending(wait->allow_n_pending);
  }
  static void SetQueue(QueuedTask* task, TaskQueue* queue) { task->stream_queue_ = queue; }
};

absl::StatusOr<std::string> CudaRuntimeName() {
  const CudaApi& api = Api();
  if (!api.status.ok()) return api.status;
  return api.name;
}

absl::Status SubmitWithCudaStream(TaskQueue& queue, uintptr_t stream, QueuedTask* task) {
  const CudaApi& api = Api();
  if (!api.status.ok()) return api.status;
  CudaStreamBridge::SetQueue(task, &queue);
  const int err = api.launch(reinterpret_cast<void*>(stream), &CudaStreamBridge::SubmitCallback, task);
  if (err != 0) {
    return absl::InternalError(absl::StrCat("submit_with_cuda_stream: cudaLaunchHostFunc on stream 0x",
                                            absl::Hex(stream), " failed with ", api.ErrorString(err)));
  }
  return absl::OkStatus();
}

absl::Status SyncWithCudaStream(TaskQueue& queue, uintptr_t stream, int allow_n_pending) {
  if (allow_n_pending < 0 || allow_n_pending > TaskQueue::kMaxStreamWait) {
    return absl::InvalidArgumentError(absl::StrCat("sync_with_cuda_stream: allow_n_pending must be in [0, ",
                                                   TaskQueue::kMaxStreamWait, "], got ", allow_n_pending));
  }
  const CudaApi& api = Api();
  if (!api.status.ok()) return api.status;
  const int err = api.launch(reinterpret_cast<void*>(stream), &CudaStreamBridge::WaitCallback,
                             queue.stream_wait(allow_n_pending));
  if (err != 0) {
    return absl::InternalError(absl::StrCat("sync_with_cuda_stream: cudaLaunchHostFunc on stream 0x",
                                            absl::Hex(stream), " failed with ", api.ErrorString(err)));
  }
  return absl::OkStatus();
}

}  // namespace kt
