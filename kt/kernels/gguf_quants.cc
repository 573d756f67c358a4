// ggml block formats: sizes, fp16, the dequantizer and the scalar dot products (written from the layouts in
// gguf_quants.h; no ggml code).
#include "kt/kernels/gguf_quants.h"

#include <cmath>
#include <cstring>

#include "kt/kernels/act_quant.h"

namespace kt {
namespace {

constexpr size_t kQK = 256;  // values per K-quant block

inline uint16_t U16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
inline float Half(const uint8_t* p) { return F16ToF32(U16(p)); }

// The integer quant of value j of a block (before scale and offset) and, for the K-quants, its sub-block.
inline int QuantOf(GgufType t, const uint8_t* b, size_t j) {
  switch (t) {
    case GgufType::kQ4_0:
      return ((b[2 + j % 16] >> (4 * (j / 16))) & 0x0F) - 8;
    case GgufType::kQ4_1:
      return (b[4 + j % 16] >> (4 * (j / 16))) & 0x0F;
    case GgufType::kQ5_0: {
      uint32_t qh;
      std::memcpy(&qh, b + 2, 4);
      return (((b[6 + j % 16] >> (4 * (j / 16))) & 0x0F) | (((qh >> j) & 1) << 4)) - 16;
    }
    case GgufType::kQ5_1: {
      uint32_t qh;
      std::memcpy(&qh, b + 4, 4);
      return ((b[8 + j % 16] >> (4 * (j / 16))) & 0x0F) | (((qh >> j) & 1) << 4);
    }
    case GgufType::kQ8_0:
      return static_cast<int8_t>(b[2 + j]);
    case GgufType::kQ2_K:
      return (b[16 + 32 * (j / 128) + j % 32] >> (2 * ((j % 128) / 32))) & 3;
    case GgufType::kQ3_K: {
      const int lo = (b[32 + 32 * (j / 128) + j % 32] >> (2 * ((j % 128) / 32))) & 3;
      const int h = (b[j % 32] >> (j / 32)) & 1;
      return lo - (h ? 0 : 4);
    }
    case GgufType::kQ4_K:
      return (b[16 + 32 * (j / 64) + j % 32] >> (4 * ((j % 64) / 32))) & 0x0F;
    case GgufType::kQ5_K: {
      const int lo = (b[48 + 32 * (j / 64) + j % 32] >> (4 * ((j % 64) / 32))) & 0x0F;
      const int h = (b[16 + j % 32] >> (j / 32)) & 1;
      return lo | (h << 4);
    }
    case GgufType::kQ6_K: {
      const int lo = (b[64 * (j / 128) + j % 64] >> (4 * ((j % 128) / 64))) & 0x0F;
      const int hi = (b[128 + 32 * (j / 128) + j % 32] >> (2 * ((j % 128) / 32))) & 3;
      return (lo | (hi << 4)) - 32;
    }
    default:
      return 0;
  }
}

// A K-quant block's sub-blocks: (multiplier of the quant sum, multiplier of the activation sum) per
// sub-block of `sub` values, as fp32 factors of the block's fp16 d / dmin.
struct SubScales {
  size_t sub = 0;
  size_t count = 0;
  float scale[16];
  float min[16];  // subtracted: w = scale * q - min
};

SubScales KScales(GgufType t, const uint8_t* b) {
  SubScales s;
  switch (t) {
    case GgufType::kQ2_K: {
      const float d = Half(b + 80), dmin = Half(b + 82);
      s.sub = 16;
      s.count = 16;
      for (int i = 0; i < 16; ++i) {
        s.scale[i] = d * static_cast<float>(b[i] & 0x0F);
        s.min[i] = dmin * static_cast<float>(b[i] >> 4);
      }
      break;
    }
    case GgufType::kQ3_K: {
      const float d = Half(b + 108);
      s.sub = 16;
      s.count = 16;
      for (int i = 0; i < 16; ++i) {
        s.scale[i] = d * static_cast<float>(GgufScaleQ3K(b + 96, i));
        s.min[i] = 0.0f;
      }
      break;
    }
    case GgufType::kQ4_K:
    case GgufType::kQ5_K: {
      const float d = Half(b), dmin = Half(b + 2);
      s.sub = 32;
      s.count = 8;
      for (int i = 0; i < 8; ++i) {
        int sc, m;
        GgufScaleMinK4(b + 4, i, &sc, &m);
        s.scale[i] = d * static_cast<float>(sc);
        s.min[i] = dmin * static_cast<float>(m);
      }
      break;
    }
    case GgufType::kQ6_K: {
      const float d = Half(b + 208);
      s.sub = 16;
      s.count = 16;
      for (int i = 0; i < 16; ++i) {
        s.scale[i] = d * static_cast<float>(static_cast<int8_t>(b[192 + i]));
        s.min[i] = 0.0f;
      }
      break;
    }
    default:
      break;
  }
  return s;
}

bool IsKQuant(GgufType t) {
  return t == GgufType::kQ2_K || t == GgufType::kQ3_K || t == GgufType::kQ4_K || t == GgufType::kQ5_K ||
         t == GgufType::kQ6_K;
}

}  // namespace

bool IsGgufTypeId(int id) {
  for (GgufType t : kGgufTypes) {
    if (static_cast<int>(t) == id) return true;
  }
  return false;
}

const char* GgufTypeName(GgufType type) {
  switch (type) {
    case GgufType::kF32: return "F32";
    case GgufType::kF16: return "F16";
    case GgufType::kQ4_0: return "Q4_0";
    case GgufType::kQ4_1: return "Q4_1";
    case GgufType::kQ5_0: return "Q5_0";
    case GgufType::kQ5_1: return "Q5_1";
    case GgufType::kQ8_0: return "Q8_0";
    case GgufType::kQ2_K: return "Q2_K";
    case GgufType::kQ3_K: return "Q3_K";
    case GgufType::kQ4_K: return "Q4_K";
    case GgufType::kQ5_K: return "Q5_K";
    case GgufType::kQ6_K: return "Q6_K";
    case GgufType::kBf16: return "BF16";
  }
  return "unknown";
}

size_t GgufBlockElems(GgufType type) {
  if (GgufIsFloat(type)) return 1;
  return IsKQuant(type) ? kQK : 32;
}

size_t GgufBlockBytes(GgufType type) {
  switch (type) {
    case GgufType::kF32: return 4;
    case GgufType::kF16:
    case GgufType::kBf16: return 2;
    case GgufType::kQ4_0: return 18;
    case GgufType::kQ4_1: return 20;
    case GgufType::kQ5_0: return 22;
    case GgufType::kQ5_1: return 24;
    case GgufType::kQ8_0: return 34;
    case GgufType::kQ2_K: return 84;
    case GgufType::kQ3_K: return 110;
    case GgufType::kQ4_K: return 144;
    case GgufType::kQ5_K: return 176;
    case GgufType::kQ6_K: return 210;
  }
  return 0;
}

bool GgufIsFloat(GgufType type) {
  return type == GgufType::kF32 || type == GgufType::kF16 || type == GgufType::kBf16;
}

size_t GgufActivationBlock(GgufType type) {
  if (GgufIsFloat(type)) return 0;
  return IsKQuant(type) ? kQK : 32;
}

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ffu;
  float f;
  if (exp == 0) {
    f = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal: mant * 2^-24, exact
    return sign ? -f : f;
  }
  uint32_t bits;
  if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | (static_cast<uint32_t>(exp - 15 + 127) << 23) | (mant << 13);
  }
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t F32ToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7e00u;
  if (a >= 65520.0f) return sign | 0x7c00u;  // rounds to infinity
  if (a < 6.103515625e-05f) {                 // subnormal range: multiples of 2^-24
    const float q = std::nearbyint(a * 16777216.0f);  // round half to even (default mode)
    return sign | static_cast<uint16_t>(q);
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  float mant = std::nearbyint((m * 2.0f - 1.0f) * 1024.0f);
  int exp = e - 1 + 15;
  if (mant >= 1024.0f) {
    mant = 0.0f;
    ++exp;
  }
  if (exp >= 31) return sign | 0x7c00u;
  return sign | static_cast<uint16_t>(exp << 10) | static_cast<uint16_t>(mant);
}

void DequantizeGgufRow(GgufType type, const uint8_t* row, size_t k, float* out) {
  const size_t be = GgufBlockElems(type), bb = GgufBlockBytes(type);
  for (size_t blk = 0; blk * be < k; ++blk) {
    const uint8_t* b = row + blk * bb;
    float* o = out + blk * be;
    switch (type) {
      case GgufType::kF32:
        std::memcpy(o, b, 4);
        break;
      case GgufType::kF16:
        o[0] = F16ToF32(U16(b));
        break;
      case GgufType::kBf16:
        o[0] = Bf16ToF32(bf16_t{U16(b)});
        break;
      case GgufType::kQ4_0:
      case GgufType::kQ5_0:
      case GgufType::kQ8_0: {
        const float d = Half(b);
        for (size_t j = 0; j < 32; ++j) o[j] = d * static_cast<float>(QuantOf(type, b, j));
        break;
      }
      case GgufType::kQ4_1:
      case GgufType::kQ5_1: {
        const float d = Half(b), m = Half(b + 2);
        for (size_t j = 0; j < 32; ++j) o[j] = d * static_cast<float>(QuantOf(type, b, j)) + m;
        break;
      }
      default: {  // K-quants
        const SubScales s = KScales(type, b);
        for (size_t j = 0; j < kQK; ++j) {
          o[j] = s.scale[j / s.sub] * static_cast<float>(QuantOf(type, b, j)) - s.min[j / s.sub];
        }
        break;
      }
    }
  }
}

void QuantizeGgufActivationRow(const bf16_t* x, size_t k, size_t block, int8_t* q, float* scales) {
  QuantizeRowInt8Grouped(Isa::kScalar, x, k, block, q, scales);
}

float GgufDotQ8(GgufType type, const uint8_t* row, size_t k, const int8_t* qx, const float* sx) {
  const size_t be = GgufBlockElems(type), bb = GgufBlockBytes(type);
  float acc = 0.0f;
  for (size_t blk = 0; blk * be < k; ++blk) {
    const uint8_t* b = row + blk * bb;
    const int8_t* x = qx + blk * be;
    const float dx = sx[blk];
    if (be == 32) {
      int32_t sum = 0, xsum = 0;
      for (size_t j = 0; j < 32; ++j) {
        sum += QuantOf(type, b, j) * x[j];
        xsum += x[j];
      }
      const float d = Half(b);
      acc += d * dx * static_cast<float>(sum);
      if (type == GgufType::kQ4_1 || type == GgufType::kQ5_1) acc += Half(b + 2) * dx * static_cast<float>(xsum);
      continue;
    }
    const SubScales s = KScales(type, b);
    float part = 0.0f;
    for (size_t i = 0; i < s.count; ++i) {
      int32_t sum = 0, xsum = 0;
      for (size_t j = i * s.sub; j < (i + 1) * s.sub; ++j) {
        sum += QuantOf(type, b, j) * x[j];
        xsum += x[j];
      }
      part += s.scale[i] * static_cast<float>(sum) - s.min[i] * static_cast<float>(xsum);
    }
    acc += dx * part;
  }
  return acc;
}

float GgufDotBf16(GgufType type, const uint8_t* row, size_t k, const bf16_t* x) {
  float acc = 0.0f;
  for (size_t j = 0; j < k; ++j) {
    float w;
    switch (type) {
      case GgufType::kF32:
        std::memcpy(&w, row + 4 * j, 4);
        break;
      case GgufType::kF16:
        w = F16ToF32(U16(row + 2 * j));
        break;
      default:
        w = Bf16ToF32(bf16_t{U16(row + 2 * j)});
        break;
    }
    acc += w * Bf16ToF32(x[j]);
  }
  return acc;
}

}  // namespace kt
