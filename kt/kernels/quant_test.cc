// Tests of the quantization formats against the definitions of docs/FORMATS.md, checked from the outside:
// the test decodes the stored bytes with its own nibble reader, recomputes each scale from the weights,
// builds weights whose quantization is known exactly, and compares packing with hand-written bytes.
#include "kt/kernels/quant.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "gtest/gtest.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/fp8.h"

namespace kt {
namespace {

QuantSpec Spec(QuantFormat f, int g = 0) { return QuantSpec{f, g}; }

std::vector<QuantSpec> AllSpecs() {
  std::vector<QuantSpec> s = {Spec(QuantFormat::kInt8PerChannel), Spec(QuantFormat::kInt4PerChannel),
                              Spec(QuantFormat::kInt4PerChannelAsym)};
  for (int g : {32, 64, 128}) {
    s.push_back(Spec(QuantFormat::kInt4GroupSym, g));
    s.push_back(Spec(QuantFormat::kInt4GroupAsym, g));
  }
  return s;
}

std::string Name(const QuantSpec& s) { return absl::StrCat(QuantFormatName(s.format), "/G", s.group_size); }

// Weights as stored (bf16) and their exact values (fp32), row-major with row stride ld.
struct Matrix {
  size_t n = 0, k = 0, ld = 0;
  std::vector<bf16_t> b;
  std::vector<float> f;
  Matrix(size_t n_, size_t k_, size_t ld_) : n(n_), k(k_), ld(ld_), b(n_ * ld_, bf16_t{0}), f(n_ * ld_) {}
  // Stores v rounded to bf16; returns whether v was exactly representable.
  bool Set(size_t r, size_t c, float v) {
    b[r * ld + c] = F32ToBf16(v);
    f[r * ld + c] = Bf16ToF32(b[r * ld + c]);
    return f[r * ld + c] == v;
  }
  float At(size_t r, size_t c) const { return f[r * ld + c]; }
};

Matrix RandomNormal(size_t n, size_t k, size_t ld, uint32_t seed, float sigma = 1.0f) {
  Matrix m(n, k, ld);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < k; ++c) m.Set(r, c, dist(rng));
  }
  return m;
}

// The test's own reader of the documented layout (not the library's Dequantize).
struct Decoded {
  int q;  // stored integer (nibbles sign-extended for the symmetric int4 formats)
  int z;  // zero point (0 for the symmetric formats)
  float scale;
};

Decoded Decode(const QuantizedMatrix& qm, size_t r, size_t c) {
  const bool int8 = qm.spec.format == QuantFormat::kInt8PerChannel;
  const size_t g = static_cast<size_t>(qm.spec.group_size);  // 0 for the per-channel formats
  const size_t row_bytes = int8 ? qm.k : (qm.k + 1) / 2;
  const size_t groups = g ? qm.k / g : 1;
  const size_t gi = r * groups + (g ? c / g : 0);
  Decoded d{0, 0, qm.scales.at(gi)};
  if (int8) {
    const uint8_t byte = qm.data.at(r * row_bytes + c);
    d.q = byte < 128 ? byte : byte - 256;
  } else {
    const uint8_t byte = qm.data.at(r * row_bytes + c / 2);
    const int nib = (c % 2 == 0) ? (byte & 0xf) : (byte >> 4);
    if (IsAsymFormat(qm.spec.format)) {
      d.q = nib;
      d.z = qm.zeros.at(gi);
    } else {
      d.q = nib < 8 ? nib : nib - 16;
    }
  }
  return d;
}

// Checks everything the definitions promise for one matrix. `exact` additionally demands deq == w (for
// weights built to be representable); `worst_ratio` receives the largest |w - deq| / scale seen.
void CheckQuantization(const QuantSpec& spec, const Matrix& w, bool exact = false,
                       double* worst_ratio = nullptr) {
  SCOPED_TRACE(absl::StrCat(Name(spec), " n=", w.n, " k=", w.k));
  absl::StatusOr<QuantizedMatrix> qm = Quantize(spec, w.b.data(), w.ld, w.n, w.k);
  EXPECT_TRUE(qm.ok()) << qm.status();
  if (!qm.ok()) return;
  const bool int8 = spec.format == QuantFormat::kInt8PerChannel;
  const bool asym = IsAsymFormat(spec.format);
  const bool group = IsGroupFormat(spec.format);
  const size_t g = group ? static_cast<size_t>(spec.group_size) : w.k;
  const size_t groups = group ? w.k / g : 1;
  const size_t row_bytes = int8 ? w.k : (w.k + 1) / 2;
  EXPECT_EQ(qm->n, w.n);
  EXPECT_EQ(qm->k, w.k);
  EXPECT_EQ(qm->data.size(), w.n * row_bytes);
  EXPECT_EQ(qm->scales.size(), w.n * groups);
  EXPECT_EQ(qm->zeros.size(), asym ? w.n * groups : 0);
  EXPECT_EQ(QuantizedBytes(spec, w.n, w.k), qm->data.size() + 4 * qm->scales.size() + qm->zeros.size());
  if (::testing::Test::HasFailure()) return;

  // Per-channel int4 with odd K: the unused high nibble of each row's last byte is 0.
  if (!int8 && w.k % 2 == 1) {
    for (size_t r = 0; r < w.n; ++r) EXPECT_EQ(qm->data[r * row_bytes + row_bytes - 1] >> 4, 0) << r;
  }

  std::vector<float> deq(w.n * (w.k + 1), -12345.0f);
  const size_t ldd = w.k + 1;  // a stride wider than K, whose extra column must stay untouched
  Dequantize(*qm, deq.data(), ldd);

  double worst = 0.0;
  for (size_t r = 0; r < w.n; ++r) {
    for (size_t j = 0; j < groups; ++j) {
      float amax = 0.0f, lo = w.At(r, j * g), hi = lo;
      for (size_t c = j * g; c < (j + 1) * g; ++c) {
        amax = std::max(amax, std::fabs(w.At(r, c)));
        lo = std::min(lo, w.At(r, c));
        hi = std::max(hi, w.At(r, c));
      }
      // The scale from its definition in docs/FORMATS.md.
      float want_scale;
      if (!asym) {
        want_scale = amax / (int8 ? 127.0f : 7.0f);
      } else if (lo == hi) {
        want_scale = std::fabs(lo);
      } else {
        const double range = static_cast<double>(std::max(hi, 0.0f)) - std::min(lo, 0.0f);
        want_scale = static_cast<float>(range / 15.0);
      }
      const float scale = qm->scales[r * groups + j];
      ASSERT_EQ(scale, want_scale) << "row " << r << " group " << j;
      if (asym) {
        const int z = qm->zeros[r * groups + j];
        ASSERT_LE(z, 15);
        if (lo == hi) {
          EXPECT_EQ(z, lo < 0.0f ? 1 : 0);
        }
      }
      // fp32 slack: one rounding in w / scale and one in q * scale, each relative 2^-24 of values at most
      // max(|lo|, |hi|) + scale; 2^-21 leaves a factor 4 of room.
      const double range = static_cast<double>(hi) - lo;
      const double slack = std::ldexp(std::max<double>(amax, range) + scale, -21);
      for (size_t c = j * g; c < (j + 1) * g; ++c) {
        const Decoded d = Decode(*qm, r, c);
        if (int8) {
          ASSERT_TRUE(d.q >= -127 && d.q <= 127) << d.q;  // -128 is never produced
        } else if (asym) {
          ASSERT_TRUE(d.q >= 0 && d.q <= 15) << d.q;
        } else {
          ASSERT_TRUE(d.q >= -7 && d.q <= 7) << d.q;  // nibble 0x8 (-8) is never produced
        }
        const float mine = static_cast<float>(d.q - d.z) * d.scale;
        const float got = deq[r * ldd + c];
        ASSERT_EQ(got, mine) << "Dequantize differs from the documented formula at " << r << "," << c;
        const double err = std::fabs(static_cast<double>(w.At(r, c)) - got);
        ASSERT_LE(err, 0.5 * scale + slack)
            << "w[" << r << "][" << c << "] = " << w.At(r, c) << " deq " << got << " scale " << scale;
        if (exact) {
          ASSERT_EQ(got, w.At(r, c)) << r << "," << c;
        }
        if (scale > 0.0f) worst = std::max(worst, err / scale);
      }
    }
    EXPECT_EQ(deq[r * ldd + w.k], -12345.0f) << "Dequantize wrote past K";
  }
  if (worst_ratio != nullptr) *worst_ratio = worst;
}

TEST(Quant, NamesAndTags) {
  EXPECT_STREQ(QuantFormatName(QuantFormat::kInt8PerChannel), "int8_channel");
  EXPECT_STREQ(QuantFormatName(QuantFormat::kInt4PerChannel), "int4_channel");
  EXPECT_STREQ(QuantFormatName(QuantFormat::kInt4GroupSym), "int4_group_sym");
  EXPECT_STREQ(QuantFormatName(QuantFormat::kInt4GroupAsym), "int4_group_asym");
  EXPECT_EQ(QuantLayoutTag(Spec(QuantFormat::kInt8PerChannel)), "kt-int8-channel-v1");
  EXPECT_EQ(QuantLayoutTag(Spec(QuantFormat::kInt4PerChannel)), "kt-int4-channel-v1");
  EXPECT_EQ(QuantLayoutTag(Spec(QuantFormat::kInt4GroupSym, 32)), "kt-int4-group32-sym-v1");
  EXPECT_EQ(QuantLayoutTag(Spec(QuantFormat::kInt4GroupAsym, 128)), "kt-int4-group128-asym-v1");
  EXPECT_EQ(QuantLayoutTag(Spec(QuantFormat::kInt4GroupAsym, 48)), "");
  EXPECT_STREQ(QuantFormatName(QuantFormat::kInt4PerChannelAsym), "int4_channel_asym");
  EXPECT_EQ(QuantLayoutTag(Spec(QuantFormat::kInt4PerChannelAsym)), "kt-int4-channel-asym-v1");
  EXPECT_EQ(QuantLayoutTag(Spec(QuantFormat::kInt4PerChannelAsym, 32)), "");
}

TEST(Quant, SpecErrorsNameTheNumbers) {
  auto expect_invalid = [](const absl::Status& s, std::vector<std::string> parts) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    for (const std::string& p : parts) {
      EXPECT_NE(s.message().find(p), absl::string_view::npos) << s << " / " << p;
    }
  };
  for (QuantFormat f : {QuantFormat::kInt4GroupSym, QuantFormat::kInt4GroupAsym}) {
    expect_invalid(ValidateQuantSpec(Spec(f, 48), 96), {"48", "32, 64 or 128"});
    expect_invalid(ValidateQuantSpec(Spec(f, 0), 128), {"group_size", "0"});
    expect_invalid(ValidateQuantSpec(Spec(f, 64), 96), {"K = 96", "group_size = 64"});
    expect_invalid(ValidateQuantSpec(Spec(f, 128), 200), {"200", "128"});
    EXPECT_TRUE(ValidateQuantSpec(Spec(f, 32), 96).ok());
    EXPECT_EQ(QuantizedBytes(Spec(f, 64), 4, 96), 0u);
    // Quantize reports the same errors.
    Matrix w = RandomNormal(2, 96, 96, 1);
    expect_invalid(Quantize(Spec(f, 64), w.b.data(), 96, 2, 96).status(), {"96", "64"});
    expect_invalid(Quantize(Spec(f, 48), w.b.data(), 96, 2, 96).status(), {"48"});
  }
  expect_invalid(ValidateQuantSpec(Spec(QuantFormat::kInt8PerChannel, 32), 64), {"group_size", "32"});
  expect_invalid(ValidateQuantSpec(Spec(static_cast<QuantFormat>(9)), 64), {"9"});

  Matrix w = RandomNormal(2, 64, 64, 2);
  expect_invalid(Quantize(Spec(QuantFormat::kInt8PerChannel), w.b.data(), 63, 2, 64).status(),
                 {"ldw", "63", "64"});
  expect_invalid(Quantize(Spec(QuantFormat::kInt8PerChannel), nullptr, 64, 2, 64).status(), {"null"});
  w.b[1 * 64 + 5] = bf16_t{0x7f80};  // +Inf
  expect_invalid(Quantize(Spec(QuantFormat::kInt4GroupSym, 32), w.b.data(), 64, 2, 64).status(),
                 {"w[1][5]", "finite"});
  w.b[1 * 64 + 5] = bf16_t{0x7fc0};  // NaN
  expect_invalid(Quantize(Spec(QuantFormat::kInt4PerChannel), w.b.data(), 64, 2, 64).status(), {"w[1][5]"});
}

TEST(Quant, QuantizedBytesByHand) {
  EXPECT_EQ(QuantizedBytes(Spec(QuantFormat::kInt8PerChannel), 4, 10), 4u * 10 + 4 * 4);
  EXPECT_EQ(QuantizedBytes(Spec(QuantFormat::kInt4PerChannel), 3, 5), 3u * 3 + 3 * 4);
  EXPECT_EQ(QuantizedBytes(Spec(QuantFormat::kInt4GroupSym, 32), 2, 64), 2u * 32 + 2 * 2 * 4);
  // Qwen3-30B-A3B down projection [H=2048, I=768] in group-128 asym: 0.5 B/weight + 5 B per 128 weights.
  EXPECT_EQ(QuantizedBytes(Spec(QuantFormat::kInt4GroupAsym, 128), 2048, 768),
            2048u * 384 + 2048u * 6 * 4 + 2048u * 6);
  EXPECT_EQ(QuantizedRowBytes(Spec(QuantFormat::kInt4PerChannel), 7), 4u);
  EXPECT_EQ(ScalesPerRow(Spec(QuantFormat::kInt4GroupAsym, 64), 256), 4u);
}

// (c) Packing checked byte by byte against hand-encoded examples.
TEST(Quant, NibbleLayoutByHand) {
  {
    // Row maxima are 7, so scale = 1 and q = w. Two's-complement nibbles: -1 = 0xF, -7 = 0x9, -2 = 0xE.
    Matrix w(2, 5, 5);
    const float rows[2][5] = {{1, -1, 7, -7, 3}, {-2, 0, 0, 5, -7}};
    for (size_t r = 0; r < 2; ++r) {
      for (size_t c = 0; c < 5; ++c) ASSERT_TRUE(w.Set(r, c, rows[r][c]));
    }
    auto qm = Quantize(Spec(QuantFormat::kInt4PerChannel), w.b.data(), 5, 2, 5);
    ASSERT_TRUE(qm.ok()) << qm.status();
    // Low nibble = even k, high nibble = odd k; K = 5 is odd, so the last high nibble is 0.
    EXPECT_EQ(qm->data, (std::vector<uint8_t>{0xF1, 0x97, 0x03, 0x0E, 0x50, 0x09}));
    EXPECT_EQ(qm->scales, (std::vector<float>{1.0f, 1.0f}));
    EXPECT_TRUE(qm->zeros.empty());
  }
  {
    Matrix w(1, 3, 3);
    ASSERT_TRUE(w.Set(0, 0, 127) && w.Set(0, 1, -1) && w.Set(0, 2, -127));
    auto qm = Quantize(Spec(QuantFormat::kInt8PerChannel), w.b.data(), 3, 1, 3);
    ASSERT_TRUE(qm.ok()) << qm.status();
    EXPECT_EQ(qm->data, (std::vector<uint8_t>{0x7F, 0xFF, 0x81}));
    EXPECT_EQ(qm->scales, (std::vector<float>{1.0f}));
  }
  {
    // Two groups of 32. Group 0: max |w| 7, scale 1. Group 1: max |w| 14, scale 2, and -7 / 2 = -3.5 rounds
    // away from zero to -4 (nibble 0xC).
    Matrix w(1, 64, 64);
    ASSERT_TRUE(w.Set(0, 0, 7) && w.Set(0, 1, -7) && w.Set(0, 2, 2) && w.Set(0, 32, 14) && w.Set(0, 33, -7));
    auto qm = Quantize(Spec(QuantFormat::kInt4GroupSym, 32), w.b.data(), 64, 1, 64);
    ASSERT_TRUE(qm.ok()) << qm.status();
    std::vector<uint8_t> want(32, 0x00);
    want[0] = 0x97;
    want[1] = 0x02;
    want[16] = 0xC7;
    EXPECT_EQ(qm->data, want);
    EXPECT_EQ(qm->scales, (std::vector<float>{1.0f, 2.0f}));
  }
  {
    // Asym: min -7, max 8 gives scale 15 / 15 = 1 and z = 7; unsigned nibbles q = w + 7.
    Matrix w(1, 32, 32);
    ASSERT_TRUE(w.Set(0, 0, -7) && w.Set(0, 1, 8) && w.Set(0, 2, 0) && w.Set(0, 3, 1));
    auto qm = Quantize(Spec(QuantFormat::kInt4GroupAsym, 32), w.b.data(), 32, 1, 32);
    ASSERT_TRUE(qm.ok()) << qm.status();
    std::vector<uint8_t> want(16, 0x77);
    want[0] = 0xF0;
    want[1] = 0x87;
    EXPECT_EQ(qm->data, want);
    EXPECT_EQ(qm->scales, (std::vector<float>{1.0f}));
    EXPECT_EQ(qm->zeros, (std::vector<uint8_t>{7}));
  }
}

// Ties: with scale exactly 1, x.5 must round away from zero in every format.
TEST(Quant, HalfWayRoundsAwayFromZero) {
  struct Case {
    QuantSpec spec;
    std::vector<float> w;  // first group; the rest of the row is zero
    std::vector<int> q;    // expected stored integers
  };
  const std::vector<Case> cases = {
      {Spec(QuantFormat::kInt8PerChannel),
       {127, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5},
       {127, 1, -1, 2, -2, 3, -3, 127, -127}},
      {Spec(QuantFormat::kInt4PerChannel),
       {7, 0.5, -0.5, 1.5, -2.5, 6.5, -6.5, 3.5},
       {7, 1, -1, 2, -3, 7, -7, 4}},
      {Spec(QuantFormat::kInt4GroupSym, 32),
       {-7, 0.5, -0.5, 1.5, -2.5, 6.5, -6.5, 3.5},
       {-7, 1, -1, 2, -3, 7, -7, 4}},
      // min -7, max 8: scale 1, z 7, q = round(w) + 7.
      {Spec(QuantFormat::kInt4GroupAsym, 32),
       {-7, 8, 0.5, -0.5, 2.5, -2.5, 7.5, -6.5},
       {0, 15, 8, 6, 10, 4, 15, 0}},
  };
  for (const Case& cs : cases) {
    SCOPED_TRACE(Name(cs.spec));
    const size_t k = 32;
    Matrix w(1, k, k);
    for (size_t c = 0; c < cs.w.size(); ++c) ASSERT_TRUE(w.Set(0, c, cs.w[c]));
    auto qm = Quantize(cs.spec, w.b.data(), k, 1, k);
    ASSERT_TRUE(qm.ok()) << qm.status();
    ASSERT_EQ(qm->scales[0], 1.0f);
    for (size_t c = 0; c < cs.q.size(); ++c) EXPECT_EQ(Decode(*qm, 0, c).q, cs.q[c]) << "k=" << c;
    CheckQuantization(cs.spec, w);
  }
}

// (a) Adversarial rows, every format. K = 128 so that every group format has whole groups.
TEST(Quant, AdversarialRowsStayWithinHalfAScale) {
  const size_t k = 128;
  std::vector<std::vector<float>> rows;
  rows.push_back(std::vector<float>(k, 0.0f));   // all zero
  rows.push_back(std::vector<float>(k, 0.3f));   // constant positive
  rows.push_back(std::vector<float>(k, -1.7f));  // constant negative
  rows.push_back(std::vector<float>(k, -0.0f));  // negative zero
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> r;
  for (size_t c = 0; c < k; ++c) r.push_back(1e-3f * normal(rng));
  r[77] = 1000.0f;  // one outlier
  rows.push_back(r);
  for (float& v : r) v = -std::fabs(v);  // negative only, with a negative outlier
  rows.push_back(r);
  for (float& v : r) v = 5.0f + std::fabs(normal(rng));  // positive only, far from zero
  rows.push_back(r);
  for (float& v : r) v = -5.0f - std::fabs(normal(rng));  // negative only, far from zero
  rows.push_back(r);
  for (size_t c = 0; c < k; ++c) r[c] = (c % 2 ? -1.0f : 1.0f) * (c % 5 == 0 ? 3e38f : 1e30f);  // near max
  rows.push_back(r);
  for (size_t c = 0; c < k; ++c) r[c] = std::ldexp(normal(rng), -128);  // bf16 subnormals
  rows.push_back(r);
  for (size_t c = 0; c < k; ++c) r[c] = (c % 32 == 0) ? 2.0f : 0.0f;  // one nonzero per group
  rows.push_back(r);
  for (size_t c = 0; c < k; ++c) r[c] = static_cast<float>(c % 16) - 7.5f;  // many ties at scale ~1
  rows.push_back(r);
  // Half-way values of the int8 grid at scale 1 and of the int4 grid at scale 1 (max 7 per 32 group).
  for (size_t c = 0; c < k; ++c) r[c] = (c % 32 == 0) ? 7.0f : 0.5f + static_cast<float>(c % 7);
  rows.push_back(r);

  Matrix w(rows.size(), k, k + 5);
  for (size_t i = 0; i < rows.size(); ++i) {
    for (size_t c = 0; c < k; ++c) w.Set(i, c, rows[i][c]);
  }
  for (const QuantSpec& spec : AllSpecs()) CheckQuantization(spec, w);

  // Constant asym groups reproduce the constant exactly (scale |c|, q - z = sign(c)).
  for (int g : {32, 64, 128}) {
    SCOPED_TRACE(g);
    auto qm = Quantize(Spec(QuantFormat::kInt4GroupAsym, g), w.b.data(), w.ld, w.n, k);
    ASSERT_TRUE(qm.ok());
    std::vector<float> deq(w.n * k);
    Dequantize(*qm, deq.data(), k);
    for (size_t row : {0, 1, 2, 3}) {
      for (size_t c = 0; c < k; ++c) ASSERT_EQ(deq[row * k + c], w.At(row, c)) << row << "," << c;
    }
    EXPECT_EQ(qm->scales[1 * (k / g)], w.At(1, 0));
    EXPECT_EQ(qm->zeros[2 * (k / g)], 1);
    EXPECT_EQ(Decode(*qm, 1, 0).q, 1);
    EXPECT_EQ(Decode(*qm, 2, 0).q, 0);
  }
}

// (b) Weights built as q * scale (sym) or (q - z) * scale (asym) from integers chosen by the test come back
// exactly, with exactly those integers and scales. Scales are m * 2^e with m small enough that every product
// has at most 8 significant bits (exact in bf16); the divisions by 127, 7 and 15 are then exact too.
TEST(Quant, RepresentableWeightsRoundTripExactly) {
  std::mt19937 rng(5);
  for (const QuantSpec& spec : AllSpecs()) {
    SCOPED_TRACE(Name(spec));
    const bool int8 = spec.format == QuantFormat::kInt8PerChannel;
    const bool asym = IsAsymFormat(spec.format);
    const size_t n = 9, k = 256;
    const size_t g = spec.group_size ? static_cast<size_t>(spec.group_size) : k;
    const int qmax = int8 ? 127 : 7;
    const int mmax = int8 ? 1 : (asym ? 17 : 31);  // 127 * 1, 7 * 31 = 217, 15 * 17 = 255: all < 256
    Matrix w(n, k, k);
    std::vector<int> want_q(n * k), want_z(n * (k / g));
    std::vector<float> want_scale(n * (k / g));
    for (size_t r = 0; r < n; ++r) {
      for (size_t j = 0; j < k / g; ++j) {
        const int m = 2 * std::uniform_int_distribution<int>(0, (mmax - 1) / 2)(rng) + 1;  // odd
        const float s = std::ldexp(static_cast<float>(m), std::uniform_int_distribution<int>(-24, 4)(rng));
        const int z = asym ? std::uniform_int_distribution<int>(0, 15)(rng) : 0;
        want_scale[r * (k / g) + j] = s;
        want_z[r * (k / g) + j] = z;
        for (size_t c = j * g; c < (j + 1) * g; ++c) {
          int q = asym ? std::uniform_int_distribution<int>(0, 15)(rng)
                       : std::uniform_int_distribution<int>(-qmax, qmax)(rng);
          // Pin the range: sym needs one |q| = qmax, asym needs q = 0 and q = 15 in the group.
          if (c == j * g) q = asym ? 0 : (rng() % 2 ? qmax : -qmax);
          if (c == j * g + 1 && asym) q = 15;
          want_q[r * k + c] = q;
          ASSERT_TRUE(w.Set(r, c, static_cast<float>(q - z) * s)) << q << " " << z << " " << s;
        }
      }
    }
    CheckQuantization(spec, w, /*exact=*/true);
    auto qm = Quantize(spec, w.b.data(), k, n, k);
    ASSERT_TRUE(qm.ok());
    EXPECT_EQ(qm->scales, want_scale);
    for (size_t r = 0; r < n; ++r) {
      for (size_t c = 0; c < k; ++c) {
        const Decoded d = Decode(*qm, r, c);
        ASSERT_EQ(d.q, want_q[r * k + c]) << r << "," << c;
        ASSERT_EQ(d.z, want_z[r * (k / g) + c / g]) << r << "," << c;
      }
    }
  }
}

// (d) Shape sweep, with a row stride wider than K; odd K for the per-channel formats.
TEST(Quant, ShapeSweep) {
  uint32_t seed = 100;
  for (const QuantSpec& spec : AllSpecs()) {
    const bool group = spec.group_size != 0;
    std::vector<size_t> ks = {32, 64, 96, 128, 256};
    if (!group) ks.insert(ks.end(), {1, 3, 33, 95, 255});
    for (size_t n : {1, 3, 16, 17}) {
      for (size_t k : ks) {
        Matrix w = RandomNormal(n, k, k + 3, ++seed, 0.02f);
        if (group && k % spec.group_size != 0) {
          auto r = Quantize(spec, w.b.data(), w.ld, n, k);
          EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << Name(spec) << " k=" << k;
          continue;
        }
        CheckQuantization(spec, w);
      }
    }
  }
}

// (e) Mean relative error mean|W - deq| / mean|W| on N(0, 1) weights of an expert-sized matrix
// (K = 2048, Qwen3-30B-A3B's hidden size). The bounds follow from uniform rounding error, mean |e| = scale/4,
// and mean|W| = 0.80 sigma:
// - int8 channel: max of 2048 normals is about 3.6 sigma, scale 3.6/127 = 0.028: 0.028/4/0.8 = 0.009.
// - int4 channel: scale 3.6/7 = 0.51, 0.51/4/0.8 = 0.16 (somewhat less: the grid is coarse against the
//   bell, so most weights sit in the fine middle steps).
// - int4 group sym: max of 32..128 normals is 2.1..2.6 sigma, scale 0.30..0.37: 0.09..0.12.
// - int4 group asym: range 4.1..5.2 sigma over 15 steps, scale 0.27..0.35: 0.08..0.11.
// The asserted bounds are about 1.3x those estimates, well inside what the original project accepted end to
// end (0.05 for INT8, 0.35 for INT4), so a regression to a wrong scale or rounding would trip them.
TEST(Quant, MeanRelativeErrorOnNormalWeights) {
  const size_t n = 128, k = 2048;
  const Matrix w = RandomNormal(n, k, k, 2024);
  for (const QuantSpec& spec : AllSpecs()) {
    auto qm = Quantize(spec, w.b.data(), k, n, k);
    ASSERT_TRUE(qm.ok()) << qm.status();
    std::vector<float> deq(n * k);
    Dequantize(*qm, deq.data(), k);
    double err = 0.0, mag = 0.0, max_ratio = 0.0;
    for (size_t i = 0; i < n * k; ++i) {
      err += std::fabs(static_cast<double>(w.f[i]) - deq[i]);
      mag += std::fabs(static_cast<double>(w.f[i]));
    }
    CheckQuantization(spec, w, /*exact=*/false, &max_ratio);
    const double rel = err / mag;
    const double bits = 8.0 * QuantizedBytes(spec, n, k) / static_cast<double>(n * k);
    std::printf("%-28s mean|W-deq|/mean|W| = %.5f   max|W-deq|/scale = %.4f   %.3f bits/weight\n",
                QuantLayoutTag(spec).c_str(), rel, max_ratio, bits);
    double bound;
    switch (spec.format) {
      case QuantFormat::kInt8PerChannel:
        bound = 0.012;
        break;
      case QuantFormat::kInt4PerChannel:
      case QuantFormat::kInt4PerChannelAsym:  // range ~7.2 sigma over 15 steps: about 0.15
        bound = 0.21;
        break;
      default:
        bound = 0.16;
        break;
    }
    EXPECT_LT(rel, bound) << QuantLayoutTag(spec);
  }
}

TEST(Quant, ActivationInt8PerToken) {
  // Ties and the symmetric grid: max 127 gives scale 1.
  {
    const std::vector<float> x = {127, -0.5, 0.5, 2.5, -2.5, 126.5, 0, -127};
    const std::vector<int8_t> want = {127, -1, 1, 3, -3, 127, 0, -127};
    std::vector<bf16_t> xb;
    for (float v : x) xb.push_back(F32ToBf16(v));
    std::vector<int8_t> q(x.size());
    float scale = -1;
    QuantizeActivationInt8(xb.data(), x.size(), q.data(), &scale);
    EXPECT_EQ(scale, 1.0f);
    EXPECT_EQ(q, want);
  }
  // All-zero token: scale 0, q 0, no NaN.
  {
    std::vector<bf16_t> xb(64, bf16_t{0});
    std::vector<int8_t> q(64, 9);
    float scale = -1;
    QuantizeActivationInt8(xb.data(), 64, q.data(), &scale);
    EXPECT_EQ(scale, 0.0f);
    EXPECT_EQ(q, std::vector<int8_t>(64, 0));
  }
  // Random tokens: scale = max|x| / 127 and every element within half a step.
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (size_t k : {1, 7, 64, 2048}) {
    std::vector<bf16_t> xb(k);
    float amax = 0.0f;
    for (auto& v : xb) {
      v = F32ToBf16(normal(rng));
      amax = std::max(amax, std::fabs(Bf16ToF32(v)));
    }
    std::vector<int8_t> q(k);
    float scale;
    QuantizeActivationInt8(xb.data(), k, q.data(), &scale);
    ASSERT_EQ(scale, amax / 127.0f);
    for (size_t i = 0; i < k; ++i) {
      ASSERT_GE(q[i], -127);
      ASSERT_LE(std::fabs(Bf16ToF32(xb[i]) - q[i] * scale), 0.5f * scale + std::ldexp(amax, -21)) << i;
    }
  }
}

TEST(Quant, ActivationInt8Grouped) {
  const size_t k = 256;
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<bf16_t> xb(k);
  for (size_t i = 0; i < k; ++i) xb[i] = F32ToBf16(normal(rng) * (i < 64 ? 100.0f : 1.0f));
  for (size_t i = 128; i < 192; ++i) xb[i] = bf16_t{0};  // an all-zero group (for G <= 64)
  for (int g : {32, 64, 128}) {
    SCOPED_TRACE(g);
    std::vector<int8_t> q(k);
    std::vector<float> scales(k / g, -1.0f);
    ASSERT_TRUE(QuantizeActivationInt8Grouped(xb.data(), k, g, q.data(), scales.data()).ok());
    for (size_t j = 0; j < k / g; ++j) {
      float amax = 0.0f;
      for (size_t i = j * g; i < (j + 1) * g; ++i) amax = std::max(amax, std::fabs(Bf16ToF32(xb[i])));
      ASSERT_EQ(scales[j], amax / 127.0f) << j;
      for (size_t i = j * g; i < (j + 1) * g; ++i) {
        ASSERT_GE(q[i], -127);
        ASSERT_LE(std::fabs(Bf16ToF32(xb[i]) - q[i] * scales[j]), 0.5f * scales[j] + std::ldexp(amax, -21));
      }
    }
  }
  std::vector<int8_t> q(k);
  std::vector<float> scales(8);
  absl::Status s = QuantizeActivationInt8Grouped(xb.data(), k, 48, q.data(), scales.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("48"), absl::string_view::npos) << s;
  s = QuantizeActivationInt8Grouped(xb.data(), 96, 64, q.data(), scales.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("K = 96"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("64"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace kt

namespace kt {
namespace {

// kt-fp8-block128-v1 from the outside: each 128 x 128 block's scale is its amax / 448 (the same in every row
// of the block), every code decodes (fp8.h) to within half an E4M3 step of w / scale, and Dequantize is
// code value * scale; K and N not multiples of 128 give short edge blocks; an all-zero block has scale 0.
TEST(QuantFp8Block, BlockScalesCodesAndDequantize) {
  const QuantSpec spec{QuantFormat::kFp8Block128, 0};
  EXPECT_STREQ(QuantFormatName(spec.format), "fp8_block128");
  EXPECT_EQ(QuantLayoutTag(spec), "kt-fp8-block128-v1");
  EXPECT_EQ(QuantLayoutTag(QuantSpec{QuantFormat::kFp8Block128, 128}), "");
  EXPECT_EQ(ScalesPerRow(spec, 300), 3u);
  EXPECT_EQ(QuantizedRowBytes(spec, 300), 300u);
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  const size_t n = 200, k = 300, blocks = 3;
  std::vector<bf16_t> w(n * k);
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < k; ++c) {
      // Block (1, 2) is all zero; the others have magnitudes that differ per block.
      const bool zero = r >= 128 && c >= 256;
      w[r * k + c] = F32ToBf16(zero ? 0.0f : dist(rng) * (1 + (r / 128) + 3 * (c / 128)));
    }
  }
  const auto qm = Quantize(spec, w.data(), k, n, k);
  ASSERT_TRUE(qm.ok()) << qm.status();
  ASSERT_EQ(qm->data.size(), n * k);
  ASSERT_EQ(qm->scales.size(), n * blocks);
  std::vector<float> deq(n * k);
  Dequantize(*qm, deq.data(), k);
  for (size_t rb = 0; rb < 2; ++rb) {
    for (size_t b = 0; b < blocks; ++b) {
      float amax = 0;
      for (size_t r = rb * 128; r < std::min(n, rb * 128 + 128); ++r) {
        for (size_t c = b * 128; c < std::min(k, b * 128 + 128); ++c) amax = std::max(amax, std::fabs(Bf16ToF32(w[r * k + c])));
      }
      const float scale = amax / 448.0f;
      for (size_t r = rb * 128; r < std::min(n, rb * 128 + 128); ++r) {
        ASSERT_EQ(qm->scales[r * blocks + b], scale) << r << "," << b;
        for (size_t c = b * 128; c < std::min(k, b * 128 + 128); ++c) {
          const float v = Bf16ToF32(w[r * k + c]);
          const float got = Fp8E4M3ToF32(qm->data[r * k + c]);
          ASSERT_EQ(deq[r * k + c], got * scale);
          if (scale == 0) {
            ASSERT_EQ(qm->data[r * k + c], 0);
            continue;
          }
          // Half a step: 2^-4 of the value for normal codes, 2^-10 absolute below 2^-6.
          const float t = v / scale;
          ASSERT_LE(std::fabs(got - t), std::max(std::fabs(t) / 16.0f, 1.0f / 1024.0f) * 1.0001f)
              << r << "," << c << ": " << t << " -> " << got;
        }
      }
    }
  }
  // The checkpoint's block scales expand to these row scales.
  std::vector<float> block_scales(2 * blocks), rows(n * blocks);
  for (size_t rb = 0; rb < 2; ++rb) {
    for (size_t b = 0; b < blocks; ++b) block_scales[rb * blocks + b] = qm->scales[rb * 128 * blocks + b];
  }
  ExpandFp8BlockScales(block_scales.data(), n, k, rows.data());
  EXPECT_EQ(rows, qm->scales);
}

}  // namespace
}  // namespace kt
