// ggml's block formats, as GGUF files store them, and their dot products with ggml's activation partners
// (method LLAMAFILE). kt keeps a GGUF tensor's blocks as they are in the file (docs/FORMATS.md, "GGUF
// blocks"): a row of K values is K / block_elems blocks of block_bytes, so decode reads the format's own
// bytes.
//
// The layouts (ggml's documentation; the `gguf` PyPI package's quants.py reproduces them). fp16 is IEEE
// binary16, all little-endian; j is a value's index in its block:
//   Q4_0 (32 values, 18 bytes): fp16 d, 16 bytes qs; q_j = qs[j % 16] nibble (low for j < 16), w = d (q - 8).
//   Q4_1 (32, 20): fp16 d, fp16 m, qs as Q4_0; w = d q + m.
//   Q5_0 (32, 22): fp16 d, uint32 qh, qs; q = nibble | (qh bit j) << 4, w = d (q - 16).
//   Q5_1 (32, 24): fp16 d, fp16 m, qh, qs; w = d q + m.
//   Q8_0 (32, 34): fp16 d, 32 int8 q; w = d q.
//   Q2_K (256, 84): 16 scale bytes (low nibble scale, high nibble min, per 16 values), 64 bytes qs, fp16 d,
//        fp16 dmin; q = (qs[32 (j / 128) + j % 32] >> 2 ((j % 128) / 32)) & 3, w = d sc q - dmin m.
//   Q3_K (256, 110): 32 bytes hmask, 64 bytes qs, 12 bytes of 16 6-bit scales (offset 32), fp16 d;
//        q = (2 low bits as Q2_K) - 4 unless hmask[j % 32] bit j / 32 is set, w = d (sc - 32) q.
//   Q4_K (256, 144): fp16 d, fp16 dmin, 12 bytes of 8 6-bit scales and 8 6-bit mins (per 32 values),
//        128 bytes qs (per 64 values 32 bytes: low nibbles the first 32, high the next); w = d sc q - dmin m.
//   Q5_K (256, 176): Q4_K with 32 bytes qh after the scales (bit j / 32 of qh[j % 32] is bit 4 of q).
//   Q6_K (256, 210): 128 bytes ql, 64 bytes qh, 16 int8 scales (per 16 values), fp16 d; per 128 values 64
//        bytes of ql (low nibbles, then high) and 32 of qh (2 bits each); w = d sc (q - 32).
//   F32, F16, BF16: one value per "block".
// Activations are quantized as ggml does for the dot: Q8_0 (int8 per 32 values, d = max|x| / 127) for the
// 32-value types, Q8_K (int8 per 256 values) for the K-quants; the float types take the bf16 rows as they
// are. kt keeps the activation scale in fp32 (ggml's Q8_0 rounds it to fp16: a relative 2^-11 more error).
#ifndef KT_KERNELS_GGUF_QUANTS_H_
#define KT_KERNELS_GGUF_QUANTS_H_

#include <cstddef>
#include <cstdint>

#include "kt/kernels/dtype.h"

namespace kt {

// The ggml types LLAMAFILE computes with; the values are ggml's type ids (as in a GGUF tensor info).
enum class GgufType : int {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kBf16 = 30,
};

inline constexpr GgufType kGgufTypes[] = {GgufType::kQ4_0, GgufType::kQ4_1, GgufType::kQ5_0, GgufType::kQ5_1,
                                          GgufType::kQ8_0, GgufType::kQ2_K, GgufType::kQ3_K, GgufType::kQ4_K,
                                          GgufType::kQ5_K, GgufType::kQ6_K, GgufType::kBf16, GgufType::kF16,
                                          GgufType::kF32};
// The largest K the GEMM takes (its Highway kernels keep the activations' 16-value sums of up to 4 rows on
// the stack as int16: 32 KiB). Experts have K <= 18432 (Mixtral 8x22B's intermediate size is 16384).
inline constexpr size_t kGgufMaxK = 65536;

// "Q4_0, Q4_1, ..., F32": for errors.
inline constexpr const char kGgufSupportedTypes[] =
    "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16, F16, F32";

// Whether `id` (a ggml type id) is one of kGgufTypes.
bool IsGgufTypeId(int id);
// "Q4_K", ...; "unknown" for another value.
const char* GgufTypeName(GgufType type);
size_t GgufBlockElems(GgufType type);  // 1, 32 or 256
size_t GgufBlockBytes(GgufType type);
inline size_t GgufRowBytes(GgufType type, size_t k) { return k / GgufBlockElems(type) * GgufBlockBytes(type); }
// F32, F16, BF16: products read bf16 rows. The others read rows quantized to GgufActivationBlock.
bool GgufIsFloat(GgufType type);
// The activation block of a quantized type's dot partner: 32 (Q8_0) or 256 (Q8_K); 0 for the float types.
size_t GgufActivationBlock(GgufType type);

// Q4_K / Q5_K: the 6-bit scale and min of sub-block i (0..7) from the 12 packed bytes s: bytes 0-3 hold the
// low 6 bits of scales 0-3 (their top 2 bits: bits 4-5 of scales 4-7), bytes 4-7 the same for the mins,
// bytes 8-11 the low nibbles of scales 4-7 (low) and of mins 4-7 (high).
inline void GgufScaleMinK4(const uint8_t* s, int i, int* sc, int* m) {
  if (i < 4) {
    *sc = s[i] & 63;
    *m = s[i + 4] & 63;
  } else {
    *sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 6) << 4);
    *m = (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
  }
}

// Q3_K: signed scale i (0..15; 6 bits, offset 32) from the 12 packed bytes s: low nibble from byte i % 8 (high
// nibble for i >= 8), top 2 bits from byte 8 + i % 4, bits 2 (i / 4).
inline int GgufScaleQ3K(const uint8_t* s, int i) {
  const int lo = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
  const int hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (lo | (hi << 4)) - 32;
}

float F16ToF32(uint16_t h);  // exact (subnormals, infinities and NaN included)
uint16_t F32ToF16(float f);  // round to nearest even (test data)

// The weights of one row of k values (k a multiple of the block), out[k] in fp32: w as the formulas above
// give it, each product of fp16/fp32 factors rounded once to fp32 (d * sc first, as ggml does).
void DequantizeGgufRow(GgufType type, const uint8_t* row, size_t k, float* out);

// One row quantized to int8 in blocks of `block` (32 or 256) values: scales[k / block] = max|x| / 127,
// q = round(x / scale) (half away from zero), as QuantizeRowInt8Grouped does (bit for bit).
void QuantizeGgufActivationRow(const bf16_t* x, size_t k, size_t block, int8_t* q, float* scales);

// The scalar reference products: the dot of one weight row of k values with one activation row, quantized
// (qx, sx as QuantizeGgufActivationRow makes them for GgufActivationBlock(type)) or bf16 (float types).
// Integer sums per block (exact), scaled and added in fp32.
float GgufDotQ8(GgufType type, const uint8_t* row, size_t k, const int8_t* qx, const float* sx);
float GgufDotBf16(GgufType type, const uint8_t* row, size_t k, const bf16_t* x);

}  // namespace kt

#endif  // KT_KERNELS_GGUF_QUANTS_H_
