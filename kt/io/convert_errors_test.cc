// kt convert's bad inputs (issue 4) and damaged outputs: each error checked for its message and for leaving
// no finished-looking output. The conversions that succeed: convert_test.cc.
#include "kt/io/convert.h"

#include <errno.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/checksum.h"
#include "kt/io/file_util.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"
#include "kt/io/method.h"
#include "kt/io/safetensors.h"
#include "kt/io/convert_test_util.h"
#include "kt/io/test_files.h"
#include "kt/kernels/quant.h"


namespace kt {
namespace {

using ::testing::HasSubstr;
using testing_files::ReadRaw;
using testing_files::WriteRaw;
using namespace convert_testing;  // NOLINT: the shared fixtures.

TEST(ConvertTest, CorruptConvertedFileIsDetectedAtLoad) {
  const std::string hf = FreshDir("hf"), out = TmpPath("out");
  RemoveTree(out);
  WriteHf(hf, Layout::kPerExpert);
  ASSERT_TRUE(ConvertCheckpoint(Options(hf, out, "AMXINT8")).ok());
  const std::string path = out + "/layer_0001.safetensors";
  std::string bytes = ReadRaw(path);
  bytes[bytes.size() - 100] ^= 0x40;  // A bit inside expert data: the header still parses.
  WriteRaw(path, bytes);
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(out, Want(1, "AMXINT8"));
  ASSERT_TRUE(le.ok()) << le.status();
  ASSERT_EQ((*le)->num_verify_tasks(), 1u);
  absl::Status s = (*le)->Verify(0);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(s.message(), HasSubstr(absl::StrCat(path, ": checksum mismatch in bytes [0, ", bytes.size())));
  // Truncated: the safetensors reader or the manifest's size catches it before any read.
  WriteRaw(path, bytes.substr(0, bytes.size() - 8));
  le = LayerExperts::Open(out, Want(1, "AMXINT8"));
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(le.status().message(), HasSubstr(path));
}

TEST(ConvertTest, LoadChecksLayoutShapeAndLayer) {
  const std::string hf = FreshDir("hf"), out = TmpPath("out");
  RemoveTree(out);
  WriteHf(hf, Layout::kPerExpert);
  ASSERT_TRUE(ConvertCheckpoint(Options(hf, out, "AMXINT8")).ok());
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(out, Want(0, "BF16"));
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(le.status().message(),
              HasSubstr("holds layout \"kt-int8-channel-v1\" (converted for method AMXINT8), but method BF16 "
                        "needs \"kt-bf16-v1\""));
  LayerRequest w = Want(0, "AMXINT8");
  w.hidden = 128;
  le = LayerExperts::Open(out, w);
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(le.status().message(), HasSubstr("hidden = 64, but the layer was created with hidden_size = 128"));
  le = LayerExperts::Open(hf, w);
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(le.status().message(),
              HasSubstr("config.json: hidden_size = 64, but the layer was created with hidden_size = 128"));
  le = LayerExperts::Open(out, Want(5, "AMXINT8"));
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(le.status().message(), HasSubstr("layer 5 is not a converted MoE layer (the folder has layers [0, 1])"));
  le = LayerExperts::Open(hf, Want(5, "AMXINT8"));
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(le.status().message(), HasSubstr("layer 5 is not an MoE layer"));
  // A tensor missing from a converted file.
  const std::string path = out + "/layer_0000.safetensors";
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok());
  std::vector<TensorToWrite> keep;
  for (const TensorInfo& t : (*f)->tensors()) {
    if (t.name != "experts.2.down.scales") keep.push_back({t.name, t.dtype, t.shape, (*f)->bytes(t)});
  }
  ASSERT_TRUE(WriteSafetensors(path + ".x", keep, (*f)->metadata()).ok());
  f->reset();
  ASSERT_EQ(std::rename((path + ".x").c_str(), path.c_str()), 0);
  absl::StatusOr<Manifest> m = ReadManifest(out);
  ASSERT_TRUE(m.ok());
  // Make the manifest agree on size and checksum so that the tensor check itself is what fails.
  const std::string b = ReadRaw(path);
  m->layers[0].bytes = b.size();
  m->layers[0].crc32c = ChunkedCrc32c(reinterpret_cast<const uint8_t*>(b.data()), b.size());
  WriteRaw(out + "/" + kManifestName, ManifestToJson(*m));
  le = LayerExperts::Open(out, Want(0, "AMXINT8"));
  ASSERT_FALSE(le.ok());
  EXPECT_THAT(le.status().message(),
              HasSubstr(absl::StrCat(path, ": tensor \"experts.2.down.scales\" is missing (expected F32 [64, 1])")));
}

// Bad inputs: the error names file/tensor/expected value, and the output folder is not even created (every
// layer is validated before anything is written).
struct BadCase {
  const char* name;
  std::function<void(const std::string& hf)> spoil;
  const char* message;
};

class BadInputTest : public ::testing::TestWithParam<int> {};

std::vector<BadCase> BadCases() {
  return {
      {"missing_expert",
       [](const std::string& hf) { WriteHf(hf, Layout::kPerExpert, "model.layers.1.mlp.experts.3.up_proj.weight"); },
       "layer 1 expert 3 up: tensor \"model.layers.1.mlp.experts.3.up_proj.weight\" is missing (expected BF16 "
       "[32, 64])"},
      {"dtype_mismatch", [](const std::string& hf) { WriteHf(hf, Layout::kPerExpert, "", Dtype::kF32); },
       "model.safetensors: tensor \"model.layers.0.mlp.experts.0.gate_proj.weight\" (layer 0 expert 0 gate) is F32 "
       "[32, 64], expected BF16 [32, 64]"},
      {"shape_mismatch",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         WriteRaw(hf + "/config.json",
                  absl::StrReplaceAll(Config(Layout::kPerExpert), {{"\"moe_intermediate_size\": 32", "\"moe_intermediate_size\": 16"}}));
       },
       "(layer 0 expert 0 gate) is BF16 [32, 64], expected BF16 [16, 64]"},
      {"config_without_moe_fields",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         WriteRaw(hf + "/config.json", R"({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64,
             "num_hidden_layers": 2})");
       },
       "config.json: no MoE fields for Qwen3MoeForCausalLM"},
      {"corrupt_config_json",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         WriteRaw(hf + "/config.json", R"({"architectures": ["Qwen3MoeForCausalLM"],)");
       },
       "config.json: JSON error at byte"},
      {"truncated_safetensors",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         const std::string b = ReadRaw(hf + "/model.safetensors");
         WriteRaw(hf + "/model.safetensors", b.substr(0, b.size() - 1));
       },
       "model.safetensors"},
      {"header_beyond_file",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         std::string b = ReadRaw(hf + "/model.safetensors");
         const uint64_t n = b.size();  // header size = whole file: ends past it
         std::memcpy(&b[0], &n, 8);
         WriteRaw(hf + "/model.safetensors", b);
       },
       "model.safetensors"},
      {"overlapping_offsets",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         std::string b = ReadRaw(hf + "/model.safetensors");
         // The second tensor in data order starts at 4096 (32 x 64 bf16): move it onto the first.
         const size_t at = b.find("\"data_offsets\":[4096,8192]");
         ASSERT_NE(at, std::string::npos);
         b.replace(at, 26, "\"data_offsets\":[2048,6144]");
         WriteRaw(hf + "/model.safetensors", b);
       },
       "overlap"},
      {"out_of_range_offsets",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         std::string b = ReadRaw(hf + "/model.safetensors");
         const size_t at = b.find("\"data_offsets\":[0,4096]");
         ASSERT_NE(at, std::string::npos);
         b.replace(at, 23, "\"data_offsets\":[9999999999,9999994095]");
         b.resize(b.size());
         // Keep the header length field consistent with the longer JSON.
         uint64_t n;
         std::memcpy(&n, &b[0], 8);
         n += 15;
         std::memcpy(&b[0], &n, 8);
         WriteRaw(hf + "/model.safetensors", b);
       },
       "model.safetensors"},
      {"duplicate_tensor",
       [](const std::string& hf) {
         WriteHf(hf, Layout::kPerExpert);
         std::string b = ReadRaw(hf + "/model.safetensors");
         const std::string from = "model.layers.0.mlp.experts.1.up_proj.weight";
         const size_t at = b.find(from);
         ASSERT_NE(at, std::string::npos);
         b.replace(at, from.size(), "model.layers.0.mlp.experts.0.up_proj.weight");  // same length
         WriteRaw(hf + "/model.safetensors", b);
       },
       "duplicate"},
  };
}

TEST_P(BadInputTest, ClearErrorAndNoOutput) {
  const BadCase c = BadCases()[GetParam()];
  SCOPED_TRACE(c.name);
  const std::string hf = FreshDir("hf"), out = TmpPath("out");
  RemoveTree(out);
  c.spoil(hf);
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(hf, out, "AMXINT8"));
  ASSERT_FALSE(st.ok()) << c.name;
  EXPECT_THAT(st.status().message(), HasSubstr(c.message)) << c.name;
  EXPECT_FALSE(Exists(out)) << c.name << ": output folder created";
  // Loading the same folder directly fails the same way (shapes taken from the folder, so that the
  // shape_mismatch case reaches the tensor check rather than the config-vs-caller one).
  LayerRequest any = Want(0, "AMXINT8");
  any.num_experts = any.hidden = any.intermediate = -1;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(hf, any);
  if (std::string(c.name) != "missing_expert") {  // layer 1 is the broken one there
    ASSERT_FALSE(le.ok()) << c.name;
    EXPECT_THAT(le.status().message(), HasSubstr(c.message)) << c.name;
  } else {
    any.layer = 1;
    le = LayerExperts::Open(hf, any);
    ASSERT_FALSE(le.ok());
    EXPECT_THAT(le.status().message(), HasSubstr(c.message));
  }
}

INSTANTIATE_TEST_SUITE_P(All, BadInputTest, ::testing::Range(0, 10));

TEST(ConvertTest, UnsupportedMethodsAndOutputOverInput) {
  const std::string hf = FreshDir("hf"), out = TmpPath("out");
  RemoveTree(out);
  WriteHf(hf, Layout::kPerExpert);
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(hf, out, "FP8_PERCHANNEL"));
  ASSERT_FALSE(st.ok());
  // FP8_PERCHANNEL holds per-channel FP8 checkpoints as shipped; it does not quantize a bf16 one.
  EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.status().message(), HasSubstr("method FP8_PERCHANNEL reads FP8 checkpoints with per-channel scales"));
  st = ConvertCheckpoint(Options(hf, out, "INT3"));
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(), HasSubstr("unknown method \"INT3\"; kt can store: BF16, AMXINT8"));
  ConvertOptions o = Options(hf, out, "AMXINT4_KGroup");
  o.group_size = 48;
  st = ConvertCheckpoint(o);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(), HasSubstr("group_size must be 32, 64 or 128, got 48"));
  o = Options(hf, out, "AMXINT4_KGroup");  // G = 128 does not divide H = 64
  st = ConvertCheckpoint(o);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(),
              HasSubstr("config.json: hidden_size: K must be a multiple of group_size for int4_group_sym: K = 64, "
                        "group_size = 128"));
  EXPECT_FALSE(Exists(out));
  // A group size for a method without groups is refused, not ignored.
  o = Options(hf, out, "AMXINT8");
  o.group_size = 64;
  st = ConvertCheckpoint(o);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(), HasSubstr("--group-size 64: method AMXINT8 has no groups"));
  EXPECT_FALSE(Exists(out));
  st = ConvertCheckpoint(Options(hf, hf, "BF16"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.status().message(),
            absl::StrCat("--output ", hf, " is the input folder; choose another folder"));
}

// An FP8 checkpoint converts to method FP8 as stored (no bf16 detour); to another method through its
// dequantized bf16 (convert_native_test).
TEST(ConvertTest, FixtureFp8ConvertsToFp8AsStored) {
  const std::string out = TmpPath("out");
  RemoveTree(out);
  absl::StatusOr<ConvertStats> st =
      ConvertCheckpoint(Options(testing_files::TestdataHf("deepseek_v3_fp8"), out, "FP8"));
  ASSERT_TRUE(st.ok()) << st.status();
  LayerRequest want;
  want.layer = 1;
  absl::StatusOr<MethodLayout> fp8 = LayoutOfMethod("FP8");
  ASSERT_TRUE(fp8.ok());
  want.method = *fp8;
  absl::StatusOr<std::unique_ptr<LayerExperts>> hf =
      LayerExperts::Open(testing_files::TestdataHf("deepseek_v3_fp8"), want);
  absl::StatusOr<std::unique_ptr<LayerExperts>> conv = LayerExperts::Open(out, want);
  ASSERT_TRUE(hf.ok()) << hf.status();
  ASSERT_TRUE(conv.ok()) << conv.status();
  EXPECT_TRUE((*conv)->converted());
  for (int e = 0; e < 4; ++e) {
    for (int p = 0; p < 3; ++p) {
      QuantizedMatrix a, b;
      ASSERT_TRUE((*hf)->ReadQuantized(e, static_cast<ExpertMatrix>(p), &a).ok());
      ASSERT_TRUE((*conv)->ReadQuantized(e, static_cast<ExpertMatrix>(p), &b).ok());
      EXPECT_EQ(a.data, b.data) << e << " " << p;
      EXPECT_EQ(a.scales, b.scales) << e << " " << p;
    }
  }
  RemoveTree(out);
}

}  // namespace
}  // namespace kt
