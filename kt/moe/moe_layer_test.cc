// The MoE forward on every kernel path and expert format (bf16, int8, int4 per channel sym and asym, int4
// group-wise sym with G = 32 and asym with G = 64, fp8 block, mxfp4, mxfp8) against MoeForwardReference (double accumulation, same
// bf16 rounding of silu(g)*u, and for the quantized formats the same quantization applied in plain code),
// including the routing corner cases: invalid and GPU-masked ids, an expert chosen twice by one token, all
// tokens on one expert, experts with no tokens, permuted expert slots; thread counts, shared scratch and
// tilings that must not change results. Loading: moe_layer_load_test; the storage: packed_experts_test.

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

// swiglu_limit (g <= L, |u| <= L) and swiglu_alpha (g sigmoid(a g) (u + 1)), each alone and together,
// against the reference's definition; L = 0.5 clamps most of g and u (they are about N(0, 1)), so an
// ignored parameter would fail (checked: the plain layer's output differs by more than the tolerance).
TEST_P(MoeLayerTest, SwigluLimitAndAlphaMatchReference) {
  Layer l = Make(6, 2, 64, 64, 9, 21);
  std::mt19937 rng(22);
  ThreadPool pool(2);
  const Batch b = RandomBatch(l.config, 9, rng);
  std::vector<bf16_t> plain(static_cast<size_t>(b.qlen) * l.config.hidden);
  ASSERT_TRUE(Build(l, pool)->Forward(pool, b.qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(),
                                      plain.data(), nullptr).ok());
  for (auto [limit, alpha] : {std::pair<float, float>{0.5f, 0.0f}, {0.0f, 1.702f}, {0.5f, 1.702f}}) {
    SCOPED_TRACE(absl::StrCat("limit ", limit, " alpha ", alpha));
    l.config.swiglu_limit = limit;
    l.config.swiglu_alpha = alpha;
    auto moe = Build(l, pool);
    std::vector<bf16_t> out(plain.size());
    ASSERT_TRUE(moe->Forward(pool, b.qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                             nullptr).ok());
    Compare(l, b, out);
    double diff = 0, mag = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      diff = std::max(diff, std::fabs(static_cast<double>(Bf16ToF32(out[i])) - Bf16ToF32(plain[i])));
      mag = std::max(mag, std::fabs(static_cast<double>(Bf16ToF32(plain[i]))));
    }
    EXPECT_GT(diff, 0.05 * mag) << "the parameters changed nothing";
  }
  l.config.swiglu_limit = -1.0f;
  l.config.swiglu_alpha = 0.0f;
  const absl::Status bad = ValidateMoeConfig(l.config);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("swiglu_limit"), absl::string_view::npos) << bad;
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

// Decode-sized calls (a few rows per expert) pick their task widths from the thread count (MoeLayer's decode
// widths: about 4 gate/up tasks per thread, up to 16 panels, even): every thread count and every fixed
// tiling gives the same bits, and the reference's numbers. H and I are not multiples of the 16-row panel,
// so the widths' last blocks are short.
TEST_P(MoeLayerTest, DecodeWidthsDoNotChangeResults) {
  const Layer l = Make(/*e=*/16, /*k=*/8, /*h=*/264, /*i=*/200, /*max_len=*/3, 23);
  std::mt19937 rng(24);
  std::vector<Batch> batches;
  for (int qlen = 1; qlen <= 3; ++qlen) batches.push_back(RandomBatch(l.config, qlen, rng));
  std::vector<std::vector<bf16_t>> want;
  for (int threads : {1, 2, 5}) {
    ThreadPool pool(threads);
    auto moe = Build(l, pool);
    for (const MoeTiling t : {MoeTiling{}, MoeTiling{3, 3}, MoeTiling{1, 16}, MoeTiling{7, 2}}) {
      ASSERT_TRUE(moe->SetTiling(t).ok());
      for (size_t bi = 0; bi < batches.size(); ++bi) {
        const Batch& b = batches[bi];
        std::vector<bf16_t> out(static_cast<size_t>(b.qlen) * l.config.hidden);
        ASSERT_TRUE(moe->Forward(pool, b.qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(), out.data(),
                                 nullptr).ok());
        if (want.size() <= bi) {
          Compare(l, b, out);
          want.push_back(out);
          continue;
        }
        for (size_t i = 0; i < out.size(); ++i) {
          ASSERT_EQ(out[i].bits, want[bi][i].bits) << threads << " threads, tiling " << t.gate_up_panels << ","
                                                   << t.down_panels << ", qlen " << b.qlen << " at " << i;
        }
      }
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

KT_INSTANTIATE_ALL_PATHS_AND_FORMATS(MoeLayerTest);

}  // namespace
}  // namespace moe_test
}  // namespace kt
