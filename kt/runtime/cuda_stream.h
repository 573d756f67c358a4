// Ordering kt's host tasks with work on a CUDA stream, without linking CUDA.
//
// SubmitWithCudaStream enqueues a host callback (cudaLaunchHostFunc) on the stream; when the stream
// reaches it (the GPU work submitted before it is done, e.g. the copy of the hidden states into pinned
// memory), the callback hands the task to the TaskQueue and returns at once, so the stream goes on with
// the work after it while the CPU computes. SyncWithCudaStream enqueues a callback that blocks the stream
// until the queue has at most n tasks pending, so the work submitted after it (the copy of kt's output
// back to the GPU) waits for the CPU result. Both are capturable in a CUDA graph, as host nodes that keep
// the task's address: replays run the same task object again.
//
// The CUDA runtime is found at run time (dlopen), so neither the build nor the wheel depends on CUDA: the
// process's already-loaded libcudart (PyTorch's) is used when there is one, else a libcudart on the
// library path, else the driver's cuLaunchHostFunc (libcuda.so.1). KT_CUDART=<path> names a library to
// use instead (the tests point it at a fake). A machine without any gets Unavailable, only when a stream
// is actually passed.
#ifndef KT_RUNTIME_CUDA_STREAM_H_
#define KT_RUNTIME_CUDA_STREAM_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/runtime/task_queue.h"

namespace kt {

// The library CUDA calls go to, e.g. "libcudart.so.12 (already loaded)"; Unavailable naming every
// library tried (and why each failed) when there is none.
absl::StatusOr<std::string> CudaRuntimeName();

// `stream` is a cudaStream_t as an integer (torch.cuda.Stream.cuda_stream; 0 is the legacy default
// stream). `task` must outlive every run (and every replay of a graph that captured this call).
absl::Status SubmitWithCudaStream(TaskQueue& queue, uintptr_t stream, QueuedTask* task);
// allow_n_pending in [0, TaskQueue::kMaxStreamWait]. A task's error cannot travel through the stream;
// it stays in the queue for its next Sync.
absl::Status SyncWithCudaStream(TaskQueue& queue, uintptr_t stream, int allow_n_pending);

}  // namespace kt

#endif  // KT_RUNTIME_CUDA_STREAM_H_
