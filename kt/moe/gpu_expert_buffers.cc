#include "kt/moe/gpu_expert_buffers.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kt/kernels/dtype.h"

namespace kt {
namespace {

// The 128 x 128 block of fp8_block's scales (kt-fp8-block128-v1; the checkpoints' weight_block_size).
constexpr size_t kFp8Block = 128;

size_t CeilDiv(size_t a, size_t b) { return (a + b - 1) / b; }

absl::Status CheckList(const char* name, const std::vector<std::uintptr_t>& ptrs, int tp) {
  if (static_cast<int>(ptrs.size()) != tp) {
    return absl::InvalidArgumentError(absl::StrCat(name, " has ", ptrs.size(),
                                                   " addresses; expected one per GPU TP rank (tp_world_size = ",
                                                   tp, ")"));
  }
  for (size_t r = 0; r < ptrs.size(); ++r) {
    if (ptrs[r] == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, "[", r, "] is a null address; every rank's buffer must be given"));
    }
  }
  return absl::OkStatus();
}

template <typename T>
T* At(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Rows [r n, (r+1) n) of a row-major [rows, cols] matrix of `elem`-byte elements to dst (contiguous).
void CopyRows(const uint8_t* src, size_t cols, size_t elem, size_t r0, size_t count, uint8_t* dst) {
  std::memcpy(dst, src + r0 * cols * elem, count * cols * elem);
}

// Columns [c0, c0 + count) of a row-major [rows, cols] matrix to dst [rows, count].
void CopyCols(const uint8_t* src, size_t rows, size_t cols, size_t elem, size_t c0, size_t count, uint8_t* dst) {
  for (size_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * count * elem, src + (i * cols + c0) * elem, count * elem);
  }
}

}  // namespace

bool HasGpuExpertLayout(ExpertFormat format) {
  return format == ExpertFormat::kBf16 || format == ExpertFormat::kFp8Block;
}

absl::Status CheckGpuExpertWrite(const PackedExperts& experts, int tp, int expert_id, const GpuExpertBuffers& b) {
  const ExpertFormat format = experts.format();
  if (!HasGpuExpertLayout(format)) {
    return absl::UnimplementedError(absl::StrCat(
        "write_weight_scale_to_buffer: the ", experts.traits().name,
        " weight format has no GPU kernel layout in kt (implemented for bf16 and fp8_block)"));
  }
  if (!experts.loaded()) {
    return absl::FailedPreconditionError(
        "write_weight_scale_to_buffer before the expert weights were loaded; call load_weights or "
        "load_weights_from_tensors first");
  }
  const ExpertShape& s = experts.shape();
  if (tp < 1 || s.intermediate % tp != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tp_world_size = ", tp,
                                                   " must be >= 1 and divide moe_intermediate_size = ",
                                                   s.intermediate));
  }
  const bool fp8 = format == ExpertFormat::kFp8Block;
  const int n = s.intermediate / tp;
  if (fp8 && tp > 1 && n % static_cast<int>(kFp8Block) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tp_world_size = ", tp, ": each rank's share of moe_intermediate_size = ", s.intermediate, " is ", n,
        ", not a multiple of the FP8 scale block (128), so a block's scale would span two ranks"));
  }
  if (expert_id < 0 || expert_id >= s.num_experts) {
    return absl::OutOfRangeError(
        absl::StrCat("expert_id = ", expert_id, " is not in [0, num_experts = ", s.num_experts, ")"));
  }
  if (absl::Status st = CheckList("w13_weight_ptrs", b.w13_weight, tp); !st.ok()) return st;
  if (absl::Status st = CheckList("w2_weight_ptrs", b.w2_weight, tp); !st.ok()) return st;
  if (fp8) {
    if (absl::Status st = CheckList("w13_scale_ptrs", b.w13_scale, tp); !st.ok()) return st;
    if (absl::Status st = CheckList("w2_scale_ptrs", b.w2_scale, tp); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status WriteExpertToGpuBuffers(const PackedExperts& experts, int tp, int expert_id,
                                     const GpuExpertBuffers& b) {
  if (absl::Status st = CheckGpuExpertWrite(experts, tp, expert_id, b); !st.ok()) return st;
  const ExpertShape& s = experts.shape();
  const size_t H = static_cast<size_t>(s.hidden), I = static_cast<size_t>(s.intermediate);
  const size_t n = I / static_cast<size_t>(tp);
  const ExpertProj projs[3] = {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown};

  if (experts.format() == ExpertFormat::kBf16) {
    // The stored bf16 weights, exactly (UnpackExpert of bf16 is a re-layout, no arithmetic).
    std::vector<bf16_t> w[3];
    for (int j = 0; j < 3; ++j) {
      w[j].resize(I * H);
      if (absl::Status st = experts.UnpackExpert(expert_id, projs[j], w[j].data()); !st.ok()) return st;
    }
    const size_t e = sizeof(bf16_t);
    for (int r = 0; r < tp; ++r) {
      uint8_t* w13 = At<uint8_t>(b.w13_weight[r]);
      CopyRows(reinterpret_cast<const uint8_t*>(w[0].data()), H, e, r * n, n, w13);
      CopyRows(reinterpret_cast<const uint8_t*>(w[1].data()), H, e, r * n, n, w13 + n * H * e);
      CopyCols(reinterpret_cast<const uint8_t*>(w[2].data()), H, I, e, r * n, n, At<uint8_t>(b.w2_weight[r]));
    }
    return absl::OkStatus();
  }

  // fp8_block: the E4M3 codes and the block scales as loaded.
  const size_t hb = CeilDiv(H, kFp8Block), ib = CeilDiv(I, kFp8Block);
  // Blocks of one rank's share of I: n / 128 (tp > 1 needs n % 128 == 0), or all ib with tp = 1.
  const size_t nb = tp == 1 ? ib : n / kFp8Block;
  std::vector<uint8_t> codes[3];
  std::vector<float> scales[3];
  for (int j = 0; j < 3; ++j) {
    codes[j].resize(I * H);
    scales[j].resize(ib * hb);
    if (absl::Status st = experts.ExpertFp8Codes(expert_id, projs[j], codes[j].data(), scales[j].data());
        !st.ok()) {
      return st;
    }
  }
  for (int r = 0; r < tp; ++r) {
    uint8_t* w13 = At<uint8_t>(b.w13_weight[r]);
    CopyRows(codes[0].data(), H, 1, r * n, n, w13);
    CopyRows(codes[1].data(), H, 1, r * n, n, w13 + n * H);
    CopyCols(codes[2].data(), H, I, 1, r * n, n, At<uint8_t>(b.w2_weight[r]));
    const size_t f = sizeof(float);
    uint8_t* s13 = At<uint8_t>(b.w13_scale[r]);
    CopyRows(reinterpret_cast<const uint8_t*>(scales[0].data()), hb, f, r * nb, nb, s13);
    CopyRows(reinterpret_cast<const uint8_t*>(scales[1].data()), hb, f, r * nb, nb, s13 + nb * hb * f);
    CopyCols(reinterpret_cast<const uint8_t*>(scales[2].data()), hb, ib, f, r * nb, nb,
             At<uint8_t>(b.w2_scale[r]));
  }
  return absl::OkStatus();
}

GpuExpertWrite::GpuExpertWrite(const MoeLayer* layer, int tp, int expert_id, GpuExpertBuffers buffers,
                               std::mutex* compute_mutex)
    : layer_(layer),
      tp_(tp),
      expert_id_(expert_id),
      b_(std::move(buffers)),
      compute_mutex_(compute_mutex),
      task_(absl::StrCat("write_weight_scale_to_buffer(expert ", expert_id, ")"), [this] { return Run(); }) {}

absl::Status GpuExpertWrite::Run() {
  std::unique_lock<std::mutex> lock;
  if (compute_mutex_ != nullptr) lock = std::unique_lock<std::mutex>(*compute_mutex_);
  return WriteExpertToGpuBuffers(layer_->experts(), tp_, expert_id_, b_);
}

}  // namespace kt
