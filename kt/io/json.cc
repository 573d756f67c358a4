#include "kt/io/json.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kt {
namespace json {

const Value* Value::Find(absl::string_view key) const {
  if (type_ != Type::kObject) return nullptr;
  auto it = std::lower_bound(members_.begin(), members_.end(), key,
                             [](const std::pair<std::string, Value>& m, absl::string_view k) {
                               return absl::string_view(m.first) < k;
                             });
  if (it == members_.end() || it->first != key) return nullptr;
  return &it->second;
}

const char* TypeName(Value::Type type) {
  switch (type) {
    case Value::Type::kNull:
      return "null";
    case Value::Type::kBool:
      return "bool";
    case Value::Type::kInt:
      return "integer";
    case Value::Type::kDouble:
      return "number";
    case Value::Type::kString:
      return "string";
    case Value::Type::kArray:
      return "array";
    case Value::Type::kObject:
      return "object";
  }
  return "?";
}

namespace {

// Decodes one UTF-8 sequence starting at s[i]; returns its length (1..4) or 0 when it is malformed.
// Follows the Unicode table of well-formed byte sequences (Table 3-7), which rules out overlong forms,
// surrogates (ED A0..BF) and code points above U+10FFFF.
size_t Utf8SequenceLength(absl::string_view s, size_t i) {
  const auto byte = [&](size_t k) -> int { return i + k < s.size() ? static_cast<uint8_t>(s[i + k]) : -1; };
  const auto in = [](int b, int lo, int hi) { return b >= lo && b <= hi; };
  const int b0 = byte(0);
  if (b0 < 0x80) return 1;
  if (in(b0, 0xC2, 0xDF)) return in(byte(1), 0x80, 0xBF) ? 2 : 0;
  if (in(b0, 0xE0, 0xEF)) {
    const int lo = b0 == 0xE0 ? 0xA0 : 0x80;
    const int hi = b0 == 0xED ? 0x9F : 0xBF;
    return in(byte(1), lo, hi) && in(byte(2), 0x80, 0xBF) ? 3 : 0;
  }
  if (in(b0, 0xF0, 0xF4)) {
    const int lo = b0 == 0xF0 ? 0x90 : 0x80;
    const int hi = b0 == 0xF4 ? 0x8F : 0xBF;
    return in(byte(1), lo, hi) && in(byte(2), 0x80, 0xBF) && in(byte(3), 0x80, 0xBF) ? 4 : 0;
  }
  return 0;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// A printable rendering of the byte at an error position, so messages never embed raw control bytes.
std::string Describe(absl::string_view text, size_t pos) {
  if (pos >= text.size()) return "end of input";
  const unsigned char c = static_cast<unsigned char>(text[pos]);
  if (c >= 0x20 && c < 0x7F) return absl::StrCat("'", std::string(1, static_cast<char>(c)), "'");
  return absl::StrFormat("byte 0x%02X", c);
}

}  // namespace

// Recursive descent over a string_view; `pos_` never passes text_.size(), and every read goes through
// Peek()/AtEnd() so a truncated input is an "unexpected end of input" error, never an out-of-bounds read.
class Parser {
 public:
  Parser(absl::string_view text, const ParseOptions& options) : text_(text), options_(options) {}

  absl::StatusOr<Value> ParseDocument() {
    if (text_.size() > options_.max_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("JSON error: input of ", text_.size(),
                                                     " bytes exceeds the limit of ", options_.max_bytes));
    }
    Value root;
    SkipWhitespace();
    if (!ParseValue(&root, 0)) return error_;
    SkipWhitespace();
    if (!AtEnd()) {
      Fail(absl::StrCat("unexpected ", Describe(text_, pos_), " after the top-level value"));
      return error_;
    }
    return root;
  }

 private:
  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek() const { return text_[pos_]; }  // Only after !AtEnd().

  // Records the first error and returns false so callers can `return Fail(...)`.
  bool Fail(absl::string_view message) { return FailAt(pos_, message); }
  bool FailAt(size_t at, absl::string_view message) {
    error_ = absl::InvalidArgumentError(
        absl::StrCat("JSON error at byte ", options_.base_offset + at, ": ", message));
    return false;
  }

  void SkipWhitespace() {
    while (!AtEnd() && (Peek() == ' ' || Peek() == '\t' || Peek() == '\n' || Peek() == '\r')) ++pos_;
  }

  bool Expect(char c, absl::string_view what) {
    if (AtEnd() || Peek() != c) {
      return Fail(
          absl::StrCat("expected '", std::string(1, c), "' ", what, ", found ", Describe(text_, pos_)));
    }
    ++pos_;
    return true;
  }

  bool ParseValue(Value* out, int depth) {
    if (AtEnd()) return Fail("unexpected end of input, expected a value");
    out->offset_ = pos_;
    const char c = Peek();
    if (c == '{' || c == '[') {
      if (depth >= options_.max_depth) {
        return Fail(absl::StrCat("nesting deeper than ", options_.max_depth, " levels"));
      }
      return c == '{' ? ParseObject(out, depth + 1) : ParseArray(out, depth + 1);
    }
    if (c == '"') {
      out->type_ = Value::Type::kString;
      return ParseString(&out->string_);
    }
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out);
    if (ConsumeLiteral("true")) {
      out->type_ = Value::Type::kBool;
      out->bool_ = true;
      return true;
    }
    if (ConsumeLiteral("false")) {
      out->type_ = Value::Type::kBool;
      out->bool_ = false;
      return true;
    }
    if (ConsumeLiteral("null")) {
      out->type_ = Value::Type::kNull;
      return true;
    }
    return Fail(absl::StrCat("unexpected ", Describe(text_, pos_), ", expected a value"));
  }

  bool ConsumeLiteral(absl::string_view word) {
    if (text_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  bool ParseObject(Value* out, int depth) {
    out->type_ = Value::Type::kObject;
    ++pos_;  // '{'
    // Offsets of each key, parallel to members_, so a duplicate can name both places.
    std::vector<size_t> key_offsets;
    SkipWhitespace();
    if (!AtEnd() && Peek() == '}') {
      ++pos_;
      return true;
    }
    while (true) {
      SkipWhitespace();
      if (AtEnd() || Peek() != '"') {
        return Fail(absl::StrCat("expected a string key, found ", Describe(text_, pos_)));
      }
      key_offsets.push_back(pos_);
      std::string key;
      if (!ParseString(&key)) return false;
      SkipWhitespace();
      if (!Expect(':', "after an object key")) return false;
      SkipWhitespace();
      Value value;
      if (!ParseValue(&value, depth)) return false;
      out->members_.emplace_back(std::move(key), std::move(value));
      SkipWhitespace();
      if (AtEnd()) return Fail("unexpected end of input inside an object, expected ',' or '}'");
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      if (Peek() == '}') {
        ++pos_;
        break;
      }
      return Fail(absl::StrCat("expected ',' or '}' in an object, found ", Describe(text_, pos_)));
    }
    // Sort members by key (keeping the key offsets alongside) and reject duplicates.
    std::vector<size_t> order(out->members_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return out->members_[a].first < out->members_[b].first; });
    for (size_t i = 1; i < order.size(); ++i) {
      const std::string& key = out->members_[order[i]].first;
      if (key == out->members_[order[i - 1]].first) {
        return FailAt(key_offsets[order[i]],
                      absl::StrCat("duplicate key ", Quote(key), " (first at byte ",
                                   options_.base_offset + key_offsets[order[i - 1]], ")"));
      }
    }
    std::vector<std::pair<std::string, Value>> sorted;
    sorted.reserve(order.size());
    for (size_t i : order) sorted.push_back(std::move(out->members_[i]));
    out->members_ = std::move(sorted);
    return true;
  }

  bool ParseArray(Value* out, int depth) {
    out->type_ = Value::Type::kArray;
    ++pos_;  // '['
    SkipWhitespace();
    if (!AtEnd() && Peek() == ']') {
      ++pos_;
      return true;
    }
    while (true) {
      SkipWhitespace();
      Value element;
      if (!ParseValue(&element, depth)) return false;
      out->elements_.push_back(std::move(element));
      SkipWhitespace();
      if (AtEnd()) return Fail("unexpected end of input inside an array, expected ',' or ']'");
      if (Peek() == ',') {
        ++pos_;
        continue;
      }
      if (Peek() == ']') {
        ++pos_;
        return true;
      }
      return Fail(absl::StrCat("expected ',' or ']' in an array, found ", Describe(text_, pos_)));
    }
  }

  bool AtDigit() const { return !AtEnd() && Peek() >= '0' && Peek() <= '9'; }

  // RFC 8259's number, exactly: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?. Without a fraction or
  // exponent it is an int64 (kInt) with an overflow check. With one, it is an error unless
  // options_.allow_fractions: nothing in a weight header is fractional, and silently truncating 1e3 or 2.0
  // would hide a broken writer. Allowed, it is a kDouble, converted from the exact token (locale-independent)
  // and rejected when it overflows a double.
  bool ParseNumber(Value* out) {
    const size_t start = pos_;
    if (Peek() == '-') ++pos_;
    if (!AtDigit()) return Fail(absl::StrCat("expected a digit, found ", Describe(text_, pos_)));
    if (Peek() == '0' && pos_ + 1 < text_.size() && text_[pos_ + 1] >= '0' && text_[pos_ + 1] <= '9') {
      return Fail("leading zeros are not allowed in a number");
    }
    while (AtDigit()) ++pos_;
    const size_t int_end = pos_;
    if (AtEnd() || (Peek() != '.' && Peek() != 'e' && Peek() != 'E')) {
      return ConvertInteger(start, int_end, out);
    }
    if (!options_.allow_fractions) {
      return FailAt(start, "only integers are supported (found a fraction or exponent)");
    }
    if (Peek() == '.') {
      ++pos_;
      if (!AtDigit()) {
        return Fail(absl::StrCat("expected a digit after the decimal point, found ", Describe(text_, pos_)));
      }
      while (AtDigit()) ++pos_;
    }
    if (!AtEnd() && (Peek() == 'e' || Peek() == 'E')) {
      ++pos_;
      if (!AtEnd() && (Peek() == '+' || Peek() == '-')) ++pos_;
      if (!AtDigit()) {
        return Fail(absl::StrCat("expected a digit in the exponent, found ", Describe(text_, pos_)));
      }
      while (AtDigit()) ++pos_;
    }
    const absl::string_view token = text_.substr(start, pos_ - start);
    double value = 0;
    // The token matches the grammar above, which SimpleAtod accepts in full; it returns +-inf on overflow
    // and the nearest double (possibly 0 or subnormal) on underflow.
    if (!absl::SimpleAtod(token, &value) || !std::isfinite(value)) {
      const std::string shown =
          token.size() <= 40 ? std::string(token) : absl::StrCat(token.substr(0, 40), "...");
      return FailAt(start, absl::StrCat("number ", shown, " is outside the range of a double"));
    }
    out->type_ = Value::Type::kDouble;
    out->double_ = value;
    return true;
  }

  // text_[start, end) is -?(0|[1-9][0-9]*).
  bool ConvertInteger(size_t start, size_t end, Value* out) {
    size_t i = start;
    const bool negative = text_[i] == '-';
    if (negative) ++i;
    // Accumulate the magnitude as uint64 so that -9223372036854775808 is representable.
    const uint64_t limit = negative ? uint64_t{1} << 63 : (uint64_t{1} << 63) - 1;
    uint64_t magnitude = 0;
    for (; i < end; ++i) {
      const uint64_t digit = static_cast<uint64_t>(text_[i] - '0');
      if (magnitude > (limit - digit) / 10) return FailAt(start, "integer does not fit in 64 bits");
      magnitude = magnitude * 10 + digit;
    }
    out->type_ = Value::Type::kInt;
    out->int_ = negative ? static_cast<int64_t>(0 - magnitude) : static_cast<int64_t>(magnitude);
    return true;
  }

  bool ParseHex4(uint32_t* out) {
    if (text_.size() - pos_ < 4) return Fail("unexpected end of input in a \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_ + i];
      uint32_t d;
      if (c >= '0' && c <= '9') {
        d = static_cast<uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        d = static_cast<uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        d = static_cast<uint32_t>(c - 'A' + 10);
      } else {
        return FailAt(pos_ + i, absl::StrCat("expected a hex digit in a \\u escape, found ",
                                             Describe(text_, pos_ + i)));
      }
      v = v * 16 + d;
    }
    pos_ += 4;
    *out = v;
    return true;
  }

  // Called at the opening quote. Raw bytes must be valid UTF-8 and not control characters.
  bool ParseString(std::string* out) {
    const size_t start = pos_;
    ++pos_;  // '"'
    while (true) {
      if (AtEnd()) return FailAt(start, "unterminated string");
      const unsigned char c = static_cast<unsigned char>(Peek());
      if (c == '"') {
        ++pos_;
        return true;
      }
      if (c < 0x20) return Fail(absl::StrFormat("control character 0x%02X in a string (must be escaped)", c));
      if (c == '\\') {
        if (!ParseEscape(out)) return false;
        continue;
      }
      const size_t n = Utf8SequenceLength(text_, pos_);
      if (n == 0) return Fail("invalid UTF-8 in a string");
      out->append(text_.data() + pos_, n);
      pos_ += n;
    }
  }

  bool ParseEscape(std::string* out) {
    const size_t start = pos_;
    ++pos_;  // '\'
    if (AtEnd()) return FailAt(start, "unexpected end of input in an escape");
    const char e = Peek();
    ++pos_;
    switch (e) {
      case '"':
        out->push_back('"');
        return true;
      case '\\':
        out->push_back('\\');
        return true;
      case '/':
        out->push_back('/');
        return true;
      case 'b':
        out->push_back('\b');
        return true;
      case 'f':
        out->push_back('\f');
        return true;
      case 'n':
        out->push_back('\n');
        return true;
      case 'r':
        out->push_back('\r');
        return true;
      case 't':
        out->push_back('\t');
        return true;
      case 'u':
        break;
      default:
        return FailAt(start, absl::StrCat("invalid escape \\", Describe(text_, pos_ - 1)));
    }
    uint32_t cp;
    if (!ParseHex4(&cp)) return false;
    if (cp >= 0xDC00 && cp <= 0xDFFF) return FailAt(start, "unpaired low surrogate in a \\u escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      // A high surrogate must be followed by \uDC00..\uDFFF; together they name one code point.
      if (text_.substr(pos_, 2) != "\\u") return FailAt(start, "unpaired high surrogate in a \\u escape");
      pos_ += 2;
      uint32_t low;
      if (!ParseHex4(&low)) return false;
      if (low < 0xDC00 || low > 0xDFFF) return FailAt(start, "unpaired high surrogate in a \\u escape");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    AppendUtf8(cp, out);
    return true;
  }

  absl::string_view text_;
  ParseOptions options_;
  size_t pos_ = 0;
  absl::Status error_;
};

absl::StatusOr<Value> Parse(absl::string_view text, const ParseOptions& options) {
  return Parser(text, options).ParseDocument();
}

bool IsValidUtf8(absl::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = Utf8SequenceLength(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string Quote(absl::string_view s) {
  std::string out = "\"";
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c == '"') {
      out += "\\\"";
    } else if (c == '\\') {
      out += "\\\\";
    } else if (c < 0x20 || c == 0x7F) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out.push_back(ch);
    }
  }
  out.push_back('"');
  return out;
}

}  // namespace json
}  // namespace kt
