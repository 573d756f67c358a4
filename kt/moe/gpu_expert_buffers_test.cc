// WriteExpertToGpuBuffers against the canonical weights it was loaded from, sliced per GPU TP rank (bf16:
// bit for bit, with and without a pool, with a physical_to_logical map), and its argument checks (each
// names the argument; nothing is written). The FP8 path is covered from Python (gpu_buffer_test.py), where
// the checkpoint's bytes are at hand.

#include "kt/moe/gpu_expert_buffers.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/task_queue.h"
#include "kt/runtime/thread_pool.h"

namespace kt {
namespace {

// A bf16 test layer's shape: E experts of H x I, top-2, up to 4 tokens.
MoeConfig SmallConfig(int E, int H, int I) {
  MoeConfig c;
  c.num_experts = E;
  c.top_k = 2;
  c.hidden = H;
  c.intermediate = I;
  c.max_len = 4;
  return c;
}

constexpr int E = 3, H = 48, I = 64;

struct Fixture {
  std::vector<bf16_t> gate, up, down;
  std::unique_ptr<MoeLayer> layer;
};

Fixture Load(const int64_t* p2l, ThreadPool& pool) {
  Fixture f;
  std::mt19937 rng(5);
  auto fill = [&](std::vector<bf16_t>& v) {
    v.resize(static_cast<size_t>(E) * I * H);
    for (bf16_t& x : v) x.bits = static_cast<uint16_t>(rng() & 0x3fff);  // finite values, all mantissas
  };
  fill(f.gate);
  fill(f.up);
  fill(f.down);
  auto layer = MoeLayer::Create(SmallConfig(E, H, I), BestIsa(GetCpuFeatures()), ExpertFormat::kBf16);
  EXPECT_TRUE(layer.ok()) << layer.status();
  f.layer = std::move(*layer);
  EXPECT_TRUE(f.layer->LoadWeights(f.gate.data(), f.up.data(), f.down.data(), p2l, pool).ok());
  return f;
}

uint16_t Bits(const std::vector<uint16_t>& v, size_t i) { return v[i]; }

TEST(GpuExpertBuffersTest, Bf16SlicesPerRankBitExact) {
  ThreadPool pool(ThreadPoolOptions{3, false});
  const int64_t p2l[E] = {2, 0, 1};
  Fixture f = Load(p2l, pool);
  for (int tp : {1, 2, 4}) {
    for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
      const size_t n = I / tp;
      for (int slot = 0; slot < E; ++slot) {
        std::vector<std::vector<uint16_t>> w13(tp, std::vector<uint16_t>(2 * n * H, 0xAAAA));
        std::vector<std::vector<uint16_t>> w2(tp, std::vector<uint16_t>(H * n, 0xAAAA));
        GpuExpertBuffers b;
        for (int r = 0; r < tp; ++r) {
          b.w13_weight.push_back(reinterpret_cast<std::uintptr_t>(w13[r].data()));
          b.w2_weight.push_back(reinterpret_cast<std::uintptr_t>(w2[r].data()));
        }
        ASSERT_TRUE(WriteExpertToGpuBuffers(f.layer->experts(), tp, slot, b, p).ok());
        const size_t e = static_cast<size_t>(p2l[slot]);
        const size_t base = e * I * H;
        for (int r = 0; r < tp; ++r) {
          for (size_t i = 0; i < n; ++i) {
            for (size_t h = 0; h < static_cast<size_t>(H); ++h) {
              const size_t row = r * n + i;
              ASSERT_EQ(Bits(w13[r], i * H + h), f.gate[base + row * H + h].bits) << tp << " " << r;
              ASSERT_EQ(Bits(w13[r], (n + i) * H + h), f.up[base + row * H + h].bits) << tp << " " << r;
              ASSERT_EQ(Bits(w2[r], h * n + i), f.down[base + h * I + row].bits) << tp << " " << r;
            }
          }
        }
      }
    }
  }
}

TEST(GpuExpertBuffersTest, QueuedTaskWrites) {
  ThreadPool pool(ThreadPoolOptions{2, false});
  Fixture f = Load(nullptr, pool);
  std::vector<uint16_t> w13(2 * I * H), w2(H * I);
  GpuExpertBuffers b;
  b.w13_weight = {reinterpret_cast<std::uintptr_t>(w13.data())};
  b.w2_weight = {reinterpret_cast<std::uintptr_t>(w2.data())};
  TaskQueue q;
  GpuExpertWrite write(f.layer.get(), &pool, 1, 1, b);
  q.Submit(write.task());
  ASSERT_TRUE(q.Sync().ok());
  EXPECT_EQ(write.task()->runs(), 1u);
  EXPECT_EQ(0, std::memcmp(w13.data(), f.gate.data() + I * H, I * H * 2));
  EXPECT_EQ(0, std::memcmp(w13.data() + I * H, f.up.data() + I * H, I * H * 2));
  EXPECT_EQ(0, std::memcmp(w2.data(), f.down.data() + I * H, I * H * 2));
}

TEST(GpuExpertBuffersTest, BadArgumentsAreNamedAndNothingIsWritten) {
  ThreadPool pool(ThreadPoolOptions{1, false});
  Fixture f = Load(nullptr, pool);
  std::vector<uint16_t> buf(2 * I * H, 0x1234);
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(buf.data());
  GpuExpertBuffers ok{{a, a}, {}, {a, a}, {}};
  struct Case {
    int tp, expert;
    GpuExpertBuffers b;
    absl::StatusCode code;
    const char* text;
  } cases[] = {
      {2, E, ok, absl::StatusCode::kOutOfRange, "expert_id = 3 is not in [0, num_experts = 3)"},
      {2, -1, ok, absl::StatusCode::kOutOfRange, "expert_id = -1"},
      {3, 0, ok, absl::StatusCode::kInvalidArgument, "tp_world_size = 3 must be >= 1 and divide"},
      {0, 0, ok, absl::StatusCode::kInvalidArgument, "tp_world_size = 0"},
      {2, 0, GpuExpertBuffers{{a}, {}, {a, a}, {}}, absl::StatusCode::kInvalidArgument,
       "w13_weight_ptrs has 1 addresses"},
      {2, 0, GpuExpertBuffers{{a, a}, {}, {a, 0}, {}}, absl::StatusCode::kInvalidArgument,
       "w2_weight_ptrs[1] is a null address"},
  };
  for (const Case& c : cases) {
    const absl::Status s = WriteExpertToGpuBuffers(f.layer->experts(), c.tp, c.expert, c.b, &pool);
    EXPECT_EQ(s.code(), c.code) << s;
    EXPECT_NE(s.message().find(c.text), absl::string_view::npos) << s;
  }
  for (uint16_t v : buf) ASSERT_EQ(v, 0x1234);
  // The ranged read-back the writer builds on: panel-aligned starts, ends within N.
  std::vector<bf16_t> rows(16 * H);
  EXPECT_EQ(f.layer->experts().UnpackExpertRows(0, ExpertProj::kGate, 8, 4, rows.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(f.layer->experts().UnpackExpertRows(0, ExpertProj::kGate, 48, 17, rows.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(f.layer->experts().UnpackExpertRows(0, ExpertProj::kGate, 48, 16, rows.data()).ok());
  EXPECT_EQ(0, std::memcmp(rows.data(), f.gate.data() + 48 * H, 16 * H * sizeof(bf16_t)));
  EXPECT_EQ(f.layer->experts().ExpertFp8Codes(0, ExpertProj::kGate, 0, 1, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  // Before a load: FailedPrecondition; a quantized format: Unimplemented.
  auto empty = MoeLayer::Create(SmallConfig(E, H, I), BestIsa(GetCpuFeatures()), ExpertFormat::kBf16);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(CheckGpuExpertWrite((*empty)->experts(), 2, 0, ok).code(), absl::StatusCode::kFailedPrecondition);
  auto int8 = MoeLayer::Create(SmallConfig(E, H, I), BestIsa(GetCpuFeatures()), ExpertFormat::kInt8);
  ASSERT_TRUE(int8.ok());
  const absl::Status s = CheckGpuExpertWrite((*int8)->experts(), 2, 0, ok);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  EXPECT_NE(s.message().find("int8"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace kt
