#include "kt/io/manifest.h"

#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kt/io/checksum.h"
#include "kt/io/file_util.h"
#include "kt/io/json.h"

namespace kt {
namespace {

constexpr const char* kProjNames[3] = {"gate", "up", "down"};

absl::Status Bad(absl::string_view origin, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(origin, ": ", what));
}

// Checks that `obj` has exactly the keys in `keys` (a missing or unknown key is an error naming it).
absl::Status ExactKeys(const json::Value& obj, const std::vector<std::string>& keys, absl::string_view where,
                       absl::string_view origin) {
  if (!obj.is_object()) return Bad(origin, absl::StrCat(where, " must be an object"));
  const std::set<std::string> want(keys.begin(), keys.end());
  for (const auto& kv : obj.members()) {
    if (want.count(kv.first) == 0) {
      return Bad(origin, absl::StrCat(where, " has an unknown key ", json::Quote(kv.first), " (expected ",
                                      absl::StrJoin(keys, ", "), ")"));
    }
  }
  for (const std::string& k : keys) {
    if (obj.Find(k) == nullptr) return Bad(origin, absl::StrCat(where, " has no ", json::Quote(k)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> GetString(const json::Value& obj, absl::string_view key, absl::string_view where,
                                      absl::string_view origin) {
  const json::Value* v = obj.Find(key);
  if (v == nullptr || !v->is_string()) {
    return Bad(origin, absl::StrCat(where, ".", key, " must be a string"));
  }
  return v->as_string();
}

absl::StatusOr<int64_t> GetInt(const json::Value& obj, absl::string_view key, int64_t lo, int64_t hi,
                               absl::string_view where, absl::string_view origin) {
  const json::Value* v = obj.Find(key);
  if (v == nullptr || !v->is_int()) return Bad(origin, absl::StrCat(where, ".", key, " must be an integer"));
  if (v->as_int() < lo || v->as_int() > hi) {
    return Bad(origin, absl::StrCat(where, ".", key, " = ", v->as_int(), " is not in [", lo, ", ", hi, "]"));
  }
  return v->as_int();
}

absl::StatusOr<ManifestLayer> LayerFromJson(const json::Value& v, absl::string_view where,
                                            absl::string_view origin) {
  if (absl::Status s = ExactKeys(v, {"layer", "file", "bytes", "shapes", "crc32c"}, where, origin); !s.ok())
    return s;
  ManifestLayer l;
  absl::StatusOr<int64_t> layer = GetInt(v, "layer", 0, 1 << 20, where, origin);
  if (!layer.ok()) return layer.status();
  l.layer = static_cast<int>(*layer);
  absl::StatusOr<std::string> file = GetString(v, "file", where, origin);
  if (!file.ok()) return file.status();
  if (*file != LayerFileName(l.layer)) {
    return Bad(origin, absl::StrCat(where, ".file must be \"", LayerFileName(l.layer), "\", found ",
                                    json::Quote(*file)));
  }
  l.file = *file;
  absl::StatusOr<int64_t> bytes = GetInt(v, "bytes", 8, INT64_MAX, where, origin);
  if (!bytes.ok()) return bytes.status();
  l.bytes = static_cast<uint64_t>(*bytes);
  const json::Value& shapes = *v.Find("shapes");
  const std::string swhere = absl::StrCat(where, ".shapes");
  if (absl::Status s = ExactKeys(shapes, {"gate", "up", "down"}, swhere, origin); !s.ok()) return s;
  for (int p = 0; p < 3; ++p) {
    const json::Value& a = *shapes.Find(kProjNames[p]);
    if (!a.is_array() || a.elements().size() != 2 || !a.elements()[0].is_int() || !a.elements()[1].is_int() ||
        a.elements()[0].as_int() < 1 || a.elements()[1].as_int() < 1 ||
        a.elements()[0].as_int() > (1 << 24) || a.elements()[1].as_int() > (1 << 24)) {
      return Bad(origin, absl::StrCat(swhere, ".", kProjNames[p], " must be [N, K] with 1 <= N, K <= 2^24"));
    }
    l.shapes[p][0] = a.elements()[0].as_int();
    l.shapes[p][1] = a.elements()[1].as_int();
  }
  const json::Value& crcs = *v.Find("crc32c");
  if (!crcs.is_array() || crcs.elements().size() != NumChecksumChunks(l.bytes)) {
    return Bad(origin, absl::StrCat(where, ".crc32c must list ", NumChecksumChunks(l.bytes),
                                    " chunk checksums for ", l.bytes, " bytes"));
  }
  for (const json::Value& c : crcs.elements()) {
    if (!c.is_string()) return Bad(origin, absl::StrCat(where, ".crc32c entries must be strings"));
    absl::StatusOr<uint32_t> crc = ParseCrc32cHex(c.as_string());
    if (!crc.ok()) return Bad(origin, absl::StrCat(where, ".crc32c: ", crc.status().message()));
    l.crc32c.push_back(*crc);
  }
  return l;
}

}  // namespace

std::string LayerFileName(int layer) { return absl::StrFormat("layer_%04d.safetensors", layer); }

std::string ConvertedTensorName(int expert, absl::string_view proj, absl::string_view part) {
  return absl::StrCat("experts.", expert, ".", proj, ".", part);
}

const ManifestLayer* Manifest::Find(int layer) const {
  for (const ManifestLayer& l : layers) {
    if (l.layer == layer) return &l;
  }
  return nullptr;
}

std::string ManifestLayerToJson(const ManifestLayer& l) {
  std::vector<std::string> crcs;
  for (uint32_t c : l.crc32c) crcs.push_back(absl::StrCat("\"", Crc32cHex(c), "\""));
  std::string shapes;
  for (int p = 0; p < 3; ++p) {
    absl::StrAppend(&shapes, p ? ", " : "", "\"", kProjNames[p], "\": [", l.shapes[p][0], ", ", l.shapes[p][1],
                    "]");
  }
  return absl::StrCat("{\"layer\": ", l.layer, ", \"file\": ", json::Quote(l.file), ", \"bytes\": ", l.bytes,
                      ", \"shapes\": {", shapes, "}, \"crc32c\": [", absl::StrJoin(crcs, ", "), "]}");
}

std::string ManifestToJson(const Manifest& m) {
  std::string out = absl::StrCat(
      "{\n  \"format\": \"", kConvertedFormat, "\",\n  \"method\": ", json::Quote(m.method),
      ",\n  \"layout\": ", json::Quote(m.layout), ",\n  \"group_size\": ", m.group_size,
      ",\n  \"architecture\": ", json::Quote(m.architecture), ",\n  \"model_type\": ", json::Quote(m.model_type),
      ",\n  \"num_layers\": ", m.num_layers, ",\n  \"num_experts\": ", m.num_experts, ",\n  \"top_k\": ", m.top_k,
      ",\n  \"hidden\": ", m.hidden, ",\n  \"intermediate\": ", m.intermediate, ",\n  \"checksum\": \"",
      kChecksumAlgorithm, "\",\n  \"layers\": [");
  for (size_t i = 0; i < m.layers.size(); ++i) {
    absl::StrAppend(&out, i ? ",\n    " : "\n    ", ManifestLayerToJson(m.layers[i]));
  }
  absl::StrAppend(&out, "\n  ]\n}\n");
  return out;
}

absl::StatusOr<ManifestLayer> ManifestLayerFromJson(const json::Value& value, absl::string_view where,
                                                    absl::string_view origin) {
  return LayerFromJson(value, where, origin);
}

absl::StatusOr<ManifestLayer> ParseManifestLayer(absl::string_view text, absl::string_view origin) {
  absl::StatusOr<json::Value> root = json::Parse(text);
  if (!root.ok()) return Bad(origin, root.status().message());
  return LayerFromJson(*root, "layer entry", origin);
}

absl::StatusOr<Manifest> ParseManifest(absl::string_view text, absl::string_view origin) {
  absl::StatusOr<json::Value> root = json::Parse(text);
  if (!root.ok()) return Bad(origin, root.status().message());
  const json::Value& v = *root;
  if (absl::Status s = ExactKeys(v,
                                 {"format", "method", "layout", "group_size", "architecture", "model_type",
                                  "num_layers", "num_experts", "top_k", "hidden", "intermediate", "checksum",
                                  "layers"},
                                 "the manifest", origin);
      !s.ok())
    return s;
  absl::StatusOr<std::string> format = GetString(v, "format", "manifest", origin);
  if (!format.ok()) return format.status();
  if (*format != kConvertedFormat) {
    return Bad(origin, absl::StrCat("manifest.format is ", json::Quote(*format), ", this kt reads \"",
                                    kConvertedFormat, "\""));
  }
  absl::StatusOr<std::string> checksum = GetString(v, "checksum", "manifest", origin);
  if (!checksum.ok()) return checksum.status();
  if (*checksum != kChecksumAlgorithm) {
    return Bad(origin, absl::StrCat("manifest.checksum is ", json::Quote(*checksum), ", expected \"",
                                    kChecksumAlgorithm, "\""));
  }
  Manifest m;
  for (auto [key, dst] : {std::pair<const char*, std::string*>{"method", &m.method}, {"layout", &m.layout},
                          {"architecture", &m.architecture}, {"model_type", &m.model_type}}) {
    absl::StatusOr<std::string> s = GetString(v, key, "manifest", origin);
    if (!s.ok()) return s.status();
    *dst = *s;
  }
  for (auto [key, dst, lo] : {std::tuple<const char*, int*, int>{"group_size", &m.group_size, 0},
                              {"num_layers", &m.num_layers, 1}, {"num_experts", &m.num_experts, 1},
                              {"top_k", &m.top_k, 1}, {"hidden", &m.hidden, 1},
                              {"intermediate", &m.intermediate, 1}}) {
    absl::StatusOr<int64_t> i = GetInt(v, key, lo, 1 << 24, "manifest", origin);
    if (!i.ok()) return i.status();
    *dst = static_cast<int>(*i);
  }
  const json::Value& layers = *v.Find("layers");
  if (!layers.is_array()) return Bad(origin, "manifest.layers must be an array");
  for (size_t i = 0; i < layers.elements().size(); ++i) {
    absl::StatusOr<ManifestLayer> l = LayerFromJson(layers.elements()[i], absl::StrCat("layers[", i, "]"), origin);
    if (!l.ok()) return l.status();
    if (!m.layers.empty() && l->layer <= m.layers.back().layer) {
      return Bad(origin, absl::StrCat("layers[", i, "].layer = ", l->layer, " must be greater than the previous (",
                                      m.layers.back().layer, "): ascending, no duplicates"));
    }
    if (l->layer >= m.num_layers) {
      return Bad(origin, absl::StrCat("layers[", i, "].layer = ", l->layer, " is not below num_layers = ",
                                      m.num_layers));
    }
    m.layers.push_back(*std::move(l));
  }
  return m;
}

absl::StatusOr<Manifest> ReadManifest(const std::string& dir) {
  const std::string path = absl::StrCat(dir, "/", kManifestName);
  absl::StatusOr<MappedFile> file = MappedFile::Open(path);
  if (!file.ok()) return file.status();
  return ParseManifest(file->view(), path);
}

}  // namespace kt
