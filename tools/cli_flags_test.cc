// ParseCommandFlags and FlagsUsage on flags defined here: spellings, per-command sets, ranges, errors.
#include "tools/cli_flags.h"

#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "gtest/gtest.h"

ABSL_FLAG(int, test_count, 7, "how many");
ABSL_FLAG(bool, test_switch, false, "a switch");
ABSL_FLAG(std::string, test_name, "", "a name");
ABSL_FLAG(int, test_other, 0, "belongs to another command");

namespace kt {
namespace tools {
namespace {

const FlagSpec kSpecs[] = {{"test_count", 1, 10}, {"test_switch"}, {"test_name"}};

class CliFlagsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::SetFlag(&FLAGS_test_count, 7);
    absl::SetFlag(&FLAGS_test_switch, false);
    absl::SetFlag(&FLAGS_test_name, "");
  }
  static absl::StatusOr<ParsedCommand> Parse(std::vector<std::string> args) {
    return ParseCommandFlags(args, kSpecs);
  }
};

TEST_F(CliFlagsTest, SpellingsSetTheFlags) {
  absl::StatusOr<ParsedCommand> p = Parse({"--test-count=3", "--test-switch", "--test-name", "x y"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_FALSE(p->help);
  EXPECT_EQ(p->set, (std::vector<std::string>{"test_count", "test_switch", "test_name"}));
  EXPECT_EQ(absl::GetFlag(FLAGS_test_count), 3);
  EXPECT_TRUE(absl::GetFlag(FLAGS_test_switch));
  EXPECT_EQ(absl::GetFlag(FLAGS_test_name), "x y");

  p = Parse({"--test-count", "10", "--test-switch=false"});
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(absl::GetFlag(FLAGS_test_count), 10);
  EXPECT_FALSE(absl::GetFlag(FLAGS_test_switch));
}

TEST_F(CliFlagsTest, HelpStopsParsing) {
  for (const char* help : {"--help", "-h"}) {
    absl::StatusOr<ParsedCommand> p = Parse({help, "--bogus"});
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_TRUE(p->help);
  }
}

TEST_F(CliFlagsTest, ErrorsNameTheArgument) {
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{"--bogus"}, "unknown flag '--bogus'"},
      {{"--test-other=1"}, "unknown flag '--test-other'"},  // defined, but not in this command's set
      {{"-x"}, "unknown flag '-x'"},
      {{"stray"}, "unexpected argument 'stray'"},
      {{"--test-count"}, "flag --test-count needs a value"},
      {{"--test-count=abc"}, "flag --test-count: invalid value 'abc'"},
      {{"--test-count=0"}, "flag --test-count wants an integer in [1, 10], got '0'"},
      {{"--test-count=11"}, "flag --test-count wants an integer in [1, 10], got '11'"},
      {{"--test-switch=maybe"}, "flag --test-switch: invalid value 'maybe'"},
  };
  for (const auto& [args, message] : cases) {
    const absl::StatusOr<ParsedCommand> p = Parse(args);
    ASSERT_FALSE(p.ok()) << args[0];
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(p.status().message(), message);
  }
  EXPECT_EQ(absl::GetFlag(FLAGS_test_other), 0);
}

TEST_F(CliFlagsTest, UsageComesFromTheDefinitions) {
  EXPECT_EQ(FlagsUsage(kSpecs),
            "  --test-count=7\n      how many (an integer in [1, 10])\n"
            "  --test-switch\n      a switch\n"
            "  --test-name=\"\"\n      a name\n");
  EXPECT_EQ(FlagArg("qlen_decode"), "--qlen-decode");
}

}  // namespace
}  // namespace tools
}  // namespace kt
