// kt_kernel._kt's NUMA pieces: NodePools (one worker pool per NUMA sub-pool, pinned to its node) and
// TpMoeLayer (tensor parallelism along the intermediate dimension, one part per sub-pool, weights bound to
// the part's node). TpMoeLayer has MoeLayer's Python methods with a NodePools where MoeLayer takes a
// ThreadPool, so kt_kernel's wrappers and serving path use either unchanged (kt_kernel/utils/native.py).
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/layer_loader.h"
#include "kt/moe/tp_layer.h"
#include "kt/python/src/common.h"
#include "kt/runtime/numa.h"
#include "pybind11/pybind11.h"
#include "pybind11/stl.h"

namespace py = pybind11;

namespace kt {
namespace {

class PyTpMoeLayer {
 public:
  PyTpMoeLayer(int num_experts, int top_k, int hidden, int intermediate, int max_len, const std::string& isa_name,
               const std::string& format_name, int group_size, int tp, const std::vector<int>& numa_nodes,
               float swiglu_limit, float swiglu_alpha) {
    const absl::StatusOr<ExpertFormat> format = ParseExpertFormat(format_name);
    if (!format.ok()) throw py::value_error("TpMoeLayer: " + std::string(format.status().message()));
    const absl::StatusOr<Isa> isa = ResolveIsa(isa_name, GetCpuFeatures());
    if (!isa.ok()) ThrowStatus(isa.status());
    MoeConfig config;
    config.num_experts = num_experts;
    config.top_k = top_k;
    config.hidden = hidden;
    config.intermediate = intermediate;
    config.max_len = max_len;
    config.group_size = group_size;
    config.swiglu_limit = swiglu_limit;
    config.swiglu_alpha = swiglu_alpha;
    absl::StatusOr<std::unique_ptr<TpMoeLayer>> layer;
    {
      py::gil_scoped_release release;
      layer = TpMoeLayer::Create(config, *isa, *format, tp, numa_nodes);
    }
    if (!layer.ok()) ThrowStatus(layer.status());
    layer_ = std::move(*layer);
  }

  // Staged and swapped in like MoeLayer's loaders (bindings.cc): a failed load keeps the weights in use.
  template <typename LoadFn>
  void Staged(LoadFn load) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      absl::StatusOr<std::unique_ptr<TpMoeLayer>> staged = layer_->CreateStaging();
      status = staged.status();
      if (status.ok()) status = load(**staged);
      if (status.ok()) status = layer_->AdoptWeights(**staged);
    }
    if (!status.ok()) ThrowStatus(status);
  }

  void LoadWeights(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down, std::uintptr_t map,
                   NodePools& pools) {
    Staged([&](TpMoeLayer& staged) {
      return staged.LoadWeights(Ptr<const bf16_t>(gate), Ptr<const bf16_t>(up), Ptr<const bf16_t>(down),
                                Ptr<const int64_t>(map), pools.raw());
    });
  }

  void LoadWeightsFp8(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down, std::uintptr_t gate_scale,
                      std::uintptr_t up_scale, std::uintptr_t down_scale, std::uintptr_t map, NodePools& pools) {
    Staged([&](TpMoeLayer& staged) {
      const uint8_t* const codes[3] = {Ptr<const uint8_t>(gate), Ptr<const uint8_t>(up), Ptr<const uint8_t>(down)};
      const float* const scales[3] = {Ptr<const float>(gate_scale), Ptr<const float>(up_scale),
                                      Ptr<const float>(down_scale)};
      return LoadFp8Experts(staged, codes, scales, Ptr<const int64_t>(map), *pools.pools[0]);
    });
  }

  void LoadWeightsRawInt4(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down, std::uintptr_t gate_scale,
                          std::uintptr_t up_scale, std::uintptr_t down_scale, std::uintptr_t map, NodePools& pools) {
    Staged([&](TpMoeLayer& staged) {
      const uint8_t* const packed[3] = {Ptr<const uint8_t>(gate), Ptr<const uint8_t>(up), Ptr<const uint8_t>(down)};
      const uint16_t* const scales[3] = {Ptr<const uint16_t>(gate_scale), Ptr<const uint16_t>(up_scale),
                                         Ptr<const uint16_t>(down_scale)};
      return LoadRawInt4Experts(staged, packed, scales, Ptr<const int64_t>(map), *pools.pools[0]);
    });
  }

  void LoadWeightsCoded(const std::string& kind, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down,
                        std::uintptr_t gate_scale, std::uintptr_t up_scale, std::uintptr_t down_scale,
                        std::uintptr_t map, NodePools& pools) {
    const CodeScales scales_kind = ParseCodeScales(kind);
    Staged([&](TpMoeLayer& staged) {
      const uint8_t* const codes[3] = {Ptr<const uint8_t>(gate), Ptr<const uint8_t>(up), Ptr<const uint8_t>(down)};
      const void* const scales[3] = {Ptr<const void>(gate_scale), Ptr<const void>(up_scale),
                                     Ptr<const void>(down_scale)};
      return LoadCodedExperts(staged, scales_kind, codes, scales, Ptr<const int64_t>(map), *pools.pools[0]);
    });
  }

  py::dict LoadFromPath(const std::string& path, int layer, const std::string& method, int group_size,
                        std::uintptr_t map, NodePools& pools) {
    FolderLoadStats stats;
    Staged([&](TpMoeLayer& staged) {
      absl::StatusOr<FolderLoadStats> s =
          LoadLayerFromFolder(staged, path, layer, method, group_size, Ptr<const int64_t>(map), *pools.pools[0]);
      if (s.ok()) stats = *s;
      return s.status();
    });
    return LoadStatsDict(stats);
  }

  void Forward(NodePools& pools, int qlen, int k, std::uintptr_t ids, std::uintptr_t weights, std::uintptr_t input,
               std::uintptr_t output, std::uintptr_t mask) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      if (!layer_->loaded()) {
        status = ForwardBeforeLoadError();
      } else {
        MoeLayer::Output out;
        out.bf16 = Ptr<bf16_t>(output);
        status = layer_->Forward(pools.raw(), qlen, k, Ptr<const int64_t>(ids), Ptr<const float>(weights),
                                 Ptr<const bf16_t>(input), out, Ptr<const bool>(mask));
      }
    }
    if (!status.ok()) ThrowStatus(status);
  }

  TpMoeLayer& layer() { return *layer_; }

 private:
  std::unique_ptr<TpMoeLayer> layer_;
};

}  // namespace

void RegisterTpBindings(py::module_& m) {
  m.def("numa_available", &NumaAvailable, "Whether libnuma reports NUMA support (numa_available() >= 0).");
  m.def("numa_node_count", &NumaNodeCount, "NUMA nodes of this machine (0 where NUMA is unavailable).");

  py::class_<NodePools>(m, "NodePools",
                        "One worker pool per NUMA sub-pool, its workers pinned to its node's CPUs "
                        "(kt/runtime/numa.h).")
      .def(py::init([](int count, int threads, std::vector<int> numa_nodes) {
             absl::StatusOr<NodePools> pools = CreateNodePools(count, threads, numa_nodes);
             if (!pools.ok()) ThrowStatus(pools.status());
             return std::make_unique<NodePools>(std::move(*pools));
           }),
           py::arg("count"), py::arg("threads"), py::arg("numa_nodes"),
           "`count` pools sharing `threads` threads; numa_nodes: one node per pool, or [] for node i mod the "
           "node count (unpinned where NUMA is unavailable). ValueError naming cpuinfer_threads, "
           "threadpool_count or numa_nodes for a bad request.")
      .def_property_readonly("nodes", [](const NodePools& p) { return p.nodes; })
      .def_property_readonly("threads_per_pool",
                             [](const NodePools& p) {
                               std::vector<int> t;
                               for (const auto& pool : p.pools) t.push_back(pool->num_threads());
                               return t;
                             })
      .def_property_readonly("num_threads", [](const NodePools& p) {
        int t = 0;
        for (const auto& pool : p.pools) t += pool->num_threads();
        return t;
      });

  py::class_<PyTpMoeLayer>(m, "TpMoeLayer",
                           "MoeLayer split along the intermediate dimension into `tp` parts, one per NodePools "
                           "pool (kt/moe/tp_layer.h); the same methods as MoeLayer, with a NodePools.")
      .def(py::init<int, int, int, int, int, const std::string&, const std::string&, int, int,
                    const std::vector<int>&, float, float>(),
           py::arg("num_experts"), py::arg("top_k"), py::arg("hidden"), py::arg("intermediate"), py::arg("max_len"),
           py::arg("isa"), py::arg("format") = "bf16", py::arg("group_size") = 128, py::arg("tp") = 1,
           py::arg("numa_nodes") = std::vector<int>(), py::arg("swiglu_limit") = 0.0f,
           py::arg("swiglu_alpha") = 0.0f)
      .def("load_weights", &PyTpMoeLayer::LoadWeights, py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("physical_to_logical"), py::arg("pool"))
      .def("load_weights_fp8", &PyTpMoeLayer::LoadWeightsFp8, py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("gate_scale"), py::arg("up_scale"), py::arg("down_scale"), py::arg("physical_to_logical"),
           py::arg("pool"))
      .def("load_weights_rawint4", &PyTpMoeLayer::LoadWeightsRawInt4, py::arg("gate"), py::arg("up"),
           py::arg("down"), py::arg("gate_scale"), py::arg("up_scale"), py::arg("down_scale"),
           py::arg("physical_to_logical"), py::arg("pool"))
      .def("load_weights_coded", &PyTpMoeLayer::LoadWeightsCoded, py::arg("kind"), py::arg("gate"), py::arg("up"),
           py::arg("down"), py::arg("gate_scale"), py::arg("up_scale"), py::arg("down_scale"),
           py::arg("physical_to_logical"), py::arg("pool"))
      .def("load_from_path", &PyTpMoeLayer::LoadFromPath, py::arg("path"), py::arg("layer"), py::arg("method"),
           py::arg("group_size"), py::arg("physical_to_logical"), py::arg("pool"))
      .def("forward", &PyTpMoeLayer::Forward, py::arg("pool"), py::arg("qlen"), py::arg("k"), py::arg("ids"),
           py::arg("weights"), py::arg("input"), py::arg("output"), py::arg("gpu_experts_mask"))
      .def_property_readonly("loaded", [](PyTpMoeLayer& self) { return self.layer().loaded(); })
      .def_property_readonly("isa", [](PyTpMoeLayer& self) { return std::string(IsaName(self.layer().isa())); })
      .def_property_readonly("format",
                             [](PyTpMoeLayer& self) { return std::string(ExpertFormatName(self.layer().format())); })
      .def_property_readonly("group_size",
                             [](PyTpMoeLayer& self) {
                               return IsGroupExpertFormat(self.layer().format()) ? self.layer().config().group_size : 0;
                             })
      .def_property_readonly("weight_bytes", [](PyTpMoeLayer& self) { return self.layer().weight_bytes(); })
      .def_property_readonly("tp", [](PyTpMoeLayer& self) { return self.layer().tp(); })
      .def_property_readonly("numa_nodes", [](PyTpMoeLayer& self) { return self.layer().numa_nodes(); })
      // For ServingForward (serving_bindings.cc, with a NodePools as its pool): the C++ layer's address.
      .def_property_readonly("address",
                             [](PyTpMoeLayer& self) { return reinterpret_cast<std::uintptr_t>(&self.layer()); });
}

}  // namespace kt
