// kt_kernel._kt: the pybind11 extension behind kt_kernel.
//
// This layer is deliberately thin and torch-free: tensors cross it as raw addresses (torch's data_ptr())
// plus the sizes the C++ API needs. All argument checking a Python user can get wrong (dtype, shape,
// device, contiguity, ranges) happens in kt_kernel's Python code, which owns the tensors and keeps them
// alive for the duration of each call; what remains here is turning absl::Status into Python exceptions and
// releasing the GIL around the compute.
//
// Concurrency: a kt::ThreadPool's ParallelFor is not reentrant and a MoeLayer owns per-call scratch, so all
// compute calls of the process (LoadWeights and Forward, any layer, any pool) are serialized by one mutex.
// The GIL is released before waiting on it. MoE layers of one model run one after another anyway, and each
// call already uses every worker thread, so nothing is lost.
#include <Python.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/io/hf_int4.h"
#include "kt/io/method.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/gguf_loader.h"
#include "kt/moe/layer_loader.h"
#include "kt/moe/moe_layer.h"
#include "kt/python/src/common.h"
#include "kt/runtime/thread_pool.h"
#include "pybind11/pybind11.h"
#include "pybind11/stl.h"

namespace py = pybind11;

namespace kt {

std::mutex& ComputeMutex() {
  static std::mutex* mu = new std::mutex;
  return *mu;
}

// InvalidArgument/OutOfRange are the caller's fault (ValueError); an unimplemented feature is
// NotImplementedError; everything else (state, resources, internal) is RuntimeError.
void ThrowStatus(const absl::Status& status) {
  const std::string message(status.message());
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      throw py::value_error(message);
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kDataLoss:
    case absl::StatusCode::kPermissionDenied:
    case absl::StatusCode::kUnavailable:
      // Missing, unreadable or corrupt weight files: OSError, as Python's own file errors.
      PyErr_SetString(PyExc_OSError, message.c_str());
      throw py::error_already_set();
    case absl::StatusCode::kUnimplemented:
      PyErr_SetString(PyExc_NotImplementedError, message.c_str());
      throw py::error_already_set();
    default:
      throw std::runtime_error(message);
  }
}

namespace {

// The process's CPU features and the kernel path a KT_ISA-style request resolves to.
std::string ResolveIsaName(const std::string& requested) {
  absl::StatusOr<Isa> isa = ResolveIsa(requested, GetCpuFeatures());
  if (!isa.ok()) ThrowStatus(isa.status());
  return IsaName(*isa);
}

// The path named by `name` (a KT_ISA spelling), which must be one this CPU runs.
Isa IsaFromName(const std::string& name) {
  absl::StatusOr<Isa> isa = ResolveIsa(name, GetCpuFeatures());
  if (!isa.ok()) ThrowStatus(isa.status());
  return *isa;
}

class PyMoeLayer {
 public:
  PyMoeLayer(int num_experts, int top_k, int hidden, int intermediate, int max_len,
             const std::string& isa_name, const std::string& format_name, int group_size,
             const std::vector<int>& gguf_types, float swiglu_limit, float swiglu_alpha) {
    const absl::StatusOr<ExpertFormat> format_or = ParseExpertFormat(format_name);
    if (!format_or.ok()) {
      throw py::value_error("MoeLayer: " + std::string(format_or.status().message()));
    }
    const ExpertFormat format = *format_or;
    MoeConfig config;
    config.group_size = group_size;
    config.num_experts = num_experts;
    config.top_k = top_k;
    config.hidden = hidden;
    config.intermediate = intermediate;
    config.max_len = max_len;
    if (gguf_types.size() != 3) throw py::value_error("MoeLayer: gguf_types must be 3 ggml type ids (gate, up, down)");
    for (int p = 0; p < 3; ++p) config.gguf_types[p] = gguf_types[p];
    config.swiglu_limit = swiglu_limit;
    config.swiglu_alpha = swiglu_alpha;
    const Isa isa = IsaFromName(isa_name);
    absl::StatusOr<std::unique_ptr<MoeLayer>> moe;
    {
      py::gil_scoped_release release;  // Create allocates the max_len-sized scratch.
      moe = MoeLayer::Create(config, isa, format);
    }
    if (!moe.ok()) ThrowStatus(moe.status());
    moe_ = std::move(*moe);
  }

  // Both loaders load into a staged layer and swap it in only when the whole load succeeded
  // (MoeLayer::CreateStaging / AdoptWeights): a failed reload leaves the weights in use as they were, and
  // a Forward never sees a half-loaded layer.
  void LoadWeights(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down,
                   std::uintptr_t physical_to_logical, ThreadPool& pool) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      absl::StatusOr<std::unique_ptr<MoeLayer>> staged = moe_->CreateStaging();
      status = staged.status();
      if (status.ok()) {
        status = (*staged)->LoadWeights(Ptr<const bf16_t>(gate), Ptr<const bf16_t>(up),
                                        Ptr<const bf16_t>(down),
                                        Ptr<const int64_t>(physical_to_logical), pool);
      }
      if (status.ok()) status = moe_->AdoptWeights(**staged);
    }
    if (!status.ok()) ThrowStatus(status);
  }

  // FP8 experts as shipped (method FP8): E4M3 codes gate/up [E, I, H], down [E, H, I] and their F32 block
  // scales [E, ceil(N/128), ceil(K/128)], packed straight into the layer (no bf16 copy). The caller (Python)
  // checked dtypes and shapes. Staged and swapped in like LoadWeights.
  void LoadWeightsFp8(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down, std::uintptr_t gate_scale,
                      std::uintptr_t up_scale, std::uintptr_t down_scale, std::uintptr_t physical_to_logical,
                      ThreadPool& pool) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      absl::StatusOr<std::unique_ptr<MoeLayer>> staged = moe_->CreateStaging();
      status = staged.status();
      if (status.ok()) {
        const uint8_t* const codes[3] = {Ptr<const uint8_t>(gate), Ptr<const uint8_t>(up),
                                         Ptr<const uint8_t>(down)};
        const float* const scales[3] = {Ptr<const float>(gate_scale), Ptr<const float>(up_scale),
                                        Ptr<const float>(down_scale)};
        status = LoadFp8Experts(**staged, codes, scales, Ptr<const int64_t>(physical_to_logical), pool);
      }
      if (status.ok()) status = moe_->AdoptWeights(**staged);
    }
    if (!status.ok()) ThrowStatus(status);
  }

  // RAWINT4 experts as compressed-tensors ships them (LoadRawInt4Experts): weight_packed bytes and bf16
  // weight_scale per projection. The caller (Python) checked dtypes and shapes. Staged like LoadWeights.
  void LoadWeightsRawInt4(std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down, std::uintptr_t gate_scale,
                          std::uintptr_t up_scale, std::uintptr_t down_scale, std::uintptr_t physical_to_logical,
                          ThreadPool& pool) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      absl::StatusOr<std::unique_ptr<MoeLayer>> staged = moe_->CreateStaging();
      status = staged.status();
      if (status.ok()) {
        const uint8_t* const packed[3] = {Ptr<const uint8_t>(gate), Ptr<const uint8_t>(up), Ptr<const uint8_t>(down)};
        const uint16_t* const scales[3] = {Ptr<const uint16_t>(gate_scale), Ptr<const uint16_t>(up_scale),
                                           Ptr<const uint16_t>(down_scale)};
        status = LoadRawInt4Experts(**staged, packed, scales, Ptr<const int64_t>(physical_to_logical), pool);
      }
      if (status.ok()) status = moe_->AdoptWeights(**staged);
    }
    if (!status.ok()) ThrowStatus(status);
  }

  // Codes and scales as checkpoints store them (LoadCodedExperts, `kind` as ParseCodeScales reads it); the
  // caller (Python) checked dtypes and shapes. Staged and swapped in like LoadWeights.
  void LoadWeightsCoded(const std::string& kind, std::uintptr_t gate, std::uintptr_t up, std::uintptr_t down,
                        std::uintptr_t gate_scale, std::uintptr_t up_scale, std::uintptr_t down_scale,
                        std::uintptr_t physical_to_logical, ThreadPool& pool) {
    const CodeScales scales_kind = ParseCodeScales(kind);
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      absl::StatusOr<std::unique_ptr<MoeLayer>> staged = moe_->CreateStaging();
      status = staged.status();
      if (status.ok()) {
        const uint8_t* const codes[3] = {Ptr<const uint8_t>(gate), Ptr<const uint8_t>(up),
                                         Ptr<const uint8_t>(down)};
        const void* const scales[3] = {Ptr<const void>(gate_scale), Ptr<const void>(up_scale),
                                       Ptr<const void>(down_scale)};
        status = LoadCodedExperts(**staged, scales_kind, codes, scales, Ptr<const int64_t>(physical_to_logical),
                                  pool);
      }
      if (status.ok()) status = moe_->AdoptWeights(**staged);
    }
    if (!status.ok()) ThrowStatus(status);
  }

  void Forward(ThreadPool& pool, int qlen, int k, std::uintptr_t ids, std::uintptr_t weights,
               std::uintptr_t input, std::uintptr_t output, std::uintptr_t gpu_experts_mask) {
    absl::Status status;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      if (!moe_->loaded()) {
        status = ForwardBeforeLoadError();
      } else {
        status = moe_->Forward(pool, qlen, k, Ptr<const int64_t>(ids), Ptr<const float>(weights),
                             Ptr<const bf16_t>(input), Ptr<bf16_t>(output),
                               Ptr<const bool>(gpu_experts_mask));
      }
    }
    if (!status.ok()) ThrowStatus(status);
  }

  py::dict LoadFromPath(const std::string& path, int layer, const std::string& method, int group_size,
                        std::uintptr_t physical_to_logical, ThreadPool& pool) {
    absl::StatusOr<FolderLoadStats> stats;
    {
      py::gil_scoped_release release;
      std::lock_guard<std::mutex> lock(ComputeMutex());
      absl::StatusOr<std::unique_ptr<MoeLayer>> staged = moe_->CreateStaging();
      if (!staged.ok()) {
        stats = staged.status();
      } else {
        stats = LoadLayerFromFolder(**staged, path, layer, method, group_size,
                                    Ptr<const int64_t>(physical_to_logical), pool);
        if (stats.ok()) {
          if (absl::Status s = moe_->AdoptWeights(**staged); !s.ok()) stats = s;
        }
      }
    }
    if (!stats.ok()) ThrowStatus(stats.status());
    return LoadStatsDict(*stats);
  }

  const MoeLayer& moe() const { return *moe_; }
  MoeLayer* mutable_moe() { return moe_.get(); }

 private:
  std::unique_ptr<MoeLayer> moe_;
};

// Method LLAMAFILE: InspectGgufLayer as {"types": [gate, up, down], "format", "file_bytes"}.
py::dict GgufLayerInfoDict(const std::string& path, int layer, int num_experts, int hidden, int intermediate) {
  absl::StatusOr<GgufLayerInfo> info;
  {
    py::gil_scoped_release release;
    info = InspectGgufLayer(path, layer, num_experts, hidden, intermediate);
  }
  if (!info.ok()) ThrowStatus(info.status());
  py::dict d;
  d["types"] = std::vector<int>(info->types, info->types + 3);
  d["format"] = std::string(ExpertFormatName(info->format));
  d["file_bytes"] = info->file_bytes;
  return d;
}

// One row per method of kt/io/method.cc (the one table Python reads: kt_kernel/methods.py).
py::list MethodTableRows() {
  py::list rows;
  for (const std::string& method : ConvertibleMethods()) {
    absl::StatusOr<MethodLayout> layout = LayoutOfMethod(method);
    if (!layout.ok()) ThrowStatus(layout.status());
    py::dict row;
    row["method"] = method;
    row["format"] = std::string(ExpertFormatName(ExpertFormatOfLayout(*layout)));
    row["layout"] = layout->tag;
    row["takes_group_size"] = MethodTakesGroupSize(method);
    row["not_loadable"] = MethodNotLoadableReason(method);
    rows.append(row);
  }
  return rows;
}

// The native int4 checkpoints' group size (kt/io/hf_int4.h), for the RAWINT4 / GPTQ_INT4 wrappers.
void RegisterHfInt4(py::module& m) {
  m.def(
      "hf_int4_group_size",
      [](const std::string& dir) {
        absl::StatusOr<int> g = HfInt4GroupSize(dir);
        if (!g.ok()) ThrowStatus(g.status());
        return *g;
      },
      py::arg("dir"),
      "G of the native int4 checkpoint (compressed-tensors pack-quantized or GPTQ) in dir: its config.json's, "
      "else its scales' shape. ValueError when the folder is not one, or its quantization_config is one kt "
      "cannot read (naming the field).");
}

// The module-level functions: CPU features and kernel paths, the method table, GGUF and native int4 probes.
void RegisterModuleFunctions(py::module& m) {
  m.def("cpu_features", []() { return GetCpuFeatures().ToString(); },
        "One line describing the CPU features kt detected.");
  m.def("cpu_brand", []() { return GetCpuFeatures().brand; }, "The CPU's brand string.");
  m.def("resolve_isa", &ResolveIsaName, py::arg("requested"),
        "The kernel path (KT_ISA spelling) to use for a KT_ISA-style request: the best supported path when "
        "`requested` is empty, else exactly `requested`. Raises ValueError for an unknown name, "
        "RuntimeError for a path this CPU cannot run and NotImplementedError for one kt does not have yet.");
  m.def("best_isa", []() { return std::string(IsaName(BestIsa(GetCpuFeatures()))); },
        "The best kernel path this CPU supports.");
  m.def(
      "isa_supported",
      [](const std::string& name) {
        absl::StatusOr<Isa> isa = ParseIsa(name);
        if (!isa.ok()) ThrowStatus(isa.status());
        return IsaSupported(*isa, GetCpuFeatures());
      },
      py::arg("name"), "Whether this CPU can run the named kernel path.");

  m.def("gguf_layer_info", &GgufLayerInfoDict, py::arg("path"), py::arg("layer"), py::arg("num_experts"),
        py::arg("hidden"), py::arg("intermediate"),
        "Method LLAMAFILE: the ggml type ids of a GGUF checkpoint's layer experts (gate, up, down), checked "
        "against the shape, and the MoeLayer format that holds them ('gguf' or 'gguf_float').");
  m.def("method_table", &MethodTableRows,
      "kt's inference methods (kt/io/method.cc, the one table): per method its MoeLayer format, its stored "
      "layout (group methods at group_size 128), whether it takes group_size, and why no kernel can run it "
      "yet ('' when one can).");
  RegisterHfInt4(m);
  m.def(
      "sft_base_method",
      [](const std::string& sft_method) {
        absl::StatusOr<std::string> base = SftBaseMethod(sft_method);
        if (!base.ok()) ThrowStatus(base.status());
        return *base;
      },
      py::arg("sft_method"), "The inference method whose base weights an SFT method holds (ValueError if none).");
}

}  // namespace
}  // namespace kt

PYBIND11_MODULE(_kt, m) {
  using namespace kt;  // NOLINT: the bindings name many kt types.
  m.doc() =
      "kt's C++ MoE kernels (private; use kt_kernel.KTMoEWrapper). Tensors are passed as data_ptr() "
      "addresses: the caller guarantees dtype, shape, contiguity and lifetime.";

  RegisterModuleFunctions(m);

  py::class_<ThreadPool>(m, "ThreadPool",
                         "Persistent worker threads (the caller of a compute call counts as one).")
      .def(py::init([](int num_threads, bool pin) {
             if (num_threads < 1) throw py::value_error("ThreadPool: num_threads must be >= 1");
             return std::make_unique<ThreadPool>(ThreadPoolOptions{num_threads, pin});
           }),
           py::arg("num_threads"), py::arg("pin") = false)
      .def_property_readonly("num_threads", &ThreadPool::num_threads);

  py::class_<PyMoeLayer>(m, "MoeLayer",
                         "The routed experts of one MoE layer; weights kept as bf16 or quantized (int8, int4, "
                         "int4_group_sym, int4_group_asym with group_size).")
      .def(py::init<int, int, int, int, int, const std::string&, const std::string&, int, const std::vector<int>&,
                    float, float>(),
           py::arg("num_experts"), py::arg("top_k"), py::arg("hidden"), py::arg("intermediate"),
           py::arg("max_len"), py::arg("isa"), py::arg("format") = "bf16", py::arg("group_size") = 128,
           py::arg("gguf_types") = std::vector<int>{-1, -1, -1}, py::arg("swiglu_limit") = 0.0f,
           py::arg("swiglu_alpha") = 0.0f)
      .def("load_weights", &PyMoeLayer::LoadWeights, py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("physical_to_logical"), py::arg("pool"),
           "Packs (quantized formats: quantizes, then packs) gate/up [E,I,H] and down [E,H,I] bf16 weights "
           "(addresses; physical_to_logical is an int64[E] address or 0 for the identity). The inputs "
           "may be freed afterwards.")
      .def("load_weights_fp8", &PyMoeLayer::LoadWeightsFp8, py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("gate_scale"), py::arg("up_scale"), py::arg("down_scale"), py::arg("physical_to_logical"),
           py::arg("pool"))
      .def("load_weights_rawint4", &PyMoeLayer::LoadWeightsRawInt4, py::arg("gate"), py::arg("up"), py::arg("down"),
           py::arg("gate_scale"), py::arg("up_scale"), py::arg("down_scale"), py::arg("physical_to_logical"),
           py::arg("pool"))
      .def("load_weights_coded", &PyMoeLayer::LoadWeightsCoded, py::arg("kind"), py::arg("gate"), py::arg("up"),
           py::arg("down"), py::arg("gate_scale"), py::arg("up_scale"), py::arg("down_scale"),
           py::arg("physical_to_logical"), py::arg("pool"),
           "Packs codes as checkpoints store them (E4M3 bytes, or MXFP4 nibble pairs [E, N, K/2]) with their "
           "scales: kind 'fp8_block' (F32 [E, ceil(N/128), ceil(K/128)]), 'fp8_channel' (F32 [E, N]) or "
           "'e8m0' (U8 [E, N, K/32]).")
      .def("load_from_path", &PyMoeLayer::LoadFromPath, py::arg("path"), py::arg("layer"), py::arg("method"),
           py::arg("group_size"), py::arg("physical_to_logical"), py::arg("pool"),
           "Loads MoE layer `layer` from a Hugging Face folder (bf16, quantized here for integer methods) or "
           "a kt convert folder (checked against its manifest: layout, shapes, checksums). Returns "
           "{converted, file_bytes, verify_seconds, load_seconds}. ValueError for a mismatch with the config "
           "or manifest (an FP8 folder with a method other than FP8 included), OSError for a missing or corrupt "
           "file.")
      .def("forward", &PyMoeLayer::Forward, py::arg("pool"), py::arg("qlen"), py::arg("k"), py::arg("ids"),
           py::arg("weights"), py::arg("input"), py::arg("output"), py::arg("gpu_experts_mask"),
           "output[qlen,H] = routed experts' weighted sum (addresses; gpu_experts_mask is a bool[E] "
           "address read during this call, or 0).")
      .def_property_readonly("loaded", [](const PyMoeLayer& self) { return self.moe().loaded(); })
      .def_property_readonly("isa", [](const PyMoeLayer& self) { return std::string(IsaName(self.moe().isa())); })
      .def_property_readonly("format",
                             [](const PyMoeLayer& self) { return std::string(ExpertFormatName(self.moe().format())); })
      .def_property_readonly("group_size",
                             [](const PyMoeLayer& self) {
                               return IsGroupExpertFormat(self.moe().format()) ? self.moe().config().group_size
                                                                               : 0;
                             })
      .def_property_readonly("weight_bytes", [](const PyMoeLayer& self) { return self.moe().weight_bytes(); })
      // For ServingForward (serving_bindings.cc): the C++ layer's address, stable across reloads.
      .def_property_readonly("address",
                             [](PyMoeLayer& self) { return reinterpret_cast<std::uintptr_t>(self.mutable_moe()); });

  RegisterSftBindings(m);
  RegisterTpBindings(m);
  RegisterServingBindings(m);
}
