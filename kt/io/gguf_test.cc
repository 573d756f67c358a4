#include "kt/io/gguf.h"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/test_files.h"

namespace kt {

void PrintTo(const GgufValue& v, std::ostream* os) { *os << v.DebugString(); }

namespace {

using ::testing::HasSubstr;
using testing_files::ReadRaw;
using testing_files::TestPath;
using testing_files::WriteRaw;




std::string Le(uint64_t v, int size) {
  std::string s;
  for (int i = 0; i < size; ++i) s.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return s;
}
std::string Le32(uint32_t v) { return Le(v, 4); }
std::string Le64(uint64_t v) { return Le(v, 8); }
std::string Str(absl::string_view s) { return absl::StrCat(Le64(s.size()), s); }

void Set(std::string* f, size_t pos, uint64_t v, int size) {
  ASSERT_LE(pos + size, f->size());
  f->replace(pos, size, Le(v, size));
}

std::vector<uint8_t> Pattern(size_t n, int seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i * 31 + seed * 7 + (i >> 8));
  return v;
}

// Where the value type id of metadata `key` is (just after the key string).
size_t KeyPos(const std::string& f, absl::string_view key) {
  const size_t p = f.find(Str(key));
  EXPECT_NE(p, std::string::npos) << key;
  return p == std::string::npos ? 0 : p + 8 + key.size();
}

// Where n_dims of tensor `name` is (just after the name string); dims follow, then the type, then the offset.
size_t InfoPos(const std::string& f, absl::string_view name) { return KeyPos(f, name); }

// A header with hand-written counts and bytes after them (version 3).
std::string Hand(uint64_t tensors, uint64_t kvs, const std::string& rest, uint32_t version = 3) {
  return absl::StrCat("GGUF", Le32(version), Le64(tensors), Le64(kvs), rest);
}

// The error Open() gives for a file holding `bytes`, checked to mention the file's path.
std::string OpenError(const std::string& bytes) {
  const std::string path = TestPath("bad.gguf");
  WriteRaw(path, bytes);
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  EXPECT_FALSE(f.ok()) << "opened " << path;
  if (f.ok()) return "";
  const std::string message(f.status().message());
  EXPECT_THAT(message, HasSubstr(path));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << message;
  return message;
}

// A valid file: five keys and two tensors (Q8_0 [64, 2]: 136 bytes at 0; F32 [3]: 12 bytes at 160).
std::string ValidFile() {
  static const std::vector<uint8_t> q8 = Pattern(136, 1), f32 = Pattern(12, 2);
  GgufMetadata metadata = {
      {"general.architecture", GgufValue::String("llama")},
      {"a.u32", GgufValue::Uint32(7)},
      {"a.bool", GgufValue::Bool(true)},
      {"a.arr", GgufValue::Array(GgufValueType::kInt32,
                                 {GgufValue::Int32(1), GgufValue::Int32(2), GgufValue::Int32(3)})},
      {"a.strs", GgufValue::Array(GgufValueType::kString, {GgufValue::String("x"), GgufValue::String("yy")})},
  };
  std::vector<GgufTensorToWrite> tensors = {
      {"w.q8", GgmlType::kQ8_0, {64, 2}, q8},
      {"w.f32", GgmlType::kF32, {3}, f32},
  };
  absl::StatusOr<std::string> file = SerializeGguf(metadata, tensors);
  EXPECT_TRUE(file.ok()) << file.status();
  return *file;
}

TEST(GgufTest, GgmlTypeTable) {
  // Against ggml.h / ggml-common.h (block elements, block bytes).
  struct Row {
    uint32_t id;
    const char* name;
    uint64_t block, size;
  };
  const Row rows[] = {{0, "F32", 1, 4},       {1, "F16", 1, 2},       {2, "Q4_0", 32, 18},   {3, "Q4_1", 32, 20},
                      {6, "Q5_0", 32, 22},    {7, "Q5_1", 32, 24},    {8, "Q8_0", 32, 34},   {9, "Q8_1", 32, 36},
                      {10, "Q2_K", 256, 84},  {11, "Q3_K", 256, 110}, {12, "Q4_K", 256, 144}, {13, "Q5_K", 256, 176},
                      {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292}, {24, "I8", 1, 1},      {25, "I16", 1, 2},
                      {26, "I32", 1, 4},      {27, "I64", 1, 8},      {28, "F64", 1, 8},     {30, "BF16", 1, 2},
                      {16, "IQ2_XXS", 256, 66}, {17, "IQ2_XS", 256, 74}, {18, "IQ3_XXS", 256, 98},
                      {19, "IQ1_S", 256, 50}, {20, "IQ4_NL", 32, 18}, {21, "IQ3_S", 256, 110},
                      {22, "IQ2_S", 256, 82}, {23, "IQ4_XS", 256, 136}, {29, "IQ1_M", 256, 56},
                      {34, "TQ1_0", 256, 54}, {35, "TQ2_0", 256, 66}, {39, "MXFP4", 32, 17}};
  for (const Row& r : rows) {
    absl::StatusOr<GgmlType> t = ParseGgmlType(r.id);
    ASSERT_TRUE(t.ok()) << r.id;
    EXPECT_STREQ(GgmlTypeName(*t), r.name);
    EXPECT_EQ(GgmlBlockSize(*t), r.block) << r.name;
    EXPECT_EQ(GgmlTypeSize(*t), r.size) << r.name;
  }
  for (uint32_t id : {4u, 5u, 31u, 33u, 36u, 40u, 1000u}) {
    EXPECT_THAT(std::string(ParseGgmlType(id).status().message()),
                HasSubstr(absl::StrCat("unsupported ggml type ", id)));
  }
  EXPECT_EQ(*GgmlNbytes(GgmlType::kQ4_K, {512, 3}), 2 * 3 * 144u);
  EXPECT_EQ(*GgmlNbytes(GgmlType::kBf16, {}), 2u);
  EXPECT_EQ(*GgmlNbytes(GgmlType::kF32, {5, 0, 7}), 0u);
}

TEST(GgufTest, RoundTripEveryValueTypeAndTensorType) {
  const std::vector<uint8_t> f32 = Pattern(4 * 3 * 2, 1), f16 = Pattern(2 * 4 * 2, 2), bf16 = Pattern(2 * 5, 3),
                             q8 = Pattern(34 * 2 * 3, 4), q4k = Pattern(144 * 2 * 1 * 2, 5);
  const GgufValue nested = GgufValue::Array(
      GgufValueType::kArray,
      {GgufValue::Array(GgufValueType::kUint8, {GgufValue::Uint8(1), GgufValue::Uint8(255)}),
       GgufValue::Array(GgufValueType::kUint8, {}),
       GgufValue::Array(GgufValueType::kArray,
                        {GgufValue::Array(GgufValueType::kString, {GgufValue::String("deep")})})});
  const GgufMetadata metadata = {
      {"general.architecture", GgufValue::String("qwen3moe")},
      {"t.u8", GgufValue::Uint8(200)},
      {"t.i8", GgufValue::Int8(-100)},
      {"t.u16", GgufValue::Uint16(65535)},
      {"t.i16", GgufValue::Int16(-32768)},
      {"t.u32", GgufValue::Uint32(4000000000u)},
      {"t.i32", GgufValue::Int32(-2000000000)},
      {"t.f32", GgufValue::Float32(0.1f)},
      {"t.f32nan", GgufValue::Float32Bits(0x7fc00123u)},
      {"t.bool", GgufValue::Bool(false)},
      {"t.str", GgufValue::String(std::string("caf\xC3\xA9\0x", 7))},
      {"t.empty", GgufValue::String("")},
      {"t.u64", GgufValue::Uint64(~uint64_t{0})},
      {"t.i64", GgufValue::Int64(INT64_MIN)},
      {"t.f64", GgufValue::Float64(-1e300)},
      {"t.tokens", GgufValue::Array(GgufValueType::kString, {GgufValue::String("<s>"), GgufValue::String("a b")})},
      {"t.scores", GgufValue::Array(GgufValueType::kFloat32, {GgufValue::Float32(-1.5f), GgufValue::Float32(2)})},
      {"t.none", GgufValue::Array(GgufValueType::kFloat64, {})},
      {"t.nested", nested},
  };
  const std::vector<GgufTensorToWrite> tensors = {
      {"blk.0.ffn_gate_exps.weight", GgmlType::kQ4_K, {256 * 2, 1, 2}, q4k},
      {"f32", GgmlType::kF32, {3, 2}, f32},
      {"f16", GgmlType::kF16, {4, 2}, f16},
      {"bf16", GgmlType::kBf16, {5}, bf16},
      {"q8", GgmlType::kQ8_0, {64, 3}, q8},
      {"empty", GgmlType::kF32, {0, 4}, {}},
  };
  const std::string path = TestPath("rt.gguf");
  ASSERT_TRUE(WriteGguf(path, metadata, tensors).ok());
  absl::StatusOr<std::string> serialized = SerializeGguf(metadata, tensors);
  ASSERT_TRUE(serialized.ok()) << serialized.status();
  EXPECT_EQ(ReadRaw(path), *serialized);

  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  const GgufFile& file = **f;
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.alignment(), 32u);
  EXPECT_EQ(file.header().data_offset % 32, 0u);
  ASSERT_EQ(file.metadata().size(), metadata.size());
  for (const auto& kv : metadata) {
    const GgufValue* v = file.FindMetadata(kv.first);
    ASSERT_NE(v, nullptr) << kv.first;
    EXPECT_EQ(*v, kv.second) << kv.first;
  }
  // Re-serializing what was read gives the same bytes.
  const GgufMetadata again(file.metadata().begin(), file.metadata().end());
  GgufMetadata sorted = metadata;
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  EXPECT_EQ(*SerializeGguf(again, tensors), *SerializeGguf(sorted, tensors));

  ASSERT_EQ(file.tensors().size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const GgufTensorInfo& t = file.tensors()[i];  // File order = the order written.
    EXPECT_EQ(t.name, tensors[i].name);
    EXPECT_EQ(file.Find(t.name), &t);
    EXPECT_EQ(t.type, tensors[i].type);
    EXPECT_EQ(t.dims, tensors[i].dims);
    EXPECT_EQ(t.nbytes, tensors[i].bytes.size());
    EXPECT_EQ(t.offset % 32, 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(file.data(t)) % 32, 0u) << t.name;
    EXPECT_EQ(std::vector<uint8_t>(file.bytes(t).begin(), file.bytes(t).end()),
              std::vector<uint8_t>(tensors[i].bytes.begin(), tensors[i].bytes.end()))
        << t.name;
  }
  EXPECT_EQ(file.Find("q8")->num_elements(), 64u * 3);
  EXPECT_EQ(file.Find("nope"), nullptr);

  // Typed getters.
  EXPECT_EQ(*file.GetString("general.architecture"), "qwen3moe");
  EXPECT_EQ(*file.GetUint("t.u32"), 4000000000u);
  EXPECT_EQ(*file.GetUint("t.u8"), 200u);
  EXPECT_EQ(*file.GetInt("t.i8"), -100);
  EXPECT_EQ(*file.GetInt("t.u32"), 4000000000);
  EXPECT_EQ(*file.GetInt("t.i64"), INT64_MIN);
  EXPECT_EQ(*file.GetUint("t.u64"), ~uint64_t{0});
  EXPECT_EQ(*file.GetFloat("t.f32"), static_cast<double>(0.1f));
  EXPECT_EQ(*file.GetFloat("t.f64"), -1e300);
  EXPECT_EQ(*file.GetBool("t.bool"), false);
  EXPECT_EQ(*file.GetStringArray("t.tokens"), (std::vector<std::string>{"<s>", "a b"}));
  absl::StatusOr<const GgufValue*> arr = file.GetArray("t.nested");
  ASSERT_TRUE(arr.ok()) << arr.status();
  EXPECT_EQ((*arr)->elements()[2].elements()[0].elements()[0].string_value(), "deep");
}

TEST(GgufTest, TypedGettersSayWhatWasExpectedAndFound) {
  const std::string path = TestPath("g.gguf");
  ASSERT_TRUE(WriteGguf(path,
                        {{"neg", GgufValue::Int32(-3)},
                         {"big", GgufValue::Uint64(~uint64_t{0})},
                         {"s", GgufValue::String("v")},
                         {"ints", GgufValue::Array(GgufValueType::kInt32, {})}},
                        {})
                  .ok());
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  const auto message = [](const absl::Status& s) { return std::string(s.message()); };
  EXPECT_THAT(message((*f)->GetUint("neg").status()), HasSubstr(path + ": metadata \"neg\": is -3, expected a non-negative"));
  EXPECT_THAT(message((*f)->GetInt("big").status()), HasSubstr("metadata \"big\": is 18446744073709551615, beyond INT64_MAX"));
  EXPECT_THAT(message((*f)->GetUint("s").status()),
              HasSubstr(path + ": metadata \"s\": expected an unsigned integer, found STRING \"v\""));
  EXPECT_THAT(message((*f)->GetString("neg").status()), HasSubstr("metadata \"neg\": expected STRING, found INT32 -3"));
  EXPECT_THAT(message((*f)->GetFloat("s").status()), HasSubstr("expected FLOAT32 or FLOAT64, found STRING"));
  EXPECT_THAT(message((*f)->GetBool("s").status()), HasSubstr("expected BOOL, found STRING"));
  EXPECT_THAT(message((*f)->GetArray("s").status()), HasSubstr("expected ARRAY, found STRING"));
  EXPECT_THAT(message((*f)->GetStringArray("ints").status()),
              HasSubstr("metadata \"ints\": expected ARRAY<STRING>, found ARRAY<INT32>[0]"));
  EXPECT_EQ((*f)->GetString("missing").status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(message((*f)->GetString("missing").status()), HasSubstr(path + ": no metadata key \"missing\""));
  EXPECT_TRUE((*f)->tensors().empty());
}

TEST(GgufTest, CustomAlignment) {
  const std::vector<uint8_t> a = Pattern(12, 1), b = Pattern(8, 2);
  const std::string path = TestPath("a.gguf");
  ASSERT_TRUE(WriteGguf(path, {{"general.alignment", GgufValue::Uint32(256)}},
                        {{"a", GgmlType::kF32, {3}, a}, {"b", GgmlType::kI8, {8}, b}})
                  .ok());
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->alignment(), 256u);
  EXPECT_EQ((*f)->header().data_offset % 256, 0u);
  EXPECT_EQ((*f)->Find("b")->offset, 256u);
  EXPECT_EQ((*f)->file_size(), (*f)->header().data_offset + 512);
}

TEST(GgufTest, Version2AndNoTensorsWithoutPadding) {
  std::string file = ValidFile();
  Set(&file, 4, 2, 4);
  absl::StatusOr<GgufHeader> h = ParseGguf(file, "v2");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->version, 2u);
  // No tensors: the file may end right after the metadata (some writers leave out the padding).
  const std::string bare = Hand(0, 1, absl::StrCat(Str("k"), Le32(0), "\x05"));
  h = ParseGguf(bare, "bare");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->data_size, 0u);
  EXPECT_EQ(*h->GetUint("k"), 5u);
}

TEST(GgufTest, WriterIsAtomicAndLeavesNoTemporaryFile) {
  const std::string path = TestPath("w.gguf");
  const std::vector<uint8_t> one = Pattern(4, 1), two = Pattern(8, 2);
  ASSERT_TRUE(WriteGguf(path, {}, {{"x", GgmlType::kF32, {1}, one}}).ok());
  ASSERT_TRUE(WriteGguf(path, {}, {{"x", GgmlType::kF32, {2}, two}}).ok());  // Replaces the file.
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Find("x")->dims, std::vector<uint64_t>{2});

  const std::string before = ReadRaw(path);
  absl::Status s = WriteGguf(path, {}, {{"x", GgmlType::kF32, {3}, two}});
  EXPECT_THAT(std::string(s.message()), HasSubstr(path + ": tensor \"x\": 8 bytes given, but F32 [3] needs 12"));
  EXPECT_EQ(ReadRaw(path), before);
  s = WriteGguf(TestPath("no/such/dir/x.gguf"), {}, {{"x", GgmlType::kF32, {1}, one}});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(".tmp."));

  DIR* dir = opendir(::testing::TempDir().c_str());
  ASSERT_NE(dir, nullptr);
  while (dirent* e = readdir(dir)) EXPECT_THAT(std::string(e->d_name), ::testing::Not(HasSubstr(".tmp.")));
  closedir(dir);
}

TEST(GgufTest, WriterRejectsBadInput) {
  const std::vector<uint8_t> four = Pattern(4, 1), q = Pattern(34, 1);
  const auto error = [](const GgufMetadata& m, const std::vector<GgufTensorToWrite>& t) {
    absl::StatusOr<std::string> f = SerializeGguf(m, t);
    EXPECT_FALSE(f.ok());
    return f.ok() ? std::string() : std::string(f.status().message());
  };
  EXPECT_THAT(error({{"k", GgufValue::Uint8(1)}, {"k", GgufValue::Uint8(2)}}, {}),
              HasSubstr("metadata \"k\": duplicate key"));
  EXPECT_THAT(error({}, {{"x", GgmlType::kF32, {1}, four}, {"x", GgmlType::kF32, {1}, four}}),
              HasSubstr("tensor \"x\": duplicate name"));
  EXPECT_THAT(error({}, {{"x", GgmlType::kF32, {1, 1, 1, 1, 1}, four}}),
              HasSubstr("tensor \"x\": 5 dims, more than the maximum of 4"));
  EXPECT_THAT(error({}, {{"x", GgmlType::kQ8_0, {16, 2}, q}}),
              HasSubstr("tensor \"x\": dims [16, 2]: ne[0] = 16 is not a multiple of the Q8_0 block size 32"));
  EXPECT_THAT(error({}, {{"x", static_cast<GgmlType>(36), {1}, four}}),
              HasSubstr("tensor \"x\": unsupported ggml type 36"));
  EXPECT_THAT(error({{"a", GgufValue::Array(GgufValueType::kUint8, {GgufValue::Uint16(1)})}}, {}),
              HasSubstr("metadata \"a\": element 0 is UINT16 in an array of UINT8"));
  EXPECT_THAT(error({{"general.alignment", GgufValue::Uint64(32)}}, {}),
              HasSubstr("metadata \"general.alignment\": expected UINT32, found UINT64"));
  EXPECT_THAT(error({{"general.alignment", GgufValue::Uint32(48)}}, {}),
              HasSubstr("metadata \"general.alignment\": is 48, expected a power of two"));
  GgufValue deep = GgufValue::Array(GgufValueType::kUint8, {});
  for (int i = 0; i < kGgufMaxArrayDepth; ++i) deep = GgufValue::Array(GgufValueType::kArray, {deep});
  EXPECT_THAT(error({{"d", deep}}, {}), HasSubstr("nested more than 16 deep"));
}

TEST(GgufTest, MissingFileAndDirectory) {
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(TestPath("none.gguf"));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("none.gguf: cannot open"));
  f = GgufFile::Open(::testing::TempDir());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("not a regular file"));
}

TEST(GgufTest, ValidFileOpens) {
  const std::string path = TestPath("ok.gguf");
  WriteRaw(path, ValidFile());
  absl::StatusOr<std::unique_ptr<GgufFile>> f = GgufFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Find("w.f32")->offset, 160u);
  EXPECT_EQ((*f)->header().data_size, 192u);
}

// ---- Bad inputs: each names the file and what is wrong. ----

TEST(GgufBadInputTest, EmptyFile) {
  EXPECT_THAT(OpenError(""), HasSubstr("not a GGUF file: truncated: the magic at byte 0 needs 4 bytes"));
}

TEST(GgufBadInputTest, WrongMagic) {
  std::string f = ValidFile();
  f[3] = 'G';
  EXPECT_THAT(OpenError(f), HasSubstr("not a GGUF file: the first 4 bytes are 47 47 55 47, expected 47 47 55 46"));
  EXPECT_THAT(OpenError(absl::StrCat(Le64(100), "{}")), HasSubstr("not a GGUF file"));  // A safetensors file.
}

TEST(GgufBadInputTest, UnsupportedVersion) {
  std::string f = ValidFile();
  Set(&f, 4, 1, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("unsupported GGUF version 1 (supported: 2, 3; version 1 files"));
  Set(&f, 4, 4, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("unsupported GGUF version 4 (supported: 2, 3)"));
  Set(&f, 4, 0x03000000, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("unsupported GGUF version 50331648 (supported: 2, 3; is this a big-endian"));
}

TEST(GgufBadInputTest, TruncatedInTheCounts) {
  EXPECT_THAT(OpenError(ValidFile().substr(0, 14)), HasSubstr("truncated: tensor_count at byte 8 needs 8 bytes"));
  EXPECT_THAT(OpenError(ValidFile().substr(0, 20)),
              HasSubstr("truncated: metadata_kv_count at byte 16 needs 8 bytes, but only 4 remain"));
}

TEST(GgufBadInputTest, TruncatedAnywhere) {
  // Every proper prefix of a valid file is rejected with the file's name (the last 32 bytes are the
  // padding after the final tensor, which the format does not require, but the F32 tensor's bytes are).
  const std::string valid = ValidFile();
  const size_t needed = valid.size() - 32 + 12;
  for (size_t n = 0; n < needed; ++n) {
    absl::StatusOr<GgufHeader> h = ParseGguf(valid.substr(0, n), "cut.gguf");
    ASSERT_FALSE(h.ok()) << n;
    EXPECT_THAT(std::string(h.status().message()), HasSubstr("cut.gguf: ")) << n;
    EXPECT_THAT(std::string(h.status().message()), ::testing::AnyOf(HasSubstr("truncated"), HasSubstr("length")))
        << n << ": " << h.status();
  }
  EXPECT_TRUE(ParseGguf(valid.substr(0, needed), "cut.gguf").ok());
}

TEST(GgufBadInputTest, TruncatedInsideAValue) {
  const std::string f = Hand(0, 1, absl::StrCat(Str("a.u32"), Le32(4), std::string("\x07\x00", 2)));
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"a.u32\": truncated: UINT32 at byte 41 needs 4 bytes, but only 2 "
                                      "remain (the file has 43)"));
}

TEST(GgufBadInputTest, TruncatedInsideATensorInfo) {
  const std::string f = ValidFile();
  const size_t p = InfoPos(f, "w.f32");
  EXPECT_THAT(OpenError(f.substr(0, p + 4 + 8 + 2)),
              HasSubstr("tensor \"w.f32\": truncated: ggml type at byte"));
}

TEST(GgufBadInputTest, TensorDataBeyondTheFile) {
  const std::string f = ValidFile();
  EXPECT_THAT(OpenError(f.substr(0, f.size() - 32)),
              HasSubstr("tensor \"w.f32\": F32 [3] needs 12 bytes at offset 160, beyond the data section of "
                        "160 bytes (is the file truncated?)"));
  std::string g = f;
  Set(&g, InfoPos(g, "w.q8") + 4 + 16 + 4, uint64_t{1} << 63, 8);  // offset
  EXPECT_THAT(OpenError(g), HasSubstr("tensor \"w.q8\": Q8_0 [64, 2] needs 136 bytes at offset 9223372036854775808"));
  Set(&g, InfoPos(g, "w.q8") + 4 + 16 + 4, ~uint64_t{0} - 31, 8);  // offset + nbytes overflows
  EXPECT_THAT(OpenError(g), HasSubstr("beyond the data section"));
}

TEST(GgufBadInputTest, DataSectionStartsBeyondTheFile) {
  // Cut inside the padding between the tensor infos and the data section.
  const std::string f = ValidFile();
  const size_t infos_end = InfoPos(f, "w.f32") + 4 + 8 + 4 + 8;
  ASSERT_NE(infos_end % 32, 0u);
  EXPECT_THAT(OpenError(f.substr(0, infos_end + 1)),
              HasSubstr(absl::StrCat("truncated: the data section starts at byte ", (infos_end + 31) / 32 * 32)));
}

TEST(GgufBadInputTest, BadStringLength) {
  std::string f = ValidFile();
  Set(&f, KeyPos(f, "a.bool") - 6 - 8, uint64_t{1} << 40, 8);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata #2: bad string length: key at byte"));
  EXPECT_THAT(OpenError(f), HasSubstr("has length 1099511627776, but only"));
  f = ValidFile();
  Set(&f, KeyPos(f, "general.architecture") + 4, ~uint64_t{0}, 8);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"general.architecture\": bad string length: STRING at byte"));
  f = ValidFile();
  Set(&f, InfoPos(f, "w.q8") - 4 - 8, 1000000, 8);
  EXPECT_THAT(OpenError(f), HasSubstr("tensor #0: bad string length: name at byte"));
}

TEST(GgufBadInputTest, UnknownMetadataValueType) {
  std::string f = ValidFile();
  Set(&f, KeyPos(f, "a.u32"), 13, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"a.u32\": unknown value type 13 at byte"));
  EXPECT_THAT(OpenError(f), HasSubstr("(expected 0..12)"));
}

TEST(GgufBadInputTest, UnknownArrayElementType) {
  std::string f = ValidFile();
  Set(&f, KeyPos(f, "a.arr") + 4, 99, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"a.arr\": unknown array element type 99 at byte"));
}

TEST(GgufBadInputTest, ArrayLengthBeyondTheFile) {
  std::string f = ValidFile();
  Set(&f, KeyPos(f, "a.arr") + 8, uint64_t{1} << 61, 8);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"a.arr\": bad array length: 2305843009213693952 INT32 elements"));
  f = ValidFile();
  Set(&f, KeyPos(f, "a.strs") + 8, uint64_t{1} << 60, 8);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"a.strs\": bad array length: 1152921504606846976 STRING elements "
                                      "at byte"));
  EXPECT_THAT(OpenError(f), HasSubstr("need at least 8 bytes each"));
  // A string inside an array whose length runs past the end.
  f = ValidFile();
  Set(&f, KeyPos(f, "a.strs") + 4 + 4 + 8 + 8 + 1, 1000, 8);  // The second string's length.
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"a.strs\": element 1: bad string length: STRING at byte"));
}

TEST(GgufBadInputTest, BoolNotZeroOrOne) {
  std::string f = ValidFile();
  Set(&f, KeyPos(f, "a.bool") + 4, 2, 1);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"a.bool\": BOOL at byte"));
  EXPECT_THAT(OpenError(f), HasSubstr("is 2, expected 0 or 1"));
}

TEST(GgufBadInputTest, ArraysNestedTooDeep) {
  std::string value;
  for (int i = 0; i < 17; ++i) absl::StrAppend(&value, Le32(9), Le64(1));
  absl::StrAppend(&value, Le32(0), Le64(0));
  const std::string f = Hand(0, 1, absl::StrCat(Str("deep"), Le32(9), value));
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"deep\": element 0: element 0: "));
  EXPECT_THAT(OpenError(f), HasSubstr("arrays nested more than 16 deep"));
}

TEST(GgufBadInputTest, CountsBeyondTheFile) {
  EXPECT_THAT(OpenError(Hand(1000, 0, std::string(100, '\0'))),
              HasSubstr("truncated or corrupt: tensor_count 1000 and metadata_kv_count 0 need at least 24 and 13 "
                        "bytes each, but only 100 bytes follow the header"));
  EXPECT_THAT(OpenError(Hand(0, ~uint64_t{0}, std::string(100, '\0'))),
              HasSubstr("metadata_kv_count 18446744073709551615 need"));
  EXPECT_THAT(OpenError(Hand(3, 3, std::string(24 * 3 + 13 * 3 - 1, '\0'))), HasSubstr("truncated or corrupt"));
}

TEST(GgufBadInputTest, TooManyDims) {
  std::string f = ValidFile();
  Set(&f, InfoPos(f, "w.q8"), 5, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("tensor \"w.q8\": n_dims 5 exceeds the maximum of 4"));
}

TEST(GgufBadInputTest, DimsOverflow) {
  std::string f = ValidFile();
  Set(&f, InfoPos(f, "w.q8") + 4 + 8, uint64_t{1} << 40, 8);  // dims[1]: 64 * 2^40 fits, ...
  Set(&f, InfoPos(f, "w.q8") + 4, uint64_t{1} << 30, 8);      // ... 2^30 * 2^40 does not fit int64.
  EXPECT_THAT(OpenError(f), HasSubstr("tensor \"w.q8\": dims [1073741824, 1099511627776] of Q8_0 overflow"));
  f = ValidFile();
  Set(&f, InfoPos(f, "w.f32") + 4, uint64_t{1} << 63, 8);  // Above INT64_MAX on its own.
  EXPECT_THAT(OpenError(f), HasSubstr("tensor \"w.f32\": dims [9223372036854775808] of F32 overflow"));
  f = ValidFile();
  Set(&f, InfoPos(f, "w.f32") + 4, uint64_t{1} << 62, 8);  // 2^62 elements fit, 2^64 bytes do not.
  EXPECT_THAT(OpenError(f), HasSubstr("tensor \"w.f32\": dims [4611686018427387904] of F32 have more bytes"));
}

TEST(GgufBadInputTest, FirstDimensionNotAMultipleOfTheBlock) {
  std::string f = ValidFile();
  Set(&f, InfoPos(f, "w.q8") + 4, 48, 8);
  EXPECT_THAT(OpenError(f),
              HasSubstr("tensor \"w.q8\": dims [48, 2]: ne[0] = 48 is not a multiple of the Q8_0 block size 32"));
}

TEST(GgufBadInputTest, UnsupportedGgmlType) {
  std::string f = ValidFile();
  Set(&f, InfoPos(f, "w.q8") + 4 + 16, 31, 4);  // Q4_0_4_4, removed from ggml
  EXPECT_THAT(OpenError(f), HasSubstr("tensor \"w.q8\": unsupported ggml type 31 (supported: F32=0"));
}

TEST(GgufBadInputTest, OffsetNotAligned) {
  std::string f = ValidFile();
  Set(&f, InfoPos(f, "w.f32") + 4 + 8 + 4, 161, 8);
  EXPECT_THAT(OpenError(f), HasSubstr("tensor \"w.f32\": offset 161 is not a multiple of the alignment 32"));
}

TEST(GgufBadInputTest, OverlappingTensors) {
  std::string f = ValidFile();
  Set(&f, InfoPos(f, "w.f32") + 4 + 8 + 4, 128, 8);  // w.q8 is [0, 136).
  EXPECT_THAT(OpenError(f), HasSubstr("tensors \"w.q8\" [0, 136) and \"w.f32\" [128, 140) overlap"));
  Set(&f, InfoPos(f, "w.f32") + 4 + 8 + 4, 0, 8);  // Same start.
  EXPECT_THAT(OpenError(f), HasSubstr("overlap in the data section"));
}

TEST(GgufBadInputTest, DuplicateTensorNames) {
  // Two same-length names; the second is rewritten into the first.
  const std::vector<uint8_t> a = Pattern(4, 1);
  absl::StatusOr<std::string> g =
      SerializeGguf({}, {{"blk.0.a", GgmlType::kF32, {1}, a}, {"blk.0.b", GgmlType::kF32, {1}, a}});
  ASSERT_TRUE(g.ok());
  const size_t q = InfoPos(*g, "blk.0.b");
  (*g)[q - 1] = 'a';
  EXPECT_THAT(OpenError(*g), HasSubstr("duplicate tensor \"blk.0.a\" (tensors #0 and #1)"));
}

TEST(GgufBadInputTest, DuplicateMetadataKeys) {
  // Two same-length keys; the second is rewritten into the first.
  absl::StatusOr<std::string> g =
      SerializeGguf({{"k.one", GgufValue::Uint8(1)}, {"k.two", GgufValue::Uint8(2)}}, {});
  ASSERT_TRUE(g.ok());
  g->replace(KeyPos(*g, "k.two") - 5, 5, "k.one");
  EXPECT_THAT(OpenError(*g), HasSubstr("metadata \"k.one\": duplicate key (metadata #1)"));
}

TEST(GgufBadInputTest, BadAlignment) {
  absl::StatusOr<std::string> g = SerializeGguf({{"general.alignment", GgufValue::Uint32(64)}}, {});
  ASSERT_TRUE(g.ok());
  std::string f = *g;
  Set(&f, KeyPos(f, "general.alignment") + 4, 48, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"general.alignment\": is 48, expected a power of two"));
  Set(&f, KeyPos(f, "general.alignment") + 4, 0, 4);
  EXPECT_THAT(OpenError(f), HasSubstr("is 0, expected a power of two"));
  f = *g;
  Set(&f, KeyPos(f, "general.alignment"), 5, 4);  // INT32 instead of UINT32.
  EXPECT_THAT(OpenError(f), HasSubstr("metadata \"general.alignment\": expected UINT32, found INT32"));
}

TEST(GgufBadInputTest, InMemoryParserUsesTheGivenOrigin) {
  absl::StatusOr<GgufHeader> h = ParseGguf("GGUF", "memory:xyz");
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("memory:xyz: truncated: the version at byte 4"));
}

}  // namespace
}  // namespace kt
