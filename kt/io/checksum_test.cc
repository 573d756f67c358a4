#include "kt/io/checksum.h"

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

// Published check values (RFC 3720 appendix B.4 and the CRC catalogue's CRC-32/ISCSI "check"): independent
// of this implementation.
TEST(Crc32c, KnownVectors) {
  const std::string digits = "123456789";
  EXPECT_EQ(Crc32c(digits.data(), digits.size()), 0xE3069283u);
  EXPECT_EQ(Crc32cPortable(digits.data(), digits.size()), 0xE3069283u);
  const std::vector<uint8_t> zeros(32, 0), ones(32, 0xFF);
  std::vector<uint8_t> inc(32), dec(32);
  for (int i = 0; i < 32; ++i) {
    inc[i] = static_cast<uint8_t>(i);
    dec[i] = static_cast<uint8_t>(31 - i);
  }
  EXPECT_EQ(Crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(Crc32c(inc.data(), 32), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(dec.data(), 32), 0x113FDB5Cu);
  EXPECT_EQ(Crc32c(nullptr, 0), 0u);
}

// The hardware path equals the table on every length and alignment (the head/tail byte loops), and
// continuing a CRC equals one pass over the concatenation.
TEST(Crc32c, HardwareMatchesPortableAndChains) {
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(4096 + 16);
  for (uint8_t& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t off = 0; off < 9; ++off) {
    for (size_t n : {0, 1, 7, 8, 9, 15, 16, 63, 64, 65, 1000, 4096}) {
      ASSERT_EQ(Crc32c(buf.data() + off, n), Crc32cPortable(buf.data() + off, n)) << off << " " << n;
      for (size_t cut : {size_t{0}, n / 3, n}) {
        const uint32_t a = Crc32c(buf.data() + off, cut);
        EXPECT_EQ(Crc32c(buf.data() + off + cut, n - cut, a), Crc32c(buf.data() + off, n));
      }
    }
  }
  std::printf("crc32c hardware path: %s\n", Crc32cHardware() ? "sse4.2" : "no (table)");
}

TEST(Crc32c, FlippedBitChangesChunk) {
  std::vector<uint8_t> buf(1000, 3);
  const uint32_t before = Crc32c(buf.data(), buf.size());
  buf[517] ^= 0x10;
  EXPECT_NE(Crc32c(buf.data(), buf.size()), before);
}

TEST(Crc32c, Chunks) {
  EXPECT_EQ(NumChecksumChunks(0), 1u);
  EXPECT_EQ(NumChecksumChunks(1), 1u);
  EXPECT_EQ(NumChecksumChunks(kChecksumChunkBytes), 1u);
  EXPECT_EQ(NumChecksumChunks(kChecksumChunkBytes + 1), 2u);
  std::vector<uint8_t> small(100, 9);
  const std::vector<uint32_t> c = ChunkedCrc32c(small.data(), small.size());
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0], Crc32cPortable(small.data(), small.size()));
}

TEST(Crc32c, Hex) {
  EXPECT_EQ(Crc32cHex(0xE3069283u), "e3069283");
  EXPECT_EQ(Crc32cHex(0x1u), "00000001");
  EXPECT_EQ(*ParseCrc32cHex("e3069283"), 0xE3069283u);
  EXPECT_FALSE(ParseCrc32cHex("E3069283").ok());
  EXPECT_FALSE(ParseCrc32cHex("e306928").ok());
  EXPECT_FALSE(ParseCrc32cHex("e306928g").ok());
}

}  // namespace
}  // namespace kt
