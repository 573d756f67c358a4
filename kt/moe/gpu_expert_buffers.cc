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

// One strided copy: `rows` rows of `row_bytes` bytes, from src (row stride src_stride) to dst (dst_stride).
struct CopyJob {
  const uint8_t* src;
  size_t src_stride;
  uint8_t* dst;
  size_t dst_stride;
  size_t row_bytes;
  size_t rows;
};

// Rows [r0, r0 + count) of a row-major [*, cols] matrix (elem-byte elements) to a dense [count, cols].
CopyJob RowSlice(const void* src, size_t cols, size_t elem, size_t r0, size_t count, std::uintptr_t dst,
                 size_t dst_offset_bytes) {
  return CopyJob{static_cast<const uint8_t*>(src) + r0 * cols * elem, cols * elem,
                 reinterpret_cast<uint8_t*>(dst) + dst_offset_bytes, cols * elem, cols * elem, count};
}

// Columns [c0, c0 + count) of a row-major [rows, cols] matrix to a dense [rows, count].
CopyJob ColSlice(const void* src, size_t rows, size_t cols, size_t elem, size_t c0, size_t count,
                 std::uintptr_t dst) {
  return CopyJob{static_cast<const uint8_t*>(src) + c0 * elem, cols * elem, reinterpret_cast<uint8_t*>(dst),
                 count * elem, count * elem, rows};
}

// fn(i) for i < n, on `pool` when given.
void ForEach(ThreadPool* pool, size_t n, const std::function<void(size_t)>& fn) {
  if (pool == nullptr || n < 2) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool->ParallelFor(n, [&](size_t i, int /*thread*/) { fn(i); });
}

// Runs the jobs, split into pieces of at most 64 rows so that the pool's threads share even one rank's
// slices (a DeepSeek-V3 expert is 3 x 29 MB of bf16: memory-bound copies want every thread).
void RunCopies(const std::vector<CopyJob>& jobs, ThreadPool* pool) {
  constexpr size_t kRowsPerPiece = 64;
  std::vector<CopyJob> pieces;
  for (const CopyJob& j : jobs) {
    for (size_t r = 0; r < j.rows; r += kRowsPerPiece) {
      CopyJob p = j;
      p.src += r * j.src_stride;
      p.dst += r * j.dst_stride;
      p.rows = std::min(kRowsPerPiece, j.rows - r);
      pieces.push_back(p);
    }
  }
  ForEach(pool, pieces.size(), [&](size_t i) {
    const CopyJob& p = pieces[i];
    if (p.src_stride == p.row_bytes && p.dst_stride == p.row_bytes) {
      std::memcpy(p.dst, p.src, p.rows * p.row_bytes);
      return;
    }
    for (size_t r = 0; r < p.rows; ++r) std::memcpy(p.dst + r * p.dst_stride, p.src + r * p.src_stride, p.row_bytes);
  });
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
                                     const GpuExpertBuffers& b, ThreadPool* pool) {
  if (absl::Status st = CheckGpuExpertWrite(experts, tp, expert_id, b); !st.ok()) return st;
  const ExpertShape& s = experts.shape();
  const size_t H = static_cast<size_t>(s.hidden), I = static_cast<size_t>(s.intermediate);
  const size_t n = I / static_cast<size_t>(tp);
  const ExpertProj projs[3] = {ExpertProj::kGate, ExpertProj::kUp, ExpertProj::kDown};
  absl::Status status[3];
  std::vector<CopyJob> jobs;

  if (experts.format() == ExpertFormat::kBf16) {
    // The stored bf16 weights, exactly (UnpackExpert of bf16 is a re-layout, no arithmetic), one projection
    // per thread, into scratch left uninitialized (every element is written).
    std::unique_ptr<bf16_t[]> w[3];
    for (auto& m : w) m.reset(new bf16_t[I * H]);
    ForEach(pool, 3, [&](size_t j) { status[j] = experts.UnpackExpert(expert_id, projs[j], w[j].get()); });
    for (const absl::Status& st : status) {
      if (!st.ok()) return st;
    }
    const size_t e = sizeof(bf16_t);
    for (int r = 0; r < tp; ++r) {
      jobs.push_back(RowSlice(w[0].get(), H, e, r * n, n, b.w13_weight[r], 0));
      jobs.push_back(RowSlice(w[1].get(), H, e, r * n, n, b.w13_weight[r], n * H * e));
      jobs.push_back(ColSlice(w[2].get(), H, I, e, r * n, n, b.w2_weight[r]));
    }
    RunCopies(jobs, pool);
    return absl::OkStatus();
  }

  // fp8_block: the E4M3 codes and the block scales as loaded.
  const size_t hb = CeilDiv(H, kFp8Block), ib = CeilDiv(I, kFp8Block);
  // Blocks of one rank's share of I: n / 128 (tp > 1 needs n % 128 == 0), or all ib with tp = 1.
  const size_t nb = tp == 1 ? ib : n / kFp8Block;
  std::unique_ptr<uint8_t[]> codes[3];
  std::vector<float> scales[3];
  for (int j = 0; j < 3; ++j) {
    codes[j].reset(new uint8_t[I * H]);
    scales[j].resize(ib * hb);
  }
  ForEach(pool, 3, [&](size_t j) {
    status[j] = experts.ExpertFp8Codes(expert_id, projs[j], codes[j].get(), scales[j].data());
  });
  for (const absl::Status& st : status) {
    if (!st.ok()) return st;
  }
  const size_t f = sizeof(float);
  for (int r = 0; r < tp; ++r) {
    jobs.push_back(RowSlice(codes[0].get(), H, 1, r * n, n, b.w13_weight[r], 0));
    jobs.push_back(RowSlice(codes[1].get(), H, 1, r * n, n, b.w13_weight[r], n * H));
    jobs.push_back(ColSlice(codes[2].get(), H, I, 1, r * n, n, b.w2_weight[r]));
    jobs.push_back(RowSlice(scales[0].data(), hb, f, r * nb, nb, b.w13_scale[r], 0));
    jobs.push_back(RowSlice(scales[1].data(), hb, f, r * nb, nb, b.w13_scale[r], nb * hb * f));
    jobs.push_back(ColSlice(scales[2].data(), hb, ib, f, r * nb, nb, b.w2_scale[r]));
  }
  RunCopies(jobs, pool);
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
