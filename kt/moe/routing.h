// Routing of a batch to experts, and the work-unit sizes of the expert pipeline: shared by the inference
// forward (MoeLayer) and SFT's forward and backward (SftMoeLayer).
#ifndef KT_MOE_ROUTING_H_
#define KT_MOE_ROUTING_H_

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kt {

// Work unit of the gate/up and down phases: this many 16-row panels of output columns (48 columns). Small
// enough that a decode step (8 experts x 768/48 gate/up blocks = 128 tasks) balances across threads, big
// enough that the atomic task counter is negligible; 3 panels is also the AVX512-BF16 kernel's register
// block, so a task never splits one.
// AMX works on panel pairs (2 x 16 columns per tile pass) and is fast enough that a task's operands must
// stay in L2 (2 MiB per core on the AMX host); the down phase (and SFT's column blocks) use 8 panels
// (128 columns) there, where re-reading A rows per block is what costs (docs/perf-log/2026-11-27-int8.md
// and 2026-11-27-amx-bf16.md; MoeLayer sizes its gate/up tasks to L2 on AMX, moe_layer.cc).
inline constexpr size_t kPanelsPerTask = 3;
inline constexpr size_t kPanelsPerTaskAmx = 8;
// Rows of one expert processed together by one kernel call; bounds the per-thread fp32 scratch to
// 2 x 64 x 128 floats (64 KiB) whatever the batch size.
inline constexpr size_t kRowChunk = 64;
// The same for formats whose AMX kernel converts a call's weight block before multiplying
// (ExpertFormatTraits::amx_converts_weights): a Qwen3-30B expert at qlen 4096 (~256 rows) converts each
// block once instead of four times; the scratch grows to 2 x 271 x 256 floats per thread on that path only.
inline constexpr size_t kRowChunkConverting = 256;

// Row stride, in elements of `elem_bytes`, of activation rows of `k` values that a GEMM reads: whole cache
// lines plus one. Expert K dimensions are powers of two or small multiples of them, so unpadded rows sit
// 2^n bytes apart and the 16 rows of an AMX A tile (or a kernel's row block) all fall into one L1 set; the
// extra line spreads them over 16 sets, which the AMX tile kernels need to load A tiles at speed
// (docs/perf-log/2026-11-27-int8.md).
inline size_t PaddedStride(size_t k, size_t elem_bytes) {
  const size_t line_elems = 64 / elem_bytes;
  return (k + line_elems - 1) / line_elems * line_elems + line_elems;
}

// A batch of qlen tokens x k slots sorted by expert: the rows of expert e are [begin[e], begin[e + 1]), in
// (token, slot) order. Vectors grow to the largest batch and expert count seen (no allocation after).
struct ExpertRouting {
  int rows = 0;
  std::vector<int> begin;            // [E + 1] first row of each expert
  std::vector<int> active;           // experts with at least one row, in id order
  std::vector<int> row_slot;         // [rows] (token, slot) index of each row: token = row_slot / k
  std::vector<int> token_slot_row;   // [qlen * k] row of each (token, slot), -1 when skipped
  std::vector<int> count;            // [E] scratch of the counting sort
};

// Counting sort of the (token, slot) pairs of ids[qlen * k] by expert. An id < 0, >= num_experts or with
// skip[id] set (skip may be null) gets no row.
void RouteToExperts(const int64_t* ids, int qlen, int k, int num_experts, const bool* skip, ExpertRouting* out);

}  // namespace kt

#endif  // KT_MOE_ROUTING_H_
