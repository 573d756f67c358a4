// libFuzzer entry point for the GGUF parser. Build it with
//   clang++ -std=c++17 -fsanitize=fuzzer,address,undefined -I. kt/io/gguf_fuzz.cc kt/io/gguf.cc kt/io/json.cc
//     -labsl_strings ... (the library list is the one in kt/io/README.md for safetensors_fuzz)
// Bazel does not build it with libFuzzer (the toolchain is Debian's g++); gguf_fuzz_test runs this same entry
// point over a deterministic corpus of mutated files under ASan/UBSan instead.
#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::string_view file(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<kt::GgufHeader> header = kt::ParseGguf(file, "<fuzz>");
  if (!header.ok()) return 0;
  // Touch the first and last byte of every tensor the parser accepted: a range that validation let through
  // but that lies outside `data` becomes an out-of-bounds read the sanitizer reports.
  volatile uint8_t sink = 0;
  for (const kt::GgufTensorInfo& t : header->tensors) {
    if (t.nbytes == 0) continue;
    sink = sink ^ data[header->data_offset + t.offset] ^ data[header->data_offset + t.offset + t.nbytes - 1];
    (void)header->Find(t.name);
  }
  // The typed getters on every key (each either succeeds or returns an error; none may misbehave).
  for (const auto& kv : header->metadata) {
    (void)header->GetUint(kv.first);
    (void)header->GetInt(kv.first);
    (void)header->GetFloat(kv.first);
    (void)header->GetString(kv.first);
    (void)header->GetStringArray(kv.first);
    (void)kv.second.DebugString();
  }
  (void)sink;
  return 0;
}
