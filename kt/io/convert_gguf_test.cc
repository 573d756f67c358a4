// kt convert from a GGUF checkpoint (issue 15). The checkpoints are written here with the project's GGUF writer
// (WriteGguf): a qwen3moe model of 2 MoE layers, E = 3, H = 512, I = 256 (the K-quants need K % 256 == 0),
// whose expert tensors are Q4_K / Q8_0 / Q6_K (layer 0: gate, up, down) and F16 / BF16 / F32 (layer 1), with
// random block bytes (fp16 block factors kept finite; F16 values include subnormals).
//
// The reference is this file's own: each block decoded from ggml's block definitions (block_q8_0,
// block_q4_K with get_scale_min_k4, block_q6_K; IEEE binary16 and bfloat16 decoded bit by bit here), in fp32
// with ggml's order of operations (dequantize_row_*: d * sc first), rounded to bf16 (nearest even, written
// here), then quant.h's scalar Quantize. The converted folder must hold exactly that, byte for byte: each
// block value is exact or a single fp32 rounding in both, and one bf16 rounding follows; QuantizeFast (what
// kt convert runs) equals Quantize bit for bit (quant_fast_test). Tolerance: none.
//
// Also: a split set and a folder give the same layer files as the single file; a rerun keeps the layers and a
// changed layer is converted again; a dense leading layer (deepseek2) is skipped; and the errors: method
// LLAMAFILE, an unsupported ggml type (IQ4_XS), a missing expert tensor, an expert count the tensors do not
// have, and a non-finite weight, the first four before any output exists, the last leaving no manifest.
#include <sys/stat.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/arch.h"
#include "kt/io/convert.h"
#include "kt/io/convert_test_util.h"
#include "kt/io/gguf.h"
#include "kt/io/layer_experts.h"
#include "kt/io/manifest.h"
#include "kt/io/method.h"
#include "kt/io/test_files.h"
#include "kt/kernels/quant.h"

namespace kt {
namespace {

using convert_testing::Exists;
using convert_testing::FreshDir;
using convert_testing::Options;
using convert_testing::RemoveTree;
using convert_testing::TmpPath;
using ::testing::HasSubstr;

constexpr int kE = 3, kH = 512, kI = 256, kLayers = 2;

// ---- The reference decoders (ggml's block definitions) -----------------------------------------------------

uint16_t U16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// IEEE binary16: s.eeeee.mmmmmmmmmm, bias 15, exponent 0 subnormal (m 2^-24). Finite values only here.
float Half(uint16_t h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const float mag = e == 0 ? std::ldexp(static_cast<float>(m), -24) : std::ldexp(1.0f + m / 1024.0f, e - 15);
  return (h & 0x8000) ? -mag : mag;
}

float Bf16(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// fp32 -> bf16, round to nearest even (finite inputs).
bf16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fff + ((bits >> 16) & 1);
  return bf16_t{static_cast<uint16_t>(bits >> 16)};
}

// block_q8_0: fp16 d, int8 qs[32]; y = d * q.
void DecodeQ8_0(const uint8_t* b, float* y) {
  const float d = Half(U16(b));
  for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(b[2 + j]));
}

// block_q4_K: fp16 d, fp16 dmin, scales[12] (8 6-bit scales and mins), qs[128]. Per 64 values: 32 bytes of qs,
// low nibbles (scale/min 2i) then high nibbles (2i + 1); y = (d * sc) * q - (dmin * m).
void ScaleMin(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}
void DecodeQ4_K(const uint8_t* b, float* y) {
  const float d = Half(U16(b)), dmin = Half(U16(b + 2));
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int chunk = 0; chunk < 4; ++chunk) {
    int sc, m;
    ScaleMin(2 * chunk, scales, &sc, &m);
    const float d1 = d * sc, m1 = dmin * m;
    ScaleMin(2 * chunk + 1, scales, &sc, &m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[64 * chunk + l] = d1 * (q[l] & 0xF) - m1;
    for (int l = 0; l < 32; ++l) y[64 * chunk + 32 + l] = d2 * (q[l] >> 4) - m2;
    q += 32;
  }
}

// block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d; y = d * sc * (q - 32).
void DecodeQ6_K(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = Half(U16(b + 208));
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * sc[is] * q1;
      y[l + 32] = d * sc[is + 2] * q2;
      y[l + 64] = d * sc[is + 4] * q3;
      y[l + 96] = d * sc[is + 6] * q4;
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// One row of k values of `type` starting at `row`.
void DecodeRow(GgmlType type, const uint8_t* row, int k, float* y) {
  for (int j = 0; j < k;) {
    switch (type) {
      case GgmlType::kQ8_0:
        DecodeQ8_0(row + (j / 32) * 34, y + j);
        j += 32;
        break;
      case GgmlType::kQ4_K:
        DecodeQ4_K(row + (j / 256) * 144, y + j);
        j += 256;
        break;
      case GgmlType::kQ6_K:
        DecodeQ6_K(row + (j / 256) * 210, y + j);
        j += 256;
        break;
      case GgmlType::kF16:
        y[j] = Half(U16(row + 2 * j));
        ++j;
        break;
      case GgmlType::kBf16:
        y[j] = Bf16(U16(row + 2 * j));
        ++j;
        break;
      case GgmlType::kF32:
        std::memcpy(y + j, row + 4 * j, 4);
        ++j;
        break;
      default:
        ADD_FAILURE() << "no reference decoder for " << GgmlTypeName(type);
        return;
    }
  }
}

// ---- The checkpoint -------------------------------------------------------------------------------------------

struct Tensor {
  std::string name;
  GgmlType type;
  std::vector<uint64_t> dims;  // ne
  std::vector<uint8_t> bytes;
};

// A positive finite fp16 block factor of modest size (2^-10 .. 2^-5).
uint16_t Factor(std::mt19937& rng) { return static_cast<uint16_t>(((5 + rng() % 6) << 10) | (rng() % 1024)); }

// Random ggml blocks of `type` for ne = dims, with finite values.
std::vector<uint8_t> RandomBlocks(GgmlType type, const std::vector<uint64_t>& dims, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> b(*GgmlNbytes(type, dims));
  for (uint8_t& x : b) x = static_cast<uint8_t>(rng());
  auto put16 = [&](size_t at, uint16_t v) {
    b[at] = static_cast<uint8_t>(v);
    b[at + 1] = static_cast<uint8_t>(v >> 8);
  };
  switch (type) {
    case GgmlType::kQ8_0:
      for (size_t at = 0; at < b.size(); at += 34) put16(at, Factor(rng));
      break;
    case GgmlType::kQ4_K:
      for (size_t at = 0; at < b.size(); at += 144) {
        put16(at, Factor(rng));
        put16(at + 2, Factor(rng));
      }
      break;
    case GgmlType::kQ6_K:
      for (size_t at = 0; at < b.size(); at += 210) put16(at + 208, Factor(rng));
      break;
    case GgmlType::kF16:  // exponents 0 (zero, subnormals) .. 17, either sign
      for (size_t at = 0; at < b.size(); at += 2)
        put16(at, static_cast<uint16_t>((rng() & 0x8000) | ((rng() % 18) << 10) | (rng() % 1024)));
      break;
    case GgmlType::kBf16:  // |v| in [2^-8, 2^2)
      for (size_t at = 0; at < b.size(); at += 2)
        put16(at, static_cast<uint16_t>((rng() & 0x8000) | ((119 + rng() % 10) << 7) | (rng() % 128)));
      break;
    case GgmlType::kF32:
      for (size_t at = 0; at < b.size(); at += 4) {
        const float v = std::ldexp(static_cast<float>(static_cast<int32_t>(rng())), -32);
        std::memcpy(&b[at], &v, 4);
      }
      break;
    default:
      break;  // unsupported types: their bytes do not matter
  }
  return b;
}

const char* const kProj[3] = {"gate", "up", "down"};

// The expert tensors of `layer` in `types` (gate, up, down), plus a non-expert tensor.
std::vector<Tensor> LayerTensors(int layer, const GgmlType (&types)[3]) {
  std::vector<Tensor> out;
  for (int p = 0; p < 3; ++p) {
    const std::vector<uint64_t> dims = p == 2 ? std::vector<uint64_t>{kI, kH, kE} : std::vector<uint64_t>{kH, kI, kE};
    const std::string name = "blk." + std::to_string(layer) + ".ffn_" + kProj[p] + "_exps.weight";
    out.push_back({name, types[p], dims, RandomBlocks(types[p], dims, 1000 * layer + p)});
  }
  out.push_back({"blk." + std::to_string(layer) + ".attn_norm.weight", GgmlType::kF32, {kH},
                 std::vector<uint8_t>(kH * 4)});
  return out;
}

const GgmlType kTypes[kLayers][3] = {{GgmlType::kQ4_K, GgmlType::kQ8_0, GgmlType::kQ6_K},
                                     {GgmlType::kF16, GgmlType::kBf16, GgmlType::kF32}};

std::vector<Tensor> ModelTensors() {
  std::vector<Tensor> all;
  for (int l = 0; l < kLayers; ++l) {
    for (Tensor& t : LayerTensors(l, kTypes[l])) all.push_back(std::move(t));
  }
  return all;
}

GgufMetadata Qwen3Meta(int experts = kE) {
  return {{"general.architecture", GgufValue::String("qwen3moe")},
          {"qwen3moe.block_count", GgufValue::Uint32(kLayers)},
          {"qwen3moe.embedding_length", GgufValue::Uint32(kH)},
          {"qwen3moe.expert_count", GgufValue::Uint32(experts)},
          {"qwen3moe.expert_used_count", GgufValue::Uint32(2)},
          {"qwen3moe.expert_feed_forward_length", GgufValue::Uint32(kI)}};
}

void Write(const std::string& path, const GgufMetadata& meta, const std::vector<Tensor>& tensors) {
  std::vector<GgufTensorToWrite> out;
  for (const Tensor& t : tensors) out.push_back({t.name, t.type, t.dims, t.bytes});
  const absl::Status s = WriteGguf(path, meta, out);
  ASSERT_TRUE(s.ok()) << s;
}

const Tensor* FindTensor(const std::vector<Tensor>& all, const std::string& name) {
  for (const Tensor& t : all) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

// bf16 of the reference decode of expert e's matrix p of layer l: [n, k].
std::vector<bf16_t> Reference(const std::vector<Tensor>& all, int l, int e, int p) {
  const Tensor* t = FindTensor(all, "blk." + std::to_string(l) + ".ffn_" + kProj[p] + "_exps.weight");
  const int n = static_cast<int>(t->dims[1]), k = static_cast<int>(t->dims[0]);
  const uint64_t row_bytes = *GgmlNbytes(t->type, {static_cast<uint64_t>(k)});
  std::vector<bf16_t> out(static_cast<size_t>(n) * k);
  std::vector<float> row(k);
  for (int r = 0; r < n; ++r) {
    DecodeRow(t->type, t->bytes.data() + (static_cast<uint64_t>(e) * n + r) * row_bytes, k, row.data());
    for (int c = 0; c < k; ++c) out[static_cast<size_t>(r) * k + c] = ToBf16(row[c]);
  }
  return out;
}

// ---- Conversion equals the reference ----------------------------------------------------------------------------

struct Case {
  const char* method;
  int group;
};

class ConvertGgufTest : public ::testing::TestWithParam<Case> {};

TEST_P(ConvertGgufTest, EqualsDequantizeThenQuantize) {
  const Case& c = GetParam();
  const std::string dir = FreshDir("in"), gguf = dir + "/model.gguf", out = TmpPath("out");
  RemoveTree(out);
  const std::vector<Tensor> tensors = ModelTensors();
  Write(gguf, Qwen3Meta(), tensors);
  ConvertOptions options = Options(gguf, out, c.method);
  options.group_size = c.group;
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(options);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->layers_total, kLayers);
  EXPECT_EQ(st->layers_converted, kLayers);

  // The manifest and config.json say the GGUF's model.
  absl::StatusOr<Manifest> manifest = ReadManifest(out);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->method, c.method);
  EXPECT_EQ(manifest->architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ(manifest->num_experts, kE);
  EXPECT_EQ(manifest->hidden, kH);
  EXPECT_EQ(manifest->intermediate, kI);
  ASSERT_EQ(manifest->layers.size(), 2u);
  absl::StatusOr<MoeArch> arch = LoadMoeConfig(out);
  ASSERT_TRUE(arch.ok()) << arch.status();
  EXPECT_EQ(arch->architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ(arch->top_k, 2);
  EXPECT_EQ(arch->moe_layers, (std::vector<int>{0, 1}));

  absl::StatusOr<MethodLayout> layout = LayoutOfMethod(c.method, c.group > 0 ? c.group : 128);
  ASSERT_TRUE(layout.ok());
  for (int l = 0; l < kLayers; ++l) {
    LayerRequest want;
    want.layer = l;
    want.method = *layout;
    absl::StatusOr<std::unique_ptr<LayerExperts>> conv = LayerExperts::Open(out, want);
    ASSERT_TRUE(conv.ok()) << conv.status();
    for (size_t task = 0; task < (*conv)->num_verify_tasks(); ++task) ASSERT_TRUE((*conv)->Verify(task).ok());
    for (int e = 0; e < kE; ++e) {
      for (int p = 0; p < 3; ++p) {
        const auto m = static_cast<ExpertMatrix>(p);
        const size_t n = (*conv)->Rows(m), k = (*conv)->Cols(m);
        const std::vector<bf16_t> ref = Reference(tensors, l, e, p);
        ASSERT_EQ(ref.size(), n * k);
        if (!layout->quantized) {
          std::vector<bf16_t> got(n * k);
          ASSERT_TRUE((*conv)->ReadBf16(e, m, got.data()).ok());
          size_t bad = 0;
          while (bad < n * k && got[bad].bits == ref[bad].bits) ++bad;
          ASSERT_EQ(bad, n * k) << "layer " << l << " expert " << e << " " << kProj[p] << " element [" << bad / k
                                << "][" << bad % k << "]: " << got[bad].bits << " vs " << ref[bad].bits;
          continue;
        }
        absl::StatusOr<QuantizedMatrix> q = Quantize(layout->spec, ref.data(), k, n, k);
        ASSERT_TRUE(q.ok()) << q.status();
        QuantizedMatrix got;
        ASSERT_TRUE((*conv)->ReadQuantized(e, m, &got).ok());
        EXPECT_EQ(got.data, q->data) << "layer " << l << " expert " << e << " " << kProj[p];
        EXPECT_EQ(got.scales, q->scales) << "layer " << l << " expert " << e << " " << kProj[p];
        EXPECT_EQ(got.zeros, q->zeros) << "layer " << l << " expert " << e << " " << kProj[p];
      }
    }
  }
  RemoveTree(out);
  RemoveTree(dir);
}

INSTANTIATE_TEST_SUITE_P(All, ConvertGgufTest,
                         ::testing::Values(Case{"BF16", 0}, Case{"AMXINT8", 0}, Case{"AMXINT4_KGroup", 64},
                                           Case{"AMXINT4_1KGroup", 128}, Case{"AMXINT4", 0}, Case{"FP8", 0},
                                           Case{"MXFP4", 0}));

// ---- Inputs: split set, folder; resume ---------------------------------------------------------------------------

std::string ReadAll(const std::string& path) { return testing_files::ReadRaw(path); }

TEST(ConvertGguf, SplitSetAndFolderGiveTheSameFiles) {
  const std::string dir = FreshDir("in"), single = dir + "/model.gguf";
  const std::vector<Tensor> tensors = ModelTensors();
  Write(single, Qwen3Meta(), tensors);
  const std::string split_dir = FreshDir("split");
  // gguf-split keeps the model's metadata in part 1; each part has its own tensors.
  Write(split_dir + "/m-00001-of-00002.gguf", Qwen3Meta(), LayerTensors(0, kTypes[0]));
  Write(split_dir + "/m-00002-of-00002.gguf", {{"split.count", GgufValue::Uint16(2)}}, LayerTensors(1, kTypes[1]));
  const std::string a = TmpPath("a"), b = TmpPath("b"), f = TmpPath("f");
  for (const std::string& o : {a, b, f}) RemoveTree(o);
  ASSERT_TRUE(ConvertCheckpoint(Options(single, a, "AMXINT8")).ok());
  absl::StatusOr<ConvertStats> sb = ConvertCheckpoint(Options(split_dir + "/m-00002-of-00002.gguf", b, "AMXINT8"));
  ASSERT_TRUE(sb.ok()) << sb.status();
  absl::StatusOr<ConvertStats> sf = ConvertCheckpoint(Options(split_dir, f, "AMXINT8"));
  ASSERT_TRUE(sf.ok()) << sf.status();
  for (int l = 0; l < kLayers; ++l) {
    const std::string name = "/" + LayerFileName(l);
    EXPECT_EQ(ReadAll(a + name), ReadAll(b + name)) << l;
    EXPECT_EQ(ReadAll(a + name), ReadAll(f + name)) << l;
  }
  EXPECT_EQ(ReadAll(a + "/config.json"), ReadAll(b + "/config.json"));
  for (const std::string& o : {a, b, f, dir, split_dir}) RemoveTree(o);
}

TEST(ConvertGguf, ResumeKeepsLayersAndRedoesAChangedOne) {
  const std::string dir = FreshDir("in"), gguf = dir + "/model.gguf", out = TmpPath("out");
  RemoveTree(out);
  std::vector<Tensor> tensors = ModelTensors();
  Write(gguf, Qwen3Meta(), tensors);
  ASSERT_TRUE(ConvertCheckpoint(Options(gguf, out, "AMXINT8")).ok());
  absl::StatusOr<ConvertStats> again = ConvertCheckpoint(Options(gguf, out, "AMXINT8"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->layers_skipped, kLayers);
  EXPECT_EQ(again->layers_converted, 0);
  // Rewritten (new identity) with one byte of layer 1's up experts changed: layer 0 is kept by its tensors'
  // checksums, layer 1 converted again.
  for (Tensor& t : tensors) {
    if (t.name == "blk.1.ffn_up_exps.weight") t.bytes[100] ^= 1;
  }
  Write(gguf, Qwen3Meta(), tensors);
  absl::StatusOr<ConvertStats> third = ConvertCheckpoint(Options(gguf, out, "AMXINT8"));
  ASSERT_TRUE(third.ok()) << third.status();
  EXPECT_EQ(third->layers_skipped, 1);
  EXPECT_EQ(third->layers_converted, 1);
  // A conversion for another method into the same folder is refused, as for Hugging Face inputs.
  absl::StatusOr<ConvertStats> other = ConvertCheckpoint(Options(gguf, out, "BF16"));
  ASSERT_FALSE(other.ok());
  EXPECT_THAT(std::string(other.status().message()), HasSubstr("holds a conversion for method AMXINT8"));
  RemoveTree(out);
  RemoveTree(dir);
}

TEST(ConvertGguf, LeadingDenseLayersAreSkipped) {
  const std::string dir = FreshDir("in"), gguf = dir + "/v3.gguf", out = TmpPath("out");
  RemoveTree(out);
  // deepseek2 with 3 blocks, the first dense (it has no _exps tensors): MoE layers 1 and 2.
  std::vector<Tensor> tensors = {{"blk.0.ffn_gate.weight", GgmlType::kF32, {kH, kI}, std::vector<uint8_t>(kH * kI * 4)}};
  for (int l = 1; l <= 2; ++l) {
    for (Tensor& t : LayerTensors(l, kTypes[0])) tensors.push_back(std::move(t));
  }
  Write(gguf,
        {{"general.architecture", GgufValue::String("deepseek2")},
         {"deepseek2.block_count", GgufValue::Uint32(3)},
         {"deepseek2.embedding_length", GgufValue::Uint32(kH)},
         {"deepseek2.expert_count", GgufValue::Uint32(kE)},
         {"deepseek2.expert_used_count", GgufValue::Uint32(2)},
         {"deepseek2.expert_feed_forward_length", GgufValue::Uint32(kI)},
         {"deepseek2.leading_dense_block_count", GgufValue::Uint32(1)},
         {"deepseek2.expert_gating_func", GgufValue::Uint32(2)},
         {"deepseek2.expert_weights_scale", GgufValue::Float32(2.5f)}},
        tensors);
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(gguf, out, "BF16"));
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->layers_total, 2);
  absl::StatusOr<Manifest> manifest = ReadManifest(out);
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  EXPECT_EQ(manifest->architecture, "DeepseekV3ForCausalLM");
  ASSERT_EQ(manifest->layers.size(), 2u);
  EXPECT_EQ(manifest->layers[0].layer, 1);
  EXPECT_EQ(manifest->layers[1].layer, 2);
  EXPECT_FALSE(Exists(out + "/" + LayerFileName(0)));
  RemoveTree(out);
  RemoveTree(dir);
}

// ---- Errors -------------------------------------------------------------------------------------------------

// Converts `tensors` (with `meta`) and expects a failure before the output folder exists.
std::string FailsBeforeOutput(const GgufMetadata& meta, const std::vector<Tensor>& tensors, const std::string& method,
                              absl::StatusCode code) {
  const std::string dir = FreshDir("in"), gguf = dir + "/model.gguf", out = TmpPath("out");
  RemoveTree(out);
  Write(gguf, meta, tensors);
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(gguf, out, method));
  EXPECT_FALSE(st.ok());
  EXPECT_EQ(st.status().code(), code) << st.status();
  EXPECT_FALSE(Exists(out)) << "a failed conversion created " << out;
  RemoveTree(dir);
  return std::string(st.status().message());
}

TEST(ConvertGguf, MethodLlamafileSaysItRunsGgufAsStored) {
  const std::string msg =
      FailsBeforeOutput(Qwen3Meta(), ModelTensors(), "LLAMAFILE", absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(msg, HasSubstr("--method LLAMAFILE"));
  EXPECT_THAT(msg, HasSubstr("which method LLAMAFILE runs as stored: there is nothing to convert"));
  EXPECT_THAT(msg, HasSubstr("KTMoEWrapper(method=\"LLAMAFILE\", weight_path="));
}

TEST(ConvertGguf, UnsupportedTypeNamesTheTensorAndTheSupportedTypes) {
  std::vector<Tensor> tensors = ModelTensors();
  for (Tensor& t : tensors) {
    if (t.name == "blk.1.ffn_up_exps.weight") {
      t.type = GgmlType::kIQ4_XS;
      t.bytes = RandomBlocks(t.type, t.dims, 7);
    }
  }
  const std::string msg = FailsBeforeOutput(Qwen3Meta(), tensors, "AMXINT8", absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(msg, HasSubstr("tensor blk.1.ffn_up_exps.weight is IQ4_XS, which kt convert cannot dequantize"));
  EXPECT_THAT(msg, HasSubstr("Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16, F16, F32"));
}

TEST(ConvertGguf, MissingTensorNamesTheLayerAndWhatItHas) {
  std::vector<Tensor> tensors = ModelTensors();
  tensors.erase(tensors.begin() + 6);  // blk.1.ffn_down_exps.weight
  const std::string msg = FailsBeforeOutput(Qwen3Meta(), tensors, "BF16", absl::StatusCode::kNotFound);
  EXPECT_THAT(msg, HasSubstr("layer 1 has no down experts (tensor blk.1.ffn_down_exps.weight not found)"));
  EXPECT_THAT(msg, HasSubstr("blk.1.ffn_gate_exps.weight"));
}

TEST(ConvertGguf, ExpertCountTheTensorsDoNotHave) {
  const std::string msg = FailsBeforeOutput(Qwen3Meta(4), ModelTensors(), "AMXINT8", absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(msg, HasSubstr("ne[2] (num_experts) = 3, the layer has num_experts = 4: experts 3..3 of layer 0 are "
                             "missing"));
}

TEST(ConvertGguf, UnknownArchitecture) {
  GgufMetadata meta = Qwen3Meta();
  meta[0].second = GgufValue::String("mamba");
  const std::string msg = FailsBeforeOutput(meta, ModelTensors(), "AMXINT8", absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(msg, HasSubstr("general.architecture is \"mamba\""));
}

TEST(ConvertGguf, NonFiniteWeightLeavesNoManifest) {
  const std::string dir = FreshDir("in"), gguf = dir + "/model.gguf", out = TmpPath("out");
  RemoveTree(out);
  std::vector<Tensor> tensors = ModelTensors();
  Tensor* gate1 = nullptr;
  for (Tensor& t : tensors) {
    if (t.name == "blk.1.ffn_gate_exps.weight") gate1 = &t;
  }
  ASSERT_NE(gate1, nullptr);
  // Expert 2, row 5, column 7 of layer 1's F16 gate: +inf (0x7c00).
  const size_t at = ((2 * static_cast<size_t>(kI) + 5) * kH + 7) * 2;
  gate1->bytes[at] = 0x00;
  gate1->bytes[at + 1] = 0x7c;
  Write(gguf, Qwen3Meta(), tensors);
  absl::StatusOr<ConvertStats> st = ConvertCheckpoint(Options(gguf, out, "AMXINT8"));
  ASSERT_FALSE(st.ok());
  EXPECT_THAT(std::string(st.status().message()),
              HasSubstr("tensor blk.1.ffn_gate_exps.weight expert 2 element [5][7] is inf (its F16 value); method "
                        "AMXINT8 needs finite weights"));
  // Layer 0 was written; the folder must not pass for a finished conversion.
  EXPECT_TRUE(Exists(out + "/" + LayerFileName(0)));
  EXPECT_FALSE(Exists(out + "/" + LayerFileName(1)));
  EXPECT_FALSE(Exists(out + "/" + kManifestName));
  EXPECT_FALSE(ReadManifest(out).ok());
  RemoveTree(out);
  RemoveTree(dir);
}

}  // namespace
}  // namespace kt
