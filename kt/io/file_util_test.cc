#include "kt/io/file_util.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/test_files.h"

namespace kt {
namespace {

using ::testing::HasSubstr;
using testing_files::ReadRaw;
using testing_files::TestPath;
using testing_files::WriteRaw;

// A fresh folder for the current test (TempDir() ends with '/').
std::string TestDir() {
  const std::string dir =
      absl::StrCat(::testing::TempDir(), ::testing::UnitTest::GetInstance()->current_test_info()->name());
  ::mkdir(dir.c_str(), 0755);
  return dir;
}



std::vector<std::string> List(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return names;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  closedir(d);
  return names;
}

TEST(ErrnoErrorTest, CodesAndMessage) {
  absl::Status s = ErrnoError(ENOENT, "/x/y: cannot open");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("/x/y: cannot open: "));
  EXPECT_EQ(ErrnoError(EACCES, "f").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ErrnoError(EPERM, "f").code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(ErrnoError(EIO, "f").code(), absl::StatusCode::kUnavailable);
}

TEST(WriteFileAtomicallyTest, CreatesAndReplaces) {
  const std::string dir = TestDir();
  const std::string path = dir + "/out.bin";
  ASSERT_TRUE(WriteFileAtomically(path, "first version, longer").ok());
  EXPECT_EQ(ReadRaw(path), "first version, longer");
  ASSERT_TRUE(WriteFileAtomically(path, "second").ok());
  EXPECT_EQ(ReadRaw(path), "second");
  EXPECT_THAT(List(dir), ::testing::ElementsAre("out.bin"));
}

TEST(WriteFileAtomicallyTest, CallbackPiecesAndZeros) {
  const std::string path = TestDir() + "/out.bin";
  absl::Status s = WriteFileAtomically(path, [](FileSink& out) {
    EXPECT_THAT(out.path(), HasSubstr("out.bin.tmp."));
    absl::Status st = out.Write("ab");
    if (st.ok()) st = out.WriteZeros(10000);  // More than one internal piece.
    if (st.ok()) st = out.Write("cd", 2);
    return st;
  });
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(ReadRaw(path), absl::StrCat("ab", std::string(10000, '\0'), "cd"));
}

TEST(WriteFileAtomicallyTest, MissingFolderFailsAndLeavesNoTemporary) {
  const std::string dir = TestDir();
  const std::string path = dir + "/no/such/dir/out.bin";
  absl::Status s = WriteFileAtomically(path, "x");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr(absl::StrCat(path, ".tmp.", ::getpid(), ": cannot create")));
  EXPECT_THAT(List(dir), ::testing::IsEmpty());
}

TEST(WriteFileAtomicallyTest, CallbackErrorKeepsOldFileAndRemovesTemporary) {
  const std::string dir = TestDir();
  const std::string path = dir + "/out.bin";
  WriteRaw(path, "old");
  absl::Status s = WriteFileAtomically(path, [](FileSink& out) {
    absl::Status st = out.Write("partial new contents");
    EXPECT_TRUE(st.ok());
    return absl::InvalidArgumentError("callback failed");
  });
  EXPECT_EQ(s, absl::InvalidArgumentError("callback failed"));  // Returned unchanged.
  EXPECT_EQ(ReadRaw(path), "old");
  EXPECT_THAT(List(dir), ::testing::ElementsAre("out.bin"));
}

TEST(WriteFileAtomicallyTest, StaleTemporaryIsTruncated) {
  // A leftover <path>.tmp.<pid> from a crashed process with our pid must not block or pollute the write.
  const std::string dir = TestDir();
  const std::string path = dir + "/out.bin";
  WriteRaw(absl::StrCat(path, ".tmp.", ::getpid()), std::string(1000, 'z'));
  ASSERT_TRUE(WriteFileAtomically(path, "new").ok());
  EXPECT_EQ(ReadRaw(path), "new");
  EXPECT_THAT(List(dir), ::testing::ElementsAre("out.bin"));
}

TEST(WriteFileAtomicallyTest, RenameOntoFolderFailsAndLeavesNoTemporary) {
  const std::string dir = TestDir();
  const std::string path = dir + "/sub";
  ASSERT_EQ(::mkdir(path.c_str(), 0755), 0);
  absl::Status s = WriteFileAtomically(path, "x");
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(absl::StrCat(path, ": cannot rename ", path, ".tmp.")));
  EXPECT_THAT(List(dir), ::testing::ElementsAre("sub"));
}

TEST(MappedFileTest, MapsContents) {
  const std::string path = TestDir() + "/in.bin";
  WriteRaw(path, std::string("hello\0world", 11));
  absl::StatusOr<MappedFile> f = MappedFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->size(), 11u);
  EXPECT_EQ(f->view(), absl::string_view("hello\0world", 11));
  EXPECT_EQ(f->data()[6], 'w');

  // Moving hands over the map; the source is left empty.
  MappedFile moved = *std::move(f);
  EXPECT_EQ(moved.size(), 11u);
  EXPECT_EQ(moved.view(), absl::string_view("hello\0world", 11));
  MappedFile other;
  EXPECT_EQ(other.size(), 0u);
  other = std::move(moved);
  EXPECT_EQ(other.view(), absl::string_view("hello\0world", 11));
  EXPECT_EQ(moved.data(), nullptr);
  EXPECT_EQ(moved.size(), 0u);
}

TEST(MappedFileTest, EmptyFileIsAnEmptyMap) {
  // mmap cannot map 0 bytes; an empty file is not an error here (the format decides: the safetensors and
  // GGUF readers report it as truncated, naming the file).
  const std::string path = TestDir() + "/empty.bin";
  WriteRaw(path, "");
  absl::StatusOr<MappedFile> f = MappedFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->size(), 0u);
  EXPECT_EQ(f->data(), nullptr);
  EXPECT_TRUE(f->view().empty());
}

TEST(MappedFileTest, MissingFileNamesThePath) {
  const std::string path = TestDir() + "/none.bin";
  absl::StatusOr<MappedFile> f = MappedFile::Open(path);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(f.status().message()), HasSubstr(path + ": cannot open: "));
}

TEST(MappedFileTest, FolderIsNotARegularFile) {
  const std::string dir = TestDir();
  absl::StatusOr<MappedFile> f = MappedFile::Open(dir);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.status().message(), dir + ": not a regular file");
}

// SIGINT or SIGTERM in the middle of an atomic write (in a child process): the handler removes the
// temporary, prints one line naming it, and the process still dies of the signal (exit status 128 + sig).
void InterruptMidWrite(int sig) {
  const std::string dir = TestDir();
  const std::string path = dir + "/layer_0003.safetensors";
  int err_pipe[2];
  ASSERT_EQ(::pipe(err_pipe), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::dup2(err_pipe[1], 2);
    ::close(err_pipe[0]);
    InstallInterruptCleanup("kt convert");
    (void)WriteFileAtomically(path, [&](FileSink& sink) {
      (void)sink.Write("half of a layer");
      ::raise(sig);
      return absl::OkStatus();
    });
    ::_exit(3);  // Not reached: the signal terminates the child.
  }
  ::close(err_pipe[1]);
  std::string err;
  char buf[512];
  for (ssize_t n; (n = ::read(err_pipe[0], buf, sizeof(buf))) > 0;) err.append(buf, static_cast<size_t>(n));
  ::close(err_pipe[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "exit status " << status << ", stderr: " << err;
  EXPECT_EQ(WTERMSIG(status), sig);
  const std::string tmp = absl::StrCat(path, ".tmp.", child);
  EXPECT_EQ(err, absl::StrCat("kt convert: interrupted by ", sig == SIGINT ? "SIGINT" : "SIGTERM",
                              "; removed the unfinished ", tmp, "\n"));
  for (const std::string& name : List(dir)) EXPECT_NE(name, absl::StrCat("layer_0003.safetensors.tmp.", child));
  struct stat st;
  EXPECT_NE(::stat(path.c_str(), &st), 0) << "the final name must not exist";
}

TEST(InterruptTest, SigintRemovesTheTemporaryAndKillsTheProcess) { InterruptMidWrite(SIGINT); }
TEST(InterruptTest, SigtermRemovesTheTemporaryAndKillsTheProcess) { InterruptMidWrite(SIGTERM); }

TEST(AtomicTemporariesTest, NamesAndRemoval) {
  EXPECT_TRUE(IsAtomicTemporaryName("layer_0001.safetensors.tmp.123"));
  EXPECT_TRUE(IsAtomicTemporaryName("kt_manifest.json.tmp.1"));
  EXPECT_FALSE(IsAtomicTemporaryName("notes.tmp.txt"));
  EXPECT_FALSE(IsAtomicTemporaryName("x.tmp."));
  EXPECT_FALSE(IsAtomicTemporaryName(".tmp.12"));
  EXPECT_FALSE(IsAtomicTemporaryName("layer_0001.safetensors"));
  const std::string dir = TestDir();
  WriteRaw(dir + "/a.safetensors.tmp.99", "x");
  WriteRaw(dir + "/a.safetensors", "y");
  absl::StatusOr<std::vector<std::string>> removed = RemoveAtomicTemporaries(dir);
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_EQ(*removed, std::vector<std::string>{"a.safetensors.tmp.99"});
  EXPECT_EQ(ReadRaw(dir + "/a.safetensors"), "y");
  EXPECT_EQ(RemoveAtomicTemporaries(dir + "/missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(DirectoryLockTest, ExcludesASecondHolderUntilReleased) {
  const std::string dir = TestDir();
  absl::StatusOr<DirectoryLock> a = DirectoryLock::Acquire(dir);
  ASSERT_TRUE(a.ok()) << a.status();
  absl::StatusOr<DirectoryLock> b = DirectoryLock::Acquire(dir);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(b.status().message()), HasSubstr(dir + ": another process holds its lock"));
  *a = DirectoryLock();
  EXPECT_TRUE(DirectoryLock::Acquire(dir).ok());
}

}  // namespace
}  // namespace kt
