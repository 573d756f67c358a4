// Runnable (tools/torch_yardstick.h): how `kt bench --python` decides the interpreter exists before probing it
// for torch. A bare name must be found through $PATH as the shell does (the check that took `python3` for a
// file in the working directory skipped the PyTorch yardstick on the AMX host).
#include "tools/torch_yardstick.h"

#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "gtest/gtest.h"

namespace kt {
namespace tools {
namespace {

class RunnableTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/kt_runnable_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    const char* path = std::getenv("PATH");
    saved_path_ = path != nullptr ? path : "";
    had_path_ = path != nullptr;
  }
  void TearDown() override {
    if (had_path_) {
      setenv("PATH", saved_path_.c_str(), 1);
    } else {
      unsetenv("PATH");
    }
    for (const char* f : {"/kt-fake-python", "/kt-not-executable"}) unlink((dir_ + f).c_str());
    rmdir(dir_.c_str());
  }
  // A file in the test's folder with the given mode.
  std::string Make(const char* name, mode_t mode) {
    const std::string p = dir_ + "/" + name;
    FILE* f = std::fopen(p.c_str(), "w");
    EXPECT_NE(f, nullptr);
    if (f != nullptr) {
      std::fputs("#!/bin/sh\nexit 0\n", f);
      std::fclose(f);
    }
    EXPECT_EQ(chmod(p.c_str(), mode), 0);
    return p;
  }
  std::string dir_, saved_path_;
  bool had_path_ = false;
};

TEST_F(RunnableTest, BareNameIsFoundThroughPath) {
  Make("kt-fake-python", 0755);
  setenv("PATH", ("/nonexistent-kt-dir::" + dir_).c_str(), 1);
  EXPECT_TRUE(Runnable("kt-fake-python"));
  setenv("PATH", "/nonexistent-kt-dir", 1);
  EXPECT_FALSE(Runnable("kt-fake-python"));
  unsetenv("PATH");
  EXPECT_FALSE(Runnable("kt-fake-python"));
}

TEST_F(RunnableTest, PathIsTakenAsGivenAndMustBeExecutable) {
  const std::string exe = Make("kt-fake-python", 0755);
  const std::string plain = Make("kt-not-executable", 0644);
  setenv("PATH", "/nonexistent-kt-dir", 1);
  EXPECT_TRUE(Runnable(exe));
  EXPECT_FALSE(Runnable(plain));
  EXPECT_FALSE(Runnable(dir_ + "/no-such-file"));
  setenv("PATH", dir_.c_str(), 1);
  EXPECT_FALSE(Runnable("kt-not-executable"));  // on $PATH but not executable
  EXPECT_FALSE(Runnable(""));
}

}  // namespace
}  // namespace tools
}  // namespace kt
