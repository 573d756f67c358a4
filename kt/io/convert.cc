#include "kt/io/convert.h"

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
#include "kt/io/arch.h"
#include "kt/io/checkpoint.h"
#include "kt/io/checksum.h"
#include "kt/io/file_util.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"
#include "kt/io/method.h"
#include "kt/io/safetensors.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/quant_fast.h"

namespace kt {
namespace {

using Clock = std::chrono::steady_clock;

int DefaultThreads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Runs fn(task) for task in [0, n) on `threads` threads; returns the first error (by task index).
absl::Status ParallelTasks(size_t n, int threads, const std::function<absl::Status(size_t)>& fn) {
  std::vector<absl::Status> status(n);
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t t; (t = next.fetch_add(1)) < n;) status[t] = fn(t);
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < std::min<int>(threads, static_cast<int>(n)); ++i) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  for (const absl::Status& s : status) {
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  absl::StatusOr<MappedFile> f = MappedFile::Open(path);
  if (!f.ok()) return f.status();
  return std::string(f->view());
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Whether an earlier run's layer can be kept: its .done entry equals what this run would record up to the
// checksums, and the file still has that size and those checksums.
bool LayerIsDone(const std::string& file_path, const ManifestLayer& want_shape, const std::string& layout,
                 int threads, ManifestLayer* done) {
  const std::string done_path = absl::StrCat(file_path, kDoneSuffix);
  if (!Exists(done_path) || !Exists(file_path)) return false;
  absl::StatusOr<std::string> text = ReadSmallFile(done_path);
  if (!text.ok()) return false;
  absl::StatusOr<ManifestLayer> entry = ParseManifestLayer(*text, done_path);
  if (!entry.ok() || entry->layer != want_shape.layer || entry->file != want_shape.file) return false;
  for (int p = 0; p < 3; ++p) {
    if (entry->shapes[p][0] != want_shape.shapes[p][0] || entry->shapes[p][1] != want_shape.shapes[p][1])
      return false;
  }
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(file_path);
  if (!f.ok() || (*f)->file_size() != entry->bytes) return false;
  const auto meta = (*f)->metadata().find("layout");
  if (meta == (*f)->metadata().end() || meta->second != layout) return false;
  std::vector<uint32_t> crc(entry->crc32c.size());
  (void)ParallelTasks(crc.size(), threads, [&](size_t i) {
    crc[i] = ChunkCrc32c((*f)->file_data(), (*f)->file_size(), i);
    // Verified pages need not stay resident (a resumed run then peaks at a few chunks, not a layer).
    const uint64_t begin = static_cast<uint64_t>(i) * kChecksumChunkBytes;
    DropMappedPages((*f)->file_data() + begin, std::min<uint64_t>(kChecksumChunkBytes, (*f)->file_size() - begin));
    return absl::OkStatus();
  });
  if (crc != entry->crc32c) return false;
  *done = *std::move(entry);
  return true;
}

std::string Hms(double s) {
  const int64_t t = static_cast<int64_t>(s + 0.5);
  return absl::StrFormat("%d:%02d:%02d", t / 3600, (t / 60) % 60, t % 60);
}

}  // namespace

absl::StatusOr<ConvertStats> ConvertCheckpoint(const ConvertOptions& options) {
  const Clock::time_point t0 = Clock::now();
  absl::StatusOr<MethodLayout> layout = LayoutOfMethod(options.method, options.group_size);
  if (!layout.ok()) return layout.status();
  if (options.input.empty() || options.output.empty()) {
    return absl::InvalidArgumentError("kt convert: --input and --output are required");
  }
  const std::string config_path = absl::StrCat(options.input, "/config.json");
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(options.input);
  if (!arch.ok()) return arch.status();
  absl::StatusOr<std::unique_ptr<Checkpoint>> opened = Checkpoint::Open(options.input);
  if (!opened.ok()) return opened.status();
  std::shared_ptr<const Checkpoint> ckpt(std::move(*opened));
  const int threads = options.threads > 0 ? options.threads : DefaultThreads();

  // Validate every MoE layer before writing anything: a missing expert in the last layer must not cost an
  // hour of conversion first (and must leave no output).
  LayerRequest want;
  want.method = *layout;
  for (int layer : arch->moe_layers) {
    want.layer = layer;
    absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::OpenHf(ckpt, *arch, config_path, want);
    if (!le.ok()) return le.status();
    if (layout->quantized) {
      if (absl::Status s = ValidateQuantSpec(layout->spec, arch->hidden); !s.ok())
        return absl::InvalidArgumentError(absl::StrCat(config_path, ": hidden_size: ", s.message()));
      if (absl::Status s = ValidateQuantSpec(layout->spec, arch->intermediate); !s.ok())
        return absl::InvalidArgumentError(absl::StrCat(config_path, ": moe_intermediate_size: ", s.message()));
    }
  }
  if (::mkdir(options.output.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoError(errno, absl::StrCat(options.output, ": cannot create the output folder"));
  }
  {
    char in_real[PATH_MAX], out_real[PATH_MAX];
    if (::realpath(options.input.c_str(), in_real) != nullptr &&
        ::realpath(options.output.c_str(), out_real) != nullptr && std::string(in_real) == out_real) {
      return absl::InvalidArgumentError(
          absl::StrCat("kt convert: --output ", options.output, " is the input folder; choose another folder"));
    }
  }
  // A rerun with a different method must not leave the old manifest describing the new files.
  ::unlink(absl::StrCat(options.output, "/", kManifestName).c_str());

  Manifest manifest;
  manifest.method = layout->method;
  manifest.layout = layout->tag;
  manifest.group_size = layout->quantized ? layout->spec.group_size : 0;
  manifest.architecture = arch->architecture;
  manifest.model_type = arch->model_type;
  manifest.num_layers = arch->num_layers;
  manifest.num_experts = arch->num_experts;
  manifest.top_k = arch->top_k;
  manifest.hidden = arch->hidden;
  manifest.intermediate = arch->intermediate;

  ConvertStats stats;
  stats.layers_total = static_cast<int>(arch->moe_layers.size());
  const int64_t E = arch->num_experts, H = arch->hidden, I = arch->intermediate;
  double convert_seconds = 0;
  int done_layers = 0;
  for (int layer : arch->moe_layers) {
    const Clock::time_point tl = Clock::now();
    ManifestLayer entry;
    entry.layer = layer;
    entry.file = LayerFileName(layer);
    const int64_t shapes[3][2] = {{I, H}, {I, H}, {H, I}};
    std::copy(&shapes[0][0], &shapes[0][0] + 6, &entry.shapes[0][0]);
    const std::string path = absl::StrCat(options.output, "/", entry.file);
    ++done_layers;

    ManifestLayer kept;
    if (LayerIsDone(path, entry, layout->tag, threads, &kept)) {
      manifest.layers.push_back(kept);
      ++stats.layers_skipped;
      if (options.progress) {
        std::fprintf(options.progress, "kt convert: layer %d (%d/%d) already converted, checksums verified\n",
                     layer, done_layers, stats.layers_total);
      }
      continue;
    }

    want.layer = layer;
    absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::OpenHf(ckpt, *arch, config_path, want);
    if (!le.ok()) return le.status();
    // Outputs of the layer: bf16 copies or quantized matrices, [E][3].
    std::vector<std::vector<bf16_t>> bf16(layout->quantized ? 0 : E * 3);
    std::vector<QuantizedMatrix> quant(layout->quantized ? E * 3 : 0);
    absl::Status st = ParallelTasks(static_cast<size_t>(E), threads, [&](size_t e) -> absl::Status {
      std::vector<bf16_t> buf;  // One expert matrix (a few MB; allocating it per expert costs nothing).
      for (int p = 0; p < 3; ++p) {
        const auto m = static_cast<ExpertMatrix>(p);
        const size_t n = (*le)->Rows(m), k = (*le)->Cols(m);
        if (!layout->quantized) {
          bf16[e * 3 + p].resize(n * k);
          if (absl::Status s = (*le)->ReadBf16(static_cast<int>(e), m, bf16[e * 3 + p].data()); !s.ok()) return s;
          continue;
        }
        buf.resize(n * k);
        if (absl::Status s = (*le)->ReadBf16(static_cast<int>(e), m, buf.data()); !s.ok()) return s;
        // The vectorized quantizer computes every format bit for bit as Quantize (quant_fast_test), and
        // gives Quantize's errors (a non-finite weight named by row and column).
        static const Isa isa = BestIsa(GetCpuFeatures());
        absl::StatusOr<QuantizedMatrix> q = QuantizeFast(isa, layout->spec, buf.data(), k, n, k);
        if (!q.ok()) {
          return absl::InvalidArgumentError(absl::StrCat(options.input, ": layer ", layer, " expert ", e, " ",
                                                         ExpertMatrixName(m), ": ", q.status().message()));
        }
        quant[e * 3 + p] = *std::move(q);
      }
      (*le)->DropPages(static_cast<int>(e));
      return absl::OkStatus();
    });
    if (!st.ok()) return st;
    stats.bytes_read += (*le)->weight_bytes();

    std::vector<TensorToWrite> tensors;
    auto bytes_of = [](const auto& v) {
      return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(v[0]));
    };
    for (int64_t e = 0; e < E; ++e) {
      for (int p = 0; p < 3; ++p) {
        const char* proj = ExpertMatrixName(static_cast<ExpertMatrix>(p));
        const int64_t n = shapes[p][0], k = shapes[p][1];
        if (!layout->quantized) {
          tensors.push_back({ConvertedTensorName(e, proj, "weight"), Dtype::kBf16, {n, k}, bytes_of(bf16[e * 3 + p])});
          continue;
        }
        const QuantizedMatrix& q = quant[e * 3 + p];
        const int64_t g = static_cast<int64_t>(ScalesPerRow(q.spec, k));
        tensors.push_back({ConvertedTensorName(e, proj, "qdata"), Dtype::kU8,
                           {n, static_cast<int64_t>(QuantizedRowBytes(q.spec, k))}, bytes_of(q.data)});
        tensors.push_back({ConvertedTensorName(e, proj, "scales"), Dtype::kF32, {n, g}, bytes_of(q.scales)});
        if (!q.zeros.empty()) {
          tensors.push_back({ConvertedTensorName(e, proj, "zeros"), Dtype::kU8, {n, g}, bytes_of(q.zeros)});
        }
      }
    }
    const std::map<std::string, std::string> meta = {
        {"kt_format", kConvertedFormat}, {"layout", layout->tag}, {"layer", absl::StrCat(layer)}};
    // A stale .done must never vouch for the file being replaced.
    ::unlink(absl::StrCat(path, kDoneSuffix).c_str());
    if (absl::Status s = WriteSafetensors(path, tensors, meta); !s.ok()) return s;
    tensors.clear();
    bf16.clear();
    bf16.shrink_to_fit();
    quant.clear();
    quant.shrink_to_fit();

    // Checksum what is on disk (from the page cache), in parallel over chunks.
    absl::StatusOr<MappedFile> written = MappedFile::Open(path);
    if (!written.ok()) return written.status();
    entry.bytes = written->size();
    entry.crc32c.assign(NumChecksumChunks(entry.bytes), 0);
    (void)ParallelTasks(entry.crc32c.size(), threads, [&](size_t i) {
      entry.crc32c[i] = ChunkCrc32c(written->data(), written->size(), i);
      const uint64_t begin = static_cast<uint64_t>(i) * kChecksumChunkBytes;
      DropMappedPages(written->data() + begin, std::min<uint64_t>(kChecksumChunkBytes, written->size() - begin));
      return absl::OkStatus();
    });
    *written = MappedFile();
    if (absl::Status s = WriteFileAtomically(absl::StrCat(path, kDoneSuffix), ManifestLayerToJson(entry) + "\n");
        !s.ok())
      return s;
    stats.bytes_written += entry.bytes;
    manifest.layers.push_back(entry);
    ++stats.layers_converted;

    const double dt = std::chrono::duration<double>(Clock::now() - tl).count();
    convert_seconds += dt;
    if (options.progress) {
      const int left = stats.layers_total - done_layers;
      const double eta = left * convert_seconds / stats.layers_converted;
      std::fprintf(options.progress,
                   "kt convert: layer %d (%d/%d) %.2f GB -> %.2f GB in %.1f s, %.2f GB/s read, ETA %s\n", layer,
                   done_layers, stats.layers_total, (*le)->weight_bytes() / 1e9, entry.bytes / 1e9, dt,
                   (*le)->weight_bytes() / 1e9 / std::max(dt, 1e-9), Hms(eta).c_str());
      std::fflush(options.progress);
    }
  }

  absl::StatusOr<std::string> config = ReadSmallFile(config_path);
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
