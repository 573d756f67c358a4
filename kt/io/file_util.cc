#include "kt/io/file_util.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kt {

absl::Status ErrnoError(int err, absl::string_view message) {
  const std::string text = absl::StrCat(message, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
      return absl::NotFoundError(text);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(text);
    default:
      return absl::UnavailableError(text);
  }
}

absl::Status WriteAll(int fd, const void* data, size_t n, absl::string_view name) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    // Linux writes at most ~2 GiB per call; loop over partial writes and EINTR.
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, absl::StrCat(name, ": write failed"));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

absl::Status FileSink::WriteZeros(uint64_t n) {
  static const char kZeros[4096] = {};
  while (n > 0) {
    const size_t piece = static_cast<size_t>(std::min<uint64_t>(n, sizeof(kZeros)));
    absl::Status s = Write(kZeros, piece);
    if (!s.ok()) return s;
    n -= piece;
  }
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, absl::FunctionRef<absl::Status(FileSink&)> write) {
  // O_TRUNC, not O_EXCL: a leftover <path>.tmp.<pid> can only come from a crashed process that had our pid
  // (containers restart with the same small pids), and it must not block every later write.
  const std::string tmp = absl::StrCat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, absl::StrCat(tmp, ": cannot create"));

  FileSink sink(fd, tmp);
  absl::Status status = write(sink);
  // fsync before rename: otherwise a power loss can leave the new name pointing at a file whose data never
  // reached the disk.
  if (status.ok() && ::fsync(fd) != 0) status = ErrnoError(errno, absl::StrCat(tmp, ": fsync failed"));
  if (::close(fd) != 0 && status.ok()) status = ErrnoError(errno, absl::StrCat(tmp, ": close failed"));
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = ErrnoError(errno, absl::StrCat(path, ": cannot rename ", tmp, " to it"));
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  // Persist the rename itself (best effort: some file systems refuse fsync on a directory).
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::Status WriteFileAtomically(const std::string& path, absl::string_view contents) {
  return WriteFileAtomically(path, [contents](FileSink& sink) { return sink.Write(contents); });
}

absl::StatusOr<MappedFile> MappedFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, absl::StrCat(path, ": cannot open"));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return ErrnoError(err, absl::StrCat(path, ": cannot stat"));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {  // mmap cannot map 0 bytes.
    ::close(fd);
    return MappedFile(path, nullptr, 0);
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // The mapping keeps the file referenced.
  if (map == MAP_FAILED) return ErrnoError(map_err, absl::StrCat(path, ": cannot mmap ", size, " bytes"));
  return MappedFile(path, static_cast<const uint8_t*>(map), size);
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    Unmap();
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void MappedFile::Unmap() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
  data_ = nullptr;
  size_ = 0;
}

void DropMappedPages(const void* p, size_t n) {
  if (p == nullptr || n == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  // Only for MAP_PRIVATE maps never written (MappedFile's): DONTNEED then loses nothing.
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

}  // namespace kt
