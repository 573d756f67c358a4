// File primitives shared by the weight readers and writers: errno -> absl::Status, an atomic whole-file
// writer (temporary file, fsync, rename) and a read-only memory map. Every error names the file.
#ifndef KT_IO_FILE_UTIL_H_
#define KT_IO_FILE_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kt {

// "<message>: <strerror(err)>" with the closest status code: NotFound for ENOENT, PermissionDenied for
// EACCES/EPERM, Unavailable otherwise. `message` should name the file ("<path>: cannot open").
absl::Status ErrnoError(int err, absl::string_view message);

// Writes all `n` bytes to `fd`, looping over partial writes (Linux writes at most ~2 GiB per call) and
// EINTR. `name` names the file in the error ("<name>: write failed: ...").
absl::Status WriteAll(int fd, const void* data, size_t n, absl::string_view name);

// Appends to the temporary file of WriteFileAtomically; only valid inside its callback.
class FileSink {
 public:
  absl::Status Write(const void* data, size_t n) { return WriteAll(fd_, data, n, path_); }
  absl::Status Write(absl::string_view bytes) { return Write(bytes.data(), bytes.size()); }
  // `n` zero bytes (padding), written in page-sized pieces.
  absl::Status WriteZeros(uint64_t n);
  // The temporary file's path (errors name it).
  const std::string& path() const { return path_; }

 private:
  friend absl::Status WriteFileAtomically(const std::string&, absl::FunctionRef<absl::Status(FileSink&)>);
  FileSink(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  int fd_;
  std::string path_;
};

// Writes `path` atomically: `write` fills `<path>.tmp.<pid>` (created with O_TRUNC: a leftover from a crashed
// process that had the same pid, common in containers, must not block later writes), which is fsynced and
// renamed over `path`, then the folder is fsynced (best effort). A crash leaves the old file or the complete
// new one. On any error, including one returned by `write` (returned unchanged), the temporary is removed.
absl::Status WriteFileAtomically(const std::string& path, absl::FunctionRef<absl::Status(FileSink&)> write);
// The same with the whole contents in memory.
absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents);

// Interrupts (SIGINT, SIGTERM) while WriteFileAtomically runs: InstallInterruptCleanup installs handlers
// that remove every temporary file WriteFileAtomically has open in this process, print one line to stderr
// ("<program>: interrupted by SIGINT; removed <tmp>"), and then let the signal terminate the process as it
// would have (default action, re-raised). Only async-signal-safe calls run in the handler. Call it once,
// from a program's main path (the `kt` command line); a library never installs handlers by itself.
void InstallInterruptCleanup(const char* program);

// Whether `name` is a temporary of WriteFileAtomically ("<anything>.tmp.<digits>").
bool IsAtomicTemporaryName(absl::string_view name);
// Removes the WriteFileAtomically temporaries directly in `dir` (not recursive) and returns their names.
// Only safe while no other process writes into `dir` (hold its DirectoryLock).
absl::StatusOr<std::vector<std::string>> RemoveAtomicTemporaries(const std::string& dir);

// An exclusive advisory lock (flock) on a folder, held until destruction: two writers of one output folder
// exclude each other. Movable, not copyable.
class DirectoryLock {
 public:
  // FailedPrecondition ("<dir>: another process holds its lock ...") if someone else holds it; errno
  // errors for a folder that cannot be opened.
  static absl::StatusOr<DirectoryLock> Acquire(const std::string& dir);

  DirectoryLock() = default;
  DirectoryLock(DirectoryLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  DirectoryLock& operator=(DirectoryLock&& other) noexcept;
  DirectoryLock(const DirectoryLock&) = delete;
  DirectoryLock& operator=(const DirectoryLock&) = delete;
  ~DirectoryLock();

 private:
  explicit DirectoryLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

// A read-only MAP_PRIVATE map of a whole regular file, unmapped on destruction. Movable, not copyable.
//
// An empty file opens fine with size() 0 and data() nullptr (mmap cannot map 0 bytes): whether that is an
// error is the format's to say. The file is assumed not to shrink while mapped (reads past a truncated end
// raise SIGBUS, as with every mmap reader).
// Releases this process's pages of the read-only file mapping covering [p, p + n) (madvise MADV_DONTNEED,
// the range widened to whole pages): they leave the resident set, stay in the page cache, and fault back
// in from the file if read again. How a streaming converter keeps its RSS at one layer. Best effort.
void DropMappedPages(const void* p, size_t n);

class MappedFile {
 public:
  // Errors: "<path>: cannot open: <strerror>" (NotFound for a missing file), "<path>: cannot stat: ...",
  // "<path>: not a regular file" (InvalidArgument), "<path>: cannot mmap <n> bytes: ...".
  static absl::StatusOr<MappedFile> Open(const std::string& path);

  MappedFile() = default;  // Empty: no file.
  MappedFile(MappedFile&& other) noexcept { *this = std::move(other); }
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile() { Unmap(); }

  const std::string& path() const { return path_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  absl::string_view view() const { return {reinterpret_cast<const char*>(data_), size_}; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  void Unmap();

  std::string path_;
  const uint8_t* data_ = nullptr;  // nullptr when size_ is 0.
  size_t size_ = 0;
};

}  // namespace kt

#endif  // KT_IO_FILE_UTIL_H_
