#include "kt/io/checksum.h"

#include <cpuid.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kt {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // 0x1EDC6F41 bit-reversed (CRC32C is a reflected CRC).

const std::array<uint32_t, 256>& Table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int b = 0; b < 8; ++b) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

bool HasSse42() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  return (c & bit_SSE4_2) != 0;
}

// The SSE4.2 `crc32` instruction computes exactly this CRC (same polynomial, same reflection), on the
// running value without the final inversion, so pre/post inversion is done here as in the table path.
__attribute__((target("sse4.2"))) uint32_t Crc32cSse42(const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = ~crc;
  while (n > 0 && (reinterpret_cast<uintptr_t>(p) & 7) != 0) {
    c = __builtin_ia32_crc32qi(static_cast<uint32_t>(c), *p++);
    --n;
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = __builtin_ia32_crc32di(c, v);
    p += 8;
    n -= 8;
  }
  while (n > 0) {
    c = __builtin_ia32_crc32qi(static_cast<uint32_t>(c), *p++);
    --n;
  }
  return ~static_cast<uint32_t>(c);
}

}  // namespace

uint32_t Crc32cPortable(const void* data, size_t n, uint32_t crc) {
  const std::array<uint32_t, 256>& t = Table();
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return ~c;
}

bool Crc32cHardware() {
  static const bool hw = HasSse42();
  return hw;
}

uint32_t Crc32c(const void* data, size_t n, uint32_t crc) {
  if (Crc32cHardware()) return Crc32cSse42(static_cast<const uint8_t*>(data), n, crc);
  return Crc32cPortable(data, n, crc);
}

uint32_t ChunkCrc32c(const uint8_t* data, uint64_t size, size_t i) {
  const uint64_t begin = static_cast<uint64_t>(i) * kChecksumChunkBytes;
  if (begin >= size) return 0;
  const uint64_t end = std::min(size, begin + kChecksumChunkBytes);
  return Crc32c(data + begin, end - begin);
}

std::vector<uint32_t> ChunkedCrc32c(const uint8_t* data, uint64_t size) {
  std::vector<uint32_t> out(NumChecksumChunks(size));
  for (size_t i = 0; i < out.size(); ++i) out[i] = ChunkCrc32c(data, size, i);
  return out;
}

std::string Crc32cHex(uint32_t crc) { return absl::StrFormat("%08x", crc); }

absl::StatusOr<uint32_t> ParseCrc32cHex(absl::string_view hex) {
  if (hex.size() != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("a CRC32C must be 8 lowercase hex digits, found \"", hex, "\""));
  }
  uint32_t v = 0;
  for (char ch : hex) {
    int d;
    if (ch >= '0' && ch <= '9') {
      d = ch - '0';
    } else if (ch >= 'a' && ch <= 'f') {
      d = ch - 'a' + 10;
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("a CRC32C must be 8 lowercase hex digits, found \"", hex, "\""));
    }
    v = (v << 4) | static_cast<uint32_t>(d);
  }
  return v;
}

}  // namespace kt
