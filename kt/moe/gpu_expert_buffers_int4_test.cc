// WriteExpertToGpuBuffers for int4_group_sym (method RAWINT4): compressed-tensors' pack-quantized layout per
// GPU TP rank, checked element by element against the canonical matrices loaded (offset-binary nibble
// q + 8 of element k at bits 4 (k % 2) of byte k / 2, bf16 scales), with q = -8 and 7 present; a scale that
// is not a bf16 value, and a rank share that splits a group, are refused.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"
#include "kt/moe/gpu_expert_buffers.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {
namespace {

constexpr int E = 3, H = 64, I = 96, G = 32;

int Nibble(const QuantizedMatrix& q, size_t r, size_t c) {
  const uint8_t byte = q.data[r * (q.k / 2) + c / 2];
  const int v = (c % 2 == 0) ? (byte & 15) : (byte >> 4);
  return v >= 8 ? v - 16 : v;  // two's complement
}

QuantizedMatrix Random(size_t n, size_t k, std::mt19937& rng, bool bf16_scales) {
  QuantizedMatrix q;
  q.spec = QuantSpec{QuantFormat::kInt4GroupSym, G};
  q.n = n;
  q.k = k;
  q.data.resize(n * k / 2);
  for (uint8_t& b : q.data) b = static_cast<uint8_t>(rng());  // every nibble, -8 included
  q.scales.resize(n * k / G);
  for (float& s : q.scales) {
    bf16_t b;
    b.bits = static_cast<uint16_t>(0x3800 + rng() % 0x800);  // positive, finite
    s = Bf16ToF32(b);
    if (!bf16_scales) s = std::nextafter(s, 1.0f);
  }
  return q;
}

struct Layer {
  std::vector<QuantizedMatrix> w;  // [E][3]
  std::unique_ptr<MoeLayer> moe;
};

Layer Load(bool bf16_scales) {
  Layer l;
  std::mt19937 rng(11);
  MoeConfig c;
  c.num_experts = E;
  c.top_k = 2;
  c.hidden = H;
  c.intermediate = I;
  c.max_len = 4;
  c.group_size = G;
  auto moe = MoeLayer::Create(c, BestIsa(GetCpuFeatures()), ExpertFormat::kInt4GroupSym);
  EXPECT_TRUE(moe.ok()) << moe.status();
  l.moe = std::move(*moe);
  l.moe->BeginLoad();
  for (int e = 0; e < E; ++e) {
    for (int p = 0; p < 3; ++p) {
      l.w.push_back(p == 2 ? Random(H, I, rng, bf16_scales) : Random(I, H, rng, bf16_scales));
      EXPECT_TRUE(l.moe->LoadExpertQuantized(e, static_cast<ExpertProj>(p), l.w.back()).ok());
    }
  }
  EXPECT_TRUE(l.moe->FinishLoad().ok());
  return l;
}

int BufNibble(const std::vector<uint8_t>& b, size_t row_bytes, size_t r, size_t c) {
  const uint8_t byte = b[r * row_bytes + c / 2];
  return ((c % 2 == 0) ? (byte & 15) : (byte >> 4)) - 8;  // offset binary
}
float BufScale(const std::vector<uint8_t>& b, size_t i) {
  bf16_t v;
  std::memcpy(&v, b.data() + i * 2, 2);
  return Bf16ToF32(v);
}

TEST(GpuExpertBuffersInt4Test, PackQuantizedLayoutPerRankExact) {
  ThreadPool pool(ThreadPoolOptions{3, false});
  Layer l = Load(true);
  for (int tp : {1, 3}) {
    const size_t n = I / tp;
    for (int slot = 0; slot < E; ++slot) {
      std::vector<std::vector<uint8_t>> w13(tp, std::vector<uint8_t>(2 * n * H / 2, 0xAA));
      std::vector<std::vector<uint8_t>> s13(tp, std::vector<uint8_t>(2 * n * (H / G) * 2, 0xAA));
      std::vector<std::vector<uint8_t>> w2(tp, std::vector<uint8_t>(H * n / 2, 0xAA));
      std::vector<std::vector<uint8_t>> s2(tp, std::vector<uint8_t>(H * (n / G) * 2, 0xAA));
      GpuExpertBuffers b;
      for (int r = 0; r < tp; ++r) {
        b.w13_weight.push_back(reinterpret_cast<std::uintptr_t>(w13[r].data()));
        b.w13_scale.push_back(reinterpret_cast<std::uintptr_t>(s13[r].data()));
        b.w2_weight.push_back(reinterpret_cast<std::uintptr_t>(w2[r].data()));
        b.w2_scale.push_back(reinterpret_cast<std::uintptr_t>(s2[r].data()));
      }
      absl::Status st = WriteExpertToGpuBuffers(l.moe->experts(), tp, slot, b, &pool);
      ASSERT_TRUE(st.ok()) << st;
      const QuantizedMatrix* q = &l.w[static_cast<size_t>(slot) * 3];
      int seen_min = 0, seen_max = 0;
      for (int r = 0; r < tp; ++r) {
        for (size_t i = 0; i < n; ++i) {
          const size_t row = r * n + i;
          for (size_t h = 0; h < H; ++h) {
            ASSERT_EQ(BufNibble(w13[r], H / 2, i, h), Nibble(q[0], row, h)) << tp << " " << r;
            ASSERT_EQ(BufNibble(w13[r], H / 2, n + i, h), Nibble(q[1], row, h)) << tp << " " << r;
            ASSERT_EQ(BufNibble(w2[r], n / 2, h, i), Nibble(q[2], h, row)) << tp << " " << r;
            seen_min = std::min(seen_min, Nibble(q[0], row, h));
            seen_max = std::max(seen_max, Nibble(q[0], row, h));
          }
          for (size_t g = 0; g < H / G; ++g) {
            ASSERT_EQ(BufScale(s13[r], i * (H / G) + g), q[0].scales[row * (H / G) + g]);
            ASSERT_EQ(BufScale(s13[r], (n + i) * (H / G) + g), q[1].scales[row * (H / G) + g]);
          }
        }
        for (size_t h = 0; h < H; ++h) {
          for (size_t g = 0; g < n / G; ++g) {
            ASSERT_EQ(BufScale(s2[r], h * (n / G) + g), q[2].scales[h * (I / G) + r * (n / G) + g]);
          }
        }
      }
      EXPECT_EQ(seen_min, -8);
      EXPECT_EQ(seen_max, 7);
    }
  }
}

TEST(GpuExpertBuffersInt4Test, RefusesNonBf16ScalesAndSplitGroups) {
  Layer l = Load(false);
  std::vector<uint8_t> buf(2 * I * H, 0);
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(buf.data());
  GpuExpertBuffers b{{a}, {a}, {a}, {a}};
  absl::Status st = WriteExpertToGpuBuffers(l.moe->experts(), 1, 0, b);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(std::string(st.message()).find("is not a bf16 value: the int4 GPU layout carries bf16 scales"),
            std::string::npos)
      << st;
  GpuExpertBuffers b2{{a, a}, {a, a}, {a, a}, {a, a}};
  st = CheckGpuExpertWrite(l.moe->experts(), 2, 0, b2);  // I / 2 = 48: not a multiple of 32
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(st.message()).find("is 48, not a multiple of the int4 group size (32)"), std::string::npos)
      << st;
  GpuExpertBuffers no_scales{{a}, {}, {a}, {}};
  st = CheckGpuExpertWrite(l.moe->experts(), 1, 0, no_scales);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(st.message()).find("w13_scale_ptrs has 0 addresses"), std::string::npos) << st;
}

}  // namespace
}  // namespace kt
