// kt convert's resumability (an internal part of :convert): what a layer file was made from, the record
// written beside it (layer_LLLL.safetensors.done), and whether a rerun may keep it.
#ifndef KT_IO_CONVERT_RESUME_H_
#define KT_IO_CONVERT_RESUME_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"

namespace kt {
namespace convert_internal {

// The CPUs of this process's affinity mask (at least 1).
int DefaultThreads();

// Runs fn(task) for task in [0, n) on `threads` threads; returns the first error (by task index).
absl::Status ParallelTasks(size_t n, int threads, const std::function<absl::Status(size_t)>& fn);

absl::StatusOr<std::string> ReadSmallFile(const std::string& path);

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
  std::vector<SourceTensor> tensors;  // LayerExperts::SourceSpans() order.
};

// A layer's .done file: the layout it was converted to, its manifest entry and its source.
struct DoneRecord {
  std::string layout;
  ManifestLayer entry;
  SourceRecord source;
};

absl::StatusOr<std::vector<SourceFile>> SourceFilesOf(const LayerExperts& le);
// CRC32C of every source tensor, in parallel over tensors (pages dropped once read).
std::vector<SourceTensor> SourceTensorsOf(const LayerExperts& le, int threads);

std::string DoneRecordToJson(const DoneRecord& d);
// The record beside `file_path` (<file_path>.done).
absl::StatusOr<DoneRecord> ReadDoneRecord(const std::string& file_path);

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
                            const LayerExperts& le, int threads);

// The layout an earlier conversion in `out` was made for, if any (the manifest, else any layer record),
// with the method when the manifest names it.
std::string EarlierLayout(const std::string& out, const std::vector<int>& layers, std::string* method);

}  // namespace convert_internal
}  // namespace kt

#endif  // KT_IO_CONVERT_RESUME_H_
