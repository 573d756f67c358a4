#include "kt/io/convert_resume.h"

#include <errno.h>
#include <sched.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kt/io/checksum.h"
#include "kt/io/file_util.h"
#include "kt/io/json.h"
#include "kt/io/safetensors.h"

namespace kt {
namespace convert_internal {
namespace {

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::string Basename(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Whether the tensors the layer reads now are those recorded (names and sizes; checksums not compared).
bool SameTensorList(const std::vector<SourceTensor>& recorded, const LayerExperts& le) {
  const std::vector<LayerExperts::SourceBytes> spans = le.SourceSpans();
  if (recorded.size() != spans.size()) return false;
  for (size_t i = 0; i < spans.size(); ++i) {
    if (recorded[i].name != spans[i].name || recorded[i].bytes != static_cast<int64_t>(spans[i].bytes)) return false;
  }
  return true;
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

}  // namespace

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

absl::StatusOr<std::vector<SourceFile>> SourceFilesOf(const LayerExperts& le) {
  std::map<std::string, std::string> paths;  // name -> path
  for (const LayerExperts::SourceBytes& span : le.SourceSpans()) paths[Basename(span.path)] = span.path;
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
  const std::vector<LayerExperts::SourceBytes> spans = le.SourceSpans();
  std::vector<SourceTensor> out(spans.size());
  (void)ParallelTasks(spans.size(), threads, [&](size_t i) {
    const uint8_t* p = spans[i].data;
    const uint64_t n = spans[i].bytes;
    out[i].name = spans[i].name;
    out[i].bytes = static_cast<int64_t>(n);
    out[i].crc32c = Crc32c(p, n);
    DropMappedPages(p, n);
    return absl::OkStatus();
  });
  return out;
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

absl::StatusOr<DoneRecord> ReadDoneRecord(const std::string& file_path) {
  const std::string done_path = absl::StrCat(file_path, kDoneSuffix);
  absl::StatusOr<std::string> text = ReadSmallFile(done_path);
  if (!text.ok()) return text.status();
  return ParseDoneRecord(*text, done_path);
}

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

}  // namespace convert_internal
}  // namespace kt
