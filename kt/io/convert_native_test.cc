// kt convert from checkpoints stored quantized in another format than the method's (LayerRequest::
// dequantize_stored): FP8 with 128 x 128 block scales, MXFP8 and MXFP4 to AMXINT8, AMXINT4_KGroup and BF16.
// The reference is this file's own: the stored codes decoded from the E4M3 / E2M1 definitions, times their
// scale (fp32 block scale, or E8M0 2^(e - 127)), rounded to bf16, then quant.h's scalar Quantize; the
// converted folder must hold exactly that (QuantizeFast equals Quantize byte for byte, quant_fast_test).
// A corrupt GGUF input is the GGUF reader's error (GGUF inputs: convert_gguf_test).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/arch.h"
#include "kt/io/checkpoint.h"
#include "kt/io/convert.h"
#include "kt/io/convert_test_util.h"
#include "kt/io/layer_experts.h"
#include "kt/io/method.h"
#include "kt/io/test_files.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using convert_testing::Exists;
using convert_testing::Options;
using convert_testing::RemoveTree;
using convert_testing::TmpPath;
using ::testing::HasSubstr;

// E4M3 ("e4m3fn"): s.eeee.mmm, bias 7, exponent 0 subnormal (m 2^-9), s.1111.111 NaN.
float E4M3(uint8_t c) {
  const int e = (c >> 3) & 15, m = c & 7;
  if (e == 15 && m == 7) return NAN;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
  return (c & 0x80) ? -mag : mag;
}

// E2M1: s.ee.m, magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
float E2M1(uint8_t nibble) {
  static const float kMag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  return (nibble & 8) ? -kMag[nibble & 7] : kMag[nibble & 7];
}

enum class Stored { kFp8Block, kMxfp8, kMxfp4 };

// bf16(code value x scale) of one expert matrix [n, k], read from the checkpoint's own tensors.
std::vector<bf16_t> Reference(const Checkpoint& ckpt, const std::string& weight, Stored kind, size_t n, size_t k) {
  const Checkpoint::Located w = ckpt.Find(weight);
  const std::string scale_name = kind == Stored::kMxfp4 ? weight.substr(0, weight.size() - 6) + "scale"
                                                        : weight + "_scale_inv";
  const Checkpoint::Located s = ckpt.Find(scale_name);
  EXPECT_TRUE(w.info != nullptr && s.info != nullptr) << weight;
  std::vector<bf16_t> out(n * k);
  if (w.info == nullptr || s.info == nullptr) return out;
  const uint8_t* codes = w.file->data(*w.info);
  const uint8_t* scales = s.file->data(*s.info);
  for (size_t r = 0; r < n; ++r) {
    for (size_t c = 0; c < k; ++c) {
      float v = 0, scale = 0;
      if (kind == Stored::kFp8Block) {
        v = E4M3(codes[r * k + c]);
        std::memcpy(&scale, scales + 4 * ((r / 128) * ((k + 127) / 128) + c / 128), 4);
      } else {
        const uint8_t byte = kind == Stored::kMxfp8 ? codes[r * k + c] : codes[r * (k / 2) + c / 2];
        v = kind == Stored::kMxfp8 ? E4M3(byte) : E2M1(c % 2 ? byte >> 4 : byte & 15);
        scale = std::ldexp(1.0f, static_cast<int>(scales[r * (k / 32) + c / 32]) - 127);
      }
      out[r * k + c] = F32ToBf16(v * scale);
    }
  }
  return out;
}

struct Case {
  const char* fixture;
  Stored kind;
  const char* method;
  int group;
};

class ConvertNativeTest : public ::testing::TestWithParam<Case> {};

TEST_P(ConvertNativeTest, EqualsDequantizeThenQuantize) {
  const Case& c = GetParam();
  const std::string in = testing_files::TestdataHf(c.fixture), out = TmpPath(std::string(c.fixture) + c.method);
  RemoveTree(out);
  ConvertOptions options = Options(in, out, c.method);
  options.group_size = c.group;
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(options);
  ASSERT_TRUE(st.ok()) << st.status();
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(in);
  absl::StatusOr<std::unique_ptr<Checkpoint>> ckpt = Checkpoint::Open(in);
  absl::StatusOr<MethodLayout> layout = LayoutOfMethod(c.method, c.group > 0 ? c.group : 128);
  ASSERT_TRUE(arch.ok() && ckpt.ok() && layout.ok());
  const int layer = arch->moe_layers.back();
  LayerRequest want;
  want.layer = layer;
  want.method = *layout;
  absl::StatusOr<std::unique_ptr<LayerExperts>> conv = LayerExperts::Open(out, want);
  ASSERT_TRUE(conv.ok()) << conv.status();
  ASSERT_TRUE((*conv)->converted());
  for (int e = 0; e < arch->num_experts; ++e) {
    const absl::StatusOr<ExpertNames> names = ExpertTensorNames(*arch, layer, e);
    ASSERT_TRUE(names.ok());
    const std::string* weights[3] = {&names->gate, &names->up, &names->down};
    for (int p = 0; p < 3; ++p) {
      const auto m = static_cast<ExpertMatrix>(p);
      const size_t n = (*conv)->Rows(m), k = (*conv)->Cols(m);
      const std::vector<bf16_t> ref = Reference(**ckpt, *weights[p], c.kind, n, k);
      if (!layout->quantized) {
        std::vector<bf16_t> got(n * k);
        ASSERT_TRUE((*conv)->ReadBf16(e, m, got.data()).ok());
        ASSERT_EQ(0, std::memcmp(got.data(), ref.data(), n * k * sizeof(bf16_t))) << e << " " << p;
        continue;
      }
      absl::StatusOr<QuantizedMatrix> q = Quantize(layout->spec, ref.data(), k, n, k);
      ASSERT_TRUE(q.ok()) << q.status();
      QuantizedMatrix got;
      ASSERT_TRUE((*conv)->ReadQuantized(e, m, &got).ok());
      EXPECT_EQ(got.data, q->data) << e << " " << p;
      EXPECT_EQ(got.scales, q->scales) << e << " " << p;
      EXPECT_EQ(got.zeros, q->zeros) << e << " " << p;
    }
  }
  RemoveTree(out);
}

INSTANTIATE_TEST_SUITE_P(
    All, ConvertNativeTest,
    ::testing::Values(Case{"deepseek_v3_fp8", Stored::kFp8Block, "AMXINT8", 0},
                      Case{"deepseek_v3_fp8", Stored::kFp8Block, "BF16", 0},
                      Case{"minimax_m3_mxfp8", Stored::kMxfp8, "AMXINT8", 0},
                      Case{"minimax_m3_mxfp8", Stored::kMxfp8, "AMXINT4_KGroup", 32},
                      Case{"deepseek_v4_mxfp4", Stored::kMxfp4, "BF16", 0},
                      Case{"deepseek_v4_mxfp4", Stored::kMxfp4, "MXFP8", 0}));

// load_weights keeps refusing such a folder for another method (dequantize_stored is kt convert's).
TEST(ConvertNativeTest, LoadWeightsStillNamesTheStoredMethod) {
  LayerRequest want;
  want.layer = 1;
  want.method = *LayoutOfMethod("AMXINT8");
  EXPECT_THAT(std::string(LayerExperts::Open(testing_files::TestdataHf("minimax_m3_mxfp8"), want).status().message()),
              HasSubstr("load it with method MXFP8"));
  want.dequantize_stored = true;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le =
      LayerExperts::Open(testing_files::TestdataHf("minimax_m3_mxfp8"), want);
  ASSERT_TRUE(le.ok()) << le.status();
  EXPECT_FALSE((*le)->quantized());
  ASSERT_NE((*le)->dequantized_from(), nullptr);
  EXPECT_EQ((*le)->dequantized_from()->method, "MXFP8");
}

// A .gguf input is read as GGUF (convert_gguf_test): a corrupt one is the GGUF reader's error, naming the file,
// and leaves no output.
TEST(ConvertNativeTest, CorruptGgufInputIsTheReadersError) {
  const std::string gguf = TmpPath("model.gguf"), out = TmpPath("gguf_out");
  RemoveTree(out);
  std::FILE* f = std::fopen(gguf.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  std::fputs("GGUF", f);
  std::fclose(f);
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(gguf, out, "AMXINT8"));
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(), HasSubstr(gguf));
  EXPECT_THAT(st.status().message(), HasSubstr("truncated"));
  EXPECT_FALSE(Exists(out));
}

}  // namespace
}  // namespace kt
