// Scalar quantization and dequantization: plain loops, written for obviousness rather than speed (weights
// are quantized once at load; the integer kernels bring their own vectorized activation quantizer and are
// tested against QuantizeActivationInt8).
#include "kt/kernels/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "kt/kernels/fp8.h"
#include "kt/kernels/mx.h"

namespace kt {
namespace {

constexpr float kInt8Max = 127.0f;
constexpr float kInt4SymMax = 7.0f;
constexpr float kInt4AsymMax = 15.0f;
constexpr size_t kFp8Block = 128;  // kt-fp8-block128-v1's block edge

// round-half-away-from-zero, then clamp. fmax/fmin (not std::max/min) so that a NaN lands on `lo`: the
// cast of a NaN or out-of-range float to int would be undefined behaviour.
int RoundClamp(float v, float lo, float hi) {
  return static_cast<int>(std::fmin(std::fmax(std::round(v), lo), hi));
}

float QMax(QuantFormat f) { return f == QuantFormat::kInt8PerChannel ? kInt8Max : kInt4SymMax; }

// Symmetric: scale = max|x| / qmax, q = clamp(round(x / scale), -qmax, qmax). An all-zero input gets scale 0
// and q 0 instead of a division by zero. Returns the scale.
float QuantizeSymmetric(const bf16_t* x, size_t len, float qmax, int8_t* q) {
  float amax = 0.0f;
  for (size_t i = 0; i < len; ++i) amax = std::fmax(amax, std::fabs(Bf16ToF32(x[i])));
  const float scale = amax / qmax;
  // scale > 0 is false for 0 and NaN. A nonzero bf16 is at least 2^-133, so amax / 127 (about 2^-140) is a
  // nonzero fp32 subnormal: only the all-zero input takes this branch.
  if (!(scale > 0.0f)) {
    std::fill(q, q + len, int8_t{0});
    return 0.0f;
  }
  for (size_t i = 0; i < len; ++i) {
    q[i] = static_cast<int8_t>(RoundClamp(Bf16ToF32(x[i]) / scale, -qmax, qmax));
  }
  return scale;
}

// Asymmetric with zero point: q = clamp(round(x / scale) + z, 0, 15), dequantized as (q - z) * scale.
// Returns the scale and writes the zero point.
float QuantizeAsymmetric(const bf16_t* x, size_t len, int8_t* q, uint8_t* zero) {
  float lo = Bf16ToF32(x[0]), hi = lo;
  for (size_t i = 1; i < len; ++i) {
    lo = std::fmin(lo, Bf16ToF32(x[i]));
    hi = std::fmax(hi, Bf16ToF32(x[i]));
  }
  if (lo == hi) {
    // Constant group c: scale |c| and q - z = sign(c) reproduce c exactly ((+-1) * |c| is exact), where
    // the general rule would give 15 * fl(|c| / 15), which can be off by an ulp. c = 0 (or -0) gives
    // scale 0, z 0, q 0.
    const float c = lo;
    *zero = c < 0.0f ? 1 : 0;
    std::fill(q, q + len, static_cast<int8_t>(c > 0.0f ? 1 : 0));
    return std::fabs(c);
  }
  // The range always includes 0 (as GPTQ's quantizer does): then -lo / scale lies in [0, 15], so z needs
  // no clamping beyond fp rounding, 0 is exactly representable, and a group of only positive (or only
  // negative) values cannot saturate, which it would with the raw [min, max] and z clamped to [0, 15].
  lo = std::fmin(lo, 0.0f);
  hi = std::fmax(hi, 0.0f);
  // In double so that hi - lo cannot overflow for any finite bf16; rounded once more to fp32.
  const float scale = static_cast<float>((static_cast<double>(hi) - lo) / kInt4AsymMax);
  const int z = RoundClamp(-lo / scale, 0.0f, kInt4AsymMax);
  *zero = static_cast<uint8_t>(z);
  const float fz = static_cast<float>(z);
  for (size_t i = 0; i < len; ++i) {
    // clamp(round(x / scale) + z, 0, 15), written as a clamp of round(x / scale) to [-z, 15 - z].
    q[i] = static_cast<int8_t>(RoundClamp(Bf16ToF32(x[i]) / scale, -fz, kInt4AsymMax - fz) + z);
  }
  return scale;
}

// Element i of a row goes to the low nibble of byte i / 2 when i is even, the high nibble when odd.
void PackNibbles(const int8_t* q, size_t len, uint8_t* out) {
  for (size_t i = 0; i < len; ++i) {
    const uint8_t nib = static_cast<uint8_t>(q[i]) & 0x0fu;
    out[i / 2] = static_cast<uint8_t>(out[i / 2] | (nib << (4 * (i & 1))));
  }
}

// kt-fp8-block128-v1 of w (finite, checked): per 128 x 128 block scale = amax / 448, q = E4M3(w / scale),
// the block's scale written into each of its rows.
void QuantizeFp8Block(const bf16_t* w, size_t ldw, QuantizedMatrix* qm) {
  const size_t n = qm->n, k = qm->k, blocks = (k + kFp8Block - 1) / kFp8Block;
  qm->data.assign(n * k, 0);
  qm->scales.assign(n * blocks, 0.0f);
  for (size_t r0 = 0; r0 < n; r0 += kFp8Block) {
    const size_t r1 = std::min(n, r0 + kFp8Block);
    for (size_t b = 0; b < blocks; ++b) {
      const size_t c0 = b * kFp8Block, c1 = std::min(k, c0 + kFp8Block);
      float amax = 0.0f;
      for (size_t r = r0; r < r1; ++r) {
        for (size_t c = c0; c < c1; ++c) amax = std::fmax(amax, std::fabs(Bf16ToF32(w[r * ldw + c])));
      }
      const float scale = amax / kFp8E4M3Max;
      for (size_t r = r0; r < r1; ++r) {
        qm->scales[r * blocks + b] = scale;
        if (!(scale > 0.0f)) continue;  // all-zero block: codes stay 0
        for (size_t c = c0; c < c1; ++c) {
          qm->data[r * k + c] = F32ToFp8E4M3(Bf16ToF32(w[r * ldw + c]) / scale);
        }
      }
    }
  }
}

// The element code of the MX format and its value.
uint8_t MxEncode(QuantFormat f, float v) { return f == QuantFormat::kMxfp4 ? F32ToE2M1(v) : F32ToFp8E4M3(v); }
float MxDecode(QuantFormat f, const uint8_t* row, size_t c) {
  return f == QuantFormat::kMxfp4 ? E2M1ToF32(static_cast<uint8_t>(row[c / 2] >> (4 * (c & 1))))
                                  : Fp8E4M3ToF32(row[c]);
}

// kt-mxfp4-v1 / kt-mxfp8-v1 of w (finite, checked): per 32 k of a row the OCP shared exponent (mx.h).
void QuantizeMx(const bf16_t* w, size_t ldw, QuantizedMatrix* qm) {
  const QuantFormat f = qm->spec.format;
  const size_t n = qm->n, k = qm->k, blocks = k / kMxBlock, row_bytes = QuantizedRowBytes(qm->spec, k);
  const int emax = f == QuantFormat::kMxfp4 ? kE2M1Emax : kE4M3Emax;
  qm->data.assign(n * row_bytes, 0);
  qm->scales.assign(n * blocks, 0.0f);
  for (size_t r = 0; r < n; ++r) {
    uint8_t* out = qm->data.data() + r * row_bytes;
    for (size_t b = 0; b < blocks; ++b) {
      float amax = 0.0f;
      for (size_t c = b * kMxBlock; c < (b + 1) * kMxBlock; ++c) {
        amax = std::fmax(amax, std::fabs(Bf16ToF32(w[r * ldw + c])));
      }
      const float scale = E8M0ToF32(MxSharedExponent(amax, emax));
      qm->scales[r * blocks + b] = scale;
      for (size_t c = b * kMxBlock; c < (b + 1) * kMxBlock; ++c) {
        const uint8_t q = MxEncode(f, Bf16ToF32(w[r * ldw + c]) / scale);  // exact: a power of two
        if (f == QuantFormat::kMxfp4) {
          out[c / 2] = static_cast<uint8_t>(out[c / 2] | (q << (4 * (c & 1))));
        } else {
          out[c] = q;
        }
      }
    }
  }
}

bool GroupSizeAccepted(int g) {
  return std::find(std::begin(kQuantGroupSizes), std::end(kQuantGroupSizes), g) != std::end(kQuantGroupSizes);
}

}  // namespace

const char* QuantFormatName(QuantFormat format) {
  switch (format) {
    case QuantFormat::kInt8PerChannel:
      return "int8_channel";
    case QuantFormat::kInt4PerChannel:
      return "int4_channel";
    case QuantFormat::kInt4GroupSym:
      return "int4_group_sym";
    case QuantFormat::kInt4GroupAsym:
      return "int4_group_asym";
    case QuantFormat::kInt4PerChannelAsym:
      return "int4_channel_asym";
    case QuantFormat::kFp8Block128:
      return "fp8_block128";
    case QuantFormat::kMxfp4:
      return "mxfp4";
    case QuantFormat::kMxfp8:
      return "mxfp8";
  }
  return "unknown";
}

absl::Status ValidateQuantSpec(const QuantSpec& spec, size_t k) {
  switch (spec.format) {
    case QuantFormat::kInt8PerChannel:
    case QuantFormat::kInt4PerChannel:
    case QuantFormat::kInt4PerChannelAsym:
    case QuantFormat::kFp8Block128:
      if (spec.group_size != 0) {
        return absl::InvalidArgumentError(absl::StrCat("group_size must be 0 for ",
                                                       QuantFormatName(spec.format),
                                                       " (its scales are fixed per row or 128-block), got ",
                                                       spec.group_size));
      }
      return absl::OkStatus();
    case QuantFormat::kInt4GroupSym:
    case QuantFormat::kInt4GroupAsym:
      if (!GroupSizeAccepted(spec.group_size)) {
        return absl::InvalidArgumentError(absl::StrCat("group_size for ", QuantFormatName(spec.format),
                                                       " must be 32, 64 or 128, got ", spec.group_size));
      }
      if (k % static_cast<size_t>(spec.group_size) != 0) {
        return absl::InvalidArgumentError(absl::StrCat("K must be a multiple of group_size for ",
                                                       QuantFormatName(spec.format), ": K = ", k,
                                                       ", group_size = ", spec.group_size));
      }
      return absl::OkStatus();
    case QuantFormat::kMxfp4:
    case QuantFormat::kMxfp8:
      if (spec.group_size != 0) {
        return absl::InvalidArgumentError(absl::StrCat("group_size must be 0 for ", QuantFormatName(spec.format),
                                                       " (its block of 32 is fixed by the format), got ",
                                                       spec.group_size));
      }
      if (k % kMxBlock != 0) {
        return absl::InvalidArgumentError(absl::StrCat("K must be a multiple of 32 for ",
                                                       QuantFormatName(spec.format), ", got K = ", k));
      }
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown quantization format ", static_cast<int>(spec.format), ", expected 0..7"));
}

std::string QuantLayoutTag(const QuantSpec& spec) {
  // K = 0 is a multiple of every G, so this validates only the format and group size.
  if (!ValidateQuantSpec(spec, 0).ok()) return "";
  switch (spec.format) {
    case QuantFormat::kInt8PerChannel:
      return "kt-int8-channel-v1";
    case QuantFormat::kInt4PerChannel:
      return "kt-int4-channel-v1";
    case QuantFormat::kInt4GroupSym:
      return absl::StrCat("kt-int4-group", spec.group_size, "-sym-v1");
    case QuantFormat::kInt4GroupAsym:
      return absl::StrCat("kt-int4-group", spec.group_size, "-asym-v1");
    case QuantFormat::kInt4PerChannelAsym:
      return "kt-int4-channel-asym-v1";
    case QuantFormat::kFp8Block128:
      return "kt-fp8-block128-v1";
    case QuantFormat::kMxfp4:
      return "kt-mxfp4-v1";
    case QuantFormat::kMxfp8:
      return "kt-mxfp8-v1";
  }
  return "";
}

size_t QuantizedRowBytes(const QuantSpec& spec, size_t k) {
  if (!ValidateQuantSpec(spec, k).ok()) return 0;
  const bool byte_per_element = spec.format == QuantFormat::kInt8PerChannel ||
                                spec.format == QuantFormat::kFp8Block128 || spec.format == QuantFormat::kMxfp8;
  return byte_per_element ? k : (k + 1) / 2;
}

size_t ScalesPerRow(const QuantSpec& spec, size_t k) {
  if (!ValidateQuantSpec(spec, k).ok()) return 0;
  if (spec.format == QuantFormat::kFp8Block128) return (k + kFp8Block - 1) / kFp8Block;
  if (IsMxFormat(spec.format)) return k / kMxBlock;
  return IsGroupFormat(spec.format) ? k / static_cast<size_t>(spec.group_size) : 1;
}

size_t QuantizedBytes(const QuantSpec& spec, size_t n, size_t k) {
  const size_t scales = n * ScalesPerRow(spec, k);
  const size_t zeros = IsAsymFormat(spec.format) ? scales : 0;
  return n * QuantizedRowBytes(spec, k) + scales * sizeof(float) + zeros;
}

absl::StatusOr<QuantizedMatrix> Quantize(const QuantSpec& spec, const bf16_t* w, size_t ldw, size_t n,
                                         size_t k) {
  if (absl::Status s = ValidateQuantSpec(spec, k); !s.ok()) return s;
  if (ldw < k) return absl::InvalidArgumentError(absl::StrCat("ldw must be >= K = ", k, ", got ", ldw));
  if (w == nullptr && n > 0 && k > 0) {
    return absl::InvalidArgumentError(absl::StrCat("w is null for a ", n, " x ", k, " matrix"));
  }
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < k; ++c) {
      const float v = Bf16ToF32(w[r * ldw + c]);
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            absl::StrCat("w[", r, "][", c, "] = ", v, " is not finite; weights must be finite to quantize"));
      }
    }
  }

  QuantizedMatrix qm;
  qm.spec = spec;
  qm.n = n;
  qm.k = k;
  if (spec.format == QuantFormat::kFp8Block128) {
    QuantizeFp8Block(w, ldw, &qm);
    return qm;
  }
  if (IsMxFormat(spec.format)) {
    QuantizeMx(w, ldw, &qm);
    return qm;
  }
  const size_t row_bytes = QuantizedRowBytes(spec, k);
  const size_t groups = ScalesPerRow(spec, k);
  const size_t g = IsGroupFormat(spec.format) ? static_cast<size_t>(spec.group_size) : k;
  const bool asym = IsAsymFormat(spec.format);
  qm.data.assign(n * row_bytes, 0);
  qm.scales.assign(n * groups, 0.0f);
  if (asym) qm.zeros.assign(n * groups, 0);

  std::vector<int8_t> q(k);
  for (size_t r = 0; r < n; ++r) {
    const bf16_t* row = w + r * ldw;
    for (size_t j = 0; j < groups; ++j) {
      const size_t idx = r * groups + j;
      qm.scales[idx] = asym ? QuantizeAsymmetric(row + j * g, g, q.data() + j * g, &qm.zeros[idx])
                            : QuantizeSymmetric(row + j * g, g, QMax(spec.format), q.data() + j * g);
    }
    uint8_t* out = qm.data.data() + r * row_bytes;
    if (spec.format == QuantFormat::kInt8PerChannel) {
      if (k > 0) std::memcpy(out, q.data(), k);  // int8 two's complement is the byte itself.
    } else {
      PackNibbles(q.data(), k, out);
    }
  }
  return qm;
}

void Dequantize(const QuantizedMatrix& qm, float* w, size_t ldw) {
  const QuantSpec& spec = qm.spec;
  if (spec.format == QuantFormat::kFp8Block128) {
    const size_t blocks = ScalesPerRow(spec, qm.k);
    for (size_t r = 0; r < qm.n; ++r) {
      for (size_t c = 0; c < qm.k; ++c) {
        w[r * ldw + c] = Fp8E4M3ToF32(qm.data[r * qm.k + c]) * qm.scales[r * blocks + c / kFp8Block];
      }
    }
    return;
  }
  if (IsMxFormat(spec.format)) {
    const size_t row_bytes = QuantizedRowBytes(spec, qm.k), blocks = qm.k / kMxBlock;
    for (size_t r = 0; r < qm.n; ++r) {
      for (size_t c = 0; c < qm.k; ++c) {
        w[r * ldw + c] = MxDecode(spec.format, qm.data.data() + r * row_bytes, c) *
                         qm.scales[r * blocks + c / kMxBlock];
      }
    }
    return;
  }
  const size_t row_bytes = QuantizedRowBytes(spec, qm.k);
  const size_t groups = ScalesPerRow(spec, qm.k);
  const size_t g = IsGroupFormat(spec.format) ? static_cast<size_t>(spec.group_size) : qm.k;
  for (size_t r = 0; r < qm.n; ++r) {
    const uint8_t* in = qm.data.data() + r * row_bytes;
    for (size_t c = 0; c < qm.k; ++c) {
      const size_t idx = r * groups + c / g;
      int qv;
      if (spec.format == QuantFormat::kInt8PerChannel) {
        qv = static_cast<int8_t>(in[c]);
      } else {
        const int nib = (in[c / 2] >> (4 * (c & 1))) & 0x0f;
        qv = IsAsymFormat(spec.format) ? nib - qm.zeros[idx] : (nib >= 8 ? nib - 16 : nib);
      }
      w[r * ldw + c] = static_cast<float>(qv) * qm.scales[idx];
    }
  }
}

void ExpandFp8BlockScales(const float* block_scales, size_t n, size_t k, float* row_scales) {
  const size_t blocks = (k + kFp8Block - 1) / kFp8Block;
  for (size_t r = 0; r < n; ++r) {
    std::memcpy(row_scales + r * blocks, block_scales + (r / kFp8Block) * blocks, blocks * sizeof(float));
  }
}

// An activation row or group holding a NaN or an infinity: q all 0 and scale NaN, so every product with it
// is NaN, as the unquantized product would be (a finite scale would turn the token's output into finite,
// wrong numbers).
bool QuantizeNonFiniteActivation(const bf16_t* x, size_t len, int8_t* q, float* scale) {
  for (size_t i = 0; i < len; ++i) {
    if (!std::isfinite(Bf16ToF32(x[i]))) {
      std::fill(q, q + len, int8_t{0});
      *scale = std::numeric_limits<float>::quiet_NaN();
      return true;
    }
  }
  return false;
}

void QuantizeActivationInt8(const bf16_t* x, size_t k, int8_t* q, float* scale) {
  if (QuantizeNonFiniteActivation(x, k, q, scale)) return;
  *scale = QuantizeSymmetric(x, k, kInt8Max, q);
}

absl::Status QuantizeActivationInt8Grouped(const bf16_t* x, size_t k, int group_size, int8_t* q,
                                           float* scales) {
  if (!GroupSizeAccepted(group_size)) {
    return absl::InvalidArgumentError(absl::StrCat("group_size must be 32, 64 or 128, got ", group_size));
  }
  const size_t g = static_cast<size_t>(group_size);
  if (k % g != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("K must be a multiple of group_size: K = ", k, ", group_size = ", group_size));
  }
  for (size_t j = 0; j < k / g; ++j) {
    if (QuantizeNonFiniteActivation(x + j * g, g, q + j * g, scales + j)) continue;
    scales[j] = QuantizeSymmetric(x + j * g, g, kInt8Max, q + j * g);
  }
  return absl::OkStatus();
}

}  // namespace kt
