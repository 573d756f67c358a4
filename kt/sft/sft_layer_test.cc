// SftMoeLayer's math on every kernel path and base format against the double-precision reference
// (sft_layer_test_util.h explains the tolerances): forward and backward, the cache stack (depth error,
// LIFO), SkipLoRA, accumulate/scale, and the argument errors. Sharing between layers: sft_layer_sharing_test.
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/sft/sft_layer.h"
#include "kt/sft/sft_layer_test_util.h"

namespace kt {
namespace sft_test {
namespace {

TEST_P(SftLayerTest, ForwardBackwardMatchReference) {
  ThreadPool pool(3);
  const Weights w = MakeWeights(kE, H(), I(), kR, 1);
  const Batch b = MakeBatch(kE, kK, H(), kQlen, 2);
  auto l = Build(Config(1, false), w, pool);
  Grads g = MakeGrads(w, 123.0f);  // garbage that must be overwritten (zeros for the unused expert)
  ASSERT_TRUE(l->SetLora(Tensors(w, g)).ok());
  Result res;
  ForwardOnly(*l, pool, b, &res);
  BackwardOnly(*l, pool, b, &res);
  CheckAll("fwd+bwd", res, &g, Ref(w, b, 2.0, kR));
  if (UsesEffectiveWeights(format())) {
    // The int4 (fp8) format's own error, against the reference on the unquantized weights (the number to set
    // beside the original's accepted 0.12-0.18 relative L2; this is the stricter worst element / max).
    const Expected plain = Reference(w, b, 2.0, kR);
    const std::pair<const char*, double> errs[] = {
        {"output", RelErr(res.out, plain.out)},
        {"grad_input", RelErr(res.grad_input, plain.grads.input)},
        {"grad_weights", RelErr(res.grad_weights, plain.grads.weights)},
        {"gate_lora_a", RelErr(g.ga, plain.grads.a_gate)},
        {"gate_lora_b", RelErr(g.gb, plain.grads.b_gate)},
        {"up_lora_a", RelErr(g.ua, plain.grads.a_up)},
        {"up_lora_b", RelErr(g.ub, plain.grads.b_up)},
        {"down_lora_a", RelErr(g.da, plain.grads.a_down)},
        {"down_lora_b", RelErr(g.db, plain.grads.b_down)}};
    for (const auto& [name, err] : errs) {
      std::printf("format error %s %s %-13s worst err / max|ref| vs unquantized = %.4f\n", IsaName(isa()),
                  ExpertFormatName(format()), name, err);
      EXPECT_LE(err, kInt4FormatTol) << name;
    }
  }
  EXPECT_EQ(res.grad_weights[3 * kK + 1], 0.0f) << "an invalid slot has no router gradient";
  const size_t unused = kE - 1;
  for (size_t i = 0; i < static_cast<size_t>(kR * H()); ++i) ASSERT_EQ(g.ga[unused * kR * H() + i].bits, 0) << i;
  EXPECT_EQ(l->cache_depth(), 0);
}

TEST_P(SftLayerTest, CacheStackIsLifoAndBounded) {
  ThreadPool pool(2);
  const Weights w = MakeWeights(kE, H(), I(), kR, 3);
  const Batch b1 = MakeBatch(kE, kK, H(), kQlen, 4);
  const Batch b2 = MakeBatch(kE, kK, H(), 17, 5);
  auto l = Build(Config(2, false), w, pool);
  Grads g = MakeGrads(w, 0.0f);
  ASSERT_TRUE(l->SetLora(Tensors(w, g)).ok());
  Result r1, r2;
  ForwardOnly(*l, pool, b1, &r1);
  ForwardOnly(*l, pool, b2, &r2);
  // A third cached forward exceeds max_cache_depth = 2; one without save_for_backward is fine.
  std::vector<bf16_t> out(b1.input.size());
  absl::Status s = l->Forward(pool, b1.qlen, b1.k, b1.ids.data(), b1.weights.data(), b1.input.data(),
                              out.data(), true);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("max_cache_depth = 2"), std::string::npos) << s;
  ASSERT_TRUE(l->Forward(pool, b1.qlen, b1.k, b1.ids.data(), b1.weights.data(), b1.input.data(),
                         out.data(), false)
                  .ok());
  EXPECT_EQ(RelErr(out, Ref(w, b1, 2.0, kR).out), RelErr(r1.out, Ref(w, b1, 2.0, kR).out));
  EXPECT_EQ(l->cache_depth(), 2);
  // Newest first: b2's gradients, then b1's.
  BackwardOnly(*l, pool, b2, &r2);
  CheckAll("lifo(2nd)", r2, &g, Ref(w, b2, 2.0, kR));
  BackwardOnly(*l, pool, b1, &r1);
  CheckAll("lifo(1st)", r1, &g, Ref(w, b1, 2.0, kR));
  ExpectNothingCached(*l, pool, b1);
}

TEST_P(SftLayerTest, SkipLoraGivesInputAndRouterGradients) {
  ThreadPool pool(2);
  const Weights w = MakeWeights(kE, H(), I(), kR, 6);
  const Batch b = MakeBatch(kE, kK, H(), kQlen, 7);
  auto l = Build(Config(1, true), w, pool);
  EXPECT_EQ(l->rank(), 0);
  Result res;
  ForwardOnly(*l, pool, b, &res);  // no SetLora needed
  BackwardOnly(*l, pool, b, &res);
  CheckAll("skip_lora", res, nullptr, Ref(w, b, 0.0, 0));
}

TEST_P(SftLayerTest, AccumulateAndScale) {
  ThreadPool pool(2);
  const Weights w = MakeWeights(kE, H(), I(), kR, 8);
  const Batch b = MakeBatch(kE, kK, H(), kQlen, 9);
  auto l = Build(Config(2, false), w, pool);
  Grads g = MakeGrads(w, 5.0f);
  ASSERT_TRUE(l->SetLora(Tensors(w, g)).ok());
  Result res;
  ForwardOnly(*l, pool, b, &res);
  ForwardOnly(*l, pool, b, &res);
  // 0.25 g, then + 0.75 g: the sum of two scaled passes is the full gradient.
  BackwardOnly(*l, pool, b, &res, /*accumulate=*/false, 0.25f);
  BackwardOnly(*l, pool, b, &res, /*accumulate=*/true, 0.75f);
  CheckAll("accumulate", res, &g, Ref(w, b, 2.0, kR));
  // The unused expert keeps what the first (non-accumulating) pass wrote: zeros.
  for (size_t i = 0; i < static_cast<size_t>(H() * kR); ++i) ASSERT_EQ(g.db[(kE - 1) * H() * kR + i].bits, 0) << i;
}

TEST_P(SftLayerTest, ClearErrors) {
  ThreadPool pool(1);
  const Weights w = MakeWeights(kE, H(), I(), kR, 14);
  const Batch b = MakeBatch(kE, kK, H(), 8, 15);
  auto l = Build(Config(1, false), w, pool);
  std::vector<bf16_t> out(b.input.size());
  absl::Status s = l->Forward(pool, b.qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(),
                              out.data(), true);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("init_lora_weights"), std::string::npos) << s;
  SftLoraTensors t;
  s = l->SetLora(t);
  EXPECT_NE(s.message().find("gate_lora_a"), std::string::npos) << s;
  SftConfig c = Config(0, false);
  EXPECT_EQ(SftMoeLayer::Create(c, isa(), format()).status().code(), absl::StatusCode::kInvalidArgument);
}

KT_INSTANTIATE_SFT_PATHS_AND_FORMATS(SftLayerTest);

}  // namespace
}  // namespace sft_test
}  // namespace kt
