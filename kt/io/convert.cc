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
#include "absl/strings/str_join.h"
#include "kt/io/json.h"
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

// What a layer file was made from: the identity of the source files holding its tensors (a cheap test that
// nothing was rewritten: a write changes ctime, which no user can set back) and each source tensor's CRC32C
// (the decisive test when the identity differs, e.g. a copied or touched checkpoint).
struct SourceFile {
  std::string name;  // Relative to the input folder.
  int64_t bytes = 0, device = 0, inode = 0, mtime_ns = 0, ctime_ns = 0;
  bool operator==(const SourceFile& o) const {
    return name == o.name && bytes == o.bytes && device == o.device && inode == o.inode &&
           mtime_ns == o.mtime_ns && ctime_ns == o.ctime_ns;
  }
};
struct SourceTensor {
  std::string name;
  int64_t bytes = 0;
  uint32_t crc32c = 0;
  bool operator==(const SourceTensor& o) const {
    return name == o.name && bytes == o.bytes && crc32c == o.crc32c;
  }
};
struct SourceRecord {
  std::vector<SourceFile> files;      // Sorted by name.
  std::vector<SourceTensor> tensors;  // LayerExperts::SourceTensors() order.
};

// A layer's .done file: the layout it was converted to, its manifest entry and its source.
struct DoneRecord {
  std::string layout;
  ManifestLayer entry;
  SourceRecord source;
};

std::string Basename(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

absl::StatusOr<std::vector<SourceFile>> SourceFilesOf(const LayerExperts& le) {
  std::map<std::string, std::string> paths;  // name -> path
  for (const Checkpoint::Located& loc : le.SourceTensors()) paths[Basename(loc.file->path())] = loc.file->path();
  std::vector<SourceFile> files;
  for (const auto& [name, path] : paths) {
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) return ErrnoError(errno, absl::StrCat(path, ": cannot stat"));
    SourceFile f;
    f.name = name;
    f.bytes = st.st_size;
    f.device = static_cast<int64_t>(st.st_dev);
    f.inode = static_cast<int64_t>(st.st_ino);
    f.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
    f.ctime_ns = static_cast<int64_t>(st.st_ctim.tv_sec) * 1000000000 + st.st_ctim.tv_nsec;
    files.push_back(f);
  }
  return files;
}

// CRC32C of every source tensor, in parallel over tensors (pages dropped once read).
std::vector<SourceTensor> SourceTensorsOf(const LayerExperts& le, int threads) {
  const std::vector<Checkpoint::Located> locs = le.SourceTensors();
  std::vector<SourceTensor> out(locs.size());
  (void)ParallelTasks(locs.size(), threads, [&](size_t i) {
    const uint8_t* p = locs[i].file->data(*locs[i].info);
    const uint64_t n = locs[i].info->num_bytes();
    out[i].name = locs[i].info->name;
    out[i].bytes = static_cast<int64_t>(n);
    out[i].crc32c = Crc32c(p, n);
    DropMappedPages(p, n);
    return absl::OkStatus();
  });
  return out;
}

// Whether the tensors the layer reads now are those recorded (names and sizes; checksums not compared).
bool SameTensorList(const std::vector<SourceTensor>& recorded, const LayerExperts& le) {
  const std::vector<Checkpoint::Located> locs = le.SourceTensors();
  if (recorded.size() != locs.size()) return false;
  for (size_t i = 0; i < locs.size(); ++i) {
    if (recorded[i].name != locs[i].info->name ||
        recorded[i].bytes != static_cast<int64_t>(locs[i].info->num_bytes()))
      return false;
  }
  return true;
}

std::string DoneRecordToJson(const DoneRecord& d) {
  std::string files, tensors;
  for (const SourceFile& f : d.source.files) {
    absl::StrAppend(&files, files.empty() ? "" : ", ", "{\"name\": ", json::Quote(f.name), ", \"bytes\": ", f.bytes,
                    ", \"device\": ", f.device, ", \"inode\": ", f.inode, ", \"mtime_ns\": ", f.mtime_ns,
                    ", \"ctime_ns\": ", f.ctime_ns, "}");
  }
  for (const SourceTensor& t : d.source.tensors) {
    absl::StrAppend(&tensors, tensors.empty() ? "" : ",\n    ", "{\"name\": ", json::Quote(t.name),
                    ", \"bytes\": ", t.bytes, ", \"crc32c\": \"", Crc32cHex(t.crc32c), "\"}");
  }
  return absl::StrCat("{\"layout\": ", json::Quote(d.layout), ",\n \"entry\": ", ManifestLayerToJson(d.entry),
                      ",\n \"source_files\": [", files, "],\n \"source_tensors\": [\n    ", tensors, "]}\n");
}

// Strict enough to trust: a record that does not parse is treated as absent (the layer is converted again).
absl::StatusOr<DoneRecord> ParseDoneRecord(absl::string_view text, const std::string& origin) {
  absl::StatusOr<json::Value> root = json::Parse(text);
  if (!root.ok()) return root.status();
  auto bad = [&](absl::string_view what) { return absl::InvalidArgumentError(absl::StrCat(origin, ": ", what)); };
  const json::Value* layout = root->Find("layout");
  const json::Value* entry = root->is_object() ? root->Find("entry") : nullptr;
  const json::Value* files = root->is_object() ? root->Find("source_files") : nullptr;
  const json::Value* tensors = root->is_object() ? root->Find("source_tensors") : nullptr;
  if (layout == nullptr || !layout->is_string() || entry == nullptr || files == nullptr || !files->is_array() ||
      tensors == nullptr || !tensors->is_array()) {
    return bad("not a kt convert layer record (layout, entry, source_files, source_tensors)");
  }
  DoneRecord d;
  d.layout = layout->as_string();
  absl::StatusOr<ManifestLayer> e = ManifestLayerFromJson(*entry, "entry", origin);
  if (!e.ok()) return e.status();
  d.entry = *std::move(e);
  auto get_int = [](const json::Value& o, const char* key, int64_t* out) {
    const json::Value* v = o.is_object() ? o.Find(key) : nullptr;
    if (v == nullptr || !v->is_int()) return false;
    *out = v->as_int();
    return true;
  };
  for (const json::Value& f : files->elements()) {
    SourceFile sf;
    const json::Value* name = f.is_object() ? f.Find("name") : nullptr;
    if (name == nullptr || !name->is_string() || !get_int(f, "bytes", &sf.bytes) ||
        !get_int(f, "device", &sf.device) || !get_int(f, "inode", &sf.inode) ||
        !get_int(f, "mtime_ns", &sf.mtime_ns) || !get_int(f, "ctime_ns", &sf.ctime_ns)) {
      return bad("source_files entries need name, bytes, device, inode, mtime_ns, ctime_ns");
    }
    sf.name = name->as_string();
    d.source.files.push_back(sf);
  }
  for (const json::Value& t : tensors->elements()) {
    SourceTensor st;
    const json::Value* name = t.is_object() ? t.Find("name") : nullptr;
    const json::Value* crc = t.is_object() ? t.Find("crc32c") : nullptr;
    if (name == nullptr || !name->is_string() || !get_int(t, "bytes", &st.bytes) || crc == nullptr ||
        !crc->is_string()) {
      return bad("source_tensors entries need name, bytes, crc32c");
    }
    absl::StatusOr<uint32_t> c = ParseCrc32cHex(crc->as_string());
    if (!c.ok()) return bad(c.status().message());
    st.name = name->as_string();
    st.crc32c = *c;
    d.source.tensors.push_back(st);
  }
  return d;
}

absl::StatusOr<DoneRecord> ReadDoneRecord(const std::string& file_path) {
  const std::string done_path = absl::StrCat(file_path, kDoneSuffix);
  absl::StatusOr<std::string> text = ReadSmallFile(done_path);
  if (!text.ok()) return text.status();
  return ParseDoneRecord(*text, done_path);
}

// Whether the layer file still has the size and checksums its record gives, and was written for `layout`.
bool OutputMatches(const std::string& file_path, const DoneRecord& done, const std::string& layout, int threads) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(file_path);
  if (!f.ok() || (*f)->file_size() != done.entry.bytes) return false;
  const auto meta = (*f)->metadata().find("layout");
  if (meta == (*f)->metadata().end() || meta->second != layout) return false;
  std::vector<uint32_t> crc(done.entry.crc32c.size());
  (void)ParallelTasks(crc.size(), threads, [&](size_t i) {
    crc[i] = ChunkCrc32c((*f)->file_data(), (*f)->file_size(), i);
    // Verified pages need not stay resident (a resumed run then peaks at a few chunks, not a layer).
    const uint64_t begin = static_cast<uint64_t>(i) * kChecksumChunkBytes;
    DropMappedPages((*f)->file_data() + begin, std::min<uint64_t>(kChecksumChunkBytes, (*f)->file_size() - begin));
    return absl::OkStatus();
  });
  return crc == done.entry.crc32c;
}

// What a rerun does with a layer an earlier run wrote.
struct ResumeDecision {
  bool keep = false;
  std::string why;  // For the progress line when not kept ("" when there was nothing to keep).
  // When kept: the current source identity, if it differs from the record (the .done is then rewritten).
  bool refresh_identity = false;
  SourceRecord source;  // Valid when keep, or when the tensors' checksums were computed for the decision.
  bool have_tensor_crcs = false;
};

// An earlier run's layer is kept only when it was made for this layout and these shapes, the file still has
// its recorded size and checksums, and it was made from the same source tensors: the same files
// (identity unchanged) or, failing that, tensors with the same CRC32Cs.
ResumeDecision DecideResume(const std::string& file_path, const ManifestLayer& want_shape, const std::string& layout,
                            const LayerExperts& le, int threads) {
  ResumeDecision d;
  const std::string done_path = absl::StrCat(file_path, kDoneSuffix);
  if (!Exists(done_path) || !Exists(file_path)) return d;
  absl::StatusOr<DoneRecord> done = ReadDoneRecord(file_path);
  if (!done.ok()) {
    d.why = "its record does not parse (written by another kt version?)";
    return d;
  }
  if (done->layout != layout || done->entry.layer != want_shape.layer || done->entry.file != want_shape.file) {
    d.why = "it was converted for another layout";
    return d;
  }
  for (int p = 0; p < 3; ++p) {
    if (done->entry.shapes[p][0] != want_shape.shapes[p][0] || done->entry.shapes[p][1] != want_shape.shapes[p][1]) {
      d.why = "its shapes differ from config.json's";
      return d;
    }
  }
  absl::StatusOr<std::vector<SourceFile>> files = SourceFilesOf(le);
  if (!files.ok()) {
    d.why = std::string(files.status().message());
    return d;
  }
  d.source.files = *files;
  if (*files == done->source.files && SameTensorList(done->source.tensors, le)) {
    d.source.tensors = done->source.tensors;
  } else {
    d.source.tensors = SourceTensorsOf(le, threads);
    d.have_tensor_crcs = true;
    if (d.source.tensors != done->source.tensors) {
      const std::vector<SourceTensor>& was = done->source.tensors;
      std::string which = "the list of its tensors changed";
      for (size_t i = 0; i < std::min(was.size(), d.source.tensors.size()); ++i) {
        if (!(was[i] == d.source.tensors[i])) {
          which = absl::StrCat("tensor ", d.source.tensors[i].name, " changed");
          break;
        }
      }
      d.why = absl::StrCat("its source changed since it was converted (", which, ")");
      return d;
    }
    d.refresh_identity = true;
  }
  if (!OutputMatches(file_path, *done, layout, threads)) {
    d.why = "the layer file does not match its recorded size and checksums";
    return d;
  }
  d.keep = true;
  return d;
}

// The layout an earlier conversion in `out` was made for, if any (the manifest, else any layer record),
// with the method when the manifest names it.
std::string EarlierLayout(const std::string& out, const std::vector<int>& layers, std::string* method) {
  if (absl::StatusOr<Manifest> m = ReadManifest(out); m.ok()) {
    *method = m->method;
    return m->layout;
  }
  for (int layer : layers) {
    absl::StatusOr<DoneRecord> d = ReadDoneRecord(absl::StrCat(out, "/", LayerFileName(layer)));
    if (d.ok()) return d->layout;
  }
  return "";
}

std::string Hms(double s) {
  const int64_t t = static_cast<int64_t>(s + 0.5);
  return absl::StrFormat("%d:%02d:%02d", t / 3600, (t / 60) % 60, t % 60);
}

}  // namespace

absl::StatusOr<ConvertStats> ConvertCheckpoint(const ConvertOptions& options) {
  const Clock::time_point t0 = Clock::now();
  if (options.group_size != 0 && !MethodTakesGroupSize(options.method)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--group-size ", options.group_size, ": method ", options.method,
        " has no groups (only AMXINT4_KGroup, AMXINT4_1KGroup, MOE_INT4_KGroup and MOE_INT4_1KGroup take a "
        "group size); drop --group-size"));
  }
  absl::StatusOr<MethodLayout> layout =
      LayoutOfMethod(options.method, options.group_size != 0 ? options.group_size : 128);
  if (!layout.ok()) return layout.status();
  if (const std::string why = MethodNotLoadableReason(options.method); !why.empty()) {
    return absl::UnimplementedError(absl::StrCat("--method ", options.method, ": ", why));
  }
  if (options.input.empty() || options.output.empty()) {
    return absl::InvalidArgumentError("--input and --output are required");
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
          absl::StrCat("--output ", options.output, " is the input folder; choose another folder"));
    }
  }
  // One writer per output folder: a second kt convert into it fails here instead of interleaving files.
  absl::StatusOr<DirectoryLock> lock = DirectoryLock::Acquire(options.output);
  if (!lock.ok()) return lock.status();
  // Under the lock, any temporary in the folder is an interrupted run's (a live writer would hold the lock).
  absl::StatusOr<std::vector<std::string>> stale = RemoveAtomicTemporaries(options.output);
  if (!stale.ok()) return stale.status();
  ConvertStats stats;
  stats.temporaries_removed = static_cast<int>(stale->size());
  if (!stale->empty() && options.progress) {
    std::fprintf(options.progress, "kt convert: removed %zu unfinished file(s) of an interrupted run: %s\n",
                 stale->size(), absl::StrJoin(*stale, ", ").c_str());
  }
  {
    std::string earlier_method;
    const std::string earlier = EarlierLayout(options.output, arch->moe_layers, &earlier_method);
    if (!earlier.empty() && earlier != layout->tag) {
      return absl::FailedPreconditionError(absl::StrCat(
          options.output, " holds a conversion", earlier_method.empty() ? "" : " for method ", earlier_method,
          " in layout ", earlier, "; converting for ", options.method, " (", layout->tag,
          ") would replace it: choose another --output, or remove that folder first"));
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

    want.layer = layer;
    absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::OpenHf(ckpt, *arch, config_path, want);
    if (!le.ok()) return le.status();
    ResumeDecision resume = DecideResume(path, entry, layout->tag, **le, threads);
    if (resume.keep) {
      absl::StatusOr<DoneRecord> done = ReadDoneRecord(path);
      if (!done.ok()) return done.status();
      if (resume.refresh_identity) {
        done->source = resume.source;
        if (absl::Status s = WriteFileAtomically(absl::StrCat(path, kDoneSuffix), DoneRecordToJson(*done)); !s.ok())
          return s;
      }
      manifest.layers.push_back(done->entry);
      ++stats.layers_skipped;
      if (options.progress) {
        std::fprintf(options.progress,
                     "kt convert: layer %d (%d/%d) already converted from the same source, checksums verified\n",
                     layer, done_layers, stats.layers_total);
      }
      continue;
    }
    if (!resume.why.empty() && options.progress) {
      std::fprintf(options.progress, "kt convert: layer %d: converting again: %s\n", layer, resume.why.c_str());
    }
    DoneRecord record;
    record.layout = layout->tag;
    if (absl::StatusOr<std::vector<SourceFile>> files = SourceFilesOf(**le); files.ok()) {
      record.source.files = *std::move(files);
    } else {
      return files.status();
    }
    // Checksummed before reading for conversion: a source rewritten during the run then fails the next
    // run's comparison instead of vouching for a layer made from other bytes.
    record.source.tensors = resume.have_tensor_crcs ? resume.source.tensors : SourceTensorsOf(**le, threads);

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
        if ((*le)->quantized()) {  // an FP8 checkpoint read for method FP8: its codes and scales as they are
          if (absl::Status s = (*le)->ReadQuantized(static_cast<int>(e), m, &quant[e * 3 + p]); !s.ok()) return s;
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
    record.entry = entry;
    if (absl::Status s = WriteFileAtomically(absl::StrCat(path, kDoneSuffix), DoneRecordToJson(record)); !s.ok())
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
