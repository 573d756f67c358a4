#include "kt/io/method.h"

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kt {
namespace {

using ::testing::HasSubstr;

TEST(MethodTest, LayoutsOfEveryMethod) {
  for (const std::string& method : ConvertibleMethods()) {
    absl::StatusOr<MethodLayout> layout = LayoutOfMethod(method, 64);
    ASSERT_TRUE(layout.ok()) << method << ": " << layout.status();
    EXPECT_EQ(layout->method, method);
    EXPECT_EQ(layout->quantized, method != "BF16") << method;
  }
  EXPECT_EQ(LayoutOfMethod("AMXINT8")->tag, "kt-int8-channel-v1");
  EXPECT_EQ(LayoutOfMethod("AMXINT4_KGroup", 32)->tag, "kt-int4-group32-sym-v1");
  EXPECT_EQ(LayoutOfMethod("BF16")->tag, kBf16LayoutTag);
  EXPECT_EQ(LayoutOfMethod("FP8")->tag, "kt-fp8-block128-v1");
  // A per-channel scale is each 128-k block's scale of its row: the same layout as FP8.
  EXPECT_EQ(LayoutOfMethod("FP8_PERCHANNEL")->tag, "kt-fp8-block128-v1");
  EXPECT_EQ(LayoutOfMethod("MXFP4")->tag, "kt-mxfp4-v1");
  EXPECT_EQ(LayoutOfMethod("MXFP8")->tag, "kt-mxfp8-v1");
}

TEST(MethodTest, Errors) {
  EXPECT_EQ(LayoutOfMethod("LLAMAFILE").status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(LayoutOfMethod("INT3").status().message()), HasSubstr("unknown method \"INT3\""));
  EXPECT_THAT(std::string(LayoutOfMethod("AMXINT4_KGroup", 96).status().message()),
              HasSubstr("group_size must be 32, 64 or 128, got 96"));
}

TEST(MethodTest, SftBaseMethod) {
  EXPECT_EQ(*SftBaseMethod("AMXBF16_SFT"), "BF16");
  EXPECT_EQ(*SftBaseMethod("AMXINT8_SFT"), "AMXINT8");
  EXPECT_EQ(*SftBaseMethod("AMXINT4_SFT_SkipLoRA"), "AMXINT4");
  EXPECT_EQ(*SftBaseMethod("AMXINT4_1_SFT"), "AMXINT4_1");
  EXPECT_EQ(*SftBaseMethod("AMXINT4_KGroup_SFT"), "AMXINT4_KGroup");
  EXPECT_EQ(*SftBaseMethod("AMXINT4_1KGroup_SFT_SkipLoRA"), "AMXINT4_1KGroup");
  for (const char* bad : {"AMXINT8", "MOE_INT8_SFT", "AMXFP8_SFT", "BF16_SFT", ""}) {
    absl::StatusOr<std::string> base = SftBaseMethod(bad);
    ASSERT_FALSE(base.ok()) << bad;
    EXPECT_EQ(base.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(base.status().message()), HasSubstr(absl::StrCat("unknown SFT method \"", bad, "\"")));
  }
}

}  // namespace
}  // namespace kt
