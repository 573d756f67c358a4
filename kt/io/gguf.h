// GGUF: a memory-mapped reader with full validation, an in-memory parser (the fuzz target), and an atomic
// writer (version 3).
//
// File layout (ggml's docs/gguf.md), all little-endian:
//   uint32 magic "GGUF" (0x46554747), uint32 version (2 or 3), uint64 tensor_count, uint64 metadata_kv_count;
//   metadata_kv_count x {string key, uint32 value_type, value};
//   tensor_count x {string name, uint32 n_dims (<= 4), uint64 dims[n_dims] (ne[0] first: the contiguous
//                   one), uint32 ggml_type, uint64 offset (relative to the data section)};
//   padding to a multiple of the alignment (`general.alignment`, UINT32, a power of two, default 32);
//   the data section.
// A string is a uint64 byte count and the bytes (no NUL). An array is a uint32 element type, a uint64 count
// and the elements (arrays of arrays allowed).
//
// As for safetensors, everything a later read relies on is checked once, when the file is parsed: every
// tensor has a supported ggml type, at most 4 dimensions whose byte size fits in 64 bits, ne[0] a multiple of
// the type's block size, an offset that is a multiple of the alignment, and bytes that lie inside the file
// and overlap no other tensor; names and keys are unique. Every error names the file, the tensor or metadata
// key where there is one, and what was expected against what was found.
#ifndef KT_IO_GGUF_H_
#define KT_IO_GGUF_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kt/io/file_util.h"

namespace kt {

// Metadata value types, with their ids in the file.
enum class GgufValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// "UINT8", ..., "FLOAT64"; "type N" for an id outside the enum.
std::string GgufValueTypeName(GgufValueType type);

// One metadata value: a scalar, a string or an array. Floats keep their exact bits (NaN payloads included),
// so that a read-then-write round trip is byte-identical.
class GgufValue {
 public:
  GgufValue() = default;  // UINT8 0.

  static GgufValue Uint8(uint8_t v) { return Scalar(GgufValueType::kUint8, v); }
  static GgufValue Int8(int8_t v) { return Scalar(GgufValueType::kInt8, static_cast<uint64_t>(int64_t{v})); }
  static GgufValue Uint16(uint16_t v) { return Scalar(GgufValueType::kUint16, v); }
  static GgufValue Int16(int16_t v) { return Scalar(GgufValueType::kInt16, static_cast<uint64_t>(int64_t{v})); }
  static GgufValue Uint32(uint32_t v) { return Scalar(GgufValueType::kUint32, v); }
  static GgufValue Int32(int32_t v) { return Scalar(GgufValueType::kInt32, static_cast<uint64_t>(int64_t{v})); }
  static GgufValue Uint64(uint64_t v) { return Scalar(GgufValueType::kUint64, v); }
  static GgufValue Int64(int64_t v) { return Scalar(GgufValueType::kInt64, static_cast<uint64_t>(v)); }
  static GgufValue Float32(float v);
  static GgufValue Float64(double v);
  static GgufValue Bool(bool v) { return Scalar(GgufValueType::kBool, v ? 1 : 0); }
  static GgufValue String(std::string v);
  // Every element must have type `element_type` (the writer checks; an empty array still has one).
  static GgufValue Array(GgufValueType element_type, std::vector<GgufValue> elements);
  // The raw bits of a FLOAT32 / FLOAT64 (for exact NaNs).
  static GgufValue Float32Bits(uint32_t bits) { return Scalar(GgufValueType::kFloat32, bits); }
  static GgufValue Float64Bits(uint64_t bits) { return Scalar(GgufValueType::kFloat64, bits); }

  GgufValueType type() const { return type_; }
  bool is_array() const { return type_ == GgufValueType::kArray; }
  bool is_string() const { return type_ == GgufValueType::kString; }
  bool is_unsigned() const;  // UINT8, UINT16, UINT32, UINT64.
  bool is_signed() const;    // INT8, INT16, INT32, INT64.
  bool is_float() const;     // FLOAT32, FLOAT64.

  // Accessors without conversion checks: call only for the matching type (otherwise they return 0 / "" /
  // empty). Typed lookups with errors are GgufHeader::GetUint() and friends.
  uint64_t uint_value() const { return is_unsigned() || type_ == GgufValueType::kBool ? bits_ : 0; }
  int64_t int_value() const { return is_signed() ? static_cast<int64_t>(bits_) : 0; }
  double float_value() const;
  bool bool_value() const { return type_ == GgufValueType::kBool && bits_ != 0; }
  const std::string& string_value() const { return str_; }
  GgufValueType element_type() const { return element_type_; }  // Arrays only.
  const std::vector<GgufValue>& elements() const { return elements_; }
  // The stored bits: an unsigned value zero-extended, a signed one sign-extended, a float's IEEE bits.
  uint64_t bits() const { return bits_; }

  // Same type, element type, bits, string and elements.
  bool operator==(const GgufValue& other) const;
  bool operator!=(const GgufValue& other) const { return !(*this == other); }

  // "UINT32 7", "STRING \"llama\"", "ARRAY<STRING>[3]" (arrays are summarized, not listed).
  std::string DebugString() const;

 private:
  static GgufValue Scalar(GgufValueType type, uint64_t bits) {
    GgufValue v;
    v.type_ = type;
    v.bits_ = bits;
    return v;
  }

  GgufValueType type_ = GgufValueType::kUint8;
  GgufValueType element_type_ = GgufValueType::kUint8;
  uint64_t bits_ = 0;
  std::string str_;
  std::vector<GgufValue> elements_;
};

// The ggml tensor types kt reads (ids from ggml.h's enum ggml_type). Other ids are rejected by number. The
// IQ*, TQ* and MXFP4 types are known by size only (a file holding them opens; method LLAMAFILE computes with
// the types of kt/kernels/gguf_quants.h and names any other).
enum class GgmlType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  // 4 and 5 were Q4_2 and Q4_3, removed from ggml.
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kI8 = 24,
  kI16 = 25,
  kI32 = 26,
  kI64 = 27,
  kF64 = 28,
  kIQ1_M = 29,
  kBf16 = 30,
  // 31..33 were Q4_0_4_4, Q4_0_4_8, Q4_0_8_8 (removed from ggml).
  kTQ1_0 = 34,
  kTQ2_0 = 35,
  kMXFP4 = 39,
};

// "F32", "Q4_K", ...: ggml's spelling.
const char* GgmlTypeName(GgmlType type);
// Elements per block (1 for the plain types, 32 for Q4_0..Q8_1, 256 for the K-quants) and bytes per block.
uint64_t GgmlBlockSize(GgmlType type);
uint64_t GgmlTypeSize(GgmlType type);
// The type with this id; the error lists the supported ones.
absl::StatusOr<GgmlType> ParseGgmlType(uint32_t id);
// Bytes of a tensor of this type and these dims (ne[0] first): ne[0] must be a multiple of the block size
// and the result must fit in 64 bits (each dimension also at most INT64_MAX, as ggml's int64 ne requires).
absl::StatusOr<uint64_t> GgmlNbytes(GgmlType type, absl::Span<const uint64_t> dims);

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<uint64_t> dims;  // As in the file: ne[0] (contiguous) first. Up to 4; empty for a scalar.
  uint64_t offset = 0;         // Relative to the data section; a multiple of the alignment.
  uint64_t nbytes = 0;         // GgmlNbytes(type, dims).

  uint64_t num_elements() const;  // Product of dims (1 for a scalar); validated not to overflow.
};

inline constexpr uint32_t kGgufDefaultAlignment = 32;
inline constexpr int kGgufMaxDims = 4;
// Arrays of arrays nest at most this deep (it bounds the parser's recursion).
inline constexpr int kGgufMaxArrayDepth = 16;

// A parsed and validated GGUF header (everything before the data section).
struct GgufHeader {
  std::string origin;  // The file, for error messages.
  uint32_t version = 3;
  uint64_t alignment = kGgufDefaultAlignment;
  std::map<std::string, GgufValue> metadata;  // Keys are unique.
  std::vector<GgufTensorInfo> tensors;        // In file order; names are unique.
  uint64_t data_offset = 0;                   // Where the data section starts in the file.
  uint64_t data_size = 0;                     // Bytes from data_offset to the end of the file.

  // The tensor called `name`, or nullptr. O(log n).
  const GgufTensorInfo* Find(absl::string_view name) const;
  // The value for `key`, or nullptr.
  const GgufValue* FindMetadata(absl::string_view key) const;

  // Typed lookups. A missing key is NotFound; a value of another type is InvalidArgument naming the file,
  // the key, the expected and the found type.
  // Any integer type; a negative signed value is an error.
  absl::StatusOr<uint64_t> GetUint(absl::string_view key) const;
  // Any integer type; a UINT64 above INT64_MAX is an error.
  absl::StatusOr<int64_t> GetInt(absl::string_view key) const;
  // FLOAT32 or FLOAT64.
  absl::StatusOr<double> GetFloat(absl::string_view key) const;
  absl::StatusOr<bool> GetBool(absl::string_view key) const;
  absl::StatusOr<std::string> GetString(absl::string_view key) const;
  // An array of any element type; the pointer is into `metadata`.
  absl::StatusOr<const GgufValue*> GetArray(absl::string_view key) const;
  // An array of STRING.
  absl::StatusOr<std::vector<std::string>> GetStringArray(absl::string_view key) const;

  std::vector<size_t> by_name;  // Indices into `tensors`, sorted by name (for Find).
};

// Parses and validates the GGUF file whose complete contents are `file`. `origin` names the file in error
// messages. Never reads outside `file`, whatever it contains, and allocates at most a bounded multiple of
// its size: this is the fuzzing entry point.
absl::StatusOr<GgufHeader> ParseGguf(absl::string_view file, absl::string_view origin);

// A read-only memory map of one GGUF file, validated at Open(). Unmapped on destruction. Thread-safe for
// concurrent readers. Same caveat as SafetensorsFile: the file must not shrink while it is open.
class GgufFile {
 public:
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);

  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return header_.origin; }
  uint64_t file_size() const { return map_.size(); }
  const GgufHeader& header() const { return header_; }
  uint32_t version() const { return header_.version; }
  uint64_t alignment() const { return header_.alignment; }
  const std::map<std::string, GgufValue>& metadata() const { return header_.metadata; }
  const std::vector<GgufTensorInfo>& tensors() const { return header_.tensors; }

  const GgufTensorInfo* Find(absl::string_view name) const { return header_.Find(name); }
  const GgufValue* FindMetadata(absl::string_view key) const { return header_.FindMetadata(key); }
  absl::StatusOr<uint64_t> GetUint(absl::string_view key) const { return header_.GetUint(key); }
  absl::StatusOr<int64_t> GetInt(absl::string_view key) const { return header_.GetInt(key); }
  absl::StatusOr<double> GetFloat(absl::string_view key) const { return header_.GetFloat(key); }
  absl::StatusOr<bool> GetBool(absl::string_view key) const { return header_.GetBool(key); }
  absl::StatusOr<std::string> GetString(absl::string_view key) const { return header_.GetString(key); }
  absl::StatusOr<const GgufValue*> GetArray(absl::string_view key) const { return header_.GetArray(key); }
  absl::StatusOr<std::vector<std::string>> GetStringArray(absl::string_view key) const {
    return header_.GetStringArray(key);
  }

  // The tensor's bytes inside the map; `info` must come from this file. Aligned to min(alignment, page).
  const uint8_t* data(const GgufTensorInfo& info) const {
    return map_.data() + header_.data_offset + info.offset;
  }
  absl::Span<const uint8_t> bytes(const GgufTensorInfo& info) const { return {data(info), info.nbytes}; }

 private:
  GgufFile(MappedFile map, GgufHeader header) : map_(std::move(map)), header_(std::move(header)) {}

  MappedFile map_;
  GgufHeader header_;
};

// One tensor for WriteGguf: `bytes` must hold exactly GgmlNbytes(type, dims) bytes (raw ggml blocks).
struct GgufTensorToWrite {
  std::string name;
  GgmlType type = GgmlType::kF32;
  std::vector<uint64_t> dims;  // ne[0] first, at most 4.
  absl::Span<const uint8_t> bytes;
};

using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;

// The complete file WriteGguf writes, in memory (for tests and small files): version 3, the metadata in the
// order given, the tensor infos in the order given, then each tensor's bytes padded with zeros to the
// alignment (`general.alignment` when the metadata has it, which must then be a UINT32 power of two; else
// 32), the layout ggml's own loader requires. Rejects duplicate keys, duplicate tensor names, more than 4
// dims, byte counts that do not match, arrays whose elements do not all have the declared element type,
// and arrays nested deeper than kGgufMaxArrayDepth.
absl::StatusOr<std::string> SerializeGguf(const GgufMetadata& metadata,
                                          const std::vector<GgufTensorToWrite>& tensors);

// Writes the same bytes as SerializeGguf atomically (streaming the tensors, not copying them): everything
// goes to `path + ".tmp.<pid>"`, which is fsynced and renamed over `path`; on error the temporary is
// removed, so there is never a partial file under the final name.
absl::Status WriteGguf(const std::string& path, const GgufMetadata& metadata,
                       const std::vector<GgufTensorToWrite>& tensors);

}  // namespace kt

#endif  // KT_IO_GGUF_H_
