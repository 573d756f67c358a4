#include "kt/io/checkpoint.h"

#include <sys/stat.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kt/io/safetensors.h"

namespace kt {
namespace {

using ::testing::HasSubstr;

// A fresh folder per test.
std::string TestDir() {
  const std::string dir =
      absl::StrCat(::testing::TempDir(), ::testing::UnitTest::GetInstance()->current_test_info()->name());
  ::mkdir(dir.c_str(), 0755);
  return dir;
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  ASSERT_TRUE(f.good()) << path;
}

// Writes a shard holding one F32 [2] tensor per name, with values {k, k + 0.5} for the k-th name.
void WriteShard(const std::string& path, const std::vector<std::string>& names) {
  std::vector<std::vector<float>> values;
  values.reserve(names.size());
  std::vector<TensorToWrite> tensors;
  for (size_t k = 0; k < names.size(); ++k) {
    values.push_back({static_cast<float>(k), static_cast<float>(k) + 0.5f});
    tensors.push_back({names[k],
                       Dtype::kF32,
                       {2},
                       absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(values.back().data()), 8)});
  }
  absl::Status s = WriteSafetensors(path, tensors);
  ASSERT_TRUE(s.ok()) << s;
}

std::string OpenError(const std::string& dir) {
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir);
  EXPECT_FALSE(c.ok());
  return c.ok() ? "" : std::string(c.status().message());
}

constexpr char kShard1[] = "model-00001-of-00002.safetensors";
constexpr char kShard2[] = "model-00002-of-00002.safetensors";

// The usual layout: two shards, index listing every tensor.
void WriteSharded(const std::string& dir) {
  WriteShard(absl::StrCat(dir, "/", kShard1), {"a.weight", "b.weight"});
  WriteShard(absl::StrCat(dir, "/", kShard2), {"c.weight"});
  WriteText(absl::StrCat(dir, "/model.safetensors.index.json"),
            absl::StrCat(R"({"metadata": {"total_size": 24}, "weight_map": {)", R"("a.weight": ")", kShard1,
                         R"(", "b.weight": ")", kShard1, R"(", "c.weight": ")", kShard2, R"("}})"));
}

TEST(CheckpointTest, ShardedFindsTensorsAcrossShards) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->shards().size(), 2u);
  EXPECT_EQ((*c)->index_path(), dir + "/model.safetensors.index.json");
  EXPECT_EQ((*c)->Names(), (std::vector<std::string>{"a.weight", "b.weight", "c.weight"}));
  Checkpoint::Located loc = (*c)->Find("c.weight");
  ASSERT_NE(loc.file, nullptr);
  EXPECT_EQ(loc.file->path(), absl::StrCat(dir, "/", kShard2));
  EXPECT_EQ(loc.info->name, "c.weight");
  EXPECT_EQ((*c)->Find("d.weight").file, nullptr);
  std::vector<float> v(2);
  ASSERT_TRUE((*c)->ReadF32("b.weight", {2}, v.data()).ok());
  EXPECT_EQ(v, (std::vector<float>{1.0f, 1.5f}));
  ASSERT_TRUE((*c)->ReadF32("c.weight", {2}, v.data()).ok());
  EXPECT_EQ(v, (std::vector<float>{0.0f, 0.5f}));
  absl::Status s = (*c)->ReadF32("d.weight", {2}, v.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(absl::StrCat(dir, ": no tensor \"d.weight\"")));
  s = (*c)->ReadF32("c.weight", {3}, v.data());
  EXPECT_THAT(std::string(s.message()),
              HasSubstr(absl::StrCat(kShard2, ": tensor \"c.weight\": expected F32 [3]")));
}

TEST(CheckpointTest, SingleFile) {
  const std::string dir = TestDir();
  WriteShard(dir + "/model.safetensors", {"x", "y"});
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE((*c)->index_path().empty());
  EXPECT_EQ((*c)->Names(), (std::vector<std::string>{"x", "y"}));
}

TEST(CheckpointTest, SingleFileTakesPrecedenceOverAnIndex) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  WriteShard(dir + "/model.safetensors", {"only"});
  absl::StatusOr<std::unique_ptr<Checkpoint>> c = Checkpoint::Open(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->Names(), std::vector<std::string>{"only"});
}

TEST(CheckpointTest, NoCheckpointInTheFolder) {
  const std::string dir = TestDir();
  EXPECT_THAT(OpenError(dir), HasSubstr(absl::StrCat(dir,
                                                     ": no checkpoint: neither model.safetensors nor "
                                                     "model.safetensors.index.json")));
}

TEST(CheckpointTest, MissingShard) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  ASSERT_EQ(::unlink(absl::StrCat(dir, "/", kShard2).c_str()), 0);
  const std::string error = OpenError(dir);
  EXPECT_THAT(error, HasSubstr("model.safetensors.index.json: shard \"model-00002-of-00002.safetensors\""));
  EXPECT_THAT(error, HasSubstr("\"c.weight\""));
  EXPECT_THAT(error, HasSubstr("does not exist"));
}

TEST(CheckpointTest, TensorListedInAShardThatLacksIt) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  WriteShard(absl::StrCat(dir, "/", kShard2), {"other.weight"});  // c.weight is gone.
  WriteText(absl::StrCat(dir, "/model.safetensors.index.json"),
            absl::StrCat(R"({"weight_map": {"a.weight": ")", kShard1, R"(", "b.weight": ")", kShard1,
                         R"(", "c.weight": ")", kShard2, R"(", "other.weight": ")", kShard2, R"("}})"));
  const std::string error = OpenError(dir);
  EXPECT_THAT(error, HasSubstr(absl::StrCat("model.safetensors.index.json lists tensor \"c.weight\" in ", dir,
                                            "/", kShard2, ", but that shard has no such tensor")));
}

TEST(CheckpointTest, TensorListedInTheWrongShard) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  WriteText(absl::StrCat(dir, "/model.safetensors.index.json"),
            absl::StrCat(R"({"weight_map": {"a.weight": ")", kShard1, R"(", "b.weight": ")", kShard2,
                         R"(", "c.weight": ")", kShard2, R"("}})"));
  const std::string error = OpenError(dir);
  EXPECT_THAT(error, HasSubstr("lists tensor \"b.weight\" in"));
  EXPECT_THAT(error, HasSubstr(absl::StrCat("(it is in ", dir, "/", kShard1, ")")));
}

TEST(CheckpointTest, TensorNotListedInTheIndex) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  WriteShard(absl::StrCat(dir, "/", kShard2), {"c.weight", "stray.weight"});
  EXPECT_THAT(OpenError(dir),
              HasSubstr(absl::StrCat(kShard2, ": tensor \"stray.weight\" is not listed in ")));
}

TEST(CheckpointTest, DuplicateTensorAcrossShardsNamesBothFiles) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  WriteShard(absl::StrCat(dir, "/", kShard2), {"a.weight", "c.weight"});
  const std::string error = OpenError(dir);
  EXPECT_THAT(error, HasSubstr(absl::StrCat("duplicate tensor \"a.weight\": in both ", dir, "/", kShard1,
                                            " and ", dir, "/", kShard2)));
}

TEST(CheckpointTest, CorruptShardNamesTheShard) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  WriteText(absl::StrCat(dir, "/", kShard1), std::string("\x06\0\0\0\0\0\0\0{\"a\": ", 14));
  EXPECT_THAT(OpenError(dir),
              HasSubstr(absl::StrCat(dir, "/", kShard1, ": header: JSON error at byte 14: unexpected end")));
}

TEST(CheckpointTest, BadIndexFiles) {
  const std::string dir = TestDir();
  WriteSharded(dir);
  const std::string index = dir + "/model.safetensors.index.json";
  WriteText(index, R"({"weight_map": {"a.weight": "x.safetensors",}})");
  EXPECT_THAT(OpenError(dir),
              HasSubstr(absl::StrCat(index, ": JSON error at byte 44: expected a string key")));
  WriteText(index, R"({"weight_map": {"a.weight": "x", "a.weight": "y"}})");
  EXPECT_THAT(OpenError(dir), HasSubstr("duplicate key \"a.weight\""));
  WriteText(index, R"({"metadata": {}})");
  EXPECT_THAT(OpenError(dir),
              HasSubstr(absl::StrCat(index, ": expected an object with a \"weight_map\" object")));
  WriteText(index, R"({"weight_map": {}})");
  EXPECT_THAT(OpenError(dir), HasSubstr("weight_map is empty"));
  WriteText(index, R"({"weight_map": {"a.weight": 1}})");
  EXPECT_THAT(OpenError(dir), HasSubstr("weight_map \"a.weight\" must be a shard file name, found integer"));
  WriteText(index, R"({"weight_map": {"a.weight": "../elsewhere.safetensors"}})");
  EXPECT_THAT(OpenError(dir), HasSubstr("is not a relative path inside the checkpoint folder"));
  WriteText(index, R"({"weight_map": {"a.weight": "/etc/passwd"}})");
  EXPECT_THAT(OpenError(dir), HasSubstr("is not a relative path inside the checkpoint folder"));
}

}  // namespace
}  // namespace kt
