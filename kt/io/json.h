// A small, strict JSON parser sized for what weight files contain: safetensors headers and
// model.safetensors.index.json (objects, arrays, strings with escapes, integers, true/false/null), and, when
// ParseOptions::allow_fractions is set, numbers with a fraction or exponent (a Hugging Face config.json).
//
// Strict means: anything RFC 8259 rejects is rejected (trailing commas, leading zeros, control characters in
// strings, invalid UTF-8, lone surrogates, trailing garbage), and so is what a weight header never needs but
// would make later checks ambiguous: numbers with a fraction or exponent (unless allowed), integers outside
// int64, numbers outside the range of a double, and duplicate object keys (which value wins differs between
// parsers, so a file with two "dtype"s or two entries for one tensor name could mean different things to
// different readers). Every error carries the byte offset where the problem is. The input is never read out
// of bounds and recursion is depth-limited.
#ifndef KT_IO_JSON_H_
#define KT_IO_JSON_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kt {
namespace json {

class Value {
 public:
  // kInt: a number without fraction or exponent ("-12"), always; kDouble: one with a fraction or exponent
  // ("2.5", "1e-06", "64.0"), only under ParseOptions::allow_fractions.
  enum class Type { kNull, kBool, kInt, kDouble, kString, kArray, kObject };

  Value() = default;

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_int() const { return type_ == Type::kInt; }
  bool is_double() const { return type_ == Type::kDouble; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  // Accessors; each must only be called on a value of that type (they return a default otherwise).
  bool as_bool() const { return bool_; }
  int64_t as_int() const { return int_; }
  // Finite: a literal that overflows a double is a parse error. (It may be -0.0, or 0.0 for an underflow
  // such as 1e-400: the nearest double.)
  double as_double() const { return double_; }
  const std::string& as_string() const { return string_; }
  const std::vector<Value>& elements() const { return elements_; }
  // Object members sorted by key (keys are unique: duplicates are a parse error).
  const std::vector<std::pair<std::string, Value>>& members() const { return members_; }

  // The member named `key`, or nullptr when this is not an object or has no such key. O(log n).
  const Value* Find(absl::string_view key) const;

  // Byte offset in the parsed input where this value starts (its first character).
  size_t offset() const { return offset_; }

 private:
  friend class Parser;

  Type type_ = Type::kNull;
  size_t offset_ = 0;
  bool bool_ = false;
  int64_t int_ = 0;
  double double_ = 0;
  std::string string_;
  std::vector<Value> elements_;
  std::vector<std::pair<std::string, Value>> members_;
};

// "null", "bool", "integer", "number" (kDouble), "string", "array", "object": for error messages.
const char* TypeName(Value::Type type);

struct ParseOptions {
  // Inputs longer than this are rejected before parsing (safetensors caps its header at 100 MiB).
  size_t max_bytes = size_t{100} << 20;
  // Nesting deeper than this is rejected; a safetensors header needs 3, an index file 2.
  int max_depth = 64;
  // Added to every offset in error messages: the position of `text` in a larger file, so that errors point
  // at file offsets (a safetensors header starts at byte 8).
  size_t base_offset = 0;
  // Accept numbers with a fraction or exponent (RFC 8259's grammar, exactly) as Type::kDouble. Off by
  // default: nothing in a weight header is fractional, and a writer that puts 2.0 or 1e3 where an integer
  // belongs is broken. Numbers without fraction or exponent are kInt either way, with the int64 check.
  bool allow_fractions = false;
};

// Parses one JSON value followed only by whitespace. Errors read "JSON error at byte N: ..." where N is the
// offset in `text` plus options.base_offset; callers add the file name.
absl::StatusOr<Value> Parse(absl::string_view text, const ParseOptions& options = ParseOptions());

// Whether `s` is well-formed UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF).
bool IsValidUtf8(absl::string_view s);

// `s` as a JSON string literal, with quotes; `"`, `\` and control characters are escaped, other bytes are
// copied (the caller guarantees valid UTF-8 when the result must parse back).
std::string Quote(absl::string_view s);

}  // namespace json
}  // namespace kt

#endif  // KT_IO_JSON_H_
