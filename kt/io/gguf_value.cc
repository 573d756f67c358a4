// GGUF's value model (gguf.h: GgufValue) and the typed metadata getters of GgufHeader.
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kt/io/gguf.h"
#include "kt/io/gguf_internal.h"

namespace kt {

using namespace gguf_internal;  // NOLINT: the format's shared pieces.

std::string GgufValueTypeName(GgufValueType type) {
  const uint32_t id = static_cast<uint32_t>(type);
  if (id < kNumValueTypes) return kValueTypeNames[id];
  return absl::StrCat("type ", id);
}

GgufValue GgufValue::Float32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return Float32Bits(bits);
}

GgufValue GgufValue::Float64(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return Float64Bits(bits);
}

GgufValue GgufValue::String(std::string v) {
  GgufValue out;
  out.type_ = GgufValueType::kString;
  out.str_ = std::move(v);
  return out;
}

GgufValue GgufValue::Array(GgufValueType element_type, std::vector<GgufValue> elements) {
  GgufValue out;
  out.type_ = GgufValueType::kArray;
  out.element_type_ = element_type;
  out.elements_ = std::move(elements);
  return out;
}

bool GgufValue::is_unsigned() const {
  return type_ == GgufValueType::kUint8 || type_ == GgufValueType::kUint16 || type_ == GgufValueType::kUint32 ||
         type_ == GgufValueType::kUint64;
}

bool GgufValue::is_signed() const {
  return type_ == GgufValueType::kInt8 || type_ == GgufValueType::kInt16 || type_ == GgufValueType::kInt32 ||
         type_ == GgufValueType::kInt64;
}

bool GgufValue::is_float() const {
  return type_ == GgufValueType::kFloat32 || type_ == GgufValueType::kFloat64;
}

double GgufValue::float_value() const {
  if (type_ == GgufValueType::kFloat32) {
    const uint32_t b = static_cast<uint32_t>(bits_);
    float f;
    std::memcpy(&f, &b, sizeof(f));
    return f;
  }
  if (type_ == GgufValueType::kFloat64) {
    double d;
    std::memcpy(&d, &bits_, sizeof(d));
    return d;
  }
  return 0;
}

bool GgufValue::operator==(const GgufValue& other) const {
  if (type_ != other.type_) return false;
  if (type_ == GgufValueType::kArray) {
    return element_type_ == other.element_type_ && elements_ == other.elements_;
  }
  return bits_ == other.bits_ && str_ == other.str_;
}

std::string GgufValue::DebugString() const {
  if (is_array()) {
    return absl::StrCat("ARRAY<", GgufValueTypeName(element_type_), ">[", elements_.size(), "]");
  }
  if (is_string()) return absl::StrCat("STRING ", Q(str_));
  if (is_signed()) return absl::StrCat(GgufValueTypeName(type_), " ", int_value());
  if (is_float()) return absl::StrCat(GgufValueTypeName(type_), " ", float_value());
  if (type_ == GgufValueType::kBool) return bits_ != 0 ? "BOOL true" : "BOOL false";
  return absl::StrCat(GgufValueTypeName(type_), " ", bits_);
}

const GgufTensorInfo* GgufHeader::Find(absl::string_view name) const {
  auto it = std::lower_bound(by_name.begin(), by_name.end(), name,
                             [this](size_t i, absl::string_view b) { return absl::string_view(tensors[i].name) < b; });
  if (it == by_name.end() || tensors[*it].name != name) return nullptr;
  return &tensors[*it];
}

const GgufValue* GgufHeader::FindMetadata(absl::string_view key) const {
  auto it = metadata.find(std::string(key));
  return it == metadata.end() ? nullptr : &it->second;
}

namespace {

// The value for `key` or NotFound; on success `*prefix` is "file: metadata "key": ".
absl::StatusOr<const GgufValue*> Lookup(const GgufHeader& h, absl::string_view key, std::string* prefix) {
  const GgufValue* v = h.FindMetadata(key);
  if (v == nullptr) {
    return absl::NotFoundError(absl::StrCat(h.origin, ": no metadata key ", Q(key), " (the file has ",
                                            h.metadata.size(), " keys)"));
  }
  *prefix = absl::StrCat(h.origin, ": metadata ", Q(key), ": ");
  return v;
}

absl::Status Mismatch(absl::string_view prefix, absl::string_view expected, const GgufValue& v) {
  return absl::InvalidArgumentError(absl::StrCat(prefix, "expected ", expected, ", found ", v.DebugString()));
}

}  // namespace

absl::StatusOr<uint64_t> GgufHeader::GetUint(absl::string_view key) const {
  std::string prefix;
  absl::StatusOr<const GgufValue*> v = Lookup(*this, key, &prefix);
  if (!v.ok()) return v.status();
  if ((*v)->is_unsigned()) return (*v)->uint_value();
  if ((*v)->is_signed()) {
    if ((*v)->int_value() >= 0) return static_cast<uint64_t>((*v)->int_value());
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "is ", (*v)->int_value(), ", expected a non-negative integer"));
  }
  return Mismatch(prefix, "an unsigned integer", **v);
}

absl::StatusOr<int64_t> GgufHeader::GetInt(absl::string_view key) const {
  std::string prefix;
  absl::StatusOr<const GgufValue*> v = Lookup(*this, key, &prefix);
  if (!v.ok()) return v.status();
  if ((*v)->is_signed()) return (*v)->int_value();
  if ((*v)->is_unsigned()) {
    if ((*v)->uint_value() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return static_cast<int64_t>((*v)->uint_value());
    }
    return absl::InvalidArgumentError(absl::StrCat(prefix, "is ", (*v)->uint_value(), ", beyond INT64_MAX"));
  }
  return Mismatch(prefix, "an integer", **v);
}

absl::StatusOr<double> GgufHeader::GetFloat(absl::string_view key) const {
  std::string prefix;
  absl::StatusOr<const GgufValue*> v = Lookup(*this, key, &prefix);
  if (!v.ok()) return v.status();
  if ((*v)->is_float()) return (*v)->float_value();
  return Mismatch(prefix, "FLOAT32 or FLOAT64", **v);
}

absl::StatusOr<bool> GgufHeader::GetBool(absl::string_view key) const {
  std::string prefix;
  absl::StatusOr<const GgufValue*> v = Lookup(*this, key, &prefix);
  if (!v.ok()) return v.status();
  if ((*v)->type() == GgufValueType::kBool) return (*v)->bool_value();
  return Mismatch(prefix, "BOOL", **v);
}

absl::StatusOr<std::string> GgufHeader::GetString(absl::string_view key) const {
  std::string prefix;
  absl::StatusOr<const GgufValue*> v = Lookup(*this, key, &prefix);
  if (!v.ok()) return v.status();
  if ((*v)->is_string()) return (*v)->string_value();
  return Mismatch(prefix, "STRING", **v);
}

absl::StatusOr<const GgufValue*> GgufHeader::GetArray(absl::string_view key) const {
  std::string prefix;
  absl::StatusOr<const GgufValue*> v = Lookup(*this, key, &prefix);
  if (!v.ok()) return v.status();
  if ((*v)->is_array()) return *v;
  return Mismatch(prefix, "ARRAY", **v);
}

absl::StatusOr<std::vector<std::string>> GgufHeader::GetStringArray(absl::string_view key) const {
  std::string prefix;
  absl::StatusOr<const GgufValue*> v = Lookup(*this, key, &prefix);
  if (!v.ok()) return v.status();
  if (!(*v)->is_array() || (*v)->element_type() != GgufValueType::kString) {
    return Mismatch(prefix, "ARRAY<STRING>", **v);
  }
  std::vector<std::string> out;
  out.reserve((*v)->elements().size());
  for (const GgufValue& e : (*v)->elements()) out.push_back(e.string_value());
  return out;
}

}  // namespace kt
