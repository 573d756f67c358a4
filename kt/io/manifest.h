// kt's converted-weights folder (what `kt convert` writes, docs/FORMATS.md "Converted folders"):
//
//   OUT_DIR/config.json                    copy of the source's config.json (architecture, for reference)
//   OUT_DIR/layer_LLLL.safetensors         one file per MoE layer L (zero-padded to 4 digits)
//   OUT_DIR/layer_LLLL.safetensors.done    the layer's manifest entry, written after the file (resume)
//   OUT_DIR/kt_manifest.json               written last: a folder without it is an unfinished conversion
//
// The manifest (JSON, integers and strings only):
//   {"format": "kt-converted-v1", "method": "AMXINT8", "layout": "kt-int8-channel-v1", "group_size": 0,
//    "architecture": "Qwen3MoeForCausalLM", "model_type": "qwen3_moe", "num_layers": 48,
//    "num_experts": 128, "top_k": 8, "hidden": 2048, "intermediate": 768,
//    "checksum": "crc32c-chunk64MiB",
//    "layers": [{"layer": 0, "file": "layer_0000.safetensors", "bytes": 123,
//                "shapes": {"gate": [768, 2048], "up": [768, 2048], "down": [2048, 768]},
//                "crc32c": ["89abcdef", ...]}, ...]}
//
// Layer files hold, for expert e in [0, E) and p in {gate, up, down} (N x K = I x H, I x H, H x I):
//   bf16 layout:      experts.e.p.weight  BF16 [N, K]
//   quantized layout: experts.e.p.qdata   U8   [N, QuantizedRowBytes(K)]
//                     experts.e.p.scales  F32  [N, ScalesPerRow(K)]
//                     experts.e.p.zeros   U8   [N, ScalesPerRow(K)]   (asym layouts only)
// and __metadata__ {"kt_format": "kt-converted-v1", "layout": <tag>, "layer": "<L>"}.
#ifndef KT_IO_MANIFEST_H_
#define KT_IO_MANIFEST_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kt/io/json.h"

namespace kt {

inline constexpr char kConvertedFormat[] = "kt-converted-v1";
inline constexpr char kManifestName[] = "kt_manifest.json";
inline constexpr char kDoneSuffix[] = ".done";

// "layer_0007.safetensors".
std::string LayerFileName(int layer);
// "experts.3.gate.weight" etc.; part is "weight", "qdata", "scales" or "zeros".
std::string ConvertedTensorName(int expert, absl::string_view proj, absl::string_view part);

struct ManifestLayer {
  int layer = 0;
  std::string file;
  uint64_t bytes = 0;
  // [N, K] of gate, up, down.
  int64_t shapes[3][2] = {{0, 0}, {0, 0}, {0, 0}};
  std::vector<uint32_t> crc32c;  // One per kChecksumChunkBytes chunk (checksum.h).
};

struct Manifest {
  std::string method;
  std::string layout;
  int group_size = 0;
  std::string architecture;
  std::string model_type;
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 0;
  int hidden = 0;
  int intermediate = 0;
  std::vector<ManifestLayer> layers;  // Ascending layer.

  // The entry of `layer`, or nullptr.
  const ManifestLayer* Find(int layer) const;
};

// JSON text (pretty enough for a human: one layer per line).
std::string ManifestToJson(const Manifest& m);
std::string ManifestLayerToJson(const ManifestLayer& l);

// Strict parse: every key above present with its type, no unknown keys, format and checksum names known,
// shapes positive, file names plain ("layer_*.safetensors", no '/'). `origin` starts every error.
absl::StatusOr<Manifest> ParseManifest(absl::string_view text, absl::string_view origin);
absl::StatusOr<ManifestLayer> ParseManifestLayer(absl::string_view text, absl::string_view origin);
// The same from an already parsed JSON value; `where` names it in errors ("layer entry").
absl::StatusOr<ManifestLayer> ManifestLayerFromJson(const json::Value& value, absl::string_view where,
                                                    absl::string_view origin);

// Reads <dir>/kt_manifest.json.
absl::StatusOr<Manifest> ReadManifest(const std::string& dir);

}  // namespace kt

#endif  // KT_IO_MANIFEST_H_
