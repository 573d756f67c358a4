// Vectorized weight quantization (Highway three-file shape: quant_fast.h API, this file per target plus
// dispatch) and table-driven unpacking. Every number is computed by the same fp32 operations as
// quant.cc, in the same order where order matters:
// - max |x|, min and max are exact whatever the order (no rounding), so vector reductions may reorder.
// - scale = amax / qmax (one fp32 division); asym: (double(hi) - lo) / 15 rounded once to fp32, and
//   z = round_half_away(-lo / scale) clamped to [0, 15], both scalar per group as in quant.cc.
// - q = round_half_away(x / scale) clamped: x / scale is a true fp32 division (Div), never a multiply by
//   1 / scale, which differs in the last bit and flips roundings; clamping to integer bounds before
//   rounding equals clamping after.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kt/kernels/quant_fast.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kt/kernels/bf16-inl.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/hwy_dispatch.h"
#include "kt/kernels/quant.h"
#include "kt/kernels/quant_fast.h"

HWY_BEFORE_NAMESPACE();
namespace kt {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// std::round(v) for v already clamped to integer bounds (so |v| < 2^23): v - trunc(v) is exact in fp32,
// and comparing its magnitude with 0.5 decides a tie away from zero, as std::round does.
template <class DF, class V>
HWY_INLINE V RoundHalfAway(DF df, V v) {
  const auto t = hn::Trunc(v);
  const auto away = hn::Ge(hn::Abs(hn::Sub(v, t)), hn::Set(df, 0.5f));
  return hn::IfThenElse(away, hn::Add(t, hn::CopySignToAbs(hn::Set(df, 1.0f), v)), t);
}

// quant.cc's RoundClamp, for the scalar tails (same expression, so the same result).
HWY_INLINE int RoundClampScalar(float v, float lo, float hi) {
  return static_cast<int>(std::fmin(std::fmax(std::round(v), lo), hi));
}

// q[i] = clamp(round(x[i] / scale), lo, hi) + add for i < len.
HWY_INLINE void QuantizeSpan(const bf16_t* HWY_RESTRICT x, size_t len, float scale, float lo, float hi, int add,
                             int8_t* HWY_RESTRICT q) {
  const hn::ScalableTag<float> df;
  const hn::RebindToSigned<decltype(df)> di32;
  const hn::Rebind<int8_t, decltype(di32)> di8;
  const size_t lanes = hn::Lanes(df);
  const auto vscale = hn::Set(df, scale);
  const auto vlo = hn::Set(df, lo), vhi = hn::Set(df, hi);
  const auto vadd = hn::Set(di32, add);
  size_t i = 0;
  for (; i + lanes <= len; i += lanes) {
    const auto v = hn::Min(hn::Max(hn::Div(LoadBf16(df, x + i), vscale), vlo), vhi);
    const auto qi = hn::Add(hn::ConvertTo(di32, RoundHalfAway(df, v)), vadd);
    hn::StoreU(hn::DemoteTo(di8, qi), di8, q + i);
  }
  for (; i < len; ++i) q[i] = static_cast<int8_t>(RoundClampScalar(Bf16ToF32(x[i]) / scale, lo, hi) + add);
}

// quant.cc's QuantizeSymmetric: scale = max|x| / qmax; an all-zero span gets scale 0 and q 0.
HWY_INLINE float Symmetric(const bf16_t* HWY_RESTRICT x, size_t len, float qmax, int8_t* HWY_RESTRICT q) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  auto vmax = hn::Zero(df);
  size_t i = 0;
  for (; i + lanes <= len; i += lanes) vmax = hn::Max(vmax, hn::Abs(LoadBf16(df, x + i)));
  float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
  for (; i < len; ++i) amax = std::fmax(amax, std::fabs(Bf16ToF32(x[i])));
  const float scale = amax / qmax;
  if (!(scale > 0.0f)) {
    std::memset(q, 0, len);
    return 0.0f;
  }
  QuantizeSpan(x, len, scale, -qmax, qmax, 0, q);
  return scale;
}

// quant.cc's QuantizeAsymmetric: q = clamp(round(x / scale) + z, 0, 15) over a range that includes 0; a
// constant span c gets scale |c|, z = (c < 0) and q = (c > 0).
HWY_INLINE float Asymmetric(const bf16_t* HWY_RESTRICT x, size_t len, int8_t* HWY_RESTRICT q,
                            uint8_t* zero) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  float lo, hi;
  size_t i = 0;
  if (len >= lanes) {
    auto vlo = LoadBf16(df, x), vhi = vlo;
    for (i = lanes; i + lanes <= len; i += lanes) {
      const auto v = LoadBf16(df, x + i);
      vlo = hn::Min(vlo, v);
      vhi = hn::Max(vhi, v);
    }
    lo = hn::GetLane(hn::MinOfLanes(df, vlo));
    hi = hn::GetLane(hn::MaxOfLanes(df, vhi));
  } else {
    lo = hi = Bf16ToF32(x[0]);
    i = 1;
  }
  for (; i < len; ++i) {
    lo = std::fmin(lo, Bf16ToF32(x[i]));
    hi = std::fmax(hi, Bf16ToF32(x[i]));
  }
  // Only the sign of a zero can depend on the order above, and neither branch below sees it: lo == hi
  // holds for -0 and +0 alike, fabs drops it, and -lo / scale rounds to integer 0 either way.
  if (lo == hi) {
    const float c = lo;
    *zero = c < 0.0f ? 1 : 0;
    std::memset(q, c > 0.0f ? 1 : 0, len);
    return std::fabs(c);
  }
  lo = std::fmin(lo, 0.0f);
  hi = std::fmax(hi, 0.0f);
  const float scale = static_cast<float>((static_cast<double>(hi) - lo) / 15.0);
  const int z = RoundClampScalar(-lo / scale, 0.0f, 15.0f);
  *zero = static_cast<uint8_t>(z);
  const float fz = static_cast<float>(z);
  QuantizeSpan(x, len, scale, -fz, 15.0f - fz, z, q);
  return scale;
}

// Two int4 values per byte, element 2i in the low nibble of byte i (quant.h's canonical form); a final odd
// element leaves the high nibble 0. Eight elements (one 64-bit word of q) become 4 bytes by three
// shift-or-mask steps instead of eight read-modify-writes.
HWY_INLINE void PackNibbles(const int8_t* HWY_RESTRICT q, size_t len, uint8_t* HWY_RESTRICT out) {
  size_t i = 0;
  for (; i + 8 <= len; i += 8) {
    uint64_t x;
    std::memcpy(&x, q + i, 8);
    x &= 0x0F0F0F0F0F0F0F0Full;                         // byte j: nibble j
    x = (x | (x >> 4)) & 0x00FF00FF00FF00FFull;        // 16-bit lane m: nibble 2m | nibble 2m+1 << 4
    x = (x | (x >> 8)) & 0x0000FFFF0000FFFFull;        // 32-bit lane: two packed bytes
    x = (x | (x >> 16)) & 0x00000000FFFFFFFFull;       // low 32 bits: four packed bytes
    const uint32_t packed = static_cast<uint32_t>(x);
    std::memcpy(out + i / 2, &packed, 4);
  }
  for (; i < len; i += 2) {
    const uint8_t lo = static_cast<uint8_t>(q[i]) & 0x0f;
    const uint8_t hi = i + 1 < len ? static_cast<uint8_t>(static_cast<uint8_t>(q[i + 1]) << 4) : 0;
    out[i / 2] = static_cast<uint8_t>(lo | hi);
  }
}

// True iff no bf16 of the row is Inf or NaN (exponent bits all ones).
HWY_INLINE bool RowFinite(const bf16_t* HWY_RESTRICT x, size_t len) {
  const hn::ScalableTag<uint16_t> du16;
  const size_t lanes = hn::Lanes(du16);
  const auto mask = hn::Set(du16, 0x7f80);
  auto bad = hn::Zero(du16);
  size_t i = 0;
  for (; i + lanes <= len; i += lanes) {
    const auto e = hn::And(hn::LoadU(du16, reinterpret_cast<const uint16_t*>(x + i)), mask);
    bad = hn::Or(bad, hn::VecFromMask(du16, hn::Eq(e, mask)));
  }
  bool ok = hn::AllTrue(du16, hn::Eq(bad, hn::Zero(du16)));
  for (; i < len; ++i) ok &= (x[i].bits & 0x7f80u) != 0x7f80u;
  return ok;
}

// The whole matrix into qm's preallocated arrays (data zeroed by the caller is not needed: every byte is
// written). `q` is scratch for one row. False, with qm partly written, as soon as a row has a non-finite
// weight.
bool QuantizeMatrix(const bf16_t* w, size_t ldw, QuantizedMatrix* qm, int8_t* q) {
  const QuantFormat f = qm->spec.format;
  const size_t n = qm->n, k = qm->k;
  const size_t groups = ScalesPerRow(qm->spec, k), row_bytes = QuantizedRowBytes(qm->spec, k);
  const size_t g = IsGroupFormat(f) ? static_cast<size_t>(qm->spec.group_size) : k;
  const bool asym = IsAsymFormat(f);
  const float qmax = f == QuantFormat::kInt8PerChannel ? 127.0f : 7.0f;
  for (size_t r = 0; r < n; ++r) {
    const bf16_t* row = w + r * ldw;
    if (!RowFinite(row, k)) return false;
    uint8_t* out = qm->data.data() + r * row_bytes;
    // int8 quantizes straight into the output row (its bytes are the two's complement q).
    int8_t* qrow = f == QuantFormat::kInt8PerChannel ? reinterpret_cast<int8_t*>(out) : q;
    for (size_t j = 0; j < groups; ++j) {
      const size_t idx = r * groups + j;
      qm->scales[idx] = asym ? Asymmetric(row + j * g, g, qrow + j * g, &qm->zeros[idx])
                             : Symmetric(row + j * g, g, qmax, qrow + j * g);
    }
    if (f != QuantFormat::kInt8PerChannel) PackNibbles(q, k, out);
  }
  return true;
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace kt
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace kt {
namespace {

using QuantizeMatrixFn = bool (*)(const bf16_t*, size_t, QuantizedMatrix*, int8_t*);

// nullptr for kScalar: Quantize (quant.cc) itself.
const HwyFns<QuantizeMatrixFn> kQuantizeMatrix = KT_HWY_FNS(QuantizeMatrixFn, QuantizeMatrix);

}  // namespace

absl::StatusOr<QuantizedMatrix> QuantizeFast(Isa isa, const QuantSpec& spec, const bf16_t* w, size_t ldw,
                                             size_t n, size_t k) {
  const QuantizeMatrixFn fn = kQuantizeMatrix.For(isa);
  // Quantize owns every error message: bad arguments go straight to it.
  // kt-fp8-block128-v1 and the MX formats have no vectorized quantizer yet (checkpoints ship it already quantized; only tests
  // and `kt convert` from bf16 quantize it): the scalar truth.
  if (fn == nullptr || !ValidateQuantSpec(spec, k).ok() || ldw < k || (w == nullptr && n > 0 && k > 0) ||
      n == 0 || k == 0 || spec.format == QuantFormat::kFp8Block128 || IsMxFormat(spec.format)) {
    return Quantize(spec, w, ldw, n, k);
  }
  QuantizedMatrix qm;
  qm.spec = spec;
  qm.n = n;
  qm.k = k;
  const size_t groups = ScalesPerRow(spec, k);
  // QuantizeMatrix writes every element (the zeros resize writes first are not relied on).
  qm.data.resize(n * QuantizedRowBytes(spec, k));
  qm.scales.resize(n * groups);
  if (IsAsymFormat(spec.format)) qm.zeros.resize(n * groups);
  std::vector<int8_t> q(spec.format == QuantFormat::kInt8PerChannel ? 0 : k);
  // A non-finite weight: Quantize names it by row and column.
  if (!fn(w, ldw, &qm, q.data())) return Quantize(spec, w, ldw, n, k);
  return qm;
}

void UnpackInt4ToBf16(const QuantSpec& spec, size_t n, size_t k, const uint8_t* panels, const float* scales,
                      const uint8_t* zeros, bf16_t* w, size_t ldw) {
  const size_t groups = ScalesPerRow(spec, k);
  const size_t g = IsGroupFormat(spec.format) ? static_cast<size_t>(spec.group_size) : k;
  const bool asym = IsAsymFormat(spec.format);
  const size_t stride = Int4PanelStride(k);
  uint16_t lut[16];
  for (size_t row = 0; row < n; ++row) {
    const size_t p = row / kInt4PanelRows, r = row % kInt4PanelRows;
    const uint8_t* panel = panels + p * stride;
    uint16_t* out = reinterpret_cast<uint16_t*>(w + row * ldw);
    for (size_t j = 0; j < groups; ++j) {
      const size_t e = (p * groups + j) * kInt4PanelRows + r;
      // Stored u = q + 8 for the symmetric formats (q = u - 8), u = q for asym; Dequantize's value is
      // float(q - z) * scale (asym) or float(q) * scale (sym): both are float(u - zp) * scale.
      const int zp = asym ? zeros[e] : kInt4SymZero;
      for (int u = 0; u < 16; ++u) lut[u] = F32ToBf16(static_cast<float>(u - zp) * scales[e]).bits;
      const size_t k0 = j * g, k1 = k0 + g;  // blocks of 8 never straddle groups (G is a multiple of 8)
      size_t kk = k0;
      for (; kk + 8 <= k1; kk += 8) {
        uint32_t word;  // byte i: u[kk + i] | u[kk + 4 + i] << 4
        std::memcpy(&word, panel + (kk / 8) * 64 + 4 * r, 4);
        for (int i = 0; i < 4; ++i) {
          out[kk + i] = lut[(word >> (8 * i)) & 0xF];
          out[kk + 4 + i] = lut[(word >> (8 * i + 4)) & 0xF];
        }
      }
      for (; kk < k1; ++kk) {  // per-channel K not a multiple of 8
        const uint8_t byte = panel[(kk / 8) * 64 + 4 * r + kk % 4];
        out[kk] = lut[(byte >> (4 * ((kk % 8) / 4))) & 0xF];
      }
    }
  }
}

void UnpackInt8ToBf16(size_t n, size_t k, const int8_t* panels, const float* packed_scales, bf16_t* w,
                      size_t ldw) {
  const size_t stride = Int8PanelStride(k);
  uint16_t lut[256];  // indexed by q + 128
  for (size_t row = 0; row < n; ++row) {
    const size_t r = row % kInt8PanelRows;
    const int8_t* panel = panels + (row / kInt8PanelRows) * stride;
    // Dequantize's one fp32 multiply float(q) * scale, rounded to bf16. q = -128 never occurs (q is in
    // [-127, 127]); its entry is computed all the same.
    for (int q = -128; q < 128; ++q) lut[q + 128] = F32ToBf16(static_cast<float>(q) * packed_scales[row]).bits;
    uint16_t* out = reinterpret_cast<uint16_t*>(w + row * ldw);
    for (size_t kk = 0; kk < k; ++kk) {
      // Quad kk / 4 of row r holds k = 4 quad .. 4 quad + 3 in 4 consecutive bytes.
      out[kk] = lut[static_cast<uint8_t>(panel[((kk / 4) * kInt8PanelRows + r) * 4 + kk % 4]) ^ 0x80];
    }
  }
}

void UnpackInt4ToBf16Transposed(const QuantSpec& spec, size_t n, size_t k, const uint8_t* panels,
                                const float* scales, const uint8_t* zeros, bf16_t* wt, size_t ldt) {
  const size_t groups = ScalesPerRow(spec, k);
  const size_t g = IsGroupFormat(spec.format) ? static_cast<size_t>(spec.group_size) : k;
  const bool asym = IsAsymFormat(spec.format);
  const size_t stride = Int4PanelStride(k);
  uint16_t lut[kInt4PanelRows][16];  // per row of the panel, the group's 16 values (as UnpackInt4ToBf16)
  uint16_t* out = reinterpret_cast<uint16_t*>(wt);
  for (size_t p = 0; p < Int4NumPanels(n); ++p) {
    const size_t rows = std::min(kInt4PanelRows, n - p * kInt4PanelRows);
    const uint8_t* panel = panels + p * stride;
    const size_t c0 = p * kInt4PanelRows;  // wt column of the panel's first row
    for (size_t j = 0; j < groups; ++j) {
      for (size_t r = 0; r < rows; ++r) {
        const size_t e = (p * groups + j) * kInt4PanelRows + r;
        const int zp = asym ? zeros[e] : kInt4SymZero;
        for (int u = 0; u < 16; ++u) lut[r][u] = F32ToBf16(static_cast<float>(u - zp) * scales[e]).bits;
      }
      const size_t k0 = j * g, k1 = k0 + g;
      size_t kk = k0;
      for (; kk + 8 <= k1; kk += 8) {
        const uint8_t* block = panel + (kk / 8) * 64;  // byte 4r + i: u[kk + i] | u[kk + 4 + i] << 4
        for (size_t i = 0; i < 4; ++i) {
          uint16_t* lo = out + (kk + i) * ldt + c0;
          uint16_t* hi = out + (kk + 4 + i) * ldt + c0;
          for (size_t r = 0; r < rows; ++r) {
            const uint8_t byte = block[4 * r + i];
            lo[r] = lut[r][byte & 0xF];
            hi[r] = lut[r][byte >> 4];
          }
        }
      }
      for (; kk < k1; ++kk) {  // per-channel K not a multiple of 8
        for (size_t r = 0; r < rows; ++r) {
          const uint8_t byte = panel[(kk / 8) * 64 + 4 * r + kk % 4];
          out[kk * ldt + c0 + r] = lut[r][(byte >> (4 * ((kk % 8) / 4))) & 0xF];
        }
      }
    }
  }
}

void UnpackInt8ToBf16Transposed(size_t n, size_t k, const int8_t* panels, const float* packed_scales,
                                bf16_t* wt, size_t ldt) {
  const size_t stride = Int8PanelStride(k);
  uint16_t lut[kInt8PanelRows][256];  // per row of the panel, indexed by q + 128, as UnpackInt8ToBf16
  for (size_t p = 0; p < Int8NumPanels(n); ++p) {
    const size_t rows = std::min(kInt8PanelRows, n - p * kInt8PanelRows);
    for (size_t r = 0; r < rows; ++r) {
      const float scale = packed_scales[p * kInt8PanelRows + r];
      for (int q = -128; q < 128; ++q) lut[r][q + 128] = F32ToBf16(static_cast<float>(q) * scale).bits;
    }
    const uint8_t* panel = reinterpret_cast<const uint8_t*>(panels + p * stride);
    for (size_t kq = 0; kq < KQuads(k); ++kq) {
      const uint8_t* quad_row = panel + kq * kInt8PanelRows * 4;  // byte 4r + j: row r, k = 4 kq + j
      for (size_t j = 0; j < 4 && 4 * kq + j < k; ++j) {
        uint16_t* out = reinterpret_cast<uint16_t*>(wt + (4 * kq + j) * ldt + p * kInt8PanelRows);
        for (size_t r = 0; r < rows; ++r) out[r] = lut[r][quad_row[4 * r + j] ^ 0x80];
      }
    }
  }
}

}  // namespace kt
#endif  // HWY_ONCE
