// The native int4 checkpoints of testdata/hf (tools/fixtures_int4.py) through LayerExperts, and every check of
// hf_int4.h on copies of them with one field or tensor broken.
//
// Expected weights come from the formats' own decoders, not from kt: the samples below were printed by
// compressed-tensors 0.20.1 (PackedQuantizationCompressor.decompress with the bf16 scales widened to
// float32) for kimi_k2_rawint4, and by a numpy decoder of GPTQ's documented layout
// ((qweight >> 4j) & 15 - 8) * scales[k // 128] for qwen3_moe_gptq. Every element is also checked against
// this file's own per-element decode of the raw tensors (a different route than kt's byte-wise re-bias).
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/hf_int4.h"
#include "kt/io/layer_experts.h"
#include "kt/io/method.h"
#include "kt/io/safetensors.h"
#include "kt/io/test_files.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using ::testing::HasSubstr;
using testing_files::ReadRaw;
using testing_files::TestdataHf;
using testing_files::WriteRaw;

absl::StatusOr<std::unique_ptr<LayerExperts>> OpenAs(const std::string& dir, int layer, const char* method,
                                                     int group) {
  LayerRequest want;
  want.layer = layer;
  absl::StatusOr<MethodLayout> m = LayoutOfMethod(method, group);
  if (!m.ok()) return m.status();
  want.method = *m;
  return LayerExperts::Open(dir, want);
}

std::vector<float> Dequantized(const QuantizedMatrix& q) {
  std::vector<float> w(q.n * q.k);
  Dequantize(q, w.data(), q.k);
  return w;
}

uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

struct Sample {
  int expert;
  ExpertMatrix m;
  size_t row, col;
  uint32_t bits;  // the oracle's float32
};

// Reads every expert matrix as kt-int4-group{G}-sym-v1, checks it element by element against `decode`
// (row, col of expert e's matrix -> float) and the oracle samples exactly, and that q = -8 occurs.
void CheckExact(const LayerExperts& le, int group, const std::function<float(int, ExpertMatrix, size_t, size_t)>& decode,
                const std::vector<Sample>& samples) {
  ASSERT_TRUE(le.quantized());
  EXPECT_EQ(le.hf_int4_group(), group);
  size_t minus8 = 0;
  QuantizedMatrix q;
  for (int e = 0; e < le.num_experts(); ++e) {
    for (ExpertMatrix m : {ExpertMatrix::kGate, ExpertMatrix::kUp, ExpertMatrix::kDown}) {
      absl::Status s = le.ReadQuantized(e, m, &q);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(q.spec.format, QuantFormat::kInt4GroupSym);
      EXPECT_EQ(q.spec.group_size, group);
      ASSERT_EQ(q.n, le.Rows(m));
      ASSERT_EQ(q.k, le.Cols(m));
      for (uint8_t b : q.data) minus8 += ((b & 0xF) == 8) + ((b >> 4) == 8);
      const std::vector<float> w = Dequantized(q);
      for (size_t r = 0; r < q.n; ++r) {
        for (size_t c = 0; c < q.k; ++c) {
          ASSERT_EQ(Bits(w[r * q.k + c]), Bits(decode(e, m, r, c)))
              << "expert " << e << " " << ExpertMatrixName(m) << " [" << r << "][" << c << "]";
        }
      }
      for (const Sample& sm : samples) {
        if (sm.expert == e && sm.m == m) {
          EXPECT_EQ(Bits(w[sm.row * q.k + sm.col]), sm.bits) << sm.row << "," << sm.col;
        }
      }
    }
  }
  EXPECT_GT(minus8, 0u) << "the fixtures exercise the nibble -8 (offset-binary 0)";
}

uint32_t U32At(const Checkpoint& ckpt, const std::string& name, size_t i) {
  const Checkpoint::Located loc = ckpt.Find(name);
  uint32_t v;
  std::memcpy(&v, loc.file->data(*loc.info) + i * 4, 4);
  return v;
}
uint16_t U16At(const Checkpoint& ckpt, const std::string& name, size_t i) {
  const Checkpoint::Located loc = ckpt.Find(name);
  uint16_t v;
  std::memcpy(&v, loc.file->data(*loc.info) + i * 2, 2);
  return v;
}
const char* Proj(ExpertMatrix m) {
  return m == ExpertMatrix::kGate ? "gate_proj" : m == ExpertMatrix::kUp ? "up_proj" : "down_proj";
}

TEST(HfInt4Test, RawInt4FixtureIsReadExactly) {
  const std::string dir = TestdataHf("kimi_k2_rawint4");
  absl::StatusOr<int> g = HfInt4GroupSize(dir);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(*g, 32);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = OpenAs(dir, 1, "RAWINT4", 32);
  ASSERT_TRUE(le.ok()) << le.status();
  const size_t h = 128, i = 64;
  auto decode = [&](int e, ExpertMatrix m, size_t r, size_t c) {
    const std::string base = absl::StrCat("model.layers.1.mlp.experts.", e, ".", Proj(m), ".");
    const size_t k = m == ExpertMatrix::kDown ? i : h;
    const uint32_t word = U32At(**ckpt, base + "weight_packed", r * (k / 8) + c / 8);
    const int q = static_cast<int>((word >> (4 * (c % 8))) & 15) - 8;
    bf16_t s;
    s.bits = U16At(**ckpt, base + "weight_scale", r * (k / 32) + c / 32);
    return static_cast<float>(q) * Bf16ToF32(s);
  };
  CheckExact(**le, 32, decode,
             {{0, ExpertMatrix::kGate, 0, 0, 0x3dcf0000u}, {0, ExpertMatrix::kGate, 3, 7, 0x3e28e000u},
              {0, ExpertMatrix::kGate, 63, 127, 0x3dbd0000u}, {3, ExpertMatrix::kDown, 7, 3, 0x3cf00000u}});
  EXPECT_EQ((*le)->SourceTensors().size(), 4u * 3u * 3u);  // weight_packed, weight_scale, weight_shape

  // Another method reads the dequantized weights (q * scale, exact here, rounded to bf16).
  absl::StatusOr<std::unique_ptr<LayerExperts>> as_bf16 = OpenAs(dir, 1, "BF16", 0);
  ASSERT_TRUE(as_bf16.ok()) << as_bf16.status();
  EXPECT_FALSE((*as_bf16)->quantized());
  EXPECT_EQ((*as_bf16)->MappedBf16(0, ExpertMatrix::kGate), nullptr);
  std::vector<bf16_t> w(i * h);
  ASSERT_TRUE((*as_bf16)->ReadBf16(0, ExpertMatrix::kGate, w.data()).ok());
  EXPECT_EQ(Bf16ToF32(w[3 * h + 7]), RoundToBf16(decode(0, ExpertMatrix::kGate, 3, 7)));

  // RAWINT4 at another group size is refused, naming the checkpoint's.
  absl::StatusOr<std::unique_ptr<LayerExperts>> g64 = OpenAs(dir, 1, "RAWINT4", 64);
  ASSERT_FALSE(g64.ok());
  EXPECT_THAT(std::string(g64.status().message()),
              HasSubstr("int4 groups are 32 wide (quantization_config), but the layer holds "
                        "kt-int4-group64-sym-v1; create it with group_size=32"));
}

TEST(HfInt4Test, GptqFixtureIsReadExactly) {
  const std::string dir = TestdataHf("qwen3_moe_gptq");
  absl::StatusOr<int> g = HfInt4GroupSize(dir);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(*g, 128);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = OpenAs(dir, 0, "GPTQ_INT4", 128);
  ASSERT_TRUE(le.ok()) << le.status();
  const size_t h = 256, i = 128;
  auto decode = [&](int e, ExpertMatrix m, size_t r, size_t c) {
    // qweight [K/8, N]: output row r is GPTQ's column r; k = c is nibble c % 8 of word row c / 8.
    const std::string base = absl::StrCat("model.layers.0.mlp.experts.", e, ".", Proj(m), ".");
    const size_t n = m == ExpertMatrix::kDown ? h : i;
    const uint32_t word = U32At(**ckpt, base + "qweight", (c / 8) * n + r);
    const int q = static_cast<int>((word >> (4 * (c % 8))) & 15);
    const uint16_t half = U16At(**ckpt, base + "scales", (c / 128) * n + r);
    // fp16 -> float by its definition (normal numbers only in this fixture).
    const int exp = (half >> 10) & 31;
    EXPECT_TRUE(exp != 0 && exp != 31);
    const float s = std::ldexp(1.0f + static_cast<float>(half & 1023) / 1024.0f, exp - 15) * ((half >> 15) ? -1 : 1);
    return static_cast<float>(q - 8) * s;
  };
  CheckExact(**le, 128, decode,
             {{0, ExpertMatrix::kGate, 0, 0, 0x3e601000u}, {0, ExpertMatrix::kGate, 3, 7, 0xbdacc000u},
              {0, ExpertMatrix::kGate, 127, 255, 0xbda56000u}, {3, ExpertMatrix::kDown, 255, 127, 0xbd956000u}});
  EXPECT_EQ((*le)->SourceTensors().size(), 4u * 3u * 4u);  // qweight, scales, qzeros, g_idx
}

// A copy of a fixture folder with its config.json text edited (`from` -> `to`) and/or one tensor replaced.
class BrokenCopy {
 public:
  explicit BrokenCopy(const std::string& fixture) : src_(TestdataHf(fixture)) {
    char tmpl[] = "/tmp/kt_hf_int4_test_XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    config_ = ReadRaw(src_ + "/config.json");
  }
  ~BrokenCopy() {
    std::remove((dir_ + "/config.json").c_str());
    std::remove((dir_ + "/model.safetensors").c_str());
    ::rmdir(dir_.c_str());
  }
  void EditConfig(const std::string& from, const std::string& to) {
    ASSERT_NE(config_.find(from), std::string::npos) << from;
    config_ = absl::StrReplaceAll(config_, {{from, to}});
  }
  // Writes the copy: every tensor as in the fixture except `name`, written as (dtype, shape, bytes), or left
  // out when shape and bytes are empty.
  std::string Write(const std::string& name = "", Dtype dtype = Dtype::kU8, std::vector<int64_t> shape = {},
                    std::vector<uint8_t> bytes = {}) {
    WriteRaw(dir_ + "/config.json", config_);
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(src_ + "/model.safetensors");
    EXPECT_TRUE(f.ok()) << f.status();
    std::vector<TensorToWrite> out;
    for (const TensorInfo& t : (*f)->tensors()) {
      if (t.name == name && shape.empty() && bytes.empty()) continue;  // dropped
      if (t.name == name) {
        out.push_back({name, dtype, shape, absl::MakeConstSpan(bytes)});
      } else {
        out.push_back({t.name, t.dtype, t.shape, absl::MakeConstSpan((*f)->data(t), t.num_bytes())});
      }
    }
    absl::Status s = WriteSafetensors(dir_ + "/model.safetensors", out);
    EXPECT_TRUE(s.ok()) << s;
    return dir_;
  }
  // The fixture tensor's bytes.
  std::vector<uint8_t> Bytes(const std::string& name) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(src_ + "/model.safetensors");
    const TensorInfo* t = (*f)->Find(name);
    EXPECT_NE(t, nullptr) << name;
    const uint8_t* d = (*f)->data(*t);
    return std::vector<uint8_t>(d, d + t->num_bytes());
  }

 private:
  std::string src_, dir_, config_;
};

std::string OpenError(const std::string& dir, int layer, const char* method, int group) {
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = OpenAs(dir, layer, method, group);
  EXPECT_FALSE(le.ok()) << dir;
  return le.ok() ? "" : std::string(le.status().message());
}

TEST(HfInt4Test, GptqConfigOutsideWhatKtReadsIsNamed) {
  const struct {
    const char* from;
    const char* to;
    const char* says;
  } cases[] = {
      {"\"desc_act\": false", "\"desc_act\": true", "quantization_config.desc_act is true; kt reads GPTQ with desc_act false"},
      {"\"sym\": true", "\"sym\": false", "quantization_config.sym is false; kt reads GPTQ with sym true only"},
      {"\"bits\": 4", "\"bits\": 8", "quantization_config.bits is 8; kt reads 4-bit GPTQ only"},
      {"\"group_size\": 128", "\"group_size\": -1", "quantization_config.group_size is -1; kt reads GPTQ with group_size 32, 64 or 128"},
      {"\"checkpoint_format\": \"gptq\"", "\"checkpoint_format\": \"marlin\"",
       "quantization_config.checkpoint_format is \"marlin\"; kt reads GPTQ checkpoints in the \"gptq\" or"},
  };
  for (const auto& c : cases) {
    BrokenCopy copy("qwen3_moe_gptq");
    copy.EditConfig(c.from, c.to);
    const std::string dir = copy.Write();
    EXPECT_THAT(OpenError(dir, 0, "GPTQ_INT4", 128), HasSubstr(c.says)) << c.to;
  }
}

TEST(HfInt4Test, PackQuantizedConfigOutsideWhatKtReadsIsNamed) {
  const struct {
    const char* from;
    const char* to;
    const char* says;
  } cases[] = {
      {"\"format\": \"pack-quantized\"", "\"format\": \"int-quantized\"",
       "quantization_config.format is \"int-quantized\"; kt reads compressed-tensors INT4 in the \"pack-quantized\""},
      {"\"symmetric\": true", "\"symmetric\": false",
       "quantization_config.config_groups.group_0.weights.symmetric is false; kt reads symmetric"},
      {"\"num_bits\": 4", "\"num_bits\": 8", "quantization_config.config_groups.group_0.weights.num_bits is 8"},
      {"\"strategy\": \"group\"", "\"strategy\": \"channel\"", "weights.strategy is \"channel\"; kt reads the \"group\""},
  };
  for (const auto& c : cases) {
    BrokenCopy copy("kimi_k2_rawint4");
    copy.EditConfig(c.from, c.to);
    const std::string dir = copy.Write();
    EXPECT_THAT(OpenError(dir, 1, "RAWINT4", 32), HasSubstr(c.says)) << c.to;
  }
}

TEST(HfInt4Test, WrongTensorsAreNamedWithWhatWasExpected) {
  const std::string up = "model.layers.1.mlp.experts.2.up_proj.";
  {
    BrokenCopy copy("kimi_k2_rawint4");
    const std::string dir = copy.Write(up + "weight_packed", Dtype::kI64, {64, 8}, std::vector<uint8_t>(64 * 8 * 8));
    EXPECT_THAT(OpenError(dir, 1, "RAWINT4", 32),
                HasSubstr(absl::StrCat("tensor \"", up, "weight_packed\" (layer 1 expert 2 up (RAWINT4)) is I64 [64, 8], "
                                       "expected I32 or U8 [64, 16] ([N, K/8]: 8 nibbles per int32)")));
  }
  {
    BrokenCopy copy("kimi_k2_rawint4");
    const std::string dir = copy.Write(up + "weight_scale", Dtype::kBf16, {64, 2}, std::vector<uint8_t>(64 * 2 * 2));
    EXPECT_THAT(OpenError(dir, 1, "RAWINT4", 32),
                HasSubstr(absl::StrCat("tensor \"", up, "weight_scale\" (layer 1 expert 2 up (RAWINT4)) is BF16 [64, 2], "
                                       "expected BF16 or F16 or F32 [64, 4] ([N, K/G], G = 32)")));
  }
  {
    BrokenCopy copy("kimi_k2_rawint4");
    std::vector<uint8_t> shape(16, 0);
    shape[0] = 64;
    shape[8] = 64;  // [64, 64] instead of [64, 128]
    const std::string dir = copy.Write(up + "weight_shape", Dtype::kI64, {2}, shape);
    EXPECT_THAT(OpenError(dir, 1, "RAWINT4", 32), HasSubstr("weight_shape\" (layer 1 expert 2 up (RAWINT4)) holds "
                                                            "[64, 64], expected [64, 128]"));
  }
  {
    // The uint8 form of weight_packed (2 nibbles per byte) reads the same bytes.
    BrokenCopy copy("kimi_k2_rawint4");
    const std::string dir = copy.Write(up + "weight_packed", Dtype::kU8, {64, 64}, copy.Bytes(up + "weight_packed"));
    absl::StatusOr<std::unique_ptr<LayerExperts>> a = OpenAs(dir, 1, "RAWINT4", 32);
    absl::StatusOr<std::unique_ptr<LayerExperts>> b = OpenAs(TestdataHf("kimi_k2_rawint4"), 1, "RAWINT4", 32);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    QuantizedMatrix qa, qb;
    ASSERT_TRUE((*a)->ReadQuantized(2, ExpertMatrix::kUp, &qa).ok());
    ASSERT_TRUE((*b)->ReadQuantized(2, ExpertMatrix::kUp, &qb).ok());
    EXPECT_EQ(qa.data, qb.data);
    EXPECT_EQ(qa.scales, qb.scales);
  }
  const std::string gate = "model.layers.0.mlp.experts.1.gate_proj.";
  {
    BrokenCopy copy("qwen3_moe_gptq");
    const std::string dir = copy.Write(gate + "scales", Dtype::kF32, {2, 128}, std::vector<uint8_t>(2 * 128 * 4));
    EXPECT_THAT(OpenError(dir, 0, "GPTQ_INT4", 128),
                HasSubstr(absl::StrCat("tensor \"", gate, "scales\" (layer 0 expert 1 gate (GPTQ_INT4)) is F32 [2, 128], "
                                       "expected F16 [2, 128] ([K/G, N], G = 128)")));
  }
  {
    BrokenCopy copy("qwen3_moe_gptq");
    std::vector<uint8_t> z = copy.Bytes(gate + "qzeros");
    z[5] = 0x78;  // word 1: one zero point 8 - 1 + 1
    const std::string dir = copy.Write(gate + "qzeros", Dtype::kI32, {2, 16}, z);
    EXPECT_THAT(OpenError(dir, 0, "GPTQ_INT4", 128),
                HasSubstr(absl::StrCat("tensor \"", gate, "qzeros\" word 1 is 0x77777877, expected 0x77777777: "
                                       "quantization_config.sym is true")));
  }
  {
    BrokenCopy copy("qwen3_moe_gptq");
    std::vector<uint8_t> gi = copy.Bytes(gate + "g_idx");
    gi[4 * 200] = 0;  // k = 200 said to be in group 0
    const std::string dir = copy.Write(gate + "g_idx", Dtype::kI32, {256}, gi);
    EXPECT_THAT(OpenError(dir, 0, "GPTQ_INT4", 128),
                HasSubstr("g_idx\" element 200 is 0, expected 1 (k / group_size: desc_act false)"));
  }
  {
    // qzeros is optional (sym: the zero point is 8 whatever is stored); g_idx too. Without them the read is
    // the same.
    BrokenCopy copy("qwen3_moe_gptq");
    const std::string dir = copy.Write(gate + "qzeros");
    absl::StatusOr<std::unique_ptr<LayerExperts>> a = OpenAs(dir, 0, "GPTQ_INT4", 128);
    absl::StatusOr<std::unique_ptr<LayerExperts>> b = OpenAs(TestdataHf("qwen3_moe_gptq"), 0, "GPTQ_INT4", 128);
    ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
    QuantizedMatrix qa, qb;
    ASSERT_TRUE((*a)->ReadQuantized(1, ExpertMatrix::kGate, &qa).ok());
    ASSERT_TRUE((*b)->ReadQuantized(1, ExpertMatrix::kGate, &qb).ok());
    EXPECT_EQ(qa.data, qb.data);
    EXPECT_EQ(qa.scales, qb.scales);
    EXPECT_EQ((*a)->SourceTensors().size(), 4u * 3u * 4u - 1u);
  }
  {
    BrokenCopy copy("qwen3_moe_gptq");
    const std::string dir = copy.Write(gate + "qweight", Dtype::kI32, {128, 32}, std::vector<uint8_t>(128 * 32 * 4));
    EXPECT_THAT(OpenError(dir, 0, "GPTQ_INT4", 128),
                HasSubstr(absl::StrCat("tensor \"", gate, "qweight\" (layer 0 expert 1 gate (GPTQ_INT4)) is I32 "
                                       "[128, 32], expected I32 [32, 128] ([K/8, N])")));
  }
}

}  // namespace
}  // namespace kt
