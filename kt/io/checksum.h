// CRC32C (Castagnoli, the iSCSI/ext4 polynomial 0x1EDC6F41, reflected 0x82F63B78): the checksum of kt's
// converted weight files.
//
// Why CRC32C: x86-64 has it in hardware since SSE4.2 (`crc32` on 8 bytes: 3-cycle latency, 1/cycle
// throughput), so a single stream runs at ~8 B / 3 cycles ~ 8 GB/s at 3 GHz; three interleaved streams per
// chunk would triple that but one stream per thread over independent chunks is already far above the
// 1 GB/s a load must reach, and verifying is parallel across chunks (ChunkedCrc32c). It detects every
// burst error up to 32 bits and any truncation/extension of a fixed-size chunk, which is what a torn copy or
// a bad disk block produces; it is not a cryptographic hash (it does not stop deliberate tampering).
//
// A CPU without SSE4.2 uses a byte-wise table (the same numbers, ~0.4 GB/s), chosen at run time.
#ifndef KT_IO_CHECKSUM_H_
#define KT_IO_CHECKSUM_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kt {

// CRC32C of `n` bytes continuing from `crc` (0 to start): Crc32c(b, Crc32c(a)) == Crc32c(a + b).
// Check value: Crc32c("123456789") == 0xE3069283.
uint32_t Crc32c(const void* data, size_t n, uint32_t crc = 0);
// The portable table implementation (what the hardware path is tested against).
uint32_t Crc32cPortable(const void* data, size_t n, uint32_t crc = 0);
// Whether Crc32c uses the SSE4.2 instruction on this CPU.
bool Crc32cHardware();

// Files are checksummed in chunks of this many bytes (the last one shorter), each chunk's CRC32C recorded,
// so that verification runs in parallel over chunks and a mismatch names the byte range. 64 MiB: a 4.8 GB
// layer has 72 chunks (a manifest line each), and one chunk is ~8 ms of one core.
inline constexpr uint64_t kChecksumChunkBytes = uint64_t{64} << 20;
// The manifest's name for this scheme.
inline constexpr char kChecksumAlgorithm[] = "crc32c-chunk64MiB";

// Number of chunks of a file of `size` bytes (an empty file has one empty chunk, CRC 0).
inline size_t NumChecksumChunks(uint64_t size) {
  return size == 0 ? 1 : static_cast<size_t>((size + kChecksumChunkBytes - 1) / kChecksumChunkBytes);
}
// CRC32C of chunk `i` of `data[0, size)`.
uint32_t ChunkCrc32c(const uint8_t* data, uint64_t size, size_t i);
// All chunks' CRCs, sequentially.
std::vector<uint32_t> ChunkedCrc32c(const uint8_t* data, uint64_t size);

// "e3069283" (8 lowercase hex digits), and its inverse (InvalidArgument for anything else).
std::string Crc32cHex(uint32_t crc);
absl::StatusOr<uint32_t> ParseCrc32cHex(absl::string_view hex);

}  // namespace kt

#endif  // KT_IO_CHECKSUM_H_
