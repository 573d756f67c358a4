// kt convert with the native int4 checkpoints of testdata/hf as input (hf_int4.h): to RAWINT4 / GPTQ_INT4 the
// checkpoint's kt-int4-group{G}-sym-v1 is written as stored (G taken from the folder), to another method
// through the dequantized bf16 (q * scale), quantized as that method quantizes any bf16 checkpoint.
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/convert.h"
#include "kt/io/convert_test_util.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"
#include "kt/io/method.h"
#include "kt/io/test_files.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using convert_testing::Options;
using convert_testing::RemoveTree;
using convert_testing::TmpPath;

std::unique_ptr<LayerExperts> Open(const std::string& dir, int layer, const std::string& method, int group) {
  LayerRequest want;
  want.layer = layer;
  absl::StatusOr<MethodLayout> m = LayoutOfMethod(method, group);
  EXPECT_TRUE(m.ok()) << m.status();
  want.method = *m;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, want);
  EXPECT_TRUE(le.ok()) << le.status();
  return le.ok() ? *std::move(le) : nullptr;
}

TEST(ConvertInt4Test, NativeInt4ConvertsAsStoredWithItsGroupSize) {
  const struct {
    const char* fixture;
    const char* method;
    int layer, group;
  } cases[] = {{"kimi_k2_rawint4", "RAWINT4", 1, 32}, {"qwen3_moe_gptq", "GPTQ_INT4", 0, 128}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.fixture);
    const std::string in = testing_files::TestdataHf(c.fixture), out = TmpPath(c.fixture);
    RemoveTree(out);
    absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(in, out, c.method));  // no --group-size
    ASSERT_TRUE(st.ok()) << st.status();
    absl::StatusOr<Manifest> m = ReadManifest(out);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->layout, absl::StrCat("kt-int4-group", c.group, "-sym-v1"));
    EXPECT_EQ(m->group_size, c.group);
    std::unique_ptr<LayerExperts> hf = Open(in, c.layer, c.method, c.group);
    std::unique_ptr<LayerExperts> conv = Open(out, c.layer, c.method, c.group);
    ASSERT_TRUE(hf && conv);
    EXPECT_TRUE(conv->converted());
    for (int e = 0; e < hf->num_experts(); ++e) {
      for (int p = 0; p < 3; ++p) {
        QuantizedMatrix a, b;
        ASSERT_TRUE(hf->ReadQuantized(e, static_cast<ExpertMatrix>(p), &a).ok());
        ASSERT_TRUE(conv->ReadQuantized(e, static_cast<ExpertMatrix>(p), &b).ok());
        EXPECT_EQ(a.data, b.data) << e << " " << p;
        EXPECT_EQ(a.scales, b.scales) << e << " " << p;
      }
    }
    RemoveTree(out);
  }
}

TEST(ConvertInt4Test, NativeInt4ToAnotherMethodQuantizesItsDequantizedWeights) {
  const std::string in = testing_files::TestdataHf("qwen3_moe_gptq"), out = TmpPath("amxint4");
  RemoveTree(out);
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(in, out, "AMXINT4"));
  ASSERT_TRUE(st.ok()) << st.status();
  std::unique_ptr<LayerExperts> as_bf16 = Open(in, 0, "BF16", 0);
  std::unique_ptr<LayerExperts> conv = Open(out, 0, "AMXINT4", 0);
  ASSERT_TRUE(as_bf16 && conv);
  absl::StatusOr<MethodLayout> amxint4 = LayoutOfMethod("AMXINT4");
  ASSERT_TRUE(amxint4.ok());
  for (int e = 0; e < 4; ++e) {
    for (int p = 0; p < 3; ++p) {
      const auto m = static_cast<ExpertMatrix>(p);
      std::vector<bf16_t> w(as_bf16->Rows(m) * as_bf16->Cols(m));
      ASSERT_TRUE(as_bf16->ReadBf16(e, m, w.data()).ok());
      absl::StatusOr<QuantizedMatrix> want =
          Quantize(amxint4->spec, w.data(), as_bf16->Cols(m), as_bf16->Rows(m), as_bf16->Cols(m));
      ASSERT_TRUE(want.ok()) << want.status();
      QuantizedMatrix got;
      ASSERT_TRUE(conv->ReadQuantized(e, m, &got).ok());
      EXPECT_EQ(got.data, want->data) << e << " " << p;
      EXPECT_EQ(got.scales, want->scales) << e << " " << p;
    }
  }
  RemoveTree(out);
}

}  // namespace
}  // namespace kt
