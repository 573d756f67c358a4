// ParseMoeConfig's errors: each names the origin, the key (with its text_config. path) and the expected
// against the found value. The configs that parse: arch_test.cc.
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/arch.h"

namespace kt {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

MoeArch MustParse(absl::string_view json) {
  absl::StatusOr<MoeArch> a = ParseMoeConfig(json, "config.json");
  EXPECT_TRUE(a.ok()) << a.status() << "\n" << json;
  return a.ok() ? *a : MoeArch();
}

// The error message of a config that must not parse.
std::string ErrorOf(absl::string_view json) {
  absl::StatusOr<MoeArch> a = ParseMoeConfig(json, "config.json");
  EXPECT_FALSE(a.ok()) << json;
  if (a.ok()) return "";
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(a.status().message().substr(0, 13), "config.json: ") << a.status();
  return std::string(a.status().message());
}

TEST(ArchErrorTest, MlpLayerTypes) {
  const std::string base = R"({"architectures": ["GlmMoeDsaForCausalLM"], "hidden_size": 64,
      "num_hidden_layers": 3, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, )";
  EXPECT_THAT(ErrorOf(base + R"("mlp_layer_types": ["dense", "sparse"]})"),
              HasSubstr("mlp_layer_types must be an array of num_hidden_layers (3) strings, each \"dense\" or "
                        "\"sparse\", got an array of 2"));
  EXPECT_THAT(ErrorOf(base + R"("mlp_layer_types": ["dense", "moe", "sparse"]})"),
              HasSubstr("got the string \"moe\""));
  EXPECT_THAT(ErrorOf(base + R"("first_k_dense_replace": 2, "mlp_layer_types": ["dense", "sparse", "sparse"]})"),
              HasSubstr("mlp_layer_types says layer 1 is sparse but first_k_dense_replace = 2 says dense"));
}

// MiniMax-M3 (text_config): moe_layer_freq is one 0 or 1 per layer (mlp_layer_types, where given, wins);
// swiglu_beta other than 1 is refused (kt computes up + 1); defaults are MiniMaxM3VLTextConfig's.
TEST(ArchErrorTest, MiniMaxM3) {
  const std::string base = R"({"architectures": ["MiniMaxM3SparseForConditionalGeneration"], "text_config": {
      "hidden_size": 64, "num_hidden_layers": 3, "num_local_experts": 8, "num_experts_per_tok": 2,
      "intermediate_size": 32, )";
  EXPECT_THAT(ErrorOf(base + R"("moe_layer_freq": [0, 1]}})"),
              HasSubstr("text_config.moe_layer_freq must be an array of num_hidden_layers (3) integers, each 0 "
                        "(dense) or 1 (MoE), got an array of 2"));
  EXPECT_THAT(ErrorOf(base + R"("moe_layer_freq": [0, 2, 1]}})"), HasSubstr("got 2"));
  EXPECT_THAT(ErrorOf(base + R"("swiglu_beta": 0.5}})"),
              HasSubstr("text_config.swiglu_beta must be 1 (kt computes gate * sigmoid(alpha * gate) * (up + 1))"));
  EXPECT_THAT(ErrorOf(base + R"("swiglu_limit": -7}})"), HasSubstr("text_config.swiglu_limit must be a positive"));
  const MoeArch a = MustParse(base + R"("swiglu_beta": 1.0, "mlp_layer_types": ["dense", "sparse", "sparse"],
      "moe_layer_freq": [0, 0, 1]}})");
  EXPECT_THAT(a.moe_layers, ElementsAre(1, 2));
  EXPECT_EQ(a.layer_prefix, "language_model.model.layers");
  EXPECT_EQ(a.swiglu_alpha, 1.702f);
  EXPECT_EQ(a.swiglu_limit, 7.0f);
  EXPECT_EQ(a.routed_scaling_factor, 2.0f);
  EXPECT_EQ(a.shared_intermediate, 3072);
  EXPECT_THAT(MustParse(base + R"("moe_layer_freq": [0, 0, 1]}})").moe_layers, ElementsAre(2));
  EXPECT_THAT(MustParse(base + "\"rms_norm_eps\": 1e-6}}").moe_layers, ElementsAre(0, 1, 2));
}

constexpr char kMixtralBase[] = R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 64,
    "intermediate_size": 32, "num_hidden_layers": 2, "num_local_experts": 8, "num_experts_per_tok": 2})";

std::string Mixtral(absl::string_view from, absl::string_view to) {
  std::string s = absl::StrReplaceAll(kMixtralBase, {{from, to}});
  EXPECT_NE(s, kMixtralBase) << from;
  return s;
}

TEST(ArchErrorTest, UnknownArchitectureListsKnownOnes) {
  const std::string e = ErrorOf(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})");
  EXPECT_THAT(e, HasSubstr("unknown architecture \"LlamaForCausalLM\"; known: Qwen2MoeForCausalLM, "));
  for (const std::string& name : KnownMoeArchitectures()) EXPECT_THAT(e, HasSubstr(name));
  EXPECT_THAT(e, HasSubstr("MixtralForCausalLM"));
  EXPECT_THAT(e, HasSubstr("Glm4MoeForCausalLM"));
}

TEST(ArchErrorTest, ArchitecturesMissingOrMalformed) {
  EXPECT_THAT(ErrorOf(R"({"hidden_size": 64})"), HasSubstr("config.json: architectures is missing"));
  EXPECT_THAT(
      ErrorOf(R"({"architectures": "MixtralForCausalLM"})"),
      HasSubstr("architectures must be an array of one string, got the string \"MixtralForCausalLM\""));
  EXPECT_THAT(ErrorOf(R"({"architectures": ["MixtralForCausalLM", "Qwen3MoeForCausalLM"]})"),
              HasSubstr("architectures must be an array of one string, got an array of 2"));
  EXPECT_THAT(ErrorOf(R"({"architectures": [7]})"),
              HasSubstr("architectures must be an array of one string, got 7"));
}

TEST(ArchErrorTest, ConfigWithoutMoeFields) {
  EXPECT_EQ(
      ErrorOf(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
      "intermediate_size": 128})"),
      "config.json: no MoE fields for Qwen3MoeForCausalLM: looked for num_experts or num_local_experts, "
      "num_experts_per_tok, moe_intermediate_size");
  EXPECT_EQ(
      ErrorOf(R"({"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2})"),
      "config.json: no MoE fields for DeepseekV3ForCausalLM: looked for n_routed_experts, "
      "num_experts_per_tok, moe_intermediate_size");
  EXPECT_THAT(ErrorOf(R"({"architectures": ["Qwen3VLMoeForConditionalGeneration"], "num_experts": 8,
      "text_config": {"hidden_size": 64}})"),
              HasSubstr("no MoE fields for Qwen3VLMoeForConditionalGeneration: looked for num_experts or "
                        "num_local_experts, num_experts_per_tok, moe_intermediate_size under text_config"));
  EXPECT_THAT(ErrorOf(R"({"architectures": ["Qwen3VLMoeForConditionalGeneration"], "hidden_size": 64})"),
              HasSubstr("text_config is missing"));
}

TEST(ArchErrorTest, OneMoeKeyMissing) {
  EXPECT_THAT(
      ErrorOf(Mixtral(R"("num_local_experts": 8, )", "")),
      HasSubstr("config.json: num_local_experts is missing (MixtralForCausalLM needs num_local_experts, "
                "num_experts_per_tok, intermediate_size)"));
  EXPECT_THAT(ErrorOf(Mixtral(R"(, "num_experts_per_tok": 2)", "")),
              HasSubstr("num_experts_per_tok is missing"));
  EXPECT_THAT(ErrorOf(Mixtral(R"("hidden_size": 64,)", "")), HasSubstr("hidden_size is missing"));
  EXPECT_THAT(ErrorOf(Mixtral(R"("num_hidden_layers": 2,)", "")), HasSubstr("num_hidden_layers is missing"));
  EXPECT_THAT(ErrorOf(R"({"architectures": ["Qwen3VLMoeForConditionalGeneration"],
      "text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_experts": 8,
        "num_experts_per_tok": 2}})"),
              HasSubstr("config.json: text_config.moe_intermediate_size is missing"));
}

TEST(ArchErrorTest, TopKOutOfRange) {
  EXPECT_EQ(ErrorOf(Mixtral(R"("num_experts_per_tok": 2)", R"("num_experts_per_tok": 0)")),
            "config.json: num_experts_per_tok must be a positive integer <= num_local_experts (8), got 0");
  EXPECT_EQ(ErrorOf(Mixtral(R"("num_experts_per_tok": 2)", R"("num_experts_per_tok": 9)")),
            "config.json: num_experts_per_tok must be a positive integer <= num_local_experts (8), got 9");
}

TEST(ArchErrorTest, WrongTypes) {
  EXPECT_EQ(ErrorOf(Mixtral(R"("hidden_size": 64)", R"("hidden_size": "64")")),
            "config.json: hidden_size must be a positive integer <= 1048576, got the string \"64\"");
  EXPECT_EQ(ErrorOf(Mixtral(R"("hidden_size": 64)", R"("hidden_size": 64.0)")),
            "config.json: hidden_size must be a positive integer <= 1048576, got 64.0");
  EXPECT_EQ(ErrorOf(Mixtral(R"("num_local_experts": 8)", R"("num_local_experts": -8)")),
            "config.json: num_local_experts must be a positive integer <= 65536, got -8");
  EXPECT_EQ(ErrorOf(Mixtral(R"("num_hidden_layers": 2)", R"("num_hidden_layers": [2])")),
            "config.json: num_hidden_layers must be a positive integer <= 4096, got an array of 1");
  EXPECT_EQ(ErrorOf(Mixtral(R"("num_hidden_layers": 2)", R"("num_hidden_layers": 2000000000)")),
            "config.json: num_hidden_layers must be a positive integer <= 4096, got 2000000000");
  EXPECT_THAT(ErrorOf(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
      "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": 1})"),
              HasSubstr("norm_topk_prob must be true or false, got 1"));
  EXPECT_THAT(ErrorOf(R"({"architectures": ["Qwen3VLMoeForConditionalGeneration"], "text_config": [1]})"),
              HasSubstr("text_config must be an object, got an array of 1"));
}

constexpr char kDeepseekBase[] = R"({"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64,
    "num_hidden_layers": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "n_group": 4, "topk_group": 2})";

std::string Deepseek(absl::string_view from, absl::string_view to) {
  std::string s = absl::StrReplaceAll(kDeepseekBase, {{from, to}});
  EXPECT_NE(s, kDeepseekBase) << from;
  return s;
}

TEST(ArchErrorTest, DeepseekKeys) {
  EXPECT_THAT(MustParse(kDeepseekBase).moe_layers, ElementsAre(1, 2, 3));
  EXPECT_THAT(
      ErrorOf(Deepseek(R"("first_k_dense_replace": 1, )", "")),
      HasSubstr("first_k_dense_replace is missing (DeepseekV3ForCausalLM configs state how many leading "
                "layers are dense)"));
  EXPECT_EQ(ErrorOf(Deepseek(R"("first_k_dense_replace": 1)", R"("first_k_dense_replace": 4)")),
            "config.json: no MoE layer among the 4 layers (first_k_dense_replace = 4, moe_layer_freq = 1)");
  EXPECT_EQ(
      ErrorOf(Deepseek(R"("first_k_dense_replace": 1)", R"("first_k_dense_replace": 5)")),
      "config.json: first_k_dense_replace must be a non-negative integer <= num_hidden_layers (4), got 5");
  EXPECT_THAT(ErrorOf(Deepseek(R"("routed_scaling_factor": 2.5, )", "")),
              HasSubstr("routed_scaling_factor is missing"));
  EXPECT_EQ(ErrorOf(Deepseek(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": -2.5)")),
            "config.json: routed_scaling_factor must be a positive finite number, got -2.5");
  // A literal that overflows a double is a JSON error at its offset (the parser never yields inf); one that
  // is a finite double but overflows the float it is stored in is this key's error.
  const std::string overflow =
      Deepseek(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": 1e999)");
  EXPECT_EQ(ErrorOf(overflow), absl::StrCat("config.json: JSON error at byte ", overflow.find("1e999"),
                                            ": number 1e999 is outside the range of a double"));
  EXPECT_EQ(ErrorOf(Deepseek(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": 1e39)")),
            "config.json: routed_scaling_factor must be a positive finite number, got 1e+39");
  EXPECT_EQ(ErrorOf(Deepseek(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": 0.0)")),
            "config.json: routed_scaling_factor must be a positive finite number, got 0.0");
  EXPECT_EQ(ErrorOf(Deepseek(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": 1e-400)")),
            "config.json: routed_scaling_factor must be a positive finite number, got 0.0");
  EXPECT_EQ(ErrorOf(Deepseek(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": 0)")),
            "config.json: routed_scaling_factor must be a positive finite number, got 0");
  EXPECT_EQ(ErrorOf(Deepseek(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": [2.5])")),
            "config.json: routed_scaling_factor must be a positive number, got an array of 1");
  EXPECT_EQ(ErrorOf(Deepseek(R"("topk_group": 2)", R"("topk_group": 5)")),
            "config.json: topk_group must be a positive integer <= n_group (4), got 5");
  EXPECT_EQ(ErrorOf(Deepseek(R"("n_group": 4)", R"("n_group": 3)")),
            "config.json: n_group must be a divisor of n_routed_experts (8), got 3");
  EXPECT_EQ(ErrorOf(Deepseek(R"("n_group": 4)", R"("n_group": 4, "scoring_func": "relu")")),
            "config.json: scoring_func must be \"softmax\" or \"sigmoid\", got the string \"relu\"");
}

TEST(ArchErrorTest, QwenLayerKeys) {
  const std::string base =
      R"({"architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4,
      "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, )";
  EXPECT_EQ(
      ErrorOf(base + R"("mlp_only_layers": [0, 4]})"),
      "config.json: mlp_only_layers must be an array of layer indices in [0, num_hidden_layers (4)), got 4");
  EXPECT_EQ(
      ErrorOf(base + R"("mlp_only_layers": 0})"),
      "config.json: mlp_only_layers must be an array of layer indices in [0, num_hidden_layers (4)), got 0");
  EXPECT_EQ(ErrorOf(base + R"("decoder_sparse_step": 0})"),
            "config.json: decoder_sparse_step must be a positive integer <= 4096, got 0");
  EXPECT_EQ(ErrorOf(base + R"("mlp_only_layers": [0, 1, 2, 3]})"),
            "config.json: no MoE layer among the 4 layers (decoder_sparse_step = 1, mlp_only_layers = [0, 1, "
            "2, 3])");
}

TEST(ArchErrorTest, Quantization) {
  const std::string base =
      R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 32,
      "num_hidden_layers": 1, "num_local_experts": 4, "num_experts_per_tok": 2, "quantization_config": )";
  EXPECT_EQ(ErrorOf(base + R"("fp8"})"),
            "config.json: quantization_config must be an object, got the string \"fp8\"");
  EXPECT_THAT(ErrorOf(base + R"({"fmt": "e4m3"}})"),
              HasSubstr("quantization_config.quant_method is missing"));
  EXPECT_EQ(
      ErrorOf(base + R"({"quant_method": "fp8", "weight_block_size": [128]}})"),
      "config.json: quantization_config.weight_block_size must be an array of 2 positive integers <= 65536 "
      "([rows, columns]), got an array of 1");
  EXPECT_EQ(
      ErrorOf(base + R"({"quant_method": "fp8", "weight_block_size": [128, 0]}})"),
      "config.json: quantization_config.weight_block_size must be an array of 2 positive integers <= 65536 "
      "([rows, columns]), got 0");
}

TEST(ArchErrorTest, NotJsonOrNotAnObject) {
  EXPECT_THAT(ErrorOf("{\"architectures\": "),
              HasSubstr("config.json: JSON error at byte 18: unexpected end of input"));
  EXPECT_EQ(ErrorOf("[1, 2]"), "config.json: expected a JSON object, found array");
  EXPECT_THAT(ErrorOf(R"({"a": 1, "a": 2})"), HasSubstr("duplicate"));
}

TEST(ArchErrorTest, NamesOutOfRange) {
  MoeArch a = MustParse(kMixtralBase);
  absl::StatusOr<ExpertNames> n = ExpertTensorNames(a, 2, 0);
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().message(), "MixtralForCausalLM: layer 2 out of range [0, 2)");
  n = ExpertTensorNames(a, 0, 8);
  ASSERT_FALSE(n.ok());
  EXPECT_EQ(n.status().message(), "MixtralForCausalLM: expert 8 out of range [0, 8)");
  n = ExpertTensorNames(a, -1, 0);
  EXPECT_FALSE(n.ok());
}

TEST(ArchErrorTest, LoadMissingFolder) {
  absl::StatusOr<MoeArch> a = LoadMoeConfig("/nonexistent/kt_arch_test");
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(a.status().message(), HasSubstr("/nonexistent/kt_arch_test/config.json"));
}

}  // namespace
}  // namespace kt
