// QuantizeFast on every path against quant.h's scalar Quantize, byte for byte (data, scales, zero points),
// for every format, over rows built to hit each branch and rounding case: random rows, exact rounding ties,
// all-zero rows and groups, constant rows and groups (positive, negative, -0), huge values near the bf16
// maximum, subnormal bf16 values, one-sided ranges (asym), K not a multiple of the vector width (per-channel
// formats), row strides wider than K; non-finite weights give Quantize's own error. And the table-driven
// unpackers against Dequantize rounded to bf16, bit for bit.
#include "kt/kernels/isa_test_util.h"
#include "kt/kernels/quant_fast.h"

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/gemm_int8.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

class QuantFastTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (!IsaSupported(GetParam(), GetCpuFeatures())) {
      GTEST_SKIP() << IsaName(GetParam()) << " is not supported by this CPU ("
                   << GetCpuFeatures().ToString() << "); it is tested on a machine that has it.";
    }
  }
};

std::vector<QuantSpec> AllSpecs() {
  std::vector<QuantSpec> specs = {{QuantFormat::kInt8PerChannel, 0},
                                  {QuantFormat::kInt4PerChannel, 0},
                                  {QuantFormat::kInt4PerChannelAsym, 0}};
  for (int g : kQuantGroupSizes) {
    specs.push_back({QuantFormat::kInt4GroupSym, g});
    specs.push_back({QuantFormat::kInt4GroupAsym, g});
  }
  return specs;
}

// Fills x[0, len) with one of the edge-case kinds. `qmax` is the format's top level (127, 7, or 15 for asym)
// so that the tie rows get scale exactly 1.
void FillSpan(bf16_t* x, size_t len, int kind, float qmax, bool asym, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  switch (kind) {
    case 0:  // random, scale 0.05
      for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(nd(rng) * 0.05f);
      break;
    case 1: {  // rounding ties: with the range fixed so that scale = 1, every x = m + 0.5 is a tie
      for (size_t i = 0; i < len; ++i) {
        const int m = static_cast<int>(rng() % static_cast<unsigned>(qmax)) - (asym ? 0 : static_cast<int>(qmax) / 2);
        x[i] = F32ToBf16(static_cast<float>(m) + 0.5f);
      }
      if (asym) {  // range [-5, 10]: scale 1, z = 5 (ties shifted into range by the zero point)
        for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(Bf16ToF32(x[i]) - 5.0f);
        x[0] = F32ToBf16(-5.0f);
        if (len > 1) x[len - 1] = F32ToBf16(10.0f);
      } else {
        x[0] = F32ToBf16(len > 1 ? qmax : -qmax);
        if (len > 1) x[len - 1] = F32ToBf16(-qmax);
      }
      break;
    }
    case 2:  // all zero, with some -0
      for (size_t i = 0; i < len; ++i) x[i] = bf16_t{static_cast<uint16_t>(i % 3 == 0 ? 0x8000 : 0)};
      break;
    case 3:  // constant positive
      for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(0.3f);
      break;
    case 4:  // constant negative
      for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(-1.7e-3f);
      break;
    case 5:  // huge: near the bf16 maximum 3.39e38, both signs
      for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(std::fmin(std::fmax(nd(rng) * 1e38f, -3e38f), 3e38f));
      x[len / 2] = bf16_t{0x7f7f};  // the largest finite bf16
      break;
    case 6:  // tiny: bf16 subnormals (scales become fp32 subnormals) and -0
      for (size_t i = 0; i < len; ++i) {
        x[i] = bf16_t{static_cast<uint16_t>((rng() % 2 ? 0x8000 : 0) | (rng() % 0x7f))};
      }
      break;
    case 7:  // one-sided: all positive (asym: range extended to include 0)
      for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(1.0f + std::fabs(nd(rng)));
      break;
    case 8:  // one-sided negative, plus a -0
      for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(-2.0f - std::fabs(nd(rng)) * 100.0f);
      x[len - 1] = bf16_t{0x8000};
      break;
    default:  // large dynamic range: most values tiny, a few outliers
      for (size_t i = 0; i < len; ++i) x[i] = F32ToBf16(nd(rng) * (rng() % 17 == 0 ? 30.0f : 1e-3f));
      break;
  }
}
constexpr int kKinds = 10;

void ExpectSameMatrix(const QuantizedMatrix& got, const QuantizedMatrix& want, const std::string& what) {
  ASSERT_EQ(got.n, want.n) << what;
  ASSERT_EQ(got.k, want.k) << what;
  ASSERT_EQ(got.spec.format, want.spec.format) << what;
  ASSERT_EQ(got.spec.group_size, want.spec.group_size) << what;
  ASSERT_EQ(got.data.size(), want.data.size()) << what;
  for (size_t i = 0; i < got.data.size(); ++i) {
    ASSERT_EQ(got.data[i], want.data[i]) << what << ": data byte " << i << " (row " << i / (got.data.size() / got.n) << ")";
  }
  ASSERT_EQ(got.scales.size(), want.scales.size()) << what;
  for (size_t i = 0; i < got.scales.size(); ++i) {
    ASSERT_EQ(std::memcmp(&got.scales[i], &want.scales[i], sizeof(float)), 0)
        << what << ": scale " << i << " " << got.scales[i] << " vs " << want.scales[i];
  }
  ASSERT_EQ(got.zeros, want.zeros) << what;
}

TEST_P(QuantFastTest, MatchesQuantizeByteForByte) {
  std::mt19937 rng(11);
  for (const QuantSpec& spec : AllSpecs()) {
    const bool group = IsGroupFormat(spec.format), asym = IsAsymFormat(spec.format);
    const float qmax = spec.format == QuantFormat::kInt8PerChannel ? 127.0f : asym ? 15.0f : 7.0f;
    std::vector<size_t> ks;
    if (group) {
      ks = {size_t(spec.group_size), size_t(3 * spec.group_size), size_t(12 * spec.group_size)};
    } else {
      ks = {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 301, 768};
    }
    for (size_t k : ks) {
      for (size_t extra : {size_t{0}, size_t{5}}) {  // row stride ldw = k + extra
        const size_t ldw = k + extra;
        const size_t n = 2 * kKinds + 3;
        std::vector<bf16_t> w(n * ldw, F32ToBf16(999.0f));  // padding that must not be read into results
        const size_t g = group ? static_cast<size_t>(spec.group_size) : k;
        for (size_t r = 0; r < n; ++r) {
          // Rows 0..kKinds-1: one kind for the whole row; then rows mixing kinds group by group.
          for (size_t j = 0; j * g < k; ++j) {
            const int kind = r < kKinds ? static_cast<int>(r) : static_cast<int>((r + j) % kKinds);
            FillSpan(w.data() + r * ldw + j * g, g, kind, qmax, asym, rng);
          }
        }
        const std::string what = std::string(QuantFormatName(spec.format)) + " G=" +
                                 std::to_string(spec.group_size) + " K=" + std::to_string(k) +
                                 " ldw=" + std::to_string(ldw);
        absl::StatusOr<QuantizedMatrix> got = QuantizeFast(GetParam(), spec, w.data(), ldw, n, k);
        absl::StatusOr<QuantizedMatrix> want = Quantize(spec, w.data(), ldw, n, k);
        ASSERT_TRUE(want.ok()) << what << ": " << want.status();
        ASSERT_TRUE(got.ok()) << what << ": " << got.status();
        ExpectSameMatrix(*got, *want, what);
      }
    }
  }
}

TEST_P(QuantFastTest, TiesAndConstantsAreReallyExercised) {
  // Guards the edge-case generator: the tie rows must produce ties, i.e. odd multiples of 0.5 after the
  // division, and the constant asym group must take the constant branch (scale = |c|).
  std::mt19937 rng(2);
  std::vector<bf16_t> x(64);
  FillSpan(x.data(), 64, 1, 7.0f, false, rng);
  absl::StatusOr<QuantizedMatrix> q = QuantizeFast(GetParam(), {QuantFormat::kInt4PerChannel, 0}, x.data(), 64, 1, 64);
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->scales[0], 1.0f);
  // x = 2.5 must give 3 (half away from zero), x = -2.5 must give -3 (nibble 0xD).
  x[1] = F32ToBf16(2.5f);
  x[2] = F32ToBf16(-2.5f);
  q = QuantizeFast(GetParam(), {QuantFormat::kInt4PerChannel, 0}, x.data(), 64, 1, 64);
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->data[0] >> 4, 3);
  EXPECT_EQ(q->data[1] & 0xF, 0xD);
  FillSpan(x.data(), 32, 4, 15.0f, true, rng);
  q = QuantizeFast(GetParam(), {QuantFormat::kInt4GroupAsym, 32}, x.data(), 64, 1, 64);
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(q->scales[0], std::fabs(Bf16ToF32(x[0])));
  EXPECT_EQ(q->zeros[0], 1);
}

TEST_P(QuantFastTest, NonFiniteAndBadArgumentsGiveQuantizesError) {
  std::mt19937 rng(7);
  const size_t n = 9, k = 256;
  std::vector<bf16_t> w(n * k);
  for (size_t i = 0; i < w.size(); ++i) FillSpan(&w[i], 1, 0, 7.0f, false, rng);
  for (const QuantSpec& spec : AllSpecs()) {
    for (uint16_t bad : {uint16_t{0x7f80}, uint16_t{0xff80}, uint16_t{0x7fc1}}) {  // +Inf, -Inf, NaN
      for (size_t pos : {size_t{0}, 5 * k + 77, n * k - 1}) {  // vector body and the last element
        std::vector<bf16_t> v = w;
        v[pos] = bf16_t{bad};
        absl::StatusOr<QuantizedMatrix> got = QuantizeFast(GetParam(), spec, v.data(), k, n, k);
        absl::StatusOr<QuantizedMatrix> want = Quantize(spec, v.data(), k, n, k);
        ASSERT_FALSE(want.ok());
        ASSERT_FALSE(got.ok()) << QuantFormatName(spec.format) << " bits " << bad << " at " << pos;
        EXPECT_EQ(got.status(), want.status());
        EXPECT_NE(got.status().message().find("is not finite"), absl::string_view::npos) << got.status();
      }
    }
  }
  // Argument errors are Quantize's too.
  const absl::Status group_k = QuantizeFast(GetParam(), {QuantFormat::kInt4GroupSym, 64}, w.data(), k, 1, 96).status();
  EXPECT_EQ(group_k, Quantize({QuantFormat::kInt4GroupSym, 64}, w.data(), k, 1, 96).status());
  EXPECT_FALSE(group_k.ok());
  const absl::Status ldw = QuantizeFast(GetParam(), {QuantFormat::kInt4PerChannel, 0}, w.data(), 10, 2, 20).status();
  EXPECT_NE(ldw.message().find("ldw must be >= K"), absl::string_view::npos) << ldw;
  const absl::Status null = QuantizeFast(GetParam(), {QuantFormat::kInt4PerChannel, 0}, nullptr, 20, 2, 20).status();
  EXPECT_NE(null.message().find("w is null"), absl::string_view::npos) << null;
}

INSTANTIATE_TEST_SUITE_P(AllPaths, QuantFastTest, isa_test::AllIsas(), isa_test::IsaParamName());

// The unpackers are plain C++ (table lookups, no ISA-specific code), so one test covers them: packed
// matrices of every format, with N and K remainders (N not a multiple of the 16-row panel; per-channel K not
// a multiple of the 8-k block), back to bf16 equal to F32ToBf16(Dequantize) bit for bit.
TEST(UnpackToBf16Test, MatchesDequantize) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (const QuantSpec& spec : AllSpecs()) {
    const bool group = IsGroupFormat(spec.format);
    for (size_t n : {size_t{1}, size_t{16}, size_t{37}}) {
      for (size_t k : group ? std::vector<size_t>{size_t(spec.group_size), size_t(5 * spec.group_size)}
                            : std::vector<size_t>{1, 3, 8, 13, 300}) {
        std::vector<bf16_t> w(n * k);
        for (auto& v : w) v = F32ToBf16(nd(rng));
        if (n > 2) {
          for (size_t c = 0; c < k; ++c) w[k + c] = bf16_t{0};  // all-zero row: scale 0
        }
        absl::StatusOr<QuantizedMatrix> qm = Quantize(spec, w.data(), k, n, k);
        ASSERT_TRUE(qm.ok()) << qm.status();
        std::vector<float> deq(n * k);
        Dequantize(*qm, deq.data(), k);
        const size_t ldw = k + 3;
        std::vector<bf16_t> got(n * ldw, bf16_t{0x1234});
        if (spec.format == QuantFormat::kInt8PerChannel) {
          std::vector<int8_t> panels(PackedInt8Bytes(n, k));
          std::vector<float> scales(PackedInt8Rows(n));
          std::vector<int32_t> sums(PackedInt8Rows(n));
          PackInt8(reinterpret_cast<const int8_t*>(qm->data.data()), k, qm->scales.data(), n, k, panels.data(),
                   scales.data(), sums.data());
          UnpackInt8ToBf16(n, k, panels.data(), scales.data(), got.data(), ldw);
          // The transposed unpacker: the same bits at [c][r], nothing written past N in a row of wt.
          const size_t ldt = n + 5;
          std::vector<bf16_t> got_t(k * ldt, bf16_t{0x4321});
          UnpackInt8ToBf16Transposed(n, k, panels.data(), scales.data(), got_t.data(), ldt);
          for (size_t c = 0; c < k; ++c) {
            for (size_t r = 0; r < n; ++r) {
              ASSERT_EQ(got_t[c * ldt + r].bits, F32ToBf16(deq[r * k + c]).bits)
                  << "transposed, n=" << n << " k=" << k << " at [" << c << "][" << r << "]";
            }
            for (size_t r = n; r < ldt; ++r) ASSERT_EQ(got_t[c * ldt + r].bits, 0x4321) << "wrote past N";
          }
        } else {
          const size_t entries = PackedInt4Scales(n, k, Int4KernelGroup(spec));
          std::vector<uint8_t> panels(PackedInt4Bytes(n, k)), zeros(entries);
          std::vector<float> scales(entries);
          ASSERT_TRUE(PackInt4(*qm, panels.data(), scales.data(), zeros.data()).ok());
          UnpackInt4ToBf16(spec, n, k, panels.data(), scales.data(), zeros.data(), got.data(), ldw);
          const size_t ldt = n + 5;
          std::vector<bf16_t> got_t(k * ldt, bf16_t{0x4321});
          UnpackInt4ToBf16Transposed(spec, n, k, panels.data(), scales.data(), zeros.data(), got_t.data(), ldt);
          for (size_t c = 0; c < k; ++c) {
            for (size_t r = 0; r < n; ++r) {
              ASSERT_EQ(got_t[c * ldt + r].bits, F32ToBf16(deq[r * k + c]).bits)
                  << QuantFormatName(spec.format) << " G=" << spec.group_size << " transposed, n=" << n
                  << " k=" << k << " at [" << c << "][" << r << "]";
            }
            for (size_t r = n; r < ldt; ++r) ASSERT_EQ(got_t[c * ldt + r].bits, 0x4321) << "wrote past N";
          }
        }
        for (size_t r = 0; r < n; ++r) {
          for (size_t c = 0; c < k; ++c) {
            ASSERT_EQ(got[r * ldw + c].bits, F32ToBf16(deq[r * k + c]).bits)
                << QuantFormatName(spec.format) << " G=" << spec.group_size << " n=" << n << " k=" << k
                << " at [" << r << "][" << c << "]";
          }
          for (size_t c = k; c < ldw; ++c) ASSERT_EQ(got[r * ldw + c].bits, 0x1234) << "wrote past K";
        }
      }
    }
  }
}

}  // namespace
}  // namespace kt
