#include "kt/io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kt/io/file_util.h"
#include "kt/io/json.h"

namespace kt {

namespace {

struct DtypeEntry {
  Dtype dtype;
  const char* name;
  size_t size;
};

constexpr DtypeEntry kDtypes[] = {
    {Dtype::kBf16, "BF16", 2},      {Dtype::kF16, "F16", 2}, {Dtype::kF32, "F32", 4},
    {Dtype::kF8E4M3, "F8_E4M3", 1}, {Dtype::kI8, "I8", 1},   {Dtype::kU8, "U8", 1},
    {Dtype::kI32, "I32", 4},        {Dtype::kI64, "I64", 8},    {Dtype::kF8E8M0, "F8_E8M0", 1},
};

const DtypeEntry& Entry(Dtype dtype) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.dtype == dtype) return e;
  }
  return kDtypes[0];  // Unreachable: every enumerator is in the table.
}

// product(shape) with an overflow check; false when it does not fit in 64 bits.
bool ShapeProduct(absl::Span<const int64_t> shape, uint64_t* out) {
  uint64_t n = 1;
  for (const int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *out = n;
  return true;
}

// "file: tensor "name": " — the prefix of every per-tensor error.
std::string TensorPrefix(absl::string_view origin, absl::string_view name) {
  return absl::StrCat(origin, ": tensor ", json::Quote(name), ": ");
}

absl::Status Invalid(absl::string_view prefix, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(prefix, message));
}

// Reads a non-negative JSON integer; `what` names it in the error ("shape[1]", "data_offsets[0]").
absl::Status NonNegativeInt(const json::Value& v, absl::string_view prefix, absl::string_view what,
                            uint64_t* out) {
  if (!v.is_int()) {
    return Invalid(prefix,
                   absl::StrCat(what, " must be a non-negative integer, found ", json::TypeName(v.type())));
  }
  if (v.as_int() < 0) {
    return Invalid(prefix, absl::StrCat(what, " is ", v.as_int(), ", expected a non-negative integer"));
  }
  *out = static_cast<uint64_t>(v.as_int());
  return absl::OkStatus();
}

absl::Status ParseTensor(const std::string& name, const json::Value& entry, uint64_t data_size,
                         absl::string_view origin, TensorInfo* info) {
  const std::string prefix = TensorPrefix(origin, name);
  if (!entry.is_object()) {
    return Invalid(prefix, absl::StrCat("entry must be an object, found ", json::TypeName(entry.type())));
  }
  // Unknown keys are an error rather than ignored: a key kt does not understand may change the meaning of
  // the bytes (e.g. a future "strides" or "byte_order"), and nothing that writes safetensors today adds one.
  for (const auto& member : entry.members()) {
    if (member.first != "dtype" && member.first != "shape" && member.first != "data_offsets") {
      return Invalid(prefix, absl::StrCat("unexpected key ", json::Quote(member.first),
                                          " (expected dtype, shape, data_offsets)"));
    }
  }
  const json::Value* dtype = entry.Find("dtype");
  const json::Value* shape = entry.Find("shape");
  const json::Value* offsets = entry.Find("data_offsets");
  if (dtype == nullptr) return Invalid(prefix, "missing \"dtype\"");
  if (shape == nullptr) return Invalid(prefix, "missing \"shape\"");
  if (offsets == nullptr) return Invalid(prefix, "missing \"data_offsets\"");

  info->name = name;
  if (!dtype->is_string()) {
    return Invalid(prefix, absl::StrCat("dtype must be a string, found ", json::TypeName(dtype->type())));
  }
  absl::StatusOr<Dtype> parsed = ParseDtype(dtype->as_string());
  if (!parsed.ok()) return Invalid(prefix, parsed.status().message());
  info->dtype = *parsed;

  if (!shape->is_array()) {
    return Invalid(prefix, absl::StrCat("shape must be an array, found ", json::TypeName(shape->type())));
  }
  info->shape.clear();
  for (size_t i = 0; i < shape->elements().size(); ++i) {
    uint64_t d;
    absl::Status s = NonNegativeInt(shape->elements()[i], prefix, absl::StrCat("shape[", i, "]"), &d);
    if (!s.ok()) return s;
    info->shape.push_back(static_cast<int64_t>(d));
  }

  if (!offsets->is_array() || offsets->elements().size() != 2) {
    return Invalid(prefix,
                   absl::StrCat("data_offsets must be an array [begin, end], found ",
                                offsets->is_array() ? absl::StrCat("an array of ", offsets->elements().size())
                                                    : json::TypeName(offsets->type())));
  }
  absl::Status s = NonNegativeInt(offsets->elements()[0], prefix, "data_offsets[0]", &info->begin);
  if (!s.ok()) return s;
  s = NonNegativeInt(offsets->elements()[1], prefix, "data_offsets[1]", &info->end);
  if (!s.ok()) return s;
  const std::string range = absl::StrCat("data_offsets [", info->begin, ", ", info->end, "]");
  if (info->begin > info->end) return Invalid(prefix, absl::StrCat(range, ": begin is after end"));
  if (info->end > data_size) {
    return Invalid(prefix, absl::StrCat(range, ": end is beyond the data section of ", data_size,
                                        " bytes (is the file truncated?)"));
  }

  uint64_t elements, bytes;
  if (!ShapeProduct(info->shape, &elements) ||
      __builtin_mul_overflow(elements, static_cast<uint64_t>(DtypeSize(info->dtype)), &bytes)) {
    return Invalid(prefix, absl::StrCat("shape ", ShapeString(info->shape), " of ", DtypeName(info->dtype),
                                        " has more bytes than fit in 64 bits"));
  }
  if (bytes != info->num_bytes()) {
    return Invalid(
        prefix, absl::StrCat(range, " hold ", info->num_bytes(), " bytes, but ", DtypeName(info->dtype), " ",
                             ShapeString(info->shape), " needs ", bytes));
  }
  return absl::OkStatus();
}

}  // namespace

const char* DtypeName(Dtype dtype) { return Entry(dtype).name; }

size_t DtypeSize(Dtype dtype) { return Entry(dtype).size; }

absl::StatusOr<Dtype> ParseDtype(absl::string_view name) {
  for (const DtypeEntry& e : kDtypes) {
    if (name == e.name) return e.dtype;
  }
  std::vector<std::string> supported;
  for (const DtypeEntry& e : kDtypes) supported.push_back(e.name);
  return absl::InvalidArgumentError(absl::StrCat("unsupported dtype ", json::Quote(name),
                                                 " (supported: ", absl::StrJoin(supported, ", "), ")"));
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

uint64_t TensorInfo::num_elements() const {
  uint64_t n = 1;
  ShapeProduct(shape, &n);
  return n;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view file, absl::string_view origin) {
  if (file.size() < 8) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": truncated: the file has ", file.size(),
                                                   " bytes, but a safetensors file starts with an 8-byte "
                                                   "header size"));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(file[i]);
  if (n > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": header size ", n, " exceeds the limit of ",
                                                   kMaxHeaderBytes, " bytes (not a safetensors file?)"));
  }
  if (8 + n > file.size()) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": header size ", n, " beyond the file of ",
                                                   file.size(), " bytes (needs at least ", 8 + n, ")"));
  }
  SafetensorsHeader header;
  header.data_offset = 8 + n;
  header.data_size = file.size() - header.data_offset;

  json::ParseOptions options;
  options.max_bytes = kMaxHeaderBytes;
  options.max_depth = 8;  // A valid header nests 3 deep; more is garbage, and this bounds the recursion.
  options.base_offset = 8;
  absl::StatusOr<json::Value> root = json::Parse(file.substr(8, n), options);
  if (!root.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(origin, ": header: ", root.status().message()));
  }
  if (!root->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": header must be a JSON object, found ", json::TypeName(root->type())));
  }

  for (const auto& member : root->members()) {
    if (member.first == "__metadata__") {
      const json::Value& meta = member.second;
      if (!meta.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(
            origin, ": __metadata__ must be an object of strings, found ", json::TypeName(meta.type())));
      }
      for (const auto& kv : meta.members()) {
        if (!kv.second.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(origin, ": __metadata__ ", json::Quote(kv.first),
                                                         " must be a string, found ",
                                                         json::TypeName(kv.second.type())));
        }
        header.metadata.emplace(kv.first, kv.second.as_string());
      }
      continue;
    }
    TensorInfo info;
    absl::Status s = ParseTensor(member.first, member.second, header.data_size, origin, &info);
    if (!s.ok()) return s;
    header.tensors.push_back(std::move(info));
  }
  // JSON members come sorted by key, so tensors are sorted by name and Find() can binary-search.

  // Overlap check over the non-empty ranges sorted by begin: each must start at or after the furthest end
  // seen so far. (Empty tensors occupy no bytes and cannot overlap anything.)
  std::vector<const TensorInfo*> by_offset;
  for (const TensorInfo& t : header.tensors) {
    if (t.num_bytes() > 0) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  const TensorInfo* furthest = nullptr;
  for (const TensorInfo* t : by_offset) {
    if (furthest != nullptr && t->begin < furthest->end) {
      return absl::InvalidArgumentError(absl::StrCat(
          origin, ": tensors ", json::Quote(furthest->name), " [", furthest->begin, ", ", furthest->end,
          ") and ", json::Quote(t->name), " [", t->begin, ", ", t->end, ") overlap in the data section"));
    }
    if (furthest == nullptr || t->end > furthest->end) furthest = t;
  }
  return header;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  absl::StatusOr<MappedFile> map = MappedFile::Open(path);
  if (!map.ok()) return map.status();
  // An empty file maps to an empty view, which the parser reports as truncated.
  absl::StatusOr<SafetensorsHeader> header = ParseSafetensorsHeader(map->view(), path);
  if (!header.ok()) return header.status();
  return std::unique_ptr<SafetensorsFile>(new SafetensorsFile(*std::move(map), *std::move(header)));
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  const std::vector<TensorInfo>& t = header_.tensors;
  auto it = std::lower_bound(t.begin(), t.end(), name, [](const TensorInfo& a, absl::string_view b) {
    return absl::string_view(a.name) < b;
  });
  if (it == t.end() || it->name != name) return nullptr;
  return &*it;
}

std::vector<std::string> SafetensorsFile::Names() const {
  std::vector<std::string> names;
  names.reserve(header_.tensors.size());
  for (const TensorInfo& t : header_.tensors) names.push_back(t.name);
  return names;
}

absl::StatusOr<const TensorInfo*> SafetensorsFile::Expect(absl::string_view name, Dtype dtype,
                                                          absl::Span<const int64_t> shape) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(path(), ": no tensor ", json::Quote(name), " (the file has ",
                                            header_.tensors.size(), " tensors)"));
  }
  if (info->dtype != dtype || absl::Span<const int64_t>(info->shape) != shape) {
    return absl::InvalidArgumentError(absl::StrCat(TensorPrefix(path(), name), "expected ", DtypeName(dtype),
                                                   " ", ShapeString(shape), ", found ",
                                                   DtypeName(info->dtype), " ", ShapeString(info->shape)));
  }
  return info;
}

absl::Status SafetensorsFile::Read(absl::string_view name, Dtype dtype, absl::Span<const int64_t> shape,
                                   void* out) const {
  absl::StatusOr<const TensorInfo*> info = Expect(name, dtype, shape);
  if (!info.ok()) return info.status();
  if ((*info)->num_bytes() > 0) std::memcpy(out, data(**info), (*info)->num_bytes());
  return absl::OkStatus();
}

namespace {

// The header plus the order in which the tensors' bytes follow it.
struct PlannedFile {
  std::string header;
  std::vector<const TensorToWrite*> order;
};

absl::StatusOr<PlannedFile> PlanFile(const std::vector<TensorToWrite>& tensors,
                                     const std::map<std::string, std::string>& metadata) {
  PlannedFile plan;
  for (const TensorToWrite& t : tensors) plan.order.push_back(&t);
  std::sort(plan.order.begin(), plan.order.end(),
            [](const TensorToWrite* a, const TensorToWrite* b) { return a->name < b->name; });

  std::string json = "{";
  if (!metadata.empty()) {
    json += "\"__metadata__\":{";
    bool first = true;
    for (const auto& kv : metadata) {
      if (!json::IsValidUtf8(kv.first) || !json::IsValidUtf8(kv.second)) {
        return absl::InvalidArgumentError(
            absl::StrCat("metadata ", json::Quote(kv.first), " is not valid UTF-8"));
      }
      absl::StrAppend(&json, first ? "" : ",", json::Quote(kv.first), ":", json::Quote(kv.second));
      first = false;
    }
    json += "},";
  }
  uint64_t offset = 0;
  for (size_t i = 0; i < plan.order.size(); ++i) {
    const TensorToWrite& t = *plan.order[i];
    const std::string prefix = absl::StrCat("tensor ", json::Quote(t.name), ": ");
    if (t.name.empty() || t.name == "__metadata__" || !json::IsValidUtf8(t.name)) {
      return Invalid(prefix, "invalid name (empty, \"__metadata__\" or not UTF-8)");
    }
    if (i > 0 && plan.order[i - 1]->name == t.name) return Invalid(prefix, "duplicate name");
    uint64_t elements, bytes;
    if (!ShapeProduct(t.shape, &elements) ||
        __builtin_mul_overflow(elements, static_cast<uint64_t>(DtypeSize(t.dtype)), &bytes)) {
      return Invalid(prefix, absl::StrCat("invalid shape ", ShapeString(t.shape)));
    }
    if (bytes != t.bytes.size()) {
      return Invalid(prefix, absl::StrCat(t.bytes.size(), " bytes given, but ", DtypeName(t.dtype), " ",
                                          ShapeString(t.shape), " needs ", bytes));
    }
    absl::StrAppend(&json, i > 0 ? "," : "", json::Quote(t.name), ":{\"dtype\":\"", DtypeName(t.dtype),
                    "\",\"shape\":[", absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", offset, ",",
                    offset + bytes, "]}");
    offset += bytes;
  }
  json += "}";
  // Pad with spaces (legal trailing JSON whitespace) so that the data section starts 8-byte aligned.
  json.append((8 - json.size() % 8) % 8, ' ');
  if (json.size() > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("header of ", json.size(), " bytes exceeds the limit of ", kMaxHeaderBytes));
  }
  uint64_t n = json.size();
  plan.header.resize(8);
  for (int i = 0; i < 8; ++i) plan.header[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  plan.header += json;
  return plan;
}

}  // namespace

absl::StatusOr<std::string> BuildSafetensorsHeader(const std::vector<TensorToWrite>& tensors,
                                                   const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<PlannedFile> plan = PlanFile(tensors, metadata);
  if (!plan.ok()) return plan.status();
  return std::move(plan->header);
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  absl::StatusOr<PlannedFile> plan = PlanFile(tensors, metadata);
  if (!plan.ok())
    return absl::Status(plan.status().code(), absl::StrCat(path, ": ", plan.status().message()));

  return WriteFileAtomically(path, [&plan](FileSink& out) {
    absl::Status status = out.Write(plan->header);
    for (const TensorToWrite* t : plan->order) {
      if (!status.ok()) break;
      status = out.Write(t->bytes.data(), t->bytes.size());
    }
    return status;
  });
}

}  // namespace kt
