#include "kt/io/convert.h"

#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kt/io/json.h"
#include "kt/io/arch.h"
#include "kt/io/checkpoint.h"
#include "kt/io/checksum.h"
#include "kt/io/hf_int4.h"
#include "kt/io/convert_resume.h"
#include "kt/io/file_util.h"
#include "kt/io/gguf_arch.h"
#include "kt/io/gguf_experts.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"
#include "kt/io/method.h"
#include "kt/io/safetensors.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/quant_fast.h"

namespace kt {
namespace {

using Clock = std::chrono::steady_clock;
using namespace convert_internal;  // NOLINT: convert_resume.h is this file's other half.

std::string Hms(double s) {
  const int64_t t = static_cast<int64_t>(s + 0.5);
  return absl::StrFormat("%d:%02d:%02d", t / 3600, (t / 60) % 60, t % 60);
}

// What one conversion works with: the options, the method's layout, the model and its opened checkpoint
// (Hugging Face, or GGUF).
struct ConvertJob {
  const ConvertOptions* options = nullptr;
  MethodLayout layout;
  MoeArch arch;
  std::shared_ptr<const Checkpoint> ckpt;
  std::shared_ptr<const GgufCheckpoint> gguf;
  std::string config_path;  // HF: the config.json read; GGUF: the file whose metadata gave the shape.
  std::string config_json;  // GGUF: the config.json the metadata amounts to (gguf_arch.h), written out.
  std::string hidden_key = "hidden_size", intermediate_key = "moe_intermediate_size";  // for errors
  int threads = 1;
};

// Layer `layer`'s experts, for the method's layout: HF folders read bf16 or as stored (FP8 / MX dequantized
// when the method is another), GGUF tensors dequantized.
absl::StatusOr<std::unique_ptr<LayerExperts>> OpenLayer(const ConvertJob& job, int layer) {
  LayerRequest want;
  want.method = job.layout;
  want.dequantize_stored = true;  // FP8 / MX checkpoints convert to any method through their dequantized bf16
  want.layer = layer;
  if (job.gguf != nullptr) return LayerExperts::OpenGguf(job.gguf, job.arch, want);
  return LayerExperts::OpenHf(job.ckpt, job.arch, job.config_path, want);
}

// The method's layout, after the checks that need no file.
absl::StatusOr<MethodLayout> CheckMethod(const ConvertOptions& options) {
  if (options.group_size != 0 && !MethodTakesGroupSize(options.method)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--group-size ", options.group_size, ": method ", options.method,
        " has no groups (only AMXINT4_KGroup, AMXINT4_1KGroup, MOE_INT4_KGroup and MOE_INT4_1KGroup take a "
        "group size); drop --group-size"));
  }
  // RAWINT4 / GPTQ_INT4 from a native int4 checkpoint keep its groups (hf_int4.h) unless told otherwise.
  int group = options.group_size != 0 ? options.group_size : 128;
  if (options.group_size == 0 && (options.method == "RAWINT4" || options.method == "GPTQ_INT4")) {
    if (absl::StatusOr<int> g = HfInt4GroupSize(options.input); g.ok()) group = *g;
  }
  absl::StatusOr<MethodLayout> layout = LayoutOfMethod(options.method, group);
  if (!layout.ok()) return layout.status();
  if (const std::string why = MethodNotLoadableReason(options.method); !why.empty()) {
    return absl::UnimplementedError(absl::StrCat("--method ", options.method, ": ", why));
  }
  if (options.input.empty() || options.output.empty()) {
    return absl::InvalidArgumentError("--input and --output are required");
  }
  return layout;
}

// Every MoE layer is validated before anything is written: a missing expert in the last layer must not cost
// an hour of conversion first (and must leave no output).
absl::Status ValidateLayers(const ConvertJob& job) {
  for (int layer : job.arch.moe_layers) {
    absl::StatusOr<std::unique_ptr<LayerExperts>> le = OpenLayer(job, layer);
    if (!le.ok()) return le.status();
    if (job.layout.quantized) {
      if (absl::Status s = ValidateQuantSpec(job.layout.spec, job.arch.hidden); !s.ok())
        return absl::InvalidArgumentError(absl::StrCat(job.config_path, ": ", job.hidden_key, ": ", s.message()));
      if (absl::Status s = ValidateQuantSpec(job.layout.spec, job.arch.intermediate); !s.ok())
        return absl::InvalidArgumentError(
            absl::StrCat(job.config_path, ": ", job.intermediate_key, ": ", s.message()));
    }
  }
  return absl::OkStatus();
}

// Creates and locks the output folder and clears what an interrupted or different run left there. The lock
// is held until the returned object is destroyed.
absl::StatusOr<DirectoryLock> PrepareOutput(const ConvertJob& job, ConvertStats* stats) {
  const ConvertOptions& options = *job.options;
  if (::mkdir(options.output.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoError(errno, absl::StrCat(options.output, ": cannot create the output folder"));
  }
  char in_real[PATH_MAX], out_real[PATH_MAX];
  if (::realpath(options.input.c_str(), in_real) != nullptr &&
      ::realpath(options.output.c_str(), out_real) != nullptr && std::string(in_real) == out_real) {
    return absl::InvalidArgumentError(
        absl::StrCat("--output ", options.output, " is the input folder; choose another folder"));
  }
  // One writer per output folder: a second kt convert into it fails here instead of interleaving files.
  absl::StatusOr<DirectoryLock> lock = DirectoryLock::Acquire(options.output);
  if (!lock.ok()) return lock.status();
  // Under the lock, any temporary in the folder is an interrupted run's (a live writer would hold the lock).
  absl::StatusOr<std::vector<std::string>> stale = RemoveAtomicTemporaries(options.output);
  if (!stale.ok()) return stale.status();
  stats->temporaries_removed = static_cast<int>(stale->size());
  if (!stale->empty() && options.progress) {
    std::fprintf(options.progress, "kt convert: removed %zu unfinished file(s) of an interrupted run: %s\n",
                 stale->size(), absl::StrJoin(*stale, ", ").c_str());
  }
  std::string earlier_method;
  const std::string earlier = EarlierLayout(options.output, job.arch.moe_layers, &earlier_method);
  if (!earlier.empty() && earlier != job.layout.tag) {
    return absl::FailedPreconditionError(absl::StrCat(
        options.output, " holds a conversion", earlier_method.empty() ? "" : " for method ", earlier_method,
        " in layout ", earlier, "; converting for ", options.method, " (", job.layout.tag,
        ") would replace it: choose another --output, or remove that folder first"));
  }
  // A rerun with a different method must not leave the old manifest describing the new files.
  ::unlink(absl::StrCat(options.output, "/", kManifestName).c_str());
  return lock;
}

Manifest ManifestOf(const ConvertJob& job) {
  Manifest manifest;
  manifest.method = job.layout.method;
  manifest.layout = job.layout.tag;
  manifest.group_size = job.layout.quantized ? job.layout.spec.group_size : 0;
  manifest.architecture = job.arch.architecture;
  manifest.model_type = job.arch.model_type;
  manifest.num_layers = job.arch.num_layers;
  manifest.num_experts = job.arch.num_experts;
  manifest.top_k = job.arch.top_k;
  manifest.hidden = job.arch.hidden;
  manifest.intermediate = job.arch.intermediate;
  return manifest;
}

// A layer's converted matrices, [E][3]: bf16 copies, or quantized.
struct LayerOutputs {
  std::vector<std::vector<bf16_t>> bf16;
  std::vector<QuantizedMatrix> quant;
};

// Reads (and for a quantized layout, quantizes) every expert matrix, in parallel over experts.
absl::StatusOr<LayerOutputs> ConvertMatrices(const ConvertJob& job, const LayerExperts& le, int layer) {
  const MethodLayout& layout = job.layout;
  const size_t e_count = le.num_experts();
  LayerOutputs out;
  out.bf16.resize(layout.quantized ? 0 : e_count * 3);
  out.quant.resize(layout.quantized ? e_count * 3 : 0);
  absl::Status st = ParallelTasks(e_count, job.threads, [&](size_t e) -> absl::Status {
    std::vector<bf16_t> buf;  // One expert matrix (a few MB; allocating it per expert costs nothing).
    for (int p = 0; p < 3; ++p) {
      const auto m = static_cast<ExpertMatrix>(p);
      const size_t n = le.Rows(m), k = le.Cols(m);
      if (!layout.quantized) {
        out.bf16[e * 3 + p].resize(n * k);
        if (absl::Status s = le.ReadBf16(static_cast<int>(e), m, out.bf16[e * 3 + p].data()); !s.ok()) return s;
        continue;
      }
      // FP8 for method FP8, native int4 for its layout, MX for its method: as they are (no requantization).
      // FP8 / MX for another method come through ReadBf16, dequantized (LayerRequest::dequantize_stored).
      if (le.quantized()) {
        if (absl::Status s = le.ReadQuantized(static_cast<int>(e), m, &out.quant[e * 3 + p]); !s.ok()) return s;
        continue;
      }
      buf.resize(n * k);
      if (absl::Status s = le.ReadBf16(static_cast<int>(e), m, buf.data()); !s.ok()) return s;
      // The vectorized quantizer computes every format bit for bit as Quantize (quant_fast_test), and
      // gives Quantize's errors (a non-finite weight named by row and column).
      static const Isa isa = BestIsa(GetCpuFeatures());
      absl::StatusOr<QuantizedMatrix> q = QuantizeFast(isa, layout.spec, buf.data(), k, n, k);
      if (!q.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(job.options->input, ": layer ", layer, " expert ", e, " ",
                                                       ExpertMatrixName(m), ": ", q.status().message()));
      }
      out.quant[e * 3 + p] = *std::move(q);
    }
    le.DropPages(static_cast<int>(e));
    return absl::OkStatus();
  });
  if (!st.ok()) return st;
  return out;
}

template <typename T>
absl::Span<const uint8_t> BytesOf(const std::vector<T>& v) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T));
}

// The layer file's tensors (manifest.h names them), viewing `out`.
std::vector<TensorToWrite> TensorsOf(const LayerOutputs& out, const ManifestLayer& entry, int64_t num_experts,
                                     bool quantized) {
  std::vector<TensorToWrite> tensors;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int p = 0; p < 3; ++p) {
      const char* proj = ExpertMatrixName(static_cast<ExpertMatrix>(p));
      const int64_t n = entry.shapes[p][0], k = entry.shapes[p][1];
      if (!quantized) {
        tensors.push_back({ConvertedTensorName(e, proj, "weight"), Dtype::kBf16, {n, k}, BytesOf(out.bf16[e * 3 + p])});
        continue;
      }
      const QuantizedMatrix& q = out.quant[e * 3 + p];
      const int64_t g = static_cast<int64_t>(ScalesPerRow(q.spec, k));
      tensors.push_back({ConvertedTensorName(e, proj, "qdata"), Dtype::kU8,
                         {n, static_cast<int64_t>(QuantizedRowBytes(q.spec, k))}, BytesOf(q.data)});
      tensors.push_back({ConvertedTensorName(e, proj, "scales"), Dtype::kF32, {n, g}, BytesOf(q.scales)});
      if (!q.zeros.empty()) {
        tensors.push_back({ConvertedTensorName(e, proj, "zeros"), Dtype::kU8, {n, g}, BytesOf(q.zeros)});
      }
    }
  }
  return tensors;
}

// entry.bytes and entry.crc32c of the written file (from the page cache), in parallel over chunks.
absl::Status ChecksumWritten(const std::string& path, int threads, ManifestLayer* entry) {
  absl::StatusOr<MappedFile> written = MappedFile::Open(path);
  if (!written.ok()) return written.status();
  entry->bytes = written->size();
  entry->crc32c.assign(NumChecksumChunks(entry->bytes), 0);
  return ParallelTasks(entry->crc32c.size(), threads, [&](size_t i) {
    entry->crc32c[i] = ChunkCrc32c(written->data(), written->size(), i);
    const uint64_t begin = static_cast<uint64_t>(i) * kChecksumChunkBytes;
    DropMappedPages(written->data() + begin, std::min<uint64_t>(kChecksumChunkBytes, written->size() - begin));
    return absl::OkStatus();
  });
}

// Converts one layer into entry->file (and its .done record); fills the rest of `entry`.
absl::Status ConvertLayer(const ConvertJob& job, const LayerExperts& le, const ResumeDecision& resume,
                          const std::string& path, ManifestLayer* entry) {
  DoneRecord record;
  record.layout = job.layout.tag;
  absl::StatusOr<std::vector<SourceFile>> files = SourceFilesOf(le);
  if (!files.ok()) return files.status();
  record.source.files = *std::move(files);
  // Checksummed before reading for conversion: a source rewritten during the run then fails the next
  // run's comparison instead of vouching for a layer made from other bytes.
  record.source.tensors = resume.have_tensor_crcs ? resume.source.tensors : SourceTensorsOf(le, job.threads);
  {
    absl::StatusOr<LayerOutputs> out = ConvertMatrices(job, le, entry->layer);
    if (!out.ok()) return out.status();
    const std::vector<TensorToWrite> tensors = TensorsOf(*out, *entry, le.num_experts(), job.layout.quantized);
    const std::map<std::string, std::string> meta = {
        {"kt_format", kConvertedFormat}, {"layout", job.layout.tag}, {"layer", absl::StrCat(entry->layer)}};
    // A stale .done must never vouch for the file being replaced.
    ::unlink(absl::StrCat(path, kDoneSuffix).c_str());
    if (absl::Status s = WriteSafetensors(path, tensors, meta); !s.ok()) return s;
  }  // The layer's matrices are freed here, before the next layer's are read.
  if (absl::Status s = ChecksumWritten(path, job.threads, entry); !s.ok()) return s;
  record.entry = *entry;
  return WriteFileAtomically(absl::StrCat(path, kDoneSuffix), DoneRecordToJson(record));
}

// Keeps a layer an earlier run converted from the same source (its record refreshed if the source's
// identity changed): its manifest entry.
absl::StatusOr<ManifestLayer> KeepLayer(const std::string& path, const ResumeDecision& resume) {
  absl::StatusOr<DoneRecord> done = ReadDoneRecord(path);
  if (!done.ok()) return done.status();
  if (resume.refresh_identity) {
    done->source = resume.source;
    if (absl::Status s = WriteFileAtomically(absl::StrCat(path, kDoneSuffix), DoneRecordToJson(*done)); !s.ok())
      return s;
  }
  return done->entry;
}

// Converts (or keeps) MoE layer `layer`, the `ordinal`-th, adding it to `manifest` and `stats`.
absl::Status ConvertOrKeepLayer(const ConvertJob& job, int layer, int ordinal, Manifest* manifest,
                                ConvertStats* stats, double* convert_seconds) {
  const ConvertOptions& options = *job.options;
  const Clock::time_point tl = Clock::now();
  const int64_t H = job.arch.hidden, I = job.arch.intermediate;
  ManifestLayer entry;
  entry.layer = layer;
  entry.file = LayerFileName(layer);
  const int64_t shapes[3][2] = {{I, H}, {I, H}, {H, I}};
  std::copy(&shapes[0][0], &shapes[0][0] + 6, &entry.shapes[0][0]);
  const std::string path = absl::StrCat(options.output, "/", entry.file);
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = OpenLayer(job, layer);
  if (!le.ok()) return le.status();
  const ResumeDecision resume = DecideResume(path, entry, job.layout.tag, **le, job.threads);
  if (resume.keep) {
    absl::StatusOr<ManifestLayer> kept = KeepLayer(path, resume);
    if (!kept.ok()) return kept.status();
    manifest->layers.push_back(*kept);
    ++stats->layers_skipped;
    if (options.progress) {
      std::fprintf(options.progress,
                   "kt convert: layer %d (%d/%d) already converted from the same source, checksums verified\n",
                   layer, ordinal, stats->layers_total);
    }
    return absl::OkStatus();
  }
  if (!resume.why.empty() && options.progress) {
    std::fprintf(options.progress, "kt convert: layer %d: converting again: %s\n", layer, resume.why.c_str());
  }
  if (absl::Status s = ConvertLayer(job, **le, resume, path, &entry); !s.ok()) return s;
  stats->bytes_read += (*le)->weight_bytes();
  stats->bytes_written += entry.bytes;
  manifest->layers.push_back(entry);
  ++stats->layers_converted;

  const double dt = std::chrono::duration<double>(Clock::now() - tl).count();
  *convert_seconds += dt;
  if (options.progress) {
    const int left = stats->layers_total - ordinal;
    const double eta = left * *convert_seconds / stats->layers_converted;
    std::fprintf(options.progress,
                 "kt convert: layer %d (%d/%d) %.2f GB -> %.2f GB in %.1f s, %.2f GB/s read, ETA %s\n", layer,
                 ordinal, stats->layers_total, (*le)->weight_bytes() / 1e9, entry.bytes / 1e9, dt,
                 (*le)->weight_bytes() / 1e9 / std::max(dt, 1e-9), Hms(eta).c_str());
    std::fflush(options.progress);
  }
  return absl::OkStatus();
}

// Whether --input is a GGUF checkpoint: a .gguf file (or part of a split set), or a folder of them without
// config.json.
bool IsGgufInput(const std::string& input) {
  struct stat st;
  bool gguf = input.size() > 5 && input.compare(input.size() - 5, 5, ".gguf") == 0;
  if (!gguf && ::stat(absl::StrCat(input, "/config.json").c_str(), &st) != 0) {
    if (DIR* d = ::opendir(input.c_str())) {
      while (const dirent* ent = ::readdir(d)) {
        const std::string name = ent->d_name;
        gguf = gguf || (name.size() > 5 && name.compare(name.size() - 5, 5, ".gguf") == 0);
      }
      ::closedir(d);
    }
  }
  return gguf;
}

// A GGUF input: the checkpoint and the model its metadata describes (gguf_arch.h).
absl::Status OpenGgufInput(ConvertJob* job) {
  absl::StatusOr<std::unique_ptr<GgufCheckpoint>> opened = GgufCheckpoint::Open(job->options->input);
  if (!opened.ok()) return opened.status();
  job->gguf = std::shared_ptr<const GgufCheckpoint>(std::move(*opened));
  absl::StatusOr<GgufMoeModel> model = GgufMoeArch(*job->gguf);
  if (!model.ok()) return model.status();
  job->arch = std::move(model->arch);
  job->config_json = std::move(model->config_json);
  job->config_path = absl::StrCat("GGUF ", model->metadata_file);
  job->hidden_key = absl::StrCat(model->gguf_architecture, ".embedding_length");
  job->intermediate_key = absl::StrCat(model->gguf_architecture, model->gguf_architecture == "llama"
                                                                        ? ".feed_forward_length"
                                                                        : ".expert_feed_forward_length");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ConvertStats> ConvertCheckpoint(const ConvertOptions& options) {
  const Clock::time_point t0 = Clock::now();
  ConvertJob job;
  job.options = &options;
  const bool gguf = !options.input.empty() && IsGgufInput(options.input);
  if (gguf && options.method == "LLAMAFILE") {
    return absl::InvalidArgumentError(absl::StrCat(
        "--method LLAMAFILE: ", options.input, " is a GGUF checkpoint, which method LLAMAFILE runs as stored: "
        "there is nothing to convert; load it directly with KTMoEWrapper(method=\"LLAMAFILE\", weight_path=",
        json::Quote(options.input), "), or pick another --method to convert it"));
  }
  absl::StatusOr<MethodLayout> layout = CheckMethod(options);
  if (!layout.ok()) return layout.status();
  job.layout = *std::move(layout);
  if (gguf) {
    if (absl::Status s = OpenGgufInput(&job); !s.ok()) return s;
  } else {
    job.config_path = absl::StrCat(options.input, "/config.json");
    absl::StatusOr<MoeArch> arch = LoadMoeConfig(options.input);
    if (!arch.ok()) return arch.status();
    job.arch = *std::move(arch);
    absl::StatusOr<std::unique_ptr<Checkpoint>> opened = Checkpoint::Open(options.input);
    if (!opened.ok()) return opened.status();
    job.ckpt = std::shared_ptr<const Checkpoint>(std::move(*opened));
  }
  job.threads = options.threads > 0 ? options.threads : DefaultThreads();
  if (absl::Status s = ValidateLayers(job); !s.ok()) return s;

  ConvertStats stats;
  absl::StatusOr<DirectoryLock> lock = PrepareOutput(job, &stats);
  if (!lock.ok()) return lock.status();
  Manifest manifest = ManifestOf(job);
  stats.layers_total = static_cast<int>(job.arch.moe_layers.size());
  double convert_seconds = 0;
  int ordinal = 0;
  for (int layer : job.arch.moe_layers) {
    if (absl::Status s = ConvertOrKeepLayer(job, layer, ++ordinal, &manifest, &stats, &convert_seconds); !s.ok())
      return s;
  }

  // The source's config.json (a GGUF's: the one its metadata amounts to), for load_weights and kt bench.
  absl::StatusOr<std::string> config = job.gguf != nullptr ? absl::StatusOr<std::string>(job.config_json)
                                                           : ReadSmallFile(job.config_path);
  if (!config.ok()) return config.status();
  if (absl::Status s = WriteFileAtomically(absl::StrCat(options.output, "/config.json"), *config); !s.ok())
    return s;
  // Last: the manifest makes the folder a finished conversion.
  if (absl::Status s = WriteFileAtomically(absl::StrCat(options.output, "/", kManifestName),
                                           ManifestToJson(manifest));
      !s.ok())
    return s;
  stats.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return stats;
}

}  // namespace kt
