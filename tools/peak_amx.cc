// The AMX peak loop: 4 independent tdpbf16ps (16x16x32, 16384 FLOP each) per iteration on accumulator
// tiles tmm4..tmm7, from A tiles tmm0/tmm1 and B tiles tmm2/tmm3 loaded once. Same tile shapes as the
// kernel (kt/kernels/gemm_bf16_amx.cc). The caller has obtained the AMX permission (GetCpuFeatures).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kt/kernels/amx_tiles.h"
#include "tools/peak.h"

namespace kt {
namespace tools {
namespace internal {
namespace {

// Configures the tiles, loads the 16 x 64-byte `data` into the A tiles tmm0/tmm1 and B tiles tmm2/tmm3 and
// zeroes the accumulators tmm4..tmm7. The dot-product loops themselves stay in each yardstick: the tile
// intrinsics paste their tile numbers into the instruction text, so they cannot be passed in.
inline void LoadOperandTilesZeroAccumulators(const void* data) {
  ConfigureFullTiles();
  _tile_loadd(0, data, 64);
  _tile_loadd(1, data, 64);
  _tile_loadd(2, data, 64);
  _tile_loadd(3, data, 64);
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
}

// Stores the accumulators tmm4..tmm7 into c[0..3] (16 x 64 bytes each) and releases the tiles.
template <typename T>
inline void StoreAccumulatorsRelease(T (&c)[4][16 * 16]) {
  _tile_stored(4, c[0], 64);
  _tile_stored(5, c[1], 64);
  _tile_stored(6, c[2], 64);
  _tile_stored(7, c[3], 64);
  _tile_release();
}

float PeakLoopAmxBf16Loop(int64_t iters) {
  alignas(64) uint16_t data[16 * 32];
  volatile uint16_t one_thousandth = 0x3a83;  // bf16 ~1e-3, through a volatile so nothing folds
  for (auto& v : data) v = one_thousandth;
  LoadOperandTilesZeroAccumulators(data);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
  alignas(64) float c[4][16 * 16];
  StoreAccumulatorsRelease(c);
  return c[0][0] + c[1][17] + c[2][34] + c[3][255];
}

// The int8 twin: 4 independent tdpbssd (16x16x64 int8, 32768 ops each) on the same tile roles.
float PeakLoopAmxInt8Loop(int64_t iters) {
  alignas(64) int8_t data[16 * 64];
  volatile int8_t seed = 1;
  for (auto& v : data) v = seed;
  LoadOperandTilesZeroAccumulators(data);
  for (int64_t it = 0; it < iters; ++it) {
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(5, 0, 3);
    _tile_dpbssd(6, 1, 2);
    _tile_dpbssd(7, 1, 3);
  }
  alignas(64) int32_t c[4][16 * 16];
  StoreAccumulatorsRelease(c);
  return static_cast<float>((c[0][0] ^ c[1][17] ^ c[2][34] ^ c[3][255]) & 0xff);
}

}  // namespace

PeakLoop PeakLoopAmxInt8() { return PeakLoop{PeakLoopAmxInt8Loop, "tdpbssd 16x16x64", 32768, 4}; }

PeakLoop PeakLoopAmxBf16() { return PeakLoop{PeakLoopAmxBf16Loop, "tdpbf16ps 16x16x32", 16384, 4}; }

}  // namespace internal
}  // namespace tools
}  // namespace kt
