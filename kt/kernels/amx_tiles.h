// AMX tile configuration shared by the AMX kernels and the AMX peak yardstick. Include only from
// translation units compiled with -mamx-tile, and call only after GetCpuFeatures() reported amx_permitted
// (Linux grants tile data per process on request).
#ifndef KT_KERNELS_AMX_TILES_H_
#define KT_KERNELS_AMX_TILES_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace kt {

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) AmxTileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Configures all 8 tiles as full 16 rows x 64 bytes: A tiles of 16 x 32 bf16 (or 16 x 64 int8), B tiles
// of 16 pair-rows (quad-rows for int8) x 64 bytes, C tiles of 16 x 16 fp32/int32.
inline void ConfigureFullTiles() {
  AmxTileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

}  // namespace kt

#endif  // KT_KERNELS_AMX_TILES_H_
