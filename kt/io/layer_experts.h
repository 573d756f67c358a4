// The routed experts of one MoE layer of a weight folder, validated at Open and then read one expert
// projection at a time (what `kt convert` and load_weights(weight_path) stream through).
//
// Two kinds of folder:
//   - a Hugging Face folder (config.json + model.safetensors or a sharded index), bf16 expert weights in any
//     layout arch.h knows (per-expert tensors, fused [E, 2I, H] or [E, H, 2I]), or FP8 per-expert weights
//     with 128 x 128 block scales (quantization_config.quant_method "fp8": F8_E4M3 `weight` + F32
//     `weight_scale_inv`, DeepSeek-V3/R1), read as kt-fp8-block128-v1 by ReadQuantized for method FP8, or
//     with per-channel scales (`weight_scale` [N] or [N, 1]: GLM-4.x FP8) for method FP8_PERCHANNEL (hf_fp8.h),
//     or MX-coded experts (E2M1 / E4M3 codes + E8M0 scales) for methods MXFP4 / MXFP8 (hf_mx.h), or
//     native int4 (compressed-tensors pack-quantized or GPTQ sym, hf_int4.h), read as
//     kt-int4-group{G}-sym-v1 by ReadQuantized when the method holds that layout with the checkpoint's G
//     (RAWINT4, GPTQ_INT4, AMXINT4_KGroup), else dequantized (q * scale rounded to bf16) by ReadBf16;
//   - a kt converted folder (kt_manifest.json, manifest.h), in the layout of one method;
//   - a GGUF checkpoint (kt convert only: OpenGguf): llama.cpp's expert-stacked tensors (gguf_experts.h) of
//     any type kGgufTypes lists, read by ReadBf16 dequantized (ggml's formula in fp32, rounded once to bf16).
// Open checks everything a later read relies on, so that a load never fails half-way: the config's MoE shape
// against the caller's, every expert tensor's presence, dtype and shape, the manifest's method layout
// against the caller's, and the layer file's size. Errors name the file, the tensor and the expected value.
// The checksums of a converted layer are checked by Verify (chunk by chunk, so callers run it in parallel).
#ifndef KT_IO_LAYER_EXPERTS_H_
#define KT_IO_LAYER_EXPERTS_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/io/arch.h"
#include "kt/io/checkpoint.h"
#include "kt/io/gguf_experts.h"
#include "kt/io/hf_fp8.h"
#include "kt/io/hf_int4.h"
#include "kt/io/manifest.h"
#include "kt/io/method.h"
#include "kt/io/safetensors.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"

namespace kt {

// The three matrices of an expert: gate and up are [I, H], down is [H, I] (row = output channel).
enum class ExpertMatrix : int { kGate = 0, kUp = 1, kDown = 2 };
const char* ExpertMatrixName(ExpertMatrix m);  // "gate", "up", "down"

// What the caller expects (a KTMoEWrapper's arguments): -1 in a shape field means "take the folder's".
struct LayerRequest {
  int layer = 0;
  int num_experts = -1;
  int hidden = -1;
  int intermediate = -1;
  MethodLayout method;  // A converted folder must hold method.tag; an HF folder is bf16 whatever the method.
  // `kt convert`: an HF folder whose experts are stored in a quantized format other than `method`'s (FP8 with
  // block or per-channel scales, MXFP4, MXFP8) is opened as stored and read by ReadBf16 dequantized (each
  // element times its scale, exact in fp32, rounded once to bf16), for `method` to quantize or keep as bf16.
  // load_weights leaves it false: a wrapper of another method refuses such a folder, naming its method.
  bool dequantize_stored = false;
};

// `arch` with the expert layout `ckpt` holds for MoE layer `layer`. arch.layout comes from the config alone,
// but the fused families' checkpoints exist in more than one layout: Qwen3.5-MoE ships gate_up_proj
// [E, 2I, H], which transformers re-saves per expert; Qwen3-VL-MoE ships [E, H, 2I] / down [E, I, H], which
// transformers re-saves as [E, 2I, H] / [E, H, I]. So the checkpoint decides: per expert when the fused
// tensor is absent and expert 0's gate_proj is there (Qwen3.5-MoE), else the order down_proj's shape shows
// (when H != I). Unchanged otherwise; a missing or misshapen tensor is then reported by name at Open.
MoeArch ResolveExpertLayout(const MoeArch& arch, const Checkpoint& ckpt, int layer);

class LayerExperts {
 public:
  // Opens `dir` (converted if it has kt_manifest.json, else HF through config.json).
  static absl::StatusOr<std::unique_ptr<LayerExperts>> Open(const std::string& dir, const LayerRequest& want);
  // An HF layer over an already opened checkpoint (kt convert opens the folder once for all layers).
  static absl::StatusOr<std::unique_ptr<LayerExperts>> OpenHf(std::shared_ptr<const Checkpoint> ckpt,
                                                              const MoeArch& arch, const std::string& config_path,
                                                              const LayerRequest& want);

  // Layer want.layer of a GGUF checkpoint whose shape `arch` gives (gguf_arch.h): blk.L.ffn_{gate,up,down}_exps
  // checked for presence, type (kGgufTypes; another is an error naming the tensor and listing them) and
  // ne = [K, N, E]; read by ReadBf16 as bf16(DequantizeGgufRow), one matrix at a time (kt convert).
  static absl::StatusOr<std::unique_ptr<LayerExperts>> OpenGguf(std::shared_ptr<const GgufCheckpoint> ckpt,
                                                                const MoeArch& arch, const LayerRequest& want);

  ~LayerExperts();

  bool converted() const { return converted_; }
  bool gguf() const { return gguf_ != nullptr; }
  int num_experts() const { return e_; }
  int hidden() const { return h_; }
  int intermediate() const { return i_; }
  // [N, K] of a matrix.
  size_t Rows(ExpertMatrix m) const { return m == ExpertMatrix::kDown ? h_ : i_; }
  size_t Cols(ExpertMatrix m) const { return m == ExpertMatrix::kDown ? i_ : h_; }
  // Whether ReadQuantized is the way to read (a converted quantized folder, or an HF FP8 folder); otherwise
  // ReadBf16.
  bool quantized() const {
    return !hf_dequantize_ && ((converted_ && layout_.quantized) || hf_fp8_ || hf_mx_ || hf_int4_exact_);
  }
  // The stored format a dequantize_stored folder is read from (its method's layout), else nullptr.
  const MethodLayout* dequantized_from() const { return hf_dequantize_ ? &stored_layout_ : nullptr; }
  // G of a native int4 checkpoint (0 for any other folder).
  int hf_int4_group() const { return hf_int4_.empty() ? 0 : hf_int4_group_; }
  // Bytes of expert weights this layer reads from its files (for throughput figures).
  uint64_t weight_bytes() const { return weight_bytes_; }

  // Checksum tasks: Verify(i) for i < num_verify_tasks() (0 for an HF folder, which has no checksums).
  size_t num_verify_tasks() const;
  absl::Status Verify(size_t task) const;

  // Canonical bf16 [N, K] of logical expert `expert` into `out` (N * K elements). Not for a quantized folder.
  absl::Status ReadBf16(int expert, ExpertMatrix m, bf16_t* out) const;
  // Where the canonical bf16 [N, K] of `expert` already lies in the mapped files (a per-expert or fused
  // [E, 2I, H] checkpoint, or a converted bf16 folder), or nullptr when it must be assembled by ReadBf16
  // (fused [E, H, 2I]: a transpose) or the folder is quantized. Valid while this object lives. Saves a
  // copy per matrix when loading: the packer reads the page cache directly.
  const bf16_t* MappedBf16(int expert, ExpertMatrix m) const;
  // The canonical quantized matrix (quantized folders only). `out`'s vectors are reused (resized), so a
  // caller that keeps one per thread allocates nothing after the first expert.
  absl::Status ReadQuantized(int expert, ExpertMatrix m, QuantizedMatrix* out) const;
  // The checkpoint tensors an HF layer reads (each expert's three, or the two fused ones), in a fixed order;
  // empty for a converted folder. `kt convert` records their checksums to know what a layer was made from.
  std::vector<Checkpoint::Located> SourceTensors() const;
  // The same for any input kind (a GGUF layer's three expert tensors too), as byte ranges of mapped files.
  struct SourceBytes {
    std::string name;  // The tensor.
    std::string path;  // Its file.
    const uint8_t* data = nullptr;
    uint64_t bytes = 0;
  };
  std::vector<SourceBytes> SourceSpans() const;
  // Releases the mapped pages of `expert`'s tensors from the resident set (streaming converters).
  void DropPages(int expert) const;

 private:
  LayerExperts() = default;
  absl::Status CheckExpert(int expert, const char* fn) const;
  absl::Status FindConvertedTensors(const std::string& path);
  // Native int4 (layer_experts_int4.cc): every expert's tensors; bf16 by dequantization.
  absl::Status OpenHfInt4(const Checkpoint& ckpt, const HfInt4Config& config, const std::string& config_path);
  absl::Status ReadHfInt4Bf16(int expert, ExpertMatrix m, bf16_t* out) const;
  // OpenHf for want.method exactly; OpenHf adds the dequantize_stored fallback (layer_experts_dequant.cc).
  static absl::StatusOr<std::unique_ptr<LayerExperts>> OpenHfAsRequested(std::shared_ptr<const Checkpoint> ckpt,
                                                                         const MoeArch& arch,
                                                                         const std::string& config_path,
                                                                         const LayerRequest& want);
  // FP8 / MX experts opened with dequantize_stored: their stored matrix, dequantized to bf16.
  absl::Status ReadDequantizedBf16(int expert, ExpertMatrix m, bf16_t* out) const;

  bool converted_ = false;
  int layer_ = 0;
  int e_ = 0, h_ = 0, i_ = 0;
  MethodLayout layout_;
  uint64_t weight_bytes_ = 0;
  // HF.
  std::shared_ptr<const Checkpoint> ckpt_;
  MoeArch arch_;
  // [E][3] per-expert tensors, or [2] fused (gate_up, down) in fused_.
  std::vector<Checkpoint::Located> per_expert_;
  // FP8 (quant_method "fp8"): per_expert_ are the F8_E4M3 weights and these [E][3] their F32 block scales.
  // FP8_PERCHANNEL folders: F32/BF16 `weight_scale` [N] or [N, 1] (hf_fp8.h).
  bool hf_fp8_ = false;
  HfFp8Scales hf_fp8_scales_ = HfFp8Scales::kBlock128;
  // MX-coded experts (MXFP4 / MXFP8 methods, hf_mx.h): per_expert_ the codes, per_expert_scales_ their E8M0.
  bool hf_mx_ = false;
  std::vector<Checkpoint::Located> per_expert_scales_;
  // dequantize_stored: FP8 / MX experts (hf_fp8_ or hf_mx_, as stored_layout_ reads them) read as bf16 for
  // layout_, another method.
  bool hf_dequantize_ = false;
  MethodLayout stored_layout_;
  // Native int4 (hf_int4.h): [E][3] matrices (per_expert_ are their packed tensors); exact: read quantized.
  HfInt4Config hf_int4_config_;
  std::vector<HfInt4Matrix> hf_int4_;
  int hf_int4_group_ = 0;
  bool hf_int4_exact_ = false;
  Checkpoint::Located fused_[2];
  // GGUF (layer_experts_gguf.cc): gate, up, down, each [E][N][K] in ggml blocks.
  std::shared_ptr<const GgufCheckpoint> gguf_;
  GgufExpertTensor gguf_tensors_[3];
  absl::Status ReadGgufBf16(int expert, ExpertMatrix m, bf16_t* out) const;
  // Converted.
  std::unique_ptr<SafetensorsFile> file_;
  ManifestLayer entry_;
  // [E][3][3]: data/weight, scales, zeros.
  std::vector<const TensorInfo*> tensors_;
};

}  // namespace kt

#endif  // KT_IO_LAYER_EXPERTS_H_
