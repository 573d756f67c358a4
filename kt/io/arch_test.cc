// ParseMoeConfig over every test checkpoint of testdata/hf (made by transformers, tools/make_fixtures.py),
// whose expert names are then looked up in the checkpoint, and over hand-written configs for real models'
// sizes and the routing keys. The errors: arch_errors_test.cc.
#include "kt/io/arch.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/checkpoint.h"
#include "kt/io/safetensors.h"
#include "kt/io/test_files.h"

namespace kt {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using testing_files::TestdataHf;

// Every MoE layer's every expert: the names exist in the checkpoint with gate/up [I, H], down [H, I] (per
// expert), or gate_up/down in the layout's order (fused); FP8 weights with one F32 scale per block.
void CheckNamesInCheckpoint(const MoeArch& arch, const Checkpoint& ckpt, Dtype dtype, bool fp8_scales) {
  const int64_t E = arch.num_experts, H = arch.hidden, I = arch.intermediate;
  for (int layer : arch.moe_layers) {
    absl::StatusOr<std::string> router = RouterTensorName(arch, layer);
    ASSERT_TRUE(router.ok()) << router.status();
    EXPECT_TRUE(ckpt.Expect(*router, Dtype::kBf16, {E, H}).ok()) << *router;
    if (arch.fused_experts()) {
      absl::StatusOr<FusedExpertNames> n = FusedExpertTensorNames(arch, layer);
      ASSERT_TRUE(n.ok()) << n.status();
      const bool out_in = arch.layout == ExpertLayout::kFusedGateUpOutIn;
      absl::StatusOr<Checkpoint::Located> gu =
          ckpt.Expect(n->gate_up, dtype, out_in ? std::vector<int64_t>{E, 2 * I, H} : std::vector<int64_t>{E, H, 2 * I});
      EXPECT_TRUE(gu.ok()) << gu.status();
      absl::StatusOr<Checkpoint::Located> dn =
          ckpt.Expect(n->down, dtype, out_in ? std::vector<int64_t>{E, H, I} : std::vector<int64_t>{E, I, H});
      EXPECT_TRUE(dn.ok()) << dn.status();
      continue;
    }
    for (int e = 0; e < arch.num_experts; ++e) {
      absl::StatusOr<ExpertNames> n = ExpertTensorNames(arch, layer, e);
      ASSERT_TRUE(n.ok()) << n.status();
      for (const auto& [name, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
               {n->gate, {I, H}}, {n->up, {I, H}}, {n->down, {H, I}}}) {
        absl::StatusOr<Checkpoint::Located> loc = ckpt.Expect(name, dtype, shape);
        EXPECT_TRUE(loc.ok()) << loc.status();
        if (fp8_scales) {
          ASSERT_TRUE(arch.quantization.has_value());
          const std::vector<int>& b = arch.quantization->weight_block_size;
          ASSERT_EQ(b.size(), 2u);
          const std::vector<int64_t> scale_shape = {(shape[0] + b[0] - 1) / b[0],
                                                    (shape[1] + b[1] - 1) / b[1]};
          absl::StatusOr<Checkpoint::Located> s =
              ckpt.Expect(Fp8ScaleInvName(name), Dtype::kF32, scale_shape);
          EXPECT_TRUE(s.ok()) << s.status();
        }
      }
    }
  }
  // Dense layers have no experts in the checkpoint (and asking for their names is an error).
  for (int layer = 0; layer < arch.num_layers; ++layer) {
    if (arch.IsMoeLayer(layer)) continue;
    EXPECT_EQ(
        ckpt.Find(absl::StrCat(arch.layer_prefix, ".", layer, ".", arch.block, ".experts.0.gate_proj.weight"))
            .info,
        nullptr);
    absl::StatusOr<ExpertNames> n = ExpertTensorNames(arch, layer, 0);
    EXPECT_FALSE(n.ok());
    EXPECT_THAT(n.status().message(), HasSubstr(absl::StrCat("layer ", layer, " is dense")));
  }
}

// What each testdata checkpoint's config must map to. The values are those tools/make_fixtures.py gave
// transformers' config classes (and that config.json records).
struct Expected {
  const char* folder;
  const char* architecture;
  MoeFamily family;
  int layers, experts, top_k, hidden, intermediate;
  std::vector<int> moe_layers;
  const char* prefix;
  const char* block;
  ExpertLayout layout;  // As the config alone says (the checkpoint may hold another: layer_experts.h).
  int shared_experts, shared_intermediate;
  float routed_scaling_factor;
  int n_group, topk_group;
};

const std::vector<Expected>& AllExpected() {
  constexpr ExpertLayout kPer = ExpertLayout::kPerExpert, kOutIn = ExpertLayout::kFusedGateUpOutIn,
                         kInOut = ExpertLayout::kFusedGateUpInOut;
  static const auto* all = new std::vector<Expected>{
      {"deepseek_v2", "DeepseekV2ForCausalLM", MoeFamily::kDeepseekV2, 2, 8, 2, 64, 32, {1}, "model.layers",
       "mlp", kPer, 1, 32, 2.0f, 4, 2},
      {"deepseek_v3", "DeepseekV3ForCausalLM", MoeFamily::kDeepseekV3, 2, 8, 2, 64, 32, {1}, "model.layers",
       "mlp", kPer, 1, 32, 2.5f, 4, 2},
      {"deepseek_v3_fp8", "DeepseekV3ForCausalLM", MoeFamily::kDeepseekV3, 2, 4, 2, 256, 128, {1},
       "model.layers", "mlp", kPer, 1, 128, 2.5f, 2, 1},
      {"deepseek_v32", "DeepseekV32ForCausalLM", MoeFamily::kDeepseekV3, 2, 8, 2, 64, 32, {1},
       "model.layers", "mlp", kPer, 1, 32, 2.5f, 4, 2},
      {"glm4_moe_lite", "Glm4MoeLiteForCausalLM", MoeFamily::kGlm4Moe, 2, 8, 2, 64, 32, {1}, "model.layers",
       "mlp", kPer, 1, 32, 1.8f, 1, 1},
      {"glm_moe_dsa", "GlmMoeDsaForCausalLM", MoeFamily::kGlm4Moe, 2, 8, 2, 64, 32, {1}, "model.layers", "mlp",
       kPer, 1, 32, 2.5f, 1, 1},
      {"glm4_moe", "Glm4MoeForCausalLM", MoeFamily::kGlm4Moe, 2, 8, 2, 64, 32, {1}, "model.layers", "mlp", kPer,
       1, 32, 2.5f, 1, 1},
      {"glm4v_moe", "Glm4vMoeForConditionalGeneration", MoeFamily::kGlm4Moe, 2, 8, 2, 64, 32, {1},
       "model.language_model.layers", "mlp", kPer, 1, 32, 2.5f, 1, 1},
      {"minimax", "MiniMaxForCausalLM", MoeFamily::kMiniMax, 1, 8, 2, 64, 32, {0}, "model.layers",
       "block_sparse_moe", kPer, 0, 0, 1.0f, 1, 1},
      {"minimax_m2", "MiniMaxM2ForCausalLM", MoeFamily::kMiniMax, 1, 8, 2, 64, 32, {0}, "model.layers",
       "block_sparse_moe", kPer, 0, 0, 1.0f, 1, 1},
      {"mixtral", "MixtralForCausalLM", MoeFamily::kMixtral, 1, 8, 2, 128, 128, {0}, "model.layers",
       "block_sparse_moe", kPer, 0, 0, 1.0f, 1, 1},
      {"qwen2_moe", "Qwen2MoeForCausalLM", MoeFamily::kQwen2Moe, 1, 8, 2, 64, 32, {0}, "model.layers", "mlp",
       kPer, 1, 48, 1.0f, 1, 1},
      {"qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", MoeFamily::kQwen35Moe, 1, 8, 2, 64, 48, {0},
       "model.language_model.layers", "mlp", kOutIn, 1, 32, 1.0f, 1, 1},
      {"qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", MoeFamily::kQwen35Moe, 1, 8, 2, 64, 48, {0},
       "model.layers", "mlp", kOutIn, 1, 32, 1.0f, 1, 1},
      {"qwen3_moe", "Qwen3MoeForCausalLM", MoeFamily::kQwen3Moe, 1, 8, 2, 128, 128, {0}, "model.layers", "mlp",
       kPer, 0, 0, 1.0f, 1, 1},
      {"qwen3_next", "Qwen3NextForCausalLM", MoeFamily::kQwen3Next, 1, 8, 2, 64, 32, {0}, "model.layers", "mlp",
       kPer, 1, 32, 1.0f, 1, 1},
      {"qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", MoeFamily::kQwen3VlMoe, 1, 8, 2, 64, 48, {0},
       "model.language_model.layers", "mlp", kInOut, 0, 0, 1.0f, 1, 1},
      {"qwen3_vl_moe_resaved", "Qwen3VLMoeForConditionalGeneration", MoeFamily::kQwen3VlMoe, 1, 8, 2, 64, 48,
       {0}, "model.language_model.layers", "mlp", kInOut, 0, 0, 1.0f, 1, 1},
  };
  return *all;
}

class ArchTestdataTest : public ::testing::TestWithParam<Expected> {};

TEST_P(ArchTestdataTest, ConfigMapsAndNamesExist) {
  const Expected& want = GetParam();
  const std::string dir = TestdataHf(want.folder);
  absl::StatusOr<MoeArch> a = LoadMoeConfig(dir);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->architecture, want.architecture);
  EXPECT_EQ(a->family, want.family);
  EXPECT_EQ(a->num_layers, want.layers);
  EXPECT_EQ(a->num_experts, want.experts);
  EXPECT_EQ(a->top_k, want.top_k);
  EXPECT_EQ(a->hidden, want.hidden);
  EXPECT_EQ(a->intermediate, want.intermediate);
  EXPECT_THAT(a->moe_layers, ElementsAreArray(want.moe_layers));
  EXPECT_EQ(a->layer_prefix, want.prefix);
  EXPECT_EQ(a->block, want.block);
  EXPECT_EQ(a->layout, want.layout);
  EXPECT_EQ(a->num_shared_experts, want.shared_experts);
  EXPECT_EQ(a->shared_intermediate, want.shared_intermediate);
  EXPECT_EQ(a->routed_scaling_factor, want.routed_scaling_factor);
  EXPECT_EQ(a->n_group, want.n_group);
  EXPECT_EQ(a->topk_group, want.topk_group);
  const bool fp8 = absl::EndsWith(want.folder, "_fp8");
  EXPECT_EQ(a->quantization.has_value(), fp8);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(dir);
  ASSERT_TRUE(ckpt.ok()) << ckpt.status();
  // The layouts transformers re-saves (per expert for Qwen3.5, out-in for Qwen3-VL) are looked up in the
  // layout the checkpoint holds; LayerExperts picks it (fixtures_test checks that reading).
  MoeArch in_file = *a;
  if (absl::string_view(want.folder) == "qwen3_5_moe_text") in_file.layout = ExpertLayout::kPerExpert;
  if (absl::string_view(want.folder) == "qwen3_vl_moe_resaved") in_file.layout = ExpertLayout::kFusedGateUpOutIn;
  CheckNamesInCheckpoint(in_file, **ckpt, fp8 ? Dtype::kF8E4M3 : Dtype::kBf16, fp8);
}

INSTANTIATE_TEST_SUITE_P(Testdata, ArchTestdataTest, ::testing::ValuesIn(AllExpected()),
                         [](const ::testing::TestParamInfo<Expected>& info) {
                           return std::string(info.param.folder);
                         });

TEST(ArchTestdataTest, Fp8Quantization) {
  absl::StatusOr<MoeArch> a = LoadMoeConfig(TestdataHf("deepseek_v3_fp8"));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->model_type, "deepseek_v3");
  EXPECT_EQ(a->scoring, MoeScoring::kSigmoid);
  EXPECT_TRUE(a->norm_topk_prob);
  ASSERT_TRUE(a->quantization.has_value());
  EXPECT_EQ(a->quantization->quant_method, "fp8");
  EXPECT_EQ(a->quantization->fmt, "e4m3");
  EXPECT_EQ(a->quantization->activation_scheme, "dynamic");
  EXPECT_THAT(a->quantization->weight_block_size, ElementsAre(128, 128));
  absl::StatusOr<ExpertNames> n = ExpertTensorNames(*a, 1, 0);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->gate, "model.layers.1.mlp.experts.0.gate_proj.weight");
  EXPECT_EQ(Fp8ScaleInvName(n->gate), "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv");
}

// ---- Hand-written configs ------------------------------------------------------------------------------

MoeArch MustParse(absl::string_view json) {
  absl::StatusOr<MoeArch> a = ParseMoeConfig(json, "config.json");
  EXPECT_TRUE(a.ok()) << a.status() << "\n" << json;
  return a.ok() ? *a : MoeArch();
}

// The error message of a config that must not parse (arch_errors_test.cc has the errors by key).
std::string ErrorOf(absl::string_view json) {
  absl::StatusOr<MoeArch> a = ParseMoeConfig(json, "config.json");
  EXPECT_FALSE(a.ok()) << json;
  if (a.ok()) return "";
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(a.status().message());
}

constexpr char kQwen2Moe[] = R"({
  "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
  "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "rms_norm_eps": 1e-06,
  "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
  "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1, "mlp_only_layers": [],
  "norm_topk_prob": false, "rope_theta": 1000000.0, "initializer_range": 0.02
})";

TEST(ArchTest, Qwen2Moe) {
  MoeArch a = MustParse(kQwen2Moe);
  EXPECT_EQ(a.family, MoeFamily::kQwen2Moe);
  EXPECT_EQ(a.num_experts, 60);
  EXPECT_EQ(a.top_k, 4);
  EXPECT_EQ(a.hidden, 2048);
  EXPECT_EQ(a.intermediate, 1408);
  EXPECT_EQ(a.moe_layers.size(), 24u);
  EXPECT_EQ(a.num_shared_experts, 1);
  EXPECT_EQ(a.shared_intermediate, 5632);
  EXPECT_FALSE(a.norm_topk_prob);
  absl::StatusOr<ExpertNames> n = ExpertTensorNames(a, 23, 59);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->down, "model.layers.23.mlp.experts.59.down_proj.weight");
}

TEST(ArchTest, QwenSparseStepAndMlpOnlyLayers) {
  MoeArch a =
      MustParse(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 8,
      "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 2,
      "mlp_only_layers": [3, 5]})");
  // (i + 1) % 2 == 0: 1, 3, 5, 7; minus 3 and 5.
  EXPECT_THAT(a.moe_layers, ElementsAre(1, 7));
  EXPECT_FALSE(a.norm_topk_prob);  // transformers' Qwen3MoeConfig default.
  absl::StatusOr<std::string> router = RouterTensorName(a, 7);
  ASSERT_TRUE(router.ok());
  EXPECT_EQ(*router, "model.layers.7.mlp.gate.weight");
  absl::StatusOr<ExpertNames> dense = ExpertTensorNames(a, 3, 0);
  ASSERT_FALSE(dense.ok());
  EXPECT_THAT(dense.status().message(), HasSubstr("layer 3 is dense, not MoE (MoE layers: 1, 7)"));
}

TEST(ArchTest, QwenBothExpertCountKeysMustAgree) {
  MoeArch a =
      MustParse(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
      "num_experts": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32})");
  EXPECT_EQ(a.num_experts, 8);
  EXPECT_THAT(ErrorOf(R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
      "num_experts": 8, "num_local_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 32})"),
              HasSubstr("num_experts (8) and num_local_experts (16) disagree"));
}

TEST(ArchTest, Qwen3Next) {
  MoeArch a =
      MustParse(R"({"architectures": ["Qwen3NextForCausalLM"], "hidden_size": 2048, "num_hidden_layers": 48,
      "num_experts": 512, "num_experts_per_tok": 10, "moe_intermediate_size": 512,
      "shared_expert_intermediate_size": 512, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": true})");
  EXPECT_EQ(a.family, MoeFamily::kQwen3Next);
  EXPECT_EQ(a.num_experts, 512);
  EXPECT_EQ(a.top_k, 10);
  EXPECT_EQ(a.moe_layers.size(), 48u);
  EXPECT_EQ(a.num_shared_experts, 1);
}

TEST(ArchTest, Qwen3VlMoeFusedInOut) {
  MoeArch a =
      MustParse(R"({"architectures": ["Qwen3VLMoeForConditionalGeneration"], "model_type": "qwen3_vl_moe",
      "vision_config": {"hidden_size": 1152, "depth": 27},
      "text_config": {"model_type": "qwen3_vl_moe_text", "hidden_size": 2048, "num_hidden_layers": 48,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_section": [24, 20, 20]}}})");
  EXPECT_EQ(a.family, MoeFamily::kQwen3VlMoe);
  EXPECT_EQ(a.layer_prefix, "model.language_model.layers");
  EXPECT_EQ(a.layout, ExpertLayout::kFusedGateUpInOut);
  EXPECT_TRUE(a.fused_experts());
  EXPECT_EQ(a.hidden, 2048);
  EXPECT_EQ(a.num_experts, 128);
  EXPECT_EQ(a.intermediate, 768);
  absl::StatusOr<FusedExpertNames> f = FusedExpertTensorNames(a, 0);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->gate_up, "model.language_model.layers.0.mlp.experts.gate_up_proj");
  EXPECT_EQ(f->down, "model.language_model.layers.0.mlp.experts.down_proj");
  absl::StatusOr<ExpertNames> per = ExpertTensorNames(a, 0, 0);
  ASSERT_FALSE(per.ok());
  EXPECT_THAT(per.status().message(), HasSubstr("fused"));
  absl::StatusOr<std::string> router = RouterTensorName(a, 47);
  ASSERT_TRUE(router.ok());
  EXPECT_EQ(*router, "model.language_model.layers.47.mlp.gate.weight");
}

TEST(ArchTest, Qwen35MoeFusedOutIn) {
  MoeArch a =
      MustParse(R"({"architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
      "text_config": {"hidden_size": 2048, "num_hidden_layers": 40, "num_experts": 256,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
        "layer_types": ["linear_attention", "full_attention"]}})");
  EXPECT_EQ(a.family, MoeFamily::kQwen35Moe);
  EXPECT_EQ(a.layout, ExpertLayout::kFusedGateUpOutIn);
  EXPECT_EQ(a.layer_prefix, "model.language_model.layers");
  EXPECT_EQ(a.moe_layers.size(), 40u);
  EXPECT_EQ(a.num_shared_experts, 1);
  EXPECT_TRUE(a.norm_topk_prob);
  absl::StatusOr<FusedExpertNames> f = FusedExpertTensorNames(a, 39);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->gate_up, "model.language_model.layers.39.mlp.experts.gate_up_proj");
  EXPECT_EQ(f->down, "model.language_model.layers.39.mlp.experts.down_proj");
}

TEST(ArchTest, FusedNamesOnPerExpertLayoutIsAnError) {
  MoeArch a = MustParse(kQwen2Moe);
  absl::StatusOr<FusedExpertNames> f = FusedExpertTensorNames(a, 0);
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(f.status().message(), HasSubstr("one tensor per expert"));
}

TEST(ArchTest, DeepseekV2) {
  MoeArch a = MustParse(R"({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
      "hidden_size": 2048, "intermediate_size": 10944, "num_hidden_layers": 27, "n_routed_experts": 64,
      "num_experts_per_tok": 6, "moe_intermediate_size": 1408, "n_shared_experts": 2,
        "first_k_dense_replace": 1,
      "moe_layer_freq": 1, "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1,
        "topk_group": 1,
      "scoring_func": "softmax", "norm_topk_prob": false})");
  EXPECT_EQ(a.family, MoeFamily::kDeepseekV2);
  EXPECT_EQ(a.moe_layers.size(), 26u);
  EXPECT_EQ(a.moe_layers.front(), 1);
  EXPECT_EQ(a.num_shared_experts, 2);
  EXPECT_EQ(a.shared_intermediate, 2 * 1408);
  EXPECT_EQ(a.routed_scaling_factor, 1.0f);
  EXPECT_EQ(a.scoring, MoeScoring::kSoftmax);
  EXPECT_FALSE(a.norm_topk_prob);
}

TEST(ArchTest, MlpLayerTypesDecideTheMoeLayers) {
  // GLM-4.7-Flash's config has mlp_layer_types and no first_k_dense_replace.
  constexpr char kLite[] = R"({"architectures": ["Glm4MoeLiteForCausalLM"], "hidden_size": 64,
      "num_hidden_layers": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
      "mlp_layer_types": ["dense", "sparse", "dense", "sparse"]})";
  MoeArch a = MustParse(kLite);
  EXPECT_EQ(a.family, MoeFamily::kGlm4Moe);
  EXPECT_THAT(a.moe_layers, ElementsAre(1, 3));
  // Both keys, agreeing.
  a = MustParse(R"({"architectures": ["DeepseekV32ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 3,
      "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "routed_scaling_factor": 2.5,
      "first_k_dense_replace": 1, "mlp_layer_types": ["dense", "sparse", "sparse"]})");
  EXPECT_THAT(a.moe_layers, ElementsAre(1, 2));
}

TEST(ArchTest, DeepseekMoeLayerFreq) {
  MoeArch a =
      MustParse(R"({"architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 8,
      "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "first_k_dense_replace": 3,
      "moe_layer_freq": 2, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2})");
  EXPECT_THAT(a.moe_layers, ElementsAre(4, 6));
  EXPECT_EQ(a.n_group, 4);
  EXPECT_EQ(a.topk_group, 2);
}

TEST(ArchTest, KimiK2) {
  // Kimi-K2 ships as DeepseekV3ForCausalLM with model_type "kimi_k2" (and auto_map to its own config class).
  MoeArch a = MustParse(R"({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2",
      "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
      "hidden_size": 7168, "num_hidden_layers": 61, "n_routed_experts": 384, "num_experts_per_tok": 8,
      "moe_intermediate_size": 2048, "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
      "routed_scaling_factor": 2.827, "n_group": 1, "topk_group": 1, "scoring_func": "sigmoid",
      "topk_method": "noaux_tc", "norm_topk_prob": true, "num_nextn_predict_layers": 0,
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                              "weight_block_size": [128, 128]}})");
  EXPECT_EQ(a.family, MoeFamily::kDeepseekV3);
  EXPECT_EQ(a.model_type, "kimi_k2");
  EXPECT_EQ(a.num_experts, 384);
  EXPECT_EQ(a.moe_layers.size(), 60u);
  EXPECT_FLOAT_EQ(a.routed_scaling_factor, 2.827f);
  ASSERT_TRUE(a.quantization.has_value());
  EXPECT_THAT(a.quantization->weight_block_size, ElementsAre(128, 128));
  absl::StatusOr<ExpertNames> n = ExpertTensorNames(a, 60, 383);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->up, "model.layers.60.mlp.experts.383.up_proj.weight");
}

TEST(ArchTest, Glm4Moe) {
  MoeArch a = MustParse(R"({"architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
      "hidden_size": 5120, "intermediate_size": 12288, "num_hidden_layers": 92, "n_routed_experts": 160,
      "num_experts_per_tok": 8, "moe_intermediate_size": 1536, "n_shared_experts": 1,
        "first_k_dense_replace": 3,
      "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1, "norm_topk_prob": true,
      "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5})");
  EXPECT_EQ(a.family, MoeFamily::kGlm4Moe);
  EXPECT_EQ(a.moe_layers.size(), 89u);
  EXPECT_EQ(a.moe_layers.front(), 3);
  EXPECT_EQ(a.routed_scaling_factor, 2.5f);
  EXPECT_EQ(a.scoring, MoeScoring::kSigmoid);
  absl::StatusOr<ExpertNames> n = ExpertTensorNames(a, 3, 159);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->gate, "model.layers.3.mlp.experts.159.gate_proj.weight");
}

TEST(ArchTest, Glm4vMoeUsesLanguageModelPrefix) {
  MoeArch a = MustParse(R"({"architectures": ["Glm4vMoeForConditionalGeneration"],
      "text_config": {"hidden_size": 4096, "num_hidden_layers": 46, "n_routed_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "n_shared_experts": 1,
          "first_k_dense_replace": 1,
        "routed_scaling_factor": 1.0}})");
  EXPECT_EQ(a.layer_prefix, "model.language_model.layers");
  EXPECT_FALSE(a.fused_experts());
  absl::StatusOr<ExpertNames> n = ExpertTensorNames(a, 1, 0);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->gate, "model.language_model.layers.1.mlp.experts.0.gate_proj.weight");
}

TEST(ArchTest, MiniMaxM2) {
  MoeArch a = MustParse(R"({"architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2",
      "hidden_size": 3072, "intermediate_size": 1536, "num_hidden_layers": 62, "num_local_experts": 256,
      "num_experts_per_tok": 8, "scoring_func": "sigmoid", "use_routing_bias": true,
      "quantization_config": {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
                              "weight_block_size": [128, 128]}})");
  EXPECT_EQ(a.family, MoeFamily::kMiniMax);
  EXPECT_EQ(a.block, "block_sparse_moe");
  EXPECT_EQ(a.intermediate, 1536);
  EXPECT_EQ(a.moe_layers.size(), 62u);
  EXPECT_EQ(a.scoring, MoeScoring::kSigmoid);
  absl::StatusOr<ExpertNames> n = ExpertTensorNames(a, 61, 255);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->gate, "model.layers.61.block_sparse_moe.experts.255.w1.weight");
  EXPECT_EQ(n->up, "model.layers.61.block_sparse_moe.experts.255.w3.weight");
  EXPECT_EQ(n->down, "model.layers.61.block_sparse_moe.experts.255.w2.weight");
}

TEST(ArchTest, MiniMaxText01) {
  MoeArch a = MustParse(R"({"architectures": ["MiniMaxText01ForCausalLM"], "hidden_size": 6144,
      "intermediate_size": 9216, "num_hidden_layers": 80, "num_local_experts": 32,
        "num_experts_per_tok": 2})");
  EXPECT_EQ(a.scoring, MoeScoring::kSoftmax);
  EXPECT_EQ(a.num_experts, 32);
}

TEST(ArchTest, OtherQuantizationMethodsAreRecorded) {
  MoeArch a =
      MustParse(R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "intermediate_size": 32,
      "num_hidden_layers": 1, "num_local_experts": 4, "num_experts_per_tok": 2,
      "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {}}})");
  ASSERT_TRUE(a.quantization.has_value());
  EXPECT_EQ(a.quantization->quant_method, "compressed-tensors");
  EXPECT_TRUE(a.quantization->weight_block_size.empty());
}

TEST(ArchTest, FloatKeysTakeIntegersAndFractions) {
  const std::string base = R"({"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64,
      "num_hidden_layers": 2, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
      "first_k_dense_replace": 0, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
      "routed_scaling_factor": X})";
  const struct {
    const char* text;
    float value;
  } cases[] = {{"1", 1.0f}, {"3", 3.0f}, {"2.5", 2.5f}, {"2.827", 2.827f}, {"25e-1", 2.5f}, {"1E0", 1.0f}};
  for (const auto& c : cases) {
    MoeArch a = MustParse(absl::StrReplaceAll(base, {{"X", c.text}}));
    EXPECT_FLOAT_EQ(a.routed_scaling_factor, c.value) << c.text;
  }
  // A fractional number where an integer, a string or a bool belongs is that key's error, shown as written.
  EXPECT_EQ(ErrorOf(absl::StrReplaceAll(
                base, {{"X", "2.5"}, {"\"n_routed_experts\": 8", "\"n_routed_experts\": 8.5"}})),
            "config.json: n_routed_experts must be a positive integer <= 65536, got 8.5");
  EXPECT_EQ(
      ErrorOf(absl::StrReplaceAll(base, {{"X", "2.5"}, {"\"hidden_size\": 64", "\"hidden_size\": 6.4e1"}})),
      "config.json: hidden_size must be a positive integer <= 1048576, got 64.0");
  EXPECT_EQ(ErrorOf(absl::StrReplaceAll(base, {{"X", "2.5, \"scoring_func\": 1e-06"}})),
            "config.json: scoring_func must be a string, got 1e-06");
  EXPECT_EQ(ErrorOf(absl::StrReplaceAll(base, {{"X", "2.5, \"norm_topk_prob\": 1.0"}})),
            "config.json: norm_topk_prob must be true or false, got 1.0");
  EXPECT_THAT(ErrorOf(R"({"architectures": [1.5]})"),
              HasSubstr("architectures must be an array of one string, got 1.5"));
  EXPECT_EQ(ErrorOf("2.5"), "config.json: expected a JSON object, found number");
}

TEST(ArchTest, FractionsKeepJsonErrorOffsets) {
  // The number 2.5 before the error is parsed in place: the offset is the file's.
  const std::string text = R"({"routed_scaling_factor": 2.5, "x": tru})";
  EXPECT_THAT(ErrorOf(text), HasSubstr(absl::StrCat("JSON error at byte ", text.find("tru"))));
  // A malformed fraction is the parser's error.
  EXPECT_THAT(ErrorOf(R"({"a": 1.})"), HasSubstr("JSON error at byte"));
  EXPECT_THAT(ErrorOf(R"({"a": 01.5})"), HasSubstr("JSON error at byte"));
  // A fraction as an object key stays invalid.
  EXPECT_THAT(ErrorOf(R"({1.5: 0})"), HasSubstr("JSON error at byte"));
  // Numbers inside strings are left alone (and "1.5" as a string is a string, not a number).
  EXPECT_THAT(
      ErrorOf(R"({"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
      "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "first_k_dense_replace": 0,
      "routed_scaling_factor": "1.5"})"),
      HasSubstr("routed_scaling_factor must be a positive number, got the string \"1.5\""));
}

// ---- Errors --------------------------------------------------------------------------------------------

}  // namespace
}  // namespace kt
