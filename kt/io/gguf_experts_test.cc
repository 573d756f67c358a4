// GgufCheckpoint / FindGgufExperts over small files written by WriteGguf: the expert tensors of a layer
// found in one file, a split set and a folder, each expert's bytes where the file has them, and the errors
// (missing tensor with the layer's tensors listed, unsupported type with the supported list, each dim named).
#include "kt/io/gguf_experts.h"

#include <sys/stat.h>

#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/gguf.h"
#include "kt/kernels/gguf_quants.h"

namespace kt {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kE = 3, kH = 512, kI = 256;  // multiples of the K-quants' 256

struct Tensor {
  std::string name;
  GgmlType type;
  std::vector<uint64_t> dims;
  std::vector<uint8_t> bytes;
};

Tensor Make(const std::string& name, GgmlType type, std::vector<uint64_t> dims) {
  absl::StatusOr<uint64_t> nbytes = GgmlNbytes(type, dims);
  EXPECT_TRUE(nbytes.ok()) << nbytes.status();
  Tensor t{name, type, dims, std::vector<uint8_t>(*nbytes)};
  for (size_t i = 0; i < t.bytes.size(); ++i) t.bytes[i] = static_cast<uint8_t>(i * 7 + name.size());
  return t;
}

std::string Write(const std::string& file, const std::vector<Tensor>& tensors) {
  std::vector<GgufTensorToWrite> out;
  for (const Tensor& t : tensors) out.push_back({t.name, t.type, t.dims, t.bytes});
  const std::string path = ::testing::TempDir() + "/" + file;
  const absl::Status s = WriteGguf(path, {{"general.architecture", GgufValue::String("qwen3moe")}}, out);
  EXPECT_TRUE(s.ok()) << s;
  return path;
}

std::vector<Tensor> Layer(int layer, GgmlType gate_up, GgmlType down) {
  const std::string p = "blk." + std::to_string(layer) + ".";
  return {Make(p + "ffn_gate_exps.weight", gate_up, {kH, kI, kE}), Make(p + "ffn_up_exps.weight", gate_up, {kH, kI, kE}),
          Make(p + "ffn_down_exps.weight", down, {kI, kH, kE}), Make(p + "attn_q.weight", GgmlType::kF32, {kH, kH})};
}

TEST(GgufExperts, FindsEveryProjectionWithItsExpertBytes) {
  const std::vector<Tensor> tensors = Layer(1, GgmlType::kQ8_0, GgmlType::kQ4_0);
  const std::string path = Write("one.gguf", tensors);
  absl::StatusOr<std::unique_ptr<GgufCheckpoint>> ckpt = GgufCheckpoint::Open(path);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  for (int proj = 0; proj < 3; ++proj) {
    absl::StatusOr<GgufExpertTensor> t = FindGgufExperts(**ckpt, 1, proj, kE, kH, kI);
    ASSERT_TRUE(t.ok()) << t.status();
    const Tensor& src = tensors[proj];
    EXPECT_EQ(t->name, src.name);
    EXPECT_EQ(t->type_id, static_cast<int>(src.type));
    EXPECT_EQ(t->experts, kE);
    EXPECT_EQ(t->n, proj == 2 ? kH : kI);
    EXPECT_EQ(t->k, proj == 2 ? kI : kH);
    EXPECT_EQ(t->expert_bytes, src.bytes.size() / kE);
    EXPECT_EQ(t->expert_bytes, t->n * GgufRowBytes(static_cast<GgufType>(t->type_id), t->k));
    for (uint64_t e = 0; e < kE; ++e) {
      ASSERT_EQ(0, std::memcmp(t->data + e * t->expert_bytes, src.bytes.data() + e * t->expert_bytes,
                               t->expert_bytes));
    }
  }
}

TEST(GgufExperts, SplitSetAndFolder) {
  const std::string dir = ::testing::TempDir() + "/split";
  mkdir(dir.c_str(), 0755);
  std::vector<Tensor> l0 = Layer(0, GgmlType::kQ4_K, GgmlType::kQ6_K);
  std::vector<Tensor> l1 = Layer(1, GgmlType::kBf16, GgmlType::kBf16);
  const std::string first = Write("split/m-00001-of-00002.gguf", l0);
  Write("split/m-00002-of-00002.gguf", l1);
  for (const std::string& path : {first, dir}) {
    absl::StatusOr<std::unique_ptr<GgufCheckpoint>> ckpt = GgufCheckpoint::Open(path);
    ASSERT_TRUE(ckpt.ok()) << ckpt.status();
    EXPECT_EQ((*ckpt)->files().size(), 2u);
    absl::StatusOr<GgufExpertTensor> down1 = FindGgufExperts(**ckpt, 1, 2, kE, kH, kI);
    ASSERT_TRUE(down1.ok()) << down1.status();
    EXPECT_EQ(down1->type_id, static_cast<int>(GgmlType::kBf16));
    EXPECT_THAT(down1->file, HasSubstr("00002-of-00002"));
  }
  // A missing part is named.
  const std::string lone = Write("lone-00001-of-00003.gguf", l0);
  absl::StatusOr<std::unique_ptr<GgufCheckpoint>> missing = GgufCheckpoint::Open(lone);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("lone-00002-of-00003.gguf"));
}

TEST(GgufExperts, ErrorsNameTensorLayerAndDimension) {
  std::vector<Tensor> tensors = Layer(0, GgmlType::kQ8_1, GgmlType::kQ4_0);
  const std::string path = Write("bad.gguf", tensors);
  absl::StatusOr<std::unique_ptr<GgufCheckpoint>> ckpt = GgufCheckpoint::Open(path);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  // Unsupported type: the tensor and the supported list.
  absl::StatusOr<GgufExpertTensor> gate = FindGgufExperts(**ckpt, 0, 0, kE, kH, kI);
  ASSERT_FALSE(gate.ok());
  EXPECT_THAT(std::string(gate.status().message()), HasSubstr("blk.0.ffn_gate_exps.weight is Q8_1"));
  EXPECT_THAT(std::string(gate.status().message()), HasSubstr(kGgufSupportedTypes));
  // An IQ type (known to the reader by size, not run by LLAMAFILE), in a file that otherwise opens.
  const std::string iq = Write("iq.gguf", Layer(2, GgmlType::kIQ4_XS, GgmlType::kQ4_K));
  absl::StatusOr<std::unique_ptr<GgufCheckpoint>> iq_ckpt = GgufCheckpoint::Open(iq);
  ASSERT_TRUE(iq_ckpt.ok()) << iq_ckpt.status();
  absl::StatusOr<GgufExpertTensor> up = FindGgufExperts(**iq_ckpt, 2, 1, kE, kH, kI);
  ASSERT_FALSE(up.ok());
  EXPECT_THAT(std::string(up.status().message()), HasSubstr("blk.2.ffn_up_exps.weight is IQ4_XS; method LLAMAFILE"));
  // Missing layer: the tensor and the layer named, with what the layer has.
  absl::StatusOr<GgufExpertTensor> none = FindGgufExperts(**ckpt, 4, 1, kE, kH, kI);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("layer 4 has no up experts"));
  EXPECT_THAT(std::string(none.status().message()), HasSubstr("blk.4.ffn_up_exps.weight"));
  // Shapes: each dimension by name.
  absl::StatusOr<GgufExpertTensor> k = FindGgufExperts(**ckpt, 0, 2, kE, kH, kI + 32);
  ASSERT_FALSE(k.ok());
  EXPECT_THAT(std::string(k.status().message()), HasSubstr("ne[0] (moe_intermediate_size) = 256, the layer has "
                                                           "moe_intermediate_size = 288"));
  absl::StatusOr<GgufExpertTensor> n = FindGgufExperts(**ckpt, 0, 2, kE, kH + 32, kI);
  ASSERT_FALSE(n.ok());
  EXPECT_THAT(std::string(n.status().message()), HasSubstr("ne[1] (hidden_size) = 512, the layer has hidden_size = 544"));
  absl::StatusOr<GgufExpertTensor> e = FindGgufExperts(**ckpt, 0, 2, kE + 2, kH, kI);
  ASSERT_FALSE(e.ok());
  EXPECT_THAT(std::string(e.status().message()), HasSubstr("ne[2] (num_experts) = 3, the layer has num_experts = 5: "
                                                           "experts 3..4 of layer 0 are missing"));
}

}  // namespace
}  // namespace kt
