// Runs the libFuzzer entry point (gguf_fuzz.cc) over a deterministic corpus of mutations of a valid file:
// byte changes in the header, 4- and 8-byte fields overwritten with boundary values (counts, lengths, type
// ids, dims, offsets), insertions and deletions, and truncations. Built with ASan and UBSan, so any
// out-of-bounds read, overflow or oversized allocation in the parser fails the test; the test itself checks
// that every input either parses to a header whose tensors lie inside the input, or fails with an error
// that names the file.
#include <cstdint>
#include <cstdio>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kt/io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace kt {
namespace {

std::string ValidFile() {
  static const std::vector<uint8_t> q8(34 * 2, 0x11), f32(4 * 3, 0x22), q4k(144, 0x33), e;
  GgufMetadata metadata = {
      {"general.architecture", GgufValue::String("qwen3moe")},
      {"general.alignment", GgufValue::Uint32(32)},
      {"a.bool", GgufValue::Bool(true)},
      {"a.f", GgufValue::Float32(1.5f)},
      {"a.i64", GgufValue::Int64(-5)},
      {"tok", GgufValue::Array(GgufValueType::kString, {GgufValue::String("a"), GgufValue::String("\xC3\xA9")})},
      {"nest", GgufValue::Array(GgufValueType::kArray,
                                {GgufValue::Array(GgufValueType::kUint16, {GgufValue::Uint16(9)}),
                                 GgufValue::Array(GgufValueType::kUint16, {})})},
  };
  std::vector<GgufTensorToWrite> tensors = {
      {"blk.0.ffn_up_exps.weight", GgmlType::kQ8_0, {32, 2}, q8},
      {"f", GgmlType::kF32, {3}, f32},
      {"k", GgmlType::kQ4_K, {256}, q4k},
      {"z", GgmlType::kBf16, {0, 2}, e},
  };
  absl::StatusOr<std::string> file = SerializeGguf(metadata, tensors);
  EXPECT_TRUE(file.ok()) << file.status();
  return *file;
}

// Runs one input through the fuzz entry and the parser; returns whether it parsed.
bool RunOne(const std::string& input) {
  // An exactly-sized heap copy, so that reading one byte past the end hits ASan's redzone.
  std::vector<uint8_t> buf(input.begin(), input.end());
  LLVMFuzzerTestOneInput(buf.empty() ? nullptr : buf.data(), buf.size());
  absl::StatusOr<GgufHeader> h =
      ParseGguf(absl::string_view(reinterpret_cast<const char*>(buf.data()), buf.size()), "<fuzz>");
  if (!h.ok()) {
    EXPECT_EQ(h.status().message().substr(0, 8), "<fuzz>: ") << h.status();
    return false;
  }
  EXPECT_EQ(h->data_offset + h->data_size, buf.size());
  EXPECT_EQ(h->data_offset % h->alignment, 0u);
  for (const GgufTensorInfo& t : h->tensors) {
    EXPECT_LE(t.dims.size(), 4u);
    EXPECT_EQ(t.offset % h->alignment, 0u);
    EXPECT_LE(t.offset + t.nbytes, h->data_size);
    EXPECT_EQ(*GgmlNbytes(t.type, t.dims), t.nbytes);
    EXPECT_EQ(h->Find(t.name), &t);
  }
  return true;
}

TEST(GgufFuzzTest, ValidInputParses) { EXPECT_TRUE(RunOne(ValidFile())); }

TEST(GgufFuzzTest, MutatedFilesNeverCrash) {
  const std::string valid = ValidFile();
  absl::StatusOr<GgufHeader> parsed_valid = ParseGguf(valid, "valid");
  ASSERT_TRUE(parsed_valid.ok()) << parsed_valid.status();
  const uint64_t n = parsed_valid->data_offset;  // Mutations go into the header, where the parser looks.
  const uint64_t boundary[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 17, 24, 31, 32, 33, 64, 255, 256, 0x7F,
                               0x80, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, uint64_t{1} << 32,
                               uint64_t{1} << 62, uint64_t{1} << 63, ~uint64_t{0}, ~uint64_t{0} - 7, valid.size(),
                               valid.size() - n, n};
  std::mt19937_64 rng(20240612);  // Fixed seed: the corpus is the same on every run.
  const auto pick = [&](uint64_t bound) { return static_cast<size_t>(rng() % bound); };
  int parsed = 0, total = 0;

  // Single-byte changes (1 to 4 per input) anywhere in the header.
  for (int i = 0; i < 2000; ++i) {
    std::string f = valid;
    const int changes = 1 + static_cast<int>(pick(4));
    for (int k = 0; k < changes; ++k) {
      f[pick(n)] = rng() % 2 ? static_cast<char>(rng()) : static_cast<char>(boundary[pick(std::size(boundary))]);
    }
    parsed += RunOne(f);
    ++total;
  }
  // 4- and 8-byte little-endian fields overwritten with boundary values, at any position.
  for (int i = 0; i < 2500; ++i) {
    std::string f = valid;
    const int size = rng() % 2 ? 4 : 8;
    const size_t at = pick(n - size + 1);
    uint64_t v = boundary[pick(std::size(boundary))];
    if (rng() % 4 == 0) v += pick(5) - 2;
    for (int b = 0; b < size; ++b) f[at + b] = static_cast<char>((v >> (8 * b)) & 0xFF);
    parsed += RunOne(f);
    ++total;
  }
  // Insertions and deletions in the header.
  for (int i = 0; i < 1000; ++i) {
    std::string f = valid;
    const size_t at = pick(n);
    if (rng() % 2) {
      f.insert(at, 1 + pick(8), static_cast<char>(boundary[pick(std::size(boundary))]));
    } else {
      f.erase(at, 1 + pick(8));
    }
    parsed += RunOne(f);
    ++total;
  }
  // Truncations anywhere.
  for (int i = 0; i < 500; ++i) {
    parsed += RunOne(valid.substr(0, pick(valid.size() + 1)));
    ++total;
  }
  // Most mutations must be rejected, and some (string bytes, float bits, padding, data) survive: a test whose
  // mutations all fail at the first check would exercise nothing.
  EXPECT_GT(total, 5000);
  EXPECT_GT(parsed, 0);
  EXPECT_LT(parsed, total / 2 + total / 4);
  std::printf("%d of %d mutated inputs parsed\n", parsed, total);
}

}  // namespace
}  // namespace kt
