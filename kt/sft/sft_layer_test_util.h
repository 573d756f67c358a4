// SftMoeLayer on every kernel path and base format against the double-precision reference
// (sft_reference.h, itself checked against finite differences): output, grad_input, grad_weights and the
// six LoRA gradients; cache-stack semantics (depth error, LIFO), SkipLoRA, accumulate/scale, experts with
// no tokens, one transposed-weight copy shared by two layers, and one cache pool shared by two layers
// (share_cache_pool: bit-identical to per-layer caches in the recompute order, one layer's bytes, a clear
// error when full that loses nothing).
//
// Tolerances (worst |err| over max|ref| of each tensor):
// - bf16 base: the engine rounds h = silu(g)u, y (cached), grad_y, grad_g, grad_u to bf16 before the
//   GEMMs that read them, and every output to bf16: each rounding is <= 2^-9 = 0.2% of its element. A
//   result passes through at most four of them in a chain (grad_x: grad_y -> grad_h -> grad_g -> out), so
//   4 x 0.2% plus fp32 accumulation (2^-24 K, negligible at K <= 80): kBf16Tol = 1e-2.
// - int8 base: the format's own error: weights and every GEMM input quantized to int8 per row (0.9%
//   per tensor, FORMATS.md; 1.1% per product measured), and backward multiplies by the transposed weights
//   quantized again per their own rows. Measured worst over all tensors and tests: 0.023 (grad_weights
//   of the SkipLoRA case); kInt8Tol = 0.05 leaves 2x for other seeds and paths, while a wrong term
//   (a missing LoRA product, a wrong sign) is O(0.1-1).
// - int4 bases (int4, int4_asym, int4_group_sym, int4_group_asym with G = 32): the format's weight error
//   is ~10x int8's (16 levels instead of 255), so these tests compare against the reference run on the
//   weights the engine effectively holds (EffectiveWeights: forward W quantized and dequantized; backward
//   that W transposed and quantized again, as SftBackwardWeights does). What remains is the activations'
//   int8 quantization and the bf16 roundings, as for int8: measured worst 0.029 over all tests on scalar
//   and avx2 (int4_asym, after a reload); kInt4Tol = 0.05. Using the forward weights for backward too
//   would leave the second quantization's error (~0.1-0.2) and fail. ForwardBackwardMatchReference also
//   prints the format's own error against the unquantized weights and holds it to kInt4FormatTol = 0.5:
//   measured worst 0.284 (int4 per channel, grad_input: W quantized per output channel in forward and
//   again per input channel in backward, each a rounding of up to absmax/14 ~ 0.18 sigma of a weight with
//   H = 80), 0.230 (int4_asym), 0.203 (group sym), 0.164 (group asym); 0.5 catches an O(1) wrong term.
// - fp8_block base: E4M3's 3 mantissa bits give up to 2^-4 relative error per weight (several times
//   int8's), so, as for int4, the reference runs on EffectiveWeights (forward W quantized per 128 x 128
//   block, backward its transpose quantized again per block). Activations stay bf16, so what remains is the
//   bf16 roundings (of the activations and of the dequantized weights in EffectiveWeights):
//   measured worst 0.0066 (up_lora_b, scalar and avx2), kFp8Tol = 0.02. The format's own error against the
//   unquantized weights is held to kInt4FormatTol as well: measured worst 0.047 (up_lora_b).
#include "kt/sft/sft_layer.h"
//
// This header holds the shared fixtures of sft_layer_test (the math, cache stack, SkipLoRA, accumulate)
// and sft_layer_sharing_test (shared backward weights, workspace and cache pool).
#ifndef KT_SFT_SFT_LAYER_TEST_UTIL_H_
#define KT_SFT_SFT_LAYER_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "kt/sft/sft_layer.h"
#include "kt/sft/sft_reference.h"

namespace kt {
namespace sft_test {

inline constexpr double kBf16Tol = 1e-2;
inline constexpr double kInt8Tol = 0.05;
inline constexpr double kInt4Tol = 0.05;       // vs EffectiveWeights (see above)
inline constexpr double kInt4FormatTol = 0.5;  // vs the unquantized weights (see above)
inline constexpr double kFp8Tol = 0.02;        // vs EffectiveWeights (see above)

// Whether the tests compare a base format against the reference on EffectiveWeights (its weight error is
// well beyond int8's): the int4 formats and fp8_block.
inline bool UsesEffectiveWeights(ExpertFormat f) { return IsInt4ExpertFormat(f) || f == ExpertFormat::kFp8Block; }

struct Weights {
  int e, h, inter, r;
  std::vector<bf16_t> gate, up, down, ga, gb, ua, ub, da, db;
};

inline std::vector<bf16_t> RandomBf16(size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<bf16_t> v(n);
  for (auto& x : v) x = F32ToBf16(d(rng));
  return v;
}

inline Weights MakeWeights(int e, int h, int inter, int r, uint32_t seed) {
  std::mt19937 rng(seed);
  Weights w{e, h, inter, r, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const size_t E = e, H = h, I = inter, R = r;
  w.gate = RandomBf16(E * I * H, 1.0f / std::sqrt(static_cast<float>(h)), rng);
  w.up = RandomBf16(E * I * H, 1.0f / std::sqrt(static_cast<float>(h)), rng);
  w.down = RandomBf16(E * H * I, 1.0f / std::sqrt(static_cast<float>(inter)), rng);
  // LoRA of the same order as the base (B is non-zero, unlike PEFT's init, so every term is exercised).
  w.ga = RandomBf16(E * R * H, 0.5f / std::sqrt(static_cast<float>(h)), rng);
  w.gb = RandomBf16(E * I * R, 0.5f / std::sqrt(static_cast<float>(r > 0 ? r : 1)), rng);
  w.ua = RandomBf16(E * R * H, 0.5f / std::sqrt(static_cast<float>(h)), rng);
  w.ub = RandomBf16(E * I * R, 0.5f / std::sqrt(static_cast<float>(r > 0 ? r : 1)), rng);
  w.da = RandomBf16(E * R * I, 0.5f / std::sqrt(static_cast<float>(inter)), rng);
  w.db = RandomBf16(E * H * R, 0.5f / std::sqrt(static_cast<float>(r > 0 ? r : 1)), rng);
  return w;
}

struct Batch {
  int qlen, k;
  std::vector<int64_t> ids;
  std::vector<float> weights;
  std::vector<bf16_t> input, grad_out;
};

// Tokens 0..19 all pick expert 0 in slot 0 (more than one 64-row chunk together with the random ones),
// one slot is invalid (-1), and expert e-1 is never chosen.
inline Batch MakeBatch(int e, int k, int h, int qlen, uint32_t seed) {
  std::mt19937 rng(seed);
  Batch b{qlen, k, {}, {}, {}, {}};
  std::uniform_int_distribution<int> pick(0, e - 2);
  std::uniform_real_distribution<float> wd(0.1f, 1.0f);
  for (int t = 0; t < qlen; ++t) {
    for (int j = 0; j < k; ++j) {
      b.ids.push_back(j == 0 && t < 20 ? 0 : pick(rng));
      b.weights.push_back(wd(rng));
    }
  }
  b.ids[3 * k + 1] = -1;
  b.input = RandomBf16(static_cast<size_t>(qlen) * h, 1.0f, rng);
  b.grad_out = RandomBf16(static_cast<size_t>(qlen) * h, 1.0f, rng);
  return b;
}

inline std::vector<double> ToDouble(const std::vector<bf16_t>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToF32(v[i]);
  return out;
}

struct Expected {
  std::vector<double> out;
  SftRefGrads grads;
};

// out[c][r] = in[r][c] per expert, for [e, rows, cols] arrays.
inline std::vector<bf16_t> TransposeExperts(const std::vector<bf16_t>& in, int e, int rows, int cols) {
  std::vector<bf16_t> out(in.size());
  const size_t n = static_cast<size_t>(rows) * cols;
  for (size_t x = 0; x < static_cast<size_t>(e); ++x) {
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) out[x * n + static_cast<size_t>(c) * rows + r] = in[x * n + static_cast<size_t>(r) * cols + c];
    }
  }
  return out;
}

// Loads gate/up/down ([E, n, k] as MoeLayer's shape `c` says) into a MoeLayer in `format` and returns them
// dequantized (UnpackExpert: q * scale (- zero) rounded to bf16).
void QuantizeDequantize(const MoeConfig& c, ExpertFormat format, std::vector<bf16_t>* gate,
                        std::vector<bf16_t>* up, std::vector<bf16_t>* down) {
  ThreadPool pool(1);
  auto l = MoeLayer::Create(c, Isa::kScalar, format);  // quantization at load is the same on every path
  ASSERT_TRUE(l.ok()) << l.status();
  ASSERT_TRUE((*l)->LoadWeights(gate->data(), up->data(), down->data(), nullptr, pool).ok());
  const size_t gate_n = static_cast<size_t>(c.hidden) * c.intermediate;
  for (int e = 0; e < c.num_experts; ++e) {
    ASSERT_TRUE((*l)->experts().UnpackExpert(e, ExpertProj::kGate, gate->data() + e * gate_n).ok());
    ASSERT_TRUE((*l)->experts().UnpackExpert(e, ExpertProj::kUp, up->data() + e * gate_n).ok());
    ASSERT_TRUE((*l)->experts().UnpackExpert(e, ExpertProj::kDown, down->data() + e * gate_n).ok());
  }
}

// The weights an SftMoeLayer with a quantized base effectively multiplies by, to compare the engine
// against the reference on equal weights (what remains is the activations' int8 rounding and the bf16
// roundings, as for int8). Forward: the format's quantization of W, dequantized (rounded to bf16 by
// UnpackExpert: 2^-9 relative per weight, beside the activations' ~1%). Backward: that W transposed and
// quantized again in the same format by a MoeLayer of the transposed shape (what SftBackwardWeights
// does), dequantized and transposed back. Both steps use MoeLayer's own quantization code, but the
// GEMMs, LoRA terms and gradient chain they feed are checked independently.
inline void EffectiveWeights(const Weights& w, ExpertFormat format, int group, SftRefParams* p) {
  MoeConfig c{w.e, 1, w.h, w.inter, 1};
  c.group_size = group;
  std::vector<bf16_t> gate = w.gate, up = w.up, down = w.down;
  QuantizeDequantize(c, format, &gate, &up, &down);
  p->gate = ToDouble(gate);
  p->up = ToDouble(up);
  p->down = ToDouble(down);
  MoeConfig t{w.e, 1, w.inter, w.h, 1};
  t.group_size = group;
  std::vector<bf16_t> gt = TransposeExperts(gate, w.e, w.inter, w.h);  // [E, H, I]
  std::vector<bf16_t> ut = TransposeExperts(up, w.e, w.inter, w.h);
  std::vector<bf16_t> dt = TransposeExperts(down, w.e, w.h, w.inter);  // [E, I, H]
  QuantizeDequantize(t, format, &gt, &ut, &dt);
  p->gate_bwd = ToDouble(TransposeExperts(gt, w.e, w.h, w.inter));
  p->up_bwd = ToDouble(TransposeExperts(ut, w.e, w.h, w.inter));
  p->down_bwd = ToDouble(TransposeExperts(dt, w.e, w.inter, w.h));
}

// With an int4 or fp8 `format` (UsesEffectiveWeights), the reference runs on EffectiveWeights; otherwise on the bf16 weights as given.
Expected Reference(const Weights& w, const Batch& b, double scale, int rank,
                   ExpertFormat format = ExpertFormat::kBf16, int group = 0) {
  SftRefShape shape{w.e, w.h, w.inter, rank, scale};
  SftRefParams p;
  if (UsesEffectiveWeights(format)) {
    EffectiveWeights(w, format, group, &p);
  } else {
    p.gate = ToDouble(w.gate);
    p.up = ToDouble(w.up);
    p.down = ToDouble(w.down);
  }
  if (rank > 0) {
    p.a_gate = ToDouble(w.ga);
    p.b_gate = ToDouble(w.gb);
    p.a_up = ToDouble(w.ua);
    p.b_up = ToDouble(w.ub);
    p.a_down = ToDouble(w.da);
    p.b_down = ToDouble(w.db);
  }
  SftRefBatch rb;
  rb.qlen = b.qlen;
  rb.k = b.k;
  rb.ids = b.ids;
  rb.weights.assign(b.weights.begin(), b.weights.end());
  rb.input = ToDouble(b.input);
  Expected ex;
  SftForwardRef(shape, p, rb, &ex.out);
  SftBackwardRef(shape, p, rb, ToDouble(b.grad_out), &ex.grads);
  return ex;
}

// Worst |got - ref| / max|ref|.
template <typename T>
inline double RelErr(const std::vector<T>& got, const std::vector<double>& ref) {
  double worst = 0, scale = 0;
  for (double v : ref) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < ref.size(); ++i) {
    double g;
    if constexpr (std::is_same_v<T, bf16_t>) {
      g = Bf16ToF32(got[i]);
    } else {
      g = got[i];
    }
    worst = std::max(worst, std::abs(g - ref[i]));
  }
  return scale > 0 ? worst / scale : worst;
}

struct Grads {
  std::vector<bf16_t> ga, gb, ua, ub, da, db;
};

inline Grads MakeGrads(const Weights& w, float fill) {
  Grads g;
  g.ga.assign(w.ga.size(), F32ToBf16(fill));
  g.gb.assign(w.gb.size(), F32ToBf16(fill));
  g.ua.assign(w.ua.size(), F32ToBf16(fill));
  g.ub.assign(w.ub.size(), F32ToBf16(fill));
  g.da.assign(w.da.size(), F32ToBf16(fill));
  g.db.assign(w.db.size(), F32ToBf16(fill));
  return g;
}

inline SftLoraTensors Tensors(const Weights& w, Grads& g) {
  SftLoraTensors t;
  t.gate_a = w.ga.data();
  t.gate_b = w.gb.data();
  t.up_a = w.ua.data();
  t.up_b = w.ub.data();
  t.down_a = w.da.data();
  t.down_b = w.db.data();
  t.grad_gate_a = g.ga.data();
  t.grad_gate_b = g.gb.data();
  t.grad_up_a = g.ua.data();
  t.grad_up_b = g.ub.data();
  t.grad_down_a = g.da.data();
  t.grad_down_b = g.db.data();
  return t;
}

class SftLayerTest : public ::testing::TestWithParam<std::tuple<Isa, ExpertFormat>> {
 public:
  static Isa isa() { return std::get<0>(GetParam()); }
  static ExpertFormat format() { return std::get<1>(GetParam()); }
  static double tol() {
    if (format() == ExpertFormat::kBf16) return kBf16Tol;
    if (format() == ExpertFormat::kFp8Block) return kFp8Tol;
    return format() == ExpertFormat::kInt8 ? kInt8Tol : kInt4Tol;
  }

 protected:
  // E = 6, H = 80 and I = 56: column blocks of 48 (128 on AMX) with remainders; r = 4. The int4 group
  // formats need H and I multiples of G: G = 32 (the smallest, so several groups per row), H = 96 and
  // I = 64 (I still ends in a partial block of 16 columns; H = 96 ends a 48-block exactly, which the
  // other formats do not cover).
  static constexpr int kE = 6, kK = 3, kR = 4, kQlen = 40, kGroup = 32;
  static int H() { return IsGroupExpertFormat(format()) ? 96 : 80; }
  static int I() { return IsGroupExpertFormat(format()) ? 64 : 56; }

  void SetUp() override {
    if (!IsaSupported(isa(), GetCpuFeatures())) {
      GTEST_SKIP() << IsaName(isa()) << " is not supported by this CPU (" << GetCpuFeatures().ToString()
                   << "); it is tested on a machine that has it.";
    }
  }

  SftConfig Config(int depth, bool skip) const {
    SftConfig c;
    c.moe = MoeConfig{kE, kK, H(), I(), 64};
    c.moe.group_size = kGroup;  // read by the group formats only
    c.lora_rank = kR;
    c.lora_alpha = 8.0f;  // s = 2
    c.max_cache_depth = depth;
    c.skip_lora = skip;
    return c;
  }

  // The reference for this format: bf16 and int8 on the weights as given, int4 on EffectiveWeights.
  static Expected Ref(const Weights& w, const Batch& b, double scale, int rank) {
    return Reference(w, b, scale, rank, format(), kGroup);
  }

  std::unique_ptr<SftMoeLayer> Build(const SftConfig& c, const Weights& w, ThreadPool& pool,
                                     std::shared_ptr<SftBackwardWeights> bwd = nullptr,
                                     std::shared_ptr<SftWorkspace> ws = nullptr,
                                     std::shared_ptr<SftCachePool> cache_pool = nullptr) {
    auto l = SftMoeLayer::Create(c, isa(), format(), std::move(bwd), std::move(ws), std::move(cache_pool));
    EXPECT_TRUE(l.ok()) << l.status();
    EXPECT_TRUE((*l)->LoadWeights(w.gate.data(), w.up.data(), w.down.data(), nullptr, pool).ok());
    return std::move(*l);
  }

  // Two layers (weights of seeds `seed` and `seed` + 1) on one SftCachePool of `depth`, LoRA set with zeroed
  // gradient buffers; layer 0's SftConfig::layer_idx is `idx0` (-1: unnamed), layer 1's is 1.
  struct PooledPair {
    Weights w0, w1;
    std::shared_ptr<SftCachePool> cache_pool;
    std::unique_ptr<SftMoeLayer> l0, l1;
    Grads g0, g1;
  };
  std::unique_ptr<PooledPair> MakePooledPair(ThreadPool& pool, int depth, uint64_t seed, int idx0) {
    auto p = std::make_unique<PooledPair>();
    p->w0 = MakeWeights(kE, H(), I(), kR, seed);
    p->w1 = MakeWeights(kE, H(), I(), kR, seed + 1);
    SftConfig c0 = Config(depth, false), c1 = Config(depth, false);
    c0.layer_idx = idx0;
    c1.layer_idx = 1;
    auto cache_pool = SftCachePool::Create(depth);
    EXPECT_TRUE(cache_pool.ok()) << cache_pool.status();
    p->cache_pool = *cache_pool;
    p->l0 = Build(c0, p->w0, pool, nullptr, nullptr, p->cache_pool);
    p->l1 = Build(c1, p->w1, pool, nullptr, nullptr, p->cache_pool);
    p->g0 = MakeGrads(p->w0, 0.0f);
    p->g1 = MakeGrads(p->w1, 0.0f);
    EXPECT_TRUE(p->l0->SetLora(Tensors(p->w0, p->g0)).ok());
    EXPECT_TRUE(p->l1->SetLora(Tensors(p->w1, p->g1)).ok());
    return p;
  }

  struct Result {
    std::vector<bf16_t> out, grad_input;
    std::vector<float> grad_weights;
  };

  static void ForwardOnly(SftMoeLayer& l, ThreadPool& pool, const Batch& b, Result* res) {
    res->out.assign(b.input.size(), bf16_t{0});
    ASSERT_TRUE(l.Forward(pool, b.qlen, b.k, b.ids.data(), b.weights.data(), b.input.data(),
                          res->out.data(), true)
                    .ok());
  }
  static void BackwardOnly(SftMoeLayer& l, ThreadPool& pool, const Batch& b, Result* res,
                           bool accumulate = false, float scale = 1.0f) {
    res->grad_input.assign(b.input.size(), bf16_t{0});
    res->grad_weights.assign(b.weights.size(), -7.0f);
    absl::Status s = l.Backward(pool, b.grad_out.data(), res->grad_input.data(), res->grad_weights.data(),
                                accumulate, scale);
    ASSERT_TRUE(s.ok()) << s;
  }

  // A backward on a layer with nothing cached is the clear FailedPrecondition (pool or not).
  static void ExpectNothingCached(SftMoeLayer& l, ThreadPool& pool, const Batch& b) {
    std::vector<bf16_t> gi(b.input.size());
    std::vector<float> gw(b.weights.size());
    const absl::Status s = l.Backward(pool, b.grad_out.data(), gi.data(), gw.data());
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(s.message().find("without a cached forward"), std::string::npos) << s;
  }

  void CheckAll(const std::string& what, const Result& res, const Grads* g, const Expected& ex) {
    const double t = tol();
    auto check = [&](const char* name, double err) {
      std::printf("%s %s %s %-13s worst err / max|ref| = %.4f\n", what.c_str(), IsaName(isa()),
                  ExpertFormatName(format()), name, err);
      EXPECT_LE(err, t) << what << " " << name;
    };
    if (!res.out.empty()) check("output", RelErr(res.out, ex.out));
    check("grad_input", RelErr(res.grad_input, ex.grads.input));
    check("grad_weights", RelErr(res.grad_weights, ex.grads.weights));
    if (g != nullptr) {
      check("gate_lora_a", RelErr(g->ga, ex.grads.a_gate));
      check("gate_lora_b", RelErr(g->gb, ex.grads.b_gate));
      check("up_lora_a", RelErr(g->ua, ex.grads.a_up));
      check("up_lora_b", RelErr(g->ub, ex.grads.b_up));
      check("down_lora_a", RelErr(g->da, ex.grads.a_down));
      check("down_lora_b", RelErr(g->db, ex.grads.b_down));
    }
  }
};


// Instantiates `suite` on every path and base format.
#define KT_INSTANTIATE_SFT_PATHS_AND_FORMATS(suite)                                                         \
  INSTANTIATE_TEST_SUITE_P(                                                                                 \
      AllPaths, suite,                                                                                      \
      ::testing::Combine(::testing::Values(::kt::Isa::kScalar, ::kt::Isa::kAvx2, ::kt::Isa::kAvx512,        \
                                           ::kt::Isa::kAvx512Vnni, ::kt::Isa::kAvx512Bf16, ::kt::Isa::kAmx), \
                         ::testing::Values(::kt::ExpertFormat::kBf16, ::kt::ExpertFormat::kInt8,              \
                                           ::kt::ExpertFormat::kInt4, ::kt::ExpertFormat::kInt4Asym,          \
                                           ::kt::ExpertFormat::kInt4GroupSym,                                \
                                           ::kt::ExpertFormat::kInt4GroupAsym,                               \
                                           ::kt::ExpertFormat::kFp8Block)),                                  \
      [](const ::testing::TestParamInfo<std::tuple<::kt::Isa, ::kt::ExpertFormat>>& info) {                 \
        return std::string(::kt::IsaName(std::get<0>(info.param))) + "_" +                                  \
               ::kt::ExpertFormatName(std::get<1>(info.param));                                             \
      })

}  // namespace sft_test
}  // namespace kt

#endif  // KT_SFT_SFT_LAYER_TEST_UTIL_H_
