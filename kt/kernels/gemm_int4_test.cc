// Every INT4 GEMM path against the plain reference (the weights Dequantize writes, the same activation
// quantization, double sums) for each int4 format: kt-int4-channel-v1, kt-int4-group{32,64,128}-sym-v1
// and -asym-v1. Shapes hit every remainder: M = 1..33 (row blocks of 8/4, AMX's 16/32-row tiles), N not a
// multiple of the 16-row panel or of 2-panel blocks, K not a multiple of 8 (the packed block; per-channel
// only), K at one and several groups, K over several of AMX's 64-k chunks; misaligned qx and y pointers.
// The integer parts are exact on every path and the fp32 epilogue is the same expression everywhere, so
// every path must also match the scalar path bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_int4.h"
#include "kt/kernels/gemm_reference.h"
#include "kt/kernels/gemm_test_util.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

constexpr QuantSpec kSpecs[] = {
    {QuantFormat::kInt4PerChannel, 0},  {QuantFormat::kInt4GroupSym, 32},  {QuantFormat::kInt4GroupSym, 64},
    {QuantFormat::kInt4GroupSym, 128},  {QuantFormat::kInt4GroupAsym, 32}, {QuantFormat::kInt4GroupAsym, 64},
    {QuantFormat::kInt4GroupAsym, 128}, {QuantFormat::kInt4PerChannelAsym, 0},
};

QuantizedMatrix RandomWeights(const QuantSpec& spec, size_t n, size_t k, std::mt19937& rng) {
  // N(0,1) weights with a per-row magnitude spread, and some one-signed rows (asym zero points away
  // from the middle), quantized by quant.h: the canonical form the layer gets from a checkpoint.
  std::normal_distribution<float> dist;
  std::vector<bf16_t> w(n * k);
  for (size_t r = 0; r < n; ++r) {
    const float mag = 0.01f * (1 + r % 7);
    const float shift = (r % 5 == 3) ? 2.5f : 0.0f;
    for (size_t c = 0; c < k; ++c) w[r * k + c] = F32ToBf16(mag * (dist(rng) + shift));
  }
  auto qm = Quantize(spec, w.data(), k, n, k);
  EXPECT_TRUE(qm.ok()) << qm.status();
  return *std::move(qm);
}

// A packed matrix.
struct Packed {
  std::vector<uint8_t> panels;
  std::vector<float> scales;
  std::vector<uint8_t> zeros;  // empty for the symmetric formats
  const uint8_t* zeros_or_null() const { return zeros.empty() ? nullptr : zeros.data(); }
};

Packed Pack(const QuantizedMatrix& qm) {
  Packed p;
  const size_t entries = PackedInt4Scales(qm.n, qm.k, Int4KernelGroup(qm.spec));
  p.panels.assign(PackedInt4Bytes(qm.n, qm.k), 0x5A);
  p.scales.assign(entries, -1.0f);
  if (IsAsymFormat(qm.spec.format)) p.zeros.assign(entries, 0xEE);
  const absl::Status s = PackInt4(qm, p.panels.data(), p.scales.data(), p.zeros.empty() ? nullptr : p.zeros.data());
  EXPECT_TRUE(s.ok()) << s;
  return p;
}

TEST(PackInt4, RoundTripsEveryFormat) {
  std::mt19937 rng(3);
  for (const QuantSpec& spec : kSpecs) {
    for (size_t n : {1, 16, 17, 40}) {
      std::vector<size_t> ks;
      if (spec.group_size == 0) {
        ks = {1, 3, 7, 8, 9, 64, 67};
      } else {
        ks = {size_t(spec.group_size), size_t(3 * spec.group_size)};
      }
      for (size_t k : ks) {
        const QuantizedMatrix qm = RandomWeights(spec, n, k, rng);
        const Packed p = Pack(qm);
        const QuantizedMatrix back = UnpackInt4(spec, n, k, p.panels.data(), p.scales.data(), p.zeros_or_null());
        ASSERT_EQ(back.data, qm.data) << QuantLayoutTag(spec) << " n=" << n << " k=" << k;
        ASSERT_EQ(back.scales, qm.scales);
        ASSERT_EQ(back.zeros, qm.zeros);
        // Padding rows have scale 0 (and zero point 0) so kernels can run over them.
        const size_t groups = Int4Groups(k, Int4KernelGroup(spec));
        for (size_t e = 0; e < p.scales.size(); ++e) {
          const size_t row = (e / (16 * groups)) * 16 + e % 16;
          if (row >= n) {
            ASSERT_EQ(p.scales[e], 0.0f) << e;
            if (!p.zeros.empty()) ASSERT_EQ(p.zeros[e], 0) << e;
          }
        }
      }
    }
  }
}

TEST(PackInt4, LayoutIsPanelBlockLaneNibble) {
  // kt-int4-panel16-kblock8-v1: byte 4r + j of block b = u[16p + r][8b + j] | u[16p + r][8b + 4 + j] << 4,
  // u = q + 8 for the symmetric formats.
  std::mt19937 rng(4);
  const size_t n = 20, k = 13;
  const QuantizedMatrix qm = RandomWeights(QuantSpec{QuantFormat::kInt4PerChannel, 0}, n, k, rng);
  const Packed p = Pack(qm);
  ASSERT_EQ(Int4PanelStride(k), 128u);
  for (size_t row = 0; row < 32; ++row) {
    for (size_t kk = 0; kk < 16; ++kk) {
      int u = 0;  // padding (rows >= n, k >= K) packs as u = 0
      if (row < n && kk < k) {
        const uint8_t nib = (qm.data[row * 7 + kk / 2] >> (4 * (kk & 1))) & 0xF;
        const int q = nib >= 8 ? nib - 16 : nib;
        u = q + 8;
      }
      const uint8_t byte = p.panels[(row / 16) * 128 + (kk / 8) * 64 + 4 * (row % 16) + kk % 4];
      ASSERT_EQ((byte >> (4 * ((kk % 8) / 4))) & 0xF, u) << row << "," << kk;
    }
  }
}

TEST(PackInt4, RejectsWrongOrMalformedInput) {
  std::mt19937 rng(5);
  std::vector<bf16_t> w(16 * 64, F32ToBf16(0.5f));
  const auto q8 = Quantize(QuantSpec{QuantFormat::kInt8PerChannel, 0}, w.data(), 64, 16, 64);
  ASSERT_TRUE(q8.ok());
  std::vector<uint8_t> panels(PackedInt4Bytes(16, 64)), zeros(64);
  std::vector<float> scales(64);
  absl::Status s = PackInt4(*q8, panels.data(), scales.data(), zeros.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find("int8_channel"), std::string::npos) << s;
  QuantizedMatrix bad = RandomWeights(QuantSpec{QuantFormat::kInt4GroupAsym, 32}, 16, 64, rng);
  bad.zeros.pop_back();
  s = PackInt4(bad, panels.data(), scales.data(), zeros.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find("zeros"), std::string::npos) << s;
  const QuantizedMatrix asym = RandomWeights(QuantSpec{QuantFormat::kInt4GroupAsym, 32}, 16, 64, rng);
  s = PackInt4(asym, panels.data(), scales.data(), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST(GetGemmInt4, TableSelectsEveryIsa) {
  gemm_test::ExpectTableSelects(GemmInt4Paths(), &GetGemmInt4,
                                {"scalar", "hwy_avx2", "hwy_avx512", "hwy_avx512_vnni", "vnni", "amx"},
                                {"scalar", "hwy_avx2", "hwy_avx512", "vnni", "vnni", "amx"});
}

class GemmInt4Test : public gemm_test::KernelPathTest<GemmInt4Fn> {
 protected:
  // Runs one product and checks every element against the reference and the scalar path. Returns the
  // worst |y - ref| / max|ref|.
  //
  // Tolerance, per element: the integer part is exact; each group's term t_g rounds three times
  // (sx * sw, float(dot) -- exact below 2^24 --, the product), the sum over groups adds groups - 1
  // roundings of partial sums, the reference's dequantized weights round once per element and its result
  // once: all bounded by 2^-24 of S = sum_k |sx qx deq|. (groups + 8) * 2^-24 * S covers them with margin.
  double Run(const QuantizedMatrix& qm, size_t m, const std::vector<int8_t>& qx_buf, size_t x_offset,
             size_t ldqx, const std::vector<float>& sx) {
    const size_t n = qm.n, k = qm.k, group = Int4KernelGroup(qm.spec), groups = Int4Groups(k, group);
    const int8_t* qx = qx_buf.data() + x_offset;
    const Packed p = Pack(qm);
    std::vector<int32_t> xsum(m * groups);
    Int4ActivationSums(m, k, group, qx, ldqx, xsum.data());
    gemm_test::GuardedOutput y(m, n);
    std::vector<float> ys(m * n), ref(m * n);
    GemmInt4Reference(m, qx, ldqx, sx.data(), qm, ref.data(), n);
    internal::GemmInt4Scalar(m, k, group, qx, ldqx, sx.data(), xsum.data(), p.panels.data(), p.scales.data(),
                             p.zeros_or_null(), n, ys.data(), n);
    fn_(m, k, group, qx, ldqx, sx.data(), xsum.data(), p.panels.data(), p.scales.data(), p.zeros_or_null(), n,
        y.data(), y.ld());
    std::vector<float> deq(n * k);
    Dequantize(qm, deq.data(), k);
    const size_t len = group == 0 ? k : group;
    double max_ref = 0, worst = 0;
    for (float r : ref) max_ref = std::max(max_ref, std::fabs(static_cast<double>(r)));
    for (size_t i = 0; i < m; ++i) {
      for (size_t j = 0; j < n; ++j) {
        double s = 0;
        for (size_t kk = 0; kk < k; ++kk) {
          s += std::fabs(static_cast<double>(sx[i * groups + kk / len]) * qx[i * ldqx + kk] * deq[j * k + kk]);
        }
        const float got = y.at(i, j);
        const double want = ref[i * n + j];
        const double err = std::fabs(static_cast<double>(got) - want);
        EXPECT_LE(err, (groups + 8) * std::ldexp(s, -24) + 1e-30)
            << QuantLayoutTag(qm.spec) << " m=" << m << " n=" << n << " k=" << k << " at (" << i << "," << j
            << ") got " << got << " want " << want;
        EXPECT_EQ(got, ys[i * n + j]) << "differs from the scalar path at (" << i << "," << j << ")";
        if (max_ref > 0) worst = std::max(worst, err / max_ref);
      }
      y.ExpectRowPaddingUntouched(i);
    }
    y.ExpectNothingBefore();
    // The brief's acceptance bound, implied by the one above; checked explicitly.
    EXPECT_LE(worst, 1e-3);
    return worst;
  }

  double Check(const QuantSpec& spec, size_t m, size_t n, size_t k, size_t x_offset, std::mt19937& rng) {
    const QuantizedMatrix qm = RandomWeights(spec, n, k, rng);
    const size_t ldqx = k + 3, groups = ScalesPerRow(spec, k);
    std::uniform_int_distribution<int> qd(-127, 127);
    std::uniform_real_distribution<float> sd(1e-3f, 2e-2f);
    std::vector<int8_t> qx(m * ldqx + x_offset);
    for (auto& e : qx) e = static_cast<int8_t>(qd(rng));
    std::vector<float> sx(m * groups);
    for (auto& e : sx) e = sd(rng);
    return Run(qm, m, qx, x_offset, ldqx, sx);
  }
};

TEST_P(GemmInt4Test, ShapeSweepMatchesReference) {
  std::mt19937 rng(11);
  for (const QuantSpec& spec : kSpecs) {
    std::vector<size_t> ks;
    if (spec.group_size == 0) {
      ks = {3, 8, 12, 67, 128, 200};
    } else {
      ks = {size_t(spec.group_size), size_t(3 * spec.group_size)};
    }
    const double worst = gemm_test::SweepShapes(
        {1, 17, 50}, ks,
        [&](size_t m, size_t n, size_t k, size_t x_offset) { return Check(spec, m, n, k, x_offset, rng); });
    if (HasFailure()) return;
    std::printf("[%s] %s: worst |y - ref| / max|ref| = %.3g\n", GetParam().name.c_str(),
                QuantLayoutTag(spec).c_str(), worst);
  }
}

TEST_P(GemmInt4Test, ExpertShapes) {
  // Realistic projections at decode and prefill row counts, K over several AMX chunks and groups.
  std::mt19937 rng(5);
  for (const QuantSpec& spec : kSpecs) {
    for (size_t m : {1, 4, 16, 37}) {
      Check(spec, m, 96, 512, 1, rng);
      Check(spec, m, 160, 256, 0, rng);
    }
    if (spec.group_size == 0) Check(spec, 45, 150, 547, 1, rng);
  }
}

TEST_P(GemmInt4Test, ExtremeValues) {
  // Nibbles at both ends (u = 0 and 15, zero points 0 and 15) with activations at +-127: the largest
  // group sums and the largest z * xsum corrections.
  std::mt19937 rng(7);
  for (const QuantSpec& spec : {kSpecs[0], kSpecs[3], kSpecs[4], kSpecs[6], kSpecs[7]}) {
    for (size_t m : {1, 9, 33}) {
      const size_t n = 33, k = 256;
      for (int pattern = 0; pattern < 3; ++pattern) {
        QuantizedMatrix qm = RandomWeights(spec, n, k, rng);
        for (size_t i = 0; i < qm.data.size(); ++i) {
          const bool asym = IsAsymFormat(spec.format);
          // sym: q = +7 (0x7) or -7 (0x9); asym: u = 15 or 0
          const uint8_t hi = asym ? 0xF : 0x7, lo = asym ? 0x0 : 0x9;
          uint8_t a = pattern == 0 ? hi : pattern == 1 ? lo : ((rng() & 1) ? hi : lo);
          uint8_t b = pattern == 0 ? hi : pattern == 1 ? lo : ((rng() & 1) ? hi : lo);
          qm.data[i] = static_cast<uint8_t>(a | b << 4);
        }
        for (auto& z : qm.zeros) z = (rng() & 1) ? 15 : 0;
        std::vector<int8_t> qx(m * k);
        for (auto& e : qx) e = pattern == 2 ? ((rng() & 1) ? 127 : -127) : 127;
        std::vector<float> sx(m * ScalesPerRow(spec, k), 0.01f);
        Run(qm, m, qx, 0, k, sx);
        if (HasFailure()) return;
      }
    }
  }
}

TEST_P(GemmInt4Test, ColumnRangeThroughPanelOffset) {
  // The MoE layer splits N across threads by offsetting panels, scales and zeros by whole panels.
  std::mt19937 rng(9);
  for (const QuantSpec& spec : {kSpecs[0], kSpecs[1], kSpecs[6], kSpecs[7]}) {
    const size_t m = 9, n = 70, k = 256, group = Int4KernelGroup(spec), groups = Int4Groups(k, group);
    const QuantizedMatrix qm = RandomWeights(spec, n, k, rng);
    const Packed p = Pack(qm);
    std::vector<int8_t> qx(m * k);
    for (auto& e : qx) e = static_cast<int8_t>(static_cast<int>(rng() % 255) - 127);
    std::vector<float> sx(m * groups, 0.01f);
    std::vector<int32_t> xsum(m * groups);
    Int4ActivationSums(m, k, group, qx.data(), k, xsum.data());
    std::vector<float> full(m * n), parts(m * n);
    fn_(m, k, group, qx.data(), k, sx.data(), xsum.data(), p.panels.data(), p.scales.data(), p.zeros_or_null(),
        n, full.data(), n);
    for (size_t pn = 0; pn < Int4NumPanels(n); ++pn) {
      const size_t c0 = pn * kInt4PanelRows, e0 = c0 * groups;
      fn_(m, k, group, qx.data(), k, sx.data(), xsum.data(), p.panels.data() + pn * Int4PanelStride(k),
          p.scales.data() + e0, p.zeros.empty() ? nullptr : p.zeros.data() + e0,
          std::min(kInt4PanelRows, n - c0), parts.data() + c0, n);
    }
    for (size_t i = 0; i < m * n; ++i) ASSERT_EQ(full[i], parts[i]) << i;
  }
}

TEST_P(GemmInt4Test, EndToEndFromBf16) {
  // bf16 x and W -> activations per token (per token and group for the group formats), weights by
  // quant.h -> kernel, against the exact product of the bf16 values: the format's error, not the kernel's.
  std::mt19937 rng(12);
  std::normal_distribution<float> dist;
  const size_t m = 17, n = 64, k = 1024;
  std::vector<bf16_t> x(m * k), w(n * k);
  for (auto& e : x) e = F32ToBf16(dist(rng));
  for (auto& e : w) e = F32ToBf16(dist(rng));
  for (const QuantSpec& spec : kSpecs) {
    const size_t group = Int4KernelGroup(spec), groups = Int4Groups(k, group);
    std::vector<int8_t> qx(m * k);
    std::vector<float> sx(m * groups);
    for (size_t i = 0; i < m; ++i) {
      if (group == 0) {
        QuantizeActivationInt8(x.data() + i * k, k, qx.data() + i * k, &sx[i]);
      } else {
        ASSERT_TRUE(QuantizeActivationInt8Grouped(x.data() + i * k, k, group, qx.data() + i * k,
                                                  sx.data() + i * groups).ok());
      }
    }
    std::vector<int32_t> xsum(m * groups);
    Int4ActivationSums(m, k, group, qx.data(), k, xsum.data());
    const auto qm = Quantize(spec, w.data(), k, n, k);
    ASSERT_TRUE(qm.ok()) << qm.status();
    const Packed p = Pack(*qm);
    std::vector<float> y(m * n);
    fn_(m, k, group, qx.data(), k, sx.data(), xsum.data(), p.panels.data(), p.scales.data(), p.zeros_or_null(),
        n, y.data(), n);
    const double rel = gemm_test::MeanRelErrorVsBf16Product(m, n, k, x, w, y);
    std::printf("[%s] %s end to end: mean |y - exact| / mean |exact| = %.4f (M=%zu N=%zu K=%zu)\n",
                GetParam().name.c_str(), QuantLayoutTag(spec).c_str(), rel, m, n, k);
    // The weight error alone is 0.09-0.17 of mean|W| (docs/FORMATS.md); errors of independent weights
    // average out in the dot product, so the output's relative error is of the same order. 0.25 fails a
    // kernel that drops a group, a zero point or a scale.
    EXPECT_LT(rel, 0.25) << QuantLayoutTag(spec);
  }
}

TEST_P(GemmInt4Test, SymNibbleMinus8) {
  // kt's quantizer keeps the symmetric grid in [-7, 7], but the native int4 checkpoints (RAWINT4: compressed-
  // tensors pack-quantized, GPTQ_INT4) use all of [-8, 7], held as they are (kt/io/hf_int4.h): the packed
  // u = q + 8 is then 0. Every nibble at random, and all -8 with activations at +-127 (the largest
  // z * xsum correction), on every path.
  std::mt19937 rng(13);
  for (const QuantSpec& spec : {kSpecs[1], kSpecs[3]}) {
    for (size_t m : {1, 9, 33}) {
      const size_t n = 33, k = 256;
      for (int pattern = 0; pattern < 2; ++pattern) {
        QuantizedMatrix qm = RandomWeights(spec, n, k, rng);
        for (uint8_t& b : qm.data) b = pattern == 0 ? static_cast<uint8_t>(rng()) : 0x88;
        std::vector<int8_t> qx(m * k);
        for (auto& e : qx) e = pattern == 0 ? static_cast<int8_t>(static_cast<int>(rng() % 255) - 127)
                                            : ((rng() & 1) ? 127 : -127);
        std::vector<float> sx(m * ScalesPerRow(spec, k), 0.01f);
        Run(qm, m, qx, 0, k, sx);
        if (HasFailure()) return;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllPaths, GemmInt4Test,
                         ::testing::ValuesIn(gemm_test::TablePaths(GemmInt4Paths())), gemm_test::PathName());

}  // namespace
}  // namespace kt
