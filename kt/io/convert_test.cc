// kt convert + LayerExperts on small synthetic Hugging Face folders written here: every layout arch.h maps
// (per-expert, fused [E,2I,H], fused [E,H,2I]), every convertible method, resume, atomicity, and the bad
// inputs of issue 4, each checked for its message and for leaving no finished-looking output.
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
#include "kt/io/test_files.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using ::testing::HasSubstr;
using testing_files::ReadRaw;
using testing_files::WriteRaw;

constexpr int kE = 4, kH = 64, kI = 32, kLayers = 2;

bool Exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// testing_files::TestPath with the '/' of parameterized test names replaced.
// A private folder from mkdtemp under /tmp, removed when the test binary exits. (Under Bazel 4's
// processwrapper sandbox here, mkdir of a folder under TEST_TMPDIR / gtest's TempDir() failed with ENOENT
// even after creating its parents; the cause was not investigated, so these tests, which need whole
// folders, stay out of it.)
void RemoveTree(const std::string& dir);

const std::string& TestRoot() {
  static const std::string* root = [] {
    char tmpl[] = "/tmp/kt_convert_test_XXXXXX";
    const char* made = ::mkdtemp(tmpl);
    auto* r = new std::string(made != nullptr ? made : "/tmp");
    std::atexit([] { RemoveTree(TestRoot()); });
    return r;
  }();
  return *root;
}

std::string TmpPath(const std::string& name) {
  const std::string path = absl::StrCat(TestRoot(), "/", ::testing::UnitTest::GetInstance()->current_test_info()->name(), "_", name);
  return absl::StrReplaceAll(path, {{"/0", "_0"}, {"/1", "_1"}, {"/2", "_2"},
      {"/3", "_3"}, {"/4", "_4"}, {"/5", "_5"}, {"/6", "_6"}, {"/7", "_7"}, {"/8", "_8"}, {"/9", "_9"}});
}

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

void RemoveTree(const std::string& dir) { ::nftw(dir.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS); }

std::string FreshDir(const std::string& name) {
  const std::string dir = TmpPath(name);
  RemoveTree(dir);
  if (::mkdir(dir.c_str(), 0755) != 0) ADD_FAILURE() << "mkdir " << dir << ": " << std::strerror(errno);
  return dir;
}

// Deterministic bf16 weight of (layer, expert, matrix, row, col): distinct everywhere, so a swapped expert,
// matrix or transpose shows up.
bf16_t W(int layer, int e, int m, int r, int c) {
  const uint32_t h = static_cast<uint32_t>(((layer * 31 + e) * 7 + m) * 1000003 + r * 4099 + c * 131);
  const float v = static_cast<float>(static_cast<int>((h * 2654435761u) >> 20) - 2048) / 2048.0f;
  return F32ToBf16(v);
}

enum class Layout { kPerExpert, kOutIn, kInOut };

std::string Config(Layout layout, const std::string& extra = "") {
  const std::string text = absl::StrCat(R"("hidden_size": 64, "num_hidden_layers": 2, "num_experts": 4,
      "num_experts_per_tok": 2, "moe_intermediate_size": 32)", extra);
  switch (layout) {
    case Layout::kPerExpert:
      return absl::StrCat(R"({"architectures": ["Qwen3MoeForCausalLM"], )", text, "}");
    case Layout::kOutIn:
      return absl::StrCat(R"({"architectures": ["Qwen3_5MoeForConditionalGeneration"], "text_config": {)", text,
                          "}}");
    case Layout::kInOut:
      return absl::StrCat(R"({"architectures": ["Qwen3VLMoeForConditionalGeneration"], "text_config": {)", text,
                          "}}");
  }
  return "";
}

// Writes an HF folder with kLayers MoE layers of bf16 experts in `layout`. `skip` drops one tensor by name.
void WriteHf(const std::string& dir, Layout layout, const std::string& skip = "", Dtype dtype = Dtype::kBf16) {
  WriteRaw(dir + "/config.json", Config(layout));
  std::vector<std::vector<uint8_t>> store;
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, std::vector<bf16_t> v) {
    if (name == skip) return;
    std::vector<uint8_t> bytes(v.size() * 2);
    std::memcpy(bytes.data(), v.data(), bytes.size());
    if (dtype == Dtype::kF32) {
      bytes.resize(v.size() * 4);
      for (size_t i = 0; i < v.size(); ++i) {
        const float f = Bf16ToF32(v[i]);
        std::memcpy(&bytes[i * 4], &f, 4);
      }
    }
    store.push_back(std::move(bytes));
    tensors.push_back({name, dtype, shape, absl::Span<const uint8_t>(store.back())});
  };
  store.reserve(1000);
  const std::string prefix = layout == Layout::kPerExpert ? "model.layers." : "model.language_model.layers.";
  for (int l = 0; l < kLayers; ++l) {
    if (layout == Layout::kPerExpert) {
      for (int e = 0; e < kE; ++e) {
        const char* names[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int m = 0; m < 3; ++m) {
          const int n = m == 2 ? kH : kI, k = m == 2 ? kI : kH;
          std::vector<bf16_t> v(n * k);
          for (int r = 0; r < n; ++r)
            for (int c = 0; c < k; ++c) v[r * k + c] = W(l, e, m, r, c);
          add(absl::StrCat(prefix, l, ".mlp.experts.", e, ".", names[m], ".weight"), {n, k}, v);
        }
      }
    } else {
      const bool out_in = layout == Layout::kOutIn;
      std::vector<bf16_t> gu(kE * 2 * kI * kH), dn(kE * kH * kI);
      for (int e = 0; e < kE; ++e) {
        for (int m = 0; m < 2; ++m)
          for (int i = 0; i < kI; ++i)
            for (int h = 0; h < kH; ++h) {
              const size_t idx = out_in ? (static_cast<size_t>(e) * 2 * kI + m * kI + i) * kH + h
                                        : (static_cast<size_t>(e) * kH + h) * 2 * kI + m * kI + i;
              gu[idx] = W(l, e, m, i, h);
            }
        for (int h = 0; h < kH; ++h)
          for (int i = 0; i < kI; ++i) {
            const size_t idx = out_in ? (static_cast<size_t>(e) * kH + h) * kI + i : (static_cast<size_t>(e) * kI + i) * kH + h;
            dn[idx] = W(l, e, 2, h, i);
          }
      }
      add(absl::StrCat(prefix, l, ".mlp.experts.gate_up_proj"),
          out_in ? std::vector<int64_t>{kE, 2 * kI, kH} : std::vector<int64_t>{kE, kH, 2 * kI}, gu);
      add(absl::StrCat(prefix, l, ".mlp.experts.down_proj"),
          out_in ? std::vector<int64_t>{kE, kH, kI} : std::vector<int64_t>{kE, kI, kH}, dn);
    }
  }
  absl::Status s = WriteSafetensors(dir + "/model.safetensors", tensors);
  ASSERT_TRUE(s.ok()) << s;
}

ConvertOptions Options(const std::string& in, const std::string& out, const std::string& method) {
  ConvertOptions o;
  o.input = in;
  o.output = out;
  o.method = method;
  o.threads = 2;
  o.progress = nullptr;
  return o;
}

std::vector<bf16_t> Expected(int layer, int e, ExpertMatrix m) {
  const int p = static_cast<int>(m);
  const int n = p == 2 ? kH : kI, k = p == 2 ? kI : kH;
  std::vector<bf16_t> v(n * k);
  for (int r = 0; r < n; ++r)
    for (int c = 0; c < k; ++c) v[r * k + c] = W(layer, e, p, r, c);
  return v;
}

bool SameBits(const std::vector<bf16_t>& a, const std::vector<bf16_t>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 2) == 0;
}

LayerRequest Want(int layer, const std::string& method) {
  LayerRequest r;
  r.layer = layer;
  r.num_experts = kE;
  r.hidden = kH;
  r.intermediate = kI;
  r.method = *LayoutOfMethod(method);
  return r;
}

// Every layout reads back (HF directly, and after converting to BF16) as exactly the canonical [N, K]
// matrices the writer meant: bit equality, since nothing is rounded.
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
  EXPECT_EQ(st.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(st.status().message(), HasSubstr("per-channel FP8 weights are not supported yet"));
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
  // A group size for a method without groups, and methods no kernel can load, are refused, not ignored.
  o = Options(hf, out, "AMXINT8");
  o.group_size = 64;
  st = ConvertCheckpoint(o);
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(st.status().message(), HasSubstr("--group-size 64: method AMXINT8 has no groups"));
  for (const char* m : {"RAWINT4", "GPTQ_INT4"}) {
    st = ConvertCheckpoint(Options(hf, out, m));
    ASSERT_FALSE(st.ok()) << m;
    EXPECT_EQ(st.status().code(), absl::StatusCode::kUnimplemented);
    EXPECT_THAT(st.status().message(), HasSubstr(absl::StrCat("--method ", m, ": method ", m,
                                                              " has no kernel in kt yet")));
  }
  EXPECT_FALSE(Exists(out));
  st = ConvertCheckpoint(Options(hf, hf, "BF16"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.status().message(),
            absl::StrCat("--output ", hf, " is the input folder; choose another folder"));
}

// An FP8 checkpoint converts only to method FP8 (no bf16 detour); another method names FP8.
TEST(ConvertTest, FixtureFp8ConvertsOnlyToFp8) {
  const std::string out = TmpPath("out");
  RemoveTree(out);
  absl::StatusOr<ConvertStats> st =
      ConvertCheckpoint(Options(testing_files::TestdataHf("deepseek_v3_fp8"), out, "BF16"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(st.status().message(), HasSubstr("which method BF16 cannot hold; load it with method FP8"));
  EXPECT_FALSE(Exists(out));
  st = ConvertCheckpoint(Options(testing_files::TestdataHf("deepseek_v3_fp8"), out, "FP8"));
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
