// Shared fixtures of the MoeLayer tests (moe_layer_test, moe_layer_load_test, packed_experts_test): random
// layers and batches, and a test class parameterized over (kernel path, expert format) that skips paths the
// CPU lacks and compares a forward with MoeForwardReference.
#ifndef KT_MOE_MOE_LAYER_TEST_UTIL_H_
#define KT_MOE_MOE_LAYER_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/moe_reference.h"

namespace kt {
namespace moe_test {

struct Layer {
  MoeConfig config;
  std::vector<bf16_t> gate, up, down;
};

inline Layer MakeLayer(int e, int k, int h, int i, int max_len, uint32_t seed) {
  Layer l;
  l.config = MoeConfig{e, k, h, i, max_len};
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  auto fill = [&](std::vector<bf16_t>& v, size_t count, float scale) {
    v.resize(count);
    for (auto& x : v) x = F32ToBf16(n(rng) * scale);
  };
  fill(l.gate, static_cast<size_t>(e) * i * h, 1.0f / std::sqrt(static_cast<float>(h)));
  fill(l.up, static_cast<size_t>(e) * i * h, 1.0f / std::sqrt(static_cast<float>(h)));
  fill(l.down, static_cast<size_t>(e) * h * i, 1.0f / std::sqrt(static_cast<float>(i)));
  return l;
}

struct Batch {
  int qlen, k;
  std::vector<int64_t> ids;
  std::vector<float> weights;
  std::vector<bf16_t> input;
};

inline Batch RandomBatch(const MoeConfig& c, int qlen, std::mt19937& rng) {
  Batch b{qlen, c.top_k, {}, {}, {}};
  std::uniform_int_distribution<int> pick(0, c.num_experts - 1);
  std::uniform_real_distribution<float> w(0.05f, 1.0f);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (int t = 0; t < qlen; ++t) {
    for (int j = 0; j < c.top_k; ++j) {
      b.ids.push_back(pick(rng));
      b.weights.push_back(w(rng));
    }
  }
  for (int t = 0; t < qlen * c.hidden; ++t) b.input.push_back(F32ToBf16(n(rng)));
  return b;
}

class MoeLayerTest : public ::testing::TestWithParam<std::tuple<Isa, ExpertFormat>> {
 public:
  static Isa isa() { return std::get<0>(GetParam()); }
  static ExpertFormat format() { return std::get<1>(GetParam()); }
  // The group formats run with G = 32 (sym) and 64 (asym); their H and I are rounded up to a multiple of G.
  static int Group() {
    return format() == ExpertFormat::kInt4GroupSym ? 32 : format() == ExpertFormat::kInt4GroupAsym ? 64 : 0;
  }
  // The MX formats' scales cover 32 k: their H and I are rounded up to a multiple of 32.
  static int Align() {
    return format() == ExpertFormat::kMxfp4 || format() == ExpertFormat::kMxfp8 ? 32 : Group();
  }
  static int Dim(int x) { return Align() == 0 ? x : (x + Align() - 1) / Align() * Align(); }
  static MoeConfig Config(int e, int k, int h, int i, int max_len) {
    MoeConfig c{e, k, Dim(h), Dim(i), max_len};
    if (Group() != 0) c.group_size = Group();
    return c;
  }
  static Layer Make(int e, int k, int h, int i, int max_len, uint32_t seed) {
    Layer l = MakeLayer(e, k, Dim(h), Dim(i), max_len, seed);
    l.config = Config(e, k, h, i, max_len);
    return l;
  }

 protected:
  void SetUp() override {
    if (!IsaSupported(isa(), GetCpuFeatures())) {
      GTEST_SKIP() << IsaName(isa()) << " is not supported by this CPU ("
                   << GetCpuFeatures().ToString() << "); it is tested on a machine that has it.";
    }
  }

  std::unique_ptr<MoeLayer> Build(const Layer& l, ThreadPool& pool, const int64_t* map = nullptr) {
    absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(l.config, isa(), format());
    EXPECT_TRUE(moe.ok()) << moe.status();
    EXPECT_TRUE((*moe)->LoadWeights(l.gate.data(), l.up.data(), l.down.data(), map, pool).ok());
    return std::move(*moe);
  }

  // Checks out (bf16) against the reference: each element within its own bf16 rounding (2^-8 relative)
  // plus 2e-3 of the largest magnitude, which covers fp32 accumulation order and the rare bf16 rounding
  // flip of an intermediate h element. Returns max|err| / max|ref|.
  double Compare(const Layer& l, const Batch& b, const std::vector<bf16_t>& out,
                 const bool* mask = nullptr) {
    const size_t h = l.config.hidden;
    std::vector<float> ref(static_cast<size_t>(b.qlen) * h);
    MoeForwardReference(l.config, b.qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(),
                        l.gate.data(), l.up.data(), l.down.data(), mask, ref.data(), format());
    double max_ref = 0, max_err = 0;
    for (float r : ref) max_ref = std::max(max_ref, std::fabs(static_cast<double>(r)));
    for (size_t i = 0; i < ref.size(); ++i) {
      const double err = std::fabs(Bf16ToF32(out[i]) - static_cast<double>(ref[i]));
      max_err = std::max(max_err, err);
      // Quantized formats: a flipped bf16 rounding of an h element can also move its int8 quantization
      // (or its row's scale) by one step, so twice the bf16 allowance and 3e-3 of max|ref|.
      const bool quantized = format() != ExpertFormat::kBf16;
      // FP8 on AMX: experts with >= kAmxMinRows rows multiply bf16(fp8 * scale) (gemm_fp8.h), a bf16 rounding
      // of every weight (up to 2^-8 relative) on top of h's. A float64 simulation of this test's layers and
      // batches (exact FP8 weights against bf16-rounded ones, 20 layers x qlen 1..33) gave errors up to
      // 1.03e-2 of max|ref|: 1.5e-2.
      const bool bf16_weights = isa() == Isa::kAmx && format() == ExpertFormat::kFp8Block;
      EXPECT_LE(err, std::ldexp(std::fabs(ref[i]), quantized ? -7 : -8) +
                         (bf16_weights ? 1.5e-2 : quantized ? 3e-3 : 2e-3) * max_ref)
          << "element " << i << " token " << i / h << ": got " << Bf16ToF32(out[i]) << " want "
          << ref[i];
      if (HasFailure()) break;
    }
    return max_ref > 0 ? max_err / max_ref : max_err;
  }
};

// Instantiates `suite` (a TEST_P suite on MoeLayerTest or a subclass) on every path and format.
#define KT_INSTANTIATE_ALL_PATHS_AND_FORMATS(suite)                                                          \
  INSTANTIATE_TEST_SUITE_P(                                                                                 \
      AllPaths, suite,                                                                                      \
      ::testing::Combine(::testing::Values(::kt::Isa::kScalar, ::kt::Isa::kAvx2, ::kt::Isa::kAvx512,        \
                                           ::kt::Isa::kAvx512Vnni, ::kt::Isa::kAvx512Bf16, ::kt::Isa::kAmx), \
                         ::testing::Values(::kt::ExpertFormat::kBf16, ::kt::ExpertFormat::kInt8,              \
                                           ::kt::ExpertFormat::kInt4, ::kt::ExpertFormat::kInt4GroupSym,      \
                                           ::kt::ExpertFormat::kInt4GroupAsym, ::kt::ExpertFormat::kInt4Asym,  \
                                           ::kt::ExpertFormat::kFp8Block, ::kt::ExpertFormat::kMxfp4,         \
                                           ::kt::ExpertFormat::kMxfp8)),                                      \
      [](const auto& info) {                                                                                \
        return std::string(::kt::IsaName(std::get<0>(info.param))) + "_" +                                  \
               ::kt::ExpertFormatName(std::get<1>(info.param));                                             \
      })

}  // namespace moe_test
}  // namespace kt

#endif  // KT_MOE_MOE_LAYER_TEST_UTIL_H_
