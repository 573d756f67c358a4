// Reads the real Hugging Face checkpoints in $KT_FIXTURES/hf (see shared/fixtures/README.md). Fails, never
// skips, when KT_FIXTURES is not set: run with --test_env=KT_FIXTURES=<absolute path of shared/fixtures>.
//
// The expected values below were obtained independently of kt: with /usr/bin/python3 and numpy, reading the
// 8-byte header size with struct.unpack('<Q'), the header with json.loads, and the tensor bytes with
// np.frombuffer(data[8 + n + begin : 8 + n + end], dtype='<u2' / 'u1' / '<f4'); bf16 values are the u16 bit
// patterns, shown with the float they decode to (bits << 16 viewed as float32).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/checkpoint.h"
#include "kt/io/safetensors.h"
#include "kt/kernels/dtype.h"

namespace kt {
namespace {

using ::testing::HasSubstr;

// $KT_FIXTURES/<rel>, or "" after recording a failure that says how to run the test.
std::string Fixture(absl::string_view rel) {
  const char* root = std::getenv("KT_FIXTURES");
  if (root == nullptr || *root == '\0') {
    ADD_FAILURE()
        << "KT_FIXTURES is not set: run with --test_env=KT_FIXTURES=<absolute path of shared/fixtures> "
           "(e.g. /work/shared/fixtures)";
    return "";
  }
  return absl::StrCat(root, "/", rel);
}

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

// The expert projections of layers 1..(layers-1) for `experts` experts: every one present, in `dtype`, with
// gate/up [inter, hidden] and down [hidden, inter].
void CheckExperts(const Checkpoint& ckpt, const std::string& prefix, const char* gate, const char* up,
                  const char* down, Dtype dtype, int first_layer) {
  const int64_t hidden = 256, inter = 128;
  for (int layer = first_layer; layer < 2; ++layer) {
    for (int e = 0; e < 16; ++e) {
      const std::string base = absl::StrCat("model.layers.", layer, prefix, e, ".");
      for (const char* proj : {gate, up}) {
        EXPECT_TRUE(ckpt.Expect(absl::StrCat(base, proj, ".weight"), dtype, {inter, hidden}).ok())
            << base << proj;
      }
      EXPECT_TRUE(ckpt.Expect(absl::StrCat(base, down, ".weight"), dtype, {hidden, inter}).ok())
          << base << down;
    }
  }
}

TEST(FixturesTest, Qwen3Moe) {
  const std::string dir = Fixture("hf/qwen3_moe");
  ASSERT_FALSE(dir.empty());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 117u);
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  for (const TensorInfo& t : (*f)->tensors()) EXPECT_EQ(t.dtype, Dtype::kBf16) << t.name;
  CheckBf16Samples(**f, "model.layers.1.mlp.experts.0.gate_proj.weight", {128, 256},
                   {{0, 0xbbf3, -0.007415771484375f},
                    {1, 0x3b9c, 0.0047607421875f},
                    {12345, 0x3c13, 0.00897216796875f},
                    {32767, 0xbc8d, -0.0172119140625f}});

  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  EXPECT_EQ((*ckpt)->shards().size(), 1u);
  EXPECT_EQ((*ckpt)->Names(), (*f)->Names());
  CheckExperts(**ckpt, ".mlp.experts.", "gate_proj", "up_proj", "down_proj", Dtype::kBf16, 0);
  // A missing expert names the folder and the tensor.
  absl::Status s =
      (*ckpt)->Expect("model.layers.1.mlp.experts.16.up_proj.weight", Dtype::kBf16, {128, 256}).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir));
  EXPECT_THAT(std::string(s.message()), HasSubstr("\"model.layers.1.mlp.experts.16.up_proj.weight\""));
  // A shape mismatch (e.g. a config with the wrong moe_intermediate_size) says expected against found.
  s = (*ckpt)->Expect("model.layers.1.mlp.experts.3.down_proj.weight", Dtype::kBf16, {256, 768}).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("expected BF16 [256, 768], found BF16 [256, 128]"));
}

TEST(FixturesTest, Mixtral) {
  const std::string dir = Fixture("hf/mixtral");
  ASSERT_FALSE(dir.empty());
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 113u);
  CheckBf16Samples(**f, "model.layers.1.block_sparse_moe.experts.0.w1.weight", {128, 256},
                   {{0, 0xbcf0, -0.029296875f},
                    {1, 0x3be0, 0.0068359375f},
                    {12345, 0xbcc7, -0.0242919921875f},
                    {32767, 0xbd1e, -0.03857421875f}});
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  CheckExperts(**ckpt, ".block_sparse_moe.experts.", "w1", "w3", "w2", Dtype::kBf16, 0);
}

TEST(FixturesTest, DeepseekV3Fp8) {
  const std::string dir = Fixture("hf/deepseek_v3_fp8");
  ASSERT_FALSE(dir.empty());
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  const SafetensorsFile& f = *(*ckpt)->shards()[0];
  EXPECT_EQ(f.tensors().size(), 125u);

  // Layer 0 is dense (first_k_dense_replace = 1): no routed experts there.
  EXPECT_EQ((*ckpt)->Find("model.layers.0.mlp.experts.0.gate_proj.weight").file, nullptr);
  CheckExperts(**ckpt, ".mlp.experts.", "gate_proj", "up_proj", "down_proj", Dtype::kF8E4M3, 1);

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
  EXPECT_EQ(fp8, 48);  // 16 experts x 3 projections in layer 1.

  const std::string gate = "model.layers.1.mlp.experts.0.gate_proj.weight";
  std::vector<uint8_t> w(128 * 256);
  absl::Status s = (*ckpt)->ReadF8E4M3(gate, {128, 256}, w.data());
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(w[0], 0xd2);
  EXPECT_EQ(w[1], 0x74);
  EXPECT_EQ(w[4321], 0x63);
  EXPECT_EQ(w[32767], 0x69);
  std::vector<float> scale(2);
  s = (*ckpt)->ReadF32(gate + "_scale_inv", {1, 2}, scale.data());
  ASSERT_TRUE(s.ok()) << s;
  uint32_t scale_bits;
  std::memcpy(&scale_bits, &scale[0], 4);
  EXPECT_EQ(scale_bits, 0x391b6db7u);  // 0.0001482282386859879
  EXPECT_EQ(scale[1], scale[0]);

  const std::string down = "model.layers.1.mlp.experts.0.down_proj.weight";
  ASSERT_TRUE((*ckpt)->ReadF8E4M3(down, {256, 128}, w.data()).ok());
  EXPECT_EQ(w[0], 0x6a);
  EXPECT_EQ(w[1], 0xee);
  EXPECT_EQ(w[4321], 0xea);
  EXPECT_EQ(w[32767], 0x5a);
  ASSERT_TRUE((*ckpt)->ReadF32(down + "_scale_inv", {2, 1}, scale.data()).ok());

  // Reading an FP8 weight as bf16 (a BF16 path handed an FP8 checkpoint) is a clear error.
  std::vector<bf16_t> as_bf16(128 * 256);
  s = (*ckpt)->ReadBf16(gate, {128, 256}, as_bf16.data());
  EXPECT_THAT(
      std::string(s.message()),
      HasSubstr(absl::StrCat("tensor \"", gate, "\": expected BF16 [128, 256], found F8_E4M3 [128, 256]")));

  // The bf16 tensors of the same file are read too.
  CheckBf16Samples(f, "model.layers.1.mlp.gate.weight", {16, 256},
                   {{0, 0xbc25, -0.01007080078125f}, {1, 0x3c67, 0.01409912109375f}});
}

}  // namespace
}  // namespace kt
