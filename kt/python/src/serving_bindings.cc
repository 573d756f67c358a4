// kt_kernel._kt's serving runtime (issue 16): the process's task queue, a layer's forward as a queued task
// over fixed (pinned) buffers, the deferred-experts split, and the CUDA-stream bridge. Like the rest of the
// binding, tensors cross as addresses; kt_kernel/serving.py owns the buffers and keeps them (and the layer)
// alive for as long as a task holding their addresses exists, and holds every task it submits until the
// queue has run it (the queue keeps only its address).
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "kt/moe/gpu_expert_buffers.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/serving.h"
#include "kt/moe/tp_layer.h"
#include "kt/runtime/numa.h"
#include "kt/runtime/thread_pool.h"
#include "kt/python/src/common.h"
#include "kt/runtime/cuda_stream.h"
#include "kt/runtime/task_queue.h"
#include "pybind11/pybind11.h"
#include "pybind11/stl.h"

namespace py = pybind11;

namespace kt {
namespace {

void Check(const absl::Status& status) {
  if (!status.ok()) ThrowStatus(status);
}

// One expert written into per-GPU-TP-rank host buffers (kt/moe/gpu_expert_buffers.h), checked when made (so a
// bad argument raises at submit and nothing is written) and checked again when it runs.
void RegisterGpuExpertWrite(py::module_& m) {
  py::class_<GpuExpertWrite>(m, "GpuExpertWrite", py::dynamic_attr(),
                             "write_weight_scale_to_buffer of one expert, queued on a TaskQueue.")
      .def(py::init([](std::uintptr_t layer, ThreadPool& pool, int tp, int expert_id,
                       std::vector<std::uintptr_t> w13_weight,
                       std::vector<std::uintptr_t> w13_scale, std::vector<std::uintptr_t> w2_weight,
                       std::vector<std::uintptr_t> w2_scale) {
             GpuExpertBuffers b{std::move(w13_weight), std::move(w13_scale), std::move(w2_weight),
                                std::move(w2_scale)};
             const MoeLayer* moe = Ptr<const MoeLayer>(layer);
             Check(CheckGpuExpertWrite(moe->experts(), tp, expert_id, b));
             return std::make_unique<GpuExpertWrite>(moe, &pool, tp, expert_id, std::move(b), &ComputeMutex());
           }),
           py::arg("layer"), py::arg("pool"), py::arg("tp"), py::arg("expert_id"), py::arg("w13_weight_ptrs"),
           py::arg("w13_scale_ptrs"), py::arg("w2_weight_ptrs"), py::arg("w2_scale_ptrs"), py::keep_alive<1, 3>())
      .def(
          "run",
          [](GpuExpertWrite& self) {
            absl::Status s;
            {
              py::gil_scoped_release release;
              s = self.Run();
            }
            Check(s);
          },
          "Writes now (on the pool, under the compute lock), from the calling thread.")
      .def_property_readonly("runs", [](GpuExpertWrite& self) { return self.task()->runs(); });
}

// `layer` is a MoeLayer's address with a ThreadPool, or a TpMoeLayer's with a NodePools (tp_bindings.cc).
std::unique_ptr<LayerForward> MakeLayerForward(std::uintptr_t layer, const py::object& pool) {
  if (py::isinstance<NodePools>(pool)) {
    return std::make_unique<TpLayerForward>(Ptr<TpMoeLayer>(layer), pool.cast<NodePools&>().raw());
  }
  return std::make_unique<PooledLayerForward>(Ptr<MoeLayer>(layer), &pool.cast<ThreadPool&>());
}

}  // namespace

void RegisterServingBindings(py::module_& m) {
  RegisterGpuExpertWrite(m);
  // dynamic_attr: kt_kernel keeps the tensors a task points into on the task object itself.
  py::class_<ServingForward>(m, "ServingForward", py::dynamic_attr(),
                             "One layer's forward over fixed buffers, queued on a TaskQueue (kt/moe/serving.h).")
      .def(py::init([](std::uintptr_t layer, py::object pool, std::uintptr_t batch_size, int capacity, int k,
                       std::uintptr_t ids, bool ids_int32, std::uintptr_t weights, std::uintptr_t input,
                       std::uintptr_t output, std::uintptr_t gpu_experts_mask, bool accumulate,
                       int max_deferred, std::uintptr_t deferred_ids, int chunk) {
             ServingBuffers b;
             b.batch_size = Ptr<const int32_t>(batch_size);
             b.capacity = capacity;
             b.k = k;
             b.ids = Ptr<const void>(ids);
             b.ids_int32 = ids_int32;
             b.weights = Ptr<const float>(weights);
             b.input = Ptr<const bf16_t>(input);
             b.output = Ptr<bf16_t>(output);
             b.gpu_experts_mask = Ptr<const bool>(gpu_experts_mask);
             b.accumulate = accumulate;
             b.max_deferred = max_deferred;
             b.deferred_ids = Ptr<int64_t>(deferred_ids);
             absl::StatusOr<std::unique_ptr<ServingForward>> f =
                 ServingForward::Create(MakeLayerForward(layer, pool), b, chunk, &ComputeMutex());
             Check(f.status());
             return std::move(*f);
           }),
           py::arg("layer"), py::arg("pool"), py::arg("batch_size"), py::arg("capacity"), py::arg("k"),
           py::arg("ids"), py::arg("ids_int32"), py::arg("weights"), py::arg("input"), py::arg("output"),
           py::arg("gpu_experts_mask"), py::arg("accumulate"), py::arg("max_deferred"), py::arg("deferred_ids"),
           py::arg("chunk"), py::keep_alive<1, 3>())
      .def(
          "run",
          [](ServingForward& self) {
            absl::Status s;
            {
              py::gil_scoped_release release;
              s = self.Run();
            }
            Check(s);
          },
          "Runs the forward now on the calling thread.")
      .def_property_readonly("runs", [](ServingForward& self) { return self.task()->runs(); });

  py::class_<TaskQueue>(m, "TaskQueue", "Host tasks run in order by one dedicated thread (kt/runtime/task_queue.h).")
      .def(py::init<>())
      .def(
          "submit", [](TaskQueue& q, ServingForward& f) { q.Submit(f.task()); }, py::arg("task"))
      .def(
          "submit", [](TaskQueue& q, GpuExpertWrite& w) { q.Submit(w.task()); }, py::arg("task"))
      .def(
          "sync",
          [](TaskQueue& q, int allow_n_pending) {
            absl::Status s;
            {
              py::gil_scoped_release release;
              s = q.Sync(allow_n_pending);
            }
            Check(s);
          },
          py::arg("allow_n_pending") = 0,
          "Waits until at most allow_n_pending tasks are pending; raises the first error of a task since the "
          "last sync.")
      .def(
          "poll_error", [](TaskQueue& q) { Check(q.PollError()); },
          "Raises the first error of a task since the last sync or poll, without waiting.")
      .def(
          "submit_with_cuda_stream",
          [](TaskQueue& q, std::uintptr_t stream, ServingForward& f) {
            Check(SubmitWithCudaStream(q, stream, f.task()));
          },
          py::arg("cuda_stream"), py::arg("task"))
      .def(
          "sync_with_cuda_stream",
          [](TaskQueue& q, std::uintptr_t stream, int allow_n_pending) {
            Check(SyncWithCudaStream(q, stream, allow_n_pending));
          },
          py::arg("cuda_stream"), py::arg("allow_n_pending") = 0)
      .def_property_readonly("pending", &TaskQueue::pending);

  m.def(
      "split_deferred_experts",
      [](std::uintptr_t ids, bool ids_int32, std::uintptr_t weights, int qlen, int k, int num_experts,
         int max_deferred, std::uintptr_t immediate_ids, std::uintptr_t deferred_ids) {
        Check(SplitDeferredExperts(Ptr<const void>(ids), ids_int32, Ptr<const float>(weights), qlen, k,
                                   num_experts, max_deferred, Ptr<int64_t>(immediate_ids),
                                   Ptr<int64_t>(deferred_ids)));
      },
      py::arg("ids"), py::arg("ids_int32"), py::arg("weights"), py::arg("qlen"), py::arg("k"),
      py::arg("num_experts"), py::arg("max_deferred"), py::arg("immediate_ids"), py::arg("deferred_ids"));

  m.def(
      "cuda_runtime_name",
      []() {
        absl::StatusOr<std::string> name = CudaRuntimeName();
        Check(name.status());
        return *name;
      },
      "The CUDA runtime kt's stream calls go to (loaded on first use); OSError where there is none.");
}

}  // namespace kt
