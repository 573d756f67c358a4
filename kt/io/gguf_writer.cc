// GGUF writing (gguf.h: SerializeGguf, WriteGguf): the header planned and checked before a byte is written.
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kt/io/file_util.h"
#include "kt/io/gguf.h"
#include "kt/io/gguf_internal.h"

namespace kt {

using namespace gguf_internal;  // NOLINT: the format's shared pieces.

namespace {

void PutUint(std::string* out, uint64_t v, int size) {
  for (int i = 0; i < size; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

void PutString(std::string* out, absl::string_view s) {
  PutUint(out, s.size(), 8);
  out->append(s.data(), s.size());
}

absl::Status PutValue(std::string* out, const GgufValue& v, int depth) {
  const uint32_t id = static_cast<uint32_t>(v.type());
  if (id >= kNumValueTypes) return absl::InvalidArgumentError(absl::StrCat("unknown value type ", id));
  if (v.is_string()) {
    PutString(out, v.string_value());
  } else if (v.is_array()) {
    if (depth >= kGgufMaxArrayDepth) {
      return absl::InvalidArgumentError(absl::StrCat("arrays nested more than ", kGgufMaxArrayDepth, " deep"));
    }
    const uint32_t element_id = static_cast<uint32_t>(v.element_type());
    if (element_id >= kNumValueTypes) {
      return absl::InvalidArgumentError(absl::StrCat("unknown array element type ", element_id));
    }
    PutUint(out, element_id, 4);
    PutUint(out, v.elements().size(), 8);
    for (size_t i = 0; i < v.elements().size(); ++i) {
      const GgufValue& e = v.elements()[i];
      if (e.type() != v.element_type()) {
        return absl::InvalidArgumentError(absl::StrCat("element ", i, " is ", GgufValueTypeName(e.type()),
                                                       " in an array of ", GgufValueTypeName(v.element_type())));
      }
      absl::Status s = PutValue(out, e, depth + 1);
      if (!s.ok()) return Wrap(s, absl::StrCat("element ", i, ": "));
    }
  } else {
    PutUint(out, v.bits(), static_cast<int>(ScalarSize(v.type())));
  }
  return absl::OkStatus();
}

// Everything before the data section, plus where each tensor goes.
struct PlannedGguf {
  std::string header;             // Padded to the alignment.
  std::vector<uint64_t> padding;  // Zero bytes after each tensor's data.
};

absl::StatusOr<PlannedGguf> PlanGguf(const GgufMetadata& metadata, const std::vector<GgufTensorToWrite>& tensors) {
  PlannedGguf plan;
  std::string& out = plan.header;
  uint64_t alignment = kGgufDefaultAlignment;
  PutUint(&out, kMagic, 4);
  PutUint(&out, 3, 4);
  PutUint(&out, tensors.size(), 8);
  PutUint(&out, metadata.size(), 8);
  std::map<absl::string_view, size_t> seen;
  for (size_t i = 0; i < metadata.size(); ++i) {
    const std::string& key = metadata[i].first;
    const GgufValue& value = metadata[i].second;
    const std::string prefix = absl::StrCat("metadata ", Q(key), ": ");
    if (!seen.emplace(key, i).second) return absl::InvalidArgumentError(absl::StrCat(prefix, "duplicate key"));
    if (key == "general.alignment") {
      absl::Status s = CheckAlignment(value, prefix, &alignment);
      if (!s.ok()) return s;
    }
    PutString(&out, key);
    PutUint(&out, static_cast<uint32_t>(value.type()), 4);
    absl::Status s = PutValue(&out, value, 0);
    if (!s.ok()) return Wrap(s, prefix);
  }
  std::map<absl::string_view, size_t> names;
  uint64_t offset = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const GgufTensorToWrite& t = tensors[i];
    const std::string prefix = absl::StrCat("tensor ", Q(t.name), ": ");
    if (!names.emplace(t.name, i).second) return absl::InvalidArgumentError(absl::StrCat(prefix, "duplicate name"));
    if (t.dims.size() > kGgufMaxDims) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, t.dims.size(), " dims, more than the maximum of ", kGgufMaxDims));
    }
    if (FindType(static_cast<uint32_t>(t.type)) == nullptr) {
      return Wrap(ParseGgmlType(static_cast<uint32_t>(t.type)).status(), prefix);
    }
    absl::StatusOr<uint64_t> nbytes = GgmlNbytes(t.type, t.dims);
    if (!nbytes.ok()) return Wrap(nbytes.status(), prefix);
    if (*nbytes != t.bytes.size()) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, t.bytes.size(), " bytes given, but ",
                                                     GgmlTypeName(t.type), " ", DimsString(t.dims), " needs ",
                                                     *nbytes));
    }
    PutString(&out, t.name);
    PutUint(&out, t.dims.size(), 4);
    for (const uint64_t d : t.dims) PutUint(&out, d, 8);
    PutUint(&out, static_cast<uint32_t>(t.type), 4);
    PutUint(&out, offset, 8);
    const uint64_t padded = AlignUp(*nbytes, alignment);
    plan.padding.push_back(padded - *nbytes);
    if (__builtin_add_overflow(offset, padded, &offset)) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "the data section exceeds 64 bits"));
    }
  }
  out.append(AlignUp(out.size(), alignment) - out.size(), '\0');
  return plan;
}

}  // namespace

absl::StatusOr<std::string> SerializeGguf(const GgufMetadata& metadata,
                                          const std::vector<GgufTensorToWrite>& tensors) {
  absl::StatusOr<PlannedGguf> plan = PlanGguf(metadata, tensors);
  if (!plan.ok()) return plan.status();
  std::string out = std::move(plan->header);
  for (size_t i = 0; i < tensors.size(); ++i) {
    out.append(reinterpret_cast<const char*>(tensors[i].bytes.data()), tensors[i].bytes.size());
    out.append(plan->padding[i], '\0');
  }
  return out;
}

absl::Status WriteGguf(const std::string& path, const GgufMetadata& metadata,
                       const std::vector<GgufTensorToWrite>& tensors) {
  absl::StatusOr<PlannedGguf> plan = PlanGguf(metadata, tensors);
  if (!plan.ok()) return Wrap(plan.status(), absl::StrCat(path, ": "));

  return WriteFileAtomically(path, [&](FileSink& out) {
    absl::Status status = out.Write(plan->header);
    for (size_t i = 0; i < tensors.size() && status.ok(); ++i) {
      status = out.Write(tensors[i].bytes.data(), tensors[i].bytes.size());
      if (status.ok()) status = out.WriteZeros(plan->padding[i]);
    }
    return status;
  });
}

}  // namespace kt
