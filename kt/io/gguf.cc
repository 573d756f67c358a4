#include "kt/io/gguf.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kt/io/file_util.h"
#include "kt/io/gguf_internal.h"
#include "kt/io/json.h"

namespace kt {

using namespace gguf_internal;  // NOLINT: gguf_internal.h is shared with gguf_writer.cc.

namespace gguf_internal {

// Block geometry of each supported ggml type, checked against ggml.h / ggml-common.h:
//   Q4_0: {fp16 d; uint8 qs[16]}                                        32 elements, 18 bytes
//   Q4_1: {fp16 d, m; uint8 qs[16]}                                     32, 20
//   Q5_0: {fp16 d; uint8 qh[4]; uint8 qs[16]}                           32, 22
//   Q5_1: {fp16 d, m; uint8 qh[4]; uint8 qs[16]}                        32, 24
//   Q8_0: {fp16 d; int8 qs[32]}                                         32, 34
//   Q8_1: {fp16 d, s; int8 qs[32]}                                      32, 36
//   Q2_K: {uint8 scales[16]; uint8 qs[64]; fp16 d, dmin}                256 (QK_K), 84
//   Q3_K: {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; fp16 d}     256, 110
//   Q4_K: {fp16 d, dmin; uint8 scales[12]; uint8 qs[128]}               256, 144
//   Q5_K: {fp16 d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]} 256, 176
//   Q6_K: {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}        256, 210
//   Q8_K: {float d; int8 qs[256]; int16 bsums[16]}                      256, 292

constexpr GgmlTypeEntry kGgmlTypes[] = {
    {GgmlType::kF32, "F32", 1, 4},      {GgmlType::kF16, "F16", 1, 2},       {GgmlType::kQ4_0, "Q4_0", 32, 18},
    {GgmlType::kQ4_1, "Q4_1", 32, 20},  {GgmlType::kQ5_0, "Q5_0", 32, 22},   {GgmlType::kQ5_1, "Q5_1", 32, 24},
    {GgmlType::kQ8_0, "Q8_0", 32, 34},  {GgmlType::kQ8_1, "Q8_1", 32, 36},   {GgmlType::kQ2_K, "Q2_K", 256, 84},
    {GgmlType::kQ3_K, "Q3_K", 256, 110}, {GgmlType::kQ4_K, "Q4_K", 256, 144}, {GgmlType::kQ5_K, "Q5_K", 256, 176},
    {GgmlType::kQ6_K, "Q6_K", 256, 210}, {GgmlType::kQ8_K, "Q8_K", 256, 292}, {GgmlType::kI8, "I8", 1, 1},
    {GgmlType::kI16, "I16", 1, 2},      {GgmlType::kI32, "I32", 1, 4},       {GgmlType::kI64, "I64", 1, 8},
    {GgmlType::kF64, "F64", 1, 8},      {GgmlType::kBf16, "BF16", 1, 2},
    // Known by size (ggml's type traits; the gguf package's GGML_QUANT_SIZES), so files holding them open.
    {GgmlType::kIQ2_XXS, "IQ2_XXS", 256, 66}, {GgmlType::kIQ2_XS, "IQ2_XS", 256, 74},
    {GgmlType::kIQ3_XXS, "IQ3_XXS", 256, 98}, {GgmlType::kIQ1_S, "IQ1_S", 256, 50},
    {GgmlType::kIQ4_NL, "IQ4_NL", 32, 18},    {GgmlType::kIQ3_S, "IQ3_S", 256, 110},
    {GgmlType::kIQ2_S, "IQ2_S", 256, 82},     {GgmlType::kIQ4_XS, "IQ4_XS", 256, 136},
    {GgmlType::kIQ1_M, "IQ1_M", 256, 56},     {GgmlType::kTQ1_0, "TQ1_0", 256, 54},
    {GgmlType::kTQ2_0, "TQ2_0", 256, 66},     {GgmlType::kMXFP4, "MXFP4", 32, 17},
};

const GgmlTypeEntry* FindType(uint32_t id) {
  for (const GgmlTypeEntry& e : kGgmlTypes) {
    if (static_cast<uint32_t>(e.type) == id) return &e;
  }
  return nullptr;
}

const GgmlTypeEntry& Entry(GgmlType type) {
  const GgmlTypeEntry* e = FindType(static_cast<uint32_t>(type));
  return e != nullptr ? *e : kGgmlTypes[0];  // Only an out-of-enum value cast in lands on the fallback.
}


// Bytes of one scalar of this type in the file; 0 for STRING and ARRAY.
uint64_t ScalarSize(GgufValueType type) {
  switch (type) {
    case GgufValueType::kUint8:
    case GgufValueType::kInt8:
    case GgufValueType::kBool:
      return 1;
    case GgufValueType::kUint16:
    case GgufValueType::kInt16:
      return 2;
    case GgufValueType::kUint32:
    case GgufValueType::kInt32:
    case GgufValueType::kFloat32:
      return 4;
    case GgufValueType::kUint64:
    case GgufValueType::kInt64:
    case GgufValueType::kFloat64:
      return 8;
    default:
      return 0;
  }
}

// The fewest bytes one element of this type takes in the file: bounds array counts by what is left.
uint64_t MinEncodedSize(GgufValueType type) {
  if (type == GgufValueType::kString) return 8;   // The length.
  if (type == GgufValueType::kArray) return 12;   // Element type and count.
  return ScalarSize(type);
}

// A name or key quoted for an error message, cut at 200 bytes so that a garbage megabyte-long name does not
// make a megabyte-long message.
std::string Q(absl::string_view s) {
  if (s.size() <= 200) return json::Quote(s);
  return absl::StrCat(json::Quote(s.substr(0, 200)), "... (", s.size(), " bytes)");
}

absl::Status Invalid(absl::string_view origin, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": ", message));
}

// Prepends `prefix` to an error's message, keeping its code.
absl::Status Wrap(const absl::Status& s, absl::string_view prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

}  // namespace gguf_internal

namespace {

// Bounds-checked little-endian reads over the whole file. Errors are relative ("truncated: ..."); the caller
// adds the file and the key or tensor.
class Reader {
 public:
  explicit Reader(absl::string_view file) : file_(file) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return file_.size() - pos_; }

  absl::Status Need(uint64_t n, absl::string_view what) const {
    if (n > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat("truncated: ", what, " at byte ", pos_, " needs ", n,
                                                     " bytes, but only ", remaining(), " remain (the file has ",
                                                     file_.size(), ")"));
    }
    return absl::OkStatus();
  }

  absl::Status Uint(uint64_t size, absl::string_view what, uint64_t* out) {
    absl::Status s = Need(size, what);
    if (!s.ok()) return s;
    uint64_t v = 0;
    for (uint64_t i = size; i > 0; --i) v = (v << 8) | static_cast<uint8_t>(file_[pos_ + i - 1]);
    pos_ += size;
    *out = v;
    return absl::OkStatus();
  }
  absl::Status U32(absl::string_view what, uint32_t* out) {
    uint64_t v = 0;
    absl::Status s = Uint(4, what, &v);
    *out = static_cast<uint32_t>(v);
    return s;
  }
  absl::Status U64(absl::string_view what, uint64_t* out) { return Uint(8, what, out); }

  // A GGUF string: uint64 length, then that many bytes (checked against what is left before copying).
  absl::Status String(absl::string_view what, std::string* out) {
    uint64_t n;
    absl::Status s = U64(absl::StrCat(what, " length"), &n);
    if (!s.ok()) return s;
    if (n > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat("bad string length: ", what, " at byte ", pos_ - 8,
                                                     " has length ", n, ", but only ", remaining(),
                                                     " bytes of the file follow"));
    }
    out->assign(file_.data() + pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }

 private:
  absl::string_view file_;
  uint64_t pos_ = 0;
};

absl::Status ReadValue(Reader& r, GgufValueType type, int depth, GgufValue* out);

absl::Status ReadValueType(Reader& r, absl::string_view what, GgufValueType* out) {
  uint32_t id;
  absl::Status s = r.U32(what, &id);
  if (!s.ok()) return s;
  if (id >= kNumValueTypes) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown ", what, " ", id, " at byte ", r.pos() - 4, " (expected 0..12)"));
  }
  *out = static_cast<GgufValueType>(id);
  return absl::OkStatus();
}

absl::Status ReadArray(Reader& r, int depth, GgufValue* out) {
  if (depth >= kGgufMaxArrayDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat("arrays nested more than ", kGgufMaxArrayDepth, " deep at byte ", r.pos()));
  }
  GgufValueType element_type;
  absl::Status s = ReadValueType(r, "array element type", &element_type);
  if (!s.ok()) return s;
  uint64_t count = 0;
  s = r.U64("array length", &count);
  if (!s.ok()) return s;
  // Every element takes at least MinEncodedSize bytes, so a count beyond what the file can hold is rejected
  // before anything is allocated.
  const uint64_t min_size = MinEncodedSize(element_type);
  if (count > r.remaining() / min_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad array length: ", count, " ", GgufValueTypeName(element_type), " elements at byte ", r.pos() - 8,
        " need at least ", min_size, " bytes each, but only ", r.remaining(), " bytes of the file follow"));
  }
  std::vector<GgufValue> elements(count);
  for (uint64_t i = 0; i < count; ++i) {
    s = ReadValue(r, element_type, depth + 1, &elements[i]);
    if (!s.ok()) return Wrap(s, absl::StrCat("element ", i, ": "));
  }
  *out = GgufValue::Array(element_type, std::move(elements));
  return absl::OkStatus();
}

absl::Status ReadValue(Reader& r, GgufValueType type, int depth, GgufValue* out) {
  switch (type) {
    case GgufValueType::kString: {
      std::string str;
      absl::Status s = r.String("STRING", &str);
      if (!s.ok()) return s;
      *out = GgufValue::String(std::move(str));
      return absl::OkStatus();
    }
    case GgufValueType::kArray:
      return ReadArray(r, depth, out);
    default:
      break;
  }
  const uint64_t size = ScalarSize(type);
  uint64_t bits;
  absl::Status s = r.Uint(size, GgufValueTypeName(type), &bits);
  if (!s.ok()) return s;
  switch (type) {
    case GgufValueType::kInt8:
      *out = GgufValue::Int8(static_cast<int8_t>(bits));
      break;
    case GgufValueType::kInt16:
      *out = GgufValue::Int16(static_cast<int16_t>(bits));
      break;
    case GgufValueType::kInt32:
      *out = GgufValue::Int32(static_cast<int32_t>(bits));
      break;
    case GgufValueType::kInt64:
      *out = GgufValue::Int64(static_cast<int64_t>(bits));
      break;
    case GgufValueType::kFloat32:
      *out = GgufValue::Float32Bits(static_cast<uint32_t>(bits));
      break;
    case GgufValueType::kFloat64:
      *out = GgufValue::Float64Bits(bits);
      break;
    case GgufValueType::kBool:
      // The spec allows 0 and 1 only; anything else could be read as true or as corruption.
      if (bits > 1) {
        return absl::InvalidArgumentError(
            absl::StrCat("BOOL at byte ", r.pos() - 1, " is ", bits, ", expected 0 or 1"));
      }
      *out = GgufValue::Bool(bits != 0);
      break;
    case GgufValueType::kUint8:
      *out = GgufValue::Uint8(static_cast<uint8_t>(bits));
      break;
    case GgufValueType::kUint16:
      *out = GgufValue::Uint16(static_cast<uint16_t>(bits));
      break;
    case GgufValueType::kUint32:
      *out = GgufValue::Uint32(static_cast<uint32_t>(bits));
      break;
    default:  // kUint64 (STRING and ARRAY returned above).
      *out = GgufValue::Uint64(bits);
      break;
  }
  return absl::OkStatus();
}

}  // namespace

namespace gguf_internal {

bool ProductFits(absl::Span<const uint64_t> dims, uint64_t* out) {
  uint64_t n = 1;
  for (const uint64_t d : dims) {
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
    if (__builtin_mul_overflow(n, d, &n)) return false;
  }
  if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return false;
  *out = n;
  return true;
}

std::string DimsString(absl::Span<const uint64_t> dims) { return absl::StrCat("[", absl::StrJoin(dims, ", "), "]"); }

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

uint64_t AlignUp(uint64_t v, uint64_t alignment) { return (v + alignment - 1) / alignment * alignment; }

// The alignment a `general.alignment` value asks for; `prefix` starts the error.
absl::Status CheckAlignment(const GgufValue& v, absl::string_view prefix, uint64_t* out) {
  if (v.type() != GgufValueType::kUint32) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "expected UINT32, found ", GgufValueTypeName(v.type())));
  }
  if (!IsPowerOfTwo(v.uint_value())) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "is ", v.uint_value(), ", expected a power of two"));
  }
  *out = v.uint_value();
  return absl::OkStatus();
}

}  // namespace gguf_internal

namespace {

absl::Status ParseTensorInfo(Reader& r, uint64_t index, absl::string_view origin, GgufTensorInfo* info) {
  const std::string where = absl::StrCat(origin, ": tensor #", index, ": ");
  absl::Status s = r.String("name", &info->name);
  if (!s.ok()) return Wrap(s, where);
  const std::string prefix = absl::StrCat(origin, ": tensor ", Q(info->name), ": ");
  uint32_t n_dims;
  s = r.U32("n_dims", &n_dims);
  if (!s.ok()) return Wrap(s, prefix);
  if (n_dims > kGgufMaxDims) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "n_dims ", n_dims, " exceeds the maximum of ", kGgufMaxDims));
  }
  info->dims.resize(n_dims);
  for (uint32_t i = 0; i < n_dims; ++i) {
    s = r.U64(absl::StrCat("dims[", i, "]"), &info->dims[i]);
    if (!s.ok()) return Wrap(s, prefix);
  }
  uint32_t type_id;
  s = r.U32("ggml type", &type_id);
  if (!s.ok()) return Wrap(s, prefix);
  s = r.U64("offset", &info->offset);
  if (!s.ok()) return Wrap(s, prefix);
  absl::StatusOr<GgmlType> type = ParseGgmlType(type_id);
  if (!type.ok()) return Wrap(type.status(), prefix);
  info->type = *type;
  absl::StatusOr<uint64_t> nbytes = GgmlNbytes(info->type, info->dims);
  if (!nbytes.ok()) return Wrap(nbytes.status(), prefix);
  info->nbytes = *nbytes;
  return absl::OkStatus();
}

}  // namespace

const char* GgmlTypeName(GgmlType type) { return Entry(type).name; }
uint64_t GgmlBlockSize(GgmlType type) { return Entry(type).block; }
uint64_t GgmlTypeSize(GgmlType type) { return Entry(type).size; }

absl::StatusOr<GgmlType> ParseGgmlType(uint32_t id) {
  const GgmlTypeEntry* e = FindType(id);
  if (e != nullptr) return e->type;
  std::vector<std::string> supported;
  for (const GgmlTypeEntry& t : kGgmlTypes) supported.push_back(absl::StrCat(t.name, "=", static_cast<uint32_t>(t.type)));
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported ggml type ", id, " (supported: ", absl::StrJoin(supported, ", "), ")"));
}

absl::StatusOr<uint64_t> GgmlNbytes(GgmlType type, absl::Span<const uint64_t> dims) {
  const GgmlTypeEntry& e = Entry(type);
  uint64_t elements;
  if (!ProductFits(dims, &elements)) {
    return absl::InvalidArgumentError(absl::StrCat("dims ", DimsString(dims), " of ", e.name,
                                                   " overflow (the element count must fit in int64)"));
  }
  const uint64_t ne0 = dims.empty() ? 1 : dims[0];
  if (ne0 % e.block != 0) {
    return absl::InvalidArgumentError(absl::StrCat("dims ", DimsString(dims), ": ne[0] = ", ne0,
                                                   " is not a multiple of the ", e.name, " block size ",
                                                   e.block));
  }
  uint64_t bytes;
  if (__builtin_mul_overflow(elements / e.block, e.size, &bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dims ", DimsString(dims), " of ", e.name, " have more bytes than fit in 64 bits"));
  }
  return bytes;
}

uint64_t GgufTensorInfo::num_elements() const {
  uint64_t n = 1;
  ProductFits(dims, &n);
  return n;
}

namespace {

// The magic, the version and the two counts; the counts are checked against what the file can hold.
absl::Status ReadPreamble(Reader& r, absl::string_view origin, GgufHeader* h, uint64_t* tensor_count,
                          uint64_t* kv_count) {
  uint32_t magic;
  absl::Status s = r.U32("the magic", &magic);
  if (!s.ok()) return Wrap(s, absl::StrCat(origin, ": not a GGUF file: "));
  if (magic != kMagic) {
    return Invalid(origin, absl::StrFormat("not a GGUF file: the first 4 bytes are %02x %02x %02x %02x, "
                                           "expected 47 47 55 46 (\"GGUF\")",
                                           magic & 0xFF, (magic >> 8) & 0xFF, (magic >> 16) & 0xFF, magic >> 24));
  }
  s = r.U32("the version", &h->version);
  if (!s.ok()) return Wrap(s, absl::StrCat(origin, ": "));
  if (h->version != 2 && h->version != 3) {
    const uint32_t swapped = __builtin_bswap32(h->version);
    return Invalid(origin, absl::StrCat("unsupported GGUF version ", h->version, " (supported: 2, 3",
                                        swapped == 2 || swapped == 3 ? "; is this a big-endian file?" : "",
                                        h->version == 1 ? "; version 1 files predate 64-bit counts" : "", ")"));
  }
  s = r.U64("tensor_count", tensor_count);
  if (s.ok()) s = r.U64("metadata_kv_count", kv_count);
  if (!s.ok()) return Wrap(s, absl::StrCat(origin, ": "));
  // A tensor info takes at least 24 bytes (name length, n_dims, type, offset) and a key/value at least 13
  // (key length, value type, one byte): counts beyond what the file can hold are rejected before anything
  // is allocated.
  if (*tensor_count > r.remaining() / 24 || *kv_count > r.remaining() / 13 ||
      *tensor_count * 24 + *kv_count * 13 > r.remaining()) {
    return Invalid(origin, absl::StrCat("truncated or corrupt: tensor_count ", *tensor_count, " and metadata_kv_count ",
                                        *kv_count, " need at least 24 and 13 bytes each, but only ", r.remaining(),
                                        " bytes follow the header"));
  }
  return absl::OkStatus();
}

absl::Status ReadMetadata(Reader& r, absl::string_view origin, uint64_t kv_count, GgufHeader* h) {
  absl::Status s;
  for (uint64_t i = 0; i < kv_count; ++i) {
    std::string key;
    s = r.String("key", &key);
    if (!s.ok()) return Wrap(s, absl::StrCat(origin, ": metadata #", i, ": "));
    const std::string prefix = absl::StrCat(origin, ": metadata ", Q(key), ": ");
    GgufValueType type;
    s = ReadValueType(r, "value type", &type);
    if (!s.ok()) return Wrap(s, prefix);
    GgufValue value;
    s = ReadValue(r, type, 0, &value);
    if (!s.ok()) return Wrap(s, prefix);
    if (key == "general.alignment") {
      s = CheckAlignment(value, prefix, &h->alignment);
      if (!s.ok()) return s;
    }
    if (!h->metadata.emplace(std::move(key), std::move(value)).second) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "duplicate key (metadata #", i, ")"));
    }
  }
  return absl::OkStatus();
}

// The tensor infos, indexed by name (a name may appear once).
absl::Status ReadTensorInfos(Reader& r, absl::string_view origin, uint64_t tensor_count, GgufHeader* h) {
  absl::Status s;
  h->tensors.resize(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) {
    s = ParseTensorInfo(r, i, origin, &h->tensors[i]);
    if (!s.ok()) return s;
  }
  h->by_name.resize(tensor_count);
  for (uint64_t i = 0; i < tensor_count; ++i) h->by_name[i] = i;
  std::sort(h->by_name.begin(), h->by_name.end(),
            [h](size_t a, size_t b) { return h->tensors[a].name < h->tensors[b].name; });
  for (size_t i = 1; i < h->by_name.size(); ++i) {
    const GgufTensorInfo& a = h->tensors[h->by_name[i - 1]];
    const GgufTensorInfo& b = h->tensors[h->by_name[i]];
    if (a.name == b.name) {
      return Invalid(origin, absl::StrCat("duplicate tensor ", Q(a.name), " (tensors #",
                                          std::min(h->by_name[i - 1], h->by_name[i]), " and #",
                                          std::max(h->by_name[i - 1], h->by_name[i]), ")"));
    }
  }
  return absl::OkStatus();
}

// Every tensor aligned, inside the data section, and apart from the others.
absl::Status CheckPlacement(absl::string_view origin, const GgufHeader& h) {
  std::vector<const GgufTensorInfo*> by_offset;
  for (const GgufTensorInfo& t : h.tensors) {
    const std::string prefix = absl::StrCat(origin, ": tensor ", Q(t.name), ": ");
    if (t.offset % h.alignment != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "offset ", t.offset, " is not a multiple of the alignment ", h.alignment));
    }
    uint64_t end;
    if (__builtin_add_overflow(t.offset, t.nbytes, &end) || end > h.data_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, GgmlTypeName(t.type), " ", DimsString(t.dims), " needs ", t.nbytes, " bytes at offset ",
          t.offset, ", beyond the data section of ", h.data_size, " bytes (is the file truncated?)"));
    }
    if (t.nbytes > 0) by_offset.push_back(&t);
  }
  // Overlap check over the non-empty ranges sorted by offset (as in safetensors.cc).
  std::sort(by_offset.begin(), by_offset.end(), [](const GgufTensorInfo* a, const GgufTensorInfo* b) {
    return a->offset != b->offset ? a->offset < b->offset : a->nbytes < b->nbytes;
  });
  const GgufTensorInfo* furthest = nullptr;
  for (const GgufTensorInfo* t : by_offset) {
    if (furthest != nullptr && t->offset < furthest->offset + furthest->nbytes) {
      return Invalid(origin, absl::StrCat("tensors ", Q(furthest->name), " [", furthest->offset, ", ",
                                          furthest->offset + furthest->nbytes, ") and ", Q(t->name), " [",
                                          t->offset, ", ", t->offset + t->nbytes,
                                          ") overlap in the data section"));
    }
    if (furthest == nullptr || t->offset + t->nbytes > furthest->offset + furthest->nbytes) furthest = t;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<GgufHeader> ParseGguf(absl::string_view file, absl::string_view origin) {
  GgufHeader h;
  h.origin = std::string(origin);
  Reader r(file);
  uint64_t tensor_count = 0, kv_count = 0;
  if (absl::Status s = ReadPreamble(r, origin, &h, &tensor_count, &kv_count); !s.ok()) return s;
  if (absl::Status s = ReadMetadata(r, origin, kv_count, &h); !s.ok()) return s;
  if (absl::Status s = ReadTensorInfos(r, origin, tensor_count, &h); !s.ok()) return s;
  h.data_offset = AlignUp(r.pos(), h.alignment);  // pos <= file size, alignment <= 2^31: no overflow.
  if (h.data_offset > file.size()) {
    if (tensor_count > 0) {
      return Invalid(origin, absl::StrCat("truncated: the data section starts at byte ", h.data_offset,
                                          " (the tensor infos end at ", r.pos(), ", aligned to ", h.alignment,
                                          "), beyond the file of ", file.size(), " bytes"));
    }
    h.data_offset = file.size();  // No tensors: the padding may be left out.
  }
  h.data_size = file.size() - h.data_offset;
  if (absl::Status s = CheckPlacement(origin, h); !s.ok()) return s;
  return h;
}

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  absl::StatusOr<MappedFile> map = MappedFile::Open(path);
  if (!map.ok()) return map.status();
  // An empty file maps to an empty view, which the parser reports as truncated.
  absl::StatusOr<GgufHeader> header = ParseGguf(map->view(), path);
  if (!header.ok()) return header.status();
  return std::unique_ptr<GgufFile>(new GgufFile(*std::move(map), *std::move(header)));
}

}  // namespace kt
