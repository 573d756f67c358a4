// The packed weights of one MoE layer's experts: gate, up and down of every expert slot, in one weight format
// (expert_format.h), packed for one kernel path, plus the products and read-backs the layers above need.
//
// MoeLayer holds one for inference; SftMoeLayer holds two: the forward weights and their transposes (the
// same class with hidden and intermediate swapped), which backward multiplies by. Everything per format
// comes from the format's ExpertFormatTraits; this class only addresses arrays and checks arguments.
//
// Thread safety: the loaders may run concurrently for different (slot, proj); ProjectBlock, PrepareRow and
// the unpackers are const and safe to call from several threads once loaded. Not copyable.
#ifndef KT_MOE_PACKED_EXPERTS_H_
#define KT_MOE_PACKED_EXPERTS_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kt/kernels/cpu_features.h"
#include "kt/kernels/dtype.h"
#include "kt/kernels/quant.h"
#include "kt/moe/aligned_buffer.h"
#include "kt/moe/expert_format.h"
#include "kt/runtime/thread_pool.h"

namespace kt {

// E experts with gate and up [I, H] and down [H, I]; group_size is G of the group formats (ignored by the
// others). Named like MoeConfig's fields, which errors quote.
struct ExpertShape {
  int num_experts = 0;
  int hidden = 0;
  int intermediate = 0;
  int group_size = 128;
  int numa_node = -1;  // >= 0: the packed arrays are bound to this NUMA node (MoeConfig::numa_node)
  // GGUF formats (stored_blocks): the ggml type id of gate, up and down (MoeConfig::gguf_types); -1 unset.
  int gguf_types[3] = {-1, -1, -1};
};

class PackedExperts {
 public:
  // Checks that `isa` runs on this CPU, that the format has a kernel on it, and the shape against the
  // format (K bounds, group size); allocates the packed arrays (the OS commits pages as they are packed).
  static absl::StatusOr<std::unique_ptr<PackedExperts>> Create(const ExpertShape& shape, Isa isa,
                                                               ExpertFormat format);

  // Canonical weights: gate and up [E, I, H], down [E, H, I], row-major bf16. Physical slot i holds logical
  // expert physical_to_logical[i] of these arrays; nullptr means the identity. Quantizes (quantized
  // formats) and packs using `pool`; the inputs can be freed afterwards.
  absl::Status LoadWeights(const bf16_t* gate, const bf16_t* up, const bf16_t* down,
                           const int64_t* physical_to_logical, ThreadPool& pool);

  // Streaming load, one (slot, proj) at a time; see MoeLayer's loaders, which these are.
  void BeginLoad();
  absl::Status LoadExpert(int slot, ExpertProj proj, const bf16_t* w);
  absl::Status LoadExpertQuantized(int slot, ExpertProj proj, const QuantizedMatrix& qm);
  // GGUF formats (stored_blocks): expert `slot`'s projection as the file stores it, `size` bytes of ggml
  // blocks (N rows of GgufRowBytes(type, K)), copied as they are. InvalidArgument for another format or size.
  absl::Status LoadExpertBlocks(int slot, ExpertProj proj, const uint8_t* bytes, size_t size);
  // Expert `slot`'s `proj` as the transpose of `src`'s, packed to packed (the format's transpose_packed):
  // both the same format, with one, src loaded, and this projection [N, K] = src's [K, N];
  // InvalidArgument / FailedPrecondition naming what differs otherwise.
  absl::Status LoadExpertTransposed(int slot, ExpertProj proj, const PackedExperts& src);
  // Whether the format transposes packed to packed (else: UnpackExpertTransposed + LoadExpert).
  bool transposes_packed() const { return traits_->transpose_packed != nullptr; }
  absl::Status FinishLoad();
  // Safe to read from any thread (an atomic flag).
  bool loaded() const { return loaded_.load(std::memory_order_acquire); }
  // Swaps the packed weights and load state with `other` (same shape, format and path: the caller checks).
  void SwapWeights(PackedExperts& other);

  // Activation scales (and int32 group sums) per prepared row for `proj`: 1, or K / group_size.
  size_t ActivationGroups(ExpertProj proj) const;
  // Whether products read prepared int8 rows (qx, sx) rather than bf16 rows (x).
  bool quantized_activations() const { return traits_->activation != ActivationKind::kBf16Rows; }
  // Prepares one row x[K] (K = ProjCols(proj)) the way this format feeds `proj`: q[K],
  // scales[ActivationGroups(proj)] and, for formats with activation sums, sums[...] (may be null
  // otherwise). Only for quantized activations.
  void PrepareRow(ExpertProj proj, const bf16_t* x, int8_t* q, float* scales, int32_t* sums = nullptr) const;
  // y[r][j] = sum_k x_r[k] W[c0 + j][k] for r < m, j < cols, with W expert `slot`'s projection `proj`
  // [N, K]; c0 a multiple of kPanelRows and c0 + cols <= N. y is overwritten (row stride ldy). Needs the
  // weights loaded. No allocation, no threads, no shared state.
  void ProjectBlock(ExpertProj proj, int slot, size_t c0, size_t cols, const ProjInput& in, size_t m,
                    float* y, size_t ldy) const;
  // Expert `slot`'s projection back in canonical form w[N, K] bf16: exact for bf16; for a quantized
  // format the dequantized weights rounded to bf16. FailedPrecondition before the weights have loaded.
  absl::Status UnpackExpert(int slot, ExpertProj proj, bf16_t* w) const;
  // The same transposed, wt[K, N] (row stride N), read straight from the packed weights.
  absl::Status UnpackExpertTransposed(int slot, ExpertProj proj, bf16_t* wt) const;

  // Rows [r0, r0 + rows) of UnpackExpert's result, out[rows, K] (row stride K), unpacked from their panels
  // alone: r0 must be a multiple of kPanelRows (16). InvalidArgument otherwise or past N; FailedPrecondition
  // before the weights have loaded.
  absl::Status UnpackExpertRows(int slot, ExpertProj proj, size_t r0, size_t rows, bf16_t* out) const;
  // FP8 block format only (fp8_block): expert `slot`'s projection as stored, with no rounding. Its E4M3 codes
  // of rows [r0, r0 + rows), codes[rows, K] (row stride K, any r0), and the checkpoint's block scales
  // (`weight_scale_inv`) block_scales[ceil(N/128), ceil(K/128)]: every row of a 128-row block holds its
  // block's scale (kt-fp8-block128-v1), so the block's first row is read. FailedPrecondition for another
  // format or before the weights have loaded; InvalidArgument for rows past N.
  absl::Status ExpertFp8Codes(int slot, ExpertProj proj, size_t r0, size_t rows, uint8_t* codes) const;
  absl::Status ExpertFp8BlockScales(int slot, ExpertProj proj, float* block_scales) const;
  // int4_group_sym only (RAWINT4 / GPTQ_INT4 checkpoints and AMXINT4_KGroup): rows [r0, r0 + rows) of expert
  // `slot`'s projection in its canonical form kt-int4-group{G}-sym-v1 (nibbles and fp32 scales, as loaded,
  // no rounding) into `out` (resized). r0 a multiple of kPanelRows; errors as UnpackExpertRows, and
  // FailedPrecondition for another format.
  absl::Status ExpertInt4GroupSymRows(int slot, ExpertProj proj, size_t r0, size_t rows, QuantizedMatrix* out) const;

  // The AMX K block of the formats that have a K-blocked AMX kernel (MoeTiling::k_block; 0: built-in).
  void SetKBlock(size_t k_block);

  const ExpertShape& shape() const { return shape_; }
  Isa isa() const { return isa_; }
  ExpertFormat format() const { return traits_->format; }
  const ExpertFormatTraits& traits() const { return *traits_; }
  // QuantSpecOf(format(), group_size); InvalidArgument for an unquantized format.
  absl::StatusOr<QuantSpec> quant_spec() const { return QuantSpecOf(format(), shape_.group_size); }
  // [N, K] of a projection: (I, H) for gate and up, (H, I) for down.
  size_t ProjRows(ExpertProj proj) const;
  size_t ProjCols(ExpertProj proj) const;
  // Bytes of packed weights held, scales, row sums and zero points included.
  size_t weight_bytes() const;
  // The first byte of a projection's packed codes (where its pages are: NUMA placement checks).
  const void* data(ExpertProj proj) const { return Proj(proj).data.get(); }

 private:
  template <typename T>
  using AlignedArray = moe_internal::AlignedBuffer<T>;

  // One projection (gate, up or down) of every expert: [N, K] per expert, packed in the format.
  struct Projection {
    size_t n = 0, k = 0;
    PackedLayout layout;
    AlignedArray<uint8_t> data;
    AlignedArray<float> scales;
    AlignedArray<int32_t> sums;
    AlignedArray<uint8_t> zeros;
    PackedExpert Expert(size_t e) const;
    MutablePackedExpert MutableExpert(size_t e);
    // Expert e's arrays at the column block starting at c0 (a multiple of 16).
    PackedExpert Block(size_t e, size_t c0) const;
  };

  PackedExperts(const ExpertShape& shape, Isa isa, const ExpertFormatTraits& traits)
      : shape_(shape), isa_(isa), traits_(&traits) {}
  Projection& Proj(ExpertProj proj) { return proj_[static_cast<int>(proj)]; }
  const Projection& Proj(ExpertProj proj) const { return proj_[static_cast<int>(proj)]; }
  absl::Status CheckSlot(const char* fn, int slot) const;
  // kInt8PerGroup's group for `proj`: the layout's act_group (GGUF), else shape_.group_size.
  size_t ActGroup(ExpertProj proj) const;
  // The spec the format's unpack reads (stored_blocks: group_size = the projection's ggml type id).
  absl::StatusOr<QuantSpec> UnpackSpec(ExpertProj proj) const;
  absl::Status CheckFp8(const char* fn, int slot) const;  // slot, fp8_block, loaded
  absl::Status Unpack(const char* fn, int slot, ExpertProj proj, bool transposed, bf16_t* out) const;
  void MarkLoaded(int slot, ExpertProj proj) {
    proj_loaded_[static_cast<size_t>(slot) * 3 + static_cast<int>(proj)] = 1;
  }

  ExpertShape shape_;
  Isa isa_;
  const ExpertFormatTraits* traits_;
  FormatGemm gemm_;         // the format's product on isa_, bound at Create
  Projection proj_[3];      // gate, up, down
  std::vector<uint8_t> proj_loaded_;  // [E * 3]: (slot, proj) loaded
  std::atomic<bool> loaded_{false};
};

}  // namespace kt

#endif  // KT_MOE_PACKED_EXPERTS_H_
