// Runs the libFuzzer entry point (arch_fuzz.cc) over a deterministic corpus: byte changes, insertions,
// deletions and truncations of real-looking configs (the three fixtures' shapes, a VL config, a DeepSeek FP8
// one), plus number-heavy snippets aimed at the fractional-number grammar. Built with ASan and UBSan; every
// input must either parse (the entry point checks the invariants) or fail with an error that starts with the
// origin.
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kt/io/arch.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace kt {
namespace {

const std::vector<std::string>& Seeds() {
  static const std::vector<std::string> seeds = {
      R"({"architectures": ["Qwen3MoeForCausalLM"], "decoder_sparse_step": 1, "hidden_size": 256,
 "mlp_only_layers": [], "moe_intermediate_size": 128, "norm_topk_prob": true, "num_experts_per_tok": 4,
 "num_hidden_layers": 2, "num_local_experts": 16, "rms_norm_eps": 1e-06,
   "rope_parameters": {"rope_theta": 10000.0}})",
      R"({"architectures": ["MixtralForCausalLM"], "hidden_size": 256, "intermediate_size": 128,
 "num_experts_per_tok": 4, "num_hidden_layers": 2, "num_local_experts": 16, "router_jitter_noise": 0.0})",
      R"({"architectures": ["DeepseekV3ForCausalLM"], "first_k_dense_replace": 1, "hidden_size": 256,
 "moe_intermediate_size": 128, "n_group": 4, "n_routed_experts": 16, "n_shared_experts": 1,
 "num_experts_per_tok": 4, "num_hidden_layers": 2, "routed_scaling_factor": 2.5, "topk_group": 2,
 "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}})",
      R"({"architectures": ["Qwen3VLMoeForConditionalGeneration"], "text_config": {"hidden_size": 64,
 "num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
 "decoder_sparse_step": 2, "mlp_only_layers": [0]}, "vision_config": {"x": [1.5, -2e3, "\u00e9\"1.5"]}})",
      R"({"architectures": ["DeepseekV2ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 8,
 "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 3,
 "moe_layer_freq": 2, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2})",
      R"({"architectures": ["MiniMaxM3SparseForConditionalGeneration"], "text_config": {"hidden_size": 128,
 "intermediate_size": 64, "moe_layer_freq": [0, 1, 1], "num_experts_per_tok": 2, "num_hidden_layers": 3,
 "num_local_experts": 8, "scoring_func": "sigmoid", "swiglu_alpha": 1.702, "swiglu_limit": 2.0}})",
  };
  return seeds;
}

// Runs one input through the fuzz entry and the parser; returns whether it parsed.
bool RunOne(const std::string& input) {
  LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
  absl::StatusOr<MoeArch> a = ParseMoeConfig(input, "<fuzz>");
  if (!a.ok()) {
    EXPECT_EQ(a.status().message().substr(0, 8), "<fuzz>: ") << a.status();
    return false;
  }
  return true;
}

TEST(ArchFuzzTest, SeedsParse) {
  for (const std::string& s : Seeds()) EXPECT_TRUE(RunOne(s)) << s;
}

TEST(ArchFuzzTest, MutatedConfigsNeverCrash) {
  const std::string interesting = "{}[]\":,\\u0123456789-+eE. \t\n\x00\x7F\xFF\xC3";
  std::mt19937_64 rng(20240612);  // Fixed seed: the same corpus on every run.
  const auto pick = [&](uint64_t bound) { return static_cast<size_t>(rng() % bound); };
  int parsed = 0, total = 0;
  for (const std::string& seed : Seeds()) {
    for (int i = 0; i < 1500; ++i) {
      std::string s = seed;
      const int kind = static_cast<int>(pick(4));
      const int edits = 1 + static_cast<int>(pick(3));
      for (int k = 0; k < edits && !s.empty(); ++k) {
        const size_t at = pick(s.size());
        const char c = interesting[pick(interesting.size())];
        if (kind == 0) {
          s[at] = c;
        } else if (kind == 1) {
          s.insert(at, 1, c);
        } else if (kind == 2) {
          s.erase(at, 1 + pick(4));
        } else {
          s.resize(at);
        }
      }
      parsed += RunOne(s) ? 1 : 0;
      ++total;
    }
  }
  // Some mutations keep the config valid (a changed digit, whitespace); most break it.
  EXPECT_GT(parsed, 0);
  EXPECT_LT(parsed, total);
}

TEST(ArchFuzzTest, NumberEdgeCases) {
  for (const char* s :
       {"1.5",         "-0.0",        "1e5",   "1E+5",  "1e-5",  "-1.5e-300", "1e400",
        "-",           "-.",          "1.",    ".5",    "1e",    "1e+",       "01.5",
        "1.5.5",       "1.5e5e5",     "\"1.5", "1.5\"", "[1.5:", "{1.5:1}",   "{\"a\":1.5 :1}",
        "\"\\\"1.5\"", "\"\\\\\"1.5", "1.5\\"}) {
    RunOne(s);
    RunOne(std::string("{\"architectures\": [\"MixtralForCausalLM\"], \"x\": ") + s + "}");
    RunOne(std::string("{\"architectures\": [\"MixtralForCausalLM\"], \"num_local_experts\": ") + s + "}");
  }
}

}  // namespace
}  // namespace kt
