#include "kt/io/safetensors.h"

#include <dirent.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/test_files.h"
#include "kt/kernels/dtype.h"

namespace kt {
namespace {

using ::testing::HasSubstr;
using testing_files::ReadRaw;
using testing_files::TestPath;
using testing_files::WriteRaw;




std::string Le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return s;
}

// A file from a hand-written header: the size field, the JSON exactly as given, then `data_bytes` bytes.
std::string RawFile(absl::string_view json, size_t data_bytes) {
  return absl::StrCat(Le64(json.size()), json, std::string(data_bytes, '\x5A'));
}

// Deterministic bytes for tensor `seed`.
std::vector<uint8_t> Pattern(size_t n, int seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i * 31 + seed * 7 + (i >> 8));
  return v;
}

// The error Open() gives for a file holding `bytes`, checked to mention the file's path.
std::string OpenError(const std::string& path, const std::string& bytes) {
  WriteRaw(path, bytes);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  EXPECT_FALSE(f.ok()) << "opened " << path;
  if (f.ok()) return "";
  const std::string message(f.status().message());
  EXPECT_THAT(message, HasSubstr(path));
  return message;
}

// A valid two-tensor file, built by the writer.
std::string ValidFile() {
  static const std::vector<uint8_t> a = Pattern(2 * 3 * 2, 1);
  static const std::vector<uint8_t> b = Pattern(4 * 4, 2);
  std::vector<TensorToWrite> tensors = {
      {"alpha", Dtype::kBf16, {2, 3}, a},
      {"beta", Dtype::kF32, {4}, b},
  };
  absl::StatusOr<std::string> header = BuildSafetensorsHeader(tensors, {{"format", "pt"}});
  EXPECT_TRUE(header.ok()) << header.status();
  return absl::StrCat(*header, std::string(a.begin(), a.end()), std::string(b.begin(), b.end()));
}

TEST(SafetensorsTest, RoundTripEveryDtype) {
  const std::vector<Dtype> dtypes = {Dtype::kBf16, Dtype::kF16, Dtype::kF32, Dtype::kF8E4M3,
                                     Dtype::kI8,   Dtype::kU8,  Dtype::kI32, Dtype::kI64};
  std::vector<std::vector<uint8_t>> storage;
  std::vector<TensorToWrite> tensors;
  storage.reserve(dtypes.size() + 2);
  for (size_t i = 0; i < dtypes.size(); ++i) {
    const std::vector<int64_t> shape = {3, static_cast<int64_t>(i) + 1, 5};
    storage.push_back(Pattern(15 * (i + 1) * DtypeSize(dtypes[i]), static_cast<int>(i)));
    // Names deliberately out of order: the writer lays tensors out by name.
    tensors.push_back(
        {absl::StrCat("t", 9 - i, ".", DtypeName(dtypes[i])), dtypes[i], shape, storage.back()});
  }
  storage.push_back(Pattern(4, 100));
  tensors.push_back({"scalar", Dtype::kF32, {}, storage.back()});
  tensors.push_back({"empty", Dtype::kBf16, {0, 7}, {}});
  const std::string path = TestPath("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}, {"note", "caf\xC3\xA9 \"q\""}}).ok());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  EXPECT_EQ((*f)->metadata().at("note"), "caf\xC3\xA9 \"q\"");
  ASSERT_EQ((*f)->tensors().size(), tensors.size());
  std::vector<std::string> names = (*f)->Names();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  uint64_t previous_end = 0;
  for (const std::string& name : names) {  // Laid out in name order, back to back.
    const TensorInfo* info = (*f)->Find(name);
    EXPECT_EQ(info->begin, previous_end) << name;
    previous_end = info->end;
  }
  for (const TensorToWrite& t : tensors) {
    SCOPED_TRACE(t.name);
    const TensorInfo* info = (*f)->Find(t.name);
    ASSERT_NE(info, nullptr);
    EXPECT_EQ(info->dtype, t.dtype);
    EXPECT_EQ(info->shape, t.shape);
    ASSERT_EQ(info->num_bytes(), t.bytes.size());
    EXPECT_EQ(info->num_elements() * DtypeSize(t.dtype), t.bytes.size());
    EXPECT_TRUE(std::equal(t.bytes.begin(), t.bytes.end(), (*f)->data(*info)));
    std::vector<uint8_t> out(t.bytes.size() + 1, 0xEE);
    ASSERT_TRUE((*f)->Read(t.name, t.dtype, t.shape, out.data()).ok());
    EXPECT_TRUE(std::equal(t.bytes.begin(), t.bytes.end(), out.begin()));
    EXPECT_EQ(out.back(), 0xEE);  // Nothing written past the tensor.
  }
  EXPECT_EQ((*f)->Find("nope"), nullptr);

  // Header padded with spaces to 8-byte alignment; the file is exactly header + data.
  const std::string raw = ReadRaw(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(raw.size(), 8 + n + previous_end);
  EXPECT_EQ(raw[8], '{');
  EXPECT_THAT(raw.substr(8, n), ::testing::AnyOf(::testing::EndsWith("}"), ::testing::EndsWith(" ")));
}

TEST(SafetensorsTest, WriterIsAtomicAndLeavesNoTemporaryFile) {
  const std::string path = TestPath("w.safetensors");
  const std::vector<uint8_t> one = Pattern(4, 1), two = Pattern(8, 2);
  ASSERT_TRUE(WriteSafetensors(path, {{"x", Dtype::kF32, {1}, one}}).ok());
  ASSERT_TRUE(WriteSafetensors(path, {{"x", Dtype::kF32, {2}, two}}).ok());  // Replaces the file.
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->Find("x")->shape, std::vector<int64_t>{2});
  EXPECT_TRUE((*f)->metadata().empty());

  // A failing write (bad byte count) creates nothing, and the old file is untouched.
  const std::string before = ReadRaw(path);
  absl::Status s = WriteSafetensors(path, {{"x", Dtype::kF32, {3}, two}});
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor \"x\": 8 bytes given, but F32 [3] needs 12"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));
  EXPECT_EQ(ReadRaw(path), before);
  // A write into a missing folder fails at creating the temporary file.
  s = WriteSafetensors(TestPath("no/such/dir/x.safetensors"), {{"x", Dtype::kF32, {1}, one}});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(".tmp."));

  DIR* dir = opendir(::testing::TempDir().c_str());
  ASSERT_NE(dir, nullptr);
  while (dirent* e = readdir(dir)) EXPECT_THAT(std::string(e->d_name), ::testing::Not(HasSubstr(".tmp.")));
  closedir(dir);
}

TEST(SafetensorsTest, WriterRejectsBadTensors) {
  const std::vector<uint8_t> four = Pattern(4, 1);
  EXPECT_THAT(
      std::string(BuildSafetensorsHeader({{"a", Dtype::kF32, {1}, four}, {"a", Dtype::kF32, {1}, four}}, {})
                      .status()
                      .message()),
      HasSubstr("tensor \"a\": duplicate name"));
  EXPECT_FALSE(BuildSafetensorsHeader({{"__metadata__", Dtype::kF32, {1}, four}}, {}).ok());
  EXPECT_FALSE(BuildSafetensorsHeader({{"", Dtype::kF32, {1}, four}}, {}).ok());
  EXPECT_FALSE(BuildSafetensorsHeader({{"\xFF", Dtype::kF32, {1}, four}}, {}).ok());
  EXPECT_THAT(std::string(BuildSafetensorsHeader({{"n", Dtype::kF32, {-1}, four}}, {}).status().message()),
              HasSubstr("invalid shape [-1]"));
}

TEST(SafetensorsTest, TypedReadsSayWhatWasExpectedAndFound) {
  const std::string path = TestPath("m.safetensors");
  const std::string file = ValidFile();
  WriteRaw(path, file);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  std::vector<bf16_t> w(6);
  ASSERT_TRUE((*f)->ReadBf16("alpha", {2, 3}, w.data()).ok());
  EXPECT_EQ(w[1].bits,
            static_cast<uint16_t>(Pattern(12, 1)[2] | (Pattern(12, 1)[3] << 8)));  // Little-endian.
  std::vector<float> x(4);
  ASSERT_TRUE((*f)->ReadF32("beta", {4}, x.data()).ok());

  absl::Status s = (*f)->ReadBf16("alpha", {3, 2}, w.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tensor \"alpha\": expected BF16 [3, 2], found BF16 [2, 3]"));
  s = (*f)->ReadBf16("beta", {4}, w.data());
  EXPECT_THAT(std::string(s.message()), HasSubstr("tensor \"beta\": expected BF16 [4], found F32 [4]"));
  s = (*f)->ReadF32("gamma", {4}, x.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(absl::StrCat(path, ": no tensor \"gamma\"")));
}

TEST(SafetensorsTest, MissingFileAndDirectory) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(TestPath("absent"));
  EXPECT_EQ(f.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(f.status().message()), HasSubstr(TestPath("absent")));
  f = SafetensorsFile::Open(::testing::TempDir());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("not a regular file"));
}

// ---- Bad input: each case its own test. ----

TEST(SafetensorsBadInputTest, EmptyFile) {
  EXPECT_THAT(OpenError(TestPath("x"), ""), HasSubstr("truncated: the file has 0 bytes"));
}

TEST(SafetensorsBadInputTest, TruncatedInsideTheSizeField) {
  EXPECT_THAT(OpenError(TestPath("x"), ValidFile().substr(0, 5)),
              HasSubstr("truncated: the file has 5 bytes"));
}

TEST(SafetensorsBadInputTest, TruncatedInsideTheHeader) {
  const std::string file = ValidFile();
  uint64_t n = static_cast<uint8_t>(file[0]) | (static_cast<uint8_t>(file[1]) << 8);
  EXPECT_THAT(OpenError(TestPath("x"), file.substr(0, 20)),
              HasSubstr(absl::StrCat("header size ", n, " beyond the file of 20 bytes")));
}

TEST(SafetensorsBadInputTest, TruncatedInsideTheData) {
  const std::string file = ValidFile();
  // "beta" is laid out last, so losing the last byte makes its range run past the end.
  const std::string error = OpenError(TestPath("x"), file.substr(0, file.size() - 1));
  EXPECT_THAT(error,
              HasSubstr("tensor \"beta\": data_offsets [12, 28]: end is beyond the data section of 27"));
}

TEST(SafetensorsBadInputTest, HeaderSizeBeyondTheFile) {
  std::string file = ValidFile();
  file.replace(0, 8, Le64(1000));
  EXPECT_THAT(OpenError(TestPath("x"), file),
              HasSubstr(absl::StrCat("header size 1000 beyond the file of ", file.size(), " bytes")));
}

TEST(SafetensorsBadInputTest, HeaderSizeOverTheLimit) {
  std::string file = ValidFile();
  file.replace(0, 8, Le64(~uint64_t{0}));  // Must not overflow 8 + N.
  EXPECT_THAT(OpenError(TestPath("x"), file),
              HasSubstr("header size 18446744073709551615 exceeds the limit"));
}

TEST(SafetensorsBadInputTest, CorruptJsonTruncatedObject) {
  const std::string error = OpenError(TestPath("x"), RawFile(R"({"a":{"dtype":"BF16")", 0));
  EXPECT_THAT(error, HasSubstr("header: JSON error at byte 28: unexpected end of input inside an object"));
}

TEST(SafetensorsBadInputTest, CorruptJsonTrailingComma) {
  const std::string error =
      OpenError(TestPath("x"), RawFile(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},})", 1));
  EXPECT_THAT(error, HasSubstr("JSON error at byte 61: expected a string key, found '}'"));
}

TEST(SafetensorsBadInputTest, CorruptJsonNulPadding) {
  // Some broken writers pad with NUL instead of spaces.
  const std::string json = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})";
  const std::string error = OpenError(TestPath("x"), RawFile(json + std::string(3, '\0'), 1));
  EXPECT_THAT(error, HasSubstr("unexpected byte 0x00 after the top-level value"));
}

TEST(SafetensorsBadInputTest, CorruptJsonFlippedByte) {
  std::string file = ValidFile();
  const size_t colon = file.find("\"shape\":") + 7;
  file[colon] = ';';
  EXPECT_THAT(OpenError(TestPath("x"), file),
              HasSubstr(absl::StrCat("JSON error at byte ", colon, ": expected ':' after an object key")));
}

TEST(SafetensorsBadInputTest, CorruptJsonFractionalShape) {
  EXPECT_THAT(
      OpenError(TestPath("x"), RawFile(R"({"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}})", 1)),
      HasSubstr("only integers are supported"));
}

TEST(SafetensorsBadInputTest, CorruptJsonBadEscapeInName) {
  EXPECT_THAT(
      OpenError(TestPath("x"), RawFile(R"({"a\q":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1)),
      HasSubstr("invalid escape"));
}

TEST(SafetensorsBadInputTest, HeaderNotAnObject) {
  EXPECT_THAT(OpenError(TestPath("x"), RawFile("[1, 2]", 0)),
              HasSubstr("header must be a JSON object, found array"));
}

TEST(SafetensorsBadInputTest, OffsetsEndBeyondTheData) {
  const std::string error =
      OpenError(TestPath("x"), RawFile(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 12));
  EXPECT_THAT(error,
              HasSubstr("tensor \"w\": data_offsets [0, 16]: end is beyond the data section of 12 bytes"));
}

TEST(SafetensorsBadInputTest, OffsetsBeginAfterEnd) {
  EXPECT_THAT(
      OpenError(TestPath("x"), RawFile(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[8,4]}})", 12)),
      HasSubstr("tensor \"w\": data_offsets [8, 4]: begin is after end"));
}

TEST(SafetensorsBadInputTest, OffsetsNegativeOrMalformed) {
  EXPECT_THAT(
      OpenError(TestPath("a"), RawFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", 1)),
      HasSubstr("tensor \"w\": data_offsets[0] is -1, expected a non-negative integer"));
  EXPECT_THAT(
      OpenError(TestPath("b"), RawFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})", 2)),
      HasSubstr("tensor \"w\": data_offsets must be an array [begin, end], found an array of 3"));
  EXPECT_THAT(
      OpenError(TestPath("c"), RawFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":"0,1"}})", 1)),
      HasSubstr("found string"));
}

TEST(SafetensorsBadInputTest, OverlappingRanges) {
  const std::string error =
      OpenError(TestPath("x"), RawFile(R"({"first":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                       R"("second":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                       12));
  EXPECT_THAT(error, HasSubstr("tensors \"first\" [0, 8) and \"second\" [4, 12) overlap"));
}

TEST(SafetensorsBadInputTest, RangeInsideAnother) {
  // "inner" lies wholly inside "outer" (a shared blob referenced twice, which safetensors forbids).
  const std::string error =
      OpenError(TestPath("x"), RawFile(R"({"outer":{"dtype":"U8","shape":[16],"data_offsets":[0,16]},)"
                                       R"("inner":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
                                       16));
  EXPECT_THAT(error, HasSubstr("tensors \"outer\" [0, 16) and \"inner\" [4, 6) overlap"));
}

TEST(SafetensorsBadInputTest, EmptyTensorsAndGapsAreFine) {
  const std::string path = TestPath("x");
  WriteRaw(path, RawFile(R"({"a":{"dtype":"U8","shape":[0],"data_offsets":[4,4]},)"
                         R"("b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]},)"
                         R"("c":{"dtype":"U8","shape":[2],"data_offsets":[8,10]}})",
                         10));
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  EXPECT_TRUE(f.ok()) << f.status();
}

TEST(SafetensorsBadInputTest, ByteRangeInconsistentWithDtypeAndShape) {
  EXPECT_THAT(
      OpenError(TestPath("x"), RawFile(R"({"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,10]}})", 10)),
      HasSubstr("tensor \"w\": data_offsets [0, 10] hold 10 bytes, but BF16 [2, 3] needs 12"));
}

TEST(SafetensorsBadInputTest, ShapeProductOverflows) {
  EXPECT_THAT(
      OpenError(TestPath("x"),
                RawFile(R"({"w":{"dtype":"I64","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", 0)),
      HasSubstr("tensor \"w\": shape [4611686018427387904, 4] of I64 has more bytes than fit in 64 bits"));
  // The element count fits but the byte count does not.
  EXPECT_THAT(
      OpenError(TestPath("y"),
                RawFile(R"({"w":{"dtype":"I64","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0)),
      HasSubstr("has more bytes than fit in 64 bits"));
}

TEST(SafetensorsBadInputTest, NegativeDimension) {
  EXPECT_THAT(
      OpenError(TestPath("x"), RawFile(R"({"w":{"dtype":"U8","shape":[2,-3],"data_offsets":[0,0]}})", 0)),
      HasSubstr("tensor \"w\": shape[1] is -3, expected a non-negative integer"));
}

TEST(SafetensorsBadInputTest, UnsupportedDtype) {
  const std::string error = OpenError(
      TestPath("x"), RawFile(R"({"w.weight":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8));
  EXPECT_THAT(error, HasSubstr("tensor \"w.weight\": unsupported dtype \"F64\" (supported: BF16, F16, F32, "
                               "F8_E4M3, I8, U8, I32, I64, F8_E8M0)"));
  EXPECT_THAT(OpenError(TestPath("y"), RawFile(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,8]}})", 8)),
              HasSubstr("tensor \"w\": dtype must be a string, found integer"));
}

TEST(SafetensorsBadInputTest, DuplicateTensorKey) {
  const std::string error =
      OpenError(TestPath("x"), RawFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                                       R"("w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                                       2));
  EXPECT_THAT(error, HasSubstr("duplicate key \"w\""));
}

TEST(SafetensorsBadInputTest, DuplicateFieldInsideATensor) {
  EXPECT_THAT(OpenError(TestPath("x"),
                        RawFile(R"({"w":{"dtype":"U8","dtype":"F32","shape":[1],"data_offsets":[0,1]}})", 1)),
              HasSubstr("duplicate key \"dtype\""));
}

TEST(SafetensorsBadInputTest, MissingOrUnknownTensorFields) {
  EXPECT_THAT(OpenError(TestPath("a"), RawFile(R"({"w":{"dtype":"U8","data_offsets":[0,1]}})", 1)),
              HasSubstr("tensor \"w\": missing \"shape\""));
  EXPECT_THAT(OpenError(TestPath("b"),
                        RawFile(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"extra":1}})", 1)),
              HasSubstr("tensor \"w\": unexpected key \"extra\""));
  EXPECT_THAT(OpenError(TestPath("c"), RawFile(R"({"w":[1]})", 1)),
              HasSubstr("tensor \"w\": entry must be an object, found array"));
}

TEST(SafetensorsBadInputTest, MetadataMustBeStrings) {
  EXPECT_THAT(OpenError(TestPath("a"), RawFile(R"({"__metadata__":{"format":1}})", 0)),
              HasSubstr("__metadata__ \"format\" must be a string, found integer"));
  EXPECT_THAT(OpenError(TestPath("b"), RawFile(R"({"__metadata__":"pt"})", 0)),
              HasSubstr("__metadata__ must be an object of strings, found string"));
}

TEST(SafetensorsBadInputTest, InMemoryParserUsesTheGivenOrigin) {
  absl::StatusOr<SafetensorsHeader> h = ParseSafetensorsHeader("\x02\0\0\0\0\0\0\0{}", "mem://x");
  EXPECT_FALSE(h.ok());
  h = ParseSafetensorsHeader(absl::string_view("\x02\0\0\0\0\0\0\0{}", 10), "mem://x");
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_TRUE(h->tensors.empty());
  EXPECT_EQ(h->data_offset, 10u);
  EXPECT_EQ(h->data_size, 0u);
  h = ParseSafetensorsHeader(absl::string_view("\x02\0\0\0\0\0\0\0[]", 10), "mem://x");
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("mem://x: header must be a JSON object"));
}

}  // namespace
}  // namespace kt
