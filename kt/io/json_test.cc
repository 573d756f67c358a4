#include "kt/io/json.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kt {
namespace json {
namespace {

using ::testing::HasSubstr;

std::string ErrorOf(absl::string_view text, const ParseOptions& options = ParseOptions()) {
  absl::StatusOr<Value> v = Parse(text, options);
  EXPECT_FALSE(v.ok()) << "parsed: " << text;
  return v.ok() ? "" : std::string(v.status().message());
}

TEST(JsonTest, ParsesASafetensorsLikeHeader) {
  absl::StatusOr<Value> v = Parse(
      R"( {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
           "__metadata__": {"format": "pt"}, "t": true, "f": false, "n": null, "neg": -7} )");
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_TRUE(v->is_object());
  const Value* w = v->Find("w");
  ASSERT_NE(w, nullptr);
  EXPECT_EQ(w->Find("dtype")->as_string(), "BF16");
  ASSERT_EQ(w->Find("shape")->elements().size(), 2u);
  EXPECT_EQ(w->Find("shape")->elements()[1].as_int(), 3);
  EXPECT_EQ(v->Find("__metadata__")->Find("format")->as_string(), "pt");
  EXPECT_TRUE(v->Find("t")->as_bool());
  EXPECT_FALSE(v->Find("f")->as_bool());
  EXPECT_TRUE(v->Find("n")->is_null());
  EXPECT_EQ(v->Find("neg")->as_int(), -7);
  EXPECT_EQ(v->Find("missing"), nullptr);
  EXPECT_EQ(v->Find("w")->Find("dtype")->Find("x"), nullptr);  // Not an object.
  // Members are sorted by key.
  ASSERT_EQ(v->members().size(), 6u);
  EXPECT_EQ(v->members()[0].first, "__metadata__");
  EXPECT_EQ(v->members()[5].first, "w");
  EXPECT_EQ(v->offset(), 1u);
}

TEST(JsonTest, EmptyContainersAndScalars) {
  EXPECT_TRUE(Parse("{}")->members().empty());
  EXPECT_TRUE(Parse("[]")->elements().empty());
  EXPECT_EQ(Parse("0")->as_int(), 0);
  EXPECT_EQ(Parse("\"\"")->as_string(), "");
}

TEST(JsonTest, IntegerLimitsAreExact) {
  EXPECT_EQ(Parse("9223372036854775807")->as_int(), INT64_MAX);
  EXPECT_EQ(Parse("-9223372036854775808")->as_int(), INT64_MIN);
  EXPECT_THAT(ErrorOf("9223372036854775808"), HasSubstr("does not fit in 64 bits"));
  EXPECT_THAT(ErrorOf("-9223372036854775809"), HasSubstr("does not fit in 64 bits"));
  EXPECT_THAT(ErrorOf("[1, 99999999999999999999999]"), HasSubstr("at byte 4: integer does not fit"));
}

TEST(JsonTest, RejectsNonIntegerNumbers) {
  EXPECT_THAT(ErrorOf("1.5"), HasSubstr("only integers"));
  EXPECT_THAT(ErrorOf("1e3"), HasSubstr("only integers"));
  EXPECT_THAT(ErrorOf("01"), HasSubstr("leading zeros"));
  EXPECT_THAT(ErrorOf("-"), HasSubstr("expected a digit"));
  EXPECT_THAT(ErrorOf("+1"), HasSubstr("expected a value"));
}

TEST(JsonTest, StringEscapes) {
  EXPECT_EQ(Parse(R"("a\"b\\c\/d\b\f\n\r\t")")->as_string(), "a\"b\\c/d\b\f\n\r\t");
  EXPECT_EQ(Parse(R"("\u0041\u00e9\u20AC")")->as_string(), "A\xC3\xA9\xE2\x82\xAC");
  // U+1F600 as a surrogate pair -> 4-byte UTF-8.
  EXPECT_EQ(Parse(R"("\ud83d\ude00")")->as_string(), "\xF0\x9F\x98\x80");
  EXPECT_EQ(Parse(R"("\u0000")")->as_string(), std::string(1, '\0'));
  // Raw UTF-8 passes through.
  EXPECT_EQ(Parse("\"\xC3\xA9\"")->as_string(), "\xC3\xA9");
}

TEST(JsonTest, RejectsBadStrings) {
  EXPECT_THAT(ErrorOf(R"("\x")"), HasSubstr("invalid escape"));
  EXPECT_THAT(ErrorOf(R"("\u12G4")"), HasSubstr("hex digit"));
  EXPECT_THAT(ErrorOf(R"("\u12)"), HasSubstr("end of input"));
  EXPECT_THAT(ErrorOf(R"("\ud83d")"), HasSubstr("unpaired high surrogate"));
  EXPECT_THAT(ErrorOf(R"("\ud83d\u0041")"), HasSubstr("unpaired high surrogate"));
  EXPECT_THAT(ErrorOf(R"("\ude00")"), HasSubstr("unpaired low surrogate"));
  EXPECT_THAT(ErrorOf("\"a\nb\""), HasSubstr("control character 0x0A"));
  EXPECT_THAT(ErrorOf("\"abc"), HasSubstr("at byte 0: unterminated string"));
  EXPECT_THAT(ErrorOf("\"\\"), HasSubstr("end of input"));
  EXPECT_THAT(ErrorOf("\"\xC3\""), HasSubstr("invalid UTF-8"));              // Truncated sequence.
  EXPECT_THAT(ErrorOf("\"\xC0\x80\""), HasSubstr("invalid UTF-8"));          // Overlong NUL.
  EXPECT_THAT(ErrorOf("\"\xED\xA0\x80\""), HasSubstr("invalid UTF-8"));      // Encoded surrogate.
  EXPECT_THAT(ErrorOf("\"\xF4\x90\x80\x80\""), HasSubstr("invalid UTF-8"));  // Above U+10FFFF.
}

TEST(JsonTest, RejectsMalformedStructure) {
  EXPECT_THAT(ErrorOf(""), HasSubstr("unexpected end of input"));
  EXPECT_THAT(ErrorOf("   "), HasSubstr("unexpected end of input"));
  EXPECT_THAT(ErrorOf("{"), HasSubstr("expected a string key, found end of input"));
  EXPECT_THAT(ErrorOf("{\"a\""), HasSubstr("expected ':'"));
  EXPECT_THAT(ErrorOf("{\"a\":"), HasSubstr("expected a value"));
  EXPECT_THAT(ErrorOf("{\"a\":1"), HasSubstr("inside an object"));
  EXPECT_THAT(ErrorOf("{\"a\":1,}"), HasSubstr("expected a string key, found '}'"));
  EXPECT_THAT(ErrorOf("{a:1}"), HasSubstr("expected a string key"));
  EXPECT_THAT(ErrorOf("[1,]"), HasSubstr("expected a value"));
  EXPECT_THAT(ErrorOf("[1 2]"), HasSubstr("expected ',' or ']'"));
  EXPECT_THAT(ErrorOf("[1"), HasSubstr("inside an array"));
  EXPECT_THAT(ErrorOf("{} {}"), HasSubstr("at byte 3: unexpected '{' after the top-level value"));
  EXPECT_THAT(ErrorOf("{}\x01"), HasSubstr("byte 0x01"));
  EXPECT_THAT(ErrorOf("tru"), HasSubstr("expected a value"));
  EXPECT_THAT(ErrorOf("nulll"), HasSubstr("after the top-level value"));
}

TEST(JsonTest, DuplicateKeysNameTheKeyAndBothPlaces) {
  const std::string error = ErrorOf(R"({"a": 1, "b": 2, "a": 3})");
  EXPECT_THAT(error, HasSubstr("duplicate key \"a\""));
  EXPECT_THAT(error, HasSubstr("at byte 17"));
  EXPECT_THAT(error, HasSubstr("first at byte 1"));
  // Nested objects are checked too; the same key in different objects is fine.
  EXPECT_THAT(ErrorOf(R"({"x": {"dtype": "F32", "dtype": "BF16"}})"), HasSubstr("duplicate key \"dtype\""));
  EXPECT_TRUE(Parse(R"({"x": {"a": 1}, "y": {"a": 1}})").ok());
}

TEST(JsonTest, DepthAndSizeLimits) {
  ParseOptions options;
  options.max_depth = 3;
  EXPECT_TRUE(Parse("[[[1]]]", options).ok());
  EXPECT_THAT(ErrorOf("[[[[1]]]]", options), HasSubstr("at byte 3: nesting deeper than 3"));
  // The default limit stops a stack-exhausting input long before the stack is at risk.
  EXPECT_THAT(ErrorOf(std::string(100000, '[')), HasSubstr("nesting deeper than 64"));
  options = ParseOptions();
  options.max_bytes = 4;
  EXPECT_THAT(ErrorOf("[1,2]", options), HasSubstr("exceeds the limit of 4"));
}

TEST(JsonTest, BaseOffsetShiftsReportedOffsets) {
  ParseOptions options;
  options.base_offset = 8;
  EXPECT_THAT(ErrorOf("{\"a\" 1}", options), HasSubstr("at byte 13: expected ':'"));
}

TEST(JsonTest, QuoteRoundTrips) {
  const std::string s = std::string("a\"b\\c\n\x01\x7F\xC3\xA9", 10);
  const std::string quoted = Quote(s);
  EXPECT_EQ(quoted, "\"a\\\"b\\\\c\\u000a\\u0001\\u007f\xC3\xA9\"");
  EXPECT_EQ(Parse(quoted)->as_string(), s);
}

TEST(JsonTest, Utf8Validation) {
  EXPECT_TRUE(IsValidUtf8("plain"));
  EXPECT_TRUE(IsValidUtf8("\xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("\xFF"));
  EXPECT_FALSE(IsValidUtf8("\xE2\x82"));
}

}  // namespace
}  // namespace json
}  // namespace kt
