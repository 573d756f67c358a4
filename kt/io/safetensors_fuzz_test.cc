// Runs the libFuzzer entry point (safetensors_fuzz.cc) over a deterministic corpus of mutations of a valid
// file: byte changes, insertions and deletions inside the header (with the size field kept consistent so the
// JSON parser, not the size check, sees them), truncations, and rewritten size fields. Built with ASan and
// UBSan, so any out-of-bounds read or undefined behaviour in the parser fails the test; the test itself
// checks that every input either parses to a header whose ranges lie inside the input or fails with an
// error that names the file.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kt/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace kt {
namespace {

std::string ValidFile() {
  static const std::vector<uint8_t> a(2 * 3 * 2, 0x11), b(4 * 4, 0x22), c(5, 0x33), d(3 * 8, 0x44);
  std::vector<TensorToWrite> tensors = {
      {"model.layers.0.mlp.experts.0.gate_proj.weight", Dtype::kBf16, {2, 3}, a},
      {"model.layers.0.mlp.experts.0.gate_proj.weight_scale_inv", Dtype::kF32, {4}, b},
      {"caf\xC3\xA9\t\"quoted\"", Dtype::kF8E4M3, {5}, c},
      {"z", Dtype::kI64, {3, 1}, d},
      {"empty", Dtype::kU8, {0}, {}},
  };
  absl::StatusOr<std::string> header = BuildSafetensorsHeader(tensors, {{"format", "pt"}, {"k\\", "v\n"}});
  EXPECT_TRUE(header.ok()) << header.status();
  std::string file = *header;
  for (const auto* t : {&a, &b, &c, &d}) file.append(t->begin(), t->end());  // Name order: c, empty, a, b, z.
  return file;
}

uint64_t HeaderSize(const std::string& f) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(f[i]);
  return n;
}

void SetHeaderSize(std::string* f, uint64_t n) {
  for (int i = 0; i < 8; ++i) (*f)[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
}

// Runs one input through the fuzz entry and the parser; returns whether it parsed.
bool RunOne(const std::string& input) {
  // An exactly-sized heap copy, so that reading one byte past the end hits ASan's redzone.
  std::vector<uint8_t> buf(input.begin(), input.end());
  LLVMFuzzerTestOneInput(buf.empty() ? nullptr : buf.data(), buf.size());
  absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader(
      absl::string_view(reinterpret_cast<const char*>(buf.data()), buf.size()), "<fuzz>");
  if (!h.ok()) {
    EXPECT_EQ(h.status().message().substr(0, 8), "<fuzz>: ") << h.status();
    return false;
  }
  EXPECT_EQ(h->data_offset + h->data_size, buf.size());
  for (const TensorInfo& t : h->tensors) {
    EXPECT_LE(t.begin, t.end);
    EXPECT_LE(t.end, h->data_size);
    EXPECT_EQ(t.num_elements() * DtypeSize(t.dtype), t.num_bytes());
  }
  return true;
}

TEST(SafetensorsFuzzTest, ValidInputParses) { EXPECT_TRUE(RunOne(ValidFile())); }

TEST(SafetensorsFuzzTest, MutatedHeadersNeverCrash) {
  const std::string valid = ValidFile();
  const uint64_t n = HeaderSize(valid);
  const std::string interesting = "{}[]\":,\\u0123456789-eE. \x00\x7F\xFF\xC3";
  std::mt19937_64 rng(20240611);  // Fixed seed: the corpus is the same on every run.
  const auto pick = [&](uint64_t bound) { return static_cast<size_t>(rng() % bound); };
  int parsed = 0, total = 0;

  // Byte changes inside the header (size field included): 1 to 4 bytes each.
  for (int i = 0; i < 2000; ++i) {
    std::string f = valid;
    const int changes = 1 + static_cast<int>(pick(4));
    for (int k = 0; k < changes; ++k) {
      f[pick(8 + n)] = rng() % 2 ? static_cast<char>(rng()) : interesting[pick(interesting.size())];
    }
    parsed += RunOne(f);
    ++total;
  }
  // Insertions and deletions inside the JSON, with the size field adjusted to match.
  for (int i = 0; i < 1500; ++i) {
    std::string f = valid;
    const size_t at = 8 + pick(n);
    uint64_t size = n;
    if (rng() % 2) {
      f.insert(at, 1, rng() % 2 ? static_cast<char>(rng()) : interesting[pick(interesting.size())]);
      ++size;
    } else {
      f.erase(at, 1 + pick(3));
      size -= f.size() < valid.size() ? valid.size() - f.size() : 0;
    }
    SetHeaderSize(&f, size);
    parsed += RunOne(f);
    ++total;
  }
  // Truncations anywhere, and digits replaced by huge numbers (overflow paths).
  for (int i = 0; i < 1000; ++i) {
    parsed += RunOne(valid.substr(0, pick(valid.size() + 1)));
    ++total;
  }
  for (int i = 0; i < 500; ++i) {
    std::string f = valid;
    size_t at = 8 + pick(n);
    while (at < 8 + n && (f[at] < '0' || f[at] > '9')) ++at;
    if (at >= 8 + n) continue;
    const std::string big = rng() % 2 ? "18446744073709551616" : absl::StrCat(rng());
    f.replace(at, 1, big);
    SetHeaderSize(&f, n + big.size() - 1);
    parsed += RunOne(f);
    ++total;
  }
  // Size fields pointing anywhere near and far.
  for (int i = 0; i < 500; ++i) {
    std::string f = valid;
    SetHeaderSize(&f, rng() % 4 == 0 ? rng() : pick(valid.size() + 16));
    parsed += RunOne(f);
    ++total;
  }
  // Most mutations must be rejected, and some (whitespace, metadata or name bytes) survive: a test whose
  // mutations all fail at the first check would exercise nothing.
  EXPECT_GT(total, 5000);
  EXPECT_GT(parsed, 0);
  EXPECT_LT(parsed, total / 2);
  std::printf("%d of %d mutated inputs parsed\n", parsed, total);
}

}  // namespace
}  // namespace kt
