// TpMoeLayer (tensor parallelism along the intermediate dimension) against the TP = 1 layer: bf16 within
// the fp32 reduce order (each output at most one bf16 rounding step apart), the quantized formats within
// their quantization error (their scales are per part: a part quantizes its own slice, as the original's
// NUMA parts do); the fp32 and add outputs; bad tp and pools.
#include "kt/moe/tp_layer.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
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

std::vector<float> RunLayer(ExpertFormat format, int tp, const Data& d, int qlen, std::vector<ThreadPool*> pools) {
  MoeConfig c{kE, kK, kH, kI, kMaxLen};
  c.group_size = 32;
  const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
  auto layer = TpMoeLayer::Create(c, isa, format, tp).value();
  EXPECT_TRUE(layer->LoadWeights(d.gate.data(), d.up.data(), d.down.data(), nullptr, pools).ok());
  std::vector<bf16_t> out(size_t(qlen) * kH);
  MoeLayer::Output o;
  o.bf16 = out.data();
  absl::Status s = layer->Forward(pools, qlen, kK, d.ids.data(), d.weights.data(), d.input.data(), o, nullptr);
  EXPECT_TRUE(s.ok()) << s;
  std::vector<float> f(out.size());
  for (size_t i = 0; i < out.size(); ++i) f[i] = Bf16ToF32(out[i]);
  return f;
}

class TpMoeLayerTest : public ::testing::TestWithParam<ExpertFormat> {};

TEST_P(TpMoeLayerTest, PartsSumToTheWholeLayer) {
  const ExpertFormat format = GetParam();
  constexpr int kQlen = 19;
  Data d(kQlen);
  ThreadPool p0(1), p1(1), p2(1), p3(1);
  const std::vector<float> whole = RunLayer(format, 1, d, kQlen, {&p0});
  double max_ref = 0;
  for (float v : whole) max_ref = std::max(max_ref, std::abs(double(v)));
  ASSERT_GT(max_ref, 0.0);
  for (int tp : {2, 4}) {
    std::vector<ThreadPool*> pools = {&p0, &p1, &p2, &p3};
    pools.resize(tp);
    const std::vector<float> parts = RunLayer(format, tp, d, kQlen, pools);
    for (size_t i = 0; i < whole.size(); ++i) {
      if (format == ExpertFormat::kBf16) {
        // Same products, fp32 sums in another order, one rounding: at most one bf16 step (2^-7 relative,
        // as the sums may straddle a rounding boundary) apart, plus fp32 noise near zero.
        ASSERT_NEAR(parts[i], whole[i], std::abs(whole[i]) * 0x1p-7 + 1e-6 * max_ref) << "tp=" << tp << " at " << i;
      } else {
        // Per-part quantization scales: within the formats' quantization error of the whole layer.
        ASSERT_NEAR(parts[i], whole[i], 4e-2 * max_ref) << "tp=" << tp << " at " << i;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, TpMoeLayerTest,
                         ::testing::Values(ExpertFormat::kBf16, ExpertFormat::kInt8, ExpertFormat::kInt4GroupSym),
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

}  // namespace
}  // namespace kt
