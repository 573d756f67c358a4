// Loads one MoE layer's routed experts from a weight folder (Hugging Face bf16, or kt convert's output) into
// a MoeLayer. kt/io reads the folder (it never depends on kt/moe); this is the glue above it, used by the
// Python binding (load_weights(weight_path)), `kt bench --weights` and anything else in C++ that needs a
// real layer.
//
// Parallel over (slot, projection) tasks on the caller's pool: each task reads one expert matrix (bf16 into
// a per-thread buffer, or its quantized form) and hands it to LoadExpert / LoadExpertQuantized, so at most
// one matrix per thread is held outside the packed weights. A converted layer's checksums are verified
// first, in parallel over 64 MiB chunks, before anything is loaded.
#ifndef KT_MOE_LAYER_LOADER_H_
#define KT_MOE_LAYER_LOADER_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kt/io/method.h"
#include "kt/kernels/cpu_features.h"
#include "kt/moe/moe_layer.h"
#include "kt/moe/tp_layer.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

struct FolderLoadStats {
  bool converted = false;     // A kt converted folder (else Hugging Face).
  uint64_t file_bytes = 0;    // Expert weight bytes read from the folder.
  double verify_seconds = 0;  // Checksums (converted folders).
  double load_seconds = 0;    // Read + quantize (HF, quantized methods) + pack.
};

// The layer format that holds a method's stored layout: kBf16 for bf16 layouts, else the quantized format
// of layout.spec (kt-int8-channel-v1 -> kInt8, kt-int4-group{G}-sym-v1 -> kInt4GroupSym, ...).
ExpertFormat ExpertFormatOfLayout(const MethodLayout& layout);

// Loads MoE layer `layer` of `dir` into `moe` for `method` (a KTMoEWrapper method; kt/io/method.h gives its
// layout, which must be the layer's: QuantSpecOf(moe.format()) for a quantized method, bf16 for BF16).
// physical_to_logical: int64[E] (slot i holds logical expert map[i]) or nullptr for the identity.
// On error `moe` is left unloaded (Forward refuses it), so a caller that must keep its current weights
// loads into MoeLayer::CreateStaging() and adopts them on success (the Python binding does); the error names
// the file, tensor and expected value (kt/io/layer_experts.h).
absl::StatusOr<FolderLoadStats> LoadLayerFromFolder(MoeLayer& moe, const std::string& dir, int layer,
                                                    const std::string& method, int group_size,
                                                    const int64_t* physical_to_logical, ThreadPool& pool);
// The same into a tensor-parallel layer: every matrix read (bf16, or quantized from a converted folder) is
// cut for the parts as it loads, so converted folders stay independent of the TP degree and NUMA layout.
absl::StatusOr<FolderLoadStats> LoadLayerFromFolder(TpMoeLayer& moe, const std::string& dir, int layer,
                                                    const std::string& method, int group_size,
                                                    const int64_t* physical_to_logical, ThreadPool& pool);

// FP8 experts as shipped (method FP8, kt-fp8-block128-v1): E4M3 codes codes[0] gate and codes[1] up [E, I, H],
// codes[2] down [E, H, I], and their fp32 block scales (`weight_scale_inv`) [E, ceil(N/128), ceil(K/128)],
// packed into `moe` (format kFp8Block) with no bf16 copy; parallel over (slot, projection) on `pool`.
// physical_to_logical as for LoadLayerFromFolder (the caller checked it, and the arrays' shapes).
absl::Status LoadFp8Experts(MoeLayer& moe, const uint8_t* const (&codes)[3], const float* const (&scales)[3],
                            const int64_t* physical_to_logical, ThreadPool& pool);
absl::Status LoadFp8Experts(TpMoeLayer& moe, const uint8_t* const (&codes)[3], const float* const (&scales)[3],
                            const int64_t* physical_to_logical, ThreadPool& pool);

// RAWINT4 experts as compressed-tensors ships them, handed over in memory: packed[0] gate and packed[1] up the
// weight_packed bytes [E, I, H/2], packed[2] down [E, H, I/2] (int32 [.., K/8] words are the same bytes),
// offset binary; scales[p] their bf16 weight_scale [E, N, K/G], G the layer's group size. Held as
// kt-int4-group{G}-sym-v1 exactly (kt/io/hf_int4.h); the layer must be int4_group_sym. Parallel over (slot,
// projection) on `pool`; physical_to_logical as for LoadLayerFromFolder (the caller checked the shapes).
absl::Status LoadRawInt4Experts(MoeLayer& moe, const uint8_t* const (&packed)[3], const uint16_t* const (&scales)[3],
                                const int64_t* physical_to_logical, ThreadPool& pool);
absl::Status LoadRawInt4Experts(TpMoeLayer& moe, const uint8_t* const (&packed)[3],
                                const uint16_t* const (&scales)[3], const int64_t* physical_to_logical,
                                ThreadPool& pool);
// Expert codes with their scales as checkpoints store them, for LoadCodedExperts: codes[0] gate and
// codes[1] up [E, I, H], codes[2] down [E, H, I] (E4M3 bytes; MXFP4: E2M1 nibble pairs, [E, N, K/2], element
// 2i in the low nibble), and per projection the scales:
enum class CodeScales {
  kFp8Block128,    // float32 [E, ceil(N/128), ceil(K/128)] (`weight_scale_inv`): an fp8_block layer (FP8)
  kFp8PerChannel,  // float32 [E, N] (`weight_scale` [N] or [N, 1]): an fp8_block layer (FP8_PERCHANNEL; the
                   // row's scale is each of its 128-k block scales, the same weights exactly)
  kE8M0,           // uint8 [E, N, K/32] E8M0 codes (`scale`, MXFP4 / MXFP8): an mxfp4 or mxfp8 layer
};
// Packs them into `moe` with no bf16 copy, parallel over (slot, projection) on `pool`; physical_to_logical as
// for LoadLayerFromFolder. The caller checked the arrays' dtypes and shapes; InvalidArgument if `kind` does
// not go with the layer's format.
absl::Status LoadCodedExperts(MoeLayer& moe, CodeScales kind, const uint8_t* const (&codes)[3],
                              const void* const (&scales)[3], const int64_t* physical_to_logical, ThreadPool& pool);
absl::Status LoadCodedExperts(TpMoeLayer& moe, CodeScales kind, const uint8_t* const (&codes)[3],
                              const void* const (&scales)[3], const int64_t* physical_to_logical, ThreadPool& pool);

// What OpenLayerFromFolder builds: the method (and its group size) the weights are held in, the kernel path,
// and the layer's scratch size. The shape (E, k, H, I) comes from the folder's config.json.
struct FolderLayerOptions {
  std::string method = "BF16";
  int group_size = 128;
  Isa isa = Isa::kScalar;
  int max_len = 1;  // MoeConfig::max_len: the largest qlen one Forward takes.
  int layer = -1;   // -1: the folder's first MoE layer.
};

struct FolderLayer {
  std::unique_ptr<MoeLayer> moe;
  int layer = 0;             // The MoE layer loaded.
  std::string architecture;  // config.json's "architectures"[0].
  FolderLoadStats stats;
};

// A MoeLayer of the shape `dir`'s config.json gives (a converted folder keeps the source's), loaded with MoE
// layer options.layer (RAWINT4 / GPTQ_INT4: at the folder's group size, its manifest's or checkpoint's). Errors name the folder, the layer (a dense one, or one past the last) and the field.
absl::StatusOr<FolderLayer> OpenLayerFromFolder(const std::string& dir, const FolderLayerOptions& options,
                                                ThreadPool& pool);

}  // namespace kt

#endif  // KT_MOE_LAYER_LOADER_H_
