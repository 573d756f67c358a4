// safetensors: a memory-mapped reader with full header validation, an in-memory header parser (the fuzz
// target), and an atomic writer.
//
// File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header size N, N bytes of
// JSON {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}},
// then the data section; offsets are relative to the data section's start (8 + N).
//
// Everything a later read relies on is checked once, when the file is opened, so that data() can hand out
// raw pointers: every tensor's byte range is inside the file, does not overlap another tensor, and has
// exactly product(shape) * sizeof(dtype) bytes. Every error names the file, the tensor where there is one,
// and what was expected against what was found.
#ifndef KT_IO_SAFETENSORS_H_
#define KT_IO_SAFETENSORS_H_

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
#include "kt/kernels/dtype.h"

namespace kt {

// The element types kt reads. Other safetensors dtypes (F64, BOOL, F8_E5M2, ...) are rejected by name.
enum class Dtype { kBf16, kF16, kF32, kF8E4M3, kI8, kU8, kI32, kI64, kF8E8M0 };

// The safetensors spelling: "BF16", "F16", "F32", "F8_E4M3", "I8", "U8", "I32", "I64", "F8_E8M0" (OCP MX
// scales: an unsigned biased exponent per byte).
const char* DtypeName(Dtype dtype);
size_t DtypeSize(Dtype dtype);
// Parses a safetensors spelling; the error lists the supported ones.
absl::StatusOr<Dtype> ParseDtype(absl::string_view name);

// "[128, 256]"; "[]" for a scalar.
std::string ShapeString(absl::Span<const int64_t> shape);

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kU8;
  std::vector<int64_t> shape;
  // Byte range [begin, end) relative to the start of the data section.
  uint64_t begin = 0;
  uint64_t end = 0;

  uint64_t num_bytes() const { return end - begin; }
  // Product of the shape (1 for a scalar); validated not to overflow when the header was parsed.
  uint64_t num_elements() const;
};

// A parsed and validated header.
struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;              // Sorted by name; names are unique.
  std::map<std::string, std::string> metadata;  // "__metadata__", empty when absent.
  uint64_t data_offset = 0;                     // Where the data section starts in the file: 8 + N.
  uint64_t data_size = 0;                       // Bytes from data_offset to the end of the file.
};

// Headers larger than this are rejected before anything is parsed (the reference implementation's limit).
inline constexpr uint64_t kMaxHeaderBytes = uint64_t{100} << 20;

// Parses and validates the header of the safetensors file whose complete contents are `file` (only the
// header is read; the data section is only measured). `origin` names the file in error messages. Never reads
// outside `file`, whatever it contains: this is the fuzzing entry point.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view file, absl::string_view origin);

// A read-only memory map of one safetensors file, validated at Open(). Unmapped on destruction. Thread-safe
// for concurrent readers (nothing mutates after Open()).
//
// The map is MAP_PRIVATE of a file that is assumed not to be truncated by someone else while it is open
// (a shrinking file turns reads into SIGBUS, as with every mmap-based reader).
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return map_.path(); }
  uint64_t file_size() const { return map_.size(); }
  // The whole mapped file (header included), file_size() bytes: what a file checksum covers.
  const uint8_t* file_data() const { return map_.data(); }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

  // The tensor called `name`, or nullptr. O(log n).
  const TensorInfo* Find(absl::string_view name) const;
  // All tensor names, sorted.
  std::vector<std::string> Names() const;

  // The tensor's bytes inside the map; `info` must come from this file. No alignment is promised beyond
  // what the file's offsets give (copy with memcpy, or check alignment, before typed access).
  const uint8_t* data(const TensorInfo& info) const { return map_.data() + header_.data_offset + info.begin; }
  absl::Span<const uint8_t> bytes(const TensorInfo& info) const { return {data(info), info.num_bytes()}; }

  // The tensor called `name` if it has exactly this dtype and shape; otherwise an error naming the file, the
  // tensor, and the expected and found dtype and shape.
  absl::StatusOr<const TensorInfo*> Expect(absl::string_view name, Dtype dtype,
                                           absl::Span<const int64_t> shape) const;

  // Copies the tensor into `out` (num_elements() elements) after Expect(name, dtype, shape).
  absl::Status Read(absl::string_view name, Dtype dtype, absl::Span<const int64_t> shape, void* out) const;
  absl::Status ReadBf16(absl::string_view name, absl::Span<const int64_t> shape, bf16_t* out) const {
    return Read(name, Dtype::kBf16, shape, out);
  }
  absl::Status ReadF32(absl::string_view name, absl::Span<const int64_t> shape, float* out) const {
    return Read(name, Dtype::kF32, shape, out);
  }
  // FP8 E4M3 (OCP "fn" variant, as DeepSeek ships) as raw bytes.
  absl::Status ReadF8E4M3(absl::string_view name, absl::Span<const int64_t> shape, uint8_t* out) const {
    return Read(name, Dtype::kF8E4M3, shape, out);
  }

 private:
  SafetensorsFile(MappedFile map, SafetensorsHeader header)
      : map_(std::move(map)), header_(std::move(header)) {}

  MappedFile map_;  // The whole file (never empty once open: size >= 8).
  SafetensorsHeader header_;
};

// One tensor for WriteSafetensors: `bytes` must hold exactly product(shape) * DtypeSize(dtype) bytes,
// in row-major order, little-endian.
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::kU8;
  std::vector<int64_t> shape;
  absl::Span<const uint8_t> bytes;
};

// The first 8 + N bytes of the file WriteSafetensors writes: the size, then the JSON header padded with
// spaces so that the data section starts 8-byte aligned. Tensors are laid out in name order. Rejects empty,
// duplicate or non-UTF-8 names, "__metadata__" as a tensor name, negative dimensions, and byte counts that
// do not match the shape.
absl::StatusOr<std::string> BuildSafetensorsHeader(const std::vector<TensorToWrite>& tensors,
                                                   const std::map<std::string, std::string>& metadata);

// Writes a safetensors file atomically: everything goes to `path + ".tmp.<pid>"`, which is flushed to disk
// and then renamed over `path`, so a crash leaves either the old file or the complete new one, never a
// partial file under the final name. On error the temporary file is removed.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace kt

#endif  // KT_IO_SAFETENSORS_H_
