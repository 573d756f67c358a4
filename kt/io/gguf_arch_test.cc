// GgufMoeArch over small files written by WriteGguf: each general.architecture kt maps (llama.cpp's key
// names, checked against llama-arch.cpp's LLM_KV_NAMES), the values the model gets, that the config.json
// text it makes reads back (ParseMoeConfig) as the same model, the defaults for absent keys, and the errors
// (unknown architecture, missing key, out-of-range value, wrong value type, dense llama), each naming the
// file and the key.
#include "kt/io/gguf_arch.h"

#include <sys/stat.h>

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/arch.h"
#include "kt/io/gguf.h"

namespace kt {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

std::string Write(const std::string& file, const GgufMetadata& meta, const std::vector<GgufTensorToWrite>& tensors = {}) {
  const std::string path = ::testing::TempDir() + "/" + file;
  const absl::Status s = WriteGguf(path, meta, tensors);
  EXPECT_TRUE(s.ok()) << s;
  return path;
}

absl::StatusOr<GgufMoeModel> ArchOf(const std::string& path) {
  absl::StatusOr<std::unique_ptr<GgufCheckpoint>> ckpt = GgufCheckpoint::Open(path);
  if (!ckpt.ok()) return ckpt.status();
  return GgufMoeArch(**ckpt);
}

GgufMetadata Base(const std::string& arch, int blocks = 4) {
  return {{"general.architecture", GgufValue::String(arch)},
          {arch + ".block_count", GgufValue::Uint32(blocks)},
          {arch + ".embedding_length", GgufValue::Uint32(64)},
          {arch + ".expert_count", GgufValue::Uint32(8)},
          {arch + ".expert_used_count", GgufValue::Uint32(2)},
          {arch + ".expert_feed_forward_length", GgufValue::Uint32(32)}};
}

// The config.json text must read back as the model returned (it is what a converted folder gets).
void ExpectConfigRoundTrip(const GgufMoeModel& m) {
  absl::StatusOr<MoeArch> again = ParseMoeConfig(m.config_json, "config.json");
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << m.config_json;
  EXPECT_EQ(again->architecture, m.arch.architecture);
  EXPECT_EQ(again->moe_layers, m.arch.moe_layers);
  EXPECT_EQ(again->num_experts, m.arch.num_experts);
  EXPECT_EQ(again->intermediate, m.arch.intermediate);
  EXPECT_EQ(again->routed_scaling_factor, m.arch.routed_scaling_factor);
}

TEST(GgufArch, Qwen3Moe) {
  absl::StatusOr<GgufMoeModel> m = ArchOf(Write("qwen3.gguf", Base("qwen3moe")));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->gguf_architecture, "qwen3moe");
  EXPECT_EQ(m->arch.architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ(m->arch.model_type, "qwen3_moe");
  EXPECT_EQ(m->arch.num_layers, 4);
  EXPECT_THAT(m->arch.moe_layers, ElementsAre(0, 1, 2, 3));
  EXPECT_EQ(m->arch.num_experts, 8);
  EXPECT_EQ(m->arch.top_k, 2);
  EXPECT_EQ(m->arch.hidden, 64);
  EXPECT_EQ(m->arch.intermediate, 32);
  EXPECT_TRUE(m->arch.norm_topk_prob);  // llama.cpp's qwen3moe renormalises
  EXPECT_EQ(m->arch.scoring, MoeScoring::kSoftmax);
  EXPECT_EQ(m->arch.num_shared_experts, 0);
  EXPECT_THAT(m->config_json, HasSubstr("\"kt_converted_from_gguf\": \"qwen3moe\""));
  ExpectConfigRoundTrip(*m);
}

TEST(GgufArch, Qwen2MoeWithSharedExpert) {
  GgufMetadata meta = Base("qwen2moe");
  meta.push_back({"qwen2moe.expert_shared_feed_forward_length", GgufValue::Uint32(128)});
  absl::StatusOr<GgufMoeModel> m = ArchOf(Write("qwen2.gguf", meta));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->arch.architecture, "Qwen2MoeForCausalLM");
  EXPECT_FALSE(m->arch.norm_topk_prob);
  EXPECT_EQ(m->arch.num_shared_experts, 1);
  EXPECT_EQ(m->arch.shared_intermediate, 128);
  ExpectConfigRoundTrip(*m);
}

TEST(GgufArch, Deepseek2SigmoidIsV3) {
  GgufMetadata meta = Base("deepseek2");
  for (auto& kv : std::vector<std::pair<std::string, GgufValue>>{
           {"deepseek2.leading_dense_block_count", GgufValue::Uint32(1)},
           {"deepseek2.expert_shared_count", GgufValue::Uint32(1)},
           {"deepseek2.expert_weights_scale", GgufValue::Float32(2.5f)},
           {"deepseek2.expert_weights_norm", GgufValue::Bool(true)},
           {"deepseek2.expert_gating_func", GgufValue::Uint32(2)},
           {"deepseek2.expert_group_count", GgufValue::Uint32(4)},
           {"deepseek2.expert_group_used_count", GgufValue::Uint32(2)}}) {
    meta.push_back(kv);
  }
  absl::StatusOr<GgufMoeModel> m = ArchOf(Write("v3.gguf", meta));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->arch.architecture, "DeepseekV3ForCausalLM");
  EXPECT_THAT(m->arch.moe_layers, ElementsAre(1, 2, 3));
  EXPECT_EQ(m->arch.scoring, MoeScoring::kSigmoid);
  EXPECT_TRUE(m->arch.norm_topk_prob);
  EXPECT_EQ(m->arch.routed_scaling_factor, 2.5f);
  EXPECT_EQ(m->arch.num_shared_experts, 1);
  EXPECT_EQ(m->arch.shared_intermediate, 32);
  EXPECT_EQ(m->arch.n_group, 4);
  EXPECT_EQ(m->arch.topk_group, 2);
  ExpectConfigRoundTrip(*m);
}

TEST(GgufArch, Deepseek2WithoutGatingIsV2Softmax) {
  GgufMetadata meta = Base("deepseek2");
  meta.push_back({"deepseek2.leading_dense_block_count", GgufValue::Uint32(1)});
  meta.push_back({"deepseek2.expert_weights_scale", GgufValue::Float32(1.0f)});
  absl::StatusOr<GgufMoeModel> m = ArchOf(Write("v2.gguf", meta));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->arch.architecture, "DeepseekV2ForCausalLM");
  EXPECT_EQ(m->arch.scoring, MoeScoring::kSoftmax);
  EXPECT_FALSE(m->arch.norm_topk_prob);
  EXPECT_EQ(m->arch.routed_scaling_factor, 1.0f);
  ExpectConfigRoundTrip(*m);
}

TEST(GgufArch, Glm4MoeDropsTheNextnLayers) {
  GgufMetadata meta = Base("glm4moe", 5);
  meta.push_back({"glm4moe.leading_dense_block_count", GgufValue::Uint32(1)});
  meta.push_back({"glm4moe.nextn_predict_layers", GgufValue::Uint32(1)});
  meta.push_back({"glm4moe.expert_weights_scale", GgufValue::Float32(2.5f)});
  meta.push_back({"glm4moe.expert_weights_norm", GgufValue::Bool(true)});
  absl::StatusOr<GgufMoeModel> m = ArchOf(Write("glm.gguf", meta));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->arch.architecture, "Glm4MoeForCausalLM");
  EXPECT_EQ(m->arch.num_layers, 4);
  EXPECT_THAT(m->arch.moe_layers, ElementsAre(1, 2, 3));
  EXPECT_EQ(m->arch.scoring, MoeScoring::kSigmoid);  // GLM's default when expert_gating_func is absent
  ExpectConfigRoundTrip(*m);
}

TEST(GgufArch, LlamaWithExpertsIsMixtral) {
  GgufMetadata meta = Base("llama");
  meta.pop_back();  // Mixtral's experts' size is feed_forward_length
  meta.push_back({"llama.feed_forward_length", GgufValue::Uint32(48)});
  absl::StatusOr<GgufMoeModel> m = ArchOf(Write("mixtral.gguf", meta));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->arch.architecture, "MixtralForCausalLM");
  EXPECT_EQ(m->arch.intermediate, 48);
  EXPECT_TRUE(m->arch.norm_topk_prob);
  ExpectConfigRoundTrip(*m);
}

TEST(GgufArch, IntermediateFromTheExpertTensorWhenTheKeyIsAbsent) {
  GgufMetadata meta = Base("qwen3moe");
  meta.pop_back();
  const std::vector<uint8_t> bytes(64 * 24 * 8 * 4);
  absl::StatusOr<GgufMoeModel> m =
      ArchOf(Write("noff.gguf", meta, {{"blk.0.ffn_gate_exps.weight", GgmlType::kF32, {64, 24, 8}, bytes}}));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->arch.intermediate, 24);
  const absl::StatusOr<GgufMoeModel> none = ArchOf(Write("noff2.gguf", meta));
  EXPECT_THAT(std::string(none.status().message()),
              HasSubstr("metadata \"qwen3moe.expert_feed_forward_length\" is missing"));
}

TEST(GgufArch, MetadataFromTheFileThatHasExperts) {
  const std::string dir = ::testing::TempDir() + "/withmmproj";
  ::mkdir(dir.c_str(), 0755);
  Write("withmmproj/a-mmproj.gguf", {{"general.architecture", GgufValue::String("clip")}});
  Write("withmmproj/b-model.gguf", Base("qwen3moe"));
  absl::StatusOr<GgufMoeModel> m = ArchOf(dir);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_THAT(m->metadata_file, HasSubstr("b-model.gguf"));
}

TEST(GgufArch, Errors) {
  auto error = [](const std::string& file, const GgufMetadata& meta) {
    const std::string path = Write(file, meta);
    absl::StatusOr<GgufMoeModel> m = ArchOf(path);
    EXPECT_FALSE(m.ok()) << file;
    EXPECT_THAT(std::string(m.status().message()), HasSubstr(path)) << file;
    return std::string(m.status().message());
  };
  EXPECT_THAT(error("gemma.gguf", Base("gemma3")),
              HasSubstr("general.architecture is \"gemma3\", which kt convert does not map to a MoE model; known: "
                        "qwen2moe, qwen3moe, deepseek2, glm4moe"));
  GgufMetadata no_count = Base("qwen3moe");
  no_count.erase(no_count.begin() + 3);
  EXPECT_THAT(error("nocount.gguf", no_count),
              HasSubstr("metadata \"qwen3moe.expert_count\" is missing (the routed expert count)"));
  GgufMetadata big_k = Base("qwen3moe");
  big_k[4].second = GgufValue::Uint32(9);
  EXPECT_THAT(error("bigk.gguf", big_k), HasSubstr("metadata \"qwen3moe.expert_used_count\" must be an integer in "
                                                   "[1, expert_count (8)], got 9"));
  GgufMetadata text = Base("qwen3moe");
  text[1].second = GgufValue::String("four");
  EXPECT_THAT(error("text.gguf", text), HasSubstr("metadata \"qwen3moe.block_count\": expected an integer"));
  EXPECT_THAT(error("dense.gguf", {{"general.architecture", GgufValue::String("llama")},
                                   {"llama.block_count", GgufValue::Uint32(2)}}),
              HasSubstr("a dense llama model"));
  GgufMetadata v3 = Base("deepseek2");
  v3.push_back({"deepseek2.leading_dense_block_count", GgufValue::Uint32(1)});
  v3.push_back({"deepseek2.expert_gating_func", GgufValue::Uint32(2)});
  EXPECT_THAT(error("v3noscale.gguf", v3), HasSubstr("metadata \"deepseek2.expert_weights_scale\" is missing"));
  GgufMetadata no_lead = Base("deepseek2");
  EXPECT_THAT(error("nolead.gguf", no_lead),
              HasSubstr("metadata \"deepseek2.leading_dense_block_count\" is missing (how many leading layers are "
                        "dense)"));
  GgufMetadata groups = no_lead;
  groups.push_back({"deepseek2.leading_dense_block_count", GgufValue::Uint32(1)});
  groups.push_back({"deepseek2.expert_gating_func", GgufValue::Uint32(2)});
  groups.push_back({"deepseek2.expert_weights_scale", GgufValue::Float32(2.5f)});
  groups.push_back({"deepseek2.expert_group_count", GgufValue::Uint32(3)});  // 8 experts in 3 groups
  EXPECT_THAT(error("groups.gguf", groups), HasSubstr("n_group must be a divisor of n_routed_experts (8)"));
  EXPECT_THAT(error("noarch.gguf", {{"general.name", GgufValue::String("x")}}),
              HasSubstr("no file has metadata \"general.architecture\""));
}

}  // namespace
}  // namespace kt
