#include "kt/moe/gpu_expert_buffers.h"

#include <algorithm>
#include <cstring>
#include <functional>
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

// Rows [r0, r0 + count) of a row-major [*, cols] matrix (elem-byte elements) to dst + dst_offset, dense.
void CopyRowSlice(const void* src, size_t cols, size_t elem, size_t r0, size_t count, std::uintptr_t dst,
                  size_t dst_offset) {
  std::memcpy(reinterpret_cast<uint8_t*>(dst) + dst_offset, static_cast<const uint8_t*>(src) + r0 * cols * elem,
              count * cols * elem);
}

// Columns [c0, c0 + count) of a row-major [rows, cols] matrix to a dense [rows, count] at dst.
void CopyColSlice(const void* src, size_t rows, size_t cols, size_t elem, size_t c0, size_t count,
                  std::uintptr_t dst) {
  for (size_t i = 0; i < rows; ++i) {
    std::memcpy(reinterpret_cast<uint8_t*>(dst) + i * count * elem,
                static_cast<const uint8_t*>(src) + (i * cols + c0) * elem, count * elem);
  }
}

// fn(i, thread) for i < n, on `pool` when given (thread < pool->num_threads()), else here (thread 0).
void ForEach(ThreadPool* pool, size_t n, const std::function<void(size_t, int)>& fn) {
  if (pool == nullptr) {
    for (size_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  pool->ParallelFor(n, fn);
}

}  // namespace

bool HasGpuExpertLayout(ExpertFormat format) {
  return format == ExpertFormat::kBf16 || format == ExpertFormat::kFp8Block || format == ExpertFormat::kInt4GroupSym;
}

namespace {

// int4_group_sym in compressed-tensors' pack-quantized layout (the header). One piece = one 16-row panel of
// a projection in canonical form (ExpertInt4GroupSymRows: two's-complement nibbles, fp32 scales), written
// as offset-binary bytes (q + 8: bit 3 of each nibble flipped, 0x88 per byte) and bf16 scales, which must
// be exact (a RAWINT4 checkpoint's are; kt's own quantizer's and GPTQ's fp16 ones in general are not).
absl::Status WriteInt4GroupSym(const PackedExperts& experts, int tp, int expert_id, const GpuExpertBuffers& b,
                               ThreadPool* pool) {
  const ExpertShape& s = experts.shape();
  const size_t H = static_cast<size_t>(s.hidden), I = static_cast<size_t>(s.intermediate);
  const size_t G = static_cast<size_t>(s.group_size), n = I / static_cast<size_t>(tp);
  constexpr size_t kPiece = 16;
  const size_t gu = CeilDiv(I, kPiece), dn = CeilDiv(H, kPiece);
  const int threads = pool == nullptr ? 1 : pool->num_threads();
  std::vector<QuantizedMatrix> scratch(static_cast<size_t>(threads));
  std::vector<absl::Status> status(2 * gu + dn);
  // Bytes [b0, b0 + count) of a canonical row to dst as offset binary; scales [g0, g0 + count) as bf16.
  const auto put_bytes = [](const uint8_t* row, size_t b0, size_t count, uint8_t* dst) {
    for (size_t i = 0; i < count; ++i) dst[i] = row[b0 + i] ^ 0x88;
  };
  const auto put_scales = [](const float* row, size_t g0, size_t count, uint8_t* dst) {
    for (size_t i = 0; i < count; ++i) {
      const bf16_t v = F32ToBf16(row[g0 + i]);
      if (Bf16ToF32(v) != row[g0 + i]) return false;
      std::memcpy(dst + i * sizeof(bf16_t), &v, sizeof(bf16_t));
    }
    return true;
  };
  ForEach(pool, status.size(), [&](size_t t, int thread) {
    const bool down = t >= 2 * gu;
    const ExpertProj proj = down ? ExpertProj::kDown : (t < gu ? ExpertProj::kGate : ExpertProj::kUp);
    const size_t r0 = (down ? t - 2 * gu : t % gu) * kPiece;
    const size_t rows = std::min(kPiece, (down ? H : I) - r0);
    QuantizedMatrix& q = scratch[static_cast<size_t>(thread)];
    status[t] = experts.ExpertInt4GroupSymRows(expert_id, proj, r0, rows, &q);
    if (!status[t].ok()) return;
    const size_t k = down ? I : H, row_bytes = k / 2, groups = k / G;
    bool exact = true;
    for (size_t i = 0; i < rows && exact; ++i) {
      const uint8_t* data = q.data.data() + i * row_bytes;
      const float* sc = q.scales.data() + i * groups;
      if (!down) {
        // Row g of gate (up) is row g % n of rank g / n's first (second) half of w13.
        const size_t g = r0 + i, up = proj == ExpertProj::kUp ? 1 : 0;
        put_bytes(data, 0, row_bytes, reinterpret_cast<uint8_t*>(b.w13_weight[g / n]) + (up * n + g % n) * row_bytes);
        exact = put_scales(sc, 0, groups,
                           reinterpret_cast<uint8_t*>(b.w13_scale[g / n]) + (up * n + g % n) * groups * 2);
        continue;
      }
      // Row h of down: its columns [r n, (r+1) n) (bytes r n/2.., groups r n/G..) are row h of rank r's w2.
      for (int r = 0; r < tp && exact; ++r) {
        put_bytes(data, r * n / 2, n / 2, reinterpret_cast<uint8_t*>(b.w2_weight[r]) + (r0 + i) * (n / 2));
        exact = put_scales(sc, r * n / G, n / G, reinterpret_cast<uint8_t*>(b.w2_scale[r]) + (r0 + i) * (n / G) * 2);
      }
    }
    if (!exact) {
      status[t] = absl::FailedPreconditionError(absl::StrCat(
          "write_weight_scale_to_buffer: a scale of expert ", expert_id, "'s ", ExpertProjName(proj),
          " (rows ", r0, "..", r0 + rows - 1, ") is not a bf16 value: the int4 GPU layout carries bf16 scales "
          "(compressed-tensors pack-quantized, method RAWINT4); these weights were not loaded from such a "
          "checkpoint"));
    }
  });
  for (const absl::Status& st : status) {
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckGpuExpertWrite(const PackedExperts& experts, int tp, int expert_id, const GpuExpertBuffers& b) {
  const ExpertFormat format = experts.format();
  if (!HasGpuExpertLayout(format)) {
    return absl::UnimplementedError(absl::StrCat(
        "write_weight_scale_to_buffer: the ", experts.traits().name,
        " weight format has no GPU kernel layout in kt (implemented for bf16, fp8_block and int4_group_sym)"));
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
  const bool int4 = format == ExpertFormat::kInt4GroupSym;
  const int n = s.intermediate / tp;
  if (int4 && n % s.group_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tp_world_size = ", tp, ": each rank's share of moe_intermediate_size = ", s.intermediate, " is ", n,
        ", not a multiple of the int4 group size (", s.group_size, "), so a group's scale would span two ranks"));
  }
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
  if (fp8 || int4) {
    if (absl::Status st = CheckList("w13_scale_ptrs", b.w13_scale, tp); !st.ok()) return st;
    if (absl::Status st = CheckList("w2_scale_ptrs", b.w2_scale, tp); !st.ok()) return st;
  }
  return absl::OkStatus();
}

absl::Status WriteExpertToGpuBuffers(const PackedExperts& experts, int tp, int expert_id,
                                     const GpuExpertBuffers& b, ThreadPool* pool) {
  if (absl::Status st = CheckGpuExpertWrite(experts, tp, expert_id, b); !st.ok()) return st;
  if (experts.format() == ExpertFormat::kInt4GroupSym) return WriteInt4GroupSym(experts, tp, expert_id, b, pool);
  const ExpertShape& s = experts.shape();
  const size_t H = static_cast<size_t>(s.hidden), I = static_cast<size_t>(s.intermediate);
  const size_t n = I / static_cast<size_t>(tp);
  const bool fp8 = experts.format() == ExpertFormat::kFp8Block;
  const size_t elem = fp8 ? 1 : sizeof(bf16_t);

  // One piece = one 16-row panel of a projection, unpacked into its thread's scratch (bf16: the stored
  // values, a re-layout with no arithmetic; fp8: the codes), then its rows copied to the ranks that hold
  // them. A DeepSeek-V3 expert is 704 pieces, so every thread of the pool gets work, and the scratch
  // (16 x max(H, I) per thread, 229 KB at H = 7168) stays in L2 between its write and its read.
  constexpr size_t kPiece = 16;  // kPanelRows: UnpackExpertRows starts at a panel
  const size_t gu = CeilDiv(I, kPiece), dn = CeilDiv(H, kPiece);
  const size_t piece_bytes = kPiece * std::max(H, I) * elem;
  const int threads = pool == nullptr ? 1 : pool->num_threads();
  std::unique_ptr<uint8_t[]> scratch(new uint8_t[static_cast<size_t>(threads) * piece_bytes]);
  std::vector<absl::Status> status(2 * gu + dn);
  ForEach(pool, status.size(), [&](size_t t, int thread) {
    const bool down = t >= 2 * gu;
    const ExpertProj proj = down ? ExpertProj::kDown : (t < gu ? ExpertProj::kGate : ExpertProj::kUp);
    const size_t r0 = (down ? t - 2 * gu : t % gu) * kPiece;
    const size_t rows = std::min(kPiece, (down ? H : I) - r0);
    uint8_t* buf = scratch.get() + static_cast<size_t>(thread) * piece_bytes;
    status[t] = fp8 ? experts.ExpertFp8Codes(expert_id, proj, r0, rows, buf)
                    : experts.UnpackExpertRows(expert_id, proj, r0, rows, reinterpret_cast<bf16_t*>(buf));
    if (!status[t].ok()) return;
    if (!down) {
      // Row g of gate (up) is row g % n of rank g / n's first (second) half of w13.
      const size_t half = proj == ExpertProj::kUp ? n * H * elem : 0;
      for (size_t i = 0; i < rows; ++i) {
        const size_t g = r0 + i;
        std::memcpy(reinterpret_cast<uint8_t*>(b.w13_weight[g / n]) + half + (g % n) * H * elem,
                    buf + i * H * elem, H * elem);
      }
      return;
    }
    // Row h of down: its columns [r n, (r+1) n) are row h of rank r's w2.
    for (size_t i = 0; i < rows; ++i) {
      for (int r = 0; r < tp; ++r) {
        std::memcpy(reinterpret_cast<uint8_t*>(b.w2_weight[r]) + (r0 + i) * n * elem,
                    buf + (i * I + r * n) * elem, n * elem);
      }
    }
  });
  for (const absl::Status& st : status) {
    if (!st.ok()) return st;
  }
  if (!fp8) return absl::OkStatus();

  // fp8_block's block scales (a few KB): the blocks of one rank's share of I are n / 128 (tp > 1 needs
  // n % 128 == 0), or all ceil(I/128) with tp = 1.
  const size_t hb = CeilDiv(H, kFp8Block), ib = CeilDiv(I, kFp8Block);
  const size_t nb = tp == 1 ? ib : n / kFp8Block;
  const ExpertProj projs[3] = {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown};
  std::vector<float> scales[3];
  for (int j = 0; j < 3; ++j) {
    scales[j].resize(ib * hb);
    if (absl::Status st = experts.ExpertFp8BlockScales(expert_id, projs[j], scales[j].data()); !st.ok()) {
      return st;
    }
  }
  const size_t f = sizeof(float);
  for (int r = 0; r < tp; ++r) {
    CopyRowSlice(scales[0].data(), hb, f, r * nb, nb, b.w13_scale[r], 0);
    CopyRowSlice(scales[1].data(), hb, f, r * nb, nb, b.w13_scale[r], nb * hb * f);
    CopyColSlice(scales[2].data(), hb, ib, f, r * nb, nb, b.w2_scale[r]);
  }
  return absl::OkStatus();
}

GpuExpertWrite::GpuExpertWrite(const MoeLayer* layer, ThreadPool* pool, int tp, int expert_id,
                               GpuExpertBuffers buffers, std::mutex* compute_mutex)
    : layer_(layer),
      pool_(pool),
      tp_(tp),
      expert_id_(expert_id),
      b_(std::move(buffers)),
      compute_mutex_(compute_mutex),
      task_(absl::StrCat("write_weight_scale_to_buffer(expert ", expert_id, ")"), [this] { return Run(); }) {}

absl::Status GpuExpertWrite::Run() {
  std::unique_lock<std::mutex> lock;
  if (compute_mutex_ != nullptr) lock = std::unique_lock<std::mutex>(*compute_mutex_);
  return WriteExpertToGpuBuffers(layer_->experts(), tp_, expert_id_, b_, pool_);
}

}  // namespace kt
