// Pieces of the GGUF format shared by the reader (gguf.cc) and the writer (gguf_writer.cc). Internal to
// //kt/io:gguf.
#ifndef KT_IO_GGUF_INTERNAL_H_
#define KT_IO_GGUF_INTERNAL_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kt/io/gguf.h"

namespace kt {
namespace gguf_internal {

inline constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32.
inline constexpr uint32_t kNumValueTypes = 13;  // GgufValueType's values are 0 .. 12.
inline constexpr const char* kValueTypeNames[kNumValueTypes] = {
    "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "UINT64", "INT64",
    "FLOAT64"};

struct GgmlTypeEntry {
  GgmlType type;
  const char* name;
  uint64_t block;  // Elements per block.
  uint64_t size;   // Bytes per block.
};

// The entry of ggml type `id`, or nullptr for a type kt does not know.
const GgmlTypeEntry* FindType(uint32_t id);

// Bytes of one scalar of this type in the file; 0 for STRING and ARRAY.
uint64_t ScalarSize(GgufValueType type);

// A name or key quoted for an error message, cut at 200 bytes so that a garbage megabyte-long name does not
// make a megabyte-long message.
std::string Q(absl::string_view s);

// Prepends `prefix` to an error's message, keeping its code.
absl::Status Wrap(const absl::Status& s, absl::string_view prefix);

std::string DimsString(absl::Span<const uint64_t> dims);  // "[4096, 128]"
uint64_t AlignUp(uint64_t v, uint64_t alignment);

// The alignment a `general.alignment` value asks for; `prefix` starts the error.
absl::Status CheckAlignment(const GgufValue& v, absl::string_view prefix, uint64_t* out);

}  // namespace gguf_internal
}  // namespace kt

#endif  // KT_IO_GGUF_INTERNAL_H_
