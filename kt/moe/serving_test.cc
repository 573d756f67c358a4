// ServingForward and SplitDeferredExperts (serving.h) against MoeLayer::Forward and the double-precision
// MoeForwardReference: int32 and int64 ids, padded rows (-1), the batch size read through its pointer at
// run time, the GPU-expert mask changed between runs, chunked vs unchunked, accumulate, and deferred +
// immediate equal to running every expert at once. On the best path of this CPU (KT_ISA caps it).
#include "kt/moe/serving.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/moe_reference.h"
#include "kt/runtime/thread_pool.h"
#include "kt/runtime/task_queue.h"

namespace kt {
namespace {

constexpr int kE = 8, kK = 3, kH = 64, kI = 48, kMaxLen = 16, kCapacity = 40;

struct Fixture {
  MoeConfig config{kE, kK, kH, kI, kMaxLen};
  std::vector<bf16_t> gate, up, down;
  std::unique_ptr<MoeLayer> layer;
  ThreadPool pool{2};

  Fixture() {
    std::mt19937 rng(7);
    std::normal_distribution<float> n(0.0f, 1.0f);
    auto fill = [&](std::vector<bf16_t>& v, size_t count, float scale) {
      v.resize(count);
      for (auto& x : v) x = F32ToBf16(n(rng) * scale);
    };
    fill(gate, size_t{kE} * kI * kH, 1.0f / std::sqrt(float{kH}));
    fill(up, size_t{kE} * kI * kH, 1.0f / std::sqrt(float{kH}));
    fill(down, size_t{kE} * kH * kI, 1.0f / std::sqrt(float{kI}));
    const Isa isa = ResolveIsa("", GetCpuFeatures()).value();
    layer = MoeLayer::Create(config, isa).value();
    EXPECT_TRUE(layer->LoadWeights(gate.data(), up.data(), down.data(), nullptr, pool).ok());
  }
  // The reference output of `qlen` rows, rounded to bf16 as the layer rounds.
  std::vector<float> Reference(int qlen, const std::vector<int64_t>& ids, const std::vector<float>& w,
                               const std::vector<bf16_t>& x, const bool* mask) const {
    std::vector<float> out(size_t(qlen) * kH);
    MoeForwardReference(config, qlen, kK, ids.data(), w.data(), x.data(), gate.data(), up.data(), down.data(),
                        mask, out.data());
    return out;
  }
};

struct Rows {
  std::vector<int64_t> ids = std::vector<int64_t>(size_t{kCapacity} * kK, -1);
  std::vector<int32_t> ids32 = std::vector<int32_t>(size_t{kCapacity} * kK, -1);
  std::vector<float> weights = std::vector<float>(size_t{kCapacity} * kK, 0.0f);
  std::vector<bf16_t> input = std::vector<bf16_t>(size_t{kCapacity} * kH);
  std::vector<bf16_t> output = std::vector<bf16_t>(size_t{kCapacity} * kH);
  int32_t batch_size = 0;

  // Random rows; every 5th slot is padding (-1).
  void Fill(int qlen, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_int_distribution<int> pick(0, kE - 1);
    std::uniform_real_distribution<float> w(0.05f, 1.0f);
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (int i = 0; i < qlen * kK; ++i) {
      ids[i] = i % 5 == 4 ? -1 : pick(rng);
      ids32[i] = static_cast<int32_t>(ids[i]);
      weights[i] = w(rng);
    }
    for (int i = 0; i < qlen * kH; ++i) input[i] = F32ToBf16(n(rng));
    batch_size = qlen;
  }
  ServingBuffers Buffers(bool int32) {
    ServingBuffers b;
    b.batch_size = &batch_size;
    b.capacity = kCapacity;
    b.k = kK;
    b.ids = int32 ? static_cast<const void*>(ids32.data()) : ids.data();
    b.ids_int32 = int32;
    b.weights = weights.data();
    b.input = input.data();
    b.output = output.data();
    return b;
  }
};

// |a - ref| <= tol * max|ref| over the first n values (bf16 output: relative rounding 2^-8, plus the
// kernels' fp32 vs the reference's double accumulation; 2e-2 of the largest value covers both).
void ExpectClose(const bf16_t* a, const std::vector<float>& ref, size_t n, double tol = 2e-2) {
  double max_ref = 0;
  for (size_t i = 0; i < n; ++i) max_ref = std::max(max_ref, std::abs(double(ref[i])));
  ASSERT_GT(max_ref, 0.0);
  for (size_t i = 0; i < n; ++i) {
    ASSERT_NEAR(Bf16ToF32(a[i]), ref[i], tol * max_ref) << "at " << i;
  }
}

TEST(ServingForwardTest, Int32AndInt64IdsMatchTheReferenceAndEachOther) {
  Fixture f;
  Rows r32, r64;
  r32.Fill(11, 1);
  r64.Fill(11, 1);
  auto a = ServingForward::Create(f.layer.get(), &f.pool, r32.Buffers(true), kMaxLen).value();
  auto b = ServingForward::Create(f.layer.get(), &f.pool, r64.Buffers(false), kMaxLen).value();
  ASSERT_TRUE(a->Run().ok());
  ASSERT_TRUE(b->Run().ok());
  EXPECT_EQ(std::memcmp(r32.output.data(), r64.output.data(), 11 * kH * sizeof(bf16_t)), 0);
  ExpectClose(r64.output.data(), f.Reference(11, r64.ids, r64.weights, r64.input, nullptr), 11 * kH);
}

TEST(ServingForwardTest, BatchSizeIsReadWhenTheTaskRuns) {
  Fixture f;
  Rows r;
  r.Fill(kCapacity, 2);
  auto fwd = ServingForward::Create(f.layer.get(), &f.pool, r.Buffers(true), kMaxLen).value();
  TaskQueue queue;
  for (int qlen : {1, 7, kCapacity, 3}) {
    std::fill(r.output.begin(), r.output.end(), F32ToBf16(1024.0f));
    r.batch_size = qlen;  // after the task object exists, before it runs
    queue.Submit(fwd->task());
    ASSERT_TRUE(queue.Sync().ok());
    ExpectClose(r.output.data(), f.Reference(qlen, r.ids, r.weights, r.input, nullptr), size_t(qlen) * kH);
    // Rows past the batch are left alone.
    if (qlen < kCapacity) EXPECT_EQ(Bf16ToF32(r.output[size_t(qlen) * kH]), 1024.0f);
  }
}

TEST(ServingForwardTest, ChunkedEqualsUnchunked) {
  Fixture f;
  Rows whole, chunked;
  whole.Fill(kMaxLen, 3);
  chunked.Fill(kMaxLen, 3);
  ASSERT_TRUE(ServingForward::Create(f.layer.get(), &f.pool, whole.Buffers(false), kMaxLen).value()->Run().ok());
  ASSERT_TRUE(ServingForward::Create(f.layer.get(), &f.pool, chunked.Buffers(false), 3).value()->Run().ok());
  // Each token's output depends only on its own row: the same up to the kernels' per-row blocking.
  ExpectClose(chunked.output.data(), f.Reference(kMaxLen, whole.ids, whole.weights, whole.input, nullptr),
              kMaxLen * kH);
  ExpectClose(whole.output.data(), f.Reference(kMaxLen, whole.ids, whole.weights, whole.input, nullptr),
              kMaxLen * kH);
}

TEST(ServingForwardTest, LongerThanMaxLenRunsInChunks) {
  Fixture f;
  Rows r;
  r.Fill(kCapacity, 4);  // 40 rows > max_len 16: three Forwards
  ASSERT_TRUE(ServingForward::Create(f.layer.get(), &f.pool, r.Buffers(false), 1000).value()->Run().ok());
  ExpectClose(r.output.data(), f.Reference(kCapacity, r.ids, r.weights, r.input, nullptr), kCapacity * kH);
}

TEST(ServingForwardTest, MaskIsReadEveryRun) {
  Fixture f;
  Rows r;
  r.Fill(9, 5);
  bool mask[kE] = {};
  ServingBuffers b = r.Buffers(true);
  b.gpu_experts_mask = mask;
  auto fwd = ServingForward::Create(f.layer.get(), &f.pool, b, kMaxLen).value();
  for (int round = 0; round < 3; ++round) {
    for (int e = 0; e < kE; ++e) mask[e] = (e + round) % 3 == 0;  // flipped in place between runs
    ASSERT_TRUE(fwd->Run().ok());
    ExpectClose(r.output.data(), f.Reference(9, r.ids, r.weights, r.input, mask), 9 * kH);
  }
}

TEST(ServingForwardTest, AccumulateAddsToTheOutputThere) {
  Fixture f;
  Rows r;
  r.Fill(6, 6);
  ServingBuffers b = r.Buffers(false);
  b.accumulate = true;
  std::vector<float> prev(6 * kH);
  for (size_t i = 0; i < prev.size(); ++i) {
    r.output[i] = F32ToBf16(0.25f * static_cast<float>(i % 7) - 0.5f);
    prev[i] = Bf16ToF32(r.output[i]);
  }
  ASSERT_TRUE(ServingForward::Create(f.layer.get(), &f.pool, b, kMaxLen).value()->Run().ok());
  std::vector<float> ref = f.Reference(6, r.ids, r.weights, r.input, nullptr);
  for (size_t i = 0; i < ref.size(); ++i) ref[i] += prev[i];
  ExpectClose(r.output.data(), ref, 6 * kH);
}

TEST(ServingForwardTest, DeferredPlusImmediateEqualsAllExpertsAtOnce) {
  Fixture f;
  // Few tokens, so that some experts are protected by none of them and something is deferred.
  constexpr int kT = 3;
  for (int d = 1; d < kK; ++d) {
    Rows r;
    r.Fill(kT, 10 + d);
    std::vector<int64_t> now(kT * kK), later(kT * kK);
    ASSERT_TRUE(SplitDeferredExperts(r.ids32.data(), true, r.weights.data(), kT, kK, kE, d, now.data(),
                                     later.data())
                    .ok());
    // Every valid (token, slot) lands in exactly one set, under its own id.
    int deferred = 0;
    for (int i = 0; i < kT * kK; ++i) {
      if (r.ids[i] < 0) {
        EXPECT_EQ(now[i], -1);
        EXPECT_EQ(later[i], -1);
      } else {
        EXPECT_NE(now[i] >= 0, later[i] >= 0) << i;
        EXPECT_EQ(std::max(now[i], later[i]), r.ids[i]);
        deferred += later[i] >= 0;
      }
    }
    // The deferred experts of layer L are computed into the next layer's output first; that layer's
    // immediate forward accumulates onto them. Here both are the same layer, so the sum must be the full
    // forward.
    Rows deferred_rows = r, immediate_rows = r;
    std::copy(later.begin(), later.end(), deferred_rows.ids.begin());
    std::copy(now.begin(), now.end(), immediate_rows.ids.begin());
    ASSERT_TRUE(
        ServingForward::Create(f.layer.get(), &f.pool, deferred_rows.Buffers(false), kMaxLen).value()->Run().ok());
    immediate_rows.output = deferred_rows.output;
    ServingBuffers b = immediate_rows.Buffers(false);
    b.accumulate = true;
    ASSERT_TRUE(ServingForward::Create(f.layer.get(), &f.pool, b, kMaxLen).value()->Run().ok());
    ExpectClose(immediate_rows.output.data(), f.Reference(kT, r.ids, r.weights, r.input, nullptr), kT * kH);
    EXPECT_GT(deferred, 0) << "d=" << d << ": nothing was deferred, the test proves nothing";
  }
}

TEST(ServingForwardTest, DeferredModeSplitsInsideTheTask) {
  // The engine's flow: layer L's task computes its immediate experts (onto what layer L-1 deferred into
  // its output) and leaves the deferred ids; the deferred task, queued right after it, computes those into
  // the next layer's output. Together they must be every expert of the rows.
  Fixture f;
  constexpr int kT = 3;
  Rows r;
  r.Fill(kT, 21);
  std::vector<int64_t> deferred_ids(size_t{kCapacity} * kK, -1);
  std::vector<bf16_t> next_out(size_t{kCapacity} * kH);
  ServingBuffers immediate = r.Buffers(true);
  immediate.max_deferred = 1;
  immediate.deferred_ids = deferred_ids.data();
  ServingBuffers later = r.Buffers(false);
  later.ids = deferred_ids.data();
  later.output = next_out.data();
  auto now_task = ServingForward::Create(f.layer.get(), &f.pool, immediate, kMaxLen).value();
  auto later_task = ServingForward::Create(f.layer.get(), &f.pool, later, kMaxLen).value();
  TaskQueue queue;
  queue.Submit(now_task->task());
  queue.Submit(later_task->task());
  ASSERT_TRUE(queue.Sync().ok());
  // immediate + deferred = all experts of these rows.
  std::vector<float> sum(kT * kH);
  for (int i = 0; i < kT * kH; ++i) sum[i] = Bf16ToF32(r.output[i]) + Bf16ToF32(next_out[i]);
  std::vector<bf16_t> sum_bf16(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) sum_bf16[i] = F32ToBf16(sum[i]);
  ExpectClose(sum_bf16.data(), f.Reference(kT, r.ids, r.weights, r.input, nullptr), kT * kH);
  int deferred = 0;
  for (int i = 0; i < kT * kK; ++i) deferred += deferred_ids[i] >= 0;
  EXPECT_GT(deferred, 0);
}

TEST(MoeLayerOutputTest, Fp32AndAddModesAreTheBf16ResultBeforeItsRounding) {
  // Forward's three outputs come from the same fp32 sums: bf16 = round(f32), add = round(prev + f32).
  Fixture f;
  Rows r;
  r.Fill(7, 30);
  std::vector<bf16_t> plain(7 * kH), added(7 * kH);
  std::vector<float> f32(7 * kH);
  ASSERT_TRUE(f.layer->Forward(f.pool, 7, kK, r.ids.data(), r.weights.data(), r.input.data(), plain.data(),
                               nullptr).ok());
  MoeLayer::Output o32;
  o32.f32 = f32.data();
  ASSERT_TRUE(f.layer->Forward(f.pool, 7, kK, r.ids.data(), r.weights.data(), r.input.data(), o32, nullptr).ok());
  for (size_t i = 0; i < added.size(); ++i) added[i] = F32ToBf16(0.125f * static_cast<float>(i % 9));
  const std::vector<bf16_t> prev = added;
  MoeLayer::Output oadd;
  oadd.bf16 = added.data();
  oadd.add = true;
  ASSERT_TRUE(f.layer->Forward(f.pool, 7, kK, r.ids.data(), r.weights.data(), r.input.data(), oadd, nullptr).ok());
  for (size_t i = 0; i < f32.size(); ++i) {
    ASSERT_EQ(F32ToBf16(f32[i]).bits, plain[i].bits) << i;
    ASSERT_EQ(F32ToBf16(Bf16ToF32(prev[i]) + f32[i]).bits, added[i].bits) << i;
  }
  MoeLayer::Output both;
  both.bf16 = plain.data();
  both.f32 = f32.data();
  EXPECT_EQ(f.layer->Forward(f.pool, 7, kK, r.ids.data(), r.weights.data(), r.input.data(), both, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SplitDeferredExpertsTest, ProtectsEachTokensTopWeightsAcrossTheBatch) {
  // Token 0 picks experts 1, 2, 3 with weights .5 .3 .2; token 1 picks 3, 4, 5 with .6 .3 .1. D = 1:
  // protected = {1, 2} from token 0 and {3, 4} from token 1, so token 0's expert 3 runs now too (protected
  // by token 1), and only token 1's expert 5 is deferred.
  const int64_t ids[] = {1, 2, 3, 3, 4, 5};
  const float w[] = {0.5f, 0.3f, 0.2f, 0.6f, 0.3f, 0.1f};
  int64_t now[6], later[6];
  ASSERT_TRUE(SplitDeferredExperts(ids, false, w, 2, 3, kE, 1, now, later).ok());
  EXPECT_EQ(std::vector<int64_t>(now, now + 6), (std::vector<int64_t>{1, 2, 3, 3, 4, -1}));
  EXPECT_EQ(std::vector<int64_t>(later, later + 6), (std::vector<int64_t>{-1, -1, -1, -1, -1, 5}));
}

TEST(ServingErrorsTest, BadArgumentsAreNamed) {
  Fixture f;
  Rows r;
  r.Fill(4, 1);
  ServingBuffers b = r.Buffers(false);
  b.k = kK + 1;
  auto s = ServingForward::Create(f.layer.get(), &f.pool, b, kMaxLen).status();
  EXPECT_NE(s.message().find("num_experts_per_tok"), absl::string_view::npos) << s;
  auto fwd = ServingForward::Create(f.layer.get(), &f.pool, r.Buffers(false), kMaxLen).value();
  r.batch_size = kCapacity + 1;
  absl::Status run = fwd->Run();
  EXPECT_EQ(run.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(run.message().find("batch size"), absl::string_view::npos) << run;
  int64_t now[3], later[3];
  absl::Status d = SplitDeferredExperts(r.ids.data(), false, r.weights.data(), 1, kK, kE, kK, now, later);
  EXPECT_NE(d.message().find("max_deferred_experts_per_token"), absl::string_view::npos) << d;
}

}  // namespace
}  // namespace kt
