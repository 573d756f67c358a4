// A Hugging Face checkpoint folder: either one `model.safetensors` or shards listed by
// `model.safetensors.index.json` ({"metadata": {...}, "weight_map": {tensor name: shard file name}}).
//
// Opening validates the index against the shards: every shard named in weight_map exists and opens (with the
// full safetensors validation), every tensor the index lists is in the shard it names, no tensor is in two
// shards, and no shard holds a tensor the index does not list. The index and the shards must agree
// exactly because a disagreement means the folder was assembled from different saves, and which copy a
// loader picks would then be arbitrary.
#ifndef KT_IO_CHECKPOINT_H_
#define KT_IO_CHECKPOINT_H_

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kt/io/safetensors.h"

namespace kt {

inline constexpr char kSafetensorsIndexName[] = "model.safetensors.index.json";
inline constexpr char kSafetensorsSingleName[] = "model.safetensors";

class Checkpoint {
 public:
  // Opens `dir`. As transformers does, a single model.safetensors takes precedence over an index.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  // The index file's path, or "" for a single-file checkpoint.
  const std::string& index_path() const { return index_path_; }
  const std::vector<std::unique_ptr<SafetensorsFile>>& shards() const { return shards_; }

  struct Located {
    const SafetensorsFile* file = nullptr;
    const TensorInfo* info = nullptr;
  };
  // The tensor called `name` and the shard holding it; {nullptr, nullptr} when there is none. O(log n).
  Located Find(absl::string_view name) const;
  // All tensor names over all shards, sorted.
  std::vector<std::string> Names() const;

  // As SafetensorsFile::Expect/Read, over the shard that holds `name`; a missing tensor is a NotFound error
  // naming the checkpoint folder.
  absl::StatusOr<Located> Expect(absl::string_view name, Dtype dtype, absl::Span<const int64_t> shape) const;
  absl::Status Read(absl::string_view name, Dtype dtype, absl::Span<const int64_t> shape, void* out) const;
  absl::Status ReadBf16(absl::string_view name, absl::Span<const int64_t> shape, bf16_t* out) const {
    return Read(name, Dtype::kBf16, shape, out);
  }
  absl::Status ReadF32(absl::string_view name, absl::Span<const int64_t> shape, float* out) const {
    return Read(name, Dtype::kF32, shape, out);
  }
  absl::Status ReadF8E4M3(absl::string_view name, absl::Span<const int64_t> shape, uint8_t* out) const {
    return Read(name, Dtype::kF8E4M3, shape, out);
  }

 private:
  Checkpoint() = default;

  struct Entry {
    std::string name;
    size_t shard;
    const TensorInfo* info;
  };

  std::string dir_;
  std::string index_path_;
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::vector<Entry> entries_;  // Sorted by name.
};

}  // namespace kt

#endif  // KT_IO_CHECKPOINT_H_
