#include "kt/moe/layer_loader.h"

#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "kt/io/arch.h"
#include "kt/io/layer_experts.h"
#include "kt/io/method.h"
#include "kt/io/test_files.h"
#include "kt/kernels/cpu_features.h"
#include "kt/moe/moe_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {
namespace {

using testing_files::TestdataHf;

constexpr int kQlen = 5;

// The layer's output for a fixed routing and input (all experts used, repeated slots included).
std::vector<bf16_t> ForwardOf(MoeLayer& moe, ThreadPool& pool) {
  const MoeConfig& c = moe.config();
  std::vector<int64_t> ids(kQlen * c.top_k);
  std::vector<float> weights(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    ids[i] = static_cast<int64_t>((i * 7 + 3) % c.num_experts);
    weights[i] = 0.25f + 0.125f * static_cast<float>(i % 3);
  }
  std::vector<bf16_t> x(static_cast<size_t>(kQlen) * c.hidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = F32ToBf16(0.01f * static_cast<float>(static_cast<int>(i % 37) - 18));
  std::vector<bf16_t> y(x.size());
  const absl::Status s = moe.Forward(pool, kQlen, c.top_k, ids.data(), weights.data(), x.data(), y.data(), nullptr);
  EXPECT_TRUE(s.ok()) << s;
  return y;
}

// The same layer loaded the other way: canonical bf16 matrices read through LayerExperts, then LoadWeights.
std::unique_ptr<MoeLayer> LoadedFromTensors(const std::string& dir, int layer, ExpertFormat format,
                                            ThreadPool& pool) {
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(dir);
  EXPECT_TRUE(arch.ok()) << arch.status();
  LayerRequest want;
  want.layer = layer;
  want.method = *LayoutOfMethod("BF16");
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  EXPECT_TRUE(le.ok()) << le.status();
  const size_t e = arch->num_experts, h = arch->hidden, i = arch->intermediate;
  std::vector<bf16_t> gate(e * i * h), up(e * i * h), down(e * h * i);
  for (size_t x = 0; x < e; ++x) {
    EXPECT_TRUE((*le)->ReadBf16(x, ExpertMatrix::kGate, gate.data() + x * i * h).ok());
    EXPECT_TRUE((*le)->ReadBf16(x, ExpertMatrix::kUp, up.data() + x * i * h).ok());
    EXPECT_TRUE((*le)->ReadBf16(x, ExpertMatrix::kDown, down.data() + x * h * i).ok());
  }
  MoeConfig config{arch->num_experts, arch->top_k, arch->hidden, arch->intermediate, kQlen, 128};
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(config, Isa::kScalar, format);
  EXPECT_TRUE(moe.ok()) << moe.status();
  const absl::Status s = (*moe)->LoadWeights(gate.data(), up.data(), down.data(), nullptr, pool);
  EXPECT_TRUE(s.ok()) << s;
  return std::move(*moe);
}

struct Case {
  const char* folder;
  const char* method;
  ExpertFormat format;
};

class OpenLayerFromFolderTest : public ::testing::TestWithParam<Case> {};

// Loading from the folder gives the layer LoadWeights gives from the same bf16 matrices, bit for bit.
TEST_P(OpenLayerFromFolderTest, MatchesLoadWeights) {
  const Case& c = GetParam();
  ThreadPool pool(2);
  FolderLayerOptions options;
  options.method = c.method;
  options.max_len = kQlen;
  absl::StatusOr<FolderLayer> opened = OpenLayerFromFolder(TestdataHf(c.folder), options, pool);
  ASSERT_TRUE(opened.ok()) << opened.status();
  EXPECT_EQ(opened->moe->format(), c.format);
  EXPECT_TRUE(opened->moe->loaded());
  EXPECT_FALSE(opened->stats.converted);
  EXPECT_GT(opened->stats.file_bytes, 0u);
  const absl::StatusOr<MoeArch> arch = LoadMoeConfig(TestdataHf(c.folder));
  ASSERT_TRUE(arch.ok());
  EXPECT_EQ(opened->layer, arch->moe_layers.front());
  EXPECT_EQ(opened->architecture, arch->architecture);
  EXPECT_EQ(opened->moe->config().num_experts, arch->num_experts);
  EXPECT_EQ(opened->moe->config().hidden, arch->hidden);
  EXPECT_EQ(opened->moe->config().intermediate, arch->intermediate);

  std::unique_ptr<MoeLayer> ref = LoadedFromTensors(TestdataHf(c.folder), opened->layer, c.format, pool);
  const std::vector<bf16_t> got = ForwardOf(*opened->moe, pool);
  const std::vector<bf16_t> want = ForwardOf(*ref, pool);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i].bits, want[i].bits) << "element " << i;
}

INSTANTIATE_TEST_SUITE_P(Folders, OpenLayerFromFolderTest,
                         ::testing::Values(Case{"qwen3_moe", "BF16", ExpertFormat::kBf16},
                                           Case{"qwen3_moe", "AMXINT8", ExpertFormat::kInt8},
                                           Case{"mixtral", "MOE_INT4", ExpertFormat::kInt4},
                                           Case{"mixtral", "AMXINT4_1KGroup", ExpertFormat::kInt4GroupAsym}));

// RAWINT4 / GPTQ_INT4 folders open at the checkpoint's group size (32 and 128), not options.group_size.
TEST(OpenLayerFromFolderTest, NativeInt4AtTheCheckpointsGroupSize) {
  ThreadPool pool(2);
  for (const auto& [folder, method, group] : {std::tuple<const char*, const char*, int>{"kimi_k2_rawint4", "RAWINT4", 32},
                                              {"qwen3_moe_gptq", "GPTQ_INT4", 128}}) {
    FolderLayerOptions options;
    options.method = method;
    options.group_size = 64;
    options.max_len = kQlen;
    absl::StatusOr<FolderLayer> opened = OpenLayerFromFolder(TestdataHf(folder), options, pool);
    ASSERT_TRUE(opened.ok()) << folder << ": " << opened.status();
    EXPECT_EQ(opened->moe->format(), ExpertFormat::kInt4GroupSym);
    EXPECT_EQ(opened->moe->config().group_size, group) << folder;
    EXPECT_TRUE(opened->moe->loaded());
  }
}

TEST(ExpertFormatOfLayoutTest, EveryLoadableMethod) {
  EXPECT_EQ(ExpertFormatOfLayout(*LayoutOfMethod("BF16")), ExpertFormat::kBf16);
  EXPECT_EQ(ExpertFormatOfLayout(*LayoutOfMethod("MOE_INT8")), ExpertFormat::kInt8);
  EXPECT_EQ(ExpertFormatOfLayout(*LayoutOfMethod("AMXINT4")), ExpertFormat::kInt4);
  EXPECT_EQ(ExpertFormatOfLayout(*LayoutOfMethod("AMXINT4_1")), ExpertFormat::kInt4Asym);
  EXPECT_EQ(ExpertFormatOfLayout(*LayoutOfMethod("AMXINT4_KGroup", 64)), ExpertFormat::kInt4GroupSym);
  EXPECT_EQ(ExpertFormatOfLayout(*LayoutOfMethod("MOE_INT4_1KGroup", 32)), ExpertFormat::kInt4GroupAsym);
}

TEST(OpenLayerFromFolderTest, NamesADenseOrMissingLayer) {
  ThreadPool pool(1);
  FolderLayerOptions options;
  options.layer = 7;
  absl::StatusOr<FolderLayer> opened = OpenLayerFromFolder(TestdataHf("qwen3_moe"), options, pool);
  ASSERT_FALSE(opened.ok());
  EXPECT_EQ(opened.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(opened.status().message().find("layer 7 is not a MoE layer"), std::string::npos) << opened.status();
}

TEST(OpenLayerFromFolderTest, NamesAnUnknownMethod) {
  ThreadPool pool(1);
  FolderLayerOptions options;
  options.method = "INT3";
  absl::StatusOr<FolderLayer> opened = OpenLayerFromFolder(TestdataHf("qwen3_moe"), options, pool);
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.status().message().find("unknown method \"INT3\""), std::string::npos) << opened.status();
}

TEST(OpenLayerFromFolderTest, NamesAMissingFolder) {
  ThreadPool pool(1);
  absl::StatusOr<FolderLayer> opened = OpenLayerFromFolder("/nonexistent/kt-folder", {}, pool);
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.status().message().find("/nonexistent/kt-folder/config.json"), std::string::npos)
      << opened.status();
}

// LoadLayerFromFolder refuses a method whose layout is not the layer's, and a bad expert map, naming them.
TEST(LoadLayerFromFolderTest, ChecksMethodAndMap) {
  ThreadPool pool(1);
  const absl::StatusOr<MoeArch> arch = LoadMoeConfig(TestdataHf("qwen3_moe"));
  ASSERT_TRUE(arch.ok());
  MoeConfig config{arch->num_experts, arch->top_k, arch->hidden, arch->intermediate, 1, 128};
  absl::StatusOr<std::unique_ptr<MoeLayer>> moe = MoeLayer::Create(config, Isa::kScalar, ExpertFormat::kBf16);
  ASSERT_TRUE(moe.ok());
  absl::StatusOr<FolderLoadStats> s =
      LoadLayerFromFolder(**moe, TestdataHf("qwen3_moe"), 0, "AMXINT8", 128, nullptr, pool);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("method AMXINT8 stores \"kt-int8-channel-v1\" but this layer holds "
                                      "\"kt-bf16-v1\""),
            std::string::npos)
      << s.status();
  std::vector<int64_t> map(arch->num_experts, 0);
  map.back() = arch->num_experts;
  s = LoadLayerFromFolder(**moe, TestdataHf("qwen3_moe"), 0, "BF16", 128, map.data(), pool);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("is not in [0, "), std::string::npos) << s.status();
}

}  // namespace
}  // namespace kt
