// Internal to kt/sft/sft_*.cc: what the phases of one SFT forward or backward share (sizes, strides, the
// row-chunk task list) and the small fp32 loops they use. Not part of the API.
#ifndef KT_SFT_SFT_PASS_H_
#define KT_SFT_SFT_PASS_H_

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

#include "kt/kernels/dtype.h"
#include "kt/kernels/gemm_bf16.h"  // kPanelRows
#include "kt/moe/routing.h"
#include "kt/sft/sft_layer.h"

namespace kt {
namespace sft_internal {

// Work units (routing.h, shared with MoeLayer::Forward): column blocks of kPanelsPerTask panels (48 columns;
// the AVX512-BF16 kernel's register block), kPanelsPerTaskAmx (128 columns) on AMX where re-reading A rows
// per block is what costs; rows of one expert in chunks of kRowChunk = 64 so the per-thread scratch stays
// small (64 x 128 x 4 B = 32 KiB per block).
inline size_t ColsPerTask(Isa isa) { return (isa == Isa::kAmx ? kPanelsPerTaskAmx : kPanelsPerTask) * kPanelRows; }

// Rows per step of the LoRA-gradient pass: the fp32 copy of their x (or h) rows, 32 x H x 4 B = 256 KiB
// at H = 2048, stays in L2 while the r = 16 rows of dA_g and dA_u (2 x 128 KiB) stream past it.
inline constexpr size_t kGradRows = 32;

// Row stride, in elements, of the bf16 and int8 rows the base GEMMs read (x and grad_y rows, H wide; h,
// grad_g, grad_u rows, I wide): MoeLayer's padded stride of bf16 rows (routing.h says why). One stride
// serves the bf16 and the int8 copy of a row (ProjInput has one ld): 2 (H + 32) or H + 32 bytes, never a
// multiple of 4 KiB either.
inline size_t RowStride(size_t k) { return PaddedStride(k, sizeof(bf16_t)); }

// The LoRA products themselves run in lora_kernels (per Isa). What is left here is O(rows x H) work per
// call (router gradient, weighted sums), plain loops with 8 independent partial sums that GCC vectorizes
// at -O3 without reassociating anything itself (the order is fixed by the code).
inline float Dot(const float* a, const float* b, size_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (size_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (; i < n; ++i) acc[i % 8] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline void Axpy(float alpha, const float* x, float* y, size_t n) {
  for (size_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// out[c][rr] = b[rr][c] for b [rows, cols] bf16 (a LoRA B block [cols_out, r] turned into [r, cols_out]).
inline void TransposeToF32(const bf16_t* b, size_t rows, size_t cols, float* out) {
  for (size_t i = 0; i < rows; ++i) {
    for (size_t j = 0; j < cols; ++j) out[j * rows + i] = Bf16ToF32(b[i * cols + j]);
  }
}

// Prepared rows [r0, ...) of a buffer set for ProjectBlock: the bf16 rows `x` (stride ld) and, when the
// format reads int8 rows, their int8 copy, scales and sums (`groups` per row).
inline ProjInput RowsAt(size_t r0, size_t ld, const bf16_t* x, bool quant, const int8_t* q, const float* sx,
                        const int32_t* sums, size_t groups) {
  ProjInput in;
  in.ld = ld;
  in.x = x + r0 * ld;
  if (quant) {
    in.qx = q + r0 * ld;
    in.sx = sx + r0 * groups;
    in.xsum = sums + r0 * groups;
  }
  return in;
}

// Tasks over (expert, chunk of kRowChunk rows) of a routed batch.
struct RowChunks {
  std::vector<std::pair<int, int>> chunks;  // (expert, first row)
  const ExpertRouting* routing = nullptr;
  explicit RowChunks(const ExpertRouting& r) : routing(&r) {
    for (int e : r.active) {
      for (int r0 = r.begin[e]; r0 < r.begin[e + 1]; r0 += static_cast<int>(kRowChunk)) chunks.push_back({e, r0});
    }
  }
  size_t size() const { return chunks.size(); }
  int expert(size_t task) const { return chunks[task].first; }
  size_t begin(size_t task) const { return chunks[task].second; }
  size_t end(size_t task) const {
    return std::min<size_t>(routing->begin[chunks[task].first + 1], chunks[task].second + kRowChunk);
  }
};

}  // namespace sft_internal

struct SftMoeLayer::Pass {
  Cache& c;
  SftWorkspace& w;
  size_t h, inter, r;       // hidden, intermediate, effective LoRA rank
  float s;                  // LoRA scale
  bool quant;               // products read prepared int8 rows
  size_t gh, gi;            // activation scales per prepared H-wide / I-wide row
  size_t cpt;               // columns per task
  size_t scratch;           // floats of thread scratch per thread
  size_t ldh, ldi;          // strides of H-wide and I-wide rows (bf16 and int8)
  int k, qlen;
  sft_internal::RowChunks chunks;
};

}  // namespace kt

#endif  // KT_SFT_SFT_PASS_H_
