#include "kt/io/file_util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace kt {

namespace {

// The temporaries WriteFileAtomically has open, for the interrupt handler: a fixed table (the handler may
// not allocate or lock). A slot is claimed by CAS on `used`, its path written, then `ready` published;
// the handler reads only ready slots. More concurrent writers than slots are simply not tracked (their
// temporaries are still removed by the next run's RemoveAtomicTemporaries).
constexpr int kTempSlots = 16;
struct TempSlot {
  std::atomic<bool> used{false};
  std::atomic<bool> ready{false};
  char path[PATH_MAX];
};
TempSlot g_temp_slots[kTempSlots];
const char* g_program = "kt";

int TrackTemporary(const std::string& path) {
  if (path.size() >= PATH_MAX) return -1;
  for (int i = 0; i < kTempSlots; ++i) {
    bool expected = false;
    if (g_temp_slots[i].used.compare_exchange_strong(expected, true)) {
      std::memcpy(g_temp_slots[i].path, path.c_str(), path.size() + 1);
      g_temp_slots[i].ready.store(true, std::memory_order_release);
      return i;
    }
  }
  return -1;
}

void UntrackTemporary(int slot) {
  if (slot < 0) return;
  g_temp_slots[slot].ready.store(false, std::memory_order_release);
  g_temp_slots[slot].used.store(false, std::memory_order_release);
}

void WriteStderr(const char* s) {
  size_t n = std::strlen(s);
  while (n > 0) {
    const ssize_t w = ::write(2, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

void OnInterrupt(int sig) {
  const int saved_errno = errno;
  WriteStderr(g_program);
  WriteStderr(sig == SIGINT ? ": interrupted by SIGINT" : ": interrupted by SIGTERM");
  bool any = false;
  for (TempSlot& slot : g_temp_slots) {
    if (!slot.ready.load(std::memory_order_acquire)) continue;
    if (::unlink(slot.path) == 0) {
      WriteStderr(any ? ", " : "; removed the unfinished ");
      WriteStderr(slot.path);
      any = true;
    }
  }
  WriteStderr(any ? "\n" : "; no unfinished file left\n");
  // Terminate as the signal would have (exit status 128 + sig for the shell).
  ::signal(sig, SIG_DFL);
  errno = saved_errno;
  ::raise(sig);
}

}  // namespace

void InstallInterruptCleanup(const char* program) {
  g_program = program;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnInterrupt;
  sigemptyset(&sa.sa_mask);
  // Block the other signal while one is handled, so the table is walked once.
  sigaddset(&sa.sa_mask, SIGINT);
  sigaddset(&sa.sa_mask, SIGTERM);
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
}

bool IsAtomicTemporaryName(absl::string_view name) {
  const size_t at = name.rfind(".tmp.");
  if (at == absl::string_view::npos || at == 0) return false;
  const absl::string_view digits = name.substr(at + 5);
  if (digits.empty()) return false;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

absl::StatusOr<std::vector<std::string>> RemoveAtomicTemporaries(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoError(errno, absl::StrCat(dir, ": cannot list"));
  std::vector<std::string> names;
  while (const struct dirent* ent = ::readdir(d)) {
    if (IsAtomicTemporaryName(ent->d_name)) names.emplace_back(ent->d_name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    const std::string path = absl::StrCat(dir, "/", name);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return ErrnoError(errno, absl::StrCat(path, ": cannot remove this unfinished temporary file"));
    }
  }
  return names;
}

absl::StatusOr<DirectoryLock> DirectoryLock::Acquire(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, absl::StrCat(dir, ": cannot open the folder to lock it"));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": another process holds its lock (another kt convert writing into this folder?); wait for it "
          "to finish or choose another output folder"));
    }
    return ErrnoError(err, absl::StrCat(dir, ": cannot lock"));
  }
  return DirectoryLock(fd);
}

DirectoryLock& DirectoryLock::operator=(DirectoryLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

DirectoryLock::~DirectoryLock() {
  if (fd_ >= 0) ::close(fd_);  // Closing the last descriptor releases the flock.
}

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
  const int slot = TrackTemporary(tmp);

  FileSink sink(fd, tmp);
  absl::Status status = write(sink);
  // fsync before rename: otherwise a power loss can leave the new name pointing at a file whose data never
  // reached the disk.
  if (status.ok() && ::fsync(fd) != 0) status = ErrnoError(errno, absl::StrCat(tmp, ": fsync failed"));
  if (::close(fd) != 0 && status.ok()) status = ErrnoError(errno, absl::StrCat(tmp, ": close failed"));
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = ErrnoError(errno, absl::StrCat(path, ": cannot rename ", tmp, " to it"));
  }
  if (!status.ok()) ::unlink(tmp.c_str());
  UntrackTemporary(slot);
  if (!status.ok()) return status;
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
