// SftMoeLayers sharing state, on every kernel path and base format: one transposed-weight copy serving two
// layers (its rebuild inside the backward's task list bit-identical to the serial one), one cache pool
// serving two layers (share_cache_pool: bit-identical to per-layer caches in the recompute order, one
// layer's bytes, a clear error when full that loses nothing), and forwards without save_for_backward
// sharing the workspace's scratch entry.
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

TEST_P(SftLayerTest, SharedBackwardWeightsServeTwoLayers) {
  ThreadPool pool(3);
  const SftConfig c = Config(1, false);
  auto bwd = SftBackwardWeights::Create(c.moe, isa(), format());
  ASSERT_TRUE(bwd.ok()) << bwd.status();
  auto ws = std::make_shared<SftWorkspace>();
  const Weights w1 = MakeWeights(kE, H(), I(), kR, 10), w2 = MakeWeights(kE, H(), I(), kR, 11);
  const Batch b1 = MakeBatch(kE, kK, H(), kQlen, 12), b2 = MakeBatch(kE, kK, H(), 33, 13);
  auto l1 = Build(c, w1, pool, *bwd, ws);
  auto l2 = Build(c, w2, pool, *bwd, ws);
  Grads g1 = MakeGrads(w1, 0.0f), g2 = MakeGrads(w2, 0.0f);
  ASSERT_TRUE(l1->SetLora(Tensors(w1, g1)).ok());
  ASSERT_TRUE(l2->SetLora(Tensors(w2, g2)).ok());
  Result r1, r2;
  ForwardOnly(*l1, pool, b1, &r1);
  ForwardOnly(*l2, pool, b2, &r2);
  BackwardOnly(*l2, pool, b2, &r2);
  BackwardOnly(*l1, pool, b1, &r1);
  CheckAll("shared(l2)", r2, &g2, Ref(w2, b2, 2.0, kR));
  CheckAll("shared(l1)", r1, &g1, Ref(w1, b1, 2.0, kR));
  // Reloading l1 with other weights invalidates the shared copy it built: the next backward rebuilds it.
  ASSERT_TRUE(l1->LoadWeights(w2.gate.data(), w2.up.data(), w2.down.data(), nullptr, pool).ok());
  Weights mixed = w1;  // w2's base with w1's LoRA
  mixed.gate = w2.gate;
  mixed.up = w2.up;
  mixed.down = w2.down;
  ForwardOnly(*l1, pool, b1, &r1);
  BackwardOnly(*l1, pool, b1, &r1);
  CheckAll("shared(reload)", r1, &g1, Ref(mixed, b1, 2.0, kR));
  // A shared copy of a different shape is refused by name.
  SftConfig other = c;
  other.moe.hidden = H() + kGroup;
  auto bad = SftMoeLayer::Create(other, isa(), format(), *bwd, nullptr);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

// Bit-for-bit equality of two runs' results (outputs, grad_input, grad_weights, LoRA gradients).
template <typename T>
void ExpectSameBits(const char* name, const std::vector<T>& a, const std::vector<T>& b) {
  ASSERT_EQ(a.size(), b.size()) << name;
  ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)), 0) << name << " differs";
}

void ExpectSameGrads(const Grads& a, const Grads& b) {
  ExpectSameBits("gate_lora_a", a.ga, b.ga);
  ExpectSameBits("gate_lora_b", a.gb, b.gb);
  ExpectSameBits("up_lora_a", a.ua, b.ua);
  ExpectSameBits("up_lora_b", a.ub, b.ub);
  ExpectSameBits("down_lora_a", a.da, b.da);
  ExpectSameBits("down_lora_b", a.db, b.db);
}

// The rebuild of a shared backward copy inside the backward's task list (the default) against the serial
// phase before the backward: every backward takes the copy over from the other layer, and both schedules
// give the same bits (outputs, grad_input, grad_weights, LoRA gradients, accumulated too). Batches of 40 and
// of 5 tokens; MakeBatch never routes to the last expert, whose rebuilds run at the end of the list.
TEST_P(SftLayerTest, OverlappedRebuildMatchesSerial) {
  ThreadPool pool(3);
  const SftConfig c = Config(1, false);
  const Weights w0 = MakeWeights(kE, H(), I(), kR, 40), w1 = MakeWeights(kE, H(), I(), kR, 41);
  const Batch big = MakeBatch(kE, kK, H(), kQlen, 42), small = MakeBatch(kE, kK, H(), 5, 43);
  struct Pair {
    std::unique_ptr<SftMoeLayer> l0, l1;
    Grads g0, g1;
  };
  Pair run[2];  // [0] serial, [1] overlapped
  for (int o = 0; o < 2; ++o) {
    auto bwd = SftBackwardWeights::Create(c.moe, isa(), format());
    ASSERT_TRUE(bwd.ok()) << bwd.status();
    run[o].l0 = Build(c, w0, pool, *bwd);
    run[o].l1 = Build(c, w1, pool, *bwd);
    run[o].g0 = MakeGrads(w0, 0.5f);
    run[o].g1 = MakeGrads(w1, 0.5f);
    ASSERT_TRUE(run[o].l0->SetLora(Tensors(w0, run[o].g0)).ok());
    ASSERT_TRUE(run[o].l1->SetLora(Tensors(w1, run[o].g1)).ok());
    EXPECT_TRUE(run[o].l0->overlapped_rebuild()) << "overlapped is the default";
    run[o].l0->set_overlapped_rebuild(o == 1);
    run[o].l1->set_overlapped_rebuild(o == 1);
  }
  for (const Batch* b : {&big, &small, &big}) {
    for (bool accumulate : {false, true}) {
      Result r[2][2];
      for (int o = 0; o < 2; ++o) {
        ForwardOnly(*run[o].l0, pool, *b, &r[o][0]);
        ForwardOnly(*run[o].l1, pool, *b, &r[o][1]);
        BackwardOnly(*run[o].l1, pool, *b, &r[o][1], accumulate, 0.5f);
        BackwardOnly(*run[o].l0, pool, *b, &r[o][0], accumulate, 0.5f);
        const SftTimes& t = run[o].l0->last_times();
        EXPECT_EQ(t.rebuild_overlapped, o == 1);
        EXPECT_GT(t.rebuild, 0.0) << "every backward takes the copy over from the other layer";
        EXPECT_GE(t.backward, t.rebuild);
      }
      for (int l = 0; l < 2; ++l) {
        ExpectSameBits("output", r[0][l].out, r[1][l].out);
        ExpectSameBits("grad_input", r[0][l].grad_input, r[1][l].grad_input);
        ExpectSameBits("grad_weights", r[0][l].grad_weights, r[1][l].grad_weights);
      }
      ExpectSameGrads(run[0].g0, run[1].g0);
      ExpectSameGrads(run[0].g1, run[1].g1);
    }
  }
  // And the overlapped one is right (reference of the last backward, not accumulated).
  Result r;
  ForwardOnly(*run[1].l1, pool, big, &r);
  BackwardOnly(*run[1].l1, pool, big, &r);
  CheckAll("overlapped rebuild(l1)", r, &run[1].g1, Ref(w1, big, 2.0, kR));
}

// Activation recomputation over two layers: each layer's first forward without save_for_backward (the
// no-grad pass), then in backward order the recompute forward of layer 1 and its backward, then layer 0's.
// A shared pool must give exactly what per-layer caches give (the pool only moves buffers between layers;
// the arithmetic is the same code on the same values, so bit-identical), and hold one layer's bytes.
TEST_P(SftLayerTest, SharedCachePoolMatchesPerLayerCaches) {
  ThreadPool pool(2);
  const Weights w0 = MakeWeights(kE, H(), I(), kR, 20), w1 = MakeWeights(kE, H(), I(), kR, 21);
  // Same qlen and routed row count for both layers, so both layers' caches are of one size.
  const Batch b0 = MakeBatch(kE, kK, H(), kQlen, 22), b1 = MakeBatch(kE, kK, H(), kQlen, 23);
  SftConfig c0 = Config(1, false), c1 = Config(1, false);
  c0.layer_idx = 0;
  c1.layer_idx = 1;
  auto cache_pool = SftCachePool::Create(1);
  ASSERT_TRUE(cache_pool.ok()) << cache_pool.status();
  auto ws = std::make_shared<SftWorkspace>();
  auto l0 = Build(c0, w0, pool), l1 = Build(c1, w1, pool);  // per-layer caches: the reference
  auto s0 = Build(c0, w0, pool, nullptr, ws, *cache_pool), s1 = Build(c1, w1, pool, nullptr, ws, *cache_pool);
  EXPECT_TRUE(s0->shares_cache_pool() && !l0->shares_cache_pool());
  Grads g0 = MakeGrads(w0, 9.0f), g1 = MakeGrads(w1, 9.0f), h0 = MakeGrads(w0, 9.0f), h1 = MakeGrads(w1, 9.0f);
  ASSERT_TRUE(l0->SetLora(Tensors(w0, g0)).ok());
  ASSERT_TRUE(l1->SetLora(Tensors(w1, g1)).ok());
  ASSERT_TRUE(s0->SetLora(Tensors(w0, h0)).ok());
  ASSERT_TRUE(s1->SetLora(Tensors(w1, h1)).ok());
  Result r0, r1, q0, q1;
  for (auto [layer, b, res] : {std::make_tuple(l0.get(), &b0, &r0), std::make_tuple(l1.get(), &b1, &r1),
                               std::make_tuple(s0.get(), &b0, &q0), std::make_tuple(s1.get(), &b1, &q1)}) {
    std::vector<bf16_t> first(b->input.size());  // the no-grad forward
    ASSERT_TRUE(layer->Forward(pool, b->qlen, b->k, b->ids.data(), b->weights.data(), b->input.data(),
                               first.data(), false)
                    .ok());
  }
  // Per-layer: L1 recompute + backward, L0 recompute + backward; the same on the shared layers.
  ForwardOnly(*l1, pool, b1, &r1);
  BackwardOnly(*l1, pool, b1, &r1);
  ForwardOnly(*l0, pool, b0, &r0);
  BackwardOnly(*l0, pool, b0, &r0);
  ForwardOnly(*s1, pool, b1, &q1);
  EXPECT_EQ((*cache_pool)->live(), 1);
  BackwardOnly(*s1, pool, b1, &q1);
  EXPECT_EQ((*cache_pool)->live(), 0);
  ForwardOnly(*s0, pool, b0, &q0);
  BackwardOnly(*s0, pool, b0, &q0);
  for (auto [r, q] : {std::make_pair(&r0, &q0), std::make_pair(&r1, &q1)}) {
    ExpectSameBits("output", r->out, q->out);
    ExpectSameBits("grad_input", r->grad_input, q->grad_input);
    ExpectSameBits("grad_weights", r->grad_weights, q->grad_weights);
  }
  ExpectSameGrads(g0, h0);
  ExpectSameGrads(g1, h1);
  CheckAll("pool(l0)", q0, &h0, Ref(w0, b0, 2.0, kR));  // and both are right (as the other tests check)
  // Memory: per-layer caches keep one entry per layer; the pool one for both layers, counted once (the
  // layers own none). The no-save scratch entry is the workspace's in both cases.
  EXPECT_EQ(s0->cache_bytes() + s1->cache_bytes(), 0u);
  EXPECT_EQ(s0->cache_pool_bytes(), (*cache_pool)->bytes());
  EXPECT_EQ(s1->cache_pool_bytes(), (*cache_pool)->bytes());
  EXPECT_EQ(l0->cache_pool_bytes(), 0u);
  EXPECT_GT(l0->cache_bytes(), 0u);
  EXPECT_EQ(l0->cache_bytes(), l1->cache_bytes());
  EXPECT_EQ((*cache_pool)->bytes(), l0->cache_bytes()) << "the pool should hold one layer's cache bytes";
}

// Forwards without save_for_backward run on the workspace's scratch entry: layers sharing a workspace share
// it (one entry for the model instead of one per layer), own no cache bytes for it, and compute exactly
// what a layer with its own workspace computes.
TEST_P(SftLayerTest, NoSaveForwardsShareTheWorkspaceScratch) {
  ThreadPool pool(2);
  const Weights w0 = MakeWeights(kE, H(), I(), kR, 30), w1 = MakeWeights(kE, H(), I(), kR, 31);
  const Batch b = MakeBatch(kE, kK, H(), kQlen, 32);
  auto ws = std::make_shared<SftWorkspace>();
  auto s0 = Build(Config(1, false), w0, pool, nullptr, ws), s1 = Build(Config(1, false), w1, pool, nullptr, ws);
  auto own = Build(Config(1, false), w1, pool);  // its own workspace: the reference
  Grads g0 = MakeGrads(w0, 9.0f), g1 = MakeGrads(w1, 9.0f), g2 = MakeGrads(w1, 9.0f);
  ASSERT_TRUE(s0->SetLora(Tensors(w0, g0)).ok());
  ASSERT_TRUE(s1->SetLora(Tensors(w1, g1)).ok());
  ASSERT_TRUE(own->SetLora(Tensors(w1, g2)).ok());
  std::vector<bf16_t> out0(b.input.size()), out1(b.input.size()), ref(b.input.size());
  auto forward = [&](SftMoeLayer& l, std::vector<bf16_t>& out) {
    ASSERT_TRUE(
        l.Forward(pool, b.qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(), out.data(), false).ok());
  };
  forward(*s0, out0);
  const size_t ws_bytes = s0->workspace_bytes();
  forward(*s1, out1);
  forward(*own, ref);
  EXPECT_EQ(s1->workspace_bytes(), ws_bytes) << "the second layer's no-save forward reuses the scratch";
  EXPECT_EQ(s0->cache_bytes() + s1->cache_bytes() + own->cache_bytes(), 0u);
  EXPECT_GT(ws_bytes, 0u);
  ExpectSameBits("output", out1, ref);
  EXPECT_EQ(s1->cache_depth(), 0);
}

// A pooled forward that would exceed the pool fails by name and changes nothing: layer 1's cached forward
// still gives the right gradients, layer 0 caches once it is consumed, and forwards without
// save_for_backward run meanwhile (on the workspace's scratch entry, not layer 1's).
TEST_P(SftLayerTest, SharedCachePoolFullIsClearAndLosesNothing) {
  ThreadPool pool(2);
  const Batch b0 = MakeBatch(kE, kK, H(), kQlen, 26), b1 = MakeBatch(kE, kK, H(), 29, 27);
  auto pair = MakePooledPair(pool, 1, 24, 0);
  const Weights &w0 = pair->w0, &w1 = pair->w1;
  auto &cache_pool = pair->cache_pool;
  auto &l0 = pair->l0, &l1 = pair->l1;
  Grads &g0 = pair->g0, &g1 = pair->g1;
  Result r0, r1;
  ForwardOnly(*l1, pool, b1, &r1);
  const size_t bytes = cache_pool->bytes();
  std::vector<bf16_t> out(b0.input.size(), F32ToBf16(7.0f));
  absl::Status s = l0->Forward(pool, b0.qlen, b0.k, b0.ids.data(), b0.weights.data(), b0.input.data(),
                               out.data(), true);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  for (const char* part : {"on layer 0", "share_cache_pool", "max_cache_depth = 1", "layer 1 holds 1",
                           "recompute", "per-layer caches"}) {
    EXPECT_NE(s.message().find(part), std::string::npos) << "missing '" << part << "' in: " << s;
  }
  for (const bf16_t& v : out) ASSERT_EQ(Bf16ToF32(v), 7.0f) << "the failed forward wrote its output";
  EXPECT_EQ(l0->cache_depth(), 0);
  EXPECT_EQ(l1->cache_depth(), 1);
  EXPECT_EQ(cache_pool->live(), 1);
  EXPECT_EQ(cache_pool->bytes(), bytes);
  // A forward without save_for_backward is not limited by the pool and must not touch layer 1's entry.
  ASSERT_TRUE(l0->Forward(pool, b0.qlen, b0.k, b0.ids.data(), b0.weights.data(), b0.input.data(),
                          out.data(), false)
                  .ok());
  const Expected ex0 = Ref(w0, b0, 2.0, kR);
  EXPECT_LE(RelErr(out, ex0.out), tol()) << "no-save forward while the pool is full";
  BackwardOnly(*l1, pool, b1, &r1);
  CheckAll("pool full(l1)", r1, &g1, Ref(w1, b1, 2.0, kR));
  ForwardOnly(*l0, pool, b0, &r0);
  BackwardOnly(*l0, pool, b0, &r0);
  CheckAll("pool full(l0)", r0, &g0, ex0);
  // A backward with nothing cached stays the per-layer error, though the pool has free entries.
  ExpectNothingCached(*l0, pool, b0);
}

// max_cache_depth = 2 with a pool: two forwards of one layer then two backwards (LIFO), and two layers
// with one cached forward each; a third forward names both holders. A layer must have the pool's depth,
// and a layer destroyed with a cached forward gives its entry back.
TEST_P(SftLayerTest, SharedCachePoolDepthTwo) {
  ThreadPool pool(2);
  const Batch b1 = MakeBatch(kE, kK, H(), kQlen, 32), b2 = MakeBatch(kE, kK, H(), 17, 33);
  auto pair = MakePooledPair(pool, 2, 30, -1);  // layer 0 without layer_idx: named by its creation number
  const Weights &w0 = pair->w0, &w1 = pair->w1;
  auto &cache_pool = pair->cache_pool;
  auto &l0 = pair->l0, &l1 = pair->l1;
  Grads &g0 = pair->g0, &g1 = pair->g1;
  Result r1, r2;
  ForwardOnly(*l0, pool, b1, &r1);
  ForwardOnly(*l0, pool, b2, &r2);
  EXPECT_EQ(cache_pool->live(), 2);
  BackwardOnly(*l0, pool, b2, &r2);
  CheckAll("pool lifo(2nd)", r2, &g0, Ref(w0, b2, 2.0, kR));
  BackwardOnly(*l0, pool, b1, &r1);
  CheckAll("pool lifo(1st)", r1, &g0, Ref(w0, b1, 2.0, kR));
  // One cached forward on each layer fills the pool; a third names both.
  Result q0, q1;
  ForwardOnly(*l1, pool, b1, &q1);
  ForwardOnly(*l0, pool, b2, &q0);
  std::vector<bf16_t> out(b1.input.size());
  absl::Status s = l1->Forward(pool, b1.qlen, b1.k, b1.ids.data(), b1.weights.data(), b1.input.data(),
                               out.data(), true);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find("layer 1 holds 1 and unnumbered layer #"), std::string::npos) << s;
  EXPECT_NE(s.message().find("max_cache_depth = 2"), std::string::npos) << s;
  BackwardOnly(*l1, pool, b1, &q1);  // out of pool order: each layer pops its own
  CheckAll("pool two layers(l1)", q1, &g1, Ref(w1, b1, 2.0, kR));
  BackwardOnly(*l0, pool, b2, &q0);
  CheckAll("pool two layers(l0)", q0, &g0, Ref(w0, b2, 2.0, kR));
  // The pool's depth is the layers' depth.
  auto bad = SftMoeLayer::Create(Config(1, false), isa(), format(), nullptr, nullptr, cache_pool);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("max_cache_depth = 2"), std::string::npos) << bad.status();
  EXPECT_EQ(SftCachePool::Create(0).status().code(), absl::StatusCode::kInvalidArgument);
  // A layer destroyed while its forward waits gives the entry back to the pool.
  ForwardOnly(*l1, pool, b1, &q1);
  ForwardOnly(*l1, pool, b2, &q1);
  EXPECT_EQ(cache_pool->live(), 2);
  const size_t bytes = cache_pool->bytes();
  l1.reset();
  EXPECT_EQ(cache_pool->live(), 0);
  EXPECT_EQ(cache_pool->bytes(), bytes) << "entries are kept for their buffers";
  ForwardOnly(*l0, pool, b1, &q0);
  BackwardOnly(*l0, pool, b1, &q0);
  CheckAll("pool after destroy(l0)", q0, &g0, Ref(w0, b1, 2.0, kR));
}

KT_INSTANTIATE_SFT_PATHS_AND_FORMATS(SftLayerTest);

}  // namespace
}  // namespace sft_test
}  // namespace kt
