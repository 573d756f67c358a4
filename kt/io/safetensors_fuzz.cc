// libFuzzer entry point for the safetensors header parser (and through it the JSON parser). Build it with
//   clang++ -std=c++17 -fsanitize=fuzzer,address,undefined -I. kt/io/safetensors_fuzz.cc kt/io/safetensors.cc
//     kt/io/json.cc -labsl_strings ... (the full command is in kt/io/README.md)
// Bazel does not build it with libFuzzer (the toolchain is Debian's g++); safetensors_fuzz_test runs this
// same entry point over a deterministic corpus of mutated headers under ASan/UBSan instead.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/io/json.h"
#include "kt/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view file(reinterpret_cast<const char*>(data), size);
  // The JSON parser alone, on an exactly-sized copy of the header bytes: inside a file, reading past the
  // header's end lands in the data section and no sanitizer would notice.
  if (size >= 8) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
    if (n <= size - 8) {
      std::unique_ptr<char[]> copy(new char[n]);
      for (uint64_t i = 0; i < n; ++i) copy[i] = static_cast<char>(data[8 + i]);
      (void)kt::json::Parse(absl::string_view(copy.get(), n));
    }
  }
  absl::StatusOr<kt::SafetensorsHeader> header = kt::ParseSafetensorsHeader(file, "<fuzz>");
  if (!header.ok()) return 0;
  // Touch the first and last byte of every tensor the parser accepted: a range that validation let through
  // but that lies outside `data` becomes an out-of-bounds read the sanitizer reports.
  volatile uint8_t sink = 0;
  for (const kt::TensorInfo& t : header->tensors) {
    if (t.num_bytes() == 0) continue;
    sink = sink ^ data[header->data_offset + t.begin] ^ data[header->data_offset + t.end - 1];
  }
  (void)sink;
  return 0;
}
