// Small file helpers shared by kt/io's tests (testonly).
#ifndef KT_IO_TEST_FILES_H_
#define KT_IO_TEST_FILES_H_

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"

namespace kt {
namespace testing_files {

// A path in the test's temporary folder, unique per test case: <TempDir>/<test name>_<name>.
inline std::string TestPath(absl::string_view name) {
  // TempDir() ends with '/'.
  return absl::StrCat(::testing::TempDir(), ::testing::UnitTest::GetInstance()->current_test_info()->name(),
                      "_", name);
}

// Writes `bytes` to `path` as they are (replacing the file); a failed write fails the test.
inline void WriteRaw(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  EXPECT_TRUE(f.good()) << "could not write " << path;
}

// The whole file (empty if it cannot be read).
inline std::string ReadRaw(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// A test checkpoint of the repository's testdata/hf (tools/make_fixtures.py), e.g. TestdataHf("qwen3_moe"),
// from Bazel's runfiles (the test needs data = ["//testdata:hf"]).
inline std::string TestdataHf(absl::string_view name) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* workspace = std::getenv("TEST_WORKSPACE");
  EXPECT_NE(srcdir, nullptr) << "TEST_SRCDIR is not set: run the test with bazel test";
  return absl::StrCat(srcdir != nullptr ? srcdir : ".", "/", workspace != nullptr ? workspace : "kt",
                      "/testdata/hf/", name);
}

}  // namespace testing_files
}  // namespace kt

#endif  // KT_IO_TEST_FILES_H_
