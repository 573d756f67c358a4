// The MoE forward on every kernel path and expert format (bf16, int8) against MoeForwardReference (double
// accumulation, same bf16 rounding of silu(g)*u, and for int8 the same quantization applied in plain
// code), including the routing corner cases: invalid and GPU-masked ids, an expert
// chosen twice by one token, all tokens on one expert, experts with no tokens, permuted expert slots.
#include "kt/moe/moe_layer.h"

#include <cmath>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"

namespace kt {
namespace {

struct Layer {
  MoeConfig config;
  std::vector<bf16_t> gate, up, down;
};

Layer MakeLayer(int e, int k, int h, int i, int max_len, uint32_t seed) {
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

Batch RandomBatch(const MoeConfig& c, int qlen, std::mt19937& rng) {
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
      EXPECT_LE(err, std::ldexp(std::fabs(ref[i]), format() == ExpertFormat::kInt8 ? -7 : -8) +
                         (format() == ExpertFormat::kInt8 ? 3e-3 : 2e-3) * max_ref)
          << "element " << i << " token " << i / h << ": got " << Bf16ToF32(out[i]) << " want "
          << ref[i];
      if (HasFailure()) break;
    }
    return max_ref > 0 ? max_err / max_ref : max_err;
  }
};

TEST_P(MoeLayerTest, QlenSweepMatchesReference) {
  // H and I are not multiples of the 16-row panel or the 48-column task block.
  const Layer l = MakeLayer(/*e=*/8, /*k=*/3, /*h=*/72, /*i=*/56, /*max_len=*/40, 1);
  std::mt19937 rng(2);
  double worst = 0;
  for (int threads : {1, 3}) {
    ThreadPool pool(threads);
    auto moe = Build(l, pool);
    for (int qlen = 1; qlen <= 33; ++qlen) {
      const Batch b = RandomBatch(l.config, qlen, rng);
      std::vector<bf16_t> out(static_cast<size_t>(qlen) * l.config.hidden);
      ASSERT_TRUE(moe->Forward(pool, qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(),
                               out.data(), nullptr)
                      .ok());
      worst = std::max(worst, Compare(l, b, out));
      if (HasFailure()) return;
    }
  }
  std::printf("[%s %s] worst max|err|/max|ref| = %.3g\n", IsaName(isa()), ExpertFormatName(format()),
              worst);
}

TEST_P(MoeLayerTest, RoutingCornerCases) {
  const Layer l = MakeLayer(6, 4, 64, 48, 16, 3);
  ThreadPool pool(2);
  auto moe = Build(l, pool);
  std::mt19937 rng(4);
  Batch b = RandomBatch(l.config, 9, rng);
  // Token 0: invalid ids on both sides and a valid one. Token 1: expert 2 chosen twice.
  b.ids[0] = -1;
  b.ids[1] = 6;
  b.ids[2] = 1000;
  b.ids[3] = 5;
  b.ids[4] = 2;
  b.ids[5] = 2;
  b.ids[6] = 2;
  b.ids[7] = 0;
  // Token 2: every slot invalid -> output exactly zero.
  for (int j = 0; j < 4; ++j) b.ids[8 + j] = -3;
  std::vector<bf16_t> out(9 * 64);
  ASSERT_TRUE(moe->Forward(pool, 9, 4, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           nullptr)
                  .ok());
  Compare(l, b, out);
  for (int c = 0; c < 64; ++c) EXPECT_EQ(out[2 * 64 + c].bits & 0x7fff, 0) << "token 2 must be 0";

  // GPU-masked experts contribute nothing, and the mask is read at every call.
  bool mask[6] = {false, false, true, false, false, true};
  ASSERT_TRUE(moe->Forward(pool, 9, 4, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           mask)
                  .ok());
  Compare(l, b, out, mask);
  mask[2] = false;
  ASSERT_TRUE(moe->Forward(pool, 9, 4, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           mask)
                  .ok());
  Compare(l, b, out, mask);
}

TEST_P(MoeLayerTest, AllTokensOnOneExpertAndIdleExperts) {
  const Layer l = MakeLayer(16, 2, 48, 40, 70, 5);
  ThreadPool pool(2);
  auto moe = Build(l, pool);
  std::mt19937 rng(6);
  Batch b = RandomBatch(l.config, 70, rng);
  for (int t = 0; t < 70; ++t) {
    b.ids[2 * t] = 7;                 // every token on expert 7 (70 rows: two row chunks)
    b.ids[2 * t + 1] = t % 2 ? 3 : -1;  // expert 3 on odd tokens; 14 experts idle
  }
  std::vector<bf16_t> out(70 * 48);
  ASSERT_TRUE(moe->Forward(pool, 70, 2, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           nullptr)
                  .ok());
  Compare(l, b, out);
}

TEST_P(MoeLayerTest, PhysicalToLogicalMapAndSmallerK) {
  const Layer l = MakeLayer(5, 3, 32, 32, 8, 7);
  ThreadPool pool(2);
  const int64_t map[5] = {4, 2, 0, 1, 3};  // slot i holds logical expert map[i]
  auto moe = Build(l, pool, map);
  std::mt19937 rng(8);
  Batch b = RandomBatch(l.config, 5, rng);
  std::vector<bf16_t> out(5 * 32);
  ASSERT_TRUE(moe->Forward(pool, 5, 3, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           nullptr)
                  .ok());
  Batch logical = b;
  for (auto& id : logical.ids) id = map[id];
  Compare(l, logical, out);

  // k smaller than top_k: ids/weights are [qlen, k].
  const Layer l2 = MakeLayer(5, 3, 32, 32, 8, 9);
  auto moe2 = Build(l2, pool);
  Batch b2 = RandomBatch(MoeConfig{5, 1, 32, 32, 8}, 4, rng);
  std::vector<bf16_t> out2(4 * 32);
  ASSERT_TRUE(moe2->Forward(pool, 4, 1, b2.ids.data(), b2.weights.data(), b2.input.data(),
                            out2.data(), nullptr)
                  .ok());
  Compare(Layer{MoeConfig{5, 1, 32, 32, 8}, l2.gate, l2.up, l2.down}, b2, out2);
}

TEST_P(MoeLayerTest, ClearErrors) {
  const Layer l = MakeLayer(4, 2, 32, 16, 4, 11);
  ThreadPool pool(1);
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(l.config, isa(), format());
  ASSERT_TRUE(moe.ok());
  std::mt19937 rng(12);
  Batch b = RandomBatch(l.config, 5, rng);
  std::vector<bf16_t> out(5 * 32);
  absl::Status s = (*moe)->Forward(pool, 1, 2, b.ids.data(), b.weights.data(), b.input.data(),
                                   out.data(), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  ASSERT_TRUE((*moe)->LoadWeights(l.gate.data(), l.up.data(), l.down.data(), nullptr, pool).ok());
  s = (*moe)->Forward(pool, 5, 2, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                      nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("max_len"), absl::string_view::npos) << s;
  const int64_t bad_map[4] = {0, 1, 4, 2};
  s = (*moe)->LoadWeights(l.gate.data(), l.up.data(), l.down.data(), bad_map, pool);
  EXPECT_NE(s.message().find("physical_to_logical_map[2]"), absl::string_view::npos) << s;
  EXPECT_FALSE(MoeLayer::Create(MoeConfig{4, 5, 32, 16, 4}, isa(), format()).ok());
  EXPECT_FALSE(MoeLayer::Create(MoeConfig{4, 2, 0, 16, 4}, isa(), format()).ok());
}

TEST_P(MoeLayerTest, StreamingLoadMatchesBulkLoad) {
  // One projection at a time, in reverse order, from bf16 or (quantized formats) from the canonical
  // quantized matrix a converted checkpoint stores: the forward must equal the bulk load's bit for bit.
  const Layer l = MakeLayer(4, 2, 48, 40, 6, 13);
  ThreadPool pool(2);
  auto bulk = Build(l, pool);
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(l.config, isa(), format());
  ASSERT_TRUE(moe.ok());
  MoeLayer& m = **moe;
  const absl::StatusOr<QuantSpec> spec = QuantSpecOf(format());
  EXPECT_EQ(spec.ok(), format() != ExpertFormat::kBf16);
  for (int slot = 3; slot >= 0; --slot) {
    for (ExpertProj proj : {ExpertProj::kDown, ExpertProj::kUp, ExpertProj::kGate}) {
      const size_t n = m.ProjRows(proj), k = m.ProjCols(proj);
      const std::vector<bf16_t>& all =
          proj == ExpertProj::kGate ? l.gate : proj == ExpertProj::kUp ? l.up : l.down;
      const bf16_t* w = all.data() + static_cast<size_t>(slot) * n * k;
      if (slot == 0 && proj == ExpertProj::kGate) {
        absl::Status early = m.FinishLoad();
        EXPECT_EQ(early.code(), absl::StatusCode::kFailedPrecondition) << early;
        EXPECT_NE(early.message().find("slot 0 has no gate"), absl::string_view::npos) << early;
      }
      if (!spec.ok() || slot % 2 == 0) {
        ASSERT_TRUE(m.LoadExpert(slot, proj, w).ok());
        continue;
      }
      absl::StatusOr<QuantizedMatrix> q = Quantize(*spec, w, k, n, k);
      ASSERT_TRUE(q.ok()) << q.status();
      ASSERT_TRUE(m.LoadExpertQuantized(slot, proj, *q).ok());
    }
  }
  EXPECT_FALSE(m.loaded());
  ASSERT_TRUE(m.FinishLoad().ok());
  std::mt19937 rng(14);
  const Batch b = RandomBatch(l.config, 6, rng);
  std::vector<bf16_t> out(6 * 48), want(6 * 48);
  ASSERT_TRUE(m.Forward(pool, 6, 2, b.ids.data(), b.weights.data(), b.input.data(), out.data(), nullptr)
                  .ok());
  ASSERT_TRUE(bulk->Forward(pool, 6, 2, b.ids.data(), b.weights.data(), b.input.data(), want.data(),
                            nullptr)
                  .ok());
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i].bits, want[i].bits) << "element " << i;

  // Mismatches name what is wrong.
  EXPECT_NE(m.LoadExpert(4, ExpertProj::kGate, l.gate.data()).message().find("slot = 4"),
            absl::string_view::npos);
  QuantizedMatrix wrong;
  wrong.spec = QuantSpec{QuantFormat::kInt4GroupSym, 32};
  wrong.n = 40;
  wrong.k = 48;
  absl::Status s = m.LoadExpertQuantized(0, ExpertProj::kGate, wrong);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  if (spec.ok()) {
    EXPECT_NE(s.message().find("kt-int4-group32-sym-v1"), absl::string_view::npos) << s;
    absl::StatusOr<QuantizedMatrix> q = Quantize(*spec, l.down.data(), 40, 48, 40);
    ASSERT_TRUE(q.ok());
    s = m.LoadExpertQuantized(0, ExpertProj::kGate, *q);  // down's shape given for gate
    EXPECT_NE(s.message().find("is [48, 40], expected [40, 48]"), absl::string_view::npos) << s;
  } else {
    EXPECT_NE(s.message().find("takes bf16 weights"), absl::string_view::npos) << s;
  }
}

// The low-level access kt/sft builds on: UnpackExpert gives back the weights the format holds (bf16
// exactly; int8 as q * scale rounded to bf16, the same values Dequantize gives), and ProjectBlock on rows
// the caller prepared equals the double product of those rows and weights, for a column block that
// starts mid-matrix and ends on a remainder.
TEST_P(MoeLayerTest, ProjectBlockAndUnpackExpert) {
  ThreadPool pool(2);
  const Layer l = MakeLayer(3, 1, 72, 40, 4, 21);
  std::unique_ptr<MoeLayer> moe = Build(l, pool);
  const size_t n = 72, k = 40;  // down: [H, I]
  std::vector<bf16_t> w(n * k);
  ASSERT_TRUE(moe->UnpackExpert(2, ExpertProj::kDown, w.data()).ok());
  const bf16_t* src = l.down.data() + 2 * n * k;
  absl::StatusOr<QuantSpec> spec = QuantSpecOf(format());
  std::vector<float> deq(n * k);
  if (spec.ok()) {
    absl::StatusOr<QuantizedMatrix> q = Quantize(*spec, src, k, n, k);
    ASSERT_TRUE(q.ok());
    Dequantize(*q, deq.data(), k);
  } else {
    for (size_t i = 0; i < n * k; ++i) deq[i] = Bf16ToF32(src[i]);
  }
  for (size_t i = 0; i < n * k; ++i) ASSERT_EQ(w[i].bits, F32ToBf16(deq[i]).bits) << i;

  const size_t m = 5, c0 = 16, cols = n - c0;
  std::mt19937 rng(22);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<bf16_t> x(m * k);
  for (auto& v : x) v = F32ToBf16(d(rng));
  std::vector<int8_t> qx(m * k);
  std::vector<float> sx(m);
  MoeLayer::ProjInput in;
  in.x = x.data();
  in.ld = k;
  std::vector<float> xs(m * k);  // the rows as the kernel sees them
  for (size_t i = 0; i < m * k; ++i) xs[i] = Bf16ToF32(x[i]);
  if (moe->quantized_activations()) {
    for (size_t r = 0; r < m; ++r) {
      moe->PrepareRow(ExpertProj::kDown, x.data() + r * k, qx.data() + r * k, sx.data() + r);
      for (size_t c = 0; c < k; ++c) xs[r * k + c] = qx[r * k + c] * sx[r];
    }
    in.qx = qx.data();
    in.sx = sx.data();
  }
  std::vector<float> y(m * cols, -1.0f);
  moe->ProjectBlock(ExpertProj::kDown, 2, c0, cols, in, m, y.data(), cols);
  for (size_t r = 0; r < m; ++r) {
    for (size_t j = 0; j < cols; ++j) {
      double want = 0, mag = 0;
      for (size_t c = 0; c < k; ++c) {
        want += static_cast<double>(xs[r * k + c]) * deq[(c0 + j) * k + c];
        mag += std::abs(static_cast<double>(xs[r * k + c]) * deq[(c0 + j) * k + c]);
      }
      // fp32 summation bound K 2^-23 sum|x w| (docs/TESTING.md), plus the int8 path's final fp32 scaling.
      ASSERT_NEAR(y[r * cols + j], want, k * std::ldexp(1.0, -23) * mag + 1e-6 * std::abs(want))
          << r << "," << j;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllPaths, MoeLayerTest,
    ::testing::Combine(::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni,
                                         Isa::kAvx512Bf16, Isa::kAmx),
                       ::testing::Values(ExpertFormat::kBf16, ExpertFormat::kInt8)),
    [](const auto& info) {
      return std::string(IsaName(std::get<0>(info.param))) + "_" +
             ExpertFormatName(std::get<1>(info.param));
    });

}  // namespace
}  // namespace kt
