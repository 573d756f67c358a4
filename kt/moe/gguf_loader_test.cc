// Method LLAMAFILE end to end in C++: a GGUF file written here (random ggml blocks per type), inspected,
// loaded into a MoeLayer on every kernel path this CPU runs, and its Forward compared with a double
// reference over the dequantized blocks (DequantizeGgufRow) and the Q8 activations (x and h quantized per
// 32 or 256 values, as the layer's contract says). Plus the errors: float and quantized mixed, a layer made
// for other types, gate and up with different dot partners, and bf16 weights refused.
#include "kt/moe/gguf_loader.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/gguf.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/gguf_quants.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {
namespace {

using ::testing::HasSubstr;

constexpr int kE = 4, kH = 256, kI = 512, kTopK = 2, kQlen = 5;

void PutHalf(uint8_t* p, float v) {
  const uint16_t h = F32ToF16(v);
  p[0] = static_cast<uint8_t>(h & 0xff);
  p[1] = static_cast<uint8_t>(h >> 8);
}

// Random blocks whose fp16 factors are sane (+-[2e-3, 2e-2]); the offsets of those factors per type.
std::vector<uint8_t> RandomTensor(GgufType t, size_t rows, size_t k, std::mt19937& rng) {
  std::vector<uint8_t> w(rows * GgufRowBytes(t, k));
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> val(-0.1f, 0.1f), mag(2e-3f, 2e-2f);
  if (GgufIsFloat(t)) {
    for (size_t i = 0; i < rows * k; ++i) {
      const float v = val(rng);
      if (t == GgufType::kF32) std::memcpy(&w[4 * i], &v, 4);
      if (t == GgufType::kF16) PutHalf(&w[2 * i], v);
      if (t == GgufType::kBf16) {
        const bf16_t b = F32ToBf16(v);
        std::memcpy(&w[2 * i], &b, 2);
      }
    }
    return w;
  }
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  std::vector<size_t> halves;
  switch (t) {
    case GgufType::kQ4_0: case GgufType::kQ5_0: case GgufType::kQ8_0: halves = {0}; break;
    case GgufType::kQ2_K: halves = {80, 82}; break;
    case GgufType::kQ3_K: halves = {108}; break;
    case GgufType::kQ6_K: halves = {208}; break;
    default: halves = {0, 2}; break;  // Q4_1, Q5_1, Q4_K, Q5_K
  }
  const size_t bb = GgufBlockBytes(t);
  for (size_t b = 0; b < w.size() / bb; ++b) {
    for (size_t off : halves) PutHalf(&w[b * bb + off], (byte(rng) & 1 ? -1.0f : 1.0f) * mag(rng));
  }
  return w;
}

struct Model {
  std::string path;
  GgufType types[3];
  std::vector<uint8_t> bytes[3];  // [E][N][row bytes]
};

Model WriteModel(const std::string& name, GgufType gate, GgufType up, GgufType down, int layer = 2) {
  Model m;
  m.path = ::testing::TempDir() + "/" + name + ".gguf";
  m.types[0] = gate;
  m.types[1] = up;
  m.types[2] = down;
  std::mt19937 rng(7 + static_cast<int>(gate) * 31 + static_cast<int>(down));
  const char* names[3] = {"gate", "up", "down"};
  std::vector<GgufTensorToWrite> tensors;
  for (int p = 0; p < 3; ++p) {
    const size_t n = p == 2 ? kH : kI, k = p == 2 ? kI : kH;
    m.bytes[p] = RandomTensor(m.types[p], kE * n, k, rng);
    tensors.push_back({"blk." + std::to_string(layer) + ".ffn_" + names[p] + "_exps.weight",
                       static_cast<GgmlType>(static_cast<int>(m.types[p])),
                       {k, n, static_cast<uint64_t>(kE)}, m.bytes[p]});
  }
  const absl::Status s = WriteGguf(m.path, {}, tensors);
  EXPECT_TRUE(s.ok()) << s;
  return m;
}

// x[k] as the layer feeds a product of type t: bf16 as is, or quantized per act block and dequantized.
std::vector<double> Feed(GgufType t, const std::vector<bf16_t>& x) {
  std::vector<double> out(x.size());
  const size_t ab = GgufActivationBlock(t);
  if (ab == 0) {
    for (size_t i = 0; i < x.size(); ++i) out[i] = Bf16ToF32(x[i]);
    return out;
  }
  std::vector<int8_t> q(x.size());
  std::vector<float> s(x.size() / ab);
  QuantizeGgufActivationRow(x.data(), x.size(), ab, q.data(), s.data());
  for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<double>(q[i]) * s[i / ab];
  return out;
}

std::vector<double> Matvec(const Model& m, int p, int e, const std::vector<double>& x) {
  const size_t n = p == 2 ? kH : kI, k = p == 2 ? kI : kH, rb = GgufRowBytes(m.types[p], k);
  std::vector<double> y(n);
  std::vector<float> w(k);
  for (size_t r = 0; r < n; ++r) {
    DequantizeGgufRow(m.types[p], m.bytes[p].data() + (static_cast<size_t>(e) * n + r) * rb, k, w.data());
    double acc = 0;
    for (size_t c = 0; c < k; ++c) acc += w[c] * x[c];
    y[r] = acc;
  }
  return y;
}

MoeConfig Config(const GgufLayerInfo& info) {
  MoeConfig c;
  c.num_experts = kE;
  c.top_k = kTopK;
  c.hidden = kH;
  c.intermediate = kI;
  c.max_len = kQlen;
  for (int p = 0; p < 3; ++p) c.gguf_types[p] = info.types[p];
  return c;
}

void CheckForward(GgufType gate, GgufType up, GgufType down) {
  const Model m = WriteModel(std::string("fwd_") + GgufTypeName(gate) + GgufTypeName(down), gate, up, down);
  absl::StatusOr<GgufLayerInfo> info = InspectGgufLayer(m.path, 2, kE, kH, kI);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->format, GgufIsFloat(gate) ? ExpertFormat::kGgufFloat : ExpertFormat::kGguf);
  std::mt19937 rng(99);
  std::uniform_real_distribution<float> xv(-1.0f, 1.0f), wv(0.1f, 1.0f);
  std::vector<bf16_t> x(kQlen * kH);
  for (auto& v : x) v = F32ToBf16(xv(rng));
  std::vector<int64_t> ids(kQlen * kTopK);
  std::vector<float> weights(kQlen * kTopK);
  for (int t = 0; t < kQlen; ++t) {
    ids[t * kTopK] = t % kE;
    ids[t * kTopK + 1] = (t + 1 + t / 2) % kE;
    weights[t * kTopK] = wv(rng);
    weights[t * kTopK + 1] = wv(rng);
  }
  // The reference: double sums over the dequantized blocks and the Q8-fed rows; h rounded to bf16 first.
  std::vector<double> ref(kQlen * kH, 0.0);
  double ref_max = 0;
  for (int t = 0; t < kQlen; ++t) {
    std::vector<bf16_t> xt(x.begin() + t * kH, x.begin() + (t + 1) * kH);
    for (int j = 0; j < kTopK; ++j) {
      const int e = static_cast<int>(ids[t * kTopK + j]);
      const std::vector<double> g = Matvec(m, 0, e, Feed(gate, xt)), u = Matvec(m, 1, e, Feed(up, xt));
      std::vector<bf16_t> h(kI);
      for (int i = 0; i < kI; ++i) h[i] = F32ToBf16(static_cast<float>(g[i] / (1.0 + std::exp(-g[i])) * u[i]));
      const std::vector<double> y = Matvec(m, 2, e, Feed(down, h));
      for (int c = 0; c < kH; ++c) ref[t * kH + c] += weights[t * kTopK + j] * y[c];
    }
  }
  for (double v : ref) ref_max = std::max(ref_max, std::fabs(v));
  ASSERT_GT(ref_max, 0.0);
  ThreadPool pool(2);
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni}) {
    if (!IsaSupported(isa, GetCpuFeatures())) continue;
    absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(Config(*info), isa, info->format);
    ASSERT_TRUE(moe.ok()) << moe.status();
    absl::StatusOr<GgufLoadStats> loaded = LoadGgufLayer(**moe, m.path, 2, nullptr, pool);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    EXPECT_EQ(loaded->file_bytes, m.bytes[0].size() + m.bytes[1].size() + m.bytes[2].size());
    std::vector<bf16_t> out(kQlen * kH);
    const absl::Status s = (*moe)->Forward(pool, kQlen, kTopK, ids.data(), weights.data(), x.data(), out.data(), nullptr);
    ASSERT_TRUE(s.ok()) << s;
    // The output is rounded to bf16 (2^-9 relative); fp32 sums against double add ~1e-6 of the magnitude;
    // an h element one bf16 ulp apart (fp32 vs double g, u) can move one Q8 step of h: 1e-3 of max|ref|
    // covers it with a wide margin on these sizes.
    double worst = 0;
    for (int i = 0; i < kQlen * kH; ++i) {
      const double err = std::fabs(Bf16ToF32(out[i]) - ref[i]);
      const double tol = std::ldexp(std::fabs(ref[i]), -8) + 1e-3 * ref_max;
      worst = std::max(worst, err / ref_max);
      ASSERT_LE(err, tol) << GgufTypeName(gate) << "/" << GgufTypeName(down) << " " << IsaName(isa) << " at " << i
                          << ": " << Bf16ToF32(out[i]) << " vs " << ref[i];
    }
    std::printf("%s/%s %s: worst |out - ref| / max|ref| = %.2e\n", GgufTypeName(gate), GgufTypeName(down),
                IsaName(isa), worst);
  }
}

TEST(GgufLoader, KQuants) { CheckForward(GgufType::kQ4_K, GgufType::kQ4_K, GgufType::kQ6_K); }
TEST(GgufLoader, KQuantsLow) { CheckForward(GgufType::kQ2_K, GgufType::kQ2_K, GgufType::kQ3_K); }
TEST(GgufLoader, Q5K) { CheckForward(GgufType::kQ5_K, GgufType::kQ5_K, GgufType::kQ8_0); }
TEST(GgufLoader, Legacy) { CheckForward(GgufType::kQ4_0, GgufType::kQ4_0, GgufType::kQ8_0); }
TEST(GgufLoader, LegacyWithMins) { CheckForward(GgufType::kQ4_1, GgufType::kQ4_1, GgufType::kQ5_1); }
TEST(GgufLoader, Q5_0) { CheckForward(GgufType::kQ5_0, GgufType::kQ5_0, GgufType::kQ5_0); }
TEST(GgufLoader, Float) { CheckForward(GgufType::kBf16, GgufType::kF16, GgufType::kF32); }

TEST(GgufLoader, Errors) {
  // Float and quantized projections in one layer.
  const Model mixed = WriteModel("mixed", GgufType::kQ8_0, GgufType::kQ8_0, GgufType::kF16);
  absl::StatusOr<GgufLayerInfo> bad = InspectGgufLayer(mixed.path, 2, kE, kH, kI);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("mixes float and quantized"));
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("down F16"));
  // A layer made for other types than the file has.
  const Model m = WriteModel("types", GgufType::kQ4_K, GgufType::kQ4_K, GgufType::kQ6_K);
  GgufLayerInfo other;
  other.types[0] = other.types[1] = static_cast<int>(GgufType::kQ4_K);
  other.types[2] = static_cast<int>(GgufType::kQ5_K);
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(Config(other), Isa::kScalar, ExpertFormat::kGguf);
  ASSERT_TRUE(moe.ok()) << moe.status();
  ThreadPool pool(1);
  absl::StatusOr<GgufLoadStats> wrong = LoadGgufLayer(**moe, m.path, 2, nullptr, pool);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(std::string(wrong.status().message()),
              HasSubstr("blk.2.ffn_down_exps.weight is Q6_K but the layer was made for Q5_K"));
  EXPECT_FALSE((*moe)->loaded());
  // A missing layer names it.
  absl::StatusOr<GgufLayerInfo> missing = InspectGgufLayer(m.path, 0, kE, kH, kI);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("layer 0 has no gate experts"));
  // Gate and up with different dot partners; K not a multiple of the block; an unsupported type id.
  GgufLayerInfo split = other;
  split.types[1] = static_cast<int>(GgufType::kQ8_0);
  absl::StatusOr<std::unique_ptr<MoeLayer>> s = MoeLayer::Create(Config(split), Isa::kScalar, ExpertFormat::kGguf);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("gate (Q4_K) and up (Q8_0)"));
  MoeConfig odd = Config(other);
  odd.hidden = 96;
  s = MoeLayer::Create(odd, Isa::kScalar, ExpertFormat::kGguf);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("K = 96 must be a multiple of the type's block of 256"));
  MoeConfig q81 = Config(other);
  q81.gguf_types[2] = 9;
  s = MoeLayer::Create(q81, Isa::kScalar, ExpertFormat::kGguf);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("down: ggml type id 9 is not one LLAMAFILE runs"));
  // bf16 weights are refused (the layer holds the file's blocks).
  std::vector<bf16_t> w(static_cast<size_t>(kE) * kH * kI);
  const absl::Status bf = (*moe)->LoadWeights(w.data(), w.data(), w.data(), nullptr, pool);
  EXPECT_THAT(std::string(bf.message()), HasSubstr("takes no bf16 weights"));
}

}  // namespace
}  // namespace kt
