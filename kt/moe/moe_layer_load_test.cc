// Loading a MoeLayer on every kernel path and expert format: the configuration and argument errors, the
// streaming loaders (per expert projection, bf16 and already quantized) against the bulk load, and the
// staged reload (CreateStaging / AdoptWeights) that keeps the weights in use when a load fails.

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/moe_layer_test_util.h"

namespace kt {
namespace moe_test {
namespace {

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
  if (spec.ok()) {
    EXPECT_EQ(spec->group_size, Group());
  }
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

KT_INSTANTIATE_ALL_PATHS_AND_FORMATS(MoeLayerTest);

}  // namespace
}  // namespace moe_test
}  // namespace kt
