#include "kt/io/checkpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "kt/io/json.h"

namespace kt {

namespace {

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// Reads a whole (small) file. The index of a 600B-parameter model is a few MB.
absl::StatusOr<std::string> ReadFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  std::string out;
  char buf[1 << 16];
  while (true) {
    const ssize_t r = ::read(fd, buf, sizeof(buf));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      return absl::UnavailableError(absl::StrCat(path, ": read failed: ", std::strerror(err)));
    }
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
    if (out.size() > kMaxHeaderBytes) {
      ::close(fd);
      return absl::InvalidArgumentError(absl::StrCat(path, ": larger than ", kMaxHeaderBytes, " bytes"));
    }
  }
  ::close(fd);
  return out;
}

// Shard names come from a file we did not write: keep them inside the checkpoint folder.
bool IsSafeRelativePath(absl::string_view p) {
  if (p.empty() || p[0] == '/') return false;
  for (absl::string_view part : absl::StrSplit(p, '/')) {
    if (part.empty() || part == "." || part == "..") return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir) {
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  ckpt->dir_ = dir;
  const std::string single = absl::StrCat(dir, "/", kSafetensorsSingleName);
  const std::string index = absl::StrCat(dir, "/", kSafetensorsIndexName);

  // Shard file name -> the tensors the index says it holds (empty for a single file: no index to check).
  std::map<std::string, std::vector<std::string>> listed;
  if (IsRegularFile(single)) {
    listed[kSafetensorsSingleName];
  } else if (IsRegularFile(index)) {
    ckpt->index_path_ = index;
    absl::StatusOr<std::string> text = ReadFile(index);
    if (!text.ok()) return text.status();
    absl::StatusOr<json::Value> root = json::Parse(*text);
    if (!root.ok()) return absl::InvalidArgumentError(absl::StrCat(index, ": ", root.status().message()));
    const json::Value* map = root->Find("weight_map");
    if (map == nullptr || !map->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(index, ": expected an object with a \"weight_map\" object"));
    }
    for (const auto& kv : map->members()) {
      if (!kv.second.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index, ": weight_map ", json::Quote(kv.first),
                                                       " must be a shard file name, found ",
                                                       json::TypeName(kv.second.type())));
      }
      const std::string& shard = kv.second.as_string();
      if (!IsSafeRelativePath(shard)) {
        return absl::InvalidArgumentError(
            absl::StrCat(index, ": weight_map ", json::Quote(kv.first), ": shard ", json::Quote(shard),
                         " is not a relative path inside the checkpoint folder"));
      }
      listed[shard].push_back(kv.first);
    }
    if (listed.empty()) return absl::InvalidArgumentError(absl::StrCat(index, ": weight_map is empty"));
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no checkpoint: neither ", kSafetensorsSingleName, " nor ",
                                            kSafetensorsIndexName, " is there"));
  }

  // Open every shard first, so that a tensor in two shards is reported as a duplicate naming both files
  // whichever shard comes first, before the index is compared with the shards.
  std::vector<const std::vector<std::string>*> listed_names;
  for (const auto& shard_and_names : listed) {
    const std::string path = absl::StrCat(dir, "/", shard_and_names.first);
    if (!ckpt->index_path_.empty() && !IsRegularFile(path)) {
      return absl::NotFoundError(
          absl::StrCat(ckpt->index_path_, ": shard ", json::Quote(shard_and_names.first), " (holding e.g. ",
                       json::Quote(shard_and_names.second.front()), ") does not exist: ", path));
    }
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(path);
    if (!file.ok()) return file.status();
    ckpt->shards_.push_back(*std::move(file));
    listed_names.push_back(&shard_and_names.second);
  }

  for (size_t s = 0; s < ckpt->shards_.size(); ++s) {
    for (const TensorInfo& t : ckpt->shards_[s]->tensors()) ckpt->entries_.push_back(Entry{t.name, s, &t});
  }
  std::sort(ckpt->entries_.begin(), ckpt->entries_.end(),
            [](const Entry& a, const Entry& b) { return a.name < b.name; });
  for (size_t i = 1; i < ckpt->entries_.size(); ++i) {
    const Entry& a = ckpt->entries_[i - 1];
    const Entry& b = ckpt->entries_[i];
    if (a.name == b.name) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor ", json::Quote(a.name), ": in both ",
                                                     ckpt->shards_[a.shard]->path(), " and ",
                                                     ckpt->shards_[b.shard]->path()));
    }
  }

  if (ckpt->index_path_.empty()) return ckpt;
  // First what the index lists but a shard lacks (this also explains a tensor listed in the wrong shard),
  // then what a shard holds but the index does not list.
  for (size_t s = 0; s < ckpt->shards_.size(); ++s) {
    const SafetensorsFile& file = *ckpt->shards_[s];
    for (const std::string& name : *listed_names[s]) {
      if (file.Find(name) == nullptr) {
        const Located elsewhere = ckpt->Find(name);
        return absl::NotFoundError(absl::StrCat(
            ckpt->index_path_, " lists tensor ", json::Quote(name), " in ", file.path(),
            ", but that shard has no such tensor",
            elsewhere.file != nullptr ? absl::StrCat(" (it is in ", elsewhere.file->path(), ")") : ""));
      }
    }
  }
  for (size_t s = 0; s < ckpt->shards_.size(); ++s) {
    const SafetensorsFile& file = *ckpt->shards_[s];
    const std::vector<std::string>& names = *listed_names[s];  // Sorted: weight_map members are.
    for (const TensorInfo& t : file.tensors()) {
      if (!std::binary_search(names.begin(), names.end(), t.name)) {
        return absl::InvalidArgumentError(absl::StrCat(file.path(), ": tensor ", json::Quote(t.name),
                                                       " is not listed in ", ckpt->index_path_));
      }
    }
  }
  return ckpt;
}

Checkpoint::Located Checkpoint::Find(absl::string_view name) const {
  auto it = std::lower_bound(entries_.begin(), entries_.end(), name, [](const Entry& e, absl::string_view n) {
    return absl::string_view(e.name) < n;
  });
  if (it == entries_.end() || it->name != name) return Located{};
  return Located{shards_[it->shard].get(), it->info};
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const Entry& e : entries_) names.push_back(e.name);
  return names;
}

absl::StatusOr<Checkpoint::Located> Checkpoint::Expect(absl::string_view name, Dtype dtype,
                                                       absl::Span<const int64_t> shape) const {
  Located loc = Find(name);
  if (loc.file == nullptr) {
    return absl::NotFoundError(absl::StrCat(dir_, ": no tensor ", json::Quote(name), " in the checkpoint (",
                                            entries_.size(), " tensors in ", shards_.size(), " files)"));
  }
  absl::StatusOr<const TensorInfo*> info = loc.file->Expect(name, dtype, shape);
  if (!info.ok()) return info.status();
  return loc;
}

absl::Status Checkpoint::Read(absl::string_view name, Dtype dtype, absl::Span<const int64_t> shape,
                              void* out) const {
  absl::StatusOr<Located> loc = Expect(name, dtype, shape);
  if (!loc.ok()) return loc.status();
  return loc->file->Read(name, dtype, shape, out);
}

}  // namespace kt
