// _kt's SFT classes: SftMoeLayer (forward with cache, backward with LoRA gradients), SftBackwardWeights
// (transposed base weights, shareable by layers), SftWorkspace (working memory, shareable) and
// SftCachePool (activation caches shared by layers under recomputation). Same
// conventions as bindings.cc: tensors cross as data_ptr() addresses, kt_kernel.sft validates them, every
// compute call holds ComputeMutex with the GIL released.
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/io/layer_experts.h"
#include "kt/io/method.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
#include "kt/python/src/common.h"
#include "kt/runtime/thread_pool.h"
#include "kt/sft/sft_layer.h"
#include "pybind11/pybind11.h"

namespace py = pybind11;

namespace kt {
namespace {

Isa IsaOf(const std::string& name) {
  absl::StatusOr<Isa> isa = ResolveIsa(name, GetCpuFeatures());
  if (!isa.ok()) ThrowStatus(isa.status());
  return *isa;
}

// The base formats SFT runs on: every MoeLayer format (ExpertFormatName's spelling: bf16, int8, int4,
// int4_asym, int4_group_sym, int4_group_asym); ValueError listing them otherwise.
ExpertFormat FormatOf(const std::string& name) {
  absl::StatusOr<ExpertFormat> f = ParseExpertFormat(name);
  if (!f.ok()) throw py::value_error("SFT base format: " + std::string(f.status().message()));
  return *f;
}

MoeConfig Shape(int num_experts, int top_k, int hidden, int intermediate, int max_len, int group_size) {
  MoeConfig c;
  c.group_size = group_size;  // read by the int4 group formats only
  c.num_experts = num_experts;
  c.top_k = top_k;
  c.hidden = hidden;
  c.intermediate = intermediate;
  c.max_len = max_len;
  return c;
}

class PySftLayer {
 public:
  PySftLayer(int num_experts, int top_k, int hidden, int intermediate, int max_len, int lora_rank,
             float lora_alpha, int max_cache_depth, bool skip_lora, const std::string& isa,
             const std::string& format, int group_size, std::shared_ptr<SftBackwardWeights> backward_weights,
             std::shared_ptr<SftWorkspace> workspace, std::shared_ptr<SftCachePool> cache_pool, int layer_idx) {
    SftConfig c;
    c.moe = Shape(num_experts, top_k, hidden, intermediate, max_len, group_size);
    c.lora_rank = lora_rank;
    c.lora_alpha = lora_alpha;
    c.max_cache_depth = max_cache_depth;
    c.skip_lora = skip_lora;
    c.layer_idx = layer_idx;
    absl::StatusOr<std::unique_ptr<SftMoeLayer>> l = SftMoeLayer::Create(
        c, IsaOf(isa), FormatOf(format), std::move(backward_weights), std::move(workspace), std::move(cache_pool));
    if (!l.ok()) ThrowStatus(l.status());
    layer_ = std::move(*l);
  }

  template <typename Fn>
  void Run(Fn&& fn) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      status = fn();
    }
    if (!status.ok()) ThrowStatus(status);
  }

  SftMoeLayer& layer() { return *layer_; }
  const SftMoeLayer& layer() const { return *layer_; }

 private:
  std::unique_ptr<SftMoeLayer> layer_;
};

// The objects several layers may share: transposed weights, the workspace and the cache pool.
void RegisterSharedSftObjects(py::module_& m) {
  py::class_<SftBackwardWeights, std::shared_ptr<SftBackwardWeights>>(
      m, "SftBackwardWeights",
      "Transposed base weights for SFT backward; one object may be shared by all layers of one shape "
      "(share_backward_bb): it is rebuilt from the forward weights of whichever layer runs backward.")
      .def(py::init([](int num_experts, int hidden, int intermediate, const std::string& isa,
                       const std::string& format, int group_size) {
             absl::StatusOr<std::shared_ptr<SftBackwardWeights>> w = SftBackwardWeights::Create(
                 Shape(num_experts, 1, hidden, intermediate, 1, group_size), IsaOf(isa), FormatOf(format));
             if (!w.ok()) ThrowStatus(w.status());
             return *w;
           }),
           py::arg("num_experts"), py::arg("hidden"), py::arg("intermediate"), py::arg("isa"),
           py::arg("format"), py::arg("group_size") = 128)
      .def_property_readonly("bytes", &SftBackwardWeights::bytes);

  py::class_<SftWorkspace, std::shared_ptr<SftWorkspace>>(
      m, "SftWorkspace", "Working memory of SFT forward/backward, shareable by all layers (grow-only).")
      .def(py::init<>())
      .def_property_readonly("bytes", &SftWorkspace::bytes);

  py::class_<SftCachePool, std::shared_ptr<SftCachePool>>(
      m, "SftCachePool",
      "Activation caches shared by layers (share_cache_pool): at most max_cache_depth cached forwards for "
      "all layers together; valid only when one layer's caches are alive at a time (recomputation).")
      .def(py::init([](int max_cache_depth) {
             absl::StatusOr<std::shared_ptr<SftCachePool>> p = SftCachePool::Create(max_cache_depth);
             if (!p.ok()) ThrowStatus(p.status());
             return *p;
           }),
           py::arg("max_cache_depth"))
      .def_property_readonly("max_cache_depth", &SftCachePool::max_cache_depth)
      .def_property_readonly("live", &SftCachePool::live)
      .def_property_readonly("bytes", &SftCachePool::bytes);
}

// Canonical bf16 expert weights of MoE layer `layer` of a folder (Hugging Face, or `kt convert` with a bf16
// method) into caller-owned arrays: gate and up [E, I, H], down [E, H, I]. SFT packs its own formats from
// bf16 (a quantized base is quantized at load, its transposed backward copy from the same bf16), so a
// folder converted to a quantized layout cannot serve: LayerExperts::Open names the layout it holds.
// Returns (E, H, I) read; a shape of -1 takes the folder's, else the folder must match it.
py::tuple ReadLayerBf16(const std::string& dir, int layer, int num_experts, int hidden, int intermediate,
                        std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down) {
  absl::StatusOr<MethodLayout> bf16 = LayoutOfMethod("BF16");
  if (!bf16.ok()) ThrowStatus(bf16.status());  // with the GIL: ThrowStatus makes a Python exception
  absl::Status status;
  int e = 0, h = 0, i = 0;
  {
    py::gil_scoped_release release;
    LayerRequest want;
    want.layer = layer;
    want.num_experts = num_experts;
    want.hidden = hidden;
    want.intermediate = intermediate;
    want.method = *bf16;
    absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
    if (!le.ok()) {
      status = le.status();
    } else {
      const LayerExperts& x = **le;
      e = x.num_experts(), h = x.hidden(), i = x.intermediate();
      for (size_t t = 0; status.ok() && t < x.num_verify_tasks(); ++t) status = x.Verify(t);
      if (gate != 0) {
        const size_t ih = static_cast<size_t>(i) * h;
        for (int ex = 0; status.ok() && ex < e; ++ex) {
          status = x.ReadBf16(ex, ExpertMatrix::kGate, Ptr<bf16_t>(gate) + ex * ih);
          if (status.ok()) status = x.ReadBf16(ex, ExpertMatrix::kUp, Ptr<bf16_t>(up) + ex * ih);
          if (status.ok()) status = x.ReadBf16(ex, ExpertMatrix::kDown, Ptr<bf16_t>(down) + ex * ih);
        }
      }
    }
  }
  if (!status.ok()) ThrowStatus(status);
  return py::make_tuple(e, h, i);
}

// The rebuild schedule of shared backward weights and where the last calls' time went (SftTimes).
py::class_<PySftLayer>& AddSftTimingBindings(py::class_<PySftLayer>& layer) {
  return layer
      .def_property(
          "overlapped_rebuild", [](const PySftLayer& s) { return s.layer().overlapped_rebuild(); },
          [](PySftLayer& s, bool on) {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(ComputeMutex());
            s.layer().set_overlapped_rebuild(on);
          },
          "Whether Backward rebuilds shared backward weights inside its task list (True, the default) or as "
          "a phase of its own before it (False; the same bits, kept to compare against).")
      .def(
          "last_times",
          [](const PySftLayer& s) {
            SftTimes t;
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(ComputeMutex());
              t = s.layer().last_times();
            }
            py::dict d;
            d["forward"] = t.forward;
            d["backward"] = t.backward;
            d["rebuild"] = t.rebuild;
            d["rebuild_overlapped"] = t.rebuild_overlapped;
            d["grad_y"] = t.grad_y;
            d["grad_gate_up"] = t.grad_gate_up;
            d["prepare"] = t.prepare;
            d["grad_x"] = t.grad_x;
            d["lora_grads"] = t.lora_grads;
            d["wait"] = t.wait;
            d["sum"] = t.sum;
            return d;
          },
          "Seconds of the last forward and backward and of the backward's parts (SftTimes in sft_layer.h: "
          "wall seconds, the task kinds as their share of the backward's wall time).");
}

}  // namespace

void RegisterSftBindings(py::module_& m) {
  m.def("read_layer_experts_bf16", &ReadLayerBf16, py::arg("path"), py::arg("layer"), py::arg("num_experts"),
        py::arg("hidden"), py::arg("intermediate"), py::arg("gate"), py::arg("up"), py::arg("down"),
        "Reads MoE layer `layer`'s experts from a Hugging Face folder or a bf16 kt convert folder (checksums "
        "verified) as canonical bf16 into gate/up [E, I, H] and down [E, H, I] (addresses; 0 for gate: only "
        "open and check). Shapes of -1 take the folder's. Returns (E, H, I). ValueError for a shape or layout "
        "mismatch, OSError for a missing or corrupt file.");
  RegisterSharedSftObjects(m);
  py::class_<PySftLayer> layer(m, "SftMoeLayer", "SFT forward (with activation cache) and backward of one MoE layer.");
  AddSftTimingBindings(layer)
      .def(py::init<int, int, int, int, int, int, float, int, bool, const std::string&, const std::string&,
                    int, std::shared_ptr<SftBackwardWeights>, std::shared_ptr<SftWorkspace>,
                    std::shared_ptr<SftCachePool>, int>(),
           py::arg("num_experts"), py::arg("top_k"), py::arg("hidden"), py::arg("intermediate"),
           py::arg("max_len"), py::arg("lora_rank"), py::arg("lora_alpha"), py::arg("max_cache_depth"),
           py::arg("skip_lora"), py::arg("isa"), py::arg("format"), py::arg("group_size") = 128,
           py::arg("backward_weights") = nullptr,
           py::arg("workspace") = nullptr, py::arg("cache_pool") = nullptr, py::arg("layer_idx") = -1)
      .def(
          "load_weights",
          [](PySftLayer& self, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down,
             std::uintptr_t map, ThreadPool& pool) {
            self.Run([&] {
              return self.layer().LoadWeights(Ptr<const bf16_t>(gate), Ptr<const bf16_t>(up),
                                              Ptr<const bf16_t>(down), Ptr<const int64_t>(map), pool);
            });
          },
          py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("physical_to_logical"), py::arg("pool"))
      .def(
          "set_lora",
          [](PySftLayer& self, std::uintptr_t ga, std::uintptr_t gb, std::uintptr_t ua, std::uintptr_t ub,
             std::uintptr_t da, std::uintptr_t db, std::uintptr_t gga, std::uintptr_t ggb,
             std::uintptr_t gua, std::uintptr_t gub, std::uintptr_t gda, std::uintptr_t gdb) {
            SftLoraTensors t;
            t.gate_a = Ptr<const bf16_t>(ga);
            t.gate_b = Ptr<const bf16_t>(gb);
            t.up_a = Ptr<const bf16_t>(ua);
            t.up_b = Ptr<const bf16_t>(ub);
            t.down_a = Ptr<const bf16_t>(da);
            t.down_b = Ptr<const bf16_t>(db);
            t.grad_gate_a = Ptr<bf16_t>(gga);
            t.grad_gate_b = Ptr<bf16_t>(ggb);
            t.grad_up_a = Ptr<bf16_t>(gua);
            t.grad_up_b = Ptr<bf16_t>(gub);
            t.grad_down_a = Ptr<bf16_t>(gda);
            t.grad_down_b = Ptr<bf16_t>(gdb);
            self.Run([&] { return self.layer().SetLora(t); });
          },
          py::arg("gate_a"), py::arg("gate_b"), py::arg("up_a"), py::arg("up_b"), py::arg("down_a"),
          py::arg("down_b"), py::arg("grad_gate_a"), py::arg("grad_gate_b"), py::arg("grad_up_a"),
          py::arg("grad_up_b"), py::arg("grad_down_a"), py::arg("grad_down_b"))
      .def(
          "forward",
          [](PySftLayer& self, ThreadPool& pool, int qlen, int k, std::uintptr_t ids, std::uintptr_t weights,
             std::uintptr_t input, std::uintptr_t output, bool save_for_backward) {
            self.Run([&] {
              return self.layer().Forward(pool, qlen, k, Ptr<const int64_t>(ids), Ptr<const float>(weights),
                                          Ptr<const bf16_t>(input), Ptr<bf16_t>(output), save_for_backward);
            });
          },
          py::arg("pool"), py::arg("qlen"), py::arg("k"), py::arg("ids"), py::arg("weights"), py::arg("input"),
          py::arg("output"), py::arg("save_for_backward"))
      .def(
          "backward",
          [](PySftLayer& self, ThreadPool& pool, std::uintptr_t grad_output, std::uintptr_t grad_input,
             std::uintptr_t grad_weights, bool accumulate, float grad_scale) {
            self.Run([&] {
              return self.layer().Backward(pool, Ptr<const bf16_t>(grad_output), Ptr<bf16_t>(grad_input),
                                           Ptr<float>(grad_weights), accumulate, grad_scale);
            });
          },
          py::arg("pool"), py::arg("grad_output"), py::arg("grad_input"), py::arg("grad_weights"),
          py::arg("accumulate"), py::arg("grad_scale"))
      .def(
          "next_backward_shape",
          [](const PySftLayer& s) {
            absl::StatusOr<std::pair<int, int>> shape;
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> lock(ComputeMutex());  // a compute call may be changing the stack
              shape = s.layer().NextBackwardShape();
            }
            if (!shape.ok()) ThrowStatus(shape.status());
            return *shape;
          },
          "(qlen, k) of the cached forward the next backward consumes; RuntimeError when none is cached.")
      .def_property_readonly("cache_depth", [](const PySftLayer& s) { return s.layer().cache_depth(); })
      .def_property_readonly("rank", [](const PySftLayer& s) { return s.layer().rank(); })
      .def_property_readonly("isa", [](const PySftLayer& s) { return std::string(IsaName(s.layer().isa())); })
      .def_property_readonly("format",
                             [](const PySftLayer& s) { return std::string(ExpertFormatName(s.layer().format())); })
      .def_property_readonly("weight_bytes", [](const PySftLayer& s) { return s.layer().weight_bytes(); })
      .def_property_readonly("backward_weight_bytes",
                             [](const PySftLayer& s) { return s.layer().backward_weight_bytes(); })
      .def_property_readonly("cache_bytes", [](const PySftLayer& s) { return s.layer().cache_bytes(); })
      .def_property_readonly("cache_pool_bytes", [](const PySftLayer& s) { return s.layer().cache_pool_bytes(); })
      .def_property_readonly("workspace_bytes", [](const PySftLayer& s) { return s.layer().workspace_bytes(); })
      .def("cache_bytes_per_forward",
           [](const PySftLayer& s, int qlen) { return s.layer().CacheBytesPerForward(qlen); }, py::arg("qlen"));
}

}  // namespace kt
