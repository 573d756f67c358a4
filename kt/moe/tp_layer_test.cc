// TpMoeLayer (tensor parallelism along the intermediate dimension) against the TP = 1 layer: every format
// within the fp32 reduce order (each output at most one bf16 rounding step apart): the parts hold the whole
// layer's codes and scales, and h is quantized per group or, for the per-row formats, against the whole
// row's max exchanged between the parts (HScaleShare), also with pools of different sizes and a mask; the
// parts' weights are the whole layer's, cut; their memory is on their NUMA node and node pools run them; bad
// tp and pools.
#include "kt/moe/tp_layer.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/numa.h"
#include "kt/runtime/thread_pool.h"

namespace kt {
namespace {

constexpr int kE = 6, kK = 2, kH = 64, kI = 128, kMaxLen = 24;

struct Data {
  std::vector<bf16_t> gate, up, down, input;
  std::vector<int64_t> ids;
  std::vector<float> weights;
  explicit Data(int qlen) {
    std::mt19937 rng(11);
    std::normal_distribution<float> n(0.0f, 1.0f);
    auto fill = [&](std::vector<bf16_t>& v, size_t count, float scale) {
      v.resize(count);
      for (auto& x : v) x = F32ToBf16(n(rng) * scale);
    };
    fill(gate, size_t{kE} * kI * kH, 1.0f / 8);
    fill(up, size_t{kE} * kI * kH, 1.0f / 8);
    fill(down, size_t{kE} * kH * kI, 1.0f / 11);
    fill(input, size_t(qlen) * kH, 1.0f);
    std::uniform_int_distribution<int> pick(-1, kE - 1);  // -1: skipped slots too
    std::uniform_real_distribution<float> w(0.1f, 1.0f);
    for (int i = 0; i < qlen * kK; ++i) {
      ids.push_back(pick(rng));
      weights.push_back(w(rng));
    }
  }
};

std::vector<float> RunLayer(ExpertFormat format, int tp, const Data& d, int qlen, std::vector<ThreadPool*> pools,
                            const bool* mask = nullptr) {
  MoeConfig c{kE, kK, kH, kI, kMaxLen};
  c.group_size = 32;
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  auto layer = TpMoeLayer::Create(c, isa, format, tp).value();
  EXPECT_TRUE(layer->LoadWeights(d.gate.data(), d.up.data(), d.down.data(), nullptr, pools).ok());
  std::vector<bf16_t> out(size_t(qlen) * kH);
  MoeLayer::Output o;
  o.bf16 = out.data();
  absl::Status s = layer->Forward(pools, qlen, kK, d.ids.data(), d.weights.data(), d.input.data(), o, mask);
  EXPECT_TRUE(s.ok()) << s;
  std::vector<float> f(out.size());
  for (size_t i = 0; i < out.size(); ++i) f[i] = Bf16ToF32(out[i]);
  return f;
}

class TpMoeLayerTest : public ::testing::TestWithParam<ExpertFormat> {};

TEST_P(TpMoeLayerTest, PartsSumToTheWholeLayer) {
  const ExpertFormat format = GetParam();
  // Pools of 1..3 threads: the parts' h-prepare blocks then differ, and must still meet on the shared rows.
  ThreadPool p0(1), p1(2), p2(3), p3(1);
  bool mask[kE] = {false, true, false, false, true, false};
  for (int qlen : {1, 19, kMaxLen}) {
    for (const bool* m : {static_cast<const bool*>(nullptr), static_cast<const bool*>(mask)}) {
      Data d(qlen);
      const std::vector<float> whole = RunLayer(format, 1, d, qlen, {&p0}, m);
      double max_ref = 0;
      for (float v : whole) max_ref = std::max(max_ref, std::abs(double(v)));
      if (qlen > 1) {
        ASSERT_GT(max_ref, 0.0);
      }
      for (int tp : {2, 4}) {
        std::vector<ThreadPool*> pools = {&p0, &p1, &p2, &p3};
        pools.resize(tp);
        const std::vector<float> parts = RunLayer(format, tp, d, qlen, pools, m);
        for (size_t i = 0; i < whole.size(); ++i) {
          // Same products (int formats: the parts' h codes and scales are slices of the whole layer's), fp32
          // sums in another order, one rounding: at most one bf16 step (2^-7 relative, as the sums may
          // straddle a rounding boundary) apart, plus fp32 noise near zero.
          ASSERT_NEAR(parts[i], whole[i], std::abs(whole[i]) * 0x1p-7 + 1e-6 * max_ref)
              << "tp=" << tp << " qlen=" << qlen << " mask=" << (m != nullptr) << " at " << i;
        }
      }
    }
  }
}

// The check has teeth: without the shared h scales (each part quantizing its h slice against the slice's own
// max, as before HScaleShare), the per-row int8 format misses the bound above.
TEST(TpMoeLayerTest, WithoutSharedScalesPerRowInt8Differs) {
  constexpr int kQlen = 19;
  Data d(kQlen);
  ThreadPool p0(1), p1(1);
  const std::vector<float> whole = RunLayer(ExpertFormat::kInt8, 1, d, kQlen, {&p0});
  MoeConfig c{kE, kK, kH, kI, kMaxLen};
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  auto layer = TpMoeLayer::Create(c, isa, ExpertFormat::kInt8, 2).value();
  ASSERT_TRUE(layer->LoadWeights(d.gate.data(), d.up.data(), d.down.data(), nullptr, {&p0, &p1}).ok());
  for (int p = 0; p < 2; ++p) layer->part(p).set_h_share(nullptr);
  std::vector<bf16_t> out(size_t(kQlen) * kH);
  MoeLayer::Output o;
  o.bf16 = out.data();
  ASSERT_TRUE(layer->Forward({&p0, &p1}, kQlen, kK, d.ids.data(), d.weights.data(), d.input.data(), o, nullptr).ok());
  double max_ref = 0;
  size_t outside = 0;
  for (float v : whole) max_ref = std::max(max_ref, std::abs(double(v)));
  for (size_t i = 0; i < out.size(); ++i) {
    const float v = Bf16ToF32(out[i]);
    outside += std::abs(v - whole[i]) > std::abs(whole[i]) * 0x1p-7 + 1e-6 * max_ref;
  }
  EXPECT_GT(outside, out.size() / 4);
}

INSTANTIATE_TEST_SUITE_P(Formats, TpMoeLayerTest,
                         ::testing::Values(ExpertFormat::kBf16, ExpertFormat::kInt8, ExpertFormat::kInt4,
                                           ExpertFormat::kInt4Asym, ExpertFormat::kInt4GroupSym,
                                           ExpertFormat::kInt4GroupAsym),
                         [](const auto& info) { return std::string(ExpertFormatName(info.param)); });

TEST(TpMoeLayerErrorsTest, TpMustDivideTheIntermediateSizeAndPoolsMatch) {
  MoeConfig c{kE, kK, kH, kI, kMaxLen};
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  absl::Status s = TpMoeLayer::Create(c, isa, ExpertFormat::kBf16, 3).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("threadpool_count"), absl::string_view::npos) << s;
  c.group_size = 128;  // I / 2 = 64 is not a multiple of 128
  s = TpMoeLayer::Create(c, isa, ExpertFormat::kInt4GroupSym, 2).status();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("tp = 2"), absl::string_view::npos) << s;
  auto layer = TpMoeLayer::Create(MoeConfig{kE, kK, kH, kI, kMaxLen}, isa, ExpertFormat::kBf16, 2).value();
  ThreadPool pool(1);
  Data d(1);
  s = layer->LoadWeights(d.gate.data(), d.up.data(), d.down.data(), nullptr, {&pool});
  EXPECT_NE(s.message().find("one thread pool per part"), absl::string_view::npos) << s;
}

// The parts hold the whole layer's quantized weights, cut: every part's unpacked slice equals the slice of the
// TP = 1 layer's unpacked weights bit for bit (down rows keep their whole-row scale).
TEST(TpMoeLayerTest, PartsHoldTheWholeLayersQuantizedWeights) {
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  Data d(1);
  ThreadPool pool(1);
  for (ExpertFormat format : {ExpertFormat::kInt8, ExpertFormat::kInt4, ExpertFormat::kInt4GroupAsym}) {
    MoeConfig c{kE, kK, kH, kI, kMaxLen};
    c.group_size = 32;
    auto whole = TpMoeLayer::Create(c, isa, format, 1).value();
    auto split = TpMoeLayer::Create(c, isa, format, 4).value();
    ASSERT_TRUE(whole->LoadWeights(d.gate.data(), d.up.data(), d.down.data(), nullptr, {&pool}).ok());
    ASSERT_TRUE(split->LoadWeights(d.gate.data(), d.up.data(), d.down.data(), nullptr, {&pool, &pool, &pool, &pool})
                    .ok());
    const size_t ip = kI / 4;
    std::vector<bf16_t> w(kI * kH), part(ip * kH);
    for (int e = 0; e < kE; ++e) {
      for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kDown}) {
        ASSERT_TRUE(whole->part(0).experts().UnpackExpert(e, proj, w.data()).ok());
        for (int p = 0; p < 4; ++p) {
          ASSERT_TRUE(split->part(p).experts().UnpackExpert(e, proj, part.data()).ok());
          for (size_t i = 0; i < part.size(); ++i) {
            // gate [I, H]: rows p ip..; down [H, I]: columns p ip..
            const size_t at = proj == ExpertProj::kDown ? (i / ip) * kI + p * ip + i % ip : p * ip * kH + i;
            ASSERT_EQ(part[i].bits, w[at].bits) << ExpertFormatName(format) << " expert " << e << " part " << p;
          }
        }
      }
    }
  }
}

// Parts placed on NUMA nodes (node 0 here, the one node of these machines): their packed weights are on it,
// and node pools (workers pinned to the node's CPUs) run them to the TP = 1 result.
TEST(TpMoeLayerTest, PartsOnNodePools) {
  if (!NumaAvailable()) GTEST_SKIP() << "NUMA not available";
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  constexpr int kQlen = 7;
  Data d(kQlen);
  MoeConfig c{kE, kK, kH, kI, kMaxLen};
  NodePools pools = CreateNodePools(2, 2, {0, 0}).value();
  auto layer = TpMoeLayer::Create(c, isa, ExpertFormat::kBf16, 2, pools.nodes).value();
  ASSERT_TRUE(layer->LoadWeights(d.gate.data(), d.up.data(), d.down.data(), nullptr, pools.raw()).ok());
  for (int p = 0; p < 2; ++p) {
    for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
      EXPECT_EQ(NodeOfAddress(layer->part(p).experts().data(proj)).value(), 0) << "part " << p;
    }
  }
  std::vector<bf16_t> out(kQlen * kH);
  MoeLayer::Output o;
  o.bf16 = out.data();
  const std::vector<int> before = CurrentThreadCpus();
  ASSERT_TRUE(layer->Forward(pools.raw(), kQlen, kK, d.ids.data(), d.weights.data(), d.input.data(), o, nullptr).ok());
  EXPECT_EQ(CurrentThreadCpus(), before);  // the caller drove part 0 pinned, and got its mask back
  ThreadPool one(1);
  const std::vector<float> whole = RunLayer(ExpertFormat::kBf16, 1, d, kQlen, {&one});
  for (size_t i = 0; i < out.size(); ++i) {
    ASSERT_NEAR(Bf16ToF32(out[i]), whole[i], std::abs(whole[i]) * 0x1p-7 + 1e-5) << i;
  }
}

// Streaming loads of matrices already quantized (a converted folder; FP8 codes with their block scales, as
// LoadFp8Experts hands them over): the cut parts compute the TP = 1 result within the fp32 reduce order.
TEST(TpMoeLayerTest, QuantizedStreamingLoadsCutForTheParts) {
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  constexpr int kQlen = 5, kWideI = 256;  // FP8 parts must be multiples of 128 columns
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.0f, 0.1f);
  std::vector<bf16_t> w(size_t{kWideI} * kH), input(size_t{kQlen} * kH);
  for (auto& x : input) x = F32ToBf16(n(rng) * 10);
  std::vector<int64_t> ids;
  std::vector<float> weights;
  for (int i = 0; i < kQlen * kK; ++i) {
    ids.push_back(i % kE);
    weights.push_back(0.5f);
  }
  // MXFP4: nibble pairs and E8M0 scales per 32 columns, cut at the parts' 128-column boundary.
  for (ExpertFormat format : {ExpertFormat::kFp8Block, ExpertFormat::kInt4GroupAsym, ExpertFormat::kMxfp4}) {
    MoeConfig c{kE, kK, kH, kWideI, kMaxLen};
    c.group_size = 32;
    ThreadPool pool(1);
    std::vector<std::vector<float>> outs;
    for (int tp : {1, 2}) {
      auto layer = TpMoeLayer::Create(c, isa, format, tp).value();
      const QuantSpec spec = layer->quant_spec().value();
      std::mt19937 wrng(9);  // the same weights for both layers
      layer->BeginLoad();
      for (int e = 0; e < kE; ++e) {
        for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
          const size_t rows = proj == ExpertProj::kDown ? kH : kWideI, cols = proj == ExpertProj::kDown ? kWideI : kH;
          for (size_t i = 0; i < rows * cols; ++i) w[i] = F32ToBf16(n(wrng));
          QuantizedMatrix qm = Quantize(spec, w.data(), cols, rows, cols).value();
          ASSERT_TRUE(layer->LoadExpertQuantized(e, proj, qm).ok());
        }
      }
      ASSERT_TRUE(layer->FinishLoad().ok());
      std::vector<bf16_t> out(size_t{kQlen} * kH);
      MoeLayer::Output o;
      o.bf16 = out.data();
      std::vector<ThreadPool*> pools(tp, &pool);
      ASSERT_TRUE(layer->Forward(pools, kQlen, kK, ids.data(), weights.data(), input.data(), o, nullptr).ok());
      outs.emplace_back();
      for (bf16_t v : out) outs.back().push_back(Bf16ToF32(v));
    }
    float max_ref = 0;
    for (float v : outs[0]) max_ref = std::max(max_ref, std::abs(v));
    ASSERT_GT(max_ref, 0.0f);
    for (size_t i = 0; i < outs[0].size(); ++i) {
      ASSERT_NEAR(outs[1][i], outs[0][i], std::abs(outs[0][i]) * 0x1p-7 + 1e-5 * max_ref)
          << ExpertFormatName(format) << " at " << i;
    }
  }
}

TEST(TpMoeLayerErrorsTest, NodesPerPartAndQuantizedCuts) {
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  MoeConfig c{kE, kK, kH, kI, kMaxLen};
  absl::Status s = TpMoeLayer::Create(c, isa, ExpertFormat::kBf16, 2, {0}).status();
  EXPECT_NE(s.message().find("numa_nodes"), absl::string_view::npos) << s;
  s = TpMoeLayer::Create(c, isa, ExpertFormat::kBf16, 2, {0, 1000}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  QuantizedMatrix qm;
  qm.spec = QuantSpec{QuantFormat::kInt4GroupSym, 32};
  qm.n = 2;
  qm.k = 64;
  qm.data.assign(2 * 32, 0);
  qm.scales.assign(2 * 2, 1.0f);
  QuantizedMatrix cut;
  EXPECT_TRUE(SliceQuantized(qm, 0, 2, 32, 32, &cut).ok());
  EXPECT_EQ(cut.scales.size(), 2u);
  s = SliceQuantized(qm, 0, 2, 16, 16, &cut);
  EXPECT_NE(s.message().find("scale boundary"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace kt
