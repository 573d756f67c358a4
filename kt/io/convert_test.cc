// kt convert + LayerExperts on small synthetic Hugging Face folders (convert_test_util.h): every layout
// arch.h maps (per-expert, fused [E,2I,H], fused [E,H,2I]), every convertible method, resume and atomicity.
// The bad inputs: convert_errors_test.cc.
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

class LayoutTest : public ::testing::TestWithParam<Layout> {};

TEST_P(LayoutTest, HfAndConvertedBf16ReadExactly) {
  const std::string hf = FreshDir("hf"), out = TmpPath("out");
  RemoveTree(out);
  WriteHf(hf, GetParam());
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(hf, out, "BF16"));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->layers_converted, kLayers);
  for (const std::string& dir : {hf, out}) {
    for (int l = 0; l < kLayers; ++l) {
      absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(dir, Want(l, "BF16"));
      ASSERT_TRUE(le.ok()) << le.status();
      EXPECT_EQ((*le)->converted(), dir == out);
      for (size_t t = 0; t < (*le)->num_verify_tasks(); ++t) ASSERT_TRUE((*le)->Verify(t).ok());
      for (int e = 0; e < kE; ++e) {
        for (int p = 0; p < 3; ++p) {
          const auto m = static_cast<ExpertMatrix>(p);
          std::vector<bf16_t> got((*le)->Rows(m) * (*le)->Cols(m));
          ASSERT_TRUE((*le)->ReadBf16(e, m, got.data()).ok());
          EXPECT_TRUE(SameBits(got, Expected(l, e, m))) << dir << " layer " << l << " expert " << e << " " << p;
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, LayoutTest, ::testing::Values(Layout::kPerExpert, Layout::kOutIn, Layout::kInOut));

// Every quantized method: the converted matrices are exactly what quant.h's Quantize gives for the source
// (same bytes, scales, zeros): conversion adds nothing to the format.
class MethodTest : public ::testing::TestWithParam<std::string> {};

TEST_P(MethodTest, ConvertedEqualsQuantize) {
  const std::string hf = FreshDir("hf"), out = TmpPath("out");
  RemoveTree(out);
  WriteHf(hf, Layout::kPerExpert);
  ConvertOptions o = Options(hf, out, GetParam());
  if (MethodTakesGroupSize(GetParam())) o.group_size = 32;
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(o);
  ASSERT_TRUE(st.ok()) << st.status();
  absl::StatusOr<Manifest> man = ReadManifest(out);
  ASSERT_TRUE(man.ok()) << man.status();
  const MethodLayout ml = *LayoutOfMethod(GetParam(), 32);
  EXPECT_EQ(man->method, GetParam());
  EXPECT_EQ(man->layout, ml.tag);
  LayerRequest want = Want(1, GetParam());
  want.method = ml;
  absl::StatusOr<std::unique_ptr<LayerExperts>> le = LayerExperts::Open(out, want);
  ASSERT_TRUE(le.ok()) << le.status();
  ASSERT_TRUE((*le)->quantized());
  for (int e = 0; e < kE; ++e) {
    for (int p = 0; p < 3; ++p) {
      const auto m = static_cast<ExpertMatrix>(p);
      QuantizedMatrix got;
      ASSERT_TRUE((*le)->ReadQuantized(e, m, &got).ok());
      const std::vector<bf16_t> src = Expected(1, e, m);
      absl::StatusOr<QuantizedMatrix> ref = Quantize(ml.spec, src.data(), got.k, got.n, got.k);
      ASSERT_TRUE(ref.ok());
      EXPECT_EQ(got.data, ref->data);
      EXPECT_EQ(got.scales, ref->scales);
      EXPECT_EQ(got.zeros, ref->zeros);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, MethodTest,
                         ::testing::Values("AMXINT8", "MOE_INT8", "AMXINT4", "MOE_INT4", "AMXINT4_KGroup", "AMXINT4_1KGroup"));

TEST(ConvertTest, ResumeSkipsVerifiedLayersAndRedoesBadOnes) {
  const std::string hf = FreshDir("hf"), out = TmpPath("out");
  RemoveTree(out);
  WriteHf(hf, Layout::kPerExpert);
  ASSERT_TRUE(ConvertCheckpoint(Options(hf, out, "AMXINT8")).ok());
  const std::string manifest = ReadRaw(out + "/" + kManifestName);
  // A complete rerun keeps everything.
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(hf, out, "AMXINT8"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->layers_skipped, kLayers);
  EXPECT_EQ(st->layers_converted, 0);
  EXPECT_EQ(ReadRaw(out + "/" + kManifestName), manifest);
  // A crash after layer 0 (manifest never written, layer 1's file without its .done) redoes layer 1 only;
  // a layer file corrupted on disk is redone too.
  ::unlink((out + "/" + kManifestName).c_str());
  ::unlink((out + "/layer_0001.safetensors.done").c_str());
  st = ConvertCheckpoint(Options(hf, out, "AMXINT8"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->layers_skipped, 1);
  EXPECT_EQ(st->layers_converted, 1);
  EXPECT_EQ(ReadRaw(out + "/" + kManifestName), manifest);
  std::string bytes = ReadRaw(out + "/layer_0000.safetensors");
  bytes[bytes.size() - 5] ^= 1;
  WriteRaw(out + "/layer_0000.safetensors", bytes);
  st = ConvertCheckpoint(Options(hf, out, "AMXINT8"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->layers_skipped, 1);
  EXPECT_EQ(st->layers_converted, 1);
  EXPECT_EQ(ReadRaw(out + "/" + kManifestName), manifest);
  // Another layout over the same folder is refused, naming the conversion it would replace; nothing changes.
  const std::string layer0 = ReadRaw(out + "/" + LayerFileName(0));
  st = ConvertCheckpoint(Options(hf, out, "AMXINT4"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.status().message(),
              HasSubstr("holds a conversion for method AMXINT8 in layout kt-int8-channel-v1; converting for AMXINT4 "
                        "(kt-int4-channel-v1) would replace it"));
  EXPECT_EQ(ReadRaw(out + "/" + kManifestName), manifest);
  EXPECT_TRUE(ReadRaw(out + "/" + LayerFileName(0)) == layer0);
  // Without the manifest (an unfinished run) the layer records still name the layout.
  ::unlink((out + "/" + kManifestName).c_str());
  st = ConvertCheckpoint(Options(hf, out, "BF16"));
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(), HasSubstr("holds a conversion in layout kt-int8-channel-v1"));
  // The same layout under the other int8 method name is the same bytes: kept, the manifest names MOE_INT8.
  st = ConvertCheckpoint(Options(hf, out, "MOE_INT8"));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->layers_skipped, kLayers);
  EXPECT_EQ(ReadManifest(out)->method, "MOE_INT8");
}

// Rewrites the HF folder with layer 1 expert 2's up matrix changed in one element (same shapes, same file
// size): what issue 14's tester did to the source between two runs.
void WriteHfWithChangedExpert(const std::string& dir) {
  WriteHf(dir, Layout::kPerExpert);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(f.ok());
  const TensorInfo* t = (*f)->Find("model.layers.1.mlp.experts.2.up_proj.weight");
  ASSERT_NE(t, nullptr);
  const uint64_t at = 8 + ((*f)->data(*t) - ((*f)->file_data() + 8)) + 6;  // element 3
  f->reset();
  std::string bytes = ReadRaw(dir + "/model.safetensors");
  bytes[at + 1] ^= 0x01;  // the exponent's lowest bit: the value doubles or halves
  WriteRaw(dir + "/model.safetensors", bytes);
}

// A rerun keeps only layers made from the same source: a changed expert tensor (same shapes) redoes its
// layer, and the result equals a fresh conversion of the changed source byte for byte; a source rewritten
// with identical bytes (new mtime and ctime) is recognised by its tensors' checksums and kept.
TEST(ConvertTest, ResumeRedoesLayersWhoseSourceChanged) {
  const std::string hf = FreshDir("hf"), out = TmpPath("out"), fresh = TmpPath("fresh");
  RemoveTree(out);
  RemoveTree(fresh);
  WriteHf(hf, Layout::kPerExpert);
  ASSERT_TRUE(ConvertCheckpoint(Options(hf, out, "AMXINT8")).ok());
  const std::string layer0 = ReadRaw(out + "/" + LayerFileName(0)), layer1 = ReadRaw(out + "/" + LayerFileName(1));

  // Same bytes, rewritten: identity differs, checksums equal.
  WriteRaw(hf + "/model.safetensors", ReadRaw(hf + "/model.safetensors"));
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(hf, out, "AMXINT8"));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->layers_skipped, kLayers);
  EXPECT_EQ(st->layers_converted, 0);

  WriteHfWithChangedExpert(hf);
  char* buf = nullptr;
  size_t len = 0;
  std::FILE* progress = ::open_memstream(&buf, &len);
  ConvertOptions o = Options(hf, out, "AMXINT8");
  o.progress = progress;
  st = ConvertCheckpoint(o);
  std::fclose(progress);
  const std::string log(buf, len);
  std::free(buf);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->layers_skipped, 1);
  EXPECT_EQ(st->layers_converted, 1);
  EXPECT_THAT(log, HasSubstr("layer 1: converting again: its source changed since it was converted (tensor "
                             "model.layers.1.mlp.experts.2.up_proj.weight changed)"));
  EXPECT_TRUE(ReadRaw(out + "/" + LayerFileName(0)) == layer0);
  const std::string redone = ReadRaw(out + "/" + LayerFileName(1));
  EXPECT_FALSE(redone == layer1);
  ASSERT_TRUE(ConvertCheckpoint(Options(hf, fresh, "AMXINT8")).ok());
  EXPECT_TRUE(redone == ReadRaw(fresh + "/" + LayerFileName(1)));
  EXPECT_TRUE(ReadRaw(out + "/" + kManifestName) == ReadRaw(fresh + "/" + kManifestName));
  // And now it is current: kept.
  st = ConvertCheckpoint(Options(hf, out, "AMXINT8"));
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(st->layers_skipped, kLayers);
}

// Leftover temporaries of an interrupted run are removed by the next run (only "*.tmp.<digits>" names), and
// a second writer of a locked output folder is refused at once.
TEST(ConvertTest, StaleTemporariesRemovedAndOutputLocked) {
  const std::string hf = FreshDir("hf"), out = FreshDir("out");
  WriteHf(hf, Layout::kPerExpert);
  WriteRaw(out + "/layer_0000.safetensors.tmp.4242", "partial");
  WriteRaw(out + "/kt_manifest.json.tmp.77", "partial");
  WriteRaw(out + "/notes.tmp.txt", "kept");
  char* buf = nullptr;
  size_t len = 0;
  std::FILE* progress = ::open_memstream(&buf, &len);
  ConvertOptions o = Options(hf, out, "BF16");
  o.progress = progress;
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(o);
  std::fclose(progress);
  const std::string log(buf, len);
  std::free(buf);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->temporaries_removed, 2);
  EXPECT_THAT(log, HasSubstr("kt convert: removed 2 unfinished file(s) of an interrupted run: "
                             "kt_manifest.json.tmp.77, layer_0000.safetensors.tmp.4242\n"));
  EXPECT_FALSE(Exists(out + "/layer_0000.safetensors.tmp.4242"));
  EXPECT_TRUE(Exists(out + "/notes.tmp.txt"));

  absl::StatusOr<DirectoryLock> held = DirectoryLock::Acquire(out);
  ASSERT_TRUE(held.ok()) << held.status();
  st = ConvertCheckpoint(Options(hf, out, "BF16"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.status().message(), HasSubstr("another process holds its lock"));
  *held = DirectoryLock();
  EXPECT_TRUE(ConvertCheckpoint(Options(hf, out, "BF16")).ok());
}

// The output depends on nothing but the input and the method: one thread or three give identical bytes
// (layer files and manifest), so a folder converted on any machine loads anywhere.
TEST(ConvertTest, OutputIsIndependentOfThreads) {
  const std::string hf = FreshDir("hf"), a = TmpPath("a"), b = TmpPath("b");
  RemoveTree(a);
  RemoveTree(b);
  WriteHf(hf, Layout::kOutIn);
  ConvertOptions o = Options(hf, a, "AMXINT4_1KGroup");
  o.group_size = 32;
  o.threads = 1;
  ASSERT_TRUE(ConvertCheckpoint(o).ok());
  o.output = b;
  o.threads = 3;
  ASSERT_TRUE(ConvertCheckpoint(o).ok());
  for (const std::string name : {std::string(kManifestName), LayerFileName(0), LayerFileName(1)}) {
    const std::string x = ReadRaw(a + "/" + name);
    EXPECT_FALSE(x.empty()) << name;
    EXPECT_TRUE(x == ReadRaw(b + "/" + name)) << name;
  }
}

}  // namespace
}  // namespace kt
