// Reads the Hugging Face checkpoints of testdata/hf (written by transformers, tools/make_fixtures.py) byte
// for byte, and through LayerExperts in every expert layout the families use.
//
// The expected values below were obtained independently of kt: with /usr/bin/python3 and numpy, reading the
// 8-byte header size with struct.unpack('<Q'), the header with json.loads, and the tensor bytes with
// np.frombuffer(data[8 + n + begin : 8 + n + end], dtype='<u2' / 'u1' / '<f4'); bf16 values are the u16 bit
// patterns, shown with the float they decode to (bits << 16 viewed as float32). The canonical matrices of
// the fused layouts were taken as numpy slices: gate_up[e][:I] / [I:] for [E, 2I, H], and
// gate_up[e][:, :I].T / [:, I:].T with down[e].T for [E, H, 2I] / [E, I, H].
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/arch.h"
#include "kt/io/checkpoint.h"
#include "kt/io/layer_experts.h"
#include "kt/io/method.h"
#include "kt/io/safetensors.h"
#include "kt/io/test_files.h"
#include "kt/kernels/dtype.h"

namespace kt {
namespace {

using ::testing::HasSubstr;
using testing_files::TestdataHf;

struct Bf16Sample {
  size_t index;
  uint16_t bits;
  float value;
};

void CheckBf16Samples(const SafetensorsFile& file, const std::string& name, const std::vector<int64_t>& shape,
                      const std::vector<Bf16Sample>& samples) {
  SCOPED_TRACE(name);
  std::vector<bf16_t> w(static_cast<size_t>(shape[0] * shape[1]));
  absl::Status s = file.ReadBf16(name, shape, w.data());
  ASSERT_TRUE(s.ok()) << s;
  for (const Bf16Sample& sample : samples) {
    EXPECT_EQ(w[sample.index].bits, sample.bits) << "index " << sample.index;
    EXPECT_EQ(Bf16ToF32(w[sample.index]), sample.value) << "index " << sample.index;
  }
}

// Every expert projection of MoE layer `layer`: present, in `dtype`, gate/up [inter, hidden], down
// [hidden, inter].
void CheckExperts(const Checkpoint& ckpt, const std::string& prefix, const char* gate, const char* up,
                  const char* down, Dtype dtype, int layer, int experts, int64_t hidden, int64_t inter) {
  for (int e = 0; e < experts; ++e) {
    const std::string base = absl::StrCat("model.layers.", layer, prefix, e, ".");
    for (const char* proj : {gate, up}) {
      EXPECT_TRUE(ckpt.Expect(absl::StrCat(base, proj, ".weight"), dtype, {inter, hidden}).ok()) << base << proj;
    }
    EXPECT_TRUE(ckpt.Expect(absl::StrCat(base, down, ".weight"), dtype, {hidden, inter}).ok()) << base << down;
  }
}

TEST(FixturesTest, Qwen3Moe) {
  const std::string dir = TestdataHf("qwen3_moe");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 36u);
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  for (const TensorInfo& t : (*f)->tensors()) EXPECT_EQ(t.dtype, Dtype::kBf16) << t.name;
  CheckBf16Samples(**f, "model.layers.0.mlp.experts.0.gate_proj.weight", {128, 128},
                   {{0, 0xbd66, -0.05615234375f},
                    {1, 0xbe0e, -0.138671875f},
                    {12345, 0xbdd7, -0.10498046875f},
                    {16383, 0x3cdf, 0.0272216796875f}});

  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->shards().size(), 1u);
  EXPECT_EQ((*ckpt)->Names(), (*f)->Names());
  CheckExperts(**ckpt, ".mlp.experts.", "gate_proj", "up_proj", "down_proj", Dtype::kBf16, 0, 8, 128, 128);
  // A missing expert names the folder and the tensor.
  absl::Status s =
      (*ckpt)->Expect("model.layers.0.mlp.experts.8.up_proj.weight", Dtype::kBf16, {128, 128}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir));
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"model.layers.0.mlp.experts.8.up_proj.weight\""));
  // A shape mismatch (e.g. a config with the wrong moe_intermediate_size) says expected against found.
  s = (*ckpt)->Expect("model.layers.0.mlp.experts.3.down_proj.weight", Dtype::kBf16, {128, 768}).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("expected BF16 [128, 768], found BF16 [128, 128]"));
}

TEST(FixturesTest, Mixtral) {
  const std::string dir = TestdataHf("mixtral");
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 34u);
  CheckBf16Samples(**f, "model.layers.0.block_sparse_moe.experts.0.w1.weight", {128, 128},
                   {{0, 0xbde1, -0.10986328125f},
                    {1, 0x3c34, 0.010986328125f},
                    {12345, 0xbdb3, -0.08740234375f},
                    {16383, 0x3d48, 0.048828125f}});
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  CheckExperts(**ckpt, ".block_sparse_moe.experts.", "w1", "w3", "w2", Dtype::kBf16, 0, 8, 128, 128);
}

TEST(FixturesTest, DeepseekV3Fp8) {
  const std::string dir = TestdataHf("deepseek_v3_fp8");
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const SafetensorsFile& f = *(*ckpt)->shards()[0];
  EXPECT_EQ(f.tensors().size(), 53u);

  // Layer 0 is dense (first_k_dense_replace = 1): no routed experts there.
  EXPECT_EQ((*ckpt)->Find("model.layers.0.mlp.experts.0.gate_proj.weight").file, nullptr);
  CheckExperts(**ckpt, ".mlp.experts.", "gate_proj", "up_proj", "down_proj", Dtype::kF8E4M3, 1, 4, 256, 128);

  // Every F8_E4M3 weight has an F32 weight_scale_inv with one entry per 128x128 block (ceil division), and
  // holds no NaN (0x7F / 0xFF in E4M3fn): a quantizer never produces one.
  int fp8 = 0;
  for (const TensorInfo& t : f.tensors()) {
    if (t.dtype != Dtype::kF8E4M3) continue;
    ++fp8;
    SCOPED_TRACE(t.name);
    ASSERT_EQ(t.shape.size(), 2u);
    const TensorInfo* scale = f.Find(t.name + "_scale_inv");
    ASSERT_NE(scale, nullptr);
    EXPECT_EQ(scale->dtype, Dtype::kF32);
    EXPECT_EQ(scale->shape, (std::vector<int64_t>{(t.shape[0] + 127) / 128, (t.shape[1] + 127) / 128}));
    const uint8_t* bytes = f.data(t);
    for (uint64_t i = 0; i < t.num_bytes(); ++i) ASSERT_NE(bytes[i] & 0x7F, 0x7F) << "NaN at " << i;
  }
  EXPECT_EQ(fp8, 12);  // 4 experts x 3 projections in layer 1.

  const std::string gate = "model.layers.1.mlp.experts.0.gate_proj.weight";
  std::vector<uint8_t> w(128 * 256);
  absl::Status s = (*ckpt)->ReadF8E4M3(gate, {128, 256}, w.data());
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(w[0], 0xea);
  EXPECT_EQ(w[1], 0x6e);
  EXPECT_EQ(w[4321], 0xe4);
  EXPECT_EQ(w[32767], 0x4a);
  std::vector<float> scale(2);
  s = (*ckpt)->ReadF32(gate + "_scale_inv", {1, 2}, scale.data());
  ASSERT_TRUE(s.ok()) << s;
  uint32_t scale_bits[2];
  std::memcpy(scale_bits, scale.data(), 8);
  EXPECT_EQ(scale_bits[0], 0x3a6a4925u);  // 0.00089373...: max|block| / 448
  EXPECT_EQ(scale_bits[1], 0x3a636db7u);  // 0.00086757

  const std::string down = "model.layers.1.mlp.experts.0.down_proj.weight";
  ASSERT_TRUE((*ckpt)->ReadF8E4M3(down, {256, 128}, w.data()).ok());
  EXPECT_EQ(w[0], 0x64);
  EXPECT_EQ(w[1], 0x59);
  EXPECT_EQ(w[4321], 0x69);
  EXPECT_EQ(w[32767], 0x63);
  ASSERT_TRUE((*ckpt)->ReadF32(down + "_scale_inv", {2, 1}, scale.data()).ok());

  // Reading an FP8 weight as bf16 (a BF16 path handed an FP8 checkpoint) is a clear error.
  std::vector<bf16_t> as_bf16(128 * 256);
  s = (*ckpt)->ReadBf16(gate, {128, 256}, as_bf16.data());
  EXPECT_THAT(
      std::string(s.message()),
      HasSubstr(absl::StrCat("tensor \"", gate, "\": expected BF16 [128, 256], found F8_E4M3 [128, 256]")));

  // The bf16 tensors of the same file are read too.
  CheckBf16Samples(f, "model.layers.1.mlp.gate.weight", {4, 256},
                   {{0, 0x3dd0, 0.1015625f}, {1, 0xbc70, -0.0146484375f}});
}

// The FP8 fixture through LayerExperts for method FP8: read as kt-fp8-block128-v1 (the codes as stored,
// each row holding its 128-row block's scales), no bf16 copy; another method is told to use FP8.
TEST(FixturesTest, DeepseekV3Fp8LoadsAsFp8Block) {
  const std::string dir = TestdataHf("deepseek_v3_fp8");
  LayerRequest want;
  want.layer = 1;
  absl::StatusOr<MethodLayout> fp8 = LayoutOfMethod("FP8");
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_EQ(fp8->tag, "kt-fp8-block128-v1");
  want.method = *fp8;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  ASSERT_TRUE(le.ok()) << le.status();
  EXPECT_TRUE((*le)->quantized());
  EXPECT_EQ((*le)->MappedBf16(0, ExpertMatrix::kGate), nullptr);
  std::vector<bf16_t> bf(128 * 256);
  EXPECT_EQ((*le)->ReadBf16(0, ExpertMatrix::kGate, bf.data()).code(), absl::StatusCode::kFailedPrecondition);
  QuantizedMatrix qm;
  absl::Status s = (*le)->ReadQuantized(0, ExpertMatrix::kGate, &qm);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(qm.spec.format, QuantFormat::kFp8Block128);
  ASSERT_EQ(qm.n, 128u);
  ASSERT_EQ(qm.k, 256u);
  ASSERT_EQ(qm.data.size(), 128u * 256u);
  EXPECT_EQ(qm.data[0], 0xea);
  EXPECT_EQ(qm.data[4321], 0xe4);
  EXPECT_EQ(qm.data[32767], 0x4a);
  ASSERT_EQ(qm.scales.size(), 128u * 2u);
  for (size_t r = 0; r < 128; ++r) {
    uint32_t bits[2];
    std::memcpy(bits, qm.scales.data() + r * 2, 8);
    ASSERT_EQ(bits[0], 0x3a6a4925u) << r;
    ASSERT_EQ(bits[1], 0x3a636db7u) << r;
  }
  s = (*le)->ReadQuantized(3, ExpertMatrix::kDown, &qm);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(qm.n, 256u);
  EXPECT_EQ(qm.k, 128u);
  EXPECT_EQ(qm.scales.size(), 256u);
  EXPECT_EQ((*le)->SourceTensors().size(), 24u);  // 12 weights and their 12 scales

  absl::StatusOr<MethodLayout> bf16 = LayoutOfMethod("BF16");
  ASSERT_TRUE(bf16.ok());
  want.method = *bf16;
  le = LayerExperts::Open(dir, want);
  ASSERT_FALSE(le.ok());
  EXPECT_EQ(le.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(le.status().message()),
              HasSubstr("the checkpoint is FP8 (quantization_config.quant_method \"fp8\"), which method BF16 "
                        "cannot hold; load it with method FP8"));
}

// The per-channel FP8 fixture (GLM-4 MoE as GLM-4.x FP8 ships it: compressed-tensors, F8_E4M3 `weight` +
// BF16 `weight_scale` [N, 1]) for method FP8_PERCHANNEL: the codes as stored and each row's scale (the bf16
// value, exact in fp32) in every 128-k block; the values below are the file's, read with Python's
// safetensors. Each FP8 kind is refused by the other's method, and a bf16 folder by FP8_PERCHANNEL.
TEST(FixturesTest, Glm4MoeFp8PerChannelLoadsAsFp8Block) {
  const std::string dir = TestdataHf("glm4_moe_channel_fp8");
  LayerRequest want;
  want.layer = 1;
  absl::StatusOr<MethodLayout> ch = LayoutOfMethod("FP8_PERCHANNEL");
  ASSERT_TRUE(ch.ok()) << ch.status();
  EXPECT_EQ(ch->tag, "kt-fp8-block128-v1");
  want.method = *ch;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  ASSERT_TRUE(le.ok()) << le.status();
  EXPECT_TRUE((*le)->quantized());
  QuantizedMatrix qm;
  absl::Status s = (*le)->ReadQuantized(0, ExpertMatrix::kGate, &qm);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(qm.spec.format, QuantFormat::kFp8Block128);
  ASSERT_EQ(qm.n, 32u);
  ASSERT_EQ(qm.k, 64u);
  ASSERT_EQ(qm.data.size(), 32u * 64u);
  EXPECT_EQ(qm.data[0], 0xed);
  EXPECT_EQ(qm.data[100], 0xfa);
  EXPECT_EQ(qm.data[2047], 0x70);
  ASSERT_EQ(qm.scales.size(), 32u);  // K = 64: one 128-k block per row
  const uint16_t want_bits[3] = {0x3a11, 0x3a26, 0x3a0f};
  for (int r = 0; r < 3; ++r) EXPECT_EQ(qm.scales[r], Bf16ToF32(bf16_t{want_bits[r]})) << r;
  s = (*le)->ReadQuantized(7, ExpertMatrix::kDown, &qm);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(qm.n, 64u);
  EXPECT_EQ(qm.k, 32u);
  EXPECT_EQ((*le)->SourceTensors().size(), 48u);  // 8 experts x 3 weights, and their scales

  want.method = *LayoutOfMethod("FP8");
  le = LayerExperts::Open(dir, want);
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(std::string(le.status().message()), HasSubstr("load it with method FP8_PERCHANNEL"));
  want.method = *LayoutOfMethod("BF16");
  EXPECT_THAT(std::string(LayerExperts::Open(dir, want).status().message()),
              HasSubstr("load it with method FP8_PERCHANNEL"));
  want.method = *ch;
  EXPECT_THAT(std::string(LayerExperts::Open(TestdataHf("deepseek_v3_fp8"), want).status().message()),
              HasSubstr("cannot hold; load it with method FP8 (its scales are per 128 x 128 block)"));
  EXPECT_THAT(std::string(LayerExperts::Open(TestdataHf("glm4_moe"), want).status().message()),
              HasSubstr("method FP8_PERCHANNEL reads FP8 checkpoints with per-channel scales"));
}

// DeepSeek-V4-Flash's MXFP4 experts as shipped (layers.L.ffn.experts.e.{w1,w3,w2}.weight I8 nibble pairs +
// .scale F8_E8M0; the config's quantization_config is its non-expert weights' block FP8) for method MXFP4:
// the codes as stored and each E8M0 code as 2^(e - 127); the values are the file's, read with Python's
// safetensors. Another method is told to use MXFP4.
TEST(FixturesTest, DeepseekV4Mxfp4LoadsAsStored) {
  const std::string dir = TestdataHf("deepseek_v4_mxfp4");
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(dir);
  ASSERT_TRUE(arch.ok()) << arch.status();
  EXPECT_EQ(arch->family, MoeFamily::kDeepseekV4);
  EXPECT_EQ(arch->moe_layers, (std::vector<int>{0, 1}));
  EXPECT_EQ(ExpertTensorNames(*arch, 1, 3)->gate, "layers.1.ffn.experts.3.w1.weight");
  LayerRequest want;
  want.layer = 1;
  want.method = *LayoutOfMethod("MXFP4");
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  ASSERT_TRUE(le.ok()) << le.status();
  EXPECT_TRUE((*le)->quantized());
  QuantizedMatrix qm;
  absl::Status s = (*le)->ReadQuantized(3, ExpertMatrix::kGate, &qm);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(qm.spec.format, QuantFormat::kMxfp4);
  ASSERT_EQ(qm.n, 64u);
  ASSERT_EQ(qm.k, 128u);
  ASSERT_EQ(qm.data.size(), 64u * 64u);
  EXPECT_EQ(qm.data[0], 0x05);
  EXPECT_EQ(qm.data[100], 0x1e);
  EXPECT_EQ(qm.data[4095], 0xbe);
  ASSERT_EQ(qm.scales.size(), 64u * 4u);
  EXPECT_EQ(qm.scales[0], 0x1p-5f);  // code 122
  EXPECT_EQ(qm.scales[1], 0x1p-3f);  // 124
  EXPECT_EQ(qm.scales[255], 0x1p-4f);  // 123
  s = (*le)->ReadQuantized(7, ExpertMatrix::kDown, &qm);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(qm.n, 128u);
  EXPECT_EQ(qm.k, 64u);
  EXPECT_EQ((*le)->SourceTensors().size(), 48u);

  want.method = *LayoutOfMethod("BF16");
  EXPECT_THAT(std::string(LayerExperts::Open(dir, want).status().message()),
              HasSubstr("the routed experts are MXFP4 (tensor \"layers.1.ffn.experts.0.w1.weight\" is E2M1 nibble "
                        "pairs), which method BF16 cannot hold; load it with method MXFP4"));
  want.method = *LayoutOfMethod("MXFP8");  // E4M3 codes expected, I8 found: named
  EXPECT_THAT(std::string(LayerExperts::Open(dir, want).status().message()), HasSubstr("load it with method FP8"));
}

// MiniMax-M3-MXFP8's experts as shipped (language_model.model.layers.L.block_sparse_moe.experts.e.{w1,w3,w2}
// .weight F8_E4M3 + .weight_scale_inv U8 E8M0 [N, K/32]; config from transformers' MiniMaxM3VLConfig with
// moe_layer_freq [0, 1, 1]) for method MXFP8: the codes as stored, each E8M0 code as 2^(e - 127); the
// values are the file's, read with Python's safetensors. Another method is told to use MXFP8.
TEST(FixturesTest, MiniMaxM3Mxfp8LoadsAsStored) {
  const std::string dir = TestdataHf("minimax_m3_mxfp8");
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(dir);
  ASSERT_TRUE(arch.ok()) << arch.status();
  EXPECT_EQ(arch->family, MoeFamily::kMiniMaxM3);
  EXPECT_EQ(arch->moe_layers, (std::vector<int>{1, 2}));
  EXPECT_EQ(arch->num_experts, 8);
  EXPECT_EQ(arch->top_k, 2);
  EXPECT_EQ(arch->hidden, 128);
  EXPECT_EQ(arch->intermediate, 64);
  EXPECT_EQ(arch->swiglu_alpha, 1.702f);
  EXPECT_EQ(arch->swiglu_limit, 2.0f);
  EXPECT_EQ(arch->scoring, MoeScoring::kSigmoid);
  EXPECT_EQ(arch->routed_scaling_factor, 2.0f);
  EXPECT_EQ(arch->num_shared_experts, 1);
  EXPECT_EQ(ExpertTensorNames(*arch, 2, 3)->up, "language_model.model.layers.2.block_sparse_moe.experts.3.w3.weight");
  EXPECT_EQ(*RouterTensorName(*arch, 1), "language_model.model.layers.1.block_sparse_moe.gate.weight");
  LayerRequest want;
  want.layer = 2;
  want.method = *LayoutOfMethod("MXFP8");
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  ASSERT_TRUE(le.ok()) << le.status();
  EXPECT_TRUE((*le)->quantized());
  QuantizedMatrix qm;
  absl::Status s = (*le)->ReadQuantized(3, ExpertMatrix::kGate, &qm);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(qm.spec.format, QuantFormat::kMxfp8);
  ASSERT_EQ(qm.n, 64u);
  ASSERT_EQ(qm.k, 128u);
  ASSERT_EQ(qm.data.size(), 64u * 128u);
  EXPECT_EQ(qm.data[0], 0x7e);
  EXPECT_EQ(qm.data[100], 0x5f);
  EXPECT_EQ(qm.data[64 * 128 - 1], 0x61);
  ASSERT_EQ(qm.scales.size(), 64u * 4u);
  EXPECT_EQ(qm.scales[0], 0x1p-11f);  // code 116
  EXPECT_EQ(qm.scales[1], 0x1p-9f);   // 118
  EXPECT_EQ(qm.scales[255], 0x1p-10f);  // 117
  EXPECT_EQ((*le)->SourceTensors().size(), 48u);

  want.method = *LayoutOfMethod("BF16");
  EXPECT_THAT(std::string(LayerExperts::Open(dir, want).status().message()),
              HasSubstr("the routed experts are MXFP8 (tensor \"language_model.model.layers.2.block_sparse_moe."
                        "experts.0.w1.weight\" is F8_E4M3 with E8M0 scales per 32), which method BF16 cannot hold; "
                        "load it with method MXFP8"));
}

// Expert 5's canonical gate/up [I, H] and down [H, I] through LayerExperts: elements [3][7] of gate and up,
// [7][3] of down, and the last element of each.
struct CanonicalSample {
  const char* folder;
  int layer;
  uint16_t bits[6];  // gate[3][7], up[3][7], down[7][3], gate[I-1][H-1], up[I-1][H-1], down[H-1][I-1]
};

class LayerExpertsLayoutTest : public ::testing::TestWithParam<CanonicalSample> {};

TEST_P(LayerExpertsLayoutTest, ReadsCanonicalMatrices) {
  const CanonicalSample& want = GetParam();
  LayerRequest request;
  request.layer = want.layer;
  request.method = *LayoutOfMethod("BF16");
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(TestdataHf(want.folder), request);
  ASSERT_TRUE(le.ok()) << le.status();
  const int H = (*le)->hidden(), I = (*le)->intermediate();
  std::vector<bf16_t> m[3];
  for (int p = 0; p < 3; ++p) {
    const ExpertMatrix which = static_cast<ExpertMatrix>(p);
    m[p].resize((*le)->Rows(which) * (*le)->Cols(which));
    absl::Status s = (*le)->ReadBf16(5, which, m[p].data());
    ASSERT_TRUE(s.ok()) << s;
    // Where the layout lets the loader read the mapped file directly, it must point at the same values.
    if (const bf16_t* mapped = (*le)->MappedBf16(5, which)) {
      EXPECT_EQ(std::memcmp(mapped, m[p].data(), m[p].size() * sizeof(bf16_t)), 0) << ExpertMatrixName(which);
    }
  }
  EXPECT_EQ(m[0][3 * H + 7].bits, want.bits[0]);
  EXPECT_EQ(m[1][3 * H + 7].bits, want.bits[1]);
  EXPECT_EQ(m[2][7 * I + 3].bits, want.bits[2]);
  EXPECT_EQ(m[0][(I - 1) * H + H - 1].bits, want.bits[3]);
  EXPECT_EQ(m[1][(I - 1) * H + H - 1].bits, want.bits[4]);
  EXPECT_EQ(m[2][(H - 1) * I + I - 1].bits, want.bits[5]);
}

INSTANTIATE_TEST_SUITE_P(
    Testdata, LayerExpertsLayoutTest,
    ::testing::Values(
        // Per expert, gate_proj/up_proj/down_proj and w1/w3/w2, model.layers and model.language_model.layers.
        CanonicalSample{"qwen3_moe", 0, {0x3dc0, 0x3ccb, 0xbd5c, 0xbd33, 0xbd9e, 0x3e54}},
        CanonicalSample{"mixtral", 0, {0x3d34, 0xbd0d, 0x3d7f, 0xbc96, 0xbe49, 0x3d44}},
        CanonicalSample{"glm4v_moe", 1, {0x3dcf, 0x3e07, 0xbd6a, 0x3cc9, 0xbdad, 0xbd34}},
        CanonicalSample{"deepseek_v2", 1, {0x3d63, 0xbe1c, 0xbd85, 0x3d5f, 0x3c82, 0x3d5e}},
        // Qwen3.5-MoE fused [E, 2I, H] as shipped, and per expert as transformers re-saves it.
        CanonicalSample{"qwen3_5_moe", 0, {0xbe26, 0x3d97, 0x3d15, 0xbdf6, 0x3d0c, 0x3d3d}},
        CanonicalSample{"qwen3_5_moe_text", 0, {0x3d33, 0xbcb0, 0x3db6, 0xbe19, 0xbe08, 0x3cbf}},
        // Qwen3-VL-MoE [E, H, 2I] / [E, I, H] as shipped, and [E, 2I, H] / [E, H, I] as transformers
        // re-saves it.
        CanonicalSample{"qwen3_vl_moe", 0, {0x3d9a, 0xbe49, 0x3b46, 0x3e9b, 0xba21, 0xbd91}},
        CanonicalSample{"qwen3_vl_moe_resaved", 0, {0xbdd3, 0x3b36, 0xbd5d, 0xbd02, 0xbcaf, 0x3caa}}),
    [](const ::testing::TestParamInfo<CanonicalSample>& info) { return std::string(info.param.folder); });

}  // namespace
}  // namespace kt
