#include "kt/io/json.h"

#include <cmath>
#include <string>
#include <vector>

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

TEST(JsonTest, FractionsAreRejectedByDefault) {
  // Every form that allow_fractions accepts is an error without it, at the number's first byte.
  for (const char* text : {"1.5", "-0.0", "1e3", "1E+3", "2.0", "0.5e-2"}) {
    EXPECT_THAT(ErrorOf(text), HasSubstr("at byte 0: only integers are supported")) << text;
  }
  EXPECT_THAT(ErrorOf(R"({"shape": [2, 3.0]})"), HasSubstr("at byte 14: only integers are supported"));
}

ParseOptions Fractions() {
  ParseOptions options;
  options.allow_fractions = true;
  return options;
}

TEST(JsonTest, AllowFractionsParsesDoubles) {
  const struct {
    const char* text;
    double value;
  } cases[] = {
      {"1.5", 1.5},
      {"-1.5", -1.5},
      {"0.5", 0.5},
      {"2.0", 2.0},
      {"1e3", 1000},
      {"1E3", 1000},
      {"1e+3", 1000},
      {"1e-06", 1e-06},
      {"-2.5E-3", -2.5e-3},
      {"0e0", 0},
      {"0.02", 0.02},
      {"1000000.0", 1e6},
      {"2.827", 2.827},
      {"1.7976931348623157e308", 1.7976931348623157e308},
      {"5e-324", 5e-324},  // The smallest subnormal.
      {"0.1000000000000000055511151231257827021181583404541015625", 0.1},
  };
  for (const auto& c : cases) {
    absl::StatusOr<Value> v = Parse(c.text, Fractions());
    ASSERT_TRUE(v.ok()) << c.text << ": " << v.status();
    EXPECT_TRUE(v->is_double()) << c.text;
    EXPECT_FALSE(v->is_int()) << c.text;
    EXPECT_EQ(v->type(), Value::Type::kDouble);
    EXPECT_EQ(v->as_double(), c.value) << c.text;  // Exact: the conversion is correctly rounded.
  }
  // -0.0 keeps its sign; an underflow is the nearest double, 0.
  EXPECT_TRUE(std::signbit(Parse("-0.0", Fractions())->as_double()));
  EXPECT_EQ(Parse("1e-400", Fractions())->as_double(), 0.0);
  EXPECT_STREQ(TypeName(Value::Type::kDouble), "number");
}

TEST(JsonTest, AllowFractionsKeepsIntegersExact) {
  // Without fraction or exponent a number is still an int64, with the same overflow check.
  absl::StatusOr<Value> v = Parse("[0, -0, 7, 9223372036854775807, -9223372036854775808]", Fractions());
  ASSERT_TRUE(v.ok()) << v.status();
  for (const Value& e : v->elements()) EXPECT_TRUE(e.is_int());
  EXPECT_EQ(v->elements()[3].as_int(), INT64_MAX);
  EXPECT_EQ(v->elements()[4].as_int(), INT64_MIN);
  EXPECT_THAT(ErrorOf("9223372036854775808", Fractions()),
              HasSubstr("at byte 0: integer does not fit in 64 bits"));
  // A number that only a double can hold must be written as one.
  EXPECT_EQ(Parse("9223372036854775808.0", Fractions())->as_double(), 9223372036854775808.0);
}

TEST(JsonTest, AllowFractionsInContainersAndOffsets) {
  absl::StatusOr<Value> v =
      Parse(R"({"rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "layers": 4, "x": [0.5, -2e3, "1.5"]})",
            Fractions());
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->Find("rms_norm_eps")->as_double(), 1e-06);
  EXPECT_EQ(v->Find("rms_norm_eps")->offset(), 17u);
  EXPECT_EQ(v->Find("rope_theta")->as_double(), 1e6);
  EXPECT_TRUE(v->Find("layers")->is_int());
  const std::vector<Value>& x = v->Find("x")->elements();
  EXPECT_EQ(x[0].as_double(), 0.5);
  EXPECT_EQ(x[1].as_double(), -2000);
  EXPECT_TRUE(x[2].is_string());  // Quoted numbers stay strings.
  // A number is never a key.
  EXPECT_THAT(ErrorOf("{1.5: 0}", Fractions()), HasSubstr("at byte 1: expected a string key, found '1'"));
}

TEST(JsonTest, AllowFractionsRejectsMalformedNumbers) {
  ParseOptions options = Fractions();
  EXPECT_THAT(ErrorOf("1.", options),
              HasSubstr("at byte 2: expected a digit after the decimal point, found end of input"));
  EXPECT_THAT(ErrorOf("[1.]", options),
              HasSubstr("at byte 3: expected a digit after the decimal point, found ']'"));
  EXPECT_THAT(ErrorOf("1.e5", options),
              HasSubstr("at byte 2: expected a digit after the decimal point, found 'e'"));
  EXPECT_THAT(ErrorOf(".5", options), HasSubstr("at byte 0: unexpected '.', expected a value"));
  EXPECT_THAT(ErrorOf("-.5", options), HasSubstr("at byte 1: expected a digit, found '.'"));
  EXPECT_THAT(ErrorOf("01.5", options), HasSubstr("at byte 0: leading zeros are not allowed"));
  EXPECT_THAT(ErrorOf("-01.5", options), HasSubstr("at byte 1: leading zeros are not allowed"));
  EXPECT_THAT(ErrorOf("1e", options),
              HasSubstr("at byte 2: expected a digit in the exponent, found end of input"));
  EXPECT_THAT(ErrorOf("1e+", options), HasSubstr("at byte 3: expected a digit in the exponent"));
  EXPECT_THAT(ErrorOf("1E-x", options), HasSubstr("at byte 3: expected a digit in the exponent, found 'x'"));
  EXPECT_THAT(ErrorOf("1e999", options),
              HasSubstr("at byte 0: number 1e999 is outside the range of a double"));
  EXPECT_THAT(ErrorOf("[0, -1.8e308]", options),
              HasSubstr("at byte 4: number -1.8e308 is outside the range of a double"));
  // A long literal is shown cut.
  EXPECT_THAT(
      ErrorOf("1" + std::string(400, '0') + ".0", options),
      HasSubstr(absl::StrCat("at byte 0: number 1", std::string(39, '0'), "... is outside the range")));
  EXPECT_THAT(ErrorOf("-", options), HasSubstr("at byte 1: expected a digit, found end of input"));
  EXPECT_THAT(ErrorOf("+1.5", options), HasSubstr("expected a value"));
  EXPECT_THAT(ErrorOf("1.5.5", options), HasSubstr("at byte 3: unexpected '.' after the top-level value"));
  EXPECT_THAT(ErrorOf("1.5e5e5", options), HasSubstr("at byte 5: unexpected 'e' after the top-level value"));
  EXPECT_THAT(ErrorOf("Infinity", options), HasSubstr("expected a value"));
  EXPECT_THAT(ErrorOf("NaN", options), HasSubstr("expected a value"));
  EXPECT_THAT(ErrorOf("0x1p3", options), HasSubstr("after the top-level value"));
  options.base_offset = 8;
  EXPECT_THAT(ErrorOf("[1e999]", options), HasSubstr("at byte 9: number 1e999"));
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
