// The MoE forward on every kernel path and expert format (bf16, int8, int4 per channel sym and asym, int4
// group-wise
// sym with G = 32 and asym with G = 64) against MoeForwardReference (double accumulation, same bf16
// rounding of silu(g)*u, and for the quantized formats the same quantization applied in plain code), including the routing corner cases: invalid and GPU-masked ids, an expert
// chosen twice by one token, all tokens on one expert, experts with no tokens, permuted expert slots.
#include "kt/moe/moe_layer.h"

#include <cmath>
#include <random>
#include <thread>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kt/moe/moe_reference.h"

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
  // The group formats run with G = 32 (sym) and 64 (asym); their H and I are rounded up to a multiple of G.
  static int Group() {
    return format() == ExpertFormat::kInt4GroupSym ? 32 : format() == ExpertFormat::kInt4GroupAsym ? 64 : 0;
  }
  static int Dim(int x) { return Group() == 0 ? x : (x + Group() - 1) / Group() * Group(); }
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
      EXPECT_LE(err, std::ldexp(std::fabs(ref[i]), quantized ? -7 : -8) + (quantized ? 3e-3 : 2e-3) * max_ref)
          << "element " << i << " token " << i / h << ": got " << Bf16ToF32(out[i]) << " want "
          << ref[i];
      if (HasFailure()) break;
    }
    return max_ref > 0 ? max_err / max_ref : max_err;
  }
};

TEST_P(MoeLayerTest, QlenSweepMatchesReference) {
  // H and I are not multiples of the 16-row panel or the 48-column task block.
  const Layer l = Make(/*e=*/8, /*k=*/3, /*h=*/72, /*i=*/56, /*max_len=*/40, 1);
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
  const Layer l = Make(6, 4, 64, 48, 16, 3);
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
  const int hd = l.config.hidden;
  std::vector<bf16_t> out(9 * hd);
  ASSERT_TRUE(moe->Forward(pool, 9, 4, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           nullptr)
                  .ok());
  Compare(l, b, out);
  for (int c = 0; c < hd; ++c) EXPECT_EQ(out[2 * hd + c].bits & 0x7fff, 0) << "token 2 must be 0";

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
  const Layer l = Make(16, 2, 48, 40, 70, 5);
  ThreadPool pool(2);
  auto moe = Build(l, pool);
  std::mt19937 rng(6);
  Batch b = RandomBatch(l.config, 70, rng);
  for (int t = 0; t < 70; ++t) {
    b.ids[2 * t] = 7;                 // every token on expert 7 (70 rows: two row chunks)
    b.ids[2 * t + 1] = t % 2 ? 3 : -1;  // expert 3 on odd tokens; 14 experts idle
  }
  std::vector<bf16_t> out(70 * l.config.hidden);
  ASSERT_TRUE(moe->Forward(pool, 70, 2, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           nullptr)
                  .ok());
  Compare(l, b, out);
}

TEST_P(MoeLayerTest, PhysicalToLogicalMapAndSmallerK) {
  const Layer l = Make(5, 3, 32, 32, 8, 7);
  ThreadPool pool(2);
  const int64_t map[5] = {4, 2, 0, 1, 3};  // slot i holds logical expert map[i]
  auto moe = Build(l, pool, map);
  std::mt19937 rng(8);
  Batch b = RandomBatch(l.config, 5, rng);
  std::vector<bf16_t> out(5 * l.config.hidden);
  ASSERT_TRUE(moe->Forward(pool, 5, 3, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                           nullptr)
                  .ok());
  Batch logical = b;
  for (auto& id : logical.ids) id = map[id];
  Compare(l, logical, out);

  // k smaller than top_k: ids/weights are [qlen, k].
  const Layer l2 = Make(5, 3, 32, 32, 8, 9);
  auto moe2 = Build(l2, pool);
  Batch b2 = RandomBatch(Config(5, 1, 32, 32, 8), 4, rng);
  std::vector<bf16_t> out2(4 * l2.config.hidden);
  ASSERT_TRUE(moe2->Forward(pool, 4, 1, b2.ids.data(), b2.weights.data(), b2.input.data(),
                            out2.data(), nullptr)
                  .ok());
  Compare(Layer{Config(5, 1, 32, 32, 8), l2.gate, l2.up, l2.down}, b2, out2);
}

TEST_P(MoeLayerTest, ClearErrors) {
  const Layer l = Make(4, 2, 32, 16, 4, 11);
  ThreadPool pool(1);
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(l.config, isa(), format());
  ASSERT_TRUE(moe.ok());
  std::mt19937 rng(12);
  Batch b = RandomBatch(l.config, 5, rng);
  std::vector<bf16_t> out(5 * l.config.hidden);
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
  if (Group() != 0) {
    // Group formats: G must be 32, 64 or 128 and divide H and I; the error names what to fix.
    MoeConfig c = Config(4, 2, 64, 64, 4);
    c.group_size = 48;
    s = MoeLayer::Create(c, isa(), format()).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("group_size = 48"), absl::string_view::npos) << s;
    c = Config(4, 2, 64, 64, 4);
    c.intermediate = 2 * Group() + 16;
    s = MoeLayer::Create(c, isa(), format()).status();
    EXPECT_NE(s.message().find("MoeConfig.intermediate"), absl::string_view::npos) << s;
  }
  EXPECT_FALSE(MoeLayer::Create(MoeConfig{4, 2, 0, 16, 4}, isa(), format()).ok());
}

TEST_P(MoeLayerTest, LoadExpertTransposedEqualsLoadOfTranspose) {
  // bf16: the packed-to-packed transpose gives what LoadExpert of the transposed canonical weights gives
  // (read back through UnpackExpert); H = 40 is not a multiple of 16, so partial blocks are covered too.
  // Quantized formats: InvalidArgument, and nothing is marked loaded.
  const Layer l = Make(3, 2, 48, 40, 4, 21);
  ThreadPool pool(1);
  auto src = Build(l, pool);
  MoeConfig tc = l.config;
  std::swap(tc.hidden, tc.intermediate);
  absl::StatusOr<std::unique_ptr<MoeLayer>> t = MoeLayer::Create(tc, isa(), format());
  ASSERT_TRUE(t.ok()) << t.status();
  MoeLayer& m = **t;
  for (int slot = 0; slot < 3; ++slot) {
    for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
      const absl::Status s = m.experts().LoadExpertTransposed(slot, proj, src->experts());
      if (format() != ExpertFormat::kBf16) {
        EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
        EXPECT_NE(s.message().find("format with a packed transpose"), absl::string_view::npos) << s;
        continue;
      }
      ASSERT_TRUE(s.ok()) << s;
    }
  }
  if (format() != ExpertFormat::kBf16) {
    EXPECT_EQ(m.FinishLoad().code(), absl::StatusCode::kFailedPrecondition);
    return;
  }
  ASSERT_TRUE(m.FinishLoad().ok());
  for (int slot = 0; slot < 3; ++slot) {
    for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
      const size_t n = m.ProjRows(proj), k = m.ProjCols(proj);  // the source's [k, n]
      std::vector<bf16_t> w(n * k), wt(n * k);
      ASSERT_TRUE(src->experts().UnpackExpert(slot, proj, w.data()).ok());
      ASSERT_TRUE(m.experts().UnpackExpert(slot, proj, wt.data()).ok());
      for (size_t r = 0; r < n; ++r) {
        for (size_t c = 0; c < k; ++c) ASSERT_EQ(wt[r * k + c].bits, w[c * n + r].bits) << r << ", " << c;
      }
    }
  }
  // A layer of the same (untransposed) shape is not the source's transpose: the error says so.
  // (UnpackExpertTransposed, the int8 route, is checked in UnpackExpertTransposedIsTheTranspose.)
  absl::StatusOr<std::unique_ptr<MoeLayer>> same = MoeLayer::Create(l.config, isa(), format());
  ASSERT_TRUE(same.ok());
  const absl::Status s = (*same)->experts().LoadExpertTransposed(0, ExpertProj::kGate, src->experts());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("must be its transpose"), absl::string_view::npos) << s;
}

TEST_P(MoeLayerTest, UnpackExpertTransposedIsTheTranspose) {
  // Every format: the transposed unpack equals UnpackExpert transposed, bit for bit (N = 40 and K = 48 / 40
  // leave a partial panel).
  const Layer l = Make(3, 2, 48, 40, 4, 23);
  ThreadPool pool(1);
  auto m = Build(l, pool);
  for (int slot = 0; slot < 3; ++slot) {
    for (ExpertProj proj : {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown}) {
      const size_t n = m->ProjRows(proj), k = m->ProjCols(proj);
      std::vector<bf16_t> w(n * k), wt(n * k);
      const absl::Status s = m->experts().UnpackExpertTransposed(slot, proj, wt.data());
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_TRUE(m->experts().UnpackExpert(slot, proj, w.data()).ok());
      for (size_t r = 0; r < n; ++r) {
        for (size_t c = 0; c < k; ++c) ASSERT_EQ(wt[c * n + r].bits, w[r * k + c].bits) << r << ", " << c;
      }
    }
  }
}

TEST_P(MoeLayerTest, StreamingLoadMatchesBulkLoad) {
  // One projection at a time, in reverse order, from bf16 or (quantized formats) from the canonical
  // quantized matrix a converted checkpoint stores: the forward must equal the bulk load's bit for bit.
  const Layer l = Make(4, 2, 96, 40, 6, 13);  // H != I after rounding, for the shape message
  ThreadPool pool(2);
  auto bulk = Build(l, pool);
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(l.config, isa(), format());
  ASSERT_TRUE(moe.ok());
  MoeLayer& m = **moe;
  const absl::StatusOr<QuantSpec> spec = m.quant_spec();
  EXPECT_EQ(spec.ok(), format() != ExpertFormat::kBf16);
  if (spec.ok()) EXPECT_EQ(spec->group_size, Group());
  const int hd = l.config.hidden, id = l.config.intermediate;
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
  std::vector<bf16_t> out(6 * hd), want(6 * hd);
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
  wrong.spec = QuantSpec{QuantFormat::kInt4GroupSym, Group() == 32 ? 64 : 32};
  wrong.n = id;
  wrong.k = hd;
  absl::Status s = m.LoadExpertQuantized(0, ExpertProj::kGate, wrong);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  if (spec.ok()) {
    EXPECT_NE(s.message().find(QuantLayoutTag(wrong.spec)), absl::string_view::npos) << s;
    absl::StatusOr<QuantizedMatrix> q = Quantize(*spec, l.down.data(), id, hd, id);
    ASSERT_TRUE(q.ok());
    s = m.LoadExpertQuantized(0, ExpertProj::kGate, *q);  // down's shape given for gate
    EXPECT_NE(s.message().find(absl::StrCat("is [", hd, ", ", id, "], expected [", id, ", ", hd, "]")),
              absl::string_view::npos)
        << s;
  } else {
    EXPECT_NE(s.message().find("takes bf16 weights"), absl::string_view::npos) << s;
  }
  if (spec.ok()) {
    // A non-finite weight in a streamed expert (quantized by the vectorized path) is refused with the
    // projection, slot, row and column, and the loaded layer stays usable with its weights unchanged.
    std::vector<bf16_t> bad(l.gate.begin(), l.gate.begin() + static_cast<size_t>(id) * hd);
    bad[2 * static_cast<size_t>(hd) + 3] = bf16_t{0x7fc0};  // NaN at [2][3]
    s = m.LoadExpert(0, ExpertProj::kGate, bad.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("LoadExpert: gate weight of slot 0: w[2][3] = nan is not finite"),
              absl::string_view::npos) << s;
    EXPECT_TRUE(m.loaded());
    ASSERT_TRUE(m.Forward(pool, 6, 2, b.ids.data(), b.weights.data(), b.input.data(), out.data(), nullptr)
                    .ok());
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i].bits, want[i].bits) << "element " << i;
  }
}

TEST_P(MoeLayerTest, FewTokensOnManyThreads) {
  // Decode-sized calls on more threads than tokens: gather and h quantization run a row per task and the
  // weighted sum splits its columns (H = 520 gives 2 column ranges on 4 threads, the second one short).
  const Layer l = Make(4, 2, 520, 48, 4, 17);
  ThreadPool pool(4);
  auto moe = Build(l, pool);
  std::mt19937 rng(18);
  for (int qlen = 1; qlen <= 4; ++qlen) {
    const Batch b = RandomBatch(l.config, qlen, rng);
    std::vector<bf16_t> out(static_cast<size_t>(qlen) * l.config.hidden);
    ASSERT_TRUE(moe->Forward(pool, qlen, 2, b.ids.data(), b.weights.data(), b.input.data(), out.data(), nullptr)
                    .ok());
    Compare(l, b, out);
    if (HasFailure()) return;
  }
}

TEST_P(MoeLayerTest, LayersShareOneScratch) {
  // Two layers of different shapes share the process scratch (the default) and a third has its own: the
  // shared one grows to the larger layer, interleaved calls give each layer the bits it gives alone, and two
  // threads calling Forward on layers that share a scratch at the same time (serialized by its mutex) still
  // get those bits.
  const Layer small = Make(4, 2, 64, 48, 8, 31), big = Make(6, 3, 96, 80, 20, 32);
  ThreadPool pool_a(2), pool_b(2);
  auto a = Build(small, pool_a);
  auto b = Build(big, pool_a);
  absl::StatusOr<std::unique_ptr<MoeLayer>> own =
      MoeLayer::Create(big.config, isa(), format(), std::make_shared<MoeScratch>());
  ASSERT_TRUE(own.ok()) << own.status();
  ASSERT_TRUE((*own)->LoadWeights(big.gate.data(), big.up.data(), big.down.data(), nullptr, pool_a).ok());
  const size_t hs = small.config.hidden, hb = big.config.hidden;
  // At least the big layer's fp32 accumulators (max_len x H) and its gathered rows (max_len * k x H, >= 1 byte).
  EXPECT_GE(MoeScratch::Shared()->bytes(), 20u * hb * sizeof(float) + 20u * 3 * hb);
  std::mt19937 rng(33);
  const Batch bs = RandomBatch(small.config, 8, rng), bb = RandomBatch(big.config, 20, rng);
  auto run = [](MoeLayer& m, ThreadPool& pool, const Batch& x, size_t h) {
    std::vector<bf16_t> out(static_cast<size_t>(x.qlen) * h);
    EXPECT_TRUE(m.Forward(pool, x.qlen, x.k, x.ids.data(), x.weights.data(), x.input.data(), out.data(),
                          nullptr).ok());
    return out;
  };
  auto bits = [](const std::vector<bf16_t>& v) {
    std::vector<uint16_t> r;
    for (bf16_t x : v) r.push_back(x.bits);
    return r;
  };
  const auto want_small = bits(run(*a, pool_a, bs, hs));
  const auto want_big = bits(run(**own, pool_a, bb, hb));
  Compare(small, bs, run(*a, pool_a, bs, hs));
  EXPECT_EQ(bits(run(*b, pool_a, bb, hb)), want_big);
  EXPECT_EQ(bits(run(*a, pool_a, bs, hs)), want_small);
  std::vector<uint16_t> got_small, got_big;
  std::thread other([&] {
    for (int i = 0; i < 20; ++i) got_big = bits(run(*b, pool_b, bb, hb));
  });
  for (int i = 0; i < 20; ++i) got_small = bits(run(*a, pool_a, bs, hs));
  other.join();
  EXPECT_EQ(got_small, want_small);
  EXPECT_EQ(got_big, want_big);
}

TEST_P(MoeLayerTest, TilingDoesNotChangeResults) {
  // Each output column is one dot product over K in a fixed order whatever the task's column block, row
  // chunk or AMX K block (partial sums wait in fp32/int32 memory between K blocks, exactly), so every
  // tiling gives the same bits. H and I are multiples of 64 and experts get ~40 rows, so the AMX path
  // takes its K-blocked schedule (whole 32-row blocks x panel pairs) plus remainders.
  const Layer l = Make(6, 2, 256, 192, 128, 15);
  const size_t h = l.config.hidden;
  const int qlen = 120;
  ThreadPool pool(3);
  auto moe = Build(l, pool);
  std::mt19937 rng(16);
  const Batch b = RandomBatch(l.config, qlen, rng);
  std::vector<bf16_t> want(qlen * h), got(qlen * h);
  ASSERT_TRUE(moe->Forward(pool, qlen, 2, b.ids.data(), b.weights.data(), b.input.data(), want.data(), nullptr)
                  .ok());
  for (const MoeTiling t : {MoeTiling{1, 1}, MoeTiling{2, 7}, MoeTiling{8, 8}, MoeTiling{5, 0},
                            MoeTiling{4, 4, 40, 64}, MoeTiling{16, 16, 1024, 32}, MoeTiling{3, 6, 33, 1},
                            MoeTiling{12, 2, 16, 128}, MoeTiling{2, 3, 17, 0}}) {
    ASSERT_TRUE(moe->SetTiling(t).ok());
    ASSERT_TRUE(moe->Forward(pool, qlen, 2, b.ids.data(), b.weights.data(), b.input.data(), got.data(), nullptr)
                    .ok());
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_EQ(got[i].bits, want[i].bits) << "tiling " << t.gate_up_panels << "," << t.down_panels << ","
                                           << t.row_chunk << "," << t.k_block << " at " << i;
    }
  }
  const absl::Status bad = moe->SetTiling(MoeTiling{17, 0});
  EXPECT_NE(bad.message().find("gate_up_panels must be 0 (automatic) or in [1, 16], got 17"),
            absl::string_view::npos) << bad;
  const absl::Status bad_rows = moe->SetTiling(MoeTiling{0, 0, 1025, 0});
  EXPECT_NE(bad_rows.message().find("row_chunk must be 0 (automatic) or in [16, 1024], got 1025"),
            absl::string_view::npos) << bad_rows;
  EXPECT_FALSE(moe->SetTiling(MoeTiling{0, 0, 15, 0}).ok());
  const absl::Status bad_kb = moe->SetTiling(MoeTiling{0, 0, 0, -1});
  EXPECT_NE(bad_kb.message().find("k_block must be 0 (automatic)"), absl::string_view::npos) << bad_kb;
}

// The low-level access kt/sft builds on: UnpackExpert gives back the weights the format holds (bf16
// exactly; int8 as q * scale rounded to bf16, the same values Dequantize gives), and ProjectBlock on rows
// the caller prepared equals the double product of those rows and weights, for a column block that
// starts mid-matrix and ends on a remainder.
TEST_P(MoeLayerTest, ProjectBlockAndUnpackExpert) {
  ThreadPool pool(2);
  const Layer l = Make(3, 1, 72, 40, 4, 21);
  std::unique_ptr<MoeLayer> moe = Build(l, pool);
  const size_t n = l.config.hidden, k = l.config.intermediate;  // down: [H, I]
  std::vector<bf16_t> w(n * k);
  ASSERT_TRUE(moe->experts().UnpackExpert(2, ExpertProj::kDown, w.data()).ok());
  const bf16_t* src = l.down.data() + 2 * n * k;
  absl::StatusOr<QuantSpec> spec = moe->quant_spec();
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
  const size_t groups = moe->experts().ActivationGroups(ExpertProj::kDown);
  const size_t group_len = k / groups;
  std::vector<int8_t> qx(m * k);
  std::vector<float> sx(m * groups);
  std::vector<int32_t> sums(m * groups);
  ProjInput in;
  in.x = x.data();
  in.ld = k;
  std::vector<float> xs(m * k);  // the rows as the kernel sees them
  for (size_t i = 0; i < m * k; ++i) xs[i] = Bf16ToF32(x[i]);
  if (moe->experts().quantized_activations()) {
    for (size_t r = 0; r < m; ++r) {
      moe->experts().PrepareRow(ExpertProj::kDown, x.data() + r * k, qx.data() + r * k, sx.data() + r * groups,
                      sums.data() + r * groups);
      for (size_t c = 0; c < k; ++c) xs[r * k + c] = qx[r * k + c] * sx[r * groups + c / group_len];
    }
    in.qx = qx.data();
    in.sx = sx.data();
    in.xsum = sums.data();
  }
  std::vector<float> y(m * cols, -1.0f);
  moe->experts().ProjectBlock(ExpertProj::kDown, 2, c0, cols, in, m, y.data(), cols);
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

// A NaN or an infinity in one token's input makes that token's output non-finite in every element on every
// format and path (as the bf16 computation and PyTorch do: every gate/up sum includes it), while the other
// tokens' outputs are bit for bit those of the same call with a finite value there (each token's
// activations are quantized on their own). The quantized formats used to turn it into finite numbers (a NaN
// dropped by max|x|, an all-NaN row quantized to zeros).
TEST_P(MoeLayerTest, NonFiniteInputGivesNonFiniteOutputForThatTokenOnly) {
  const Layer l = Make(/*e=*/6, /*k=*/2, /*h=*/72, /*i=*/40, /*max_len=*/8, 11);
  ThreadPool pool(2);
  auto moe = Build(l, pool);
  std::mt19937 rng(12);
  const int qlen = 5, bad_token = 2;
  const size_t h = l.config.hidden;
  Batch b = RandomBatch(l.config, qlen, rng);
  // Every token routed to real experts (RandomBatch picks ids in [0, E)).
  std::vector<bf16_t> clean_out(qlen * h);
  ASSERT_TRUE(moe->Forward(pool, qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(), clean_out.data(),
                           nullptr)
                  .ok());
  struct Case {
    const char* what;
    std::vector<size_t> cols;
    bf16_t value;
  };
  const std::vector<Case> cases = {
      {"one NaN", {7}, bf16_t{0x7fc0}},
      {"one NaN in the last column", {h - 1}, bf16_t{0x7fc0}},
      {"all NaN", {}, bf16_t{0x7fc0}},
      {"+Inf", {3}, bf16_t{0x7f80}},
      {"-Inf", {h / 2}, bf16_t{0xff80}},
  };
  for (const Case& c : cases) {
    Batch bad = b;
    if (c.cols.empty()) {
      for (size_t j = 0; j < h; ++j) bad.input[bad_token * h + j] = c.value;
    } else {
      for (size_t j : c.cols) bad.input[bad_token * h + j] = c.value;
    }
    std::vector<bf16_t> out(qlen * h);
    ASSERT_TRUE(moe->Forward(pool, qlen, b.k, bad.ids.data(), bad.weights.data(), bad.input.data(), out.data(),
                             nullptr)
                    .ok());
    for (int t = 0; t < qlen; ++t) {
      for (size_t j = 0; j < h; ++j) {
        const float v = Bf16ToF32(out[t * h + j]);
        if (t == bad_token) {
          ASSERT_FALSE(std::isfinite(v)) << c.what << ": token " << t << " column " << j << " is " << v;
        } else {
          ASSERT_EQ(out[t * h + j].bits, clean_out[t * h + j].bits) << c.what << ": token " << t << " column " << j;
        }
      }
    }
  }
}

// A failed reload into a staged layer leaves the live layer's weights and results as they were; a
// successful one is swapped in by AdoptWeights (results equal a layer built from the new weights).
TEST_P(MoeLayerTest, StagedReloadKeepsWeightsOnFailureAndSwapsOnSuccess) {
  const Layer a = Make(/*e=*/4, /*k=*/2, /*h=*/64, /*i=*/32, /*max_len=*/4, 21);
  const Layer b = Make(/*e=*/4, /*k=*/2, /*h=*/64, /*i=*/32, /*max_len=*/4, 22);
  ThreadPool pool(2);
  auto moe = Build(a, pool);
  auto only_b = Build(b, pool);
  std::mt19937 rng(23);
  const Batch batch = RandomBatch(a.config, 4, rng);
  auto run = [&](MoeLayer& m) {
    std::vector<bf16_t> out(4 * a.config.hidden);
    EXPECT_TRUE(m.Forward(pool, 4, batch.k, batch.ids.data(), batch.weights.data(), batch.input.data(),
                          out.data(), nullptr)
                    .ok());
    std::vector<uint16_t> bits;
    for (bf16_t v : out) bits.push_back(v.bits);
    return bits;
  };
  const std::vector<uint16_t> with_a = run(*moe), with_b = run(*only_b);
  ASSERT_NE(with_a, with_b);

  // A staged load that stops half-way (only expert 0 loaded) cannot be adopted.
  absl::StatusOr<std::unique_ptr<MoeLayer>> staged = moe->CreateStaging();
  ASSERT_TRUE(staged.ok()) << staged.status();
  (*staged)->BeginLoad();
  ASSERT_TRUE((*staged)->LoadExpert(0, ExpertProj::kGate, b.gate.data()).ok());
  EXPECT_FALSE((*staged)->FinishLoad().ok());
  absl::Status s = moe->AdoptWeights(**staged);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(moe->loaded());
  EXPECT_EQ(run(*moe), with_a);
  // A layer of another shape cannot be adopted either.
  Layer other = Make(/*e=*/4, /*k=*/2, /*h=*/64, /*i=*/96, /*max_len=*/4, 24);
  auto wrong = Build(other, pool);
  EXPECT_EQ(moe->AdoptWeights(*wrong).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run(*moe), with_a);

  staged = moe->CreateStaging();
  ASSERT_TRUE(staged.ok());
  ASSERT_TRUE((*staged)->LoadWeights(b.gate.data(), b.up.data(), b.down.data(), nullptr, pool).ok());
  ASSERT_TRUE(moe->AdoptWeights(**staged).ok());
  EXPECT_EQ(run(*moe), with_b);
  // The staged layer now holds the old weights.
  EXPECT_EQ(run(**staged), with_a);
}

INSTANTIATE_TEST_SUITE_P(
    AllPaths, MoeLayerTest,
    ::testing::Combine(::testing::Values(Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni,
                                         Isa::kAvx512Bf16, Isa::kAmx),
                       ::testing::Values(ExpertFormat::kBf16, ExpertFormat::kInt8, ExpertFormat::kInt4,
                                         ExpertFormat::kInt4GroupSym, ExpertFormat::kInt4GroupAsym,
                                         ExpertFormat::kInt4Asym)),
    [](const auto& info) {
      return std::string(IsaName(std::get<0>(info.param))) + "_" +
             ExpertFormatName(std::get<1>(info.param));
    });

}  // namespace
}  // namespace kt
